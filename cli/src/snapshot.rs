//! `cirrus snapshot create|list|delete` (volume.v1 `Volumes`).

use clap::Subcommand;
use proto::volume::v1 as pb;

use crate::api::{Api, VOLUME, enum_name, pick};
use crate::common::{is_id, ts};
use crate::output::record;
use crate::session::Ctx;
use crate::volume::{client, find as find_volume};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    Create {
        name: String,
        /// The volume (name or id).
        #[arg(long)]
        volume: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Also of an in-use volume (crash-consistent at best).
        #[arg(long)]
        force: bool,
        /// Answer once the snapshot is available (or in error).
        #[arg(long)]
        wait: bool,
    },
    List {
        /// Only this volume's (name or id).
        #[arg(long)]
        volume: Option<String>,
    },
    Delete {
        snapshot: String,
    },
}

fn status(s: i32) -> String {
    pb::SnapshotStatus::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "SNAPSHOT_STATUS_"))
        .unwrap_or_default()
}

record!(pb::Snapshot, |s| {
    "ID": s.id, "Name": s.name, "Volume ID": s.volume_id, "Status": status(s.status),
    "Size": s.size_gb, "Description": s.description, "Status Reason": s.status_reason,
    "Project ID": s.project_id, "Created At": ts(s.created_at),
});

async fn list(api: &Api, volume_id: String) -> anyhow::Result<Vec<pb::Snapshot>> {
    let mut all = Vec::new();
    let mut marker = String::new();
    loop {
        let r = api.req(pb::ListSnapshotsRequest {
            volume_id: volume_id.clone(),
            status: 0,
            marker: marker.clone(),
            limit: 1000,
        });
        let page = client(api).list_snapshots(r).await?.into_inner();
        all.extend(page.snapshots);
        if page.next_marker.is_empty() || page.next_marker == marker {
            return Ok(all);
        }
        marker = page.next_marker;
    }
}

/// A snapshot by id or name.
pub async fn find(api: &Api, snapshot: &str) -> anyhow::Result<pb::Snapshot> {
    if is_id(snapshot) {
        let r = api.req(pb::GetSnapshotRequest {
            id: snapshot.into(),
        });
        return Ok(client(api).get_snapshot(r).await?.into_inner());
    }
    let all = list(api, String::new()).await?;
    pick("snapshot", snapshot, all, |s| &s.id, |s| &s.name)
}

pub async fn run(cmd: SnapshotCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, VOLUME).await?;
    let mut c = client(&api);
    match cmd {
        SnapshotCmd::Create {
            name,
            volume,
            description,
            force,
            wait,
        } => {
            let mut r = api.req(pb::CreateSnapshotRequest {
                volume_id: find_volume(&api, &volume).await?.id,
                name,
                description,
                metadata: Default::default(),
                force,
                wait,
            });
            if wait {
                r.set_timeout(std::time::Duration::from_secs(600));
            }
            let s = c.create_snapshot(r).await?.into_inner();
            ctx.out.one(&s)?;
            if wait && s.status == pb::SnapshotStatus::Error as i32 {
                anyhow::bail!("snapshot {} is in error: {}", s.name, s.status_reason);
            }
            Ok(())
        }
        SnapshotCmd::List { volume } => {
            let volume_id = match volume {
                Some(v) => find_volume(&api, &v).await?.id,
                None => String::new(),
            };
            ctx.out.list(&list(&api, volume_id).await?)
        }
        SnapshotCmd::Delete { snapshot } => {
            let id = find(&api, &snapshot).await?.id;
            c.delete_snapshot(api.req(pb::DeleteSnapshotRequest { id }))
                .await?;
            ctx.out.done(&format!("deleted snapshot {snapshot}"));
            Ok(())
        }
    }
}
