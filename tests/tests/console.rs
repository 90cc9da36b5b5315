//! Issue 11's real-guest pieces through the CLI on `cirrus up --driver qemu`
//! (real QEMU/TCG guests of the tiny test guest, scripts/guest/):
//! - `cirrus server console` (stdin piped) runs a command in the guest's
//!   shell on its serial line and reads the answer; `console-log` still
//!   shows it (the chardev logs to a file as well);
//! - stop presses the ACPI power button: a guest that honours it ends shut
//!   off by itself, one that ignores it (user data `acpi ignore`) is
//!   destroyed after the agent's `stop_timeout_secs`;
//! - suspend is a libvirt managed save: the domain is saved, and resume
//!   continues the same boot;
//! - the compute agent killed with SIGKILL mid-build is restarted by
//!   `cirrus up`, heals the build (error with a fault), and leaves no
//!   domain or server directory behind.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Guests under TCG on a loaded machine: an honest bound for a boot.
const GUEST: Duration = Duration::from_secs(240);

fn virsh(args: &[&str]) -> String {
    let o = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn field(cloud: &Cloud, server: &str, f: &str) -> String {
    json(cloud, &["server", "show", server]).await[f]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn console_log(cloud: &Cloud, server: &str) -> String {
    stdout(&cloud.admin(&["server", "console-log", server]).await)
}

/// Waits until the server's console log holds every string in `want`.
async fn console_shows(cloud: &Cloud, server: &str, want: &[&str]) -> String {
    eventually(
        GUEST,
        &format!("{server}'s console log showing {want:?}"),
        || async {
            let log = console_log(cloud, server).await;
            if want.iter().all(|w| log.contains(w)) {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .await
}

async fn settles_in(
    cloud: &Cloud,
    server: &str,
    state: &str,
    limit: Duration,
) -> serde_json::Value {
    eventually(limit, &format!("{server} {state}"), || async {
        let s = json(cloud, &["server", "show", server]).await;
        if s["status"] == state && s["task_state"].as_str().unwrap_or_default().is_empty() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

fn process<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The agent's state directory (where each server has its directory).
fn agent_state_dir(cloud: &Cloud) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("{}/compute-agent.toml", cloud.dir())).unwrap();
    let v: toml_lite::Table = toml_lite::parse(&text);
    std::path::PathBuf::from(v.get("state_dir").expect("state_dir in compute-agent.toml"))
}

/// Just enough TOML for `key = "value"` lines at the top level.
mod toml_lite {
    pub type Table = std::collections::HashMap<String, String>;
    pub fn parse(text: &str) -> Table {
        text.lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect()
    }
}

/// A test in steps on one cloud (a `cirrus up` with real guests is slow to start).
#[tokio::test]
async fn console_acpi_stop_managed_save_and_an_agent_killed_mid_build() {
    let cloud = Cloud::up_on("qemu", &[]).await;
    let dir = cloud.dir().to_string();
    let tag = unique_tag();

    // Two guests at once: g1 honours the ACPI power button, g2 ignores it.
    std::fs::write(format!("{dir}/g2.user-data"), "acpi ignore\n").unwrap();
    let g2_user_data = format!("{dir}/g2.user-data");
    let create = |name: &'static str, extra: Vec<String>| {
        let cloud = &cloud;
        async move {
            let mut args = vec![
                "server",
                "create",
                name,
                "--flavor",
                "m1.tiny",
                "--image",
                "cirrus-tiny",
                "--wait",
            ];
            args.extend(extra.iter().map(String::as_str));
            cloud.admin_ok(&args).await
        }
    };
    futures_util::future::join(
        create("g1", vec![]),
        create("g2", vec!["--user-data".into(), g2_user_data]),
    )
    .await;
    console_shows(&cloud, "g1", &["CIRRUS-GUEST acpi=on"]).await;
    console_shows(&cloud, "g2", &["CIRRUS-GUEST acpi=ignored"]).await;

    // 1. The interactive console: a command in the guest's shell, its answer
    // read back. The answer is computed by the shell ($((...))), so the
    // terminal's echo of the input line cannot pass for it.
    let profile = cloud.profile();
    let mut child = tokio::process::Command::new(bin_dir().join("cirrus"))
        .args(["server", "console", "g1"])
        .env("CIRRUS_PROFILE", &profile)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut out = child.stdout.take().unwrap();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let answer = format!("hello-{tag}-42");
    let command = format!("echo hello-{tag}-$((40+2))\n");
    // The shell may not be up yet: the command again every few seconds.
    let deadline = std::time::Instant::now() + GUEST;
    let mut last_sent: Option<std::time::Instant> = None;
    loop {
        if last_sent.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            stdin.write_all(command.as_bytes()).await.unwrap();
            stdin.flush().await.unwrap();
            last_sent = Some(std::time::Instant::now());
        }
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        if text.contains(&answer) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's shell never answered {answer} on the console within {GUEST:?}; seen: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Closing stdin ends the session, and the CLI exits cleanly.
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("cirrus server console exits after its stdin closes")
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(status.success(), "cirrus server console: {status}: {err}");
    reader.await.unwrap();
    // The log side of the same chardev saw the answer too.
    console_shows(&cloud, "g1", &[&answer]).await;

    // 2. Stop = ACPI power button: g1 powers itself off (libvirt's reason:
    // shutdown); g2 ignores it and is destroyed after the timeout.
    let g1 = field(&cloud, "g1", "id").await;
    let g2 = field(&cloud, "g2", "id").await;
    cloud.admin_ok(&["server", "stop", "g1"]).await;
    cloud.admin_ok(&["server", "stop", "g2"]).await;
    let s = settles_in(&cloud, "g1", "stopped", GUEST).await;
    assert_eq!(s["power_state"], "shutdown", "{s}");
    let reason = virsh(&["domstate", "--reason", &format!("cirrus-{g1}")]);
    assert!(reason.contains("shut off (shutdown)"), "g1: {reason}");
    console_shows(
        &cloud,
        "g1",
        &[
            "CIRRUS-GUEST acpi power-button",
            "powering-off done (the guest shut down on the ACPI power button)",
        ],
    )
    .await;
    // The agent's stop_timeout_secs (60 by default) and a margin.
    settles_in(&cloud, "g2", "stopped", GUEST).await;
    let reason = virsh(&["domstate", "--reason", &format!("cirrus-{g2}")]);
    assert!(reason.contains("shut off (destroyed)"), "g2: {reason}");
    let log = console_shows(
        &cloud,
        "g2",
        &["powering-off done (the guest ignored the ACPI power button: destroyed after the timeout)"],
    )
    .await;
    assert!(!log.contains("CIRRUS-GUEST acpi power-button"), "{log}");
    cloud.admin_ok(&["server", "delete", "g2", "--wait"]).await;

    // 3. Suspend = libvirt managed save; resume continues the same boot.
    cloud.admin_ok(&["server", "start", "g1"]).await;
    settles_in(&cloud, "g1", "active", GUEST).await;
    let boots = |log: &str| log.matches("CIRRUS-GUEST boot\n").count();
    let log = eventually(GUEST, "g1 booted twice", || async {
        let log = console_log(&cloud, "g1").await;
        if boots(&log) >= 2
            && log
                .rsplit("CIRRUS-GUEST boot\n")
                .next()
                .unwrap()
                .contains("acpi=on")
        {
            Ok(log)
        } else {
            Err(log)
        }
    })
    .await;
    let before = boots(&log);
    cloud.admin_ok(&["server", "suspend", "g1"]).await;
    let s = settles_in(&cloud, "g1", "suspended", GUEST).await;
    assert_eq!(s["power_state"], "suspended", "{s}");
    let dom = format!("cirrus-{g1}");
    let reason = virsh(&["domstate", "--reason", &dom]);
    assert!(
        reason.contains("shut off (saved)"),
        "after suspend: {reason}"
    );
    assert!(
        virsh(&["dominfo", &dom]).contains("Managed save:   yes"),
        "{}",
        virsh(&["dominfo", &dom])
    );
    cloud.admin_ok(&["server", "resume", "g1"]).await;
    settles_in(&cloud, "g1", "active", GUEST).await;
    let mark = console_log(&cloud, "g1").await.len();
    let log = eventually(GUEST, "g1 running on after resume", || async {
        let log = console_log(&cloud, "g1").await;
        if log
            .get(mark..)
            .unwrap_or_default()
            .contains("CIRRUS-GUEST disks=")
        {
            Ok(log)
        } else {
            Err(log)
        }
    })
    .await;
    assert_eq!(boots(&log), before, "resume booted the guest again: {log}");
    assert!(virsh(&["dominfo", &dom]).contains("Managed save:   no"));
    cloud.admin_ok(&["server", "delete", "g1", "--wait"]).await;

    // 4. The agent killed with SIGKILL mid-build (the server's task_state
    // spawning, seen on the create's own progress lines), restarted by
    // cirrus up: the build is healed to error with a fault, nothing left.
    let agent_pid = process(&cloud.status().await, "compute-agent")["pid"]
        .as_str()
        .unwrap()
        .to_string();
    let mut create = tokio::process::Command::new(bin_dir().join("cirrus"))
        .args([
            "server",
            "create",
            "g3",
            "--flavor",
            "m1.tiny",
            "--image",
            "cirrus-tiny",
            "--wait",
        ])
        .env("CIRRUS_PROFILE", &profile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for pipe in [
        Box::new(create.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(create.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(pipe).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let mut progress = Vec::new();
    let killed_at = tokio::time::timeout(GUEST, async {
        while let Some(l) = rx.recv().await {
            progress.push(l.clone());
            if l.contains("task_state spawning") {
                let s = std::process::Command::new("kill")
                    .args(["-9", &agent_pid])
                    .status()
                    .unwrap();
                assert!(s.success());
                return Some(l);
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("g3 never spawning; its progress: {progress:?}"))
    .unwrap_or_else(|| panic!("g3's create ended before spawning: {progress:?}"));
    let g3 = field(&cloud, "g3", "id").await;
    // What the kill caught: the domain may exist (defined paused) by now.
    let caught = virsh(&["list", "--all", "--name"]);
    let restarted = eventually(
        Duration::from_secs(120),
        "compute-agent restarted",
        || async {
            let s = cloud.status().await;
            let p = process(&s, "compute-agent");
            if p["state"] == "running" && p["pid"] != agent_pid.as_str() {
                Ok(p.clone())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let s = eventually(GUEST, "g3 healed", || async {
        let s = json(&cloud, &["server", "show", "g3"]).await;
        if s["status"] == "error" || (s["status"] == "active" && s["task_state"] == "") {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), create.wait()).await;
    eprintln!(
        "killed at {killed_at:?} (domains then: {}); agent now {restarted}; g3 {s}",
        caught.trim()
    );
    assert_eq!(s["status"], "error", "the interrupted build: {s}");
    let fault = s.to_string();
    assert!(fault.contains("build interrupted"), "fault: {fault}");
    let domains = virsh(&["list", "--all", "--name"]);
    assert!(
        !domains.contains(&g3),
        "g3's domain left after healing: {domains}"
    );
    let server_dir = agent_state_dir(&cloud).join("servers").join(&g3);
    assert!(
        !server_dir.exists(),
        "{} left after healing",
        server_dir.display()
    );
    cloud.admin_ok(&["server", "delete", "g3", "--wait"]).await;
    cloud.down().await;
}
