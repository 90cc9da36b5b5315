//! The gRPC adapter, the only place that knows tonic: reads the caller,
//! validates every field of every request into a typed value (`TryFrom` the
//! wire message, into the types of [`crate::model`]), calls [`Identity`],
//! and maps the answer back. Nothing here decides anything; the domain code
//! does. Errors reach the wire through runtime's one `From<Error> for Status`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use proto::identity::v1 as pb;
use runtime::error::{Error, UNAUTHENTICATED_MESSAGE};
use runtime::types::{Name, NameOrId, check_text, parse_id, parse_opt_id};
use time::OffsetDateTime;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::keys::KeyState;
use crate::model::*;
use crate::policy::{self, Caller};
use crate::service::{Change, Identity, PublicKey};

/// Longest description or other free text we accept, in characters.
const MAX_TEXT: usize = 4096;
/// Longest password, in bytes.
const MAX_PASSWORD: usize = 4096;
/// The region of an endpoint that names none.
const DEFAULT_REGION: &str = "RegionOne";

type R<T> = Result<Response<T>, Status>;

// ------------------------------------------------------------- validation

fn text(field: &'static str, s: String) -> Result<String, Error> {
    check_text(field, &s, MAX_TEXT)?;
    Ok(s)
}

fn opt_text(field: &'static str, s: Option<String>) -> Result<Option<String>, Error> {
    s.map(|s| text(field, s)).transpose()
}

fn opt_name(field: &'static str, s: Option<String>) -> Result<Option<Name>, Error> {
    s.map(|s| Name::parse(field, &s)).transpose()
}

fn password(field: &'static str, s: String) -> Result<String, Error> {
    if s.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if s.len() > MAX_PASSWORD {
        return Err(Error::invalid(
            field,
            format!("is longer than {MAX_PASSWORD} bytes"),
        ));
    }
    Ok(s)
}

/// A domain given by id or name; neither means none (the default domain).
fn domain_ref(
    id_field: &'static str,
    id: &str,
    name_field: &'static str,
    name: &str,
) -> Result<Option<DomainRef>, Error> {
    match (id.is_empty(), name.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Ok(Some(DomainRef::Id(parse_id(id_field, id)?))),
        (true, false) => Ok(Some(DomainRef::Name(Name::parse(name_field, name)?))),
        (false, false) => Err(Error::invalid(
            id_field,
            format!("give {id_field} or {name_field}, not both"),
        )),
    }
}

/// Exactly one of an id and a name.
fn name_or_id(id: &str, name: &str) -> Result<NameOrId, Error> {
    match (id.is_empty(), name.is_empty()) {
        (false, true) => Ok(NameOrId::Id(parse_id("id", id)?)),
        (true, false) => Ok(NameOrId::Name(Name::parse("name", name)?)),
        _ => Err(Error::invalid("id", "give the id or the name, not both")),
    }
}

/// By id, or by name within a domain.
fn reference(id: &str, name: &str, domain_id: &str, domain_name: &str) -> Result<Ref, Error> {
    Ok(match name_or_id(id, name)? {
        NameOrId::Id(id) => Ref::Id(id),
        NameOrId::Name(name) => Ref::Name {
            name,
            domain: domain_ref("domain_id", domain_id, "domain_name", domain_name)?,
        },
    })
}

impl TryFrom<&pb::GetRequest> for Ref {
    type Error = Error;
    fn try_from(g: &pb::GetRequest) -> Result<Self, Error> {
        reference(&g.id, &g.name, &g.domain_id, &g.domain_name)
    }
}

impl TryFrom<&pb::DeleteRequest> for Ref {
    type Error = Error;
    fn try_from(d: &pb::DeleteRequest) -> Result<Self, Error> {
        reference(&d.id, &d.name, &d.domain_id, &d.domain_name)
    }
}

impl TryFrom<&pb::GetRequest> for DomainRef {
    type Error = Error;
    fn try_from(g: &pb::GetRequest) -> Result<Self, Error> {
        name_or_id(&g.id, &g.name).map(DomainRef::from)
    }
}

impl TryFrom<&pb::DeleteRequest> for DomainRef {
    type Error = Error;
    fn try_from(d: &pb::DeleteRequest) -> Result<Self, Error> {
        name_or_id(&d.id, &d.name).map(DomainRef::from)
    }
}

fn target(project_id: &str, domain_id: &str, system: bool) -> Result<Target, Error> {
    match (
        parse_opt_id("project_id", project_id)?,
        parse_opt_id("domain_id", domain_id)?,
        system,
    ) {
        (Some(p), None, false) => Ok(Target::Project(p)),
        (None, Some(d), false) => Ok(Target::Domain(d)),
        (None, None, true) => Ok(Target::System),
        _ => Err(Error::invalid(
            "target",
            "give exactly one of project_id, domain_id or system",
        )),
    }
}

