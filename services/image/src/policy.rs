//! Who may do what with an image. The sidecar enforces the mesh policy per
//! method in front of the service; these checks are the image rules proper
//! (ownership, visibility, membership), applied in every handler. The table
//! of rules per RPC is in this crate's README.
//!
//! Roles: `reader` may look and download; `member` (or `admin`) may also
//! create and change its project's images; a cloud administrator
//! (`x-cirrus-is-admin: true`) may do anything, and alone may publish, set
//! quotas and deactivate.

pub use runtime::caller::Caller;

use crate::model::{Image, MemberStatus, Visibility};
use runtime::error::{Error, Result};

const WRITE_ROLES: [&str; 2] = ["member", "admin"];
const READ_ROLES: [&str; 3] = ["reader", "member", "admin"];

fn denied(why: &str) -> Error {
    Error::forbidden(why)
}

/// Every request must come through the sidecar with a verified user.
pub fn authenticated(c: &Caller) -> Result<()> {
    if c.is_authenticated() {
        Ok(())
    } else {
        Err(Error::unauthenticated(
            "no verified caller: requests reach the image service through its sidecar",
        ))
    }
}

pub fn admin(c: &Caller) -> Result<()> {
    authenticated(c)?;
    if c.is_admin {
        Ok(())
    } else {
        Err(denied("only an administrator may do this"))
    }
}

/// Looking at images at all: any of reader, member, admin.
pub fn reader(c: &Caller) -> Result<()> {
    authenticated(c)?;
    if c.is_admin || READ_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(())
    } else {
        Err(denied("the caller's roles do not allow reading images"))
    }
}

/// Creating images: a member of a project; returns that project.
pub fn creator(c: &Caller) -> Result<&str> {
    authenticated(c)?;
    let project = c
        .project_id
        .as_deref()
        .ok_or_else(|| denied("a project-scoped token is required"))?;
    if c.is_admin || WRITE_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(project)
    } else {
        Err(denied("the caller's roles do not allow changing images"))
    }
}

pub fn owns(c: &Caller, image: &Image) -> bool {
    c.project_id.as_deref() == Some(image.owner.as_str())
}

/// Whether the caller may see `image` at all. `membership` is the caller's
/// project's membership of it, if any.
pub fn visible(c: &Caller, image: &Image, membership: Option<MemberStatus>) -> bool {
    c.is_admin
        || owns(c, image)
        || matches!(image.visibility, Visibility::Public | Visibility::Community)
        || (image.visibility == Visibility::Shared && membership.is_some())
}

/// Changing an image (data, attributes, members, deletion): a member of the
/// owner project, or an administrator.
pub fn modify(c: &Caller, image: &Image) -> Result<()> {
    authenticated(c)?;
    if c.is_admin {
        return Ok(());
    }
    if !owns(c, image) {
        return Err(denied("only the owner project may change this image"));
    }
    if WRITE_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(())
    } else {
        Err(denied("the caller's roles do not allow changing images"))
    }
}

/// Publishing is for administrators only.
pub fn set_visibility(c: &Caller, v: Visibility) -> Result<()> {
    if v == Visibility::Public && !c.is_admin {
        return Err(denied("only an administrator may make an image public"));
    }
    Ok(())
}

/// Accepting or rejecting a share: a member (role) of the member project.
pub fn member_of(c: &Caller, project: &str) -> Result<()> {
    authenticated(c)?;
    if c.project_id.as_deref() != Some(project) {
        return Err(denied(
            "only the member project may accept or reject a share",
        ));
    }
    if c.is_admin || WRITE_ROLES.iter().any(|r| c.has_role(r)) {
        Ok(())
    } else {
        Err(denied(
            "the caller's roles do not allow changing memberships",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn caller(project: &str, roles: &[&str], admin: bool) -> Caller {
        Caller {
            user_id: Some("u".into()),
            project_id: Some(project.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            is_admin: admin,
            ..Default::default()
        }
    }

    fn image(owner: &str, visibility: Visibility) -> Image {
        Image {
            id: uuid::Uuid::nil(),
            name: String::new(),
            owner: owner.into(),
            status: Status::Queued,
            visibility,
            disk_format: DiskFormat::Raw,
            container_format: ContainerFormat::Bare,
            min_disk: 0,
            min_ram: 0,
            protected: false,
            properties: Default::default(),
            tags: vec![],
            expected_size: None,
            expected_sha256: String::new(),
            size: None,
            sha256: String::new(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn rules() {
        let reader = caller("p", &["reader"], false);
        let member = caller("p", &["member", "reader"], false);
        let other = caller("q", &["member"], false);
        let admin = caller("a", &["admin"], true);
        let private = image("p", Visibility::Private);
        let shared = image("p", Visibility::Shared);

        assert!(authenticated(&Caller::default()).is_err());
        assert!(creator(&reader).is_err());
        assert_eq!(creator(&member).ok(), Some("p"));
        assert!(modify(&reader, &private).is_err());
        assert!(modify(&member, &private).is_ok());
        assert!(modify(&other, &private).is_err());
        assert!(modify(&admin, &private).is_ok());
        assert!(visible(&reader, &private, None));
        assert!(!visible(&other, &private, None));
        assert!(!visible(&other, &shared, None));
        assert!(visible(&other, &shared, Some(MemberStatus::Pending)));
        assert!(visible(&other, &image("p", Visibility::Community), None));
        assert!(set_visibility(&member, Visibility::Public).is_err());
        assert!(set_visibility(&admin, Visibility::Public).is_ok());
        assert!(member_of(&other, "q").is_ok());
        assert!(member_of(&other, "p").is_err());
    }
}
