//! Who may publish to and consume from which topics, inside the queue.
//!
//! The sidecar enforces the mesh policy in front of the service; these
//! checks stay as defence in depth (and the table below is what the
//! sidecar's policy file should say; see the README). The caller is what the
//! sidecar put in the trusted `x-cirrus-*` headers: its SPIFFE id in
//! `x-cirrus-peer`, and `x-cirrus-is-admin` for a cloud administrator's token.
//!
//! A request with no `x-cirrus-peer` did not come through a sidecar (the
//! sidecar always sets it). It is refused with `UNAUTHENTICATED` unless the
//! operator set `trust_direct_callers`, for development and tests on a
//! loopback-only listener, in which case it is treated as an administrator.

use runtime::caller::Caller;

use crate::model::DLQ_SUFFIX;
use runtime::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Consume,
    /// Create a topic: administrators, and services that may publish to or consume it.
    Create,
    /// Delete a topic: administrators only.
    Delete,
    /// List topics, read stats: administrators and any service of the mesh.
    Read,
}

/// One rule of the policy. In a pattern, `{host}` matches one name segment
/// without dots, `{any}` matches the rest of the name (one or more segments).
/// In a principal, `*` is any service of the trust domain and
/// `<service>@{host}` is that service on the host the pattern matched.
pub struct Rule {
    pub pattern: &'static str,
    pub publishers: &'static [&'static str],
    pub consumers: &'static [&'static str],
}

/// The policy table (mirrored in the README).
pub const RULES: &[Rule] = &[
    // Casts to one compute host: build, reboot, delete, ...
    Rule {
        pattern: "compute.{host}",
        publishers: &["scheduler", "conductor", "compute-api"],
        consumers: &["compute-agent@{host}"],
    },
    // Casts to the scheduler and the conductor.
    Rule {
        pattern: "scheduler",
        publishers: &["compute-api", "conductor"],
        consumers: &["scheduler"],
    },
    Rule {
        pattern: "conductor",
        publishers: &["compute-api", "scheduler", "compute-agent"],
        consumers: &["conductor"],
    },
    // Port status changes ("vif plugged"): only network emits them; the
    // compute agents of every host wait on them, the API may watch them.
    Rule {
        pattern: "network.port",
        publishers: &["network"],
        consumers: &["compute-agent", "compute-api", "conductor"],
    },
    // Server state changes: written by the compute control plane, read by any
    // service (WatchServer, metering later).
    Rule {
        pattern: "compute.server",
        publishers: &["compute-api", "conductor"],
        consumers: &["*"],
    },
    // Notifications: any service emits, any service listens.
    Rule {
        pattern: "notifications.{any}",
        publishers: &["*"],
        consumers: &["*"],
    },
];

/// A caller as the queue sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An administrator's token, or a trusted direct call.
    Admin,
    /// A workload of the mesh, from its SPIFFE id.
    Service { name: String, host: Option<String> },
    /// Anything else: a user without admin, a peer of another trust domain.
    Other,
}

/// Turns the sidecar's headers into a principal.
pub fn principal(c: &Caller, trust_domain: &str, trust_direct: bool) -> Result<Principal> {
    if c.is_admin {
        return Ok(Principal::Admin);
    }
    let Some(peer) = c.peer.as_deref() else {
        return if trust_direct {
            Ok(Principal::Admin)
        } else {
            Err(Error::unauthenticated(
                "no verified caller: call the queue through its sidecar",
            ))
        };
    };
    Ok(parse_spiffe(peer, trust_domain).unwrap_or(Principal::Other))
}

/// `spiffe://<domain>/svc/<service>[/host/<host>]`.
fn parse_spiffe(id: &str, trust_domain: &str) -> Option<Principal> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?;
    let parts: Vec<&str> = rest.strip_prefix("/svc/")?.split('/').collect();
    match parts.as_slice() {
        [name] if !name.is_empty() => Some(Principal::Service {
            name: (*name).to_string(),
            host: None,
        }),
        [name, "host", host] if !name.is_empty() && !host.is_empty() => Some(Principal::Service {
            name: (*name).to_string(),
            host: Some((*host).to_string()),
        }),
        _ => None,
    }
}

fn denied(action: Action, topic: &str) -> Error {
    let verb = match action {
        Action::Publish => "publish to",
        Action::Consume => "consume from",
        Action::Create => "create",
        Action::Delete => "delete",
        Action::Read => "read",
    };
    Error::forbidden(format!("the caller may not {verb} topic {topic:?}"))
}

/// Matches `topic` against a pattern; returns the `{host}` capture if any.
fn matches(pattern: &str, topic: &str) -> Option<Option<String>> {
    if let Some(prefix) = pattern.strip_suffix("{host}") {
        let host = topic.strip_prefix(prefix)?;
        return (!host.is_empty() && !host.contains('.')).then(|| Some(host.to_string()));
    }
    if let Some(prefix) = pattern.strip_suffix("{any}") {
        let rest = topic.strip_prefix(prefix)?;
        return (!rest.is_empty()).then_some(None);
    }
    (pattern == topic).then_some(None)
}

fn admits(principals: &[&str], name: &str, host: Option<&str>, captured: Option<&str>) -> bool {
    principals.iter().any(|p| {
        if *p == "*" {
            return true;
        }
        match p.split_once('@') {
            Some((svc, "{host}")) => svc == name && host.is_some() && host == captured,
            Some(_) => false,
            None => *p == name,
        }
    })
}

