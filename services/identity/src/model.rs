//! The identity service's domain types, free of wire types: the objects it
//! keeps, and the validated parameters of every request (built from the wire
//! by `TryFrom` in [`crate::grpc`], so the domain code only ever sees values
//! that passed validation).

use std::fmt;

use runtime::types::{Name, NameOrId};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub id: Uuid,
    pub domain_id: Uuid,
    pub name: String,
    pub description: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub domain_id: Uuid,
    pub name: String,
    pub email: String,
    pub description: String,
    pub enabled: bool,
    pub locked_until: Option<OffsetDateTime>,
    /// Keystone's `ignore_lockout_failure_attempts`: failed logins never lock it.
    pub ignore_lockout: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub id: Uuid,
    pub name: String,
    pub description: String,
}

/// Where a role is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Project(Uuid),
    Domain(Uuid),
    System,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub user_id: Uuid,
    pub role_id: Uuid,
    pub role_name: String,
    pub target: Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Public,
    Internal,
    Admin,
}

impl Interface {
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Public => "public",
            Interface::Internal => "internal",
            Interface::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(Interface::Public),
            "internal" => Some(Interface::Internal),
            "admin" => Some(Interface::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub description: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: Uuid,
    pub service_id: Uuid,
    pub interface: Interface,
    pub region: String,
    pub url: String,
    pub enabled: bool,
}

/// A service with its enabled endpoints, as returned with tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: String,
    pub kind: String,
    pub endpoints: Vec<Endpoint>,
}

// ------------------------------------------------------------ references

/// A domain by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    Id(Uuid),
    Name(Name),
}

impl From<NameOrId> for DomainRef {
    fn from(n: NameOrId) -> Self {
        match n {
            NameOrId::Id(id) => DomainRef::Id(id),
            NameOrId::Name(n) => DomainRef::Name(n),
        }
    }
}

impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRef::Id(id) => write!(f, "{id}"),
            DomainRef::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A project or a user by id, or by name within a domain (the default
/// domain when none is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Id(Uuid),
    Name {
        name: Name,
        domain: Option<DomainRef>,
    },
}

impl fmt::Display for Ref {
    /// The key a `not found` answer echoes: what the caller gave.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ref::Id(id) => write!(f, "{id}"),
            Ref::Name { name, .. } => write!(f, "{name}"),
        }
    }
}

// ------------------------------------------------------- request values

/// How a caller proves who it is.
pub enum Credentials {
    Password { user: Ref, password: String },
    Token(String),
}

/// What a new token should be scoped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRequest {
    Unscoped,
    Project(Ref),
    Domain(DomainRef),
    System,
}

/// An `Authenticate` request.
pub struct Login {
    pub credentials: Credentials,
    pub scope: ScopeRequest,
}

/// What `RevokeToken` names.
pub enum Revoke {
    Token(String),
    AuditId(String),
}

pub struct NewDomain {
    pub name: Name,
    pub description: String,
    pub enabled: bool,
}

pub struct NewProject {
    pub name: Name,
    pub domain: Option<DomainRef>,
    pub description: String,
    pub enabled: bool,
}

pub struct NewUser {
    pub name: Name,
    pub domain: Option<DomainRef>,
    /// Never empty: a user made through the API can always log in.
    pub password: String,
    pub email: String,
    pub description: String,
    pub enabled: bool,
    pub ignore_lockout: bool,
}

/// Fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub name: Option<Name>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub email: Option<String>,
    pub password: Option<String>,
    pub ignore_lockout: Option<bool>,
}

/// An update of the object `id`.
pub struct Update {
    pub id: Uuid,
    pub patch: Patch,
}

pub struct PasswordChange {
    pub user_id: Uuid,
    pub original: String,
    pub new: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ProjectFilter {
    pub domain_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
}

pub struct NewRole {
    pub name: Name,
    pub description: String,
}

/// `prior` implies `implied`.
pub struct Implication {
    pub prior: NameOrId,
    pub implied: NameOrId,
}

/// A role on a target for a user.
pub struct Grant {
    pub user_id: Uuid,
    pub role: NameOrId,
    pub target: Target,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AssignmentFilter {
    pub user_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    pub domain_id: Option<Uuid>,
}

pub struct NewService {
    pub name: Name,
    pub kind: Name,
    pub description: String,
    pub enabled: bool,
}

pub struct NewEndpoint {
    pub service: NameOrId,
    pub interface: Interface,
    pub region: String,
    pub url: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointFilter {
    pub service_id: Option<Uuid>,
    pub interface: Option<Interface>,
}
