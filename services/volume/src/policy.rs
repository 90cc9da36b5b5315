//! Who may do what with a volume. The sidecar enforces the mesh policy per
//! method (`sidecar/policy/volume.toml`) in front of the service; these are
//! the volume rules proper, applied in every service method. The table of
//! rules per RPC is in this crate's README.
//!
//! Roles: `reader` may look; `member` (or `admin`) may also create and
//! change its project's volumes, snapshots and attachments; a cloud
//! administrator (`x-cirrus-is-admin: true`) may do anything, and alone may
//! set quotas and list other projects' volumes. Something of another
//! project is `NOT_FOUND` (it does not leak); something the caller sees but
//! may not change is `PERMISSION_DENIED`.
//!
//! Compute agents: the verified peer `spiffe://<trust
//! domain>/svc/compute-agent/host/<h>` (set by the sidecar from the client
//! certificate, in `x-cirrus-peer`) names the host the agent speaks for.
//! An agent acts on attachments *on its host* only — those whose connector
//! names `<h>`, or, still without one, that the agent of `<h>` made — with
//! the user's token passed along (then the user's rules apply as well) or,
//! when it has none (healing, a delete after the token expired), on its
//! certificate alone. Whatever connector it gives must name its own host.

pub use runtime::caller::Caller;
use runtime::error::{Error, Result};

const WRITE_ROLES: [&str; 2] = ["member", "admin"];
const READ_ROLES: [&str; 3] = ["reader", "member", "admin"];

/// Every request must come through the sidecar with a verified user.
pub fn authenticated(c: &Caller) -> Result<()> {
    if c.is_authenticated() {
        Ok(())
    } else {
        Err(Error::unauthenticated(
            "no verified caller: requests reach the volume service through its sidecar",
        ))
    }
}

/// The host a compute agent speaks for, if the verified peer is one:
/// `spiffe://<trust_domain>/svc/compute-agent/host/<h>`, `<h>` a host name.
pub fn agent_host(c: &Caller, trust_domain: &str) -> Option<String> {
    let h = c
        .peer
        .as_deref()?
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix("/svc/compute-agent/host/")?;
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    ok.then(|| h.to_string())
}

/// A verified user, or a compute agent (on its certificate alone).
pub fn user_or_agent(c: &Caller, trust_domain: &str) -> Result<()> {
    if c.is_authenticated() || agent_host(c, trust_domain).is_some() {
        Ok(())
    } else {
        Err(Error::unauthenticated(
            "no verified caller and no compute agent peer: requests reach the volume service \
             through its sidecar",
        ))
    }
}

pub fn admin(c: &Caller) -> Result<()> {
    authenticated(c)?;
    if c.is_admin {
        Ok(())
    } else {
        Err(Error::forbidden("only an administrator may do this"))
    }
}

/// Looking at volumes at all: any of reader, member, admin.
pub fn reader(c: &Caller) -> Result<()> {
    authenticated(c)?;
    if c.is_admin || READ_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(())
    } else {
        Err(Error::forbidden(
            "the caller's roles do not allow reading volumes",
        ))
    }
}

/// Creating volumes: a member of a project; returns that project.
pub fn creator(c: &Caller) -> Result<&str> {
    authenticated(c)?;
    let project = c
        .project_id
        .as_deref()
        .ok_or_else(|| Error::forbidden("a project-scoped token is required"))?;
    if c.is_admin || WRITE_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(project)
    } else {
        Err(Error::forbidden(
            "the caller's roles do not allow changing volumes",
        ))
    }
}

/// Whether the caller may see something of `project`.
pub fn visible(c: &Caller, project: &str) -> bool {
    c.is_admin || c.project_id.as_deref() == Some(project)
}

/// Changing something of `project` (which the caller can see): a member of
/// that project, or an administrator.
pub fn modify(c: &Caller, project: &str) -> Result<()> {
    authenticated(c)?;
    if c.is_admin {
        return Ok(());
    }
    if c.project_id.as_deref() != Some(project) {
        return Err(Error::forbidden("only the owner project may change this"));
    }
    if WRITE_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(())
    } else {
        Err(Error::forbidden(
            "the caller's roles do not allow changing volumes",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(project: &str, roles: &[&str], admin: bool) -> Caller {
        Caller {
            user_id: Some("u".into()),
            project_id: Some(project.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            is_admin: admin,
            ..Default::default()
        }
    }

    #[test]
    fn rules() {
        let reader_p = caller("p", &["reader"], false);
        let member_p = caller("p", &["member", "reader"], false);
        let member_q = caller("q", &["member"], false);
        let admin = caller("a", &["admin"], true);
        assert!(authenticated(&Caller::default()).is_err());
        assert!(reader(&caller("p", &[], false)).is_err());
        assert!(creator(&reader_p).is_err());
        assert_eq!(creator(&member_p).ok(), Some("p"));
        assert!(visible(&reader_p, "p"));
        assert!(!visible(&member_q, "p"));
        assert!(visible(&admin, "p"));
        assert!(modify(&reader_p, "p").is_err());
        assert!(modify(&member_p, "p").is_ok());
        assert!(modify(&member_q, "p").is_err());
        assert!(modify(&admin, "p").is_ok());
        assert!(super::admin(&member_p).is_err());
    }

    #[test]
    fn only_a_compute_agent_s_spiffe_id_names_a_host() {
        let peer = |p: &str| Caller {
            peer: Some(p.into()),
            ..Default::default()
        };
        let host = |p: &str| agent_host(&peer(p), "cirrus.local");
        assert_eq!(
            host("spiffe://cirrus.local/svc/compute-agent/host/h1").as_deref(),
            Some("h1")
        );
        for bad in [
            "spiffe://cirrus.local/svc/compute-agent/host/",
            "spiffe://cirrus.local/svc/compute-agent/host/h1/x",
            "spiffe://other.domain/svc/compute-agent/host/h1",
            "spiffe://cirrus.local/svc/network-agent/host/h1",
            "spiffe://cirrus.local/svc/compute-agent",
            "external",
        ] {
            assert_eq!(host(bad), None, "{bad}");
        }
        assert!(user_or_agent(&peer("external"), "cirrus.local").is_err());
        assert!(
            user_or_agent(
                &peer("spiffe://cirrus.local/svc/compute-agent/host/h1"),
                "cirrus.local"
            )
            .is_ok()
        );
    }
}