/// Whether `who` may do `action` on `topic` (for `Read`, `topic` may be empty).
pub fn authorize(who: &Principal, action: Action, topic: &str) -> Result<()> {
    let (name, host) = match who {
        Principal::Admin => return Ok(()),
        Principal::Other => return Err(denied(action, topic)),
        Principal::Service { name, host } => (name.as_str(), host.as_deref()),
    };
    // A dead-letter topic is read by those who consume its parent; only the
    // queue itself writes to it.
    let (base, dead_letter) = match topic.strip_suffix(DLQ_SUFFIX) {
        Some(base) => (base, true),
        None => (topic, false),
    };
    let may = |wanted: Action| {
        RULES.iter().any(|r| {
            matches(r.pattern, base).is_some_and(|captured| {
                let set = match wanted {
                    Action::Publish => r.publishers,
                    _ => r.consumers,
                };
                admits(set, name, host, captured.as_deref())
            })
        })
    };
    let ok = match action {
        Action::Read => true,
        Action::Delete => false,
        Action::Publish => !dead_letter && may(Action::Publish),
        Action::Consume => may(Action::Consume),
        Action::Create => !dead_letter && (may(Action::Publish) || may(Action::Consume)),
    };
    if ok {
        Ok(())
    } else {
        Err(denied(action, topic))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn svc(id: &str) -> Principal {
        let c = Caller {
            peer: Some(id.into()),
            ..Caller::default()
        };
        principal(&c, "cirrus.local", false).unwrap()
    }

    #[test]
    fn compute_topics_follow_the_host() {
        let sched = svc("spiffe://cirrus.local/svc/scheduler");
        let h1 = svc("spiffe://cirrus.local/svc/compute-agent/host/h1");
        let h2 = svc("spiffe://cirrus.local/svc/compute-agent/host/h2");
        assert!(authorize(&sched, Action::Publish, "compute.h1").is_ok());
        assert!(authorize(&sched, Action::Consume, "compute.h1").is_err());
        assert!(authorize(&h1, Action::Consume, "compute.h1").is_ok());
        assert!(authorize(&h1, Action::Consume, "compute.h1.dlq").is_ok());
        assert!(authorize(&h1, Action::Create, "compute.h1").is_ok());
        assert!(authorize(&h2, Action::Consume, "compute.h1").is_err());
        assert!(authorize(&h1, Action::Publish, "compute.h1").is_err());
        assert!(authorize(&sched, Action::Publish, "compute.h1.dlq").is_err());
        assert!(authorize(&sched, Action::Publish, "compute.a.b").is_err());
        assert!(authorize(&sched, Action::Delete, "compute.h1").is_err());
        assert!(authorize(&h1, Action::Publish, "conductor").is_ok());
        let api = svc("spiffe://cirrus.local/svc/compute-api");
        assert!(
            authorize(&api, Action::Publish, "compute.h1").is_ok(),
            "actions on placed servers"
        );
        assert!(authorize(&api, Action::Consume, "compute.h1").is_err());
    }

    #[test]
    fn port_events_come_only_from_network_and_reach_every_compute_host() {
        let network = svc("spiffe://cirrus.local/svc/network");
        let h1 = svc("spiffe://cirrus.local/svc/compute-agent/host/h1");
        let agent = svc("spiffe://cirrus.local/svc/network-agent/host/h1");
        assert!(authorize(&network, Action::Publish, "network.port").is_ok());
        assert!(authorize(&h1, Action::Consume, "network.port").is_ok());
        assert!(authorize(&h1, Action::Publish, "network.port").is_err());
        assert!(authorize(&agent, Action::Publish, "network.port").is_err());
        let conductor = svc("spiffe://cirrus.local/svc/conductor");
        assert!(authorize(&conductor, Action::Publish, "compute.server").is_ok());
        assert!(authorize(&h1, Action::Publish, "compute.server").is_err());
        assert!(authorize(&h1, Action::Consume, "compute.server").is_ok());
    }

    #[test]
    fn notifications_are_open_to_the_mesh_only() {
        let any = svc("spiffe://cirrus.local/svc/image");
        assert!(authorize(&any, Action::Publish, "notifications.info").is_ok());
        assert!(authorize(&any, Action::Consume, "notifications.error").is_ok());
        assert!(authorize(&any, Action::Publish, "notifications").is_err());
        let foreign = svc("spiffe://evil.example/svc/image");
        assert_eq!(foreign, Principal::Other);
        assert!(authorize(&foreign, Action::Publish, "notifications.info").is_err());
        assert!(authorize(&foreign, Action::Read, "").is_err());
        assert_eq!(svc("external"), Principal::Other);
        assert_eq!(svc("spiffe://cirrus.local/svc/"), Principal::Other);
    }

    #[test]
    fn direct_callers_need_trust_and_admins_pass() {
        let none = Caller::default();
        let e = principal(&none, "cirrus.local", false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            principal(&none, "cirrus.local", true).unwrap(),
            Principal::Admin
        );
        let admin = Caller {
            is_admin: true,
            peer: Some("external".into()),
            ..Caller::default()
        };
        let p = principal(&admin, "cirrus.local", false).unwrap();
        assert!(authorize(&p, Action::Delete, "anything").is_ok());
    }
}
