//! What a new cloud offers at once, made idempotently after every service
//! is up (a second `cirrus up` finds and reuses each, making no duplicate):
//! the tiny test guest (`scripts/guest/build.sh`: a kernel and an initramfs
//! uploaded as `aki` + `ari` images, and a small root disk `cirrus-tiny`
//! whose `kernel_id` / `ramdisk_id` name them), a network `default` with a
//! DHCP subnet and the admin project's `default` security group. The
//! default flavors (m1.*) come with compute-api's migrations; they are
//! checked here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use proto::compute::v1 as cpb;
use proto::image::v1 as ipb;
use proto::network::v1 as npb;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::services::{Ports, local};
use crate::session::{Profile, channel, login, with_token};

pub const IMAGE: &str = "cirrus-tiny";
pub const KERNEL: &str = "cirrus-tiny-kernel";
pub const RAMDISK: &str = "cirrus-tiny-ramdisk";
pub const NETWORK: &str = "default";
pub const SUBNET: &str = "default-subnet";
pub const CIDR: &str = "10.20.0.0/24";
pub const FLAVOR: &str = "m1.tiny";

/// A channel to `svc`'s public endpoint, as the admin's clients reach it.
async fn public(admin: &Profile, svc: &str, p: Ports) -> anyhow::Result<Channel> {
    let mut prof = admin.clone();
    prof.url = format!("https://{}", local(p.public));
    prof.server_name = svc.into();
    prof.client_cert.clear();
    prof.client_key.clear();
    channel(&prof).await
}

/// Where the tiny guest is: `target/guest` beside the binaries' directory,
/// built there by the project's script when missing (when the binaries run
/// from a checkout).
pub async fn guest_dir(bin_dir: PathBuf) -> Result<PathBuf, String> {
    let target = bin_dir.parent().unwrap_or(&bin_dir);
    let out = target.join("guest");
    let have = |d: &Path| {
        ["vmlinuz", "initramfs.img", "root.qcow2"]
            .iter()
            .all(|f| d.join(f).is_file())
    };
    // In a checkout the script always runs: it returns at once when its
    // stamp (kernel, init, busybox) matches, and rebuilds a guest whose
    // init changed. Elsewhere a guest already there is used as it is.
    let script = target.join("../scripts/guest/build.sh");
    if !script.is_file() {
        if have(&out) {
            return Ok(out);
        }
        return Err(format!(
            "no tiny guest in {} and no scripts/guest/build.sh beside it",
            out.display()
        ));
    }
    let mut c = tokio::process::Command::new("bash");
    c.arg(&script)
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(600), c.status()).await {
        Ok(Ok(s)) if s.success() && have(&out) => Ok(out),
        Ok(Ok(s)) => Err(format!("{} failed ({s})", script.display())),
        Ok(Err(e)) => Err(format!("{}: {e}", script.display())),
        Err(_) => Err(format!("{} did not finish within 600 s", script.display())),
    }
}

pub struct Endpoints {
    pub image: Ports,
    pub network: Ports,
    pub compute: Ports,
}

/// Makes (or finds) every default; returns the summary's lines.
pub async fn ensure(
    admin: &Profile,
    at: &Endpoints,
    guest: Result<PathBuf, String>,
) -> anyhow::Result<Vec<String>> {
    let token = login(admin, None).await?.token;
    let mut lines = Vec::new();

    let compute = public(admin, "compute-api", at.compute).await?;
    let flavors = cpb::flavors_client::FlavorsClient::new(compute)
        .list_flavors(with_token(cpb::ListFlavorsRequest {}, &token))
        .await
        .context("listing flavors")?
        .into_inner()
        .flavors;
    if !flavors.iter().any(|f| f.name == FLAVOR) {
        bail!("compute-api has no flavor {FLAVOR} (its migrations make m1.*)");
    }
    lines.push(format!("  flavors   {} (m1.*)", flavors.len()));

    let net = public(admin, "network", at.network).await?;
    lines.push(network(net, &token).await?);

    match guest {
        Ok(dir) => {
            let img = public(admin, "image", at.image).await?;
            lines.push(images(img, &token, &dir).await?);
        }
        Err(why) => lines.push(format!(
            "  image     NOT UPLOADED: {why} (run scripts/guest/build.sh, then cirrus up again)"
        )),
    }
    Ok(lines)
}