fn interface(i: i32) -> Result<Option<Interface>, Error> {
    match pb::Interface::try_from(i) {
        Ok(pb::Interface::Unspecified) => Ok(None),
        Ok(pb::Interface::Public) => Ok(Some(Interface::Public)),
        Ok(pb::Interface::Internal) => Ok(Some(Interface::Internal)),
        Ok(pb::Interface::Admin) => Ok(Some(Interface::Admin)),
        Err(_) => Err(Error::invalid("interface", format!("unknown value {i}"))),
    }
}

fn url(field: &'static str, s: String) -> Result<String, Error> {
    let ok = s.contains("://")
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.len() <= 1024;
    if ok {
        Ok(s)
    } else {
        Err(Error::invalid(field, "is not a valid URL"))
    }
}

// --------------------------------------------------------- request values

impl TryFrom<pb::AuthenticateRequest> for Login {
    type Error = Error;
    fn try_from(r: pb::AuthenticateRequest) -> Result<Self, Error> {
        let credentials = match r.method {
            Some(pb::authenticate_request::Method::Password(p)) => {
                let user = if !p.user_id.is_empty() {
                    if !p.user_name.is_empty() {
                        return Err(Error::invalid(
                            "user_id",
                            "give user_id or user_name, not both",
                        ));
                    }
                    Ref::Id(parse_id("user_id", &p.user_id)?)
                } else {
                    let domain = domain_ref(
                        "user_domain_id",
                        &p.user_domain_id,
                        "user_domain_name",
                        &p.user_domain_name,
                    )?
                    .ok_or_else(|| {
                        Error::invalid(
                            "user_domain_name",
                            "a user name needs user_domain_id or user_domain_name",
                        )
                    })?;
                    Ref::Name {
                        name: Name::parse("user_name", &p.user_name)?,
                        domain: Some(domain),
                    }
                };
                Credentials::Password {
                    user,
                    password: password("password", p.password)?,
                }
            }
            Some(pb::authenticate_request::Method::Token(t)) => {
                if t.token.is_empty() {
                    return Err(Error::invalid("token", "must not be empty"));
                }
                Credentials::Token(t.token)
            }
            None => {
                return Err(Error::invalid(
                    "method",
                    "give password or token credentials",
                ));
            }
        };
        let scope = match r.scope.and_then(|s| s.target) {
            None => ScopeRequest::Unscoped,
            Some(pb::scope::Target::Project(p)) => {
                ScopeRequest::Project(reference(&p.id, &p.name, &p.domain_id, &p.domain_name)?)
            }
            Some(pb::scope::Target::Domain(d)) => {
                ScopeRequest::Domain(name_or_id(&d.id, &d.name)?.into())
            }
            Some(pb::scope::Target::System(true)) => ScopeRequest::System,
            Some(pb::scope::Target::System(false)) => {
                return Err(Error::invalid("system", "must be true when given"));
            }
        };
        Ok(Login { credentials, scope })
    }
}

impl TryFrom<pb::RevokeTokenRequest> for Revoke {
    type Error = Error;
    fn try_from(r: pb::RevokeTokenRequest) -> Result<Self, Error> {
        match r.target {
            Some(pb::revoke_token_request::Target::Token(t)) if !t.is_empty() => {
                Ok(Revoke::Token(t))
            }
            Some(pb::revoke_token_request::Target::AuditId(a)) if !a.is_empty() => {
                let ok = a.len() <= 64
                    && a.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if ok {
                    Ok(Revoke::AuditId(a))
                } else {
                    Err(Error::invalid("audit_id", "is malformed"))
                }
            }
            _ => Err(Error::invalid(
                "target",
                "give the token or the audit_id to revoke",
            )),
        }
    }
}

impl TryFrom<pb::CreateDomainRequest> for NewDomain {
    type Error = Error;
    fn try_from(r: pb::CreateDomainRequest) -> Result<Self, Error> {
        Ok(NewDomain {
            name: Name::parse("name", &r.name)?,
            description: text("description", r.description)?,
            enabled: r.enabled.unwrap_or(true),
        })
    }
}

impl TryFrom<pb::UpdateDomainRequest> for Update {
    type Error = Error;
    fn try_from(r: pb::UpdateDomainRequest) -> Result<Self, Error> {
        Ok(Update {
            id: parse_id("id", &r.id)?,
            patch: Patch {
                name: opt_name("name", r.name)?,
                description: opt_text("description", r.description)?,
                enabled: r.enabled,
                ..Patch::default()
            },
        })
    }
}

