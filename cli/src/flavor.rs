//! `cirrus flavor list|show|create|delete` (compute.v1 `Flavors`).

use clap::Subcommand;
use proto::compute::v1 as pb;
use proto::compute::v1::flavors_client::FlavorsClient;

use crate::api::{Api, COMPUTE, join};
use crate::output::record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum FlavorCmd {
    List,
    Show {
        flavor: String,
    },
    /// A new flavor (admin only).
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// RAM in MiB.
        #[arg(long, default_value_t = 256)]
        ram: u32,
        /// Root disk in GiB.
        #[arg(long, default_value_t = 0)]
        disk: u32,
        /// Ephemeral disk in GiB.
        #[arg(long, default_value_t = 0)]
        ephemeral: u32,
        /// Only for projects it is shared with.
        #[arg(long)]
        private: bool,
        /// Extra specs as KEY=VALUE (repeatable).
        #[arg(long = "property")]
        properties: Vec<String>,
    },
    Delete {
        flavor: String,
    },
}

fn specs(m: &std::collections::HashMap<String, String>) -> String {
    let mut kv: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    kv.sort();
    kv.join(", ")
}

record!(pb::Flavor, |f| {
    "ID": f.id, "Name": f.name, "VCPUs": f.vcpus, "RAM": f.ram_mb, "Disk": f.disk_gb,
    "Ephemeral": f.ephemeral_gb, "Is Public": f.is_public, "Properties": specs(&f.extra_specs),
    "Projects": join(&f.projects),
});

pub async fn run(cmd: FlavorCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let mut c = FlavorsClient::new(api.ch.clone());
    match cmd {
        FlavorCmd::List => {
            let r = api.req(pb::ListFlavorsRequest {});
            ctx.out.list(&c.list_flavors(r).await?.into_inner().flavors)
        }
        FlavorCmd::Show { flavor } => {
            let r = api.req(pb::FlavorRef { flavor });
            ctx.out.one(&c.get_flavor(r).await?.into_inner())
        }
        FlavorCmd::Create {
            name,
            vcpus,
            ram,
            disk,
            ephemeral,
            private,
            properties,
        } => {
            let r = api.req(pb::CreateFlavorRequest {
                name,
                vcpus,
                ram_mb: ram,
                disk_gb: disk,
                ephemeral_gb: ephemeral,
                extra_specs: crate::api::pairs(&properties, "--property")?,
                is_public: !private,
            });
            ctx.out.one(&c.create_flavor(r).await?.into_inner())
        }
        FlavorCmd::Delete { flavor } => {
            let r = api.req(pb::FlavorRef {
                flavor: flavor.clone(),
            });
            c.delete_flavor(r).await?;
            ctx.out.done(&format!("deleted flavor {flavor}"));
            Ok(())
        }
    }
}
