//! `cirrus keypair create|import|list|delete` (compute.v1 `KeyPairs`).
//! `create` has the service generate an Ed25519 pair: the private half is
//! in that one answer only, so it goes to `--private-key-file` (mode 0600)
//! or is printed.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use proto::compute::v1 as pb;
use proto::compute::v1::key_pairs_client::KeyPairsClient;

use crate::api::{Api, COMPUTE};
use crate::common::ts;
use crate::output::{Record, View, record};
use crate::session::{Ctx, write_private};

#[derive(Subcommand)]
pub enum KeypairCmd {
    /// Generates a pair; the private key is shown (or written) this once.
    Create {
        name: String,
        /// Write the private key here (mode 0600) instead of printing it.
        #[arg(long)]
        private_key_file: Option<PathBuf>,
    },
    /// Imports an OpenSSH public key.
    Import {
        name: String,
        /// The public key file (e.g. ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        public_key: PathBuf,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

record!(pb::KeyPair, |k| {
    "Name": k.name, "Type": k.r#type, "Fingerprint": k.fingerprint, "Public Key": k.public_key,
    "User ID": k.user_id,
    "Created At": ts(k.created_at),
});

pub async fn run(cmd: KeypairCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, COMPUTE).await?;
    let mut c = KeyPairsClient::new(api.ch.clone());
    match cmd {
        KeypairCmd::Create {
            name,
            private_key_file,
        } => {
            let r = api.req(pb::CreateKeyPairRequest {
                name,
                public_key: String::new(),
            });
            let k = c.create_key_pair(r).await?.into_inner();
            match private_key_file {
                Some(path) => {
                    write_private(&path, k.private_key.as_bytes())?;
                    ctx.out.one(&k)?;
                    ctx.out
                        .done(&format!("wrote the private key to {}", path.display()));
                    Ok(())
                }
                None => {
                    let mut pairs: Vec<(&str, String)> = pb::KeyPair::COLUMNS
                        .iter()
                        .copied()
                        .zip(k.values())
                        .collect();
                    pairs.push(("Private Key", k.private_key.clone()));
                    ctx.out.print(View::fields(pairs))
                }
            }
        }
        KeypairCmd::Import { name, public_key } => {
            let key = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let r = api.req(pb::CreateKeyPairRequest {
                name,
                public_key: key.trim().to_string(),
            });
            ctx.out.one(&c.create_key_pair(r).await?.into_inner())
        }
        KeypairCmd::List => {
            let r = api.req(pb::ListKeyPairsRequest {});
            ctx.out
                .list(&c.list_key_pairs(r).await?.into_inner().key_pairs)
        }
        KeypairCmd::Show { name } => {
            let r = api.req(pb::KeyPairRef { name });
            ctx.out.one(&c.get_key_pair(r).await?.into_inner())
        }
        KeypairCmd::Delete { name } => {
            c.delete_key_pair(api.req(pb::KeyPairRef { name: name.clone() }))
                .await?;
            ctx.out.done(&format!("deleted key pair {name}"));
            Ok(())
        }
    }
}
