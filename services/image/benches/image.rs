//! Upload and download throughput of a 1 GiB image through the image
//! service, beside a plain file copy of the same bytes on the same disk in
//! the same run, and the service's peak resident memory.
//!
//! `cargo bench -p image` (needs Postgres at 127.0.0.1:5432, or
//! `CIRRUS_TEST_DATABASE_URL`). Set `CIRRUS_BENCH_SIZE_MIB` for another size.
//!
//! The same transfers run twice in one run: client → service on loopback,
//! then client → outbound sidecar → (mTLS) → inbound sidecar → service, the
//! two sidecars being real `sidecar` processes (built by
//! `cargo build --release -p sidecar`) that check a real token from an
//! identity server started here. `CIRRUS_BENCH_ENDPOINT` still points the
//! direct run elsewhere.

use std::io::{Read, Write};

/// The PKI and identity the sidecar pair needs, shared with the tests.
#[path = "../tests/common/mesh.rs"]
mod mesh;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use proto::image::v1 as pb;
use proto::image::v1::images_client::ImagesClient;
use runtime::caller::Caller;
use tonic::Request;
use tonic::transport::Channel;

const MIB: usize = 1024 * 1024;

fn caller() -> Caller {
    Caller {
        user_id: Some("bench".into()),
        project_id: Some("bench-project".into()),
        roles: vec!["member".into(), "reader".into()],
        ..Default::default()
    }
}

/// The token sent through the sidecars (they replace the trusted headers).
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn req<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    caller().to_metadata(r.metadata_mut());
    if let Some(t) = TOKEN.get()
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// identity, PKI and two sidecar processes in front of the image service at
/// `image_listen`; returns a client channel through the pair, the sidecars,
/// and the cloud (identity, PKI) they need, which must outlive them.
async fn mesh(
    dir: &Path,
    image_listen: &str,
) -> anyhow::Result<Option<(Channel, Vec<tokio::process::Child>, mesh::Cloud)>> {
    let sidecar_bin = Path::new(env!("CARGO_BIN_EXE_image")).with_file_name("sidecar");
    if !sidecar_bin.is_file() {
        println!(
            "(sidecar pair not measured: build it first with `cargo build --release -p sidecar`)"
        );
        return Ok(None);
    }
    let cloud = mesh::Cloud::start(&["image", "compute-api"]).await;
    let (pki, id_addr, token) = (cloud.pki.path(), cloud.identity, cloud.token.clone());

    let port = || -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (inbound, outbound) = (port()?, port()?);
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sidecar/policy/image.toml");
    let conf = |svc: &str, extra: String| -> std::io::Result<std::path::PathBuf> {
        let p = dir.join(format!("{svc}-sidecar.toml"));
        std::fs::write(
            &p,
            format!(
                "service = \"{svc}\"\ncert = \"{d}/{svc}.crt\"\nkey = \"{d}/{svc}.key\"\nbundle = \"{d}/bundle.pem\"\n\
                 identity_url = \"http://{id_addr}\"\npolicy = \"{}\"\nupstream = \"{image_listen}\"\n\
                 max_message_bytes = 16777216\nrequest_timeout_ms = 600000\n{extra}",
                policy.display(),
                d = pki.display()
            ),
        )?;
        Ok(p)
    };
    let a = conf(
        "image",
        format!("internal_listen = \"127.0.0.1:{inbound}\"\n"),
    )?;
    let b = conf(
        "compute-api",
        format!(
            "internal_listen = \"127.0.0.1:{}\"\noutbound_listen = \"127.0.0.1:{outbound}\"\n",
            port()?
        ),
    )?;
    let mut procs = Vec::new();
    for c in [a, b] {
        procs.push(
            tokio::process::Command::new(&sidecar_bin)
                .arg("--config")
                .arg(c)
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    cloud
        .register("image", format!("https://127.0.0.1:{inbound}"))
        .await;
    let _ = TOKEN.set(token);

    let channel = Channel::from_shared(format!("http://127.0.0.1:{outbound}"))?
        .origin("http://image".parse()?)
        .initial_stream_window_size(4 * MIB as u32)
        .initial_connection_window_size(8 * MIB as u32)
        .max_frame_size(2 * MIB as u32)
        .connect_lazy();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = ImagesClient::new(channel.clone());
        if c.get_quota(req(pb::GetQuotaRequest::default()))
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sidecar pair never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Some((channel, procs, cloud)))
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Writes `size` bytes of a cheap, non-repeating pattern, fsynced.
fn make_source(path: &Path, size: usize) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; MIB];
    for i in 0..size / MIB {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (j as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(i as u32)
                .to_le_bytes()[1];
        }
        buf[0] = 0; // never a qcow2 magic
        f.write_all(&buf)?;
    }
    f.sync_all()
}

