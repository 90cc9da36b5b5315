//! What the identity nouns share: name-or-id requests, the lookups that turn
//! a name into an id, the `--enable`/`--disable` pair, and timestamps.

use clap::Args;
use proto::identity::v1 as pb;

use crate::session::Session;

pub fn is_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

/// A get-by-id-or-name request; names of users and projects live in `domain`.
pub fn get(name_or_id: &str, domain: &str) -> pb::GetRequest {
    if is_id(name_or_id) {
        pb::GetRequest {
            id: name_or_id.into(),
            ..Default::default()
        }
    } else {
        pb::GetRequest {
            name: name_or_id.into(),
            domain_name: domain.into(),
            ..Default::default()
        }
    }
}

/// The delete request naming the same thing as [`get`].
pub fn delete(name_or_id: &str, domain: &str) -> pb::DeleteRequest {
    let g = get(name_or_id, domain);
    pb::DeleteRequest {
        id: g.id,
        name: g.name,
        domain_id: g.domain_id,
        domain_name: g.domain_name,
    }
}

/// `--enable` / `--disable`: neither leaves the flag as it is.
#[derive(Args, Debug, Clone, Copy)]
pub struct Toggle {
    #[arg(long)]
    enable: bool,
    #[arg(long, conflicts_with = "enable")]
    disable: bool,
}

impl Toggle {
    pub fn value(self) -> Option<bool> {
        match (self.enable, self.disable) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

/// RFC 3339, or empty for none.
pub fn ts(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Name → record lookups; each `*_id` answers `""` (no filter) for `None`.
impl Session {
    pub async fn user(&self, user: &str, domain: &str) -> anyhow::Result<pb::User> {
        Ok(self
            .users()
            .get_user(self.req(get(user, domain)))
            .await?
            .into_inner())
    }

    pub async fn project(&self, project: &str, domain: &str) -> anyhow::Result<pb::Project> {
        let r = self.req(get(project, domain));
        Ok(self.resources().get_project(r).await?.into_inner())
    }

    pub async fn domain(&self, domain: &str) -> anyhow::Result<pb::Domain> {
        let r = self.req(get(domain, ""));
        Ok(self.resources().get_domain(r).await?.into_inner())
    }

    pub async fn user_id(&self, user: Option<&str>, domain: &str) -> anyhow::Result<String> {
        Ok(match user {
            Some(u) => self.user(u, domain).await?.id,
            None => String::new(),
        })
    }

    pub async fn project_id(&self, project: Option<&str>, domain: &str) -> anyhow::Result<String> {
        Ok(match project {
            Some(p) => self.project(p, domain).await?.id,
            None => String::new(),
        })
    }

    pub async fn domain_id(&self, domain: Option<&str>) -> anyhow::Result<String> {
        Ok(match domain {
            Some(d) => self.domain(d).await?.id,
            None => String::new(),
        })
    }
}