impl TryFrom<pb::CreateProjectRequest> for NewProject {
    type Error = Error;
    fn try_from(r: pb::CreateProjectRequest) -> Result<Self, Error> {
        Ok(NewProject {
            name: Name::parse("name", &r.name)?,
            domain: domain_ref("domain_id", &r.domain_id, "domain_name", &r.domain_name)?,
            description: text("description", r.description)?,
            enabled: r.enabled.unwrap_or(true),
        })
    }
}

impl TryFrom<pb::UpdateProjectRequest> for Update {
    type Error = Error;
    fn try_from(r: pb::UpdateProjectRequest) -> Result<Self, Error> {
        Ok(Update {
            id: parse_id("id", &r.id)?,
            patch: Patch {
                name: opt_name("name", r.name)?,
                description: opt_text("description", r.description)?,
                enabled: r.enabled,
                ..Patch::default()
            },
        })
    }
}

impl TryFrom<&pb::ListProjectsRequest> for ProjectFilter {
    type Error = Error;
    fn try_from(r: &pb::ListProjectsRequest) -> Result<Self, Error> {
        Ok(ProjectFilter {
            domain_id: parse_opt_id("domain_id", &r.domain_id)?,
            user_id: parse_opt_id("user_id", &r.user_id)?,
        })
    }
}

impl TryFrom<pb::CreateUserRequest> for NewUser {
    type Error = Error;
    fn try_from(r: pb::CreateUserRequest) -> Result<Self, Error> {
        Ok(NewUser {
            name: Name::parse("name", &r.name)?,
            domain: domain_ref("domain_id", &r.domain_id, "domain_name", &r.domain_name)?,
            password: password("password", r.password)?,
            email: text("email", r.email)?,
            description: text("description", r.description)?,
            enabled: r.enabled.unwrap_or(true),
            ignore_lockout: r.ignore_lockout_failure_attempts.unwrap_or(false),
        })
    }
}

impl TryFrom<pb::UpdateUserRequest> for Update {
    type Error = Error;
    fn try_from(r: pb::UpdateUserRequest) -> Result<Self, Error> {
        Ok(Update {
            id: parse_id("id", &r.id)?,
            patch: Patch {
                name: opt_name("name", r.name)?,
                description: opt_text("description", r.description)?,
                email: opt_text("email", r.email)?,
                enabled: r.enabled,
                password: r.password.map(|p| password("password", p)).transpose()?,
                ignore_lockout: r.ignore_lockout_failure_attempts,
            },
        })
    }
}

impl TryFrom<pb::ChangePasswordRequest> for PasswordChange {
    type Error = Error;
    fn try_from(r: pb::ChangePasswordRequest) -> Result<Self, Error> {
        Ok(PasswordChange {
            user_id: parse_id("user_id", &r.user_id)?,
            original: password("original_password", r.original_password)?,
            new: password("new_password", r.new_password)?,
        })
    }
}

impl TryFrom<pb::CreateRoleRequest> for NewRole {
    type Error = Error;
    fn try_from(r: pb::CreateRoleRequest) -> Result<Self, Error> {
        Ok(NewRole {
            name: Name::parse("name", &r.name)?,
            description: text("description", r.description)?,
        })
    }
}

impl TryFrom<&pb::ImpliedRole> for Implication {
    type Error = Error;
    fn try_from(r: &pb::ImpliedRole) -> Result<Self, Error> {
        Ok(Implication {
            prior: NameOrId::parse("prior_role", &r.prior_role)?,
            implied: NameOrId::parse("implied_role", &r.implied_role)?,
        })
    }
}

impl TryFrom<&pb::RoleAssignment> for Grant {
    type Error = Error;
    fn try_from(r: &pb::RoleAssignment) -> Result<Self, Error> {
        Ok(Grant {
            user_id: parse_id("user_id", &r.user_id)?,
            role: NameOrId::parse("role", &r.role)?,
            target: target(&r.project_id, &r.domain_id, r.system)?,
        })
    }
}

impl TryFrom<&pb::ListRoleAssignmentsRequest> for AssignmentFilter {
    type Error = Error;
    fn try_from(r: &pb::ListRoleAssignmentsRequest) -> Result<Self, Error> {
        Ok(AssignmentFilter {
            user_id: parse_opt_id("user_id", &r.user_id)?,
            project_id: parse_opt_id("project_id", &r.project_id)?,
            domain_id: parse_opt_id("domain_id", &r.domain_id)?,
        })
    }
}

