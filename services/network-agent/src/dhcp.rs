//! DHCP per network: a dnsmasq in its own namespace, joined to the bridge by
//! a veth pair whose bridge end is the network's DHCP port (a real port of
//! the network, `device_owner = network:dhcp`, tagged like the guests).
//! Leases are static, built from the network's ports (MAC → IP, hostname);
//! gateway, DNS servers, host routes and MTU are DHCP options. A change
//! rewrites the files and sends dnsmasq SIGHUP (it rereads them); dnsmasq is
//! left running when the agent stops, so that guests keep renewing.
//!
//! Checksum hazard: the userspace datapath does not complete offloaded
//! checksums, so the namespace end has `tx` offload turned off, without
//! which clients drop every offer.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::ovs::{self, DriverError, Result, run};

/// What one network's DHCP server must serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub network_id: String,
    pub port_id: String,
    pub mac: String,
    /// The DHCP port's addresses with their prefix lengths.
    pub addrs: Vec<(Ipv4Addr, u8)>,
    /// `(network address, netmask)` per DHCP subnet.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// The dhcp-hostsfile and dhcp-optsfile contents.
    pub hosts: String,
    pub opts: String,
}

/// Where one agent keeps its namespaces and files.
#[derive(Debug, Clone)]
pub struct Dhcp {
    pub prefix: String,
    pub state_dir: PathBuf,
}

fn short(id: &str) -> String {
    id.chars().filter(|c| *c != '-').take(11).collect()
}

impl Dhcp {
    pub fn namespace(&self, network_id: &str) -> String {
        format!("{}dhcp-{network_id}", self.prefix)
    }

    fn dir(&self, network_id: &str) -> PathBuf {
        self.state_dir.join("dhcp").join(network_id)
    }

    /// The bridge end's name (interface names are at most 15 bytes).
    pub fn host_if(port_id: &str) -> String {
        format!("dh{}", short(port_id))
    }

    fn ns_if(port_id: &str) -> String {
        format!("dn{}", short(port_id))
    }

    /// Namespace, veth pair, addresses, OVS port, files and a running dnsmasq.
    pub async fn ensure(&self, spec: &Spec, bridge: &ovs::Bridge) -> Result<()> {
        let ns = self.namespace(&spec.network_id);
        let dir = self.dir(&spec.network_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io("mkdir", &dir, e))?;
        let host_if = Self::host_if(&spec.port_id);
        let ns_if = Self::ns_if(&spec.port_id);
        let wiring = format!("{} {} {:?}", spec.port_id, spec.mac, spec.addrs);
        let wired_file = dir.join("wired");
        let wired_before = tokio::fs::read_to_string(&wired_file)
            .await
            .unwrap_or_default();
        let have_ns = ovs::namespaces(&ns).await?.contains(&ns);
        if !(have_ns && wired_before == wiring && ovs::link_exists(&host_if).await) {
            // Off the bridge first: ovs-vswitchd keeps receiving on the old
            // veth's socket if one of the same name comes back under it.
            bridge.del_port(&host_if).await?;
            self.wire(&ns, &host_if, &ns_if, spec, have_ns).await?;
            tokio::fs::write(&wired_file, &wiring)
                .await
                .map_err(|e| io("write", &wired_file, e))?;
        }
        bridge.add_port(&host_if, &spec.port_id, "dhcp").await?;

        let hosts_file = dir.join("hosts");
        let opts_file = dir.join("opts");
        let changed = write_if_changed(&hosts_file, &spec.hosts).await?
            | write_if_changed(&opts_file, &spec.opts).await?;
        match self.running_pid(&spec.network_id).await {
            Some(pid) if changed => {
                run("kill", &["-HUP", &pid.to_string()]).await?;
            }
            Some(_) => {}
            None => self.start(&ns, &ns_if, spec, &dir).await?,
        }
        Ok(())
    }

