//! Authentication, tokens, revocation, key rotation and Watch, against a real
//! server and a real Postgres.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::identity::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn password_gives_a_token_whose_claims_validate() {
    let s = Server::start().await;
    let issued = s
        .login("admin", ADMIN_PASSWORD, Some(project_scope("admin")))
        .await
        .unwrap();
    assert!(issued.token.starts_with("v4.public."));
    let claims = issued.claims.unwrap();
    assert_eq!(claims.user_name, "admin");
    assert_eq!(claims.project_name, "admin");
    assert!(claims.is_admin_project);
    assert_eq!(claims.methods, ["password"]);
    assert_eq!(claims.audit_ids.len(), 1);
    let ttl = claims.expires_at.unwrap().seconds - claims.issued_at.unwrap().seconds;
    assert_eq!(ttl, 3600, "default lifetime is one hour");
    assert!(
        issued
            .catalog
            .iter()
            .any(|c| c.r#type == "identity" && c.endpoints.len() == 2)
    );

    let validated = s.validate(&issued.token, &issued.token).await.unwrap();
    assert_eq!(validated.user_id, claims.user_id);
    assert_eq!(validated.roles, claims.roles);
    // The offline verifier agrees with the RPC.
    assert_eq!(
        s.identity.verify(&issued.token).unwrap().sub,
        claims.user_id
    );
    s.stop().await;
}

#[tokio::test]
async fn implied_roles_expand_admin_to_member_and_reader() {
    let s = Server::start().await;
    let claims = s
        .login("admin", ADMIN_PASSWORD, Some(project_scope("admin")))
        .await
        .unwrap()
        .claims
        .unwrap();
    assert_eq!(claims.roles, ["admin", "member", "reader"]);

    let admin = s.admin_token().await;
    s.user_with_role(&admin, "carol", "pw-carol", "proj-c", "member")
        .await;
    let c = s
        .login("carol", "pw-carol", Some(project_scope("proj-c")))
        .await
        .unwrap()
        .claims
        .unwrap();
    assert_eq!(c.roles, ["member", "reader"]);
    assert!(!c.is_admin_project);
}