/// The anchor: read the source and write a copy in 1 MiB blocks, fsynced,
/// as the service does with what it receives.
fn plain_copy(src: &Path, dst: &Path) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut r = std::fs::File::open(src)?;
    let mut w = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])?;
    }
    w.sync_all()?;
    let d = t.elapsed();
    std::fs::remove_file(dst)?;
    Ok(d)
}

/// User + system CPU seconds the process has used.
fn cpu_secs(pid: u32) -> f64 {
    runtime::testing::cpu_seconds(&pid.to_string())
}

fn memory_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn upload(
    client: &mut ImagesClient<Channel>,
    src: &Path,
    id: &str,
) -> anyhow::Result<pb::Image> {
    // A reader thread feeds a bounded channel: the client holds a few MiB.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(4);
    let src = src.to_path_buf();
    let first_id = id.to_string();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = std::fs::File::open(src)?;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; MIB];
            let mut filled = 0;
            while filled < MIB {
                let n = f.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            let m = pb::UploadRequest {
                image_id: if first {
                    first_id.clone()
                } else {
                    String::new()
                },
                data: buf.into(),
            };
            first = false;
            if tx.blocking_send(m).is_err() {
                return Ok(());
            }
        }
    });
    let done = client
        .upload(req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?
        .into_inner();
    reader.await??;
    Ok(done)
}