    async fn wire(
        &self,
        ns: &str,
        host_if: &str,
        ns_if: &str,
        spec: &Spec,
        have_ns: bool,
    ) -> Result<()> {
        if have_ns {
            // Rewire from scratch: a half-made namespace is cheaper to redo than to diagnose.
            let _ = self.stop(&spec.network_id).await;
            ovs::delete_namespace(ns).await?;
        }
        if ovs::link_exists(host_if).await {
            run("ip", &["link", "del", host_if]).await?;
        }
        run("ip", &["netns", "add", ns]).await?;
        run(
            "ip",
            &[
                "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
            ],
        )
        .await?;
        run("ip", &["link", "set", ns_if, "netns", ns]).await?;
        run(
            "ip",
            &["-n", ns, "link", "set", ns_if, "address", &spec.mac],
        )
        .await?;
        for (ip, p) in &spec.addrs {
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "replace",
                    &format!("{ip}/{p}"),
                    "dev",
                    ns_if,
                ],
            )
            .await?;
        }
        run("ip", &["-n", ns, "link", "set", "lo", "up"]).await?;
        run("ip", &["-n", ns, "link", "set", ns_if, "up"]).await?;
        run("ip", &["link", "set", host_if, "up"]).await?;
        run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", ns_if, "tx", "off"],
        )
        .await?;
        Ok(())
    }

    async fn start(&self, ns: &str, ns_if: &str, spec: &Spec, dir: &Path) -> Result<()> {
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns.into(),
            "dnsmasq".into(),
            "--no-hosts".into(),
            "--no-resolv".into(),
            "--port=0".into(),
            "--user=root".into(),
            "--bind-interfaces".into(),
            format!("--interface={ns_if}"),
            "--except-interface=lo".into(),
            "--dhcp-authoritative".into(),
            "--leasefile-ro".into(),
            format!("--pid-file={}", dir.join("pid").display()),
            format!("--dhcp-hostsfile={}", dir.join("hosts").display()),
            format!("--dhcp-optsfile={}", dir.join("opts").display()),
            format!("--log-facility={}", dir.join("log").display()),
            "--log-dhcp".into(),
        ];
        for (i, (net, mask)) in spec.ranges.iter().enumerate() {
            args.push(format!("--dhcp-range=set:s{i},{net},static,{mask},86400s"));
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        // dnsmasq forks into the background and writes its pid file.
        run("ip", &a).await?;
        Ok(())
    }

    /// The pid of this network's dnsmasq, if it runs.
    pub async fn running_pid(&self, network_id: &str) -> Option<u32> {
        let dir = self.dir(network_id);
        let pid: u32 = tokio::fs::read_to_string(dir.join("pid"))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
        let me = dir.join("hosts").display().to_string();
        String::from_utf8_lossy(&cmdline)
            .contains(&me)
            .then_some(pid)
    }

    pub async fn stop(&self, network_id: &str) -> Result<()> {
        if let Some(pid) = self.running_pid(network_id).await {
            run("kill", &["-TERM", &pid.to_string()]).await?;
            for _ in 0..100 {
                if self.running_pid(network_id).await.is_none() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Removes a network's DHCP server entirely (process, namespace, files).
    pub async fn remove(&self, network_id: &str) -> Result<()> {
        let _ = self.stop(network_id).await;
        let ns = self.namespace(network_id);
        if ovs::namespaces(&ns).await?.contains(&ns) {
            ovs::delete_namespace(&ns).await?;
        }
        let dir = self.dir(network_id);
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| io("rm", &dir, e))?;
        }
        Ok(())
    }

    /// Network ids that have a namespace or a directory of this agent.
    pub async fn present(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = ovs::namespaces(&format!("{}dhcp-", self.prefix))
            .await?
            .into_iter()
            .filter_map(|n| {
                n.strip_prefix(&format!("{}dhcp-", self.prefix))
                    .map(str::to_string)
            })
            .collect();
        if let Ok(mut rd) = tokio::fs::read_dir(self.state_dir.join("dhcp")).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                let n = e.file_name().to_string_lossy().into_owned();
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

async fn write_if_changed(path: &Path, content: &str) -> Result<bool> {
    if tokio::fs::read_to_string(path).await.ok().as_deref() == Some(content) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, content)
        .await
        .map_err(|e| io("write", &tmp, e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| io("rename", path, e))?;
    Ok(true)
}

fn io(what: &str, p: &Path, e: std::io::Error) -> DriverError {
    DriverError::Command {
        cmd: format!("{what} {}", p.display()),
        detail: e.to_string(),
    }
}
