//! The bodies of the build steps that talk to other services or make
//! files: the image (cached base + overlay, kernel and ramdisk), the ports
//! (network), the volumes (volume), the config drive (ISO9660 `config-2`),
//! the domain's description, the wait for the ports to be ACTIVE; their
//! undos; and live attach and detach of a data volume. Each records what it
//! made in the server's journal before going on, so that an undo — possibly
//! by a restarted agent — finds it.

use std::path::PathBuf;
use std::time::Duration;

use proto::network::v1 as npb;
use proto::network::v1::networks_client::NetworksClient;
use proto::volume::v1 as vpb;
use proto::volume::v1::volumes_client::VolumesClient;
use tonic::Code;

use crate::clients::{refused, req};
use crate::images;
use crate::libvirt::{DirectBoot, Disk, DomainSpec, Nic};
use crate::saga::{
    AttachmentRecord, Ctx, PortRecord, StepError, config_drive_iso, config_drive_path,
    console_log_path, console_socket_path, dev_name, disk_path,
};

fn fail(m: impl Into<String>) -> StepError {
    StepError::new(m, false)
}

fn image_format_for_qemu(f: &str) -> &'static str {
    if f == "qcow2" { "qcow2" } else { "raw" }
}

pub async fn image(c: &Ctx<'_>) -> Result<(), StepError> {
    let disk = disk_path(&c.dir);
    if c.simulated() {
        // The test driver boots nothing: the overlay only names its image.
        let body = format!("cirrus overlay of image {}\n", c.spec.image_id);
        return crate::saga::write_file(&disk, body.as_bytes()).await;
    }
    if c.spec.image_id.is_empty() {
        // Boot from volume: the root disk is the boot volume's.
        return Ok(());
    }
    tokio::fs::create_dir_all(&c.dir)
        .await
        .map_err(|e| StepError::new(format!("server directory: {e}"), true))?;
    images::open_dir(&c.dir);
    let in_use = || bases_in_use(c);
    let base = c
        .env
        .cache
        .fetch(&c.env.services, c.token, &c.spec.image_id, in_use)
        .await
        .map_err(fail)?;
    c.record(|j| j.base = Some(base.path.clone())).await?;
    // Kernel and ramdisk boot (Nova's aki/ari): both downloaded too.
    let mut kernel = None;
    let mut ramdisk = None;
    if let Some(k) = base.properties.get("kernel_id").filter(|k| !k.is_empty()) {
        let cached = c
            .env
            .cache
            .fetch(&c.env.services, c.token, k, || bases_in_use(c))
            .await
            .map_err(|e| fail(format!("kernel of image {}: {e}", c.spec.image_id)))?;
        kernel = Some(cached.path);
    }
    if let Some(r) = base.properties.get("ramdisk_id").filter(|r| !r.is_empty()) {
        let cached = c
            .env
            .cache
            .fetch(&c.env.services, c.token, r, || bases_in_use(c))
            .await
            .map_err(|e| fail(format!("ramdisk of image {}: {e}", c.spec.image_id)))?;
        ramdisk = Some(cached.path);
    }
    let cmdline = base.properties.get("os_command_line").cloned();
    c.record(|j| {
        j.kernel = kernel;
        j.ramdisk = ramdisk;
        j.cmdline = cmdline;
    })
    .await?;
    images::create_overlay(
        &base.path,
        image_format_for_qemu(&base.format),
        &disk,
        c.spec.disk_gb,
    )
    .await
    .map_err(|e| StepError::new(e, true))?;
    images::set_mode(&disk, 0o644);
    Ok(())
}

/// Every base, kernel and ramdisk a server on this host stands on (their
/// journals), plus this build's.
fn bases_in_use(c: &Ctx<'_>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let servers = c.dir.parent().map(|p| p.to_path_buf());
    if let Some(servers) = servers
        && let Ok(rd) = std::fs::read_dir(servers)
    {
        for e in rd.flatten() {
            let j = crate::saga::load_journal(&e.path());
            out.extend(j.base);
            out.extend(j.kernel);
            out.extend(j.ramdisk);
        }
    }
    let j = c.journal();
    out.extend(j.base);
    out.extend(j.kernel);
    out.extend(j.ramdisk);
    out
}