async fn download(client: &mut ImagesClient<Channel>, id: &str, dst: &Path) -> anyhow::Result<u64> {
    let mut stream = client
        .download(req(pb::DownloadRequest {
            image_id: id.into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<prost::bytes::Bytes>(4);
    let dst = dst.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut f = std::fs::File::create(&dst)?;
        let mut n = 0u64;
        while let Some(c) = rx.blocking_recv() {
            f.write_all(&c)?;
            n += c.len() as u64;
        }
        f.sync_all()?;
        std::fs::remove_file(&dst)?;
        Ok(n)
    });
    while let Some(m) = stream.next().await {
        tx.send(m?.data).await?;
    }
    drop(tx);
    Ok(writer.await??)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; there are no options to parse.
    let size_mib: usize = std::env::var("CIRRUS_BENCH_SIZE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = size_mib * MIB;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let db = runtime::db::TestDatabase::create().await?;
        // Source, copy, download and store all on one filesystem.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
        let src = dir.path().join("source.bin");
        make_source(&src, size)?;

        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_image"))
            .arg("serve")
            .env_remove("CIRRUS_CONFIG")
            .env("CIRRUS_LISTEN", &listen)
            .env("CIRRUS_METRICS_LISTEN", "127.0.0.1:0")
            .env("CIRRUS_DATABASE_URL", &db.url)
            .env("CIRRUS_DB_POOL_SIZE", "4")
            .env("CIRRUS_STORE_DIR", dir.path().join("store"))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while runtime::serve::healthcheck(listen.parse()?).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the image service did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Where the client sends: the service, or a sidecar in front of it.
        let target =
            std::env::var("CIRRUS_BENCH_ENDPOINT").unwrap_or_else(|_| format!("http://{listen}"));
        // Windows and frames sized for bulk transfer, as the service's own.
        let endpoint = Channel::from_shared(target.clone())?
            .initial_stream_window_size(4 * MIB as u32)
            .initial_connection_window_size(8 * MIB as u32)
            .max_frame_size(2 * MIB as u32);
        let mut client =
            ImagesClient::new(endpoint.connect().await?).max_decoding_message_size(8 * MIB);

        let copy1 = plain_copy(&src, &dir.path().join("copy.bin"))?;

        let img = client
            .create_image(req(pb::CreateImageRequest {
                name: "bench".into(),
                disk_format: pb::DiskFormat::Raw as i32,
                container_format: pb::ContainerFormat::Bare as i32,
                expected_size: Some(size as u64),
                ..Default::default()
            }))
            .await?
            .into_inner();
        let (t, cpu0) = (Instant::now(), cpu_secs(pid));
        let done = upload(&mut client, &src, &img.id).await?;
        let (up, up_cpu) = (t.elapsed(), cpu_secs(pid) - cpu0);
        anyhow::ensure!(
            done.size == Some(size as u64),
            "uploaded size {:?}",
            done.size
        );

        let (t, cpu0) = (Instant::now(), cpu_secs(pid));
        let got = download(&mut client, &img.id, &dir.path().join("download.bin")).await?;
        let (down, down_cpu) = (t.elapsed(), cpu_secs(pid) - cpu0);
        anyhow::ensure!(got == size as u64, "downloaded {got} bytes");

        // The same transfers through the sidecar pair.
        let via = match mesh(dir.path(), &listen).await? {
            Some((channel, procs, _cloud)) => {
                let mut client = ImagesClient::new(channel).max_decoding_message_size(8 * MIB);
                let img = client
                    .create_image(req(pb::CreateImageRequest {
                        name: "bench-mesh".into(),
                        disk_format: pb::DiskFormat::Raw as i32,
                        container_format: pb::ContainerFormat::Bare as i32,
                        expected_size: Some(size as u64),
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                let pids: Vec<u32> = procs.iter().filter_map(|p| p.id()).collect();
                let side_cpu = || pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
                let (t, c0) = (Instant::now(), side_cpu());
                let done = upload(&mut client, &src, &img.id).await?;
                let (mup, mup_cpu) = (t.elapsed(), side_cpu() - c0);
                anyhow::ensure!(done.size == Some(size as u64), "uploaded size {:?}", done.size);
                let (t, c0) = (Instant::now(), side_cpu());
                let got = download(&mut client, &img.id, &dir.path().join("download2.bin")).await?;
                let (mdown, mdown_cpu) = (t.elapsed(), side_cpu() - c0);
                anyhow::ensure!(got == size as u64, "downloaded {got} bytes through the pair");
                let rss: Vec<f64> = pids.iter().map(|p| memory_kib(*p) as f64 / 1024.0).collect();
                Some((mup, mup_cpu, mdown, mdown_cpu, rss, procs))
            }
            None => None,
        };

        let copy2 = plain_copy(&src, &dir.path().join("copy.bin"))?;
        let peak = memory_kib(pid);
        let _ = child.kill().await;

        let copy = (copy1 + copy2) / 2;
        let base = mb_per_s(size as u64, copy);
        let row = |what: &str, d: Duration, cpu: Option<f64>| {
            let r = mb_per_s(size as u64, d);
            let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.2} s"));
            println!(
                "| {what:<28} | {:>7.2} | {:>7.1} | {:>6.0}% | {cpu:>11} |",
                d.as_secs_f64(),
                r,
                100.0 * r / base
            );
        };
        println!();
        println!("image service, {size_mib} MiB, client -> {target} directly, then through the sidecar pair; target ≥ 50% of the plain copy");
        println!(
            "| {:<28} | {:>7} | {:>7} | {:>7} | {:>11} |",
            "transfer", "seconds", "MB/s", "vs copy", "service CPU"
        );
        println!("|{:-<30}|{:->9}|{:->9}|{:->9}|{:->13}|", "", "", "", "", "");
        row("plain file copy (mean of 2)", copy, None);
        row("upload (client stream)", up, Some(up_cpu));
        row("download (server stream)", down, Some(down_cpu));
        if let Some((mup, mup_cpu, mdown, mdown_cpu, rss, _procs)) = &via {
            row("upload via the sidecar pair", *mup, Some(*mup_cpu));
            row("download via the sidecar pair", *mdown, Some(*mdown_cpu));
            println!(
                "(for the pair, the CPU column is both sidecars' CPU; their peak RSS: {:.1} and {:.1} MiB)",
                rss.first().copied().unwrap_or(0.0),
                rss.get(1).copied().unwrap_or(0.0)
            );
        }
        println!("service peak RSS (VmHWM): {:.1} MiB", peak as f64 / 1024.0);
        println!(
            "plain copy runs: {:.2} s and {:.2} s",
            copy1.as_secs_f64(),
            copy2.as_secs_f64()
        );
        Ok(())
    })
}
