//! Issue 13.1, nothing local can bypass the sidecar, checked on a real
//! `cirrus up --driver test`: no service port (nor any sidecar's outbound
//! side) listens on TCP — the only TCP listeners of the cloud's processes
//! are the sidecars' internal (mTLS) and public (TLS) endpoints and the
//! metrics ports; every service and every sidecar has its socket in
//! `run/<svc>/`, which `nobody` (another uid) cannot open, nor, when
//! `cirrus up` runs as root, another service's user; each service and its
//! sidecar run as `cirrus-<svc>` (the agents themselves as root); and the
//! cloud still works: a server is built and goes active.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use runtime::db::TestDatabase;
use tests::*;

/// `socat` connecting to `socket`, as `user` through `runuser` when given:
/// Ok, or what it printed.
fn connect_as(user: Option<&str>, socket: &Path) -> Result<(), String> {
    let target = format!("UNIX-CONNECT:{}", socket.display());
    let out = match user {
        Some(u) => std::process::Command::new("runuser")
            .args(["-u", u, "--", "socat", "-u", "OPEN:/dev/null", &target])
            .output(),
        None => std::process::Command::new("socat")
            .args(["-u", "OPEN:/dev/null", &target])
            .output(),
    }
    .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The socket inodes a process holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let s = l.to_string_lossy().into_owned();
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Every listening TCP socket of the machine (v4 and v6): inode → port.
fn tcp_listeners() -> HashMap<u64, u16> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A = LISTEN), ..., inode (10th field).
            if f.len() > 9 && f[3] == "0A" {
                let port = f[1].rsplit(':').next().unwrap();
                if let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse()) {
                    out.insert(inode, port);
                }
            }
        }
    }
    out
}

/// The real uid of a process.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The uid of `name` in /etc/passwd.
fn user_uid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap();
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f[0] == name {
            f[2].parse().ok()
        } else {
            None
        }
    })
}

#[tokio::test]
async fn no_service_port_on_tcp_sockets_only_for_their_users_and_a_server_still_builds() {
    let db = TestDatabase::create().await.unwrap();
    let cloud = Cloud::new(&[("CIRRUS_DATABASE_URL", db.url.as_str())]);
    let o = cloud.start_with(&["--driver", "test"]).await;
    let summary = stdout(&o);
    assert!(o.status.success(), "up: {summary}{}", stderr(&o));
    let root = uid_of(std::process::id()) == 0;
    // Said once: who the processes run as.
    assert_eq!(
        summary.matches("no user per service").count()
            + summary.matches("users: each service").count(),
        1,
        "{summary}"
    );

    // The cloud's processes, by name.
    let status = cloud.status().await;
    let pids: BTreeMap<String, u32> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["pid"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(pids.len(), 2 * SERVICES.len(), "{status}");

    // 1. TCP: only the sidecars' internal and public endpoints and metrics.
    let listeners = tcp_listeners();
    let mut allowed = BTreeSet::new();
    let mut forbidden = BTreeSet::new();
    for (slot, _) in SERVICES.iter().enumerate() {
        let b = cloud.base + PORTS_PER_SERVICE * slot as u16;
        // internal, public, metrics of the service and of its sidecar
        allowed.extend([b + 1, b + 2, b + 4, b + 5]);
        // the service itself and its sidecar's outbound side (--dev-tcp only)
        forbidden.extend([b, b + 3]);
    }
    let mut seen = Vec::new();
    for (name, pid) in &pids {
        for inode in socket_inodes(*pid) {
            if let Some(port) = listeners.get(&inode) {
                seen.push(format!("{name}:{port}"));
                assert!(
                    allowed.contains(port),
                    "{name} (pid {pid}) listens on TCP port {port}, which is no sidecar \
                     endpoint nor metrics; all seen: {seen:?}"
                );
            }
        }
    }
    let open: Vec<u16> = listeners
        .values()
        .copied()
        .filter(|p| forbidden.contains(p))
        .collect();
    assert!(
        open.is_empty(),
        "service or outbound ports listening: {open:?}"
    );
    // The sidecars do listen (the check above saw something real).
    assert!(
        seen.iter().any(|s| s.starts_with("identity-sidecar:")),
        "{seen:?}"
    );

    // 2. Each service's socket and its sidecar's outbound socket, in a
    // directory of its own that nobody else may open.
    for svc in SERVICES.iter() {
        let dir = cloud.state.path().join("run").join(svc);
        let dmeta = std::fs::metadata(&dir).unwrap();
        assert_eq!(dmeta.permissions().mode() & 0o007, 0, "{}", dir.display());
        let socks: Vec<PathBuf> = ["api.sock", "outbound.sock"]
            .iter()
            .map(|s| dir.join(s))
            .collect();
        for sock in &socks {
            let m = std::fs::metadata(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
            assert_eq!(m.permissions().mode() & 0o777, 0o660, "{}", sock.display());
            // Its owner reaches it (the socket is live) ...
            connect_as(None, sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
            // ... another uid does not: the socket's own mode refuses it.
            let e = connect_as(Some("nobody"), sock).unwrap_err();
            assert!(e.contains("Permission denied"), "{}: {e}", sock.display());
        }
        let user = format!("cirrus-{svc}");
        let svc_pid = pids[*svc];
        let side_pid = pids[&format!("{svc}-sidecar")];
        if root {
            let uid = user_uid(&user).unwrap_or_else(|| panic!("no user {user}"));
            let agent = svc.ends_with("-agent");
            assert_eq!(uid_of(side_pid), uid, "{svc}-sidecar runs as {user}");
            assert_eq!(uid_of(svc_pid), if agent { 0 } else { uid }, "{svc}'s uid");
            assert_eq!(dmeta.gid(), user_gid(&user), "{}", dir.display());
            // Another service's user cannot reach identity's socket either.
            if *svc != "identity" && !agent {
                let id_sock = cloud.state.path().join("run/identity/api.sock");
                let e = connect_as(Some(&user), &id_sock).unwrap_err();
                assert!(e.contains("Permission denied"), "{user}: {e}");
            }
        } else {
            assert_eq!(uid_of(svc_pid), uid_of(std::process::id()));
        }
    }

    // 3. The cloud works over its sockets: a server is built and goes active.
    let host = cloud.host.clone();
    until(&cloud, &["host", "list"], |l| {
        l.as_array().is_some_and(|a| {
            a.iter()
                .any(|h| h["name"] == host.as_str() && h["up"] == "true")
        })
    })
    .await;
    let o = cloud
        .admin(&[
            "server",
            "create",
            "uds1",
            "--wait",
            "--flavor",
            "m1.tiny",
            "--image",
            "cirrus-tiny",
        ])
        .await;
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("vm_state active"), "{out}");
    cloud
        .admin_ok(&["server", "delete", "uds1", "--wait"])
        .await;

    // Down removes the sockets with the processes.
    cloud.down().await;
    for svc in SERVICES {
        let sock = cloud.state.path().join("run").join(svc).join("api.sock");
        assert!(!sock.exists(), "{} left behind", sock.display());
    }
}

/// The gid of `group`'s user (its own group, `useradd --user-group`).
fn user_gid(name: &str) -> u32 {
    let text = std::fs::read_to_string("/etc/passwd").unwrap();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f[0] == name {
                f[3].parse().ok()
            } else {
                None
            }
        })
        .unwrap()
}
