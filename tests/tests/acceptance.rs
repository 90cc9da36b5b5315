//! Issue 11's acceptance test, as a user drives the cloud: `cirrus up` on
//! this machine (real QEMU guests under TCG, Open vSwitch, dnsmasq), then
//! only the `cirrus` CLI. Three tiny guests on two networks; their serial
//! consoles prove what each one saw (DHCP address, hostname, user data,
//! disks, pings); then the lifecycle; then delete leaves nothing behind.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tests::*;

/// Guests under TCG: an honest bound for boot + DHCP + a few pings.
const GUEST: Duration = Duration::from_secs(240);

async fn server_field(cloud: &Cloud, server: &str, field: &str) -> String {
    json(cloud, &["server", "show", server]).await[field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the server's console log holds every line in `want`.
async fn console_shows(cloud: &Cloud, server: &str, want: &[String]) -> String {
    eventually(
        GUEST,
        &format!("{server}'s console showing {want:?}"),
        || async {
            let o = cloud.admin(&["server", "console-log", server]).await;
            let log = stdout(&o);
            if want.iter().all(|w| log.contains(w.as_str())) {
                Ok(log)
            } else {
                Err(format!("{}{}", log, stderr(&o)))
            }
        },
    )
    .await
}

async fn vm_state_becomes(cloud: &Cloud, server: &str, state: &str) {
    eventually(GUEST, &format!("{server} {state}"), || async {
        let s = json(cloud, &["server", "show", server]).await;
        if s["status"] == state && s["task_state"].as_str().unwrap_or_default().is_empty() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await
}

/// The number of times the guest's init has run (it says its hostname once per boot).
fn boots(log: &str) -> usize {
    log.matches("CIRRUS-GUEST hostname=").count()
}

fn virsh(args: &[&str]) -> String {
    let o = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn three_guests_on_two_networks_live_and_leave_nothing() {
    let cloud = Cloud::up_on("qemu", &[]).await;
    let dir = cloud.dir().to_string();

    // A key pair, two networks, and a port per guest with a known address,
    // so that each guest's user data can name its peers before they boot.
    let key_file = format!("{dir}/k1.pem");
    cloud
        .admin_ok(&["keypair", "create", "k1", "--private-key-file", &key_file])
        .await;
    for (net, cidr) in [("net-a", "10.31.0.0/24"), ("net-b", "10.32.0.0/24")] {
        cloud.admin_ok(&["network", "create", net]).await;
        cloud
            .admin_ok(&[
                "subnet",
                "create",
                &format!("{net}-v4"),
                "--network",
                net,
                "--subnet-range",
                cidr,
            ])
            .await;
    }
    let guests = [
        (
            "a1",
            "net-a",
            "10.31.0.11",
            vec!["10.31.0.12", "10.32.0.11"],
        ),
        ("a2", "net-a", "10.31.0.12", vec!["10.31.0.11"]),
        ("b1", "net-b", "10.32.0.11", vec!["10.31.0.11"]),
    ];
    let mut digests = Vec::new();
    for (name, net, ip, peers) in &guests {
        cloud
            .admin_ok(&[
                "port",
                "create",
                &format!("{name}-port"),
                "--network",
                net,
                "--ip-address",
                ip,
            ])
            .await;
        let user_data: String = peers.iter().map(|p| format!("ping {p}\n")).collect();
        std::fs::write(format!("{dir}/{name}.user-data"), &user_data).unwrap();
        digests.push(sha256_hex(user_data.as_bytes()));
    }

    // Three creates at once, each following its server to `active`.
    let creates = guests.iter().map(|(name, ..)| {
        let (port, user_data) = (format!("{name}-port"), format!("{dir}/{name}.user-data"));
        let cloud = &cloud;
        async move {
            cloud
                .admin(&[
                    "server",
                    "create",
                    name,
                    "--flavor",
                    "m1.tiny",
                    "--image",
                    "cirrus-tiny",
                    "--port",
                    &port,
                    "--key-name",
                    "k1",
                    "--user-data",
                    &user_data,
                    "--wait",
                ])
                .await
        }
    });
    for (o, (name, ..)) in futures_util::future::join_all(creates)
        .await
        .iter()
        .zip(&guests)
    {
        assert!(
            o.status.success(),
            "server create {name} --wait: {}{}",
            stdout(o),
            stderr(o)
        );
    }

    // Each console: the DHCP address is its port's fixed IP, its hostname,
    // its user data; same-network peers answer, the other network does not.
    for ((name, _, ip, peers), digest) in guests.iter().zip(&digests) {
        let id = server_field(&cloud, name, "id").await;
        let mut want = vec![
            format!("CIRRUS-GUEST hostname={name}"),
            format!("CIRRUS-GUEST uuid={id}"),
            format!("CIRRUS-GUEST user-data-sha256={digest}"),
            format!("CIRRUS-GUEST ip={ip}/24"),
        ];
        for p in peers {
            let same_net = p.rsplit_once('.').unwrap().0 == ip.rsplit_once('.').unwrap().0;
            let result = if same_net { "ok" } else { "fail" };
            want.push(format!("CIRRUS-GUEST ping {p} {result}"));
        }
        console_shows(&cloud, name, &want).await;
    }

    // A data volume attached live: the running guest sees a new disk; after
    // the detach it no longer does.
    cloud
        .admin_ok(&["volume", "create", "data1", "--size", "1", "--wait"])
        .await;
    cloud
        .admin_ok(&["server", "attach-volume", "a1", "data1", "--wait"])
        .await;
    let seen = console_shows(
        &cloud,
        "a1",
        &["CIRRUS-GUEST disks=vda,vdb,vdc".to_string()],
    )
    .await;
    cloud
        .admin_ok(&["server", "detach-volume", "a1", "data1", "--wait"])
        .await;
    let mark = seen.len();
    eventually(GUEST, "a1 without the detached disk", || async {
        let log = stdout(&cloud.admin(&["server", "console-log", "a1"]).await);
        let after = log.get(mark..).unwrap_or_default();
        if after.contains("CIRRUS-GUEST disks=vda,vdb\n") {
            Ok(())
        } else {
            Err(after.to_string())
        }
    })
    .await;
    cloud.admin_ok(&["volume", "delete", "data1"]).await;

    // Lifecycle of a1: stop, start, reboot — it comes back each time.
    cloud.admin_ok(&["server", "stop", "a1"]).await;
    vm_state_becomes(&cloud, "a1", "stopped").await;
    let before = boots(&console_shows(&cloud, "a1", &[]).await);
    cloud.admin_ok(&["server", "start", "a1"]).await;
    vm_state_becomes(&cloud, "a1", "active").await;
    cloud.admin_ok(&["server", "reboot", "a1", "--hard"]).await;
    vm_state_becomes(&cloud, "a1", "active").await;
    eventually(GUEST, "a1 booted again after start and reboot", || async {
        let o = cloud.admin(&["server", "console-log", "a1"]).await;
        let n = boots(&stdout(&o));
        if n > before {
            Ok(())
        } else {
            Err(format!("{n} boots (before stop: {before}): {}", stdout(&o)))
        }
    })
    .await;

    // A guest destroyed behind the cloud's back is reported stopped.
    let b1 = server_field(&cloud, "b1", "id").await;
    virsh(&["destroy", &format!("cirrus-{b1}")]);
    vm_state_becomes(&cloud, "b1", "stopped").await;

    // Delete everything: no domain, no OVS port of ours, quotas back at zero.
    let ids: Vec<String> = futures_util::future::join_all(
        guests
            .iter()
            .map(|(name, ..)| server_field(&cloud, name, "id")),
    )
    .await;
    for (name, ..) in &guests {
        cloud.admin_ok(&["server", "delete", name, "--wait"]).await;
    }
    assert!(ids.iter().all(|id| id.len() == 36), "server ids: {ids:?}");
    let domains = virsh(&["list", "--all", "--name"]);
    for id in &ids {
        assert!(
            !domains.contains(id.as_str()),
            "domain of {id} left: {domains}"
        );
    }
    let ports = std::process::Command::new("ovs-vsctl")
        .args(["list-ports", &cloud.bridge])
        .output()
        .unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout);
    assert!(
        !ports
            .lines()
            .any(|p| p.starts_with("tap") || p.starts_with("vnet")),
        "guest ports left on {}: {ports}",
        cloud.bridge
    );
    cloud.admin_ok(&["keypair", "delete", "k1"]).await;
    let quota = json(&cloud, &["quota", "show"]).await;
    for used in ["instances_used", "cores_used", "ram_used", "key_pairs_used"] {
        assert_eq!(
            quota[used], "0",
            "{used} after deleting everything: {quota}"
        );
    }
    cloud.down().await;
}