fn network(c: &Ctx<'_>) -> Result<NetworksClient<runtime::trace::Channel>, StepError> {
    c.env.services.network.clone().map(NetworksClient::new).ok_or_else(|| {
        fail(format!(
            "networking is not available on host {}: no network service (the agent has no sidecar_outbound)",
            c.host
        ))
    })
}

fn volume(c: &Ctx<'_>) -> Result<VolumesClient<runtime::trace::Channel>, StepError> {
    c.env.services.volume.clone().map(VolumesClient::new).ok_or_else(|| {
        fail(format!(
            "volumes are not available on host {}: no volume service (the agent has no sidecar_outbound)",
            c.host
        ))
    })
}

pub async fn ports(c: &Ctx<'_>) -> Result<(), StepError> {
    if c.spec.networks.is_empty() {
        return Ok(());
    }
    let mut net = network(c)?;
    let s = &c.env.services;
    let device = c.id.to_string();
    let owner = format!("compute:{}", c.env.availability_zone);
    for (i, want) in c.spec.networks.iter().enumerate() {
        let mut rec = c.journal().ports.get(i).cloned();
        if rec.is_none() {
            let port = if !want.port_id.is_empty() {
                let p = net
                    .get_port(req(
                        npb::GetRequest {
                            id: want.port_id.clone(),
                        },
                        c.token,
                        s,
                    ))
                    .await
                    .map_err(|st| fail(refused(&format!("port {}", want.port_id), &st, c.token)))?
                    .into_inner();
                if !p.device_id.is_empty() && p.device_id != device {
                    return Err(fail(format!(
                        "port {} is in use by device {}",
                        p.id, p.device_id
                    )));
                }
                if p.device_id.is_empty() {
                    net.update_port(req(
                        npb::UpdatePortRequest {
                            id: p.id.clone(),
                            device_id: Some(device.clone()),
                            device_owner: Some(owner.clone()),
                            ..Default::default()
                        },
                        c.token,
                        s,
                    ))
                    .await
                    .map_err(|st| fail(refused(&format!("port {}", p.id), &st, c.token)))?;
                }
                (p, false)
            } else {
                // A port this build made before a crash, found by device.
                let taken: Vec<String> = c.journal().ports.iter().map(|p| p.id.clone()).collect();
                let existing = net
                    .list_ports(req(
                        npb::ListPortsRequest {
                            network_id: want.network_id.clone(),
                            device_id: device.clone(),
                            all_projects: false,
                        },
                        c.token,
                        s,
                    ))
                    .await
                    .ok()
                    .and_then(|r| {
                        r.into_inner()
                            .ports
                            .into_iter()
                            .find(|p| p.device_owner == owner && !taken.contains(&p.id))
                    });
                match existing {
                    Some(p) => (p, true),
                    None => {
                        let p = net
                            .create_port(req(
                                npb::CreatePortRequest {
                                    network_id: want.network_id.clone(),
                                    fixed_ips: if want.fixed_ip.is_empty() {
                                        Vec::new()
                                    } else {
                                        vec![npb::FixedIpRequest {
                                            subnet_id: String::new(),
                                            ip_address: want.fixed_ip.clone(),
                                        }]
                                    },
                                    device_id: device.clone(),
                                    device_owner: owner.clone(),
                                    project_id: String::new(),
                                    ..Default::default()
                                },
                                c.token,
                                s,
                            ))
                            .await
                            .map_err(|st| {
                                fail(refused(
                                    &format!("a port on network {}", want.network_id),
                                    &st,
                                    c.token,
                                ))
                            })?
                            .into_inner();
                        (p, true)
                    }
                }
            };
            let (p, created) = port;
            let r = PortRecord {
                id: p.id.clone(),
                network_id: p.network_id.clone(),
                created,
                mac: p.mac_address.clone(),
                fixed_ips: p.fixed_ips.iter().map(|f| f.ip_address.clone()).collect(),
                ..Default::default()
            };
            c.record(|j| j.ports.push(r.clone())).await?;
            rec = Some(r);
        }
        let Some(rec) = rec else { continue };
        if rec.bound && !rec.bridge.is_empty() {
            continue;
        }
        let p = net
            .bind_port(req(
                npb::BindPortRequest {
                    port_id: rec.id.clone(),
                    host: c.host.to_string(),
                },
                c.token,
                s,
            ))
            .await
            .map_err(|st| {
                fail(refused(
                    &format!("binding port {} to host {}", rec.id, c.host),
                    &st,
                    c.token,
                ))
            })?
            .into_inner();
        let b = p.binding.clone().unwrap_or_default();
        if b.vif_type != npb::VifType::Ovs as i32 {
            return Err(fail(format!(
                "port {} did not bind to host {}: {}",
                rec.id,
                c.host,
                if b.binding_error.is_empty() {
                    "no OVS binding"
                } else {
                    &b.binding_error
                }
            )));
        }
        let id = rec.id.clone();
        c.record(|j| {
            if let Some(r) = j.ports.iter_mut().find(|r| r.id == id) {
                r.bound = true;
                r.bridge = b.bridge.clone();
                r.interface_id = if b.interface_id.is_empty() {
                    p.id.clone()
                } else {
                    b.interface_id.clone()
                };
                r.mac = p.mac_address.clone();
                r.fixed_ips = p.fixed_ips.iter().map(|f| f.ip_address.clone()).collect();
            }
        })
        .await?;
    }
    Ok(())
}

