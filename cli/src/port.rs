//! `cirrus port create|list|show|delete` (network.v1 `Networks`).

use clap::Subcommand;
use proto::network::v1 as pb;

use crate::api::{Api, NETWORK, enum_name, join, pick};
use crate::common::is_id;
use crate::network::{client, find as find_network};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum PortCmd {
    Create {
        name: String,
        /// The network (name or id).
        #[arg(long)]
        network: String,
        /// The subnet of the port's address (name or id; default: the network's first).
        #[arg(long)]
        subnet: Option<String>,
        /// A fixed address (default: any free one).
        #[arg(long)]
        ip_address: Option<String>,
        #[arg(long)]
        mac_address: Option<String>,
        /// Security groups, names or ids (repeatable; default: the project's `default`).
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        #[arg(long)]
        disable: bool,
    },
    List {
        /// Only this network's (name or id).
        #[arg(long)]
        network: Option<String>,
        /// Only this device's (e.g. a server id).
        #[arg(long)]
        device_id: Option<String>,
    },
    Show {
        port: String,
    },
    Delete {
        port: String,
    },
}

fn ips(p: &pb::Port) -> String {
    join(p.fixed_ips.iter().map(|f| f.ip_address.as_str()))
}

fn vif(p: &pb::Port) -> String {
    p.binding
        .as_ref()
        .and_then(|b| pb::VifType::try_from(b.vif_type).ok())
        .map(|v| enum_name(v.as_str_name(), "VIF_TYPE_"))
        .unwrap_or_default()
}

record!(pb::Port, |p| {
    "ID": p.id, "Name": p.name, "MAC Address": p.mac_address, "Fixed IP Addresses": ips(p),
    "Status": p.status, "Network ID": p.network_id, "Device ID": p.device_id,
    "Device Owner": p.device_owner, "Security Groups": join(&p.security_group_ids),
    "Binding Host": p.binding.as_ref().map(|b| b.host.clone()).unwrap_or_default(),
    "VIF Type": vif(p), "Admin State Up": p.admin_state_up, "Project ID": p.project_id,
    "Created At": p.created_at,
});

/// A port by id or name.
pub async fn find(api: &Api, port: &str) -> anyhow::Result<pb::Port> {
    if is_id(port) {
        let r = api.req(pb::GetRequest { id: port.into() });
        return Ok(client(api).get_port(r).await?.into_inner());
    }
    let r = api.req(pb::ListPortsRequest::default());
    let list = client(api).list_ports(r).await?.into_inner().ports;
    pick("port", port, list, |p| &p.id, |p| &p.name)
}

pub async fn run(cmd: PortCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, NETWORK).await?;
    let mut c = client(&api);
    match cmd {
        PortCmd::Create {
            name,
            network,
            subnet,
            ip_address,
            mac_address,
            security_groups,
            disable,
        } => {
            let fixed_ips = if subnet.is_some() || ip_address.is_some() {
                let subnet_id = match subnet {
                    Some(s) => crate::subnet::find(&api, &s).await?.id,
                    None => String::new(),
                };
                vec![pb::FixedIpRequest {
                    subnet_id,
                    ip_address: ip_address.unwrap_or_default(),
                }]
            } else {
                vec![]
            };
            let r = api.req(pb::CreatePortRequest {
                network_id: find_network(&api, &network).await?.id,
                name,
                mac_address: mac_address.unwrap_or_default(),
                fixed_ips,
                security_groups,
                admin_state_up: Some(!disable),
                ..Default::default()
            });
            ctx.out.one(&c.create_port(r).await?.into_inner())
        }
        PortCmd::List { network, device_id } => {
            let network_id = match network {
                Some(n) => find_network(&api, &n).await?.id,
                None => String::new(),
            };
            let r = api.req(pb::ListPortsRequest {
                network_id,
                device_id: device_id.unwrap_or_default(),
                all_projects: false,
            });
            ctx.out.list(&c.list_ports(r).await?.into_inner().ports)
        }
        PortCmd::Show { port } => ctx.out.one(&find(&api, &port).await?),
        PortCmd::Delete { port } => {
            let id = find(&api, &port).await?.id;
            c.delete_port(api.req(pb::DeleteRequest { id })).await?;
            ctx.out.done(&format!("deleted port {port}"));
            Ok(())
        }
    }
}
