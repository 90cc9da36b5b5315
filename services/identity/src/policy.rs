//! Who may call what, inside the identity service. The sidecar enforces the
//! mesh policy in front of every service; these checks stay as defence in
//! depth. The table of rules per RPC is in this crate's README.

use token::{Claims, Scope};

use crate::error::{Error, Result};

/// The verified caller of an RPC: the claims of its bearer token, if it sent
/// one, and the mesh workload it comes from, if its sidecar said so.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    claims: Option<Claims>,
    mesh_peer: Option<String>,
}

/// SPIFFE ids of mesh workloads start with this.
pub const MESH_PREFIX: &str = "spiffe://cirrus.local/svc/";

impl Caller {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    /// Records the workload named by the sidecar's `x-cirrus-peer` header.
    pub fn with_peer(mut self, peer: Option<&str>) -> Self {
        self.mesh_peer = peer
            .filter(|p| p.starts_with(MESH_PREFIX))
            .map(str::to_owned);
        self
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
    Error::PermissionDenied("the caller's roles do not allow this".into())
}

/// Any valid token.
pub fn authenticated(c: &Caller) -> Result<&Claims> {
    c.claims
        .as_ref()
        .ok_or_else(|| Error::Unauthenticated("a bearer token is required".into()))
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
pub fn admin_or_user(c: &Caller, user_id: &str) -> Result<()> {
    let claims = authenticated(c)?;
    if claims.sub == user_id || claims.is_cloud_admin() {
        Ok(())
    } else {
        Err(denied())
    }
}

/// Only the user itself: nobody changes another's password this way.
pub fn same_user(c: &Caller, user_id: &str) -> Result<()> {
    let claims = authenticated(c)?;
    if claims.sub == user_id {
        Ok(())
    } else {
        Err(denied())
    }
}

/// A token scoped to the project, or an administrator.
pub fn admin_or_project_member(c: &Caller, project_id: &str) -> Result<()> {
    let claims = authenticated(c)?;
    if claims.project_id() == Some(project_id) || claims.is_cloud_admin() {
        Ok(())
    } else {
        Err(denied())
    }
}

/// A user of the domain or a token scoped to it, or an administrator.
pub fn admin_or_domain_member(c: &Caller, domain_id: &str) -> Result<()> {
    let claims = authenticated(c)?;
    let scoped = matches!(&claims.scope, Some(Scope::Domain { id, .. }) if id == domain_id);
    if scoped || claims.user_domain_id == domain_id || claims.is_cloud_admin() {
        Ok(())
    } else {
        Err(denied())
    }
}
