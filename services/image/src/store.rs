//! Where image bytes live. [`Store`] is the backend trait; [`FsStore`] keeps
//! each image as one file.
//!
//! The calls are blocking (file I/O): the service runs them on Tokio's
//! blocking threads and moves data through bounded channels, so memory does
//! not grow with the image size.
//!
//! Crash safety: a new image is written to `tmp/`, fsynced, renamed into
//! `images/` and the directory fsynced, so a file under `images/` is always
//! whole. Which files are *wanted* is the database's call: at start-up the
//! service [`Store::sweep`]s away every temporary file and every image file
//! whose record is not active, so nothing half-written or deleted survives.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// An image being written. Dropping it without [`StoreWriter::commit`]
/// removes what was written.
pub trait StoreWriter: Write + Send {
    /// Makes the bytes durable and visible under the image's id.
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// A store backend for image bytes.
pub trait Store: Send + Sync + 'static {
    /// Starts writing the bytes of `id`; nothing is visible until commit.
    fn begin(&self, id: Uuid) -> io::Result<Box<dyn StoreWriter>>;
    /// Reads the bytes of `id` from `offset`; also returns the stored size.
    fn open(&self, id: Uuid, offset: u64) -> io::Result<(Box<dyn Read + Send>, u64)>;
    /// Removes the bytes of `id`; removing what is not there is no error.
    fn delete(&self, id: Uuid) -> io::Result<()>;
    /// Removes every partial write and the bytes of every image not in
    /// `keep`; returns how many files went.
    fn sweep(&self, keep: &HashSet<Uuid>) -> io::Result<usize>;
}

/// Image files under a directory: `images/<id>` and `tmp/<id>.<random>.part`.
pub struct FsStore {
    images: PathBuf,
    tmp: PathBuf,
}

impl FsStore {
    /// Opens (creating, mode 0700) the store at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let images = root.join("images");
        let tmp = root.join("tmp");
        for d in [root, &images, &tmp] {
            fs::create_dir_all(d)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
            }
        }
        Ok(Self { images, tmp })
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.images.join(id.to_string())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct FsWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
}

impl Write for FsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("writer already closed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl StoreWriter for FsWriter {
    fn commit(mut self: Box<Self>) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("writer already closed"))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.dest)?;
        sync_dir(&self.dir)
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        if self.file.take().is_some()
            && let Err(e) = fs::remove_file(&self.tmp)
        {
            tracing::warn!(path = %self.tmp.display(), error = %e, "cannot remove a partial upload");
        }
    }
}

impl Store for FsStore {
    fn begin(&self, id: Uuid) -> io::Result<Box<dyn StoreWriter>> {
        let tmp = self
            .tmp
            .join(format!("{id}.{}.part", Uuid::new_v4().simple()));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok(Box::new(FsWriter {
            file: Some(file),
            tmp,
            dest: self.path(id),
            dir: self.images.clone(),
        }))
    }

    fn open(&self, id: Uuid, offset: u64) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let mut f = File::open(self.path(id))?;
        let size = f.metadata()?.len();
        f.seek(SeekFrom::Start(offset.min(size)))?;
        Ok((Box::new(f), size))
    }

    fn delete(&self, id: Uuid) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Ok(()) => sync_dir(&self.images),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn sweep(&self, keep: &HashSet<Uuid>) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            fs::remove_file(entry?.path())?;
            removed += 1;
        }
        for entry in fs::read_dir(&self.images)? {
            let entry = entry?;
            let wanted = entry
                .file_name()
                .to_str()
                .and_then(|n| Uuid::parse_str(n).ok())
                .is_some_and(|id| keep.contains(&id));
            if !wanted {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.images)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read_all(s: &FsStore, id: Uuid, offset: u64) -> Vec<u8> {
        let (mut r, _) = s.open(id, offset).unwrap();
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn commit_makes_bytes_visible_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).unwrap();
        let id = Uuid::new_v4();
        let mut w = s.begin(id).unwrap();
        w.write_all(b"hello world").unwrap();
        assert!(s.open(id, 0).is_err(), "visible before commit");
        w.commit().unwrap();
        assert_eq!(read_all(&s, id, 6), b"world");

        let other = Uuid::new_v4();
        let mut w = s.begin(other).unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(s.open(other, 0).is_err());

        s.delete(id).unwrap();
        s.delete(id).unwrap();
        assert!(s.open(id, 0).is_err());
    }

    #[test]
    fn sweep_removes_partials_and_unwanted_images() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::open(dir.path()).unwrap();
        let (keep, gone) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [keep, gone] {
            let mut w = s.begin(id).unwrap();
            w.write_all(b"x").unwrap();
            w.commit().unwrap();
        }
        // What a crash in the middle of a write leaves behind.
        fs::write(
            dir.path().join("tmp").join(format!("{gone}.x.part")),
            b"half",
        )
        .unwrap();
        fs::write(dir.path().join("images").join("junk"), b"?").unwrap();
        let removed = s.sweep(&HashSet::from([keep])).unwrap();
        assert_eq!(removed, 3);
        assert_eq!(read_all(&s, keep, 0), b"x");
        assert!(s.open(gone, 0).is_err());
    }
}
