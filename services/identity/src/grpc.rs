//! The gRPC adapter: validates every field of every request, turns wire
//! types into domain types, calls [`Identity`], and maps the answer back.
//! Nothing here decides anything; the domain code does.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use proto::identity::v1 as pb;
use time::OffsetDateTime;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::keys::KeyState;
use crate::model::*;
use crate::policy::Caller;
use crate::service::{Change, Credentials, Identity, NewUser, PublicKey, ScopeRequest};

/// Longest name, description or other free text we accept, in characters.
pub const MAX_NAME: usize = 255;
const MAX_TEXT: usize = 4096;

type R<T> = Result<Response<T>, Status>;

// ------------------------------------------------------------- validation

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A required name: 1 to 255 characters, no control characters, not blank.
fn name(field: &str, s: &str) -> Result<String, Status> {
    if s.trim().is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if s.chars().count() > MAX_NAME {
        return Err(invalid(format!(
            "{field} is longer than {MAX_NAME} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains control characters")));
    }
    Ok(s.to_string())
}

fn opt_name(field: &str, s: Option<&String>) -> Result<Option<String>, Status> {
    s.map(|s| name(field, s)).transpose()
}

fn text(field: &str, s: &str) -> Result<String, Status> {
    if s.chars().count() > MAX_TEXT {
        return Err(invalid(format!(
            "{field} is longer than {MAX_TEXT} characters"
        )));
    }
    Ok(s.to_string())
}

fn opt_text(field: &str, s: Option<&String>) -> Result<Option<String>, Status> {
    s.map(|s| text(field, s)).transpose()
}

fn password(field: &str, s: &str) -> Result<String, Status> {
    if s.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if s.len() > MAX_TEXT {
        return Err(invalid(format!("{field} is longer than {MAX_TEXT} bytes")));
    }
    Ok(s.to_string())
}

fn id(field: &str, s: &str) -> Result<Uuid, Status> {
    if s.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Uuid::parse_str(s).map_err(|_| invalid(format!("{field} is not a valid id: {:?}", truncate(s))))
}

fn opt_id(field: &str, s: &str) -> Result<Option<Uuid>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        id(field, s).map(Some)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A domain given by id or name; neither means none.
fn domain_ref(id_field: &str, d_id: &str, d_name: &str) -> Result<Option<DomainRef>, Status> {
    match (d_id.is_empty(), d_name.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Ok(Some(DomainRef::Id(id(id_field, d_id)?))),
        (true, false) => Ok(Some(DomainRef::Name(name("domain name", d_name)?))),
        (false, false) => Err(invalid("give a domain id or a domain name, not both")),
    }
}

/// A reference by id, or by name with an optional domain.
fn reference(kind: &str, g: &pb::GetRequest) -> Result<Ref, Status> {
    match (g.id.is_empty(), g.name.is_empty()) {
        (false, true) => Ok(Ref::Id(id(&format!("{kind} id"), &g.id)?)),
        (true, false) => Ok(Ref::Name {
            name: name(&format!("{kind} name"), &g.name)?,
            domain: domain_ref("domain id", &g.domain_id, &g.domain_name)?,
        }),
        _ => Err(invalid(format!("give the {kind}'s id or its name"))),
    }
}

fn delete_ref(kind: &str, d: &pb::DeleteRequest) -> Result<Ref, Status> {
    reference(
        kind,
        &pb::GetRequest {
            id: d.id.clone(),
            name: d.name.clone(),
            domain_id: d.domain_id.clone(),
            domain_name: d.domain_name.clone(),
        },
    )
}

fn target(project_id: &str, domain_id: &str, system: bool) -> Result<Target, Status> {
    match (
        opt_id("project_id", project_id)?,
        opt_id("domain_id", domain_id)?,
        system,
    ) {
        (Some(p), None, false) => Ok(Target::Project(p)),
        (None, Some(d), false) => Ok(Target::Domain(d)),
        (None, None, true) => Ok(Target::System),
        _ => Err(invalid(
            "give exactly one of project_id, domain_id or system",
        )),
    }
}

