//! Where volume bytes live. [`Store`] is the backend trait; [`FsStore`]
//! keeps each volume as one file (sparse raw, or qcow2) and each snapshot as
//! one qcow2 file, made and copied with the real `qemu-img`.
//!
//! Crash safety: every new file is made under `tmp/` (`<id>.<random>.part`),
//! fsynced, renamed into `volumes/` or `snapshots/` and the directory
//! fsynced, so a file there is always whole. Which files are *wanted* is the
//! database's call: at start-up the service [`Store::sweep`]s away every
//! temporary file and every file whose record is gone, so no file outlives
//! its volume or snapshot, whatever crashed when.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use runtime::error::{Error, Result};
use serde::Deserialize;
use uuid::Uuid;

use crate::image::Chunk;
use crate::model::{ConnectionInfo, Connector, Format, Transport};
use tokio::sync::mpsc;

/// Blocks of zeroes this long are skipped, not written: files stay sparse.
const ZERO_BLOCK: usize = 64 * 1024;

/// Writes `data` at `offset` of `f`, skipping blocks of zeroes (the file is
/// new and sized, so they read back as zeroes) and merging the runs between
/// them into single writes.
fn write_sparse(f: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut run: Option<usize> = None;
    let mut at = 0;
    while at < data.len() {
        let end = (at + ZERO_BLOCK).min(data.len());
        let zero = data[at..end].iter().all(|b| *b == 0);
        match (zero, run) {
            (true, Some(start)) => {
                f.write_all_at(&data[start..at], offset + start as u64)?;
                run = None;
            }
            (false, None) => run = Some(at),
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run {
        f.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// A store backend for volume and snapshot bytes.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// An empty volume of `size` bytes.
    async fn create(&self, id: Uuid, format: Format, size: u64) -> Result<()>;
    /// A volume of `size` bytes holding the disk image in `src` (raw or
    /// qcow2, as `src_format` says and the file must confirm). A file that
    /// is not what it claims, or that does not fit, is `Precondition`.
    async fn import(
        &self,
        id: Uuid,
        format: Format,
        size: u64,
        src: &Path,
        src_format: Format,
    ) -> Result<()>;
    /// A raw volume of `size` bytes written from a raw image's bytes as
    /// they arrive (no staging copy, no second pass), kept only once
    /// [`Chunk::End`] comes; bytes that are not raw (another format's
    /// header) or that do not fit are `Precondition`.
    async fn import_raw(&self, id: Uuid, size: u64, chunks: mpsc::Receiver<Chunk>) -> Result<()>;
    /// A volume of `size` bytes holding the bytes of snapshot `snapshot`.
    async fn restore(&self, id: Uuid, format: Format, size: u64, snapshot: Uuid) -> Result<()>;
    /// A qcow2 copy of the volume `volume`, kept as snapshot `snapshot`.
    async fn snapshot(&self, volume: Uuid, format: Format, snapshot: Uuid) -> Result<()>;
    /// Grows the volume to `size` bytes.
    async fn extend(&self, id: Uuid, format: Format, size: u64) -> Result<()>;
    /// Whether the backend can grow a volume a guest has open.
    fn can_extend_in_use(&self) -> bool {
        false
    }
    /// Removes a volume's file; removing what is not there is no error.
    async fn delete_volume(&self, id: Uuid) -> Result<()>;
    async fn delete_snapshot(&self, id: Uuid) -> Result<()>;
    /// A temporary file (for an image download), removed when dropped.
    fn staging(&self, id: Uuid) -> Result<Staged>;
    /// Removes every temporary file and every file whose id is not kept;
    /// returns how many files went.
    async fn sweep(&self, volumes: &HashSet<Uuid>, snapshots: &HashSet<Uuid>) -> Result<usize>;
    /// How a host with `connector` reaches the volume's bytes.
    fn connection(&self, id: Uuid, format: Format, connector: &Connector)
    -> Result<ConnectionInfo>;
}

/// A temporary file, removed when dropped unless it was published.
#[derive(Debug)]
pub struct Staged {
    pub path: PathBuf,
    published: bool,
}

impl Staged {
    /// The file was moved into place: leave it.
    fn disarm(&mut self) {
        self.published = true;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a staged file")
            }
        }
    }
}

/// Volume files under a directory: `volumes/<id>`, `snapshots/<id>` and
/// `tmp/<id>.<random>.part|.download`.
pub struct FsStore {
    volumes: PathBuf,
    snapshots: PathBuf,
    tmp: PathBuf,
    qemu_img: PathBuf,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

impl FsStore {
    /// Opens (creating) the store at `root`; `qemu_img` is the
    /// program to run.
    pub fn open(root: &Path, qemu_img: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let volumes = root.join("volumes");
        let snapshots = root.join("snapshots");
        let tmp = root.join("tmp");
        // The hypervisor (QEMU as its own user) opens an attached volume by
        // its path, after libvirt gave the file to it: so the root and the
        // volumes directory may be traversed (0711), never listed, and each
        // volume file is 0600. Snapshots and staging stay 0700.
        for (d, mode) in [
            (&root, 0o711),
            (&volumes, 0o711),
            (&snapshots, 0o700),
            (&tmp, 0o700),
        ] {
            std::fs::create_dir_all(d)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?;
            }
            #[cfg(not(unix))]
            let _ = mode;
        }
        Ok(Self {
            volumes,
            snapshots,
            tmp,
            qemu_img: qemu_img.to_path_buf(),
        })
    }

    pub fn volume_path(&self, id: Uuid) -> PathBuf {
        self.volumes.join(id.to_string())
    }

    pub fn snapshot_path(&self, id: Uuid) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    fn temp(&self, id: Uuid, suffix: &str) -> Staged {
        Staged {
            path: self
                .tmp
                .join(format!("{id}.{}.{suffix}", Uuid::new_v4().simple())),
            published: false,
        }
    }

    /// Runs `qemu-img <args>`; a failure is internal, with its stderr for the log.
    async fn qemu_img(&self, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
        let out = tokio::process::Command::new(&self.qemu_img)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A task that is dropped (shutdown) takes its qemu-img with it.
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::internal(format!("cannot run {}: {e}", self.qemu_img.display())))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(Error::internal(format!(
                "qemu-img {:?} failed ({}): {}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// `qemu-img info` of a file read as `format`, or probed when `None`.
    async fn info(&self, path: &Path, format: Option<Format>) -> Result<Info> {
        let mut args: Vec<&std::ffi::OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
        if let Some(f) = format {
            args.push("-f".as_ref());
            args.push(f.as_str().as_ref());
        }
        args.push(path.as_os_str());
        let out = self.qemu_img(&args).await?;
        serde_json::from_slice(&out)
            .map_err(|e| Error::internal(format!("qemu-img info output: {e}")))
    }

    /// A file of `size` bytes in `format` at `path`: a sparse raw file (what
    /// `qemu-img create -f raw` makes: one ftruncate, done here without a
    /// fork), or a qcow2 made by `qemu-img create`.
    async fn make_empty(&self, path: &Path, format: Format, size: u64) -> Result<()> {
        match format {
            Format::Raw => {
                let p = path.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&p)?;
                    f.set_len(size)
                })
                .await
                .map_err(|e| Error::internal(format!("store task: {e}")))?
                .map_err(|e| io("cannot create", path, e))
            }
            Format::Qcow2 => {
                let size = size.to_string();
                self.qemu_img(&[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    path.as_os_str(),
                    size.as_ref(),
                ])
                .await
                .map(drop)
            }
        }
    }

    /// Copies `src` (read as `src_format`) into the existing `dest`
    /// (`format`), skipping zeroes so that the result stays sparse.
    async fn convert_into(
        &self,
        src: &Path,
        src_format: Format,
        dest: &Path,
        format: Format,
    ) -> Result<()> {
        self.qemu_img(&[
            "convert".as_ref(),
            "-q".as_ref(),
            // The target exists (made at the volume's full size).
            "-n".as_ref(),
            // Eight requests in flight, written out of order: the target
            // is a fresh file, so the order of writes does not matter.
            "-m".as_ref(),
            "8".as_ref(),
            "-W".as_ref(),
            "-f".as_ref(),
            src_format.as_str().as_ref(),
            "-O".as_ref(),
            format.as_str().as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ])
        .await
        .map(drop)
    }

    /// Makes `tmp` durable and moves it to `dest`.
    async fn publish(&self, tmp: Staged, dest: PathBuf) -> Result<()> {
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut tmp = tmp;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&tmp.path)?
                .sync_all()?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp.path, std::fs::Permissions::from_mode(0o600))?;
            }
            std::fs::rename(&tmp.path, &dest)?;
            // Renamed: nothing left for the guard to remove.
            tmp.disarm();
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::internal(format!("store task: {e}")))?
        .map_err(|e| Error::internal(format!("publishing a volume file: {e}")))
    }

    async fn remove(&self, path: PathBuf) -> Result<()> {
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => path
                .parent()
                .map_or(Ok(()), |d| std::fs::File::open(d)?.sync_all())
                .map_err(|e| io("cannot sync the directory of", &path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &path, e)),
        })
        .await
        .map_err(|e| Error::internal(format!("store task: {e}")))?
    }
}