pub async fn undo_ports(c: &Ctx<'_>) -> Result<(), StepError> {
    let ports = c.journal().ports;
    if ports.is_empty() {
        return Ok(());
    }
    let mut net = network(c)?;
    let s = &c.env.services;
    let gone = |st: &tonic::Status| st.code() == Code::NotFound;
    for p in ports.iter().rev() {
        let r = if p.created {
            net.delete_port(req(npb::DeleteRequest { id: p.id.clone() }, c.token, s))
                .await
                .map(|_| ())
        } else {
            let r = net
                .unbind_port(req(
                    npb::UnbindPortRequest {
                        port_id: p.id.clone(),
                    },
                    c.token,
                    s,
                ))
                .await
                .map(|_| ());
            let _ = net
                .update_port(req(
                    npb::UpdatePortRequest {
                        id: p.id.clone(),
                        device_id: Some(String::new()),
                        device_owner: Some(String::new()),
                        ..Default::default()
                    },
                    c.token,
                    s,
                ))
                .await;
            r
        };
        match r {
            Ok(()) => {}
            Err(st) if gone(&st) => {}
            Err(st) => {
                return Err(StepError::new(
                    refused(&format!("releasing port {}", p.id), &st, c.token),
                    false,
                ));
            }
        }
        let id = p.id.clone();
        c.record(|j| j.ports.retain(|r| r.id != id)).await?;
    }
    Ok(())
}

fn connector(c: &Ctx<'_>) -> vpb::HostConnector {
    vpb::HostConnector {
        host: c.host.to_string(),
        transports: vec![vpb::Transport::LocalFile as i32],
    }
}

fn local_file(a: &vpb::Attachment) -> Result<(String, String), StepError> {
    let info = a.connection_info.clone().unwrap_or_default();
    let path = match info.target {
        Some(vpb::connection_info::Target::LocalFile(f)) => f.path,
        _ => {
            return Err(fail(format!(
                "volume {}: the volume service offered no local file",
                a.volume_id
            )));
        }
    };
    let format = if info.format == vpb::VolumeFormat::Qcow2 as i32 {
        "qcow2"
    } else {
        "raw"
    };
    Ok((path, format.to_string()))
}