fn interface(i: i32) -> Result<Option<Interface>, Status> {
    match pb::Interface::try_from(i) {
        Ok(pb::Interface::Unspecified) => Ok(None),
        Ok(pb::Interface::Public) => Ok(Some(Interface::Public)),
        Ok(pb::Interface::Internal) => Ok(Some(Interface::Internal)),
        Ok(pb::Interface::Admin) => Ok(Some(Interface::Admin)),
        Err(_) => Err(invalid(format!("unknown interface {i}"))),
    }
}

fn url(field: &str, s: &str) -> Result<String, Status> {
    let ok = s.contains("://")
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.len() <= 1024;
    if ok {
        Ok(s.to_string())
    } else {
        Err(invalid(format!("{field} is not a valid URL")))
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

/// The bearer token of a request, from `authorization: Bearer <token>`.
pub fn bearer<T>(req: &Request<T>) -> Result<Option<&str>, Status> {
    match req.metadata().get("authorization") {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("authorization must be \"Bearer <token>\"")
                })?;
            Ok(Some(token.trim()))
        }
    }
}

/// The caller: its verified token, and the mesh workload its sidecar vouches
/// for in `x-cirrus-peer` (identity listens on loopback behind its sidecar,
/// which strips that header from anything a client sends).
fn caller<T>(id: &Identity, req: &Request<T>) -> Result<Caller, Status> {
    let peer = req
        .metadata()
        .get(runtime::caller::PEER)
        .and_then(|v| v.to_str().ok());
    Ok(id.caller(bearer(req)?)?.with_peer(peer))
}

/// The gRPC face of the identity service; one value serves all five services.
#[derive(Clone)]
pub struct Api {
    pub id: Identity,
    /// Resolves when the server is shutting down, ending `Watch` streams.
    pub closed: tokio::sync::watch::Receiver<bool>,
}