#[derive(Debug, Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
}

impl Info {
    fn data_file(&self) -> Option<&serde_json::Value> {
        self.format_specific.as_ref()?.get("data")?.get("data-file")
    }
}

#[tonic::async_trait]
impl Store for FsStore {
    async fn create(&self, id: Uuid, format: Format, size: u64) -> Result<()> {
        let tmp = self.temp(id, "part");
        self.make_empty(&tmp.path, format, size).await?;
        self.publish(tmp, self.volume_path(id)).await
    }

    async fn import(
        &self,
        id: Uuid,
        format: Format,
        size: u64,
        src: &Path,
        src_format: Format,
    ) -> Result<()> {
        // What the bytes really are, probed, must be what the image claims:
        // a "raw" image holding a qcow2 header would otherwise be read as raw
        // here and as qcow2 by anything downstream that probes.
        let probed = self.info(src, None).await?;
        if probed.format != src_format.as_str() {
            return Err(Error::precondition(format!(
                "the image's bytes are {}, not {src_format} as it claims",
                probed.format
            )));
        }
        let info = self.info(src, Some(src_format)).await?;
        if info.backing_filename.is_some() || info.data_file().is_some() {
            return Err(Error::precondition(
                "the image refers to other files (a backing or data file)",
            ));
        }
        if info.virtual_size > size {
            return Err(Error::precondition(format!(
                "the image's virtual size ({} bytes) is larger than the volume ({size} bytes)",
                info.virtual_size
            )));
        }
        let tmp = self.temp(id, "part");
        self.make_empty(&tmp.path, format, size).await?;
        self.convert_into(src, src_format, &tmp.path, format)
            .await?;
        self.publish(tmp, self.volume_path(id)).await
    }

