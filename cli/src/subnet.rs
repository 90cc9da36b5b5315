//! `cirrus subnet create|list|show|delete` (network.v1 `Networks`).

use clap::Subcommand;
use proto::network::v1 as pb;

use crate::api::{Api, NETWORK, join, pick};
use crate::common::is_id;
use crate::network::{client, find as find_network};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum SubnetCmd {
    Create {
        name: String,
        /// The network (name or id).
        #[arg(long)]
        network: String,
        /// The subnet's CIDR, e.g. 10.0.0.0/24.
        #[arg(long = "subnet-range")]
        cidr: String,
        /// The gateway address, or `none` (default: the first address).
        #[arg(long)]
        gateway: Option<String>,
        /// Pools as START-END (repeatable; default: the whole range).
        #[arg(long = "allocation-pool")]
        pools: Vec<String>,
        #[arg(long = "dns-nameserver")]
        dns: Vec<String>,
        #[arg(long)]
        no_dhcp: bool,
    },
    List {
        /// Only this network's (name or id).
        #[arg(long)]
        network: Option<String>,
    },
    Show {
        subnet: String,
    },
    Delete {
        subnet: String,
    },
}

fn pools(p: &[pb::AllocationPool]) -> String {
    join(p.iter().map(|p| format!("{}-{}", p.start, p.end)))
}

record!(pb::Subnet, |s| {
    "ID": s.id, "Name": s.name, "Network ID": s.network_id, "Subnet": s.cidr,
    "Gateway IP": s.gateway_ip, "Allocation Pools": pools(&s.allocation_pools),
    "DNS Nameservers": join(&s.dns_nameservers), "Enable DHCP": s.enable_dhcp,
    "Project ID": s.project_id, "Created At": s.created_at,
});

/// A subnet by id or name.
pub async fn find(api: &Api, subnet: &str) -> anyhow::Result<pb::Subnet> {
    if is_id(subnet) {
        let r = api.req(pb::GetRequest { id: subnet.into() });
        return Ok(client(api).get_subnet(r).await?.into_inner());
    }
    let r = api.req(pb::ListSubnetsRequest::default());
    let list = client(api).list_subnets(r).await?.into_inner().subnets;
    pick("subnet", subnet, list, |s| &s.id, |s| &s.name)
}

pub async fn run(cmd: SubnetCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, NETWORK).await?;
    let mut c = client(&api);
    match cmd {
        SubnetCmd::Create {
            name,
            network,
            cidr,
            gateway,
            pools,
            dns,
            no_dhcp,
        } => {
            let allocation_pools = pools
                .iter()
                .map(|p| match p.split_once('-') {
                    Some((start, end)) => Ok(pb::AllocationPool {
                        start: start.into(),
                        end: end.into(),
                    }),
                    None => anyhow::bail!("--allocation-pool must be START-END, not {p:?}"),
                })
                .collect::<anyhow::Result<_>>()?;
            let r = api.req(pb::CreateSubnetRequest {
                network_id: find_network(&api, &network).await?.id,
                name,
                ip_version: pb::IpVersion::IpVersion4 as i32,
                cidr,
                gateway_ip: gateway.map(|g| if g == "none" { String::new() } else { g }),
                allocation_pools,
                dns_nameservers: dns,
                host_routes: vec![],
                enable_dhcp: Some(!no_dhcp),
            });
            ctx.out.one(&c.create_subnet(r).await?.into_inner())
        }
        SubnetCmd::List { network } => {
            let network_id = match network {
                Some(n) => find_network(&api, &n).await?.id,
                None => String::new(),
            };
            let r = api.req(pb::ListSubnetsRequest { network_id });
            ctx.out.list(&c.list_subnets(r).await?.into_inner().subnets)
        }
        SubnetCmd::Show { subnet } => ctx.out.one(&find(&api, &subnet).await?),
        SubnetCmd::Delete { subnet } => {
            let id = find(&api, &subnet).await?.id;
            c.delete_subnet(api.req(pb::DeleteRequest { id })).await?;
            ctx.out.done(&format!("deleted subnet {subnet}"));
            Ok(())
        }
    }
}
