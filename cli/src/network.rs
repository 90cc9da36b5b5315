//! `cirrus network create|list|show|delete` (network.v1 `Networks`).

use clap::Subcommand;
use proto::network::v1 as pb;
use proto::network::v1::networks_client::NetworksClient;
use tonic::transport::Channel;

use crate::api::{Api, NETWORK, join, pick};
use crate::common::is_id;
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum NetworkCmd {
    Create {
        name: String,
        /// Visible to every project (admin only).
        #[arg(long)]
        share: bool,
        /// Administratively down.
        #[arg(long)]
        disable: bool,
        /// 0: the service's default.
        #[arg(long, default_value_t = 0)]
        mtu: u32,
    },
    List {
        /// Every project's (admin only).
        #[arg(long)]
        all_projects: bool,
    },
    Show {
        network: String,
    },
    Delete {
        network: String,
    },
}

record!(pb::Network, |n| {
    "ID": n.id, "Name": n.name, "Status": n.status, "Subnets": join(&n.subnet_ids),
    "Project ID": n.project_id, "Shared": n.shared, "Admin State Up": n.admin_state_up,
    "MTU": n.mtu, "Segmentation ID": n.segmentation_id, "Created At": n.created_at,
});

pub fn client(api: &Api) -> NetworksClient<Channel> {
    NetworksClient::new(api.ch.clone())
}

/// A network by id or name (the caller's own and shared ones).
pub async fn find(api: &Api, network: &str) -> anyhow::Result<pb::Network> {
    if is_id(network) {
        let r = api.req(pb::GetRequest { id: network.into() });
        return Ok(client(api).get_network(r).await?.into_inner());
    }
    let r = api.req(pb::ListRequest::default());
    let list = client(api).list_networks(r).await?.into_inner().networks;
    pick("network", network, list, |n| &n.id, |n| &n.name)
}

pub async fn run(cmd: NetworkCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, NETWORK).await?;
    let mut c = client(&api);
    match cmd {
        NetworkCmd::Create {
            name,
            share,
            disable,
            mtu,
        } => {
            let r = api.req(pb::CreateNetworkRequest {
                name,
                shared: share,
                admin_state_up: Some(!disable),
                mtu,
                ..Default::default()
            });
            ctx.out.one(&c.create_network(r).await?.into_inner())
        }
        NetworkCmd::List { all_projects } => {
            let r = api.req(pb::ListRequest { all_projects });
            ctx.out
                .list(&c.list_networks(r).await?.into_inner().networks)
        }
        NetworkCmd::Show { network } => ctx.out.one(&find(&api, &network).await?),
        NetworkCmd::Delete { network } => {
            let id = find(&api, &network).await?.id;
            c.delete_network(api.req(pb::DeleteRequest { id })).await?;
            ctx.out.done(&format!("deleted network {network}"));
            Ok(())
        }
    }
}
