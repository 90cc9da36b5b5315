//! `cirrus server-group create|list|show|delete` (compute.v1 `ServerGroups`).

use clap::Subcommand;
use proto::compute::v1 as pb;
use proto::compute::v1::server_groups_client::ServerGroupsClient;

use crate::api::{Api, COMPUTE, join, pick};
use crate::common::is_id;
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum ServerGroupCmd {
    Create {
        name: String,
        /// affinity, anti-affinity, soft-affinity or soft-anti-affinity.
        #[arg(long, default_value = "affinity")]
        policy: String,
    },
    List,
    Show {
        group: String,
    },
    Delete {
        group: String,
    },
}

record!(pb::ServerGroup, |g| {
    "ID": g.id, "Name": g.name, "Policy": g.policy, "Members": join(&g.members),
    "Project ID": g.project_id,
});

/// A server group by id or name.
pub async fn find(api: &Api, group: &str) -> anyhow::Result<pb::ServerGroup> {
    let mut c = ServerGroupsClient::new(api.ch.clone());
    if is_id(group) {
        let r = api.req(pb::ServerGroupRef { id: group.into() });
        return Ok(c.get_server_group(r).await?.into_inner());
    }
    let r = api.req(pb::ListServerGroupsRequest {});
    let list = c.list_server_groups(r).await?.into_inner().server_groups;
    pick("server group", group, list, |g| &g.id, |g| &g.name)
}

pub async fn run(cmd: ServerGroupCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let mut c = ServerGroupsClient::new(api.ch.clone());
    match cmd {
        ServerGroupCmd::Create { name, policy } => {
            let r = api.req(pb::CreateServerGroupRequest { name, policy });
            ctx.out.one(&c.create_server_group(r).await?.into_inner())
        }
        ServerGroupCmd::List => {
            let r = api.req(pb::ListServerGroupsRequest {});
            let list = c.list_server_groups(r).await?.into_inner();
            ctx.out.list(&list.server_groups)
        }
        ServerGroupCmd::Show { group } => ctx.out.one(&find(&api, &group).await?),
        ServerGroupCmd::Delete { group } => {
            let id = find(&api, &group).await?.id;
            c.delete_server_group(api.req(pb::ServerGroupRef { id }))
                .await?;
            ctx.out.done(&format!("deleted server group {group}"));
            Ok(())
        }
    }
}
