//! Helpers for Cirrus's end-to-end tests, which run the real binaries
//! (`cirrus`, `identity`, ...) as a user would, against a real Postgres.
//! The tests themselves are in `tests/tests/`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// The directory holding the workspace's binaries (beside this test binary's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    for b in ["cirrus", "identity", "sidecar", "queue", "image"] {
        assert!(
            dir.join(b).is_file(),
            "{b} is not built in {}: run `cargo build --workspace --bins` (scripts/test.sh does)",
            dir.display()
        );
    }
    dir
}

/// A base port such that `base..base + n` are all free on loopback now.
pub fn free_port_range(n: u16) -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for i in 0..200u64 {
        let base =
            20_000 + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) % 35_000) as u16;
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free range of {n} ports on loopback");
}

/// A free TCP port on loopback (the kernel's choice; released before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a binary with exactly `env` as its CIRRUS_* environment, bounded in time.
pub async fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(bin_dir().join(bin));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CIRRUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} did not finish within 180 s"))
        .unwrap_or_else(|e| panic!("{bin} {args:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// GET a path over plain HTTP/1.0 and return the body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
