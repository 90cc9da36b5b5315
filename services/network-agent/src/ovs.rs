//! The real dataplane driver: Open vSwitch's database through its JSON-RPC
//! socket ([`crate::ovsdb`]: reading the bridge and setting tags, one round
//! trip each), `ovs-vsctl` only to add or delete a port (rare), flows with
//! `ovs-ofctl replace-flows` (skipped when the table did not change),
//! network namespaces and veth pairs through `ip` (each a bounded child
//! process) but read from `/run/netns` and `/sys/class/net` without a fork.
//! Nothing here decides; [`crate::agent`] does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::Mutex;

use crate::ovsdb::{self, Ovsdb};

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

/// The integration bridge and what is plugged into it.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub datapath_type: String,
    pub ovsdb: Ovsdb,
    /// The flow table last installed by this process (a pass that computes
    /// the same table forks nothing). Empty after a start: installed once.
    pub installed: Arc<Mutex<String>>,
}

impl Bridge {
    pub fn new(name: &str, datapath_type: &str, ovsdb: Ovsdb) -> Self {
        Self {
            name: name.into(),
            datapath_type: datapath_type.into(),
            ovsdb,
            installed: Arc::default(),
        }
    }

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

    /// Every interface of the bridge's ports but the bridge's own: one
    /// OVSDB transaction (Bridge → Ports → Interfaces).
    pub async fn interfaces(&self) -> Result<Vec<Interface>> {
        let r = self
            .ovsdb
            .transact(vec![
                json!({"op": "select", "table": "Bridge", "where": [["name", "==", self.name]],
                       "columns": ["ports"]}),
                json!({"op": "select", "table": "Port", "where": [],
                       "columns": ["_uuid", "name", "tag", "other_config", "interfaces"]}),
                json!({"op": "select", "table": "Interface", "where": [],
                       "columns": ["_uuid", "name", "ofport", "external_ids"]}),
            ])
            .await?;
        let rows = |i: usize| -> Vec<Value> {
            r.get(i)
                .and_then(|x| x.get("rows"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let Some(bridge) = rows(0).into_iter().next() else {
            return Err(DriverError::Parse(format!("no bridge {}", self.name)));
        };
        let mine: BTreeSet<String> = ovsdb::set_items(&bridge["ports"])
            .iter()
            .filter_map(|u| ovsdb::uuid_of(u).map(str::to_string))
            .collect();
        let ifaces: BTreeMap<String, Value> = rows(2)
            .into_iter()
            .filter_map(|i| Some((ovsdb::uuid_of(&i["_uuid"])?.to_string(), i)))
            .collect();
        let mut out = Vec::new();
        for p in rows(1) {
            let Some(uuid) = ovsdb::uuid_of(&p["_uuid"]) else {
                continue;
            };
            let name = p["name"].as_str().unwrap_or_default();
            if !mine.contains(uuid) || name == self.name {
                continue;
            }
            let tag = ovsdb::opt_int(&p["tag"]).and_then(|t| u16::try_from(t).ok());
            let other_config = ovsdb::map_of(&p["other_config"]);
            for iu in ovsdb::set_items(&p["interfaces"]) {
                let Some(i) = ovsdb::uuid_of(&iu).and_then(|u| ifaces.get(u)) else {
                    continue;
                };
                out.push(Interface {
                    name: i["name"].as_str().unwrap_or(name).to_string(),
                    ofport: ovsdb::opt_int(&i["ofport"]).unwrap_or(-1),
                    external_ids: ovsdb::map_of(&i["external_ids"]),
                    tag,
                    other_config: other_config.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Sets tags (and the network each tag stands for) in one OVSDB transaction.
    pub async fn set_tags(&self, changes: &[(String, u16, String)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for (name, tag, net) in changes {
            let at = json!([["name", "==", name]]);
            ops.push(json!({"op": "update", "table": "Port", "where": at, "row": {"tag": tag}}));
            // A map insert never overwrites a key: delete it first.
            ops.push(json!({"op": "mutate", "table": "Port", "where": at,
                "mutations": [["other_config", "delete", ["set", ["cirrus-net"]]]]}));
            if !net.is_empty() {
                ops.push(json!({"op": "mutate", "table": "Port", "where": at,
                    "mutations": [["other_config", "insert", ["map", [["cirrus-net", net]]]]]}));
            }
        }
        self.ovsdb.transact(ops).await?;
        Ok(())
    }

    /// Whether `name` is on the bridge with `iface_id` and `owner` already.
    async fn has_port(&self, name: &str, iface_id: &str, owner: &str) -> Result<bool> {
        Ok(self.interfaces().await?.iter().any(|i| {
            i.name == name
                && i.iface_id() == Some(iface_id)
                && i.external_ids.get("cirrus-owner").map(String::as_str) == Some(owner)
        }))
    }

    pub async fn add_port(&self, name: &str, iface_id: &str, owner: &str) -> Result<()> {
        if self.has_port(name, iface_id, owner).await? {
            return Ok(());
        }
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

    /// Installs exactly `flows`, changing only what differs; nothing at all
    /// when this process installed the same table last.
    pub async fn replace_flows(&self, flows: &str, scratch: &Path) -> Result<()> {
        let mut installed = self.installed.lock().await;
        if *installed == flows {
            return Ok(());
        }
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
        *installed = flows.to_string();
        Ok(())
    }

    pub async fn dump_flows(&self) -> Result<String> {
        run("ovs-ofctl", &["-O", "OpenFlow13", "dump-flows", &self.name]).await
    }
}

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Network namespaces whose name starts with `prefix` (what `ip netns list`
/// reads, without the fork).
pub async fn namespaces(prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut rd = match tokio::fs::read_dir(NETNS_DIR).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(DriverError::Command {
                cmd: format!("read {NETNS_DIR}"),
                detail: e.to_string(),
            });
        }
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(prefix) {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
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

/// Whether a link `name` exists in the agent's own namespace.
pub async fn link_exists(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && tokio::fs::try_exists(format!("/sys/class/net/{name}"))
            .await
            .unwrap_or(false)
}
