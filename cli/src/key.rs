//! `cirrus key list|rotate`: identity's token signing keys.

use clap::Subcommand;
use proto::identity::v1 as pb;

use crate::output::Record;
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// List the signing keys' public halves.
    List,
    /// Promote the staged key to primary and stage a new one.
    Rotate,
}

impl Record for pb::SigningKey {
    const COLUMNS: &'static [&'static str] = &["Key ID", "State"];
    fn values(&self) -> Vec<String> {
        let state = pb::KeyState::try_from(self.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        vec![
            self.key_id.clone(),
            state.trim_start_matches("KEY_STATE_").to_lowercase(),
        ]
    }
}

pub async fn run(cmd: KeyCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let s = ctx.session().await?;
    let keys = match cmd {
        KeyCmd::List => {
            let req = s.req(pb::ListSigningKeysRequest {});
            s.tokens().list_signing_keys(req).await?.into_inner().keys
        }
        KeyCmd::Rotate => {
            let req = s.req(pb::RotateKeysRequest {});
            s.tokens().rotate_keys(req).await?.into_inner().keys
        }
    };
    ctx.out.list(&keys)
}
