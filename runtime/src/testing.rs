//! The test harness every crate shares (feature `testing`, for
//! `[dev-dependencies]` only): a served service on an ephemeral loopback
//! port, the callers a sidecar would vouch for, and status assertions that
//! pin the exact client message. Each crate's `tests/common` adds only its
//! own verbs on top.

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::caller::Caller;

/// Project ids the fixtures use (UUIDs in simple form, as identity makes them).
pub const PROJECT_A: &str = "0a0a0a0a0a0a4a0a8a0a0a0a0a0a0a0a";
pub const PROJECT_B: &str = "0b0b0b0b0b0b4b0b8b0b0b0b0b0b0b0b";
pub const ADMIN_PROJECT: &str = "0d0d0d0d0d0d4d0d8d0d0d0d0d0d0d0d";

/// A caller as the sidecar would describe it.
pub fn caller(user: &str, project: &str, roles: &[&str], is_admin: bool) -> Caller {
    Caller {
        user_id: Some(format!("{user}-id")),
        user_name: Some(user.into()),
        project_id: Some(project.into()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        audit_id: Some(format!("{user}-audit")),
        is_admin,
        peer: Some("external".into()),
    }
}

/// A member of project A (roles member and reader).
pub fn member_a() -> Caller {
    caller("alice", PROJECT_A, &["member", "reader"], false)
}
/// A reader of project A: may look, may not change.
pub fn reader_a() -> Caller {
    caller("rita", PROJECT_A, &["reader"], false)
}
/// A member of project B: an outsider to project A.
pub fn member_b() -> Caller {
    caller("bob", PROJECT_B, &["member", "reader"], false)
}
/// A cloud administrator.
pub fn admin() -> Caller {
    caller("root", ADMIN_PROJECT, &["admin", "member", "reader"], true)
}
/// A mesh workload without a token (e.g. a host agent): only its SPIFFE id.
pub fn workload(spiffe_id: &str) -> Caller {
    Caller {
        peer: Some(spiffe_id.into()),
        ..Caller::default()
    }
}
/// No identity at all: what arrives when something bypasses the sidecar.
pub fn nobody() -> Caller {
    Caller::default()
}

/// A request carrying `who`'s identity as the sidecar would set it.
pub fn req<T>(msg: T, who: &Caller) -> Request<T> {
    let mut r = Request::new(msg);
    who.to_metadata(r.metadata_mut());
    r
}

/// Asserts that `result` failed with exactly `code` and `message`; on a
/// mismatch the panic shows what came back.
#[track_caller]
pub fn assert_status<T: Debug>(result: Result<T, Status>, code: Code, message: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {message:?}, got Ok({v:?})"),
        Err(s) => assert!(
            s.code() == code && s.message() == message,
            "expected {code:?} {message:?}, got {:?} {:?}",
            s.code(),
            s.message()
        ),
    }
}

/// Asserts only the code, for refusals whose text the test does not own.
#[track_caller]
pub fn assert_code<T: Debug>(result: Result<T, Status>, code: Code) {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => assert_eq!(s.code(), code, "message: {:?}", s.message()),
    }
}

/// The shutdown future handed to a served service.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service served on `127.0.0.1:0` until this value is dropped or
/// [`Served::stop`] is called.
pub struct Served {
    pub addr: SocketAddr,
    pub channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    /// Binds an ephemeral loopback port and runs `serve(listener, shutdown)`
    /// on it in a task; `channel` is a lazy plaintext channel to it.
    pub async fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        #[allow(clippy::expect_used)]
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        #[allow(clippy::expect_used)]
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            Box::pin(async {
                let _ = stopped.await;
            }),
        ));
        #[allow(clippy::expect_used)]
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("channel uri")
            .connect_lazy();
        Self {
            addr,
            channel,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks the service to drain and waits for it; returns what it returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await.map_err(|e| anyhow::anyhow!("service task: {e}"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Waits for `check` to return `Some` within `bound`, polling every 20 ms;
/// panics with `what` and the last value `describe` gives on timeout. For
/// conditions that have no event to wait on (never a fixed sleep).
pub async fn wait_for<T, F, Fut>(what: &str, bound: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {bound:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// CPU seconds (user + system) process `pid` has used so far ("self" for
/// this one), from `/proc/<pid>/stat` (clock ticks of 10 ms); 0 when it is
/// gone. The benches' CPU-per-operation figures are differences of these.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces and parentheses):
    // utime and stime are fields 14 and 15, indexes 11 and 12 after the ")".
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// CPU seconds so far of every `postgres` process on the machine (backends,
/// WAL writer, ...; a backend that exits in between takes its share with
/// it, and other users' queries are counted too: an upper bound).
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| cpu_seconds(&pid))
        .sum()
}