impl TryFrom<pb::CreateServiceRequest> for NewService {
    type Error = Error;
    fn try_from(r: pb::CreateServiceRequest) -> Result<Self, Error> {
        Ok(NewService {
            name: Name::parse("name", &r.name)?,
            kind: Name::parse("type", &r.r#type)?,
            description: text("description", r.description)?,
            enabled: r.enabled.unwrap_or(true),
        })
    }
}

impl TryFrom<pb::CreateEndpointRequest> for NewEndpoint {
    type Error = Error;
    fn try_from(r: pb::CreateEndpointRequest) -> Result<Self, Error> {
        Ok(NewEndpoint {
            service: NameOrId::parse("service", &r.service)?,
            interface: interface(r.interface)?
                .ok_or_else(|| Error::invalid("interface", "is required"))?,
            region: match r.region.as_str() {
                "" => DEFAULT_REGION.to_string(),
                region => Name::parse("region", region)?.into_string(),
            },
            url: url("url", r.url)?,
            enabled: r.enabled.unwrap_or(true),
        })
    }
}

impl TryFrom<&pb::ListEndpointsRequest> for EndpointFilter {
    type Error = Error;
    fn try_from(r: &pb::ListEndpointsRequest) -> Result<Self, Error> {
        Ok(EndpointFilter {
            service_id: parse_opt_id("service_id", &r.service_id)?,
            interface: interface(r.interface)?,
        })
    }
}

// ----------------------------------------------------------- conversions

fn ts(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn claims_pb(c: &token::Claims, key_id: String) -> pb::TokenClaims {
    let mut out = pb::TokenClaims {
        user_id: c.sub.clone(),
        user_name: c.user_name.clone(),
        user_domain_id: c.user_domain_id.clone(),
        roles: c.roles.clone(),
        issued_at: Some(ts(c.iat)),
        expires_at: Some(ts(c.exp)),
        audit_ids: c.audit_ids.clone(),
        methods: c.methods.clone(),
        is_admin_project: c.is_admin_project,
        key_id,
        ..Default::default()
    };
    match &c.scope {
        Some(token::Scope::Project {
            id,
            name,
            domain_id,
        }) => {
            out.project_id = id.clone();
            out.project_name = name.clone();
            out.project_domain_id = domain_id.clone();
        }
        Some(token::Scope::Domain { id, .. }) => out.domain_id = id.clone(),
        Some(token::Scope::System) => out.system = true,
        None => {}
    }
    out
}

/// The `kid` in a token's footer, for display; empty if unreadable.
fn footer_kid(token: &str) -> String {
    token::key_id_of(token).unwrap_or_default()
}

fn endpoint_pb(e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id.to_string(),
        service_id: e.service_id.to_string(),
        interface: match e.interface {
            Interface::Public => pb::Interface::Public,
            Interface::Internal => pb::Interface::Internal,
            Interface::Admin => pb::Interface::Admin,
        } as i32,
        region: e.region.clone(),
        url: e.url.clone(),
        enabled: e.enabled,
    }
}

fn catalog_pb(c: &[CatalogEntry]) -> Vec<pb::CatalogService> {
    c.iter()
        .map(|s| pb::CatalogService {
            name: s.name.clone(),
            r#type: s.kind.clone(),
            endpoints: s.endpoints.iter().map(endpoint_pb).collect(),
        })
        .collect()
}

fn key_pb(k: &PublicKey) -> pb::SigningKey {
    pb::SigningKey {
        key_id: k.key_id.clone(),
        state: match k.state {
            KeyState::Staged => pb::KeyState::Staged,
            KeyState::Primary => pb::KeyState::Primary,
            KeyState::Secondary => pb::KeyState::Secondary,
        } as i32,
        public_key: k.public_key.clone(),
    }
}

fn rule_pb(r: &token::RevocationRule) -> pb::RevocationEvent {
    pb::RevocationEvent {
        user_id: r.user_id.clone().unwrap_or_default(),
        project_id: r.project_id.clone().unwrap_or_default(),
        domain_id: r.domain_id.clone().unwrap_or_default(),
        audit_id: r.audit_id.clone().unwrap_or_default(),
        issued_before: Some(ts(r.issued_before)),
    }
}

fn domain_pb(d: Domain) -> pb::Domain {
    pb::Domain {
        id: d.id.to_string(),
        name: d.name,
        description: d.description,
        enabled: d.enabled,
    }
}

fn project_pb(p: Project) -> pb::Project {
    pb::Project {
        id: p.id.to_string(),
        name: p.name,
        domain_id: p.domain_id.to_string(),
        description: p.description,
        enabled: p.enabled,
    }
}

fn user_pb(u: User) -> pb::User {
    pb::User {
        id: u.id.to_string(),
        name: u.name,
        domain_id: u.domain_id.to_string(),
        enabled: u.enabled,
        email: u.email,
        description: u.description,
        locked_until: u
            .locked_until
            .filter(|t| *t > OffsetDateTime::now_utc())
            .map(ts),
        ignore_lockout_failure_attempts: u.ignore_lockout,
    }
}

fn role_pb(r: Role) -> pb::Role {
    pb::Role {
        id: r.id.to_string(),
        name: r.name,
        description: r.description,
    }
}

fn assignment_pb(a: Assignment) -> pb::RoleAssignment {
    let (project_id, domain_id, system) = match a.target {
        Target::Project(p) => (p.to_string(), String::new(), false),
        Target::Domain(d) => (String::new(), d.to_string(), false),
        Target::System => (String::new(), String::new(), true),
    };
    pb::RoleAssignment {
        role: a.role_name,
        user_id: a.user_id.to_string(),
        project_id,
        domain_id,
        system,
    }
}

fn service_pb(s: Service) -> pb::Service {
    pb::Service {
        id: s.id.to_string(),
        name: s.name,
        r#type: s.kind,
        description: s.description,
        enabled: s.enabled,
    }
}

// ---------------------------------------------------------------- callers

/// Why a token was refused is for the log and for mesh peers (sidecars,
/// which log and count it); a public caller reads only the constant.
fn refusal(e: Error, mesh: bool) -> Status {
    match e {
        Error::Unauthenticated { internal } if mesh => {
            tracing::info!(reason = %internal, "token refused for a mesh peer");
            Status::unauthenticated(format!("{UNAUTHENTICATED_MESSAGE}: {internal}"))
        }
        other => other.into(),
    }
}

/// The bearer token of a request, from `authorization: Bearer <token>`.
pub fn bearer<T>(req: &Request<T>) -> Result<Option<&str>, Error> {
    let Some(v) = req.metadata().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Error::unauthenticated("the authorization header is not text"))?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or_else(|| Error::unauthenticated("authorization is not \"Bearer <token>\""))?;
    Ok(Some(token.trim()))
}

