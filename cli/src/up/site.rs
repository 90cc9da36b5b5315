//! What this machine offers the cloud's agents, found at start: the host
//! name (kept in `cluster.toml`), whether Open vSwitch answers (the network
//! agent needs it, and root), and which libvirt driver the compute agent
//! gets — `qemu:///system` when libvirtd answers (domain type `kvm` where
//! KVM guests can run, else `qemu`, i.e. TCG), else libvirt's test driver,
//! said so in the summary and in `cirrus status`.

use std::time::Duration;

use anyhow::bail;
use clap::ValueEnum;
use tokio::process::Command;

/// `cirrus up --driver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    /// libvirt's in-memory test driver (`test:///default`): simulated servers.
    Test,
    /// Real QEMU guests through libvirtd (`qemu:///system`).
    Qemu,
}

/// The compute agent's hypervisor, and a line saying why it is that one.
#[derive(Clone, Debug)]
pub struct Hypervisor {
    pub libvirt_uri: String,
    pub domain_type: String,
    pub note: String,
}

pub const QEMU_URI: &str = "qemu:///system";
pub const TEST_URI: &str = "test:///default";

/// Runs a command with a bound; whether it succeeded.
pub async fn succeeds(prog: &str, args: &[&str], limit: Duration) -> bool {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    matches!(
        tokio::time::timeout(limit, c.status()).await,
        Ok(Ok(s)) if s.success()
    )
}

pub async fn libvirtd_answers() -> bool {
    succeeds(
        "virsh",
        &["-c", QEMU_URI, "version"],
        Duration::from_secs(10),
    )
    .await
}

/// `kvm` when KVM guests can run here, else `qemu` (TCG), with the reason.
/// Inside a virtual machine (the `hypervisor` CPU flag) nested KVM guests
/// hang once their kernel starts on these machines, so TCG is chosen there.
pub fn domain_type() -> (&'static str, &'static str) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return ("qemu", "no /dev/kvm: QEMU/TCG");
    }
    let nested = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(true);
    if nested {
        (
            "qemu",
            "inside a VM, where nested KVM guests hang: QEMU/TCG",
        )
    } else {
        ("kvm", "KVM")
    }
}

pub async fn hypervisor(wanted: Option<Driver>) -> anyhow::Result<Hypervisor> {
    let test = |note: String| Hypervisor {
        libvirt_uri: TEST_URI.into(),
        domain_type: "test".into(),
        note,
    };
    if wanted == Some(Driver::Test) {
        return Ok(test(format!(
            "libvirt's test driver ({TEST_URI}, --driver test): servers are simulated, no real guests"
        )));
    }
    if libvirtd_answers().await {
        let (dtype, why) = domain_type();
        return Ok(Hypervisor {
            libvirt_uri: QEMU_URI.into(),
            domain_type: dtype.into(),
            note: format!("{QEMU_URI}, domain type {dtype} ({why})"),
        });
    }
    if wanted == Some(Driver::Qemu) {
        bail!(
            "--driver qemu: libvirtd does not answer on {QEMU_URI}; run scripts/setup.sh (or use --driver test)"
        );
    }
    Ok(test(format!(
        "libvirtd does not answer on {QEMU_URI}: FALLING BACK to libvirt's test driver ({TEST_URI}), \
         servers are simulated; run scripts/setup.sh for real guests"
    )))
}

/// Why the network agent cannot run here, if it cannot: it needs root and
/// a running Open vSwitch (scripts/setup.d/network.sh starts it).
pub async fn network_agent_blocker() -> Option<String> {
    if !is_root() {
        return Some("it needs root (it programs Open vSwitch and namespaces)".into());
    }
    if !succeeds(
        "ovs-vsctl",
        &["--timeout=5", "show"],
        Duration::from_secs(10),
    )
    .await
    {
        return Some("Open vSwitch does not answer; run scripts/setup.sh".into());
    }
    None
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// This machine's name as an agent host name (`A-Z a-z 0-9 - _`, at most 63).
pub fn machine_host() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if name.trim_matches('-').is_empty() {
        "host1".into()
    } else {
        name
    }
}

/// Checks a `--host` value as both agents will.
pub fn check_host(h: &str) -> anyhow::Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("--host {h:?} must be 1 to 63 of A-Z a-z 0-9 - _");
    }
    Ok(())
}

pub fn check_bridge(b: &str) -> anyhow::Result<()> {
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("--bridge {b:?} must be 1 to 15 of A-Z a-z 0-9 - _");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_name_is_a_valid_host() {
        assert!(check_host(&machine_host()).is_ok());
        assert!(check_host("a.b").is_err());
        assert!(check_bridge("br-int").is_ok());
        assert!(check_bridge("a-very-long-bridge").is_err());
    }
}
