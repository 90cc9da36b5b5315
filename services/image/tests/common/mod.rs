//! A real image server for one test: its own Postgres database, its own
//! store directory, an ephemeral port on loopback. Tests act as the sidecar:
//! they set the trusted `x-cirrus-*` headers of the caller they play.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use image::{Config, Images};
use proto::image::v1 as pb;
use proto::image::v1::images_client::ImagesClient;
use runtime::caller::Caller;
use runtime::db::TestDatabase;
use runtime::testing::Served;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

// The callers and assertions every crate shares; image's tests name the
// fixtures by their part in an image's life: the owner, a reader of the
// owner project, an outsider.
#[allow(unused_imports)]
pub use runtime::testing::{
    ADMIN_PROJECT, PROJECT_A, PROJECT_B, admin, assert_code, assert_status, caller,
    member_a as owner, member_b as other, nobody, reader_a as reader, req, wait_for,
};

/// An image service served on loopback (`runtime::testing::Served`), with
/// its database and store kept here so that a test can restart it.
pub struct Server {
    pub addr: SocketAddr,
    pub images: Images,
    pub channel: Channel,
    pub config: Config,
    served: Served,
    pub store: tempfile::TempDir,
    pub db: TestDatabase,
}

pub fn test_config(db: &TestDatabase, store: &Path) -> Config {
    Config {
        server: runtime::config::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        },
        database: runtime::config::DatabaseConfig {
            url: db.url.clone(),
            pool_size: 4,
            ..runtime::config::DatabaseConfig::local("image")
        },
        store_dir: store.to_path_buf(),
        ..Config::default()
    }
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::create()
            .await
            .expect("test database (is Postgres running?)");
        let store = tempfile::tempdir().unwrap();
        let mut config = test_config(&db, &store.path().join("store"));
        tweak(&mut config);
        Self::serve(db, store, config).await
    }

    /// Serves (again) on an existing database and store: a restart.
    pub async fn serve(db: TestDatabase, store: tempfile::TempDir, config: Config) -> Self {
        let images = Images::start(config.clone()).await.unwrap();
        let served_images = images.clone();
        let served = Served::spawn(move |listener, shutdown| {
            image::serve(served_images, listener, shutdown)
        })
        .await;
        Self {
            addr: served.addr,
            channel: served.channel.clone(),
            images,
            config,
            served,
            store,
            db,
        }
    }

    /// Stops serving (bounded) and hands back the database and store.
    pub async fn stop(self) -> (TestDatabase, tempfile::TempDir, Config) {
        tokio::time::timeout(Duration::from_secs(20), self.served.stop())
            .await
            .expect("server drained within 20 s")
            .unwrap();
        (self.db, self.store, self.config)
    }

    pub fn client(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
            .max_decoding_message_size(8 * 1024 * 1024)
            .max_encoding_message_size(8 * 1024 * 1024)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.config.store_dir.clone()
    }

    /// Every file in the store (images/ and tmp/).
    pub fn store_files(&self) -> Vec<PathBuf> {
        store_files(&self.config.store_dir)
    }

    pub async fn create(
        &self,
        who: &Caller,
        m: pb::CreateImageRequest,
    ) -> Result<pb::Image, tonic::Status> {
        self.client()
            .create_image(req(m, who))
            .await
            .map(|r| r.into_inner())
    }

    /// A queued raw/bare image of `who`'s project.
    pub async fn create_raw(&self, who: &Caller, name: &str) -> pb::Image {
        self.create(who, raw(name)).await.unwrap()
    }

    pub async fn get(&self, who: &Caller, id: &str) -> Result<pb::Image, tonic::Status> {
        self.client()
            .get_image(req(pb::GetImageRequest { id: id.into() }, who))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn upload(
        &self,
        who: &Caller,
        id: &str,
        data: &[u8],
        chunk: usize,
    ) -> Result<pb::Image, tonic::Status> {
        let msgs = upload_messages(id, data, chunk);
        self.client()
            .upload(req(tokio_stream::iter(msgs), who))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn download(
        &self,
        who: &Caller,
        id: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut s = self
            .client()
            .download(req(
                pb::DownloadRequest {
                    image_id: id.into(),
                    offset,
                    length,
                },
                who,
            ))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("a download chunk within 30 s")?
        {
            assert!(
                m.data.len() <= 1024 * 1024,
                "chunk of {} bytes",
                m.data.len()
            );
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }
}

pub fn store_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["images", "tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            out.extend(rd.map(|e| e.unwrap().path()));
        }
    }
    out
}

