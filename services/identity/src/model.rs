//! The identity service's domain types, free of wire types.

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

/// A reference by id, or by name (with the domain for per-domain names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Id(Uuid),
    Name {
        name: String,
        domain: Option<DomainRef>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    Id(Uuid),
    Name(String),
}

/// Fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub email: Option<String>,
    pub password: Option<String>,
}
