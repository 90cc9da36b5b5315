//! `cirrus volume create|list|show|delete|extend` (volume.v1 `Volumes`).

use clap::Subcommand;
use proto::volume::v1 as pb;
use proto::volume::v1::volumes_client::VolumesClient;
use tonic::transport::Channel;

use crate::api::{Api, VOLUME, enum_name, image_id, pick};
use crate::common::{is_id, ts};
use crate::output::record;
use crate::session::Ctx;

/// How long `--wait` waits for a volume or snapshot to leave `creating`.
const WAIT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Subcommand)]
pub enum VolumeCmd {
    Create {
        name: String,
        /// Size in GiB (default: the image's or snapshot's).
        #[arg(long)]
        size: Option<u64>,
        /// Fill it from this image (name or id); the volume is bootable.
        #[arg(long, conflicts_with = "snapshot")]
        image: Option<String>,
        /// Fill it from this snapshot (name or id).
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        bootable: bool,
        /// KEY=VALUE (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
        /// Answer once the volume is available (or in error).
        #[arg(long)]
        wait: bool,
    },
    List {
        /// Only volumes in this status (e.g. available, in-use).
        #[arg(long)]
        status: Option<String>,
    },
    Show {
        volume: String,
    },
    Delete {
        volume: String,
    },
    /// Grows a volume.
    Extend {
        volume: String,
        /// The new size in GiB.
        #[arg(long)]
        size: u64,
    },
}

pub fn status(s: i32) -> String {
    pb::VolumeStatus::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "VOLUME_STATUS_"))
        .unwrap_or_default()
}

fn format(f: i32) -> String {
    pb::VolumeFormat::try_from(f)
        .map(|f| enum_name(f.as_str_name(), "VOLUME_FORMAT_"))
        .unwrap_or_default()
}

fn metadata(m: &std::collections::HashMap<String, String>) -> String {
    let mut kv: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    kv.join(", ")
}

record!(pb::Volume, |v| {
    "ID": v.id, "Name": v.name, "Status": status(v.status), "Size": v.size_gb,
    "Bootable": v.bootable, "Attachment ID": v.attachment_id, "Format": format(v.format),
    "Source Image ID": v.source_image_id, "Source Snapshot ID": v.source_snapshot_id,
    "Description": v.description, "Properties": metadata(&v.metadata),
    "Status Reason": v.status_reason, "Project ID": v.project_id,
    "Created At": ts(v.created_at), "Updated At": ts(v.updated_at),
});

pub fn client(api: &Api) -> VolumesClient<Channel> {
    VolumesClient::new(api.ch.clone())
}

/// A volume by id or name.
pub async fn find(api: &Api, volume: &str) -> anyhow::Result<pb::Volume> {
    if is_id(volume) {
        let r = api.req(pb::GetVolumeRequest { id: volume.into() });
        return Ok(client(api).get_volume(r).await?.into_inner());
    }
    let r = api.req(pb::ListVolumesRequest {
        name: Some(volume.into()),
        limit: 1000,
        ..Default::default()
    });
    let list = client(api).list_volumes(r).await?.into_inner().volumes;
    pick("volume", volume, list, |v| &v.id, |v| &v.name)
}

fn parse_status(s: &str) -> anyhow::Result<pb::VolumeStatus> {
    let name = format!("VOLUME_STATUS_{}", s.to_ascii_uppercase().replace('-', "_"));
    pb::VolumeStatus::from_str_name(&name)
        .ok_or_else(|| anyhow::anyhow!("no volume status {s:?} (available, in-use, error, ...)"))
}

pub async fn run(cmd: VolumeCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, VOLUME).await?;
    let mut c = client(&api);
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            image,
            snapshot,
            description,
            bootable,
            properties,
            wait,
        } => {
            let image_id = match image {
                Some(i) => image_id(&api, &i).await?,
                None => String::new(),
            };
            let snapshot_id = match snapshot {
                Some(s) => crate::snapshot::find(&api, &s).await?.id,
                None => String::new(),
            };
            if size.is_none() && image_id.is_empty() && snapshot_id.is_empty() {
                anyhow::bail!("--size is required for an empty volume");
            }
            let mut r = api.req(pb::CreateVolumeRequest {
                size_gb: size.unwrap_or(0),
                name,
                description,
                metadata: crate::api::pairs(&properties, "--property")?,
                format: 0,
                image_id,
                snapshot_id,
                bootable: bootable.then_some(true),
                wait,
            });
            if wait {
                r.set_timeout(WAIT);
            }
            let v = c.create_volume(r).await?.into_inner();
            ctx.out.one(&v)?;
            if wait && v.status == pb::VolumeStatus::Error as i32 {
                anyhow::bail!("volume {} is in error: {}", v.name, v.status_reason);
            }
            Ok(())
        }
        VolumeCmd::List { status } => {
            let status = match status {
                Some(s) => parse_status(&s)? as i32,
                None => 0,
            };
            // Every page.
            let mut all = Vec::new();
            let mut marker = String::new();
            loop {
                let r = api.req(pb::ListVolumesRequest {
                    status,
                    marker: marker.clone(),
                    limit: 1000,
                    ..Default::default()
                });
                let page = c.list_volumes(r).await?.into_inner();
                all.extend(page.volumes);
                if page.next_marker.is_empty() || page.next_marker == marker {
                    break;
                }
                marker = page.next_marker;
            }
            ctx.out.list(&all)
        }
        VolumeCmd::Show { volume } => ctx.out.one(&find(&api, &volume).await?),
        VolumeCmd::Delete { volume } => {
            let id = find(&api, &volume).await?.id;
            c.delete_volume(api.req(pb::DeleteVolumeRequest { id }))
                .await?;
            ctx.out.done(&format!("deleted volume {volume}"));
            Ok(())
        }
        VolumeCmd::Extend { volume, size } => {
            let r = api.req(pb::ExtendVolumeRequest {
                id: find(&api, &volume).await?.id,
                new_size_gb: size,
            });
            ctx.out.one(&c.extend_volume(r).await?.into_inner())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        let s = parse_status("in-use").unwrap();
        assert_eq!(status(s as i32), "in-use");
        assert!(parse_status("sleeping").is_err());
    }
}
