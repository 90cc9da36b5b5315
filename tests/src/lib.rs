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
    for b in SERVICES.iter().copied().chain(["cirrus", "sidecar"]) {
        assert!(
            dir.join(b).is_file(),
            "{b} is not built in {}: run `cargo build --workspace --bins` (scripts/test.sh does)",
            dir.display()
        );
    }
    dir
}

/// A base port such that `base..base + n` are all free on loopback now,
/// chosen outside the kernel's ephemeral range: a port in it may be taken
/// at any moment by some process's outgoing connection (a cloud's sidecars
/// and Postgres clients make many), which would stop a service binding it.
pub fn free_port_range(n: u16) -> u16 {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    // Below the ephemeral range if it leaves room there, else above it.
    let (from, to) = if low >= 10_000 + 4 * u32::from(n) {
        (10_000, low - u32::from(n))
    } else {
        (high + 1, 65_535 - u32::from(n))
    };
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let span = u64::from(to.saturating_sub(from).max(1));
    for i in 0..200u64 {
        let base = from as u64 + seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) % span;
        let base = base as u16;
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free range of {n} ports on loopback between {from} and {to}");
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
    tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} did not finish within 600 s"))
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

/// Ports one service of `cirrus up` takes (its port plan: base + 10 * slot).
pub const PORTS_PER_SERVICE: u16 = 10;
/// The processes `cirrus up` runs (each beside its sidecar), in slot order.
pub const SERVICES: [&str; 10] = [
    "identity",
    "queue",
    "image",
    "volume",
    "network",
    "network-agent",
    "compute-api",
    "scheduler",
    "conductor",
    "compute-agent",
];
/// What `cirrus up` lists in identity's catalog (agents serve no API).
pub const CATALOG: [&str; 7] = [
    "queue",
    "image",
    "volume",
    "network",
    "compute-api",
    "scheduler",
    "conductor",
];

/// Eight hex digits unlikely to repeat between two calls on one machine.
pub fn unique_tag() -> String {
    let n = u64::from(std::process::id()).wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    format!("{:08x}", (n ^ (n >> 32)) as u32)
}

/// A cloud started with `cirrus up --detach` in a state directory of its
/// own, on ports of its own; stopped (and its own database dropped, when it
/// made one) when dropped, so that a failing test leaves nothing running.
pub struct Cloud {
    pub state: tempfile::TempDir,
    pub base: u16,
    /// This cloud's agent host name and OVS bridge: its own, since clouds
    /// of parallel tests share the machine's Open vSwitch.
    pub host: String,
    pub bridge: String,
    env: Vec<(String, String)>,
    /// The test database this cloud runs on ([`Cloud::up_on`]), dropped after `cirrus down`.
    _db: Option<runtime::db::TestDatabase>,
}