// ------------------------------------------------------------------ Tokens

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Api {
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> R<pb::AuthenticateResponse> {
        let r = req.into_inner();
        let creds = match r.method {
            Some(pb::authenticate_request::Method::Password(p)) => {
                let user = if !p.user_id.is_empty() {
                    if !p.user_name.is_empty() {
                        return Err(invalid("give user_id or user_name, not both"));
                    }
                    Ref::Id(id("user_id", &p.user_id)?)
                } else {
                    let domain =
                        domain_ref("user_domain_id", &p.user_domain_id, &p.user_domain_name)?
                            .ok_or_else(|| {
                                invalid("a user name needs user_domain_id or user_domain_name")
                            })?;
                    Ref::Name {
                        name: name("user_name", &p.user_name)?,
                        domain: Some(domain),
                    }
                };
                Credentials::Password {
                    user,
                    password: password("password", &p.password)?,
                }
            }
            Some(pb::authenticate_request::Method::Token(t)) => {
                if t.token.is_empty() {
                    return Err(invalid("token must not be empty"));
                }
                Credentials::Token(t.token)
            }
            None => return Err(invalid("give password or token credentials")),
        };
        let scope = match r.scope.and_then(|s| s.target) {
            None => ScopeRequest::Unscoped,
            Some(pb::scope::Target::Project(p)) => ScopeRequest::Project(reference(
                "project",
                &pb::GetRequest {
                    id: p.id,
                    name: p.name,
                    domain_id: p.domain_id,
                    domain_name: p.domain_name,
                },
            )?),
            Some(pb::scope::Target::Domain(d)) => ScopeRequest::Domain(
                domain_ref("domain id", &d.id, &d.name)?
                    .ok_or_else(|| invalid("give the domain's id or name"))?,
            ),
            Some(pb::scope::Target::System(true)) => ScopeRequest::System,
            Some(pb::scope::Target::System(false)) => {
                return Err(invalid("system scope must be true when given"));
            }
        };
        let issued = self.id.authenticate(creds, scope).await?;
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
        let c = caller(&self.id, &req)?;
        let token = req.into_inner().token;
        if token.is_empty() {
            return Err(invalid("token must not be empty"));
        }
        let (claims, catalog) = self.id.validate(&c, &token).await?;
        Ok(Response::new(pb::ValidateTokenResponse {
            claims: Some(claims_pb(&claims, footer_kid(&token))),
            catalog: catalog_pb(&catalog),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> R<pb::RevokeTokenResponse> {
        let c = caller(&self.id, &req)?;
        match req.into_inner().target {
            Some(pb::revoke_token_request::Target::Token(t)) if !t.is_empty() => {
                self.id.revoke_token(&c, &t).await?
            }
            Some(pb::revoke_token_request::Target::AuditId(a)) if !a.is_empty() => {
                if a.len() > 64
                    || !a
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(invalid("audit_id is malformed"));
                }
                self.id.revoke_audit_id(&c, &a).await?
            }
            _ => return Err(invalid("give the token or the audit_id to revoke")),
        }
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn rotate_keys(&self, req: Request<pb::RotateKeysRequest>) -> R<pb::RotateKeysResponse> {
        let c = caller(&self.id, &req)?;
        let keys = self.id.rotate_keys(&c)?;
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
        let c = caller(&self.id, &req)?;
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
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let d = self
            .id
            .create_domain(
                &c,
                name("name", &r.name)?,
                text("description", &r.description)?,
                r.enabled.unwrap_or(true),
            )
            .await?;
        Ok(Response::new(domain_pb(d)))
    }

    async fn get_domain(&self, req: Request<pb::GetRequest>) -> R<pb::Domain> {
        let c = caller(&self.id, &req)?;
        let r = reference("domain", req.get_ref())?;
        Ok(Response::new(domain_pb(self.id.get_domain(&c, r).await?)))
    }

    async fn list_domains(&self, req: Request<pb::ListRequest>) -> R<pb::ListDomainsResponse> {
        let c = caller(&self.id, &req)?;
        let domains = self.id.list_domains(&c).await?;
        Ok(Response::new(pb::ListDomainsResponse {
            domains: domains.into_iter().map(domain_pb).collect(),
        }))
    }

    async fn update_domain(&self, req: Request<pb::UpdateDomainRequest>) -> R<pb::Domain> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let patch = Patch {
            name: opt_name("name", r.name.as_ref())?,
            description: opt_text("description", r.description.as_ref())?,
            enabled: r.enabled,
            ..Default::default()
        };
        let d = self.id.update_domain(&c, id("id", &r.id)?, patch).await?;
        Ok(Response::new(domain_pb(d)))
    }

    async fn delete_domain(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let d = self
            .id
            .get_domain(&c, delete_ref("domain", req.get_ref())?)
            .await?;
        self.id.delete_domain(&c, d.id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_project(&self, req: Request<pb::CreateProjectRequest>) -> R<pb::Project> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let p = self
            .id
            .create_project(
                &c,
                name("name", &r.name)?,
                domain_ref("domain_id", &r.domain_id, &r.domain_name)?,
                text("description", &r.description)?,
                r.enabled.unwrap_or(true),
            )
            .await?;
        Ok(Response::new(project_pb(p)))
    }

    async fn get_project(&self, req: Request<pb::GetRequest>) -> R<pb::Project> {
        let c = caller(&self.id, &req)?;
        let r = reference("project", req.get_ref())?;
        Ok(Response::new(project_pb(self.id.get_project(&c, r).await?)))
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> R<pb::ListProjectsResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.get_ref();
        let projects = self
            .id
            .list_projects(
                &c,
                opt_id("domain_id", &r.domain_id)?,
                opt_id("user_id", &r.user_id)?,
            )
            .await?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(project_pb).collect(),
        }))
    }

    async fn update_project(&self, req: Request<pb::UpdateProjectRequest>) -> R<pb::Project> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let patch = Patch {
            name: opt_name("name", r.name.as_ref())?,
            description: opt_text("description", r.description.as_ref())?,
            enabled: r.enabled,
            ..Default::default()
        };
        let p = self.id.update_project(&c, id("id", &r.id)?, patch).await?;
        Ok(Response::new(project_pb(p)))
    }

    async fn delete_project(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let p = self
            .id
            .get_project(&c, delete_ref("project", req.get_ref())?)
            .await?;
        self.id.delete_project(&c, p.id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

// ------------------------------------------------------------------- Users

#[tonic::async_trait]
impl pb::users_server::Users for Api {
    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> R<pb::User> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let u = NewUser {
            name: name("name", &r.name)?,
            domain: domain_ref("domain_id", &r.domain_id, &r.domain_name)?,
            password: if r.password.is_empty() {
                None
            } else {
                Some(password("password", &r.password)?)
            },
            email: text("email", &r.email)?,
            description: text("description", &r.description)?,
            enabled: r.enabled.unwrap_or(true),
        };
        Ok(Response::new(user_pb(self.id.create_user(&c, u).await?)))
    }

    async fn get_user(&self, req: Request<pb::GetRequest>) -> R<pb::User> {
        let c = caller(&self.id, &req)?;
        let r = reference("user", req.get_ref())?;
        Ok(Response::new(user_pb(self.id.get_user(&c, r).await?)))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        let c = caller(&self.id, &req)?;
        let users = self
            .id
            .list_users(&c, opt_id("domain_id", &req.get_ref().domain_id)?)
            .await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(user_pb).collect(),
        }))
    }

    async fn update_user(&self, req: Request<pb::UpdateUserRequest>) -> R<pb::User> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let patch = Patch {
            name: opt_name("name", r.name.as_ref())?,
            description: opt_text("description", r.description.as_ref())?,
            email: opt_text("email", r.email.as_ref())?,
            enabled: r.enabled,
            password: r
                .password
                .as_deref()
                .map(|p| password("password", p))
                .transpose()?,
        };
        Ok(Response::new(user_pb(
            self.id.update_user(&c, id("id", &r.id)?, patch).await?,
        )))
    }

    async fn delete_user(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let u = self
            .id
            .get_user(&c, delete_ref("user", req.get_ref())?)
            .await?;
        self.id.delete_user(&c, u.id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> R<pb::ChangePasswordResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        self.id
            .change_password(
                &c,
                id("user_id", &r.user_id)?,
                &password("original_password", &r.original_password)?,
                &password("new_password", &r.new_password)?,
            )
            .await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }
}