/// The `x-cirrus-peer` the sidecar set (identity listens on loopback behind
/// its sidecar, which strips that header from anything a client sends).
fn peer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get(runtime::caller::PEER)
        .and_then(|v| v.to_str().ok())
}

/// The gRPC face of the identity service; one value serves all five services.
#[derive(Clone)]
pub struct Api {
    pub id: Identity,
    /// Resolves when the server is shutting down, ending `Watch` streams.
    pub closed: tokio::sync::watch::Receiver<bool>,
}

impl Api {
    /// The caller: its verified token, and the mesh workload its sidecar vouches for.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = peer(req);
        let mesh = policy::is_mesh(peer);
        let token = bearer(req).map_err(|e| refusal(e, mesh))?;
        let caller = self.id.caller(token).map_err(|e| refusal(e, mesh))?;
        Ok(caller.with_peer(peer))
    }
}

// ------------------------------------------------------------------ Tokens

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Api {
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> R<pb::AuthenticateResponse> {
        let from_mesh = policy::is_mesh(peer(&req));
        let login = Login::try_from(req.into_inner())?;
        // Why a *token* was refused may reach a mesh peer; why a password
        // was, never (a dashboard would pass it on to whoever typed it).
        let mesh = from_mesh && matches!(login.credentials, Credentials::Token(_));
        let issued = self
            .id
            .authenticate(login)
            .await
            .map_err(|e| refusal(e, mesh))?;
        let kid = footer_kid(&issued.token);
        Ok(Response::new(pb::AuthenticateResponse {
            claims: Some(claims_pb(&issued.claims, kid)),
            catalog: catalog_pb(&issued.catalog),
            token: issued.token,
        }))
    }

    async fn validate_token(
        &self,
        req: Request<pb::ValidateTokenRequest>,
    ) -> R<pb::ValidateTokenResponse> {
        let c = self.caller(&req)?;
        let token = req.into_inner().token;
        if token.is_empty() {
            return Err(Error::invalid("token", "must not be empty").into());
        }
        let (claims, catalog) = self
            .id
            .validate(&c, &token)
            .await
            .map_err(|e| refusal(e, c.is_mesh()))?;
        Ok(Response::new(pb::ValidateTokenResponse {
            claims: Some(claims_pb(&claims, footer_kid(&token))),
            catalog: catalog_pb(&catalog),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> R<pb::RevokeTokenResponse> {
        let c = self.caller(&req)?;
        let what = Revoke::try_from(req.into_inner())?;
        self.id
            .revoke_token(&c, what)
            .await
            .map_err(|e| refusal(e, c.is_mesh()))?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn rotate_keys(&self, req: Request<pb::RotateKeysRequest>) -> R<pb::RotateKeysResponse> {
        let c = self.caller(&req)?;
        let keys = self.id.rotate_keys(&c).await?;
        Ok(Response::new(pb::RotateKeysResponse {
            keys: keys.iter().map(key_pb).collect(),
        }))
    }

    async fn list_signing_keys(
        &self,
        _req: Request<pb::ListSigningKeysRequest>,
    ) -> R<pb::ListSigningKeysResponse> {
        // Public keys are public: anyone may fetch them to verify tokens.
        Ok(Response::new(pb::ListSigningKeysResponse {
            keys: self.id.public_keys()?.iter().map(key_pb).collect(),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> R<Self::WatchStream> {
        let c = self.caller(&req)?;
        let (keys, rules, rx) = self.id.watch(&c)?;
        let snapshot = pb::WatchEvent {
            event: Some(pb::watch_event::Event::Snapshot(pb::Snapshot {
                keys: keys.iter().map(key_pb).collect(),
                revocations: rules.iter().map(rule_pb).collect(),
            })),
        };
        let changes = BroadcastStream::new(rx).map(|change| match change {
            Ok(Change::Keys(keys)) => Ok(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Keys(pb::ListSigningKeysResponse {
                    keys: keys.iter().map(key_pb).collect(),
                })),
            }),
            Ok(Change::Revocation(r)) => Ok(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Revocation(rule_pb(&r))),
            }),
            // A watcher that fell behind must start again from a snapshot.
            Err(_) => Err(Status::unavailable(
                "watcher fell behind; reconnect for a fresh snapshot",
            )),
        });
        let mut closed = self.closed.clone();
        let until_closed = async move {
            let _ = closed.wait_for(|c| *c).await;
        };
        let stream = tokio_stream::once(Ok(snapshot))
            .chain(changes)
            .take_until(until_closed);
        Ok(Response::new(Box::pin(stream)))
    }
}

// --------------------------------------------------------------- Resources

#[tonic::async_trait]
impl pb::resources_server::Resources for Api {
    async fn create_domain(&self, req: Request<pb::CreateDomainRequest>) -> R<pb::Domain> {
        let c = self.caller(&req)?;
        let new = NewDomain::try_from(req.into_inner())?;
        Ok(Response::new(domain_pb(
            self.id.create_domain(&c, new).await?,
        )))
    }

    async fn get_domain(&self, req: Request<pb::GetRequest>) -> R<pb::Domain> {
        let c = self.caller(&req)?;
        let r = DomainRef::try_from(req.get_ref())?;
        Ok(Response::new(domain_pb(self.id.get_domain(&c, r).await?)))
    }

    async fn list_domains(&self, req: Request<pb::ListRequest>) -> R<pb::ListDomainsResponse> {
        let c = self.caller(&req)?;
        let domains = self.id.list_domains(&c).await?;
        Ok(Response::new(pb::ListDomainsResponse {
            domains: domains.into_iter().map(domain_pb).collect(),
        }))
    }

    async fn update_domain(&self, req: Request<pb::UpdateDomainRequest>) -> R<pb::Domain> {
        let c = self.caller(&req)?;
        let u = Update::try_from(req.into_inner())?;
        Ok(Response::new(domain_pb(
            self.id.update_domain(&c, u).await?,
        )))
    }

    async fn delete_domain(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        self.id
            .delete_domain(&c, DomainRef::try_from(req.get_ref())?)
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_project(&self, req: Request<pb::CreateProjectRequest>) -> R<pb::Project> {
        let c = self.caller(&req)?;
        let new = NewProject::try_from(req.into_inner())?;
        Ok(Response::new(project_pb(
            self.id.create_project(&c, new).await?,
        )))
    }

    async fn get_project(&self, req: Request<pb::GetRequest>) -> R<pb::Project> {
        let c = self.caller(&req)?;
        let r = Ref::try_from(req.get_ref())?;
        Ok(Response::new(project_pb(self.id.get_project(&c, r).await?)))
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> R<pb::ListProjectsResponse> {
        let c = self.caller(&req)?;
        let f = ProjectFilter::try_from(req.get_ref())?;
        let projects = self.id.list_projects(&c, f).await?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(project_pb).collect(),
        }))
    }

    async fn update_project(&self, req: Request<pb::UpdateProjectRequest>) -> R<pb::Project> {
        let c = self.caller(&req)?;
        let u = Update::try_from(req.into_inner())?;
        Ok(Response::new(project_pb(
            self.id.update_project(&c, u).await?,
        )))
    }

    async fn delete_project(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        self.id
            .delete_project(&c, Ref::try_from(req.get_ref())?)
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

// ------------------------------------------------------------------- Users

#[tonic::async_trait]
impl pb::users_server::Users for Api {
    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> R<pb::User> {
        let c = self.caller(&req)?;
        let new = NewUser::try_from(req.into_inner())?;
        Ok(Response::new(user_pb(self.id.create_user(&c, new).await?)))
    }

    async fn get_user(&self, req: Request<pb::GetRequest>) -> R<pb::User> {
        let c = self.caller(&req)?;
        let r = Ref::try_from(req.get_ref())?;
        Ok(Response::new(user_pb(self.id.get_user(&c, r).await?)))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        let c = self.caller(&req)?;
        let domain_id = parse_opt_id("domain_id", &req.get_ref().domain_id)?;
        let users = self.id.list_users(&c, domain_id).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(user_pb).collect(),
        }))
    }

    async fn update_user(&self, req: Request<pb::UpdateUserRequest>) -> R<pb::User> {
        let c = self.caller(&req)?;
        let u = Update::try_from(req.into_inner())?;
        Ok(Response::new(user_pb(self.id.update_user(&c, u).await?)))
    }

    async fn delete_user(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        self.id
            .delete_user(&c, Ref::try_from(req.get_ref())?)
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> R<pb::ChangePasswordResponse> {
        let c = self.caller(&req)?;
        let ch = PasswordChange::try_from(req.into_inner())?;
        self.id.change_password(&c, ch).await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }
}

// ------------------------------------------------------------------- Roles

#[tonic::async_trait]
impl pb::roles_server::Roles for Api {
    async fn create_role(&self, req: Request<pb::CreateRoleRequest>) -> R<pb::Role> {
        let c = self.caller(&req)?;
        let new = NewRole::try_from(req.into_inner())?;
        Ok(Response::new(role_pb(self.id.create_role(&c, new).await?)))
    }

    async fn get_role(&self, req: Request<pb::GetRequest>) -> R<pb::Role> {
        let c = self.caller(&req)?;
        let r = name_or_id(&req.get_ref().id, &req.get_ref().name)?;
        Ok(Response::new(role_pb(self.id.get_role(&c, r).await?)))
    }

    async fn list_roles(&self, req: Request<pb::ListRequest>) -> R<pb::ListRolesResponse> {
        let c = self.caller(&req)?;
        let roles = self.id.list_roles(&c).await?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: roles.into_iter().map(role_pb).collect(),
        }))
    }

    async fn delete_role(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        let r = name_or_id(&req.get_ref().id, &req.get_ref().name)?;
        self.id.delete_role(&c, r).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_implied_role(&self, req: Request<pb::ImpliedRole>) -> R<pb::ImpliedRole> {
        let c = self.caller(&req)?;
        let i = Implication::try_from(req.get_ref())?;
        let (prior_role, implied_role) = self.id.create_implied_role(&c, i).await?;
        Ok(Response::new(pb::ImpliedRole {
            prior_role,
            implied_role,
        }))
    }

    async fn list_implied_roles(
        &self,
        req: Request<pb::ListRequest>,
    ) -> R<pb::ListImpliedRolesResponse> {
        let c = self.caller(&req)?;
        let pairs = self.id.list_implied_roles(&c).await?;
        Ok(Response::new(pb::ListImpliedRolesResponse {
            implied_roles: pairs
                .into_iter()
                .map(|(prior_role, implied_role)| pb::ImpliedRole {
                    prior_role,
                    implied_role,
                })
                .collect(),
        }))
    }

    async fn delete_implied_role(&self, req: Request<pb::ImpliedRole>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        let i = Implication::try_from(req.get_ref())?;
        self.id.delete_implied_role(&c, i).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn assign_role(&self, req: Request<pb::RoleAssignment>) -> R<pb::RoleAssignment> {
        let c = self.caller(&req)?;
        let g = Grant::try_from(req.get_ref())?;
        Ok(Response::new(assignment_pb(
            self.id.assign_role(&c, g).await?,
        )))
    }

    async fn unassign_role(&self, req: Request<pb::RoleAssignment>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        let g = Grant::try_from(req.get_ref())?;
        self.id.unassign_role(&c, g).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list_role_assignments(
        &self,
        req: Request<pb::ListRoleAssignmentsRequest>,
    ) -> R<pb::ListRoleAssignmentsResponse> {
        let c = self.caller(&req)?;
        let f = AssignmentFilter::try_from(req.get_ref())?;
        let list = self.id.list_assignments(&c, f).await?;
        Ok(Response::new(pb::ListRoleAssignmentsResponse {
            assignments: list.into_iter().map(assignment_pb).collect(),
        }))
    }
}

// ----------------------------------------------------------------- Catalog

#[tonic::async_trait]
impl pb::catalog_server::Catalog for Api {
    async fn create_service(&self, req: Request<pb::CreateServiceRequest>) -> R<pb::Service> {
        let c = self.caller(&req)?;
        let new = NewService::try_from(req.into_inner())?;
        Ok(Response::new(service_pb(
            self.id.create_service(&c, new).await?,
        )))
    }

    async fn list_services(&self, req: Request<pb::ListRequest>) -> R<pb::ListServicesResponse> {
        let c = self.caller(&req)?;
        let services = self.id.list_services(&c).await?;
        Ok(Response::new(pb::ListServicesResponse {
            services: services.into_iter().map(service_pb).collect(),
        }))
    }

    async fn delete_service(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        let r = name_or_id(&req.get_ref().id, &req.get_ref().name)?;
        self.id.delete_service(&c, r).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_endpoint(&self, req: Request<pb::CreateEndpointRequest>) -> R<pb::Endpoint> {
        let c = self.caller(&req)?;
        let new = NewEndpoint::try_from(req.into_inner())?;
        Ok(Response::new(endpoint_pb(
            &self.id.create_endpoint(&c, new).await?,
        )))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> R<pb::ListEndpointsResponse> {
        let c = self.caller(&req)?;
        let f = EndpointFilter::try_from(req.get_ref())?;
        let list = self.id.list_endpoints(&c, f).await?;
        Ok(Response::new(pb::ListEndpointsResponse {
            endpoints: list.iter().map(endpoint_pb).collect(),
        }))
    }

    async fn delete_endpoint(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = self.caller(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        self.id.delete_endpoint(&c, id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_catalog(&self, req: Request<pb::GetCatalogRequest>) -> R<pb::GetCatalogResponse> {
        let c = self.caller(&req)?;
        Ok(Response::new(pb::GetCatalogResponse {
            catalog: catalog_pb(&self.id.catalog(&c).await?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid<T>(r: Result<T, Error>) -> String {
        match r {
            Ok(_) => "accepted".into(),
            Err(e) => Status::from(e).message().to_string(),
        }
    }

    #[test]
    fn requests_are_validated_into_typed_values() {
        let user = |password: &str, name: &str| pb::CreateUserRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        };
        assert_eq!(
            invalid(NewUser::try_from(user("", "kim"))),
            "password: must not be empty"
        );
        assert_eq!(
            invalid(NewUser::try_from(user(
                "pw",
                "0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a"
            ))),
            "name: must not look like an id (a UUID)"
        );
        assert!(NewUser::try_from(user("pw", "kim")).is_ok());
        let both = pb::GetRequest {
            id: uuid::Uuid::new_v4().to_string(),
            name: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            invalid(Ref::try_from(&both)),
            "id: give the id or the name, not both"
        );
        assert_eq!(
            invalid(Ref::try_from(&pb::GetRequest {
                id: "nope".into(),
                ..Default::default()
            })),
            "id: is not a valid id: \"nope\""
        );
    }

    #[test]
    fn targets_are_exactly_one() {
        let u = uuid::Uuid::new_v4().to_string();
        assert!(target(&u, "", false).is_ok());
        assert!(target(&u, &u, false).is_err());
        assert!(target("", "", false).is_err());
        assert!(target("", "", true).is_ok());
    }

    #[test]
    fn a_mesh_peer_reads_why_a_token_was_refused_a_public_caller_does_not() {
        let e = || Error::unauthenticated("token has expired");
        assert_eq!(refusal(e(), false).message(), "authentication failed");
        assert_eq!(
            refusal(e(), true).message(),
            "authentication failed: token has expired"
        );
    }

    #[test]
    fn footer_kid_reads_the_key_id() {
        let key = token::SigningKey::generate().unwrap_or_else(|_| unreachable!());
        let now = OffsetDateTime::now_utc();
        let claims = token::Claims {
            sub: "u".into(),
            user_name: "n".into(),
            user_domain_id: "d".into(),
            scope: None,
            roles: vec![],
            iat: now,
            exp: now,
            audit_ids: vec!["a".into()],
            methods: vec![],
            is_admin_project: false,
        };
        let t = key.sign(&claims).unwrap_or_else(|_| unreachable!());
        assert_eq!(footer_kid(&t), key.key_id());
    }
}
