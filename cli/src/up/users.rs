//! Who each process of the cloud runs as (issue 13.1). Run by root,
//! `cirrus up` gives every service a system user and group of its own,
//! `cirrus-<service>` (made with `useradd --system` when missing): the
//! service and its sidecar run as it, and its socket directory
//! `run/<service>/` is `cirrus-<service>`'s alone (0770), so neither another
//! service nor any other local user can open its sockets. The two agents
//! themselves stay root — the network agent drives Open vSwitch, network
//! namespaces and dnsmasq, the compute agent libvirt's `qemu:///system` and
//! the guests' disks — while their sidecars run as `cirrus-<agent>`; their
//! directories are `root:cirrus-<agent>`. Not run by root (or when the
//! state directory cannot be reached by another user, or `useradd` fails),
//! everything runs as the invoking user, which `cirrus up` says once.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// A user a process runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The accounts of one service: its own process's and its sidecar's.
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    /// The service's process; `None`: the invoking user (root for the agents).
    pub service: Option<Account>,
    /// The sidecar's process.
    pub sidecar: Option<Account>,
}

impl Accounts {
    /// The group owning the service's socket directory and sockets.
    pub fn group(&self) -> Option<String> {
        self.sidecar.as_ref().map(|a| a.name.clone())
    }
}

/// The user name of `service`'s processes.
pub fn user_name(service: &str) -> String {
    format!("cirrus-{service}")
}

/// Whether this process may switch users (it runs as root).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Why per-service users cannot be used here, if they cannot.
pub fn blocker(state_dir: &Path) -> Option<String> {
    if !is_root() {
        return Some("cirrus up does not run as root".into());
    }
    // Every directory above the state directory must let others pass.
    for dir in state_dir.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir)
            && m.mode() & 0o001 == 0
        {
            return Some(format!(
                "{} is closed to other users (mode {:o})",
                dir.display(),
                m.mode() & 0o7777
            ));
        }
    }
    if which("useradd").is_none() {
        return Some("useradd is not installed".into());
    }
    None
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// `name` from `/etc/passwd`.
pub fn lookup(name: &str) -> Option<Account> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != name {
            return None;
        }
        Some(Account {
            name: name.into(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

/// The system user `name` with its own group, made when missing. Two
/// clouds starting at once may both try: `useradd` refusing because the
/// user now exists, or because the other one holds the lock, is retried
/// (bounded) until the user is there.
pub async fn ensure(name: &str) -> anyhow::Result<Account> {
    let useradd = which("useradd").context("useradd is not installed")?;
    let mut last = String::new();
    for _ in 0..20 {
        if let Some(a) = lookup(name) {
            return Ok(a);
        }
        let out = tokio::process::Command::new(&useradd)
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "Cirrus (cirrus up)",
                name,
            ])
            .output()
            .await
            .context("running useradd")?;
        if out.status.success() {
            continue;
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match lookup(name) {
        Some(a) => Ok(a),
        None => bail!("cannot make the system user {name}: {last}"),
    }
}

/// The accounts of `service` (`agent`: the process itself stays root).
pub async fn for_service(service: &str, agent: bool) -> anyhow::Result<Accounts> {
    let own = ensure(&user_name(service)).await?;
    Ok(Accounts {
        service: (!agent).then(|| own.clone()),
        sidecar: Some(own),
    })
}

/// `chown` of `path` and everything under it (not following links).
pub fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if m.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_the_password_file_and_names_fit_useradd() {
        let root = lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(lookup("no-such-user-cirrus-x").is_none());
        // useradd refuses names longer than 32 characters.
        for s in super::super::services::SERVICES {
            assert!(user_name(s.name).len() <= 32, "{}", s.name);
        }
    }
}
