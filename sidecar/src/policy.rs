//! The mesh policy: which caller may call which gRPC method. One TOML file
//! per service (`sidecar/policy/<service>.toml`) lists rules; the first rule
//! naming a method exactly wins, else the first whose `Service/*` matches.
//! A method no rule names is refused (default deny).
//!
//! ```toml
//! [[rule]]
//! methods = ["identity.v1.Users/CreateUser"]
//! admin = true                      # a cloud admin's token
//!
//! [[rule]]
//! methods = ["conductor.v1.Conductor/*"]
//! token = "none"                    # no user token: the peer certificate decides
//! peers = ["spiffe://cirrus.local/svc/compute-agent/host/*", "spiffe://cirrus.local/svc/scheduler"]
//! internal_only = true              # never from the public listener
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use token::{Claims, Scope};

/// The default policy of every service, shipped with the sidecar; an
/// operator copies and edits one to override it (`cirrus up` writes them to
/// its state directory once and then leaves them alone).
pub const DEFAULTS: [(&str, &str); 8] = [
    ("identity", include_str!("../policy/identity.toml")),
    ("queue", include_str!("../policy/queue.toml")),
    ("image", include_str!("../policy/image.toml")),
    ("network", include_str!("../policy/network.toml")),
    ("volume", include_str!("../policy/volume.toml")),
    ("compute", include_str!("../policy/compute.toml")),
    ("scheduler", include_str!("../policy/scheduler.toml")),
    ("conductor", include_str!("../policy/conductor.toml")),
];

/// What the caller is, as the sidecar has verified it.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// The verified token's claims, if a valid token came with the call.
    pub claims: Option<&'a Claims>,
    /// The peer's SPIFFE id, or `external` on the public listener.
    pub peer: &'a str,
    /// Whether the call came in on the public listener.
    pub public: bool,
}

/// The peer identity of every caller on the public listener.
pub const EXTERNAL: &str = "external";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenRule {
    /// A valid token is required (the default).
    #[default]
    Required,
    /// No token is needed; one that is sent is still verified and passed on.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScopeRule {
    #[default]
    Any,
    Project,
    Domain,
    System,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `package.Service/Method`, or `package.Service/*`.
    pub methods: Vec<String>,
    #[serde(default)]
    pub token: TokenRule,
    /// The token must carry at least one of these roles (empty: any role, or none).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The token must be a cloud admin's (admin on the system or the admin project).
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub scope: ScopeRule,
    /// The caller's SPIFFE id must match one of these (`*` matches the rest);
    /// empty: any peer, `external` included.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Mesh peers matching one of these may call without a token.
    #[serde(default)]
    pub mesh: Vec<String>,
    /// Refused on the public listener.
    #[serde(default)]
    pub internal_only: bool,
    /// Largest request message in bytes, overriding the sidecar's default.
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// Deadline for the answer's headers in milliseconds, overriding the
    /// sidecar's default (a long client stream, such as an image upload,
    /// answers only at its end).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// Why a call was refused: no token (or a bad one) is `UNAUTHENTICATED`;
/// everything else is `PERMISSION_DENIED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    NoRule,
    InternalOnly,
    Peer,
    NeedsToken,
    Role,
    Admin,
    Scope,
}

impl Denial {
    /// The label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoRule => "no_rule",
            Denial::InternalOnly => "internal_only",
            Denial::Peer => "peer",
            Denial::NeedsToken => "no_token",
            Denial::Role => "role",
            Denial::Admin => "admin",
            Denial::Scope => "scope",
        }
    }

    pub fn message(&self, method: &str) -> String {
        match self {
            Denial::NoRule => format!("no policy allows {method} (default deny)"),
            Denial::InternalOnly => format!("{method} is internal only"),
            Denial::Peer => format!("this peer may not call {method}"),
            Denial::NeedsToken => "a valid bearer token is required".into(),
            Denial::Role => format!("the token's roles do not allow {method}"),
            Denial::Admin => format!("{method} needs a cloud administrator"),
            Denial::Scope => format!("the token's scope does not allow {method}"),
        }
    }

    pub fn is_unauthenticated(&self) -> bool {
        *self == Denial::NeedsToken
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {0}: {1}")]
    Read(String, std::io::Error),
    #[error("invalid policy {0}: {1}")]
    Parse(String, String),
}

