//! Who may call what, inside the identity service. The sidecar enforces the
//! mesh policy in front of every service; these checks stay as defence in
//! depth. The table of rules per RPC is in this crate's README.
//!
//! Identity is the one service that reads bearer tokens itself (it issues
//! them). Checks that gate an action return `Forbidden`; checks that gate a
//! *read* are predicates, so that the service answers `NotFound` for what a
//! caller may not see, exactly as for what does not exist.

use runtime::error::{Error, Result};
use token::{Claims, Scope};
use uuid::Uuid;

/// The verified caller of an RPC: the claims of its bearer token, if it sent
/// one, and the mesh workload it comes from, if its sidecar said so.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    claims: Option<Claims>,
    mesh_peer: Option<String>,
}

/// SPIFFE ids of mesh workloads start with this.
pub const MESH_PREFIX: &str = "spiffe://cirrus.local/svc/";

/// Whether the sidecar's `x-cirrus-peer` value names a mesh workload.
pub fn is_mesh(peer: Option<&str>) -> bool {
    peer.is_some_and(|p| p.starts_with(MESH_PREFIX))
}

impl Caller {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    /// Records the workload named by the sidecar's `x-cirrus-peer` header.
    pub fn with_peer(mut self, peer: Option<&str>) -> Self {
        self.mesh_peer = peer.filter(|p| is_mesh(Some(p))).map(str::to_owned);
        self
    }

    /// A mesh workload (a sidecar), which may read why a token was refused.
    pub fn is_mesh(&self) -> bool {
        self.mesh_peer.is_some()
    }
}

impl From<Claims> for Caller {
    fn from(c: Claims) -> Self {
        Self {
            claims: Some(c),
            mesh_peer: None,
        }
    }
}

fn denied() -> Error {
    Error::forbidden("the caller's roles do not allow this")
}

/// Any valid token.
pub fn authenticated(c: &Caller) -> Result<&Claims> {
    c.claims
        .as_ref()
        .ok_or_else(|| Error::unauthenticated("a bearer token is required"))
}

/// Any valid token, or a mesh workload (a sidecar following keys and the catalog).
pub fn authenticated_or_mesh(c: &Caller) -> Result<()> {
    if c.mesh_peer.is_some() {
        return Ok(());
    }
    authenticated(c).map(|_| ())
}

/// A cloud administrator: `admin` on the system scope or on the admin project.
pub fn admin(c: &Caller) -> Result<&Claims> {
    let claims = authenticated(c)?;
    if claims.is_cloud_admin() {
        Ok(claims)
    } else {
        Err(denied())
    }
}

/// The user itself (any scope), or an administrator.
pub fn admin_or_user(c: &Caller, user_id: Uuid) -> Result<()> {
    if reads_user(authenticated(c)?, user_id) {
        Ok(())
    } else {
        Err(denied())
    }
}

/// Only the user itself: nobody changes another's password this way.
pub fn same_user(c: &Caller, user_id: Uuid) -> Result<()> {
    if authenticated(c)?.sub == user_id.to_string() {
        Ok(())
    } else {
        Err(denied())
    }
}

/// May read the user: itself, or an administrator.
pub fn reads_user(claims: &Claims, user_id: Uuid) -> bool {
    claims.sub == user_id.to_string() || claims.is_cloud_admin()
}

/// May read the project: a token scoped to it, or an administrator.
pub fn reads_project(claims: &Claims, project_id: Uuid) -> bool {
    claims.project_id() == Some(project_id.to_string().as_str()) || claims.is_cloud_admin()
}

/// May read the domain: a user of it or a token scoped to it, or an administrator.
pub fn reads_domain(claims: &Claims, domain_id: Uuid) -> bool {
    let id = domain_id.to_string();
    let scoped = matches!(&claims.scope, Some(Scope::Domain { id: d, .. }) if *d == id);
    scoped || claims.user_domain_id == id || claims.is_cloud_admin()
}
