//! `cirrus host list|show|set` and `cirrus quota show` (compute.v1 `Hosts`,
//! `Quotas`).

use anyhow::bail;
use clap::Subcommand;
use proto::compute::v1 as pb;
use proto::compute::v1::hosts_client::HostsClient;
use proto::compute::v1::quotas_client::QuotasClient;

use crate::api::{Api, COMPUTE};
use crate::common::{Toggle, ts};
use crate::output::{View, record};
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum HostCmd {
    /// Compute hosts, their capacity and usage (admin only).
    List,
    Show {
        host: String,
    },
    /// Enables or disables scheduling onto a host (admin only).
    Set {
        host: String,
        #[command(flatten)]
        toggle: Toggle,
        /// Why it is disabled.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// A project's compute limits and usage (default: the token's project).
    Show {
        /// Project name or id (another project: admin only).
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
}

record!(pb::Host, |h| {
    "Name": h.name, "Enabled": h.enabled, "Up": h.up, "Zone": h.availability_zone,
    "VCPUs Used": format!("{}/{}", h.vcpus_used, h.vcpus),
    "RAM Used": format!("{}/{}", h.ram_mb_used, h.ram_mb),
    "Disk Used": format!("{}/{}", h.disk_gb_used, h.disk_gb),
    "Servers": h.servers, "Hypervisor": h.hypervisor_type, "Disabled Reason": h.disabled_reason,
    "Last Heartbeat": ts(h.last_heartbeat),
});

pub async fn host(cmd: HostCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let mut c = HostsClient::new(api.ch.clone());
    match cmd {
        HostCmd::List => {
            let r = api.req(pb::ListHostsRequest {});
            ctx.out.list(&c.list_hosts(r).await?.into_inner().hosts)
        }
        HostCmd::Show { host } => {
            let r = api.req(pb::HostRef { name: host });
            ctx.out.one(&c.get_host(r).await?.into_inner())
        }
        HostCmd::Set {
            host,
            toggle,
            reason,
        } => {
            let Some(enabled) = toggle.value() else {
                bail!("say --enable or --disable");
            };
            let r = api.req(pb::SetHostRequest {
                name: host,
                enabled,
                disabled_reason: reason,
            });
            ctx.out.one(&c.set_host(r).await?.into_inner())
        }
    }
}

pub async fn quota(cmd: QuotaCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let QuotaCmd::Show { project, domain } = cmd;
    let project_id = match project {
        Some(p) if crate::common::is_id(&p) => p,
        Some(p) => api.s.project(&p, &domain).await?.id,
        None => String::new(),
    };
    let r = api.req(pb::GetQuotaRequest { project_id });
    let q = QuotasClient::new(api.ch.clone())
        .get_quota(r)
        .await?
        .into_inner();
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    ctx.out.print(View::fields(vec![
        ("Project ID", q.project_id),
        ("Instances", l.instances.to_string()),
        ("Instances Used", u.instances.to_string()),
        ("Cores", l.cores.to_string()),
        ("Cores Used", u.cores.to_string()),
        ("RAM", l.ram_mb.to_string()),
        ("RAM Used", u.ram_mb.to_string()),
        ("Key Pairs", l.key_pairs.to_string()),
        ("Key Pairs Used", u.key_pairs.to_string()),
        ("Server Groups", l.server_groups.to_string()),
        ("Server Groups Used", u.server_groups.to_string()),
    ]))
}
