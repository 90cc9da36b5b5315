//! The real dataplane driver: Open vSwitch through `ovs-vsctl` and
//! `ovs-ofctl`, network namespaces and veth pairs through `ip`, each a
//! bounded child process. Nothing here decides; [`crate::agent`] does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

/// Every command's bound.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{cmd}: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Parse(String),
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// Runs `prog args...`; its stdout on success, else its stderr in the error.
pub async fn run(prog: &str, args: &[&str]) -> Result<String> {
    let cmd = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, out)
        .await
        .map_err(|_| DriverError::Command {
            cmd: cmd.clone(),
            detail: format!("no answer within {COMMAND_TIMEOUT:?}"),
        })?
        .map_err(|e| DriverError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DriverError::Command {
            cmd,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

pub async fn vsctl(args: &[&str]) -> Result<String> {
    let mut a = vec!["--timeout=10"];
    a.extend_from_slice(args);
    run("ovs-vsctl", &a).await
}

/// An interface on the bridge, as OVSDB describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// -1 or 0 while OVS has not (or could not) attach it.
    pub ofport: i64,
    pub external_ids: BTreeMap<String, String>,
    /// The VLAN tag of its Port, if any.
    pub tag: Option<u16>,
    pub other_config: BTreeMap<String, String>,
}

impl Interface {
    pub fn iface_id(&self) -> Option<&str> {
        self.external_ids.get("iface-id").map(String::as_str)
    }
}

fn ovs_map(v: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(pairs) = v.get(1).and_then(|p| p.as_array()) {
        for p in pairs {
            if let (Some(k), Some(v)) = (
                p.get(0).and_then(|k| k.as_str()),
                p.get(1).and_then(|v| v.as_str()),
            ) {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

fn ovs_int(v: &serde_json::Value) -> Option<i64> {
    v.as_i64()
}

fn rows(json: &str) -> Result<Vec<Vec<serde_json::Value>>> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| DriverError::Parse(format!("ovsdb json: {e}")))?;
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or_else(|| DriverError::Parse("ovsdb json without data".into()))?;
    Ok(data.iter().filter_map(|r| r.as_array().cloned()).collect())
}

/// The integration bridge and what is plugged into it.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub datapath_type: String,
}

impl Bridge {
    /// Creates the bridge if missing: `fail_mode=secure` (no flows: no
    /// traffic, never a learning switch while the agent is away).
    pub async fn ensure(&self) -> Result<()> {
        let dp = format!("datapath_type={}", self.datapath_type);
        vsctl(&[
            "--may-exist",
            "add-br",
            &self.name,
            "--",
            "set",
            "Bridge",
            &self.name,
            &dp,
            "fail_mode=secure",
        ])
        .await?;
        Ok(())
    }

    pub async fn destroy(&self) -> Result<()> {
        vsctl(&["--if-exists", "del-br", &self.name]).await?;
        Ok(())
    }

    /// Every interface of the bridge's ports but the bridge's own.
    pub async fn interfaces(&self) -> Result<Vec<Interface>> {
        let names = vsctl(&["list-ports", &self.name]).await?;
        let names: Vec<&str> = names
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let ifaces = vsctl(&[
            "--format=json",
            "--data=json",
            "--columns=name,ofport,external_ids",
            "list",
            "Interface",
        ])
        .await?;
        let ports = vsctl(&[
            "--format=json",
            "--data=json",
            "--columns=name,tag,other_config",
            "list",
            "Port",
        ])
        .await?;
        let mut port_info: BTreeMap<String, (Option<u16>, BTreeMap<String, String>)> =
            BTreeMap::new();
        for r in rows(&ports)? {
            if let Some(name) = r.first().and_then(|n| n.as_str()) {
                let tag = r
                    .get(1)
                    .and_then(ovs_int)
                    .and_then(|t| u16::try_from(t).ok());
                let oc = r.get(2).map(ovs_map).unwrap_or_default();
                port_info.insert(name.to_string(), (tag, oc));
            }
        }
        let mut out = Vec::new();
        for r in rows(&ifaces)? {
            let Some(name) = r.first().and_then(|n| n.as_str()) else {
                continue;
            };
            if !names.contains(&name) {
                continue;
            }
            let (tag, other_config) = port_info.get(name).cloned().unwrap_or_default();
            out.push(Interface {
                name: name.to_string(),
                ofport: r.get(1).and_then(ovs_int).unwrap_or(-1),
                external_ids: r.get(2).map(ovs_map).unwrap_or_default(),
                tag,
                other_config,
            });
        }
        Ok(out)
    }

    /// Sets tags (and the network each tag stands for) in one transaction.
    pub async fn set_tags(&self, changes: &[(String, u16, String)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut args: Vec<String> = Vec::new();
        for (name, tag, net) in changes {
            if !args.is_empty() {
                args.push("--".into());
            }
            if net.is_empty() {
                // Dead: no network; the key goes (an empty value is not valid).
                args.extend([
                    "set".into(),
                    "Port".into(),
                    name.clone(),
                    format!("tag={tag}"),
                    "--".into(),
                    "remove".into(),
                    "Port".into(),
                    name.clone(),
                    "other_config".into(),
                    "cirrus-net".into(),
                ]);
            } else {
                args.extend([
                    "set".into(),
                    "Port".into(),
                    name.clone(),
                    format!("tag={tag}"),
                    format!("other_config:cirrus-net={net}"),
                ]);
            }
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        vsctl(&a).await?;
        Ok(())
    }

    pub async fn add_port(&self, name: &str, iface_id: &str, owner: &str) -> Result<()> {
        let id = format!("external_ids:iface-id={iface_id}");
        let ow = format!("external_ids:cirrus-owner={owner}");
        vsctl(&[
            "--may-exist",
            "add-port",
            &self.name,
            name,
            "--",
            "set",
            "Interface",
            name,
            &id,
            &ow,
        ])
        .await?;
        Ok(())
    }

    pub async fn del_port(&self, name: &str) -> Result<()> {
        vsctl(&["--if-exists", "del-port", &self.name, name]).await?;
        Ok(())
    }

    /// Installs exactly `flows`, changing only what differs.
    pub async fn replace_flows(&self, flows: &str, scratch: &Path) -> Result<()> {
        let file = scratch.join(format!("flows-{}.txt", self.name));
        tokio::fs::write(&file, flows)
            .await
            .map_err(|e| DriverError::Command {
                cmd: format!("write {}", file.display()),
                detail: e.to_string(),
            })?;
        let f = file.display().to_string();
        run(
            "ovs-ofctl",
            &["-O", "OpenFlow13", "replace-flows", &self.name, &f],
        )
        .await?;
        Ok(())
    }

    pub async fn dump_flows(&self) -> Result<String> {
        run("ovs-ofctl", &["-O", "OpenFlow13", "dump-flows", &self.name]).await
    }
}

/// Network namespaces whose name starts with `prefix`.
pub async fn namespaces(prefix: &str) -> Result<Vec<String>> {
    let out = run("ip", &["netns", "list"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Kills every process in `ns`, then deletes it.
pub async fn delete_namespace(ns: &str) -> Result<()> {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]).await {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]).await;
        }
    }
    run("ip", &["netns", "del", ns]).await?;
    Ok(())
}

pub async fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", name]).await.is_ok()
}
