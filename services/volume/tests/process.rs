//! The real `volume` binary, configured through the environment as an
//! operator would: a SIGKILL in the middle of copying an image into a
//! volume leaves, at the next start, the volume ERROR and no stray file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use proto::image::v1 as ipb;
use proto::volume::v1 as pb;
use proto::volume::v1::volumes_client::VolumesClient;
use runtime::db::TestDatabase;
use runtime::testing::req;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Process {
    async fn start(db_url: &str, store: &Path, image: SocketAddr) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_volume"))
            .arg("serve")
            .env_remove("CIRRUS_CONFIG")
            .env("CIRRUS_SERVER__LISTEN", addr.to_string())
            .env("CIRRUS_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("CIRRUS_DATABASE__URL", db_url)
            .env("CIRRUS_DATABASE__POOL_SIZE", "4")
            .env("CIRRUS_STORE__DIR", store)
            .env("CIRRUS_IMAGE__URL", format!("http://{image}"))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("the volume binary starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while runtime::serve::healthcheck(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the volume binary did not become healthy within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, addr }
    }

    fn client(&self) -> VolumesClient<Channel> {
        VolumesClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect_lazy(),
        )
    }

    /// SIGKILL: a crash, no clean-up of any kind.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the child died within 20 s")
            .unwrap();
    }
}

/// A TCP relay that passes the server's answers on slowly (about 6 MB/s),
/// so that a copy is reliably caught in the middle.
async fn slow_relay(target: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((inbound, _)) = listener.accept().await {
            conns.spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = outbound.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ir, &mut ow).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match or.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if iw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                up.abort();
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_sigkill_mid_copy_leaves_the_volume_error_and_no_stray_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = ImageServer::start(&dir.path().join("image-store")).await;
    let data = pattern(24 * MIB, 11);
    let img = images
        .upload(&member_a(), ipb::DiskFormat::Raw, &data)
        .await;
    let (slow, relay) = slow_relay(images.served.addr).await;

    let db = TestDatabase::create().await.unwrap();
    let store = dir.path().join("store");
    let p = Process::start(&db.url, &store, slow).await;
    let v = p
        .client()
        .create_volume(req(
            pb::CreateVolumeRequest {
                image_id: img.id.clone(),
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&v), pb::VolumeStatus::Creating);
    // Caught in the middle: some, not all, of the image's bytes are in
    // the volume's temporary file (sparse: count its allocated blocks).
    let staged = wait_for("a partly copied image", Duration::from_secs(60), || async {
        use std::os::unix::fs::MetadataExt;
        let tmp: Vec<_> = std::fs::read_dir(store.join("tmp"))
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| {
                (
                    e.path(),
                    e.metadata().map(|m| m.blocks() * 512).unwrap_or(0),
                )
            })
            .collect();
        match tmp
            .iter()
            .find(|(_, used)| *used > 0 && *used < data.len() as u64)
        {
            Some((path, used)) => Ok((path.clone(), *used)),
            None => Err(format!("{tmp:?}")),
        }
    })
    .await;
    p.kill().await;
    relay.abort();
    assert!(staged.0.exists(), "the crash left its partial file");
    assert_eq!(store_files(&store).len(), 1, "{:?}", store_files(&store));

    // The next start heals it.
    let p = Process::start(&db.url, &store, images.served.addr).await;
    let healed = p
        .client()
        .get_volume(req(pb::GetVolumeRequest { id: v.id.clone() }, &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&healed), pb::VolumeStatus::Error);
    assert_eq!(
        healed.status_reason,
        "interrupted by a restart of the volume service"
    );
    assert_eq!(store_files(&store), Vec::<String>::new());

    // The service works on: the same image, uninterrupted, then cleaned up.
    let again = p
        .client()
        .create_volume(req(
            pb::CreateVolumeRequest {
                image_id: img.id.clone(),
                wait: true,
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&again), pb::VolumeStatus::Available, "{again:?}");
    assert_holds(&store.join("volumes").join(&again.id), &data, GIB);
    for id in [&v.id, &again.id] {
        p.client()
            .delete_volume(req(pb::DeleteVolumeRequest { id: id.clone() }, &member_a()))
            .await
            .unwrap();
    }
    assert_eq!(store_files(&store), Vec::<String>::new());
    p.kill().await;
}