/// Reserves and connects `volume_id` for this server; the record (not yet
/// completed). An attachment this server already has is reused.
async fn connect_volume(
    c: &Ctx<'_>,
    vol: &mut VolumesClient<runtime::trace::Channel>,
    volume_id: &str,
    dev: String,
    boot: bool,
) -> Result<AttachmentRecord, StepError> {
    let s = &c.env.services;
    if let Some(r) = c
        .journal()
        .attachments
        .iter()
        .find(|a| a.volume_id == volume_id)
    {
        return Ok(r.clone());
    }
    let a = vol
        .create_attachment(req(
            vpb::CreateAttachmentRequest {
                volume_id: volume_id.to_string(),
                server_id: c.id.to_string(),
                connector: Some(connector(c)),
            },
            c.token,
            s,
        ))
        .await
        .map_err(|st| {
            fail(refused(
                &format!("attaching volume {volume_id}"),
                &st,
                c.token,
            ))
        })?
        .into_inner();
    let mut rec = AttachmentRecord {
        id: a.id.clone(),
        volume_id: volume_id.to_string(),
        dev,
        boot,
        ..Default::default()
    };
    c.record(|j| j.attachments.push(rec.clone())).await?;
    let (path, format) = local_file(&a)?;
    rec.path = path;
    rec.format = format;
    let r = rec.clone();
    c.record(|j| {
        if let Some(x) = j.attachments.iter_mut().find(|x| x.id == r.id) {
            *x = r.clone();
        }
    })
    .await?;
    Ok(rec)
}

async fn complete(
    c: &Ctx<'_>,
    vol: &mut VolumesClient<runtime::trace::Channel>,
    rec: &AttachmentRecord,
) -> Result<(), StepError> {
    if rec.completed {
        return Ok(());
    }
    vol.complete_attachment(req(
        vpb::CompleteAttachmentRequest {
            id: rec.id.clone(),
            mountpoint: format!("/dev/{}", rec.dev),
        },
        c.token,
        &c.env.services,
    ))
    .await
    .map_err(|st| {
        fail(refused(
            &format!("completing the attachment of volume {}", rec.volume_id),
            &st,
            c.token,
        ))
    })?;
    let id = rec.id.clone();
    c.record(|j| {
        if let Some(x) = j.attachments.iter_mut().find(|x| x.id == id) {
            x.completed = true;
        }
    })
    .await
}

pub async fn volumes(c: &Ctx<'_>) -> Result<(), StepError> {
    if c.spec.volumes.is_empty() {
        return Ok(());
    }
    let mut vol = volume(c)?;
    // Boot from volume: no image, the first volume by boot index is vda.
    let mut order: Vec<_> = c.spec.volumes.iter().collect();
    order.sort_by_key(|v| v.boot_index);
    let boot_from_volume = c.spec.image_id.is_empty();
    for (i, v) in order.iter().enumerate() {
        let boot = boot_from_volume && i == 0;
        let n = if boot_from_volume { i } else { i + 1 };
        let rec = connect_volume(c, &mut vol, &v.volume_id, dev_name(n), boot).await?;
        complete(c, &mut vol, &rec).await?;
    }
    Ok(())
}

async fn delete_attachment(
    c: &Ctx<'_>,
    vol: &mut VolumesClient<runtime::trace::Channel>,
    rec: &AttachmentRecord,
) -> Result<(), StepError> {
    match vol
        .delete_attachment(req(
            vpb::DeleteAttachmentRequest { id: rec.id.clone() },
            c.token,
            &c.env.services,
        ))
        .await
    {
        Ok(_) => {}
        Err(st) if st.code() == Code::NotFound => {}
        Err(st) => {
            return Err(fail(refused(
                &format!("detaching volume {}", rec.volume_id),
                &st,
                c.token,
            )));
        }
    }
    let id = rec.id.clone();
    c.record(|j| j.attachments.retain(|x| x.id != id)).await
}

pub async fn undo_volumes(c: &Ctx<'_>) -> Result<(), StepError> {
    let atts = c.journal().attachments;
    if atts.is_empty() {
        return Ok(());
    }
    let mut vol = volume(c)?;
    for a in atts.iter().rev() {
        delete_attachment(c, &mut vol, a).await?;
    }
    Ok(())
}