#[tokio::test]
async fn disabled_user_and_project_are_refused_and_their_tokens_revoked() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (project, user) = s
        .user_with_role(&admin, "erin", "pw-erin", "proj-e", "member")
        .await;
    let before = s.project_token("erin", "pw-erin", "proj-e").await;

    s.resources()
        .update_project(auth(
            pb::UpdateProjectRequest {
                id: project.clone(),
                enabled: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_code(s.validate(&before, &admin).await, Code::Unauthenticated);
    assert_code(
        s.login("erin", "pw-erin", Some(project_scope("proj-e")))
            .await,
        Code::Unauthenticated,
    );
    // Unscoped still works: only the project is disabled.
    let unscoped = s.login("erin", "pw-erin", None).await.unwrap().token;

    s.users()
        .update_user(auth(
            pb::UpdateUserRequest {
                id: user,
                enabled: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_status(
        s.validate(&unscoped, &admin).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    // Disabled reads like any other refusal (the reason is in the log).
    assert_status(
        s.login("erin", "pw-erin", None).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
}

#[tokio::test]
async fn revoked_expired_and_tampered_tokens_are_refused() {
    let s = Server::start_with(|c| c.token_ttl_secs = 1).await;
    let admin = s.project_token("admin", ADMIN_PASSWORD, "admin").await;
    let victim = s.login("admin", ADMIN_PASSWORD, None).await.unwrap().token;

    // Tampered: change one character inside the signed body.
    let mut bytes = victim.clone().into_bytes();
    let i = "v4.public.".len() + 5;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_status(
        s.validate(&tampered, &admin).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.validate_as_mesh(&tampered, &admin).await,
        Code::Unauthenticated,
        "authentication failed: token signature is invalid",
    );
    assert_status(
        s.validate("garbage", &admin).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.validate_as_mesh("garbage", &admin).await,
        Code::Unauthenticated,
        "authentication failed: malformed token",
    );

    // Revoked.
    s.tokens()
        .revoke_token(auth(
            pb::RevokeTokenRequest {
                target: Some(pb::revoke_token_request::Target::Token(victim.clone())),
            },
            &victim,
        ))
        .await
        .unwrap();
    assert_status(
        s.validate(&victim, &admin).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.validate_as_mesh(&victim, &admin).await,
        Code::Unauthenticated,
        "authentication failed: token has been revoked",
    );
    assert_status(
        s.tokens().authenticate(token_request(&victim, None)).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.tokens()
            .authenticate(mesh(tonic::Request::new(token_request(&victim, None))))
            .await,
        Code::Unauthenticated,
        "authentication failed: token has been revoked",
    );

    // Expired (one-second lifetime): wait for it, bounded.
    let (public, seen_by_mesh) = wait_for(
        "the admin token to expire",
        Duration::from_secs(10),
        || async {
            let fresh = s
                .login("admin", ADMIN_PASSWORD, None)
                .await
                .map_err(|e| format!("{e:?}"))?
                .token;
            match s.validate_as_mesh(&admin, &fresh).await {
                Err(e) if e.message().ends_with("expired") => {
                    Ok((s.validate(&admin, &fresh).await, e.message().to_string()))
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(seen_by_mesh, "authentication failed: token has expired");
    assert_status(public, Code::Unauthenticated, AUTH_FAILED);
}

#[tokio::test]
async fn rescoped_tokens_never_outlive_their_parent_and_share_its_chain() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "fay", "pw-fay", "proj-f", "member")
        .await;
    let parent = s.login("fay", "pw-fay", None).await.unwrap();
    let pc = parent.claims.unwrap();
    let child = s
        .tokens()
        .authenticate(token_request(&parent.token, Some(project_scope("proj-f"))))
        .await
        .unwrap()
        .into_inner();
    let cc = child.claims.unwrap();
    assert_eq!(cc.project_name, "proj-f");
    assert_eq!(cc.methods, ["password", "token"]);
    assert!(cc.expires_at.unwrap().seconds <= pc.expires_at.unwrap().seconds);
    assert_eq!(cc.audit_ids[1], pc.audit_ids[0]);

    // Revoking the parent's audit id takes the child too.
    s.tokens()
        .revoke_token(auth(
            pb::RevokeTokenRequest {
                target: Some(pb::revoke_token_request::Target::AuditId(
                    pc.audit_ids[0].clone(),
                )),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_code(
        s.validate(&child.token, &admin).await,
        Code::Unauthenticated,
    );
}

#[tokio::test]
async fn a_member_of_one_project_cannot_scope_to_another() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "gus", "pw-gus", "proj-a", "member")
        .await;
    s.resources()
        .create_project(auth(
            pb::CreateProjectRequest {
                name: "proj-b".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    s.login("gus", "pw-gus", Some(project_scope("proj-a")))
        .await
        .unwrap();
    // Another project and a missing one read the same.
    const NO_ROLE: &str = "the user has no role on the requested scope";
    assert_status(
        s.login("gus", "pw-gus", Some(project_scope("proj-b")))
            .await,
        Code::PermissionDenied,
        NO_ROLE,
    );
    assert_status(
        s.login("gus", "pw-gus", Some(project_scope("no-such")))
            .await,
        Code::PermissionDenied,
        NO_ROLE,
    );
    let system = pb::Scope {
        target: Some(pb::scope::Target::System(true)),
    };
    assert_code(
        s.login("gus", "pw-gus", Some(system)).await,
        Code::PermissionDenied,
    );
    let unscoped = s.login("gus", "pw-gus", None).await.unwrap().token;
    assert_code(
        s.tokens()
            .authenticate(token_request(&unscoped, Some(project_scope("proj-b"))))
            .await,
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn removing_a_role_assignment_revokes_tokens_on_that_project() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (project, user) = s
        .user_with_role(&admin, "hal", "pw-hal", "proj-h", "member")
        .await;
    let t = s.project_token("hal", "pw-hal", "proj-h").await;
    let unscoped = s.login("hal", "pw-hal", None).await.unwrap().token;
    s.roles()
        .unassign_role(auth(
            pb::RoleAssignment {
                role: "member".into(),
                user_id: user,
                project_id: project,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_code(s.validate(&t, &admin).await, Code::Unauthenticated);
    s.validate(&unscoped, &admin).await.unwrap();
}

#[tokio::test]
async fn changing_a_password_revokes_the_users_tokens() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (_, user) = s
        .user_with_role(&admin, "ida", "pw-ida", "proj-i", "member")
        .await;
    let old = s.login("ida", "pw-ida", None).await.unwrap().token;
    assert_code(
        s.users()
            .change_password(auth(
                pb::ChangePasswordRequest {
                    user_id: user.clone(),
                    original_password: "wrong".into(),
                    new_password: "pw-ida-2".into(),
                },
                &old,
            ))
            .await,
        Code::Unauthenticated,
    );
    s.users()
        .change_password(auth(
            pb::ChangePasswordRequest {
                user_id: user,
                original_password: "pw-ida".into(),
                new_password: "pw-ida-2".into(),
            },
            &old,
        ))
        .await
        .unwrap();
    assert_code(s.validate(&old, &admin).await, Code::Unauthenticated);
    assert_code(s.login("ida", "pw-ida", None).await, Code::Unauthenticated);
    s.login("ida", "pw-ida-2", None).await.unwrap();
}

#[tokio::test]
async fn key_rotation_keeps_secondary_keys_verifying_and_drops_removed_ones() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let old = s.login("admin", ADMIN_PASSWORD, None).await.unwrap();
    let old_kid = old.claims.unwrap().key_id;

    let keys = s
        .tokens()
        .rotate_keys(auth(pb::RotateKeysRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 3);
    let secondary = keys.iter().find(|k| k.key_id == old_kid).unwrap();
    assert_eq!(secondary.state, pb::KeyState::Secondary as i32);
    // Signed by a key that is now secondary: still valid.
    s.validate(&old.token, &admin).await.unwrap();
    let newer = s.login("admin", ADMIN_PASSWORD, None).await.unwrap();
    assert_ne!(
        newer.claims.unwrap().key_id,
        old_kid,
        "the new primary signs"
    );

    // A second rotation with max_active_keys = 3 removes the oldest key.
    let admin2 = s.admin_token().await;
    let keys = s
        .tokens()
        .rotate_keys(auth(pb::RotateKeysRequest {}, &admin2))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.key_id != old_kid));
    assert_status(
        s.validate(&old.token, &admin2).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.validate_as_mesh(&old.token, &admin2).await,
        Code::Unauthenticated,
        "authentication failed: token signed by an unknown key",
    );
    s.validate(&newer.token, &admin2).await.unwrap();

    // Only admins rotate.
    let (_, _) = s
        .user_with_role(&admin2, "jo", "pw-jo", "proj-j", "member")
        .await;
    let jo = s.project_token("jo", "pw-jo", "proj-j").await;
    assert_code(
        s.tokens()
            .rotate_keys(auth(pb::RotateKeysRequest {}, &jo))
            .await,
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn watch_sends_a_snapshot_then_revocations_and_key_changes_promptly() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let mut stream = s
        .tokens()
        .watch(auth(pb::WatchRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(pb::watch_event::Event::Snapshot(snap)) = first.event else {
        panic!("first event must be a snapshot: {first:?}")
    };
    assert_eq!(snap.keys.len(), 2, "staged and primary");

    let victim = s.login("admin", ADMIN_PASSWORD, None).await.unwrap();
    let audit = victim.claims.unwrap().audit_ids[0].clone();
    s.tokens()
        .revoke_token(auth(
            pb::RevokeTokenRequest {
                target: Some(pb::revoke_token_request::Target::Token(victim.token)),
            },
            &admin,
        ))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("revocation delivered within 5 s")
        .unwrap()
        .unwrap();
    match ev.event {
        Some(pb::watch_event::Event::Revocation(r)) => assert_eq!(r.audit_id, audit),
        other => panic!("expected a revocation, got {other:?}"),
    }

    s.tokens()
        .rotate_keys(auth(pb::RotateKeysRequest {}, &admin))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("key change delivered within 5 s")
        .unwrap()
        .unwrap();
    assert!(matches!(ev.event, Some(pb::watch_event::Event::Keys(k)) if k.keys.len() == 3));

    // Anonymous callers may not watch; a mesh peer (a sidecar) may, without a token.
    assert_status(
        s.tokens().watch(pb::WatchRequest {}).await.map(|_| ()),
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    let mut peer = s
        .tokens()
        .watch(mesh(tonic::Request::new(pb::WatchRequest {})))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        peer.message().await.unwrap().unwrap().event,
        Some(pb::watch_event::Event::Snapshot(_))
    ));
    // Shutdown ends the stream rather than hanging the drain.
    s.stop().await;
}

#[tokio::test]
async fn revocations_survive_a_restart() {
    use identity::model::{Credentials, DomainRef, Login, Ref, Revoke, ScopeRequest};
    use runtime::types::Name;
    let db = runtime::db::TestDatabase::create().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let config = test_config(&db, &keys);
    let first = identity::Identity::start(config.clone()).await.unwrap();
    first
        .bootstrap(&bootstrap_spec(config.server.listen))
        .await
        .unwrap();
    let issued = first
        .authenticate(Login {
            credentials: Credentials::Password {
                user: Ref::Name {
                    name: Name::parse("user", "admin").unwrap(),
                    domain: Some(DomainRef::Name(Name::parse("domain", "Default").unwrap())),
                },
                password: ADMIN_PASSWORD.into(),
            },
            scope: ScopeRequest::Unscoped,
        })
        .await
        .unwrap();
    let caller = first.caller(Some(&issued.token)).unwrap();
    first
        .revoke_token(&caller, Revoke::Token(issued.token.clone()))
        .await
        .unwrap();
    drop(first);

    let second = identity::Identity::start(config).await.unwrap();
    assert!(
        second.verify(&issued.token).is_err(),
        "rule reloaded from Postgres"
    );
}