// ------------------------------------------------------------------- Roles

fn role_name(field: &str, s: &str) -> Result<String, Status> {
    name(field, s)
}

#[tonic::async_trait]
impl pb::roles_server::Roles for Api {
    async fn create_role(&self, req: Request<pb::CreateRoleRequest>) -> R<pb::Role> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let role = self
            .id
            .create_role(
                &c,
                name("name", &r.name)?,
                text("description", &r.description)?,
            )
            .await?;
        Ok(Response::new(role_pb(role)))
    }

    async fn get_role(&self, req: Request<pb::GetRequest>) -> R<pb::Role> {
        let c = caller(&self.id, &req)?;
        let r = reference("role", req.get_ref())?;
        Ok(Response::new(role_pb(self.id.get_role(&c, r).await?)))
    }

    async fn list_roles(&self, req: Request<pb::ListRequest>) -> R<pb::ListRolesResponse> {
        let c = caller(&self.id, &req)?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: self
                .id
                .list_roles(&c)
                .await?
                .into_iter()
                .map(role_pb)
                .collect(),
        }))
    }

    async fn delete_role(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let role = self
            .id
            .get_role(&c, delete_ref("role", req.get_ref())?)
            .await?;
        self.id.delete_role(&c, role.id).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_implied_role(&self, req: Request<pb::ImpliedRole>) -> R<pb::ImpliedRole> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let (prior, implied) = self
            .id
            .create_implied_role(
                &c,
                role_name("prior_role", &r.prior_role)?,
                role_name("implied_role", &r.implied_role)?,
            )
            .await?;
        Ok(Response::new(pb::ImpliedRole {
            prior_role: prior,
            implied_role: implied,
        }))
    }

    async fn list_implied_roles(
        &self,
        req: Request<pb::ListRequest>,
    ) -> R<pb::ListImpliedRolesResponse> {
        let c = caller(&self.id, &req)?;
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
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        self.id
            .delete_implied_role(
                &c,
                role_name("prior_role", &r.prior_role)?,
                role_name("implied_role", &r.implied_role)?,
            )
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn assign_role(&self, req: Request<pb::RoleAssignment>) -> R<pb::RoleAssignment> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let a = self
            .id
            .assign_role(
                &c,
                id("user_id", &r.user_id)?,
                role_name("role", &r.role)?,
                target(&r.project_id, &r.domain_id, r.system)?,
            )
            .await?;
        Ok(Response::new(assignment_pb(a)))
    }

    async fn unassign_role(&self, req: Request<pb::RoleAssignment>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        self.id
            .unassign_role(
                &c,
                id("user_id", &r.user_id)?,
                role_name("role", &r.role)?,
                target(&r.project_id, &r.domain_id, r.system)?,
            )
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list_role_assignments(
        &self,
        req: Request<pb::ListRoleAssignmentsRequest>,
    ) -> R<pb::ListRoleAssignmentsResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.get_ref();
        let list = self
            .id
            .list_assignments(
                &c,
                opt_id("user_id", &r.user_id)?,
                opt_id("project_id", &r.project_id)?,
                opt_id("domain_id", &r.domain_id)?,
            )
            .await?;
        Ok(Response::new(pb::ListRoleAssignmentsResponse {
            assignments: list.into_iter().map(assignment_pb).collect(),
        }))
    }
}