/// Live attach (Nova's `attach_volume`): reserve + connect, plug the disk
/// into the running guest and its definition, complete; a failed plug rolls
/// the attachment back.
pub async fn attach_volume(c: &Ctx<'_>, volume_id: &str) -> Result<AttachmentRecord, StepError> {
    let mut vol = volume(c)?;
    let lv = c.libvirt.clone();
    let id = c.id;
    let targets = tokio::task::spawn_blocking(move || lv.disk_targets(id))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("libvirt: {e}")))?;
    let dev = (1..26)
        .map(dev_name)
        .find(|d| !targets.contains(d))
        .ok_or_else(|| fail("no free disk name"))?;
    let rec = connect_volume(c, &mut vol, volume_id, dev, false).await?;
    let disk = Disk {
        path: rec.path.clone(),
        format: rec.format.clone(),
        dev: rec.dev.clone(),
        readonly: false,
    };
    let lv = c.libvirt.clone();
    let plugged = tokio::task::spawn_blocking(move || lv.attach_disk(id, &disk))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if let Err(e) = plugged {
        delete_attachment(c, &mut vol, &rec).await?;
        return Err(fail(format!("libvirt: {e}")));
    }
    complete(c, &mut vol, &rec).await?;
    Ok(rec)
}

/// Live detach: unplug from the guest and its definition, then delete the attachment.
pub async fn detach_volume(c: &Ctx<'_>, volume_id: &str) -> Result<(), StepError> {
    let Some(rec) = c
        .journal()
        .attachments
        .into_iter()
        .find(|a| a.volume_id == volume_id)
    else {
        return Ok(());
    };
    let mut vol = volume(c)?;
    let disk = Disk {
        path: rec.path.clone(),
        format: rec.format.clone(),
        dev: rec.dev.clone(),
        readonly: false,
    };
    let lv = c.libvirt.clone();
    let id = c.id;
    tokio::task::spawn_blocking(move || lv.detach_disk(id, &disk))
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(format!("libvirt: {e}")))?;
    delete_attachment(c, &mut vol, &rec).await
}

pub async fn config_drive(c: &Ctx<'_>) -> Result<(), StepError> {
    let root = config_drive_path(&c.dir).join("openstack").join("latest");
    let j = c.journal();
    let meta = serde_json::json!({
        "uuid": c.id.to_string(),
        "name": c.spec.name,
        "hostname": c.spec.name,
        "project_id": c.spec.project_id,
        "availability_zone": c.env.availability_zone,
        "meta": c.spec.metadata,
        "public_keys": if c.spec.key_name.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::json!({ c.spec.key_name.clone(): c.spec.public_key })
        },
    });
    let meta =
        serde_json::to_vec_pretty(&meta).map_err(|e| fail(format!("meta_data.json: {e}")))?;
    let links: Vec<_> = j
        .ports
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": format!("tap{}", &p.id.chars().take(11).collect::<String>()),
                "type": "ovs",
                "ethernet_mac_address": p.mac,
                "vif_id": p.id,
            })
        })
        .collect();
    let networks: Vec<_> = j
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "id": format!("network{i}"),
                "type": "ipv4_dhcp",
                "link": format!("tap{}", &p.id.chars().take(11).collect::<String>()),
                "network_id": p.network_id,
            })
        })
        .collect();
    let network_data = serde_json::to_vec_pretty(&serde_json::json!({
        "links": links, "networks": networks, "services": []
    }))
    .map_err(|e| fail(format!("network_data.json: {e}")))?;
    crate::saga::write_file(&root.join("meta_data.json"), &meta).await?;
    crate::saga::write_file(&root.join("network_data.json"), &network_data).await?;
    if !c.spec.user_data.is_empty() {
        crate::saga::write_file(&root.join("user_data"), &c.spec.user_data).await?;
    }
    if c.simulated() {
        return Ok(());
    }
    let iso = config_drive_iso(&c.dir);
    if tokio::fs::metadata(&iso).await.is_ok() {
        return Ok(());
    }
    let tmp = iso.with_extension("iso.tmp");
    let out = tokio::process::Command::new("genisoimage")
        .args(["-quiet", "-V", "config-2", "-J", "-R", "-o"])
        .arg(&tmp)
        .arg(config_drive_path(&c.dir))
        .output()
        .await
        .map_err(|e| StepError::new(format!("genisoimage: {e}"), true))?;
    if !out.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(StepError::new(
            format!(
                "genisoimage: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            true,
        ));
    }
    tokio::fs::rename(&tmp, &iso)
        .await
        .map_err(|e| StepError::new(format!("config drive: {e}"), true))?;
    images::set_mode(&iso, 0o644);
    Ok(())
}

