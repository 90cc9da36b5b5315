//! The tiny test guest (`scripts/guest/build.sh`) boots under QEMU/TCG with a
//! config drive and a NIC, and reports on its serial console what the real
//! guest tests read: its hostname and uuid from `meta_data.json`, the digest
//! of its user data, the address DHCP gave it, its disks, and its pings.
//! QEMU's user-mode network (in-process, nothing leaves the machine) stands
//! in for the cloud's network here; the compute tests put it on OVS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kills QEMU when the test ends, however it ends.
struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tiny_guest_boots_reads_its_config_drive_and_gets_an_address() {
    let out = root().join("target/guest");
    let status = Command::new("bash")
        .arg(root().join("scripts/guest/build.sh"))
        .arg(&out)
        .status()
        .expect("run scripts/guest/build.sh");
    assert!(status.success(), "guest build failed");

    let dir = tempfile::tempdir().unwrap();
    let latest = dir.path().join("cd/openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    std::fs::write(
        latest.join("meta_data.json"),
        r#"{"uuid": "6f1c7c1e-0000-4000-8000-000000000001", "name": "probe", "hostname": "probe-1"}"#,
    )
    .unwrap();
    let user_data = b"ping 10.0.2.2\n";
    std::fs::write(latest.join("user_data"), user_data).unwrap();
    let iso = dir.path().join("config.iso");
    let ok = Command::new("genisoimage")
        .args(["-quiet", "-V", "config-2", "-r", "-J", "-o"])
        .arg(&iso)
        .arg(dir.path().join("cd"))
        .status()
        .expect("genisoimage");
    assert!(ok.success());

    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "accel=tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(out.join("vmlinuz"))
        .arg("-initrd")
        .arg(out.join("initramfs.img"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            iso.display()
        ))
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ])
        .args(["-serial", "stdio", "-monitor", "none", "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let stdout = child.stdout.take().unwrap();
    let _qemu = Kill(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).to_string();
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let sha = Command::new("sha256sum")
        .arg(latest.join("user_data"))
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap();
    let digest = sha.split_whitespace().next().unwrap().to_string();
    let wanted = [
        "CIRRUS-GUEST hostname=probe-1".to_string(),
        "CIRRUS-GUEST uuid=6f1c7c1e-0000-4000-8000-000000000001".to_string(),
        format!("CIRRUS-GUEST user-data-sha256={digest}"),
        "CIRRUS-GUEST ip=10.0.2.15/24".to_string(),
        "CIRRUS-GUEST disks=vda".to_string(),
        "CIRRUS-GUEST ping 10.0.2.2 ok".to_string(),
    ];
    let mut seen: Vec<String> = Vec::new();
    // TCG boots in about 6 s on an idle machine; the bound is generous for a loaded CI.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !wanted
        .iter()
        .all(|w| seen.iter().any(|s| s.contains(w.as_str())))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "the guest did not print all of {wanted:#?} in time; its console said:\n{}",
                seen.join("\n")
            ),
        }
    }
}