    async fn import_raw(
        &self,
        id: Uuid,
        size: u64,
        mut chunks: mpsc::Receiver<Chunk>,
    ) -> Result<()> {
        let tmp = self.temp(id, "part");
        let tmp = tokio::task::spawn_blocking(move || -> Result<Staged> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp.path)
                .map_err(|e| io("cannot create", &tmp.path, e))?;
            f.set_len(size)
                .map_err(|e| io("cannot size", &tmp.path, e))?;
            let mut offset = 0u64;
            loop {
                match chunks.blocking_recv() {
                    Some(Chunk::Data(b)) => {
                        if offset + b.len() as u64 > size {
                            return Err(Error::precondition(format!(
                                "the image is larger than the volume ({size} bytes)"
                            )));
                        }
                        write_sparse(&f, offset, &b)
                            .map_err(|e| io("cannot write", &tmp.path, e))?;
                        offset += b.len() as u64;
                    }
                    Some(Chunk::End) => break,
                    None => return Err(Error::aborted("the image download stopped")),
                }
            }
            Ok(tmp)
        })
        .await
        .map_err(|e| Error::internal(format!("store task: {e}")))??;
        // The bytes must be raw: a "raw" image holding another format's
        // header would be read as that format by anything that probes.
        let probed = self.info(&tmp.path, None).await?;
        if probed.format != "raw" {
            return Err(Error::precondition(format!(
                "the image's bytes are {}, not raw as it claims",
                probed.format
            )));
        }
        self.publish(tmp, self.volume_path(id)).await
    }

    async fn restore(&self, id: Uuid, format: Format, size: u64, snapshot: Uuid) -> Result<()> {
        let src = self.snapshot_path(snapshot);
        let tmp = self.temp(id, "part");
        self.make_empty(&tmp.path, format, size).await?;
        self.convert_into(&src, Format::Qcow2, &tmp.path, format)
            .await?;
        self.publish(tmp, self.volume_path(id)).await
    }

    async fn snapshot(&self, volume: Uuid, format: Format, snapshot: Uuid) -> Result<()> {
        let src = self.volume_path(volume);
        let tmp = self.temp(snapshot, "part");
        self.qemu_img(&[
            "convert".as_ref(),
            "-q".as_ref(),
            // A consistent copy of a volume a guest may have open (force):
            // qemu-img must not take the image lock a running QEMU holds.
            "-U".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            src.as_os_str(),
            tmp.path.as_os_str(),
        ])
        .await?;
        self.publish(tmp, self.snapshot_path(snapshot)).await
    }

    async fn extend(&self, id: Uuid, format: Format, size: u64) -> Result<()> {
        let path = self.volume_path(id);
        let size = size.to_string();
        self.qemu_img(&[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ])
        .await?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new().write(true).open(&p)?.sync_all()
        })
        .await
        .map_err(|e| Error::internal(format!("store task: {e}")))?
        .map_err(|e| io("cannot sync", &path, e))
    }

    async fn delete_volume(&self, id: Uuid) -> Result<()> {
        self.remove(self.volume_path(id)).await
    }

    async fn delete_snapshot(&self, id: Uuid) -> Result<()> {
        self.remove(self.snapshot_path(id)).await
    }

    fn staging(&self, id: Uuid) -> Result<Staged> {
        Ok(self.temp(id, "download"))
    }

    async fn sweep(&self, volumes: &HashSet<Uuid>, snapshots: &HashSet<Uuid>) -> Result<usize> {
        let (v, s, t) = (
            self.volumes.clone(),
            self.snapshots.clone(),
            self.tmp.clone(),
        );
        let (keep_v, keep_s) = (volumes.clone(), snapshots.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
            let mut removed = 0;
            for entry in std::fs::read_dir(&t)? {
                std::fs::remove_file(entry?.path())?;
                removed += 1;
            }
            for (dir, keep) in [(&v, &keep_v), (&s, &keep_s)] {
                let mut here = 0;
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    let wanted = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| Uuid::parse_str(n).ok())
                        .is_some_and(|id| keep.contains(&id));
                    if !wanted {
                        std::fs::remove_file(entry.path())?;
                        here += 1;
                    }
                }
                if here > 0 {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                removed += here;
            }
            Ok(removed)
        })
        .await
        .map_err(|e| Error::internal(format!("store task: {e}")))?
        .map_err(|e| Error::internal(format!("sweeping the store: {e}")))
    }

    fn connection(
        &self,
        id: Uuid,
        format: Format,
        connector: &Connector,
    ) -> Result<ConnectionInfo> {
        if connector.transports.contains(&Transport::LocalFile) {
            return Ok(ConnectionInfo::LocalFile {
                path: self.volume_path(id).display().to_string(),
                format,
            });
        }
        Err(Error::precondition(
            "this volume store offers only local_file connections (a host sharing the store); \
             nbd exports are not offered yet",
        ))
    }
}
