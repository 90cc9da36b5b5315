//! Who may call what, inside the identity service. The sidecar enforces the
//! mesh policy in front of every service; these checks stay as defence in
//! depth. The table of rules per RPC is in this crate's README.

use token::{Claims, Scope};

use crate::error::{Error, Result};

/// The verified caller of an RPC: the claims of its bearer token, if it sent one.
#[derive(Debug, Clone, Default)]
pub struct Caller(Option<Claims>);

impl Caller {
    pub fn anonymous() -> Self {
        Self(None)
    }

    pub fn claims(&self) -> Option<&Claims> {
        self.0.as_ref()
    }
}

impl From<Claims> for Caller {
    fn from(c: Claims) -> Self {
        Self(Some(c))
    }
}

fn denied() -> Error {
    Error::PermissionDenied("the caller's roles do not allow this".into())
}

/// Any valid token.
pub fn authenticated(c: &Caller) -> Result<&Claims> {
    c.0.as_ref()
        .ok_or_else(|| Error::Unauthenticated("a bearer token is required".into()))
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
