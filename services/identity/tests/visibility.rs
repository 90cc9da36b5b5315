//! What a caller may learn (issue 14 item 2): whatever it may not read
//! answers `NOT_FOUND` exactly as a missing one does; why a token was
//! refused is for mesh peers and the log only; a database failure reads
//! `internal error` and nothing more.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::identity::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn get_answers_not_found_for_what_the_caller_may_not_read() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (own, kim_id) = s
        .user_with_role(&admin, "kim", "pw-kim", "proj-k", "member")
        .await;
    let (other, _) = s
        .user_with_role(&admin, "lou", "pw-lou", "proj-l", "member")
        .await;
    let secret = s
        .resources()
        .create_domain(auth(
            pb::CreateDomainRequest {
                name: "Secret".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let kim = s.project_token("kim", "pw-kim", "proj-k").await;
    let missing = uuid::Uuid::new_v4().to_string();

    // Projects: its own is readable; another one, by id or by name, reads
    // exactly like one that does not exist.
    s.resources()
        .get_project(auth(by_id(&own), &kim))
        .await
        .unwrap();
    for (r, key) in [
        (by_id(&other), other.as_str()),
        (by_id(&missing), missing.as_str()),
        (by_name("proj-l"), "proj-l"),
        (by_name("admin"), "admin"),
        (by_name("no-such"), "no-such"),
    ] {
        assert_status(
            s.resources().get_project(auth(r, &kim)).await,
            Code::NotFound,
            &format!("project {key} not found"),
        );
    }
    // A name in a domain that does not exist reads the same too.
    let in_nowhere = pb::GetRequest {
        name: "proj-l".into(),
        domain_name: "Nowhere".into(),
        ..Default::default()
    };
    assert_status(
        s.resources().get_project(auth(in_nowhere, &kim)).await,
        Code::NotFound,
        "project proj-l not found",
    );

    // Users: itself, yes; any other, as missing.
    assert_eq!(s.user(&kim, "kim").await.id, kim_id);
    let admin_id = s.user(&admin, "admin").await.id;
    for (r, key) in [
        (by_id(&admin_id), admin_id.as_str()),
        (by_id(&missing), missing.as_str()),
        (by_name("lou"), "lou"),
        (by_name("ghost"), "ghost"),
    ] {
        assert_status(
            s.users().get_user(auth(r, &kim)).await,
            Code::NotFound,
            &format!("user {key} not found"),
        );
    }

    // Domains: its own user's domain, yes; another, as missing.
    s.resources()
        .get_domain(auth(by_name("Default"), &kim))
        .await
        .unwrap();
    for (r, key) in [
        (by_name("Secret"), "Secret"),
        (by_name("Nowhere"), "Nowhere"),
        (by_id(&secret.id), secret.id.as_str()),
    ] {
        assert_status(
            s.resources().get_domain(auth(r, &kim)).await,
            Code::NotFound,
            &format!("domain {key} not found"),
        );
    }
    // The admin reads all of them.
    s.resources()
        .get_domain(auth(by_id(&secret.id), &admin))
        .await
        .unwrap();
    s.users()
        .get_user(auth(by_name("lou"), &admin))
        .await
        .unwrap();

    // Listing the users of a domain is for admins only, whoever asks.
    for domain_id in [secret.id.clone(), String::new()] {
        assert_status(
            s.users()
                .list_users(auth(pb::ListUsersRequest { domain_id }, &kim))
                .await,
            Code::PermissionDenied,
            "the caller's roles do not allow this",
        );
    }
}

#[tokio::test]
async fn a_scope_without_a_role_reads_the_same_whatever_its_state() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "gus", "pw-gus", "proj-g", "member")
        .await;
    let off = s
        .resources()
        .create_project(auth(
            pb::CreateProjectRequest {
                name: "proj-off".into(),
                enabled: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!off.enabled);
    // A disabled project gus holds no role on reads like a missing one: the
    // state of a project is no business of someone without a role on it.
    for project in ["proj-off", "no-such"] {
        assert_status(
            s.login("gus", "pw-gus", Some(project_scope(project))).await,
            Code::PermissionDenied,
            "the user has no role on the requested scope",
        );
    }
}

/// A re-scope reads the user's state in the same statement as the project
/// and the roles (a login checked the user first): it answers as a login
/// does in every case.
#[tokio::test]
async fn a_rescope_answers_as_a_login_does_for_every_scope_state() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (project, _) = s
        .user_with_role(&admin, "hal", "pw-hal", "proj-h", "member")
        .await;
    s.resources()
        .create_project(auth(
            pb::CreateProjectRequest {
                name: "proj-other".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let unscoped = s.login("hal", "pw-hal", None).await.unwrap().token;
    let rescope = |scope: &str| {
        let mut t = s.tokens();
        let req = token_request(&unscoped, Some(project_scope(scope)));
        async move { t.authenticate(req).await }
    };

    // A role held: the project's token, with the implied role too.
    let c = rescope("proj-h")
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap();
    assert_eq!(c.project_name, "proj-h");
    let mut roles = c.roles.clone();
    roles.sort();
    assert_eq!(roles, ["member", "reader"]);

    // No role, or no such project: the same refusal, as for a login.
    for project in ["proj-other", "no-such"] {
        assert_status(
            rescope(project).await,
            Code::PermissionDenied,
            "the user has no role on the requested scope",
        );
        assert_status(
            s.login("hal", "pw-hal", Some(project_scope(project))).await,
            Code::PermissionDenied,
            "the user has no role on the requested scope",
        );
    }

    // A role on a disabled project: refused as disabled, by both paths.
    s.resources()
        .update_project(auth(
            pb::UpdateProjectRequest {
                id: project,
                enabled: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_code(rescope("proj-h").await, Code::Unauthenticated);
    assert_code(
        s.login("hal", "pw-hal", Some(project_scope("proj-h")))
            .await,
        Code::Unauthenticated,
    );
}

#[tokio::test]
async fn why_a_token_was_refused_is_for_mesh_peers_only() {
    let s = Server::start().await;
    let list = || pb::ListRequest {};
    // A bearer token that does not verify, from outside and from the mesh.
    assert_status(
        s.roles()
            .list_roles(auth(list(), "v4.public.garbage"))
            .await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.roles()
            .list_roles(mesh(auth(list(), "v4.public.garbage")))
            .await,
        Code::Unauthenticated,
        "authentication failed: malformed token",
    );
    // No token where one is needed.
    assert_status(
        s.roles().list_roles(list()).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    // A header that is not a bearer token.
    let mut req = tonic::Request::new(list());
    req.metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    assert_status(
        s.roles().list_roles(mesh(req)).await,
        Code::Unauthenticated,
        "authentication failed: authorization is not \"Bearer <token>\"",
    );
}

#[tokio::test]
async fn deletes_resolve_authorize_and_act_in_one_call() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "vic", "pw-vic", "proj-v", "member")
        .await;
    let vic = s.project_token("vic", "pw-vic", "proj-v").await;
    // A non-admin is refused before anything is looked up: a missing and an
    // existing name read the same.
    for name in ["proj-v", "no-such"] {
        assert_status(
            s.resources()
                .delete_project(auth(
                    pb::DeleteRequest {
                        name: name.into(),
                        ..Default::default()
                    },
                    &vic,
                ))
                .await,
            Code::PermissionDenied,
            "the caller's roles do not allow this",
        );
    }
    // By name, in one call; the user's tokens die with it.
    s.users()
        .delete_user(auth(delete_by_name("vic"), &admin))
        .await
        .unwrap();
    assert_status(
        s.validate(&vic, &admin).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        s.users()
            .delete_user(auth(delete_by_name("vic"), &admin))
            .await,
        Code::NotFound,
        "user vic not found",
    );
    s.resources()
        .delete_project(auth(delete_by_name("proj-v"), &admin))
        .await
        .unwrap();
    assert_status(
        s.resources()
            .get_project(auth(by_name("proj-v"), &admin))
            .await,
        Code::NotFound,
        "project proj-v not found",
    );
}

#[tokio::test]
async fn a_database_failure_reads_internal_error_and_nothing_more() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    // Pull the schema out from under the running service.
    let db = runtime::db::connect(&s.db.url).await.unwrap();
    db.batch_execute("DROP SCHEMA identity CASCADE")
        .await
        .unwrap();

    assert_status(
        s.roles().list_roles(auth(pb::ListRequest {}, &admin)).await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        s.login("admin", ADMIN_PASSWORD, None).await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        s.users().get_user(auth(by_name("admin"), &admin)).await,
        Code::Internal,
        "internal error",
    );
    // Tokens still verify offline: identity keeps answering what needs no database.
    s.tokens()
        .list_signing_keys(pb::ListSigningKeysRequest {})
        .await
        .unwrap();
}