// ----------------------------------------------------------------- Catalog

#[tonic::async_trait]
impl pb::catalog_server::Catalog for Api {
    async fn create_service(&self, req: Request<pb::CreateServiceRequest>) -> R<pb::Service> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let s = self
            .id
            .create_service(
                &c,
                name("name", &r.name)?,
                name("type", &r.r#type)?,
                text("description", &r.description)?,
                r.enabled.unwrap_or(true),
            )
            .await?;
        Ok(Response::new(service_pb(s)))
    }

    async fn list_services(&self, req: Request<pb::ListRequest>) -> R<pb::ListServicesResponse> {
        let c = caller(&self.id, &req)?;
        Ok(Response::new(pb::ListServicesResponse {
            services: self
                .id
                .list_services(&c)
                .await?
                .into_iter()
                .map(service_pb)
                .collect(),
        }))
    }

    async fn delete_service(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.get_ref();
        let key = if r.id.is_empty() {
            name("name", &r.name)?
        } else {
            id("id", &r.id)?.to_string()
        };
        self.id.delete_service(&c, &key).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_endpoint(&self, req: Request<pb::CreateEndpointRequest>) -> R<pb::Endpoint> {
        let c = caller(&self.id, &req)?;
        let r = req.into_inner();
        let iface = interface(r.interface)?.ok_or_else(|| invalid("interface is required"))?;
        let region = if r.region.is_empty() {
            "RegionOne".to_string()
        } else {
            name("region", &r.region)?
        };
        let e = self
            .id
            .create_endpoint(
                &c,
                &name("service", &r.service)?,
                iface,
                region,
                url("url", &r.url)?,
                r.enabled.unwrap_or(true),
            )
            .await?;
        Ok(Response::new(endpoint_pb(&e)))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> R<pb::ListEndpointsResponse> {
        let c = caller(&self.id, &req)?;
        let r = req.get_ref();
        let list = self
            .id
            .list_endpoints(
                &c,
                opt_id("service_id", &r.service_id)?,
                interface(r.interface)?,
            )
            .await?;
        Ok(Response::new(pb::ListEndpointsResponse {
            endpoints: list.iter().map(endpoint_pb).collect(),
        }))
    }

    async fn delete_endpoint(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let c = caller(&self.id, &req)?;
        self.id
            .delete_endpoint(&c, id("id", &req.get_ref().id)?)
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_catalog(&self, req: Request<pb::GetCatalogRequest>) -> R<pb::GetCatalogResponse> {
        let c = caller(&self.id, &req)?;
        Ok(Response::new(pb::GetCatalogResponse {
            catalog: catalog_pb(&self.id.catalog(&c).await?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(name("n", "ok name").is_ok());
        assert!(name("n", "").is_err());
        assert!(name("n", "   ").is_err());
        assert!(name("n", &"x".repeat(256)).is_err());
        assert!(name("n", &"é".repeat(255)).is_ok(), "counted in characters");
        assert!(name("n", "bad\nname").is_err());
    }

    #[test]
    fn ids_and_targets_are_checked() {
        assert!(id("id", "nope").is_err());
        assert!(id("id", "").is_err());
        assert_eq!(opt_id("id", "").ok(), Some(None));
        let u = Uuid::new_v4().to_string();
        assert!(target(&u, "", false).is_ok());
        assert!(target(&u, &u, false).is_err());
        assert!(target("", "", false).is_err());
        assert!(target("", "", true).is_ok());
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
