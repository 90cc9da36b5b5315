//! `certs`: make the cluster CA and issue leaf certificates.
//!
//! ```text
//! certs init  --dir DIR                       # CA (ca.crt, ca.key, bundle.pem), once
//! certs issue --dir DIR --service NAME [--host H] [--dns N]... [--hours 24] [--renew]
//! certs user  --dir DIR --name NAME [--hours 24]
//! certs rotate-ca --dir DIR                   # new CA, old one kept in the bundle
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use time::Duration;

#[derive(Parser)]
#[command(
    name = "certs",
    version,
    about = "Cirrus PKI: cluster CA and SPIFFE leaf certificates"
)]
struct Cli {
    /// The PKI directory.
    #[arg(long, global = true, default_value = ".state/pki")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA if there is none.
    Init {
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a service certificate (<service>[-<host>].crt/.key).
    Issue {
        #[arg(long)]
        service: String,
        #[arg(long)]
        host: Option<String>,
        /// Extra DNS names (the service name and localhost are always included).
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long, default_value_t = 24)]
        hours: i64,
        /// Only if the current certificate has less than a third of its life left.
        #[arg(long)]
        renew: bool,
    },
    /// Issue an operator's client certificate (user-<name>.crt/.key).
    User {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 24)]
        hours: i64,
    },
    /// Make a new CA; the old one stays in bundle.pem until you remove it.
    RotateCa {
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = &cli.dir;
    match cli.cmd {
        Cmd::Init { days } => {
            if dir.join("ca.crt").exists() {
                println!("CA already exists in {}", dir.display());
            } else {
                certs::Authority::create("Cirrus cluster CA", Duration::days(days))?.save(dir)?;
                println!("created CA in {}", dir.display());
            }
        }
        Cmd::Issue {
            service,
            host,
            mut dns,
            hours,
            renew,
        } => {
            let name = match &host {
                Some(h) => format!("{service}-{h}"),
                None => service.clone(),
            };
            let validity = Duration::hours(hours);
            if renew && !certs::needs_renewal(&dir.join(format!("{name}.crt")), validity) {
                println!("{name}.crt is still fresh");
                return Ok(());
            }
            dns.extend([service.clone(), "localhost".into()]);
            let id = certs::service_id(&service, host.as_deref())?;
            let pair = certs::Authority::load(dir)?.issue(&id, &dns, validity)?;
            let (crt, _) = certs::write_pair(dir, &name, &pair)?;
            println!("issued {id} -> {}", crt.display());
        }
        Cmd::User { name, hours } => {
            let id = certs::user_id(&name)?;
            let pair = certs::Authority::load(dir)?.issue(&id, &[], Duration::hours(hours))?;
            let (crt, _) = certs::write_pair(dir, &format!("user-{name}"), &pair)?;
            println!("issued {id} -> {}", crt.display());
        }
        Cmd::RotateCa { days } => {
            let old = std::fs::read_to_string(dir.join("ca.crt"))?;
            certs::Authority::create("Cirrus cluster CA", Duration::days(days))?.save(dir)?;
            certs::add_to_bundle(dir, &old)?;
            println!("new CA in {}; bundle.pem trusts old and new", dir.display());
        }
    }
    Ok(())
}