/// The libvirt domain of what the steps made (from the journal).
pub fn domain_spec(c: &Ctx<'_>) -> DomainSpec {
    let j = c.journal();
    let mut disks = Vec::new();
    if let Some(root) = j.attachments.iter().find(|a| a.boot) {
        disks.push(Disk {
            path: root.path.clone(),
            format: root.format.clone(),
            dev: "vda".into(),
            readonly: false,
        });
    } else {
        disks.push(Disk {
            path: disk_path(&c.dir).display().to_string(),
            format: "qcow2".into(),
            dev: "vda".into(),
            readonly: false,
        });
    }
    for a in j.attachments.iter().filter(|a| !a.boot) {
        disks.push(Disk {
            path: a.path.clone(),
            format: a.format.clone(),
            dev: a.dev.clone(),
            readonly: false,
        });
    }
    if !c.simulated() {
        let used: Vec<String> = disks.iter().map(|d| d.dev.clone()).collect();
        let dev = (1..26)
            .map(dev_name)
            .find(|d| !used.contains(d))
            .unwrap_or_else(|| "vdz".into());
        disks.push(Disk {
            path: config_drive_iso(&c.dir).display().to_string(),
            format: "raw".into(),
            dev,
            readonly: true,
        });
    }
    let boot = j.kernel.as_ref().map(|k| DirectBoot {
        kernel: k.display().to_string(),
        initrd: j.ramdisk.as_ref().map(|r| r.display().to_string()),
        cmdline: j
            .cmdline
            .clone()
            .unwrap_or_else(|| c.env.kernel_cmdline.clone()),
    });
    DomainSpec {
        id: c.id,
        vcpus: c.spec.vcpus.max(1),
        ram_mb: c.spec.ram_mb.max(16),
        disks,
        boot,
        nics: j
            .ports
            .iter()
            .map(|p| Nic {
                bridge: p.bridge.clone(),
                interface_id: p.interface_id.clone(),
                mac: p.mac.clone(),
            })
            .collect(),
        serial_log: Some(console_log_path(&c.dir).display().to_string()),
        // Too long a state directory: the log only, and no interactive console.
        serial_socket: Some(console_socket_path(&c.dir).display().to_string())
            .filter(|p| p.len() <= crate::saga::MAX_SOCKET_PATH),
    }
}

/// Every port ACTIVE (the "vif plugged" event), from the network service's
/// `WatchPorts` stream of this device, within the configured bound.
pub async fn wait_vif_plugged(c: &Ctx<'_>) -> Result<(), StepError> {
    let ports: Vec<String> = c.journal().ports.iter().map(|p| p.id.clone()).collect();
    if ports.is_empty() {
        return Ok(());
    }
    let mut net = network(c)?;
    let bound = c.env.vif_plug_timeout;
    let mut active: Vec<String> = Vec::new();
    let mut r = req(
        npb::WatchPortsRequest {
            device_id: c.id.to_string(),
        },
        c.token,
        &c.env.services,
    );
    r.set_timeout(bound + Duration::from_secs(5));
    let waited = tokio::time::timeout(bound, async {
        let mut stream = net
            .watch_ports(r)
            .await
            .map_err(|st| fail(refused("watching the server's ports", &st, c.token)))?
            .into_inner();
        while let Some(ev) = stream
            .message()
            .await
            .map_err(|st| fail(refused("watching the server's ports", &st, c.token)))?
        {
            if ports.contains(&ev.port_id) && ev.status == "ACTIVE" && !active.contains(&ev.port_id)
            {
                active.push(ev.port_id.clone());
            }
            if ports.iter().all(|p| active.contains(p)) {
                return Ok(());
            }
        }
        Err(fail("the network service ended the port watch"))
    })
    .await;
    match waited {
        Ok(r) => r,
        Err(_) => {
            let missing: Vec<&String> = ports.iter().filter(|p| !active.contains(p)).collect();
            Err(fail(format!(
                "vif plugging timed out: port(s) {} not ACTIVE within {} s on host {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                bound.as_secs(),
                c.host
            )))
        }
    }
}
