//! A real volume server for one test (its own Postgres database and store
//! directory, real `qemu-img`), optionally beside a real image server, on
//! ephemeral loopback ports. Tests act as the sidecar: they set the trusted
//! `x-cirrus-*` headers of the caller they play (`runtime::testing`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::image::v1 as ipb;
use proto::volume::v1 as pb;
use proto::volume::v1::volumes_client::VolumesClient;
use runtime::caller::Caller;
use runtime::db::TestDatabase;
use runtime::testing::{Served, req};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use volume::{Config, Volumes};

#[allow(unused_imports)]
pub use runtime::testing::{
    PROJECT_A, admin, assert_code, assert_status, member_a, member_b, nobody, reader_a, wait_for,
};

pub const GIB: u64 = 1024 * 1024 * 1024;
pub const MIB: usize = 1024 * 1024;

pub fn test_config(db_url: &str, store: &Path, image: Option<SocketAddr>) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.metrics_listen = None;
    c.database.url = db_url.to_string();
    c.database.pool_size = 8;
    c.store.dir = store.to_path_buf();
    c.image.outbound = None;
    c.image.url = image.map(|a| format!("http://{a}"));
    c
}

pub struct Server {
    pub served: Served,
    pub volumes: Volumes,
    pub config: Config,
    pub dir: tempfile::TempDir,
    pub db: TestDatabase,
    pub image: Option<ImageServer>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(false, |_| {}).await
    }

    pub async fn with_image() -> Self {
        Self::start_with(true, |_| {}).await
    }

    pub async fn start_with(with_image: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::create()
            .await
            .expect("test database (is Postgres running?)");
        let dir = tempfile::tempdir().unwrap();
        let image = if with_image {
            Some(ImageServer::start(&dir.path().join("image-store")).await)
        } else {
            None
        };
        let mut config = test_config(
            &db.url,
            &dir.path().join("store"),
            image.as_ref().map(|i| i.served.addr),
        );
        tweak(&mut config);
        Self::serve(db, dir, image, config).await
    }

    /// Serves (again) on an existing database and store: a restart.
    pub async fn serve(
        db: TestDatabase,
        dir: tempfile::TempDir,
        image: Option<ImageServer>,
        config: Config,
    ) -> Self {
        let volumes = Volumes::start(config.clone()).await.unwrap();
        let served_volumes = volumes.clone();
        let served = Served::spawn(move |l, s| volume::serve(served_volumes, l, s)).await;
        Self {
            served,
            volumes,
            config,
            dir,
            db,
            image,
        }
    }

    /// Stops serving and hands back what a restart needs.
    pub async fn stop(self) -> (TestDatabase, tempfile::TempDir, Option<ImageServer>, Config) {
        self.served.stop().await.unwrap();
        (self.db, self.dir, self.image, self.config)
    }

    pub fn client(&self) -> VolumesClient<Channel> {
        VolumesClient::new(self.served.channel.clone())
    }

    pub fn store(&self) -> PathBuf {
        self.config.store.dir.clone()
    }

    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.store().join("volumes").join(id)
    }

    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.store().join("snapshots").join(id)
    }

    /// Every file in the store (volumes/, snapshots/, tmp/), sorted.
    pub fn store_files(&self) -> Vec<String> {
        store_files(&self.store())
    }

    pub async fn create(
        &self,
        who: &Caller,
        m: pb::CreateVolumeRequest,
    ) -> Result<pb::Volume, tonic::Status> {
        self.client()
            .create_volume(req(m, who))
            .await
            .map(|r| r.into_inner())
    }

    /// An available empty volume of `size_gb` in `who`'s project.
    pub async fn create_empty(&self, who: &Caller, name: &str, size_gb: u64) -> pb::Volume {
        let v = self
            .create(
                who,
                pb::CreateVolumeRequest {
                    name: name.into(),
                    size_gb,
                    wait: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(status(&v), pb::VolumeStatus::Available, "{v:?}");
        v
    }

    pub async fn get(&self, who: &Caller, id: &str) -> Result<pb::Volume, tonic::Status> {
        self.client()
            .get_volume(req(pb::GetVolumeRequest { id: id.into() }, who))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn delete(&self, who: &Caller, id: &str) -> Result<(), tonic::Status> {
        self.client()
            .delete_volume(req(pb::DeleteVolumeRequest { id: id.into() }, who))
            .await
            .map(drop)
    }

    pub async fn attach(
        &self,
        who: &Caller,
        volume_id: &str,
        connector: Option<pb::HostConnector>,
    ) -> Result<pb::Attachment, tonic::Status> {
        self.client()
            .create_attachment(req(
                pb::CreateAttachmentRequest {
                    volume_id: volume_id.into(),
                    server_id: "server-1".into(),
                    connector,
                },
                who,
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn snapshot(
        &self,
        who: &Caller,
        volume_id: &str,
        force: bool,
    ) -> Result<pb::Snapshot, tonic::Status> {
        self.client()
            .create_snapshot(req(
                pb::CreateSnapshotRequest {
                    volume_id: volume_id.into(),
                    name: "snap".into(),
                    force,
                    wait: true,
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Waits (bounded) until the volume leaves CREATING.
    pub async fn settled(&self, who: &Caller, id: &str) -> pb::Volume {
        wait_for(
            "the volume to leave creating",
            Duration::from_secs(120),
            || async {
                let v = self.get(who, id).await.map_err(|e| e.to_string())?;
                if status(&v) == pb::VolumeStatus::Creating {
                    Err(format!("{v:?}"))
                } else {
                    Ok(v)
                }
            },
        )
        .await
    }

    /// Runs SQL on the service's schema, as an operator would.
    pub async fn sql(&self, sql: &str) {
        let c = runtime::db::connect(&self.db.url).await.unwrap();
        c.batch_execute(&format!("SET search_path = volume; {sql}"))
            .await
            .unwrap();
    }
}

pub fn local_connector() -> pb::HostConnector {
    pb::HostConnector {
        host: "host-1".into(),
        transports: vec![pb::Transport::LocalFile as i32],
    }
}

pub fn status(v: &pb::Volume) -> pb::VolumeStatus {
    pb::VolumeStatus::try_from(v.status).unwrap()
}

pub fn snap_status(s: &pb::Snapshot) -> pb::SnapshotStatus {
    pb::SnapshotStatus::try_from(s.status).unwrap()
}

pub fn store_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["volumes", "snapshots", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            out.extend(rd.map(|e| format!("{sub}/{}", e.unwrap().file_name().to_string_lossy())));
        }
    }
    out.sort();
    out
}

// ------------------------------------------------------------- qemu-img

/// `qemu-img info --output=json` of a file.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that a disk image's guest-visible bytes are `data` followed by
/// zeroes up to `total`, with qemu-img reading the image: the SHA-256 of
/// the data region as `qemu-img dd -O raw` gives it, and `qemu-img compare`
/// of the whole against a sparse raw file of the expected bytes (compare
/// skips unallocated blocks, so a GiB of zeroes costs nothing).
#[track_caller]
pub fn assert_holds(image: &Path, data: &[u8], total: u64) {
    let info = qemu_info(image);
    assert_eq!(info["virtual-size"], total, "{info}");
    let format = info["format"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("head.raw");
    let count = data.len().div_ceil(512).max(1);
    qemu_img(&[
        "dd",
        "-f",
        &format,
        "-O",
        "raw",
        "bs=512",
        &format!("count={count}"),
        &format!("if={}", image.display()),
        &format!("of={}", out.display()),
    ]);
    let head = std::fs::read(&out).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&head[..data.len()])),
        hex::encode(Sha256::digest(data)),
        "the first {} bytes of {} differ",
        data.len(),
        image.display()
    );
    assert!(head[data.len()..].iter().all(|b| *b == 0));
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&expected)
        .unwrap()
        .set_len(total)
        .unwrap();
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        &format,
        expected.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
}

/// Deterministic bytes that do not start with any disk image header.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed as u64) as u8)
                ^ (i >> 12) as u8
        })
        .map(|b| if b == b'Q' { b'q' } else { b })
        .collect()
}

/// Writes `data` at the start of a raw volume's file (what a guest would do).
pub fn write_into(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

// -------------------------------------------------------- image service

/// A real image server (the `image` crate) on its own database and store:
/// what the volume service reaches through the sidecars in production.
pub struct ImageServer {
    pub served: Served,
    pub db: TestDatabase,
}

/// The image service's config, built through serde so that this harness
/// does not depend on that crate's field layout: its tables are set by
/// their path (`database.url` or `database_url`, as the crate has them).
pub fn image_config(db_url: &str, store: &Path) -> image::Config {
    let mut v = serde_json::to_value(image::Config::default()).unwrap();
    let mut set = |paths: &[&[&str]], value: serde_json::Value| {
        let done = paths.iter().any(|path| set_path(&mut v, path, &value));
        assert!(done, "image::Config has none of {paths:?}");
    };
    set(&[&["database", "url"], &["database_url"]], db_url.into());
    set(&[&["database", "pool_size"], &["db_pool_size"]], 4.into());
    set(
        &[&["store", "dir"], &["store_dir"]],
        store.display().to_string().into(),
    );
    set(&[&["server", "listen"], &["listen"]], "127.0.0.1:0".into());
    // Absent (skipped) or null: either way no metrics listener.
    for path in [&["server", "metrics_listen"][..], &["metrics_listen"][..]] {
        set_path(&mut v, path, &serde_json::Value::Null);
    }
    serde_json::from_value(v).unwrap()
}

fn set_path(v: &mut serde_json::Value, path: &[&str], value: &serde_json::Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = v;
    for key in parents {
        match at.get_mut(*key) {
            Some(next) => at = next,
            None => return false,
        }
    }
    match at.get_mut(*last) {
        Some(slot) => {
            *slot = value.clone();
            true
        }
        None => false,
    }
}

impl ImageServer {
    pub async fn start(store: &Path) -> Self {
        let db = TestDatabase::create().await.unwrap();
        let config = image_config(&db.url, store);
        let served = Served::spawn(move |l, s| async move {
            image::run(config, l, s)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .await;
        Self { served, db }
    }

    pub fn client(&self) -> proto::image::v1::images_client::ImagesClient<Channel> {
        proto::image::v1::images_client::ImagesClient::new(self.served.channel.clone())
            .max_decoding_message_size(8 * MIB)
            .max_encoding_message_size(8 * MIB)
    }

    /// An active image of `who`'s project holding `data`.
    pub async fn upload(
        &self,
        who: &Caller,
        disk_format: ipb::DiskFormat,
        data: &[u8],
    ) -> ipb::Image {
        let img = self
            .client()
            .create_image(req(
                ipb::CreateImageRequest {
                    name: "img".into(),
                    disk_format: disk_format as i32,
                    container_format: ipb::ContainerFormat::Bare as i32,
                    ..Default::default()
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut msgs: Vec<ipb::UploadRequest> = data
            .chunks(MIB)
            .map(|c| ipb::UploadRequest {
                image_id: String::new(),
                data: c.to_vec().into(),
            })
            .collect();
        if msgs.is_empty() {
            msgs.push(ipb::UploadRequest::default());
        }
        msgs[0].image_id = img.id.clone();
        self.client()
            .upload(req(tokio_stream::iter(msgs), who))
            .await
            .unwrap()
            .into_inner()
    }
}

/// A qcow2 image of `raw`, made by `qemu-img convert`.
pub fn qcow2_of(raw: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (r, q) = (dir.path().join("in.raw"), dir.path().join("out.qcow2"));
    std::fs::write(&r, raw).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        r.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    std::fs::read(&q).unwrap()
}