/// `*` at the end of a pattern matches any rest; otherwise the match is exact.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => s.starts_with(prefix),
        None => pattern == s,
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::Read(path.display().to_string(), e))?;
        Self::parse(&text).map_err(|e| PolicyError::Parse(path.display().to_string(), e))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let p: Policy = toml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
        for r in &p.rules {
            for m in &r.methods {
                let ok = m
                    .split_once('/')
                    .is_some_and(|(svc, meth)| svc.contains('.') && !meth.is_empty());
                if !ok {
                    return Err(format!(
                        "method {m:?} is not package.Service/Method or package.Service/*"
                    ));
                }
            }
        }
        Ok(p)
    }

    /// The rule for `method` (`package.Service/Method`, no leading slash).
    pub fn rule(&self, method: &str) -> Option<(usize, &Rule)> {
        let exact = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.methods.iter().any(|m| m == method));
        exact.or_else(|| {
            self.rules.iter().enumerate().find(|(_, r)| {
                r.methods
                    .iter()
                    .any(|m| m.ends_with("/*") && glob(m, method))
            })
        })
    }

    /// Decides a call; on success returns the rule that allowed it.
    pub fn check(&self, method: &str, s: &Subject<'_>) -> Result<(usize, &Rule), Denial> {
        let (i, rule) = self.rule(method).ok_or(Denial::NoRule)?;
        if rule.internal_only && s.public {
            return Err(Denial::InternalOnly);
        }
        if !rule.peers.is_empty() && !rule.peers.iter().any(|p| glob(p, s.peer)) {
            return Err(Denial::Peer);
        }
        if !s.public && rule.mesh.iter().any(|p| glob(p, s.peer)) {
            return Ok((i, rule));
        }
        if rule.token == TokenRule::None {
            return Ok((i, rule));
        }
        let claims = s.claims.ok_or(Denial::NeedsToken)?;
        if rule.admin && !claims.is_cloud_admin() {
            return Err(Denial::Admin);
        }
        if !rule.roles.is_empty() && !rule.roles.iter().any(|r| claims.has_role(r)) {
            return Err(Denial::Role);
        }
        let scope_ok = match rule.scope {
            ScopeRule::Any => true,
            ScopeRule::Project => matches!(claims.scope, Some(Scope::Project { .. })),
            ScopeRule::Domain => matches!(claims.scope, Some(Scope::Domain { .. })),
            ScopeRule::System => matches!(claims.scope, Some(Scope::System)),
        };
        if !scope_ok {
            return Err(Denial::Scope);
        }
        Ok((i, rule))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    const POLICY: &str = r#"
[[rule]]
methods = ["identity.v1.Tokens/Authenticate"]
token = "none"

[[rule]]
methods = ["identity.v1.Tokens/Watch"]
mesh = ["spiffe://cirrus.local/svc/*"]
internal_only = true

[[rule]]
methods = ["identity.v1.Users/CreateUser"]
admin = true

[[rule]]
methods = ["compute.v1.Servers/*"]
roles = ["member"]
scope = "project"

[[rule]]
methods = ["conductor.v1.Conductor/*"]
token = "none"
peers = ["spiffe://cirrus.local/svc/compute-agent/host/*"]
internal_only = true
"#;

    fn claims(roles: &[&str], scope: Option<Scope>, admin_project: bool) -> Claims {
        let now = OffsetDateTime::now_utc();
        Claims {
            sub: "u".into(),
            user_name: "n".into(),
            user_domain_id: "d".into(),
            scope,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            iat: now,
            exp: now,
            audit_ids: vec!["a".into()],
            methods: vec![],
            is_admin_project: admin_project,
        }
    }

    fn project() -> Option<Scope> {
        Some(Scope::Project {
            id: "p".into(),
            name: "p".into(),
            domain_id: "d".into(),
        })
    }

    #[test]
    fn decisions() {
        let p = Policy::parse(POLICY).unwrap();
        fn ext(c: Option<&Claims>) -> Subject<'_> {
            Subject {
                claims: c,
                peer: EXTERNAL,
                public: true,
            }
        }
        fn mesh(peer: &'static str, c: Option<&'static Claims>) -> Subject<'static> {
            Subject {
                claims: c,
                peer,
                public: false,
            }
        }
        assert!(
            p.check("identity.v1.Tokens/Authenticate", &ext(None))
                .is_ok()
        );
        assert_eq!(
            p.check("identity.v1.Tokens/Nope", &ext(None)).unwrap_err(),
            Denial::NoRule
        );
        assert_eq!(
            p.check("identity.v1.Tokens/Watch", &ext(None)).unwrap_err(),
            Denial::InternalOnly
        );
        assert!(
            p.check(
                "identity.v1.Tokens/Watch",
                &mesh("spiffe://cirrus.local/svc/image", None)
            )
            .is_ok()
        );
        assert_eq!(
            p.check(
                "identity.v1.Tokens/Watch",
                &mesh("spiffe://cirrus.local/user/bob", None)
            )
            .unwrap_err(),
            Denial::NeedsToken
        );

        let member = claims(&["member", "reader"], project(), false);
        let reader = claims(&["reader"], project(), false);
        let admin = claims(&["admin", "member", "reader"], project(), true);
        let domain_member = claims(
            &["member"],
            Some(Scope::Domain {
                id: "d".into(),
                name: "d".into(),
            }),
            false,
        );
        assert_eq!(
            p.check("identity.v1.Users/CreateUser", &ext(None))
                .unwrap_err(),
            Denial::NeedsToken
        );
        assert_eq!(
            p.check("identity.v1.Users/CreateUser", &ext(Some(&member)))
                .unwrap_err(),
            Denial::Admin
        );
        assert!(
            p.check("identity.v1.Users/CreateUser", &ext(Some(&admin)))
                .is_ok()
        );
        assert!(
            p.check("compute.v1.Servers/CreateServer", &ext(Some(&member)))
                .is_ok()
        );
        assert_eq!(
            p.check("compute.v1.Servers/CreateServer", &ext(Some(&reader)))
                .unwrap_err(),
            Denial::Role
        );
        assert_eq!(
            p.check(
                "compute.v1.Servers/CreateServer",
                &ext(Some(&domain_member))
            )
            .unwrap_err(),
            Denial::Scope
        );

        let agent = Subject {
            claims: None,
            peer: "spiffe://cirrus.local/svc/compute-agent/host/h1",
            public: false,
        };
        assert!(
            p.check("conductor.v1.Conductor/GetBuildSpec", &agent)
                .is_ok()
        );
        let api = Subject {
            claims: Some(&admin),
            peer: "spiffe://cirrus.local/svc/compute-api",
            public: false,
        };
        assert_eq!(
            p.check("conductor.v1.Conductor/GetBuildSpec", &api)
                .unwrap_err(),
            Denial::Peer
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(Policy::parse("[[rule]]\nmethods = [\"NoSlash\"]\n").is_err());
        assert!(Policy::parse("[[rule]]\nmethods = [\"a.B/C\"]\nbogus = 1\n").is_err());
        assert!(Policy::parse("[[rule]]\nmethods = [\"a.B/C\"]\ntoken = \"maybe\"\n").is_err());
    }

    #[test]
    fn shipped_policies_parse_and_cover_every_rpc_of_their_service() {
        for (service, text) in DEFAULTS {
            let policy = Policy::parse(text).unwrap_or_else(|e| panic!("{service}: {e}"));
            let proto = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("../proto/{service}/v1/{service}.proto")),
            )
            .unwrap();
            let mut svc = "";
            for line in proto.lines() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("service ") {
                    svc = rest.trim_end_matches('{').trim();
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let name = rest.split('(').next().unwrap().trim();
                    let method = format!("{service}.v1.{svc}/{name}");
                    assert!(
                        policy.rule(&method).is_some(),
                        "{method} has no rule in {service}.toml"
                    );
                }
            }
        }
    }

    #[test]
    fn shipped_policy_files_parse_and_cover_every_identity_rpc() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
        let identity = Policy::load(&dir.join("identity.toml")).unwrap();
        let proto = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/identity/v1/identity.proto"),
        )
        .unwrap();
        let mut service = "";
        for line in proto.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches(" {").trim();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                let method = format!("identity.v1.{service}/{name}");
                assert!(
                    identity.rule(&method).is_some(),
                    "{method} has no rule in identity.toml"
                );
            }
        }
    }
}