async fn network(ch: Channel, token: &str) -> anyhow::Result<String> {
    let mut n = npb::networks_client::NetworksClient::new(ch);
    let list = n
        .list_networks(with_token(npb::ListRequest::default(), token))
        .await
        .context("listing networks")?
        .into_inner()
        .networks;
    let (net, made) = match list.into_iter().find(|x| x.name == NETWORK) {
        Some(x) => (x, false),
        None => {
            let req = npb::CreateNetworkRequest {
                name: NETWORK.into(),
                ..Default::default()
            };
            let x = n
                .create_network(with_token(req, token))
                .await
                .context("creating the default network")?
                .into_inner();
            (x, true)
        }
    };
    let subnets = n
        .list_subnets(with_token(
            npb::ListSubnetsRequest {
                network_id: net.id.clone(),
            },
            token,
        ))
        .await
        .context("listing the default network's subnets")?
        .into_inner()
        .subnets;
    let subnet = match subnets.into_iter().next() {
        Some(s) => s,
        None => {
            let req = npb::CreateSubnetRequest {
                network_id: net.id.clone(),
                name: SUBNET.into(),
                cidr: CIDR.into(),
                enable_dhcp: Some(true),
                ..Default::default()
            };
            n.create_subnet(with_token(req, token))
                .await
                .context("creating the default subnet")?
                .into_inner()
        }
    };
    // Listing gives the project its `default` group on first use.
    let groups = n
        .list_security_groups(with_token(npb::ListRequest::default(), token))
        .await
        .context("listing security groups")?
        .into_inner()
        .security_groups;
    if !groups.iter().any(|g| g.name == "default") {
        let req = npb::CreateSecurityGroupRequest {
            name: "default".into(),
            description: "Default security group".into(),
        };
        if let Err(s) = n.create_security_group(with_token(req, token)).await
            && s.code() != tonic::Code::AlreadyExists
        {
            return Err(s).context("creating the default security group");
        }
    }
    Ok(format!(
        "  network   {NETWORK} ({}) subnet {} {}, DHCP {}; security group default{}",
        net.id,
        subnet.name,
        subnet.cidr,
        if subnet.enable_dhcp { "on" } else { "off" },
        if made { "" } else { " (reused)" }
    ))
}

/// One image by name: reused when active (and, for the root disk, when
/// its properties are `props`); otherwise (a failed upload, stale
/// properties) replaced.
async fn image(
    c: &mut ipb::images_client::ImagesClient<Channel>,
    token: &str,
    name: &str,
    format: ipb::DiskFormat,
    file: &Path,
    props: HashMap<String, String>,
) -> anyhow::Result<(String, bool)> {
    let found = c
        .list_images(with_token(
            ipb::ListImagesRequest {
                name: Some(name.into()),
                ..Default::default()
            },
            token,
        ))
        .await
        .with_context(|| format!("listing images named {name}"))?
        .into_inner()
        .images;
    let mut keep = None;
    for i in found {
        let fits = i.status == ipb::Status::Active as i32
            && props.iter().all(|(k, v)| i.properties.get(k) == Some(v));
        if fits && keep.is_none() {
            keep = Some(i.id);
        } else {
            let req = ipb::DeleteImageRequest { id: i.id.clone() };
            c.delete_image(with_token(req, token))
                .await
                .with_context(|| format!("removing the stale image {} ({name})", i.id))?;
        }
    }
    if let Some(id) = keep {
        return Ok((id, false));
    }
    let req = ipb::CreateImageRequest {
        name: name.into(),
        disk_format: format as i32,
        container_format: ipb::ContainerFormat::Bare as i32,
        visibility: ipb::Visibility::Public as i32,
        properties: props,
        ..Default::default()
    };
    let id = c
        .create_image(with_token(req, token))
        .await
        .with_context(|| format!("creating image {name}"))?
        .into_inner()
        .id;
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let mut chunks = Vec::new();
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        chunks.push(ipb::UploadRequest {
            image_id: if chunks.is_empty() {
                id.clone()
            } else {
                String::new()
            },
            data: buf.into(),
        });
    }
    let mut req = tonic::Request::new(tokio_stream::iter(chunks));
    req.set_timeout(Duration::from_secs(300));
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    let up = c
        .upload(req)
        .await
        .with_context(|| format!("uploading {} as {name}", file.display()))?
        .into_inner();
    if up.status != ipb::Status::Active as i32 {
        bail!("image {name} is not active after its upload");
    }
    Ok((id, true))
}

async fn images(ch: Channel, token: &str, dir: &Path) -> anyhow::Result<String> {
    let mut c = ipb::images_client::ImagesClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let none = HashMap::new;
    let (kernel, k_new) = image(
        &mut c,
        token,
        KERNEL,
        ipb::DiskFormat::Aki,
        &dir.join("vmlinuz"),
        none(),
    )
    .await?;
    let (ramdisk, r_new) = image(
        &mut c,
        token,
        RAMDISK,
        ipb::DiskFormat::Ari,
        &dir.join("initramfs.img"),
        none(),
    )
    .await?;
    let props = HashMap::from([
        ("kernel_id".to_string(), kernel.clone()),
        ("ramdisk_id".to_string(), ramdisk.clone()),
    ]);
    let (root, i_new) = image(
        &mut c,
        token,
        IMAGE,
        ipb::DiskFormat::Qcow2,
        &dir.join("root.qcow2"),
        props,
    )
    .await?;
    let reused = !(k_new || r_new || i_new);
    Ok(format!(
        "  image     {IMAGE} ({root}; kernel {kernel}, ramdisk {ramdisk}){}",
        if reused { " (reused)" } else { "" }
    ))
}
