//! The verified caller of a request, as the sidecar tells a service.
//!
//! A service never parses tokens itself: its sidecar verifies the bearer
//! token and the peer certificate, removes any `x-cirrus-*` header the
//! client sent, and sets these trusted headers before forwarding on loopback.

use tonic::metadata::MetadataMap;

/// User id from the verified token.
pub const USER_ID: &str = "x-cirrus-user-id";
/// User name from the verified token.
pub const USER_NAME: &str = "x-cirrus-user-name";
/// Project id the token is scoped to (absent for other scopes).
pub const PROJECT_ID: &str = "x-cirrus-project-id";
/// Comma-separated role names, already expanded through implied roles.
pub const ROLES: &str = "x-cirrus-roles";
/// The token's audit id.
pub const AUDIT_ID: &str = "x-cirrus-audit-id";
/// `true` when the token belongs to a cloud administrator.
pub const IS_ADMIN: &str = "x-cirrus-is-admin";
/// The caller's SPIFFE id from its client certificate, or `external` on the public listener.
pub const PEER: &str = "x-cirrus-peer";

/// Every trusted header; the sidecar strips all of them from inbound requests.
pub const ALL: [&str; 7] = [
    USER_ID, USER_NAME, PROJECT_ID, ROLES, AUDIT_ID, IS_ADMIN, PEER,
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    pub project_id: Option<String>,
    pub roles: Vec<String>,
    pub audit_id: Option<String>,
    pub is_admin: bool,
    pub peer: Option<String>,
}

impl Caller {
    /// Reads the trusted headers. Only meaningful behind a sidecar, which
    /// guarantees that these headers were set by it and not by the client.
    pub fn from_metadata(m: &MetadataMap) -> Self {
        let get = |k: &str| {
            m.get(k)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Self {
            user_id: get(USER_ID),
            user_name: get(USER_NAME),
            project_id: get(PROJECT_ID),
            roles: get(ROLES)
                .map(|r| {
                    r.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            audit_id: get(AUDIT_ID),
            is_admin: get(IS_ADMIN).is_some_and(|v| v == "true"),
            peer: get(PEER),
        }
    }

    /// Writes the headers (what the sidecar does, and what tests do to act as it).
    pub fn to_metadata(&self, m: &mut MetadataMap) {
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = v.parse() {
                m.insert(k, v);
            }
        };
        if let Some(v) = &self.user_id {
            put(USER_ID, v);
        }
        if let Some(v) = &self.user_name {
            put(USER_NAME, v);
        }
        if let Some(v) = &self.project_id {
            put(PROJECT_ID, v);
        }
        if !self.roles.is_empty() {
            put(ROLES, &self.roles.join(","));
        }
        if let Some(v) = &self.audit_id {
            put(AUDIT_ID, v);
        }
        put(IS_ADMIN, if self.is_admin { "true" } else { "false" });
        if let Some(v) = &self.peer {
            put(PEER, v);
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn is_authenticated(&self) -> bool {
        self.user_id.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_metadata() {
        let c = Caller {
            user_id: Some("u".into()),
            user_name: Some("alice".into()),
            project_id: Some("p".into()),
            roles: vec!["member".into(), "reader".into()],
            audit_id: Some("a".into()),
            is_admin: false,
            peer: Some("spiffe://cirrus.local/svc/compute-agent/host/h1".into()),
        };
        let mut m = MetadataMap::new();
        c.to_metadata(&mut m);
        assert_eq!(Caller::from_metadata(&m), c);
        assert!(c.has_role("reader"));
        assert!(!Caller::from_metadata(&MetadataMap::new()).is_authenticated());
    }
}