impl Cloud {
    /// A state directory and a free port range; nothing started yet.
    pub fn new(env: &[(&str, &str)]) -> Self {
        let tag = unique_tag();
        Self {
            state: tempfile::tempdir().expect("a state directory"),
            base: free_port_range(PORTS_PER_SERVICE * SERVICES.len() as u16),
            host: format!("cu-{tag}"),
            bridge: format!("cu{tag}"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _db: None,
        }
    }

    /// A new cloud up with `--driver driver` on a test database of its own
    /// (plus `env`); panics with what `cirrus up` said when it fails.
    pub async fn up_on(driver: &str, env: &[(&str, &str)]) -> Self {
        let db = runtime::db::TestDatabase::create()
            .await
            .expect("a test database");
        let mut all = vec![("CIRRUS_DATABASE_URL", db.url.as_str())];
        all.extend_from_slice(env);
        let mut c = Self::new(&all);
        let o = c.start_with(&["--driver", driver]).await;
        assert!(
            o.status.success(),
            "cirrus up: {}{}",
            stdout(&o),
            stderr(&o)
        );
        c._db = Some(db);
        c
    }

    /// A new cloud, up; panics with what `cirrus up` said when it fails.
    pub async fn up(env: &[(&str, &str)]) -> Self {
        let c = Self::new(env);
        let o = c.start().await;
        assert!(
            o.status.success() && stdout(&o).contains("Cirrus is up"),
            "cirrus up failed: {}{}",
            stdout(&o),
            stderr(&o)
        );
        c
    }

    /// Runs `cirrus up --detach` for this state directory and ports.
    pub async fn start(&self) -> Output {
        self.start_with(&[]).await
    }

    /// `cirrus up --detach` with more arguments (e.g. `--driver test`).
    pub async fn start_with(&self, more: &[&str]) -> Output {
        let base = self.base.to_string();
        let mut args = vec![
            "up",
            "--detach",
            "--state-dir",
            self.dir(),
            "--port-base",
            &base,
            "--host",
            &self.host,
            "--bridge",
            &self.bridge,
        ];
        args.extend_from_slice(more);
        run("cirrus", &args, &self.env_refs()).await
    }

    pub fn dir(&self) -> &str {
        self.state.path().to_str().expect("a UTF-8 temp path")
    }

    fn env_refs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// The admin's profile (public endpoint, TLS with the cluster CA).
    pub fn profile(&self) -> String {
        format!("{}/admin.toml", self.dir())
    }

    /// The ports of service `name`: (service, internal, public, metrics).
    pub fn ports(&self, name: &str) -> (u16, u16, u16, u16) {
        let slot = SERVICES
            .iter()
            .position(|s| *s == name)
            .expect("a service of cirrus up");
        let b = self.base + PORTS_PER_SERVICE * slot as u16;
        (b, b + 1, b + 2, b + 4)
    }

    /// `cirrus ARGS` as this cloud's admin.
    pub async fn admin(&self, args: &[&str]) -> Output {
        let profile = self.profile();
        run("cirrus", args, &[("CIRRUS_PROFILE", profile.as_str())]).await
    }

    /// `cirrus ARGS` as the admin, which must succeed; its stdout.
    pub async fn admin_ok(&self, args: &[&str]) -> String {
        let o = self.admin(args).await;
        assert!(
            o.status.success(),
            "cirrus {args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// `cirrus status -f json` as parsed JSON (an array of processes).
    pub async fn status(&self) -> serde_json::Value {
        let o = run(
            "cirrus",
            &["status", "--state-dir", self.dir(), "-f", "json"],
            &[],
        )
        .await;
        assert!(o.status.success(), "cirrus status: {}", stderr(&o));
        serde_json::from_str(&stdout(&o)).expect("status as JSON")
    }

    /// `cirrus down`, which must succeed.
    pub async fn down(&self) {
        let o = run("cirrus", &["down", "--state-dir", self.dir()], &[]).await;
        assert!(o.status.success(), "cirrus down: {}", stderr(&o));
    }

    /// The database `cirrus up` made for this state directory (none with `CIRRUS_DATABASE_URL`).
    pub fn own_database(&self) -> Option<String> {
        if self.env.iter().any(|(k, _)| k == "CIRRUS_DATABASE_URL") {
            return None;
        }
        let text = std::fs::read_to_string(self.state.path().join("cluster.toml")).ok()?;
        let line = text.lines().find(|l| l.starts_with("database = "))?;
        Some(
            line.trim_start_matches("database = ")
                .trim_matches('"')
                .to_string(),
        )
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = std::process::Command::new(bin_dir().join("cirrus"))
            .args(["down", "--state-dir", self.dir()])
            .stdout(std::process::Stdio::null())
            .status();
        let Some(name) = self.own_database() else {
            return;
        };
        // Drop may run inside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let c = runtime::db::connect(runtime::db::TestDatabase::DEFAULT_ADMIN_URL)
                    .await
                    .map_err(std::io::Error::other)?;
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(std::io::Error::other)
            })
        })
        .join();
    }
}

/// Polls `check` until it answers `Some`, for at most `limit`; panics with
/// `what` and the last thing seen otherwise.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if std::time::Instant::now() > deadline => {
                panic!("{what} within {limit:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `cirrus ARGS -f json` as the cloud's admin, which must succeed, parsed.
pub async fn json(c: &Cloud, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-f", "json"]);
    let out = c.admin_ok(&a).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cirrus {args:?}: {e}: {out}"))
}

/// Runs a command that must fail; its stderr, which must be one line.
pub async fn fails(c: &Cloud, args: &[&str]) -> String {
    let o = c.admin(args).await;
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "cirrus {args:?} succeeded: {}",
        stdout(&o)
    );
    assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err}");
    err
}

/// Runs `cirrus ARGS -f json` until `done` holds of its answer (at most 60 s).
pub async fn until(
    c: &Cloud,
    args: &[&str],
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = json(c, args).await;
        if done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cirrus {args:?} never got there; last: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