pub fn raw(name: &str) -> pb::CreateImageRequest {
    pb::CreateImageRequest {
        name: name.into(),
        disk_format: pb::DiskFormat::Raw as i32,
        container_format: pb::ContainerFormat::Bare as i32,
        ..Default::default()
    }
}

pub fn upload_messages(id: &str, data: &[u8], chunk: usize) -> Vec<pb::UploadRequest> {
    let mut msgs: Vec<pb::UploadRequest> = data
        .chunks(chunk.max(1))
        .map(|c| pb::UploadRequest {
            image_id: String::new(),
            data: c.to_vec().into(),
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(pb::UploadRequest::default());
    }
    msgs[0].image_id = id.into();
    msgs
}

/// Deterministic bytes that are not a known image header.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed as u64) as u8
                ^ (i >> 12) as u8
        })
        .map(|b| if b == b'Q' { b'q' } else { b })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn status_of(i: &pb::Image) -> pb::Status {
    pb::Status::try_from(i.status).unwrap()
}

/// A TCP relay between a client and the server, whose connections can be
/// cut at once: what the server sees when a client process dies.
pub struct Relay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, task }
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    /// Closes every relayed connection (both sides) and stops accepting.
    pub fn cut(self) {
        self.task.abort();
    }
}

/// The real `image` binary as a child process, configured through the
/// environment as an operator would.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub store_dir: PathBuf,
}

impl Process {
    /// Starts `image serve` on a free loopback port and waits (bounded) for health.
    pub async fn start(db_url: &str, store_dir: &Path) -> Self {
        // Reserve a free port, release it, hand it to the child.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image"))
            .arg("serve")
            .env_remove("CIRRUS_CONFIG")
            .env("CIRRUS_SERVER__LISTEN", addr.to_string())
            .env("CIRRUS_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("CIRRUS_DATABASE__URL", db_url)
            .env("CIRRUS_DATABASE__POOL_SIZE", "4")
            .env("CIRRUS_STORE_DIR", store_dir)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("the image binary starts");
        let p = Self {
            child,
            addr,
            store_dir: store_dir.to_path_buf(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while runtime::serve::healthcheck(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the image binary did not become healthy within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    pub fn client(&self) -> ImagesClient<Channel> {
        ImagesClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect_lazy(),
        )
        .max_decoding_message_size(8 * 1024 * 1024)
    }

    /// (VmHWM, VmRSS) of the child in KiB, from /proc/<pid>/status.
    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.pid())
    }

    /// SIGKILL: a crash, no clean-up of any kind.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the child died within 20 s")
            .unwrap();
    }
}

pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

pub mod mesh;
pub mod raw;

/// The call of an upload whose messages a test sends one at a time.
pub type UploadCall = tokio::task::JoinHandle<Result<tonic::Response<pb::Image>, tonic::Status>>;

/// Opens an upload on `client` as `who` in a task; the test feeds it through
/// the sender (holding `depth` messages) and ends it by dropping the sender
/// (a clean end) or aborting the call (a cancel).
pub fn open_upload(
    mut client: ImagesClient<Channel>,
    who: &Caller,
    depth: usize,
) -> (tokio::sync::mpsc::Sender<pb::UploadRequest>, UploadCall) {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(depth);
    let r = req(tokio_stream::wrappers::ReceiverStream::new(rx), who);
    (tx, tokio::spawn(async move { client.upload(r).await }))
}
