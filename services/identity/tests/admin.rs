//! Administration of domains, projects, users, roles and the catalog: who may
//! do it, and what bad input gets.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proto::identity::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn a_non_admin_cannot_administer() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let (project, user) = s
        .user_with_role(&admin, "kim", "pw-kim", "proj-k", "member")
        .await;
    let kim = s.project_token("kim", "pw-kim", "proj-k").await;

    let create = pb::CreateUserRequest {
        name: "mallory".into(),
        password: "x".into(),
        ..Default::default()
    };
    assert_code(
        s.users().create_user(auth(create.clone(), &kim)).await,
        Code::PermissionDenied,
    );
    assert_status(
        s.users().create_user(create).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_code(
        s.users()
            .list_users(auth(pb::ListUsersRequest::default(), &kim))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        s.roles()
            .assign_role(auth(
                pb::RoleAssignment {
                    role: "admin".into(),
                    user_id: user.clone(),
                    project_id: project.clone(),
                    ..Default::default()
                },
                &kim,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        s.catalog()
            .create_service(auth(
                pb::CreateServiceRequest {
                    name: "evil".into(),
                    r#type: "evil".into(),
                    ..Default::default()
                },
                &kim,
            ))
            .await,
        Code::PermissionDenied,
    );
    // A user may read itself, its project and the catalog, but not others.
    let me = s
        .users()
        .get_user(auth(
            pb::GetRequest {
                id: user.clone(),
                ..Default::default()
            },
            &kim,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.name, "kim");
    s.resources()
        .get_project(auth(
            pb::GetRequest {
                id: project,
                ..Default::default()
            },
            &kim,
        ))
        .await
        .unwrap();
    // Another user reads as missing (no existence oracle).
    assert_status(
        s.users().get_user(auth(by_name("admin"), &kim)).await,
        Code::NotFound,
        "user admin not found",
    );
    s.catalog()
        .get_catalog(auth(pb::GetCatalogRequest {}, &kim))
        .await
        .unwrap();
    // A member's admin role on an ordinary project does not make a cloud admin.
    let (_, _) = s
        .user_with_role(&admin, "leo", "pw-leo", "proj-l", "admin")
        .await;
    let leo = s.project_token("leo", "pw-leo", "proj-l").await;
    assert_code(
        s.users()
            .list_users(auth(pb::ListUsersRequest::default(), &leo))
            .await,
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_or_already_exists_and_writes_nothing() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let before = s.user_count(&admin).await;

    for (bad, why) in [
        ("", "name: must not be empty"),
        ("   ", "name: must not be empty"),
        (
            &"x".repeat(256) as &str,
            "name: is longer than 255 characters",
        ),
        ("tab\tname", "name: contains control characters"),
        (
            "0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a",
            "name: must not look like an id (a UUID)",
        ),
    ] {
        let r = s
            .users()
            .create_user(auth(
                pb::CreateUserRequest {
                    name: bad.to_string(),
                    password: "pw".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await;
        assert_status(r, Code::InvalidArgument, why);
    }
    assert_status(
        s.users().get_user(auth(by_id("not-a-uuid"), &admin)).await,
        Code::InvalidArgument,
        "id: is not a valid id: \"not-a-uuid\"",
    );
    let nadia = |password: &str, domain_id: &str, domain_name: &str| pb::CreateUserRequest {
        name: "nadia".into(),
        password: password.into(),
        domain_id: domain_id.into(),
        domain_name: domain_name.into(),
        ..Default::default()
    };
    let admin_again = pb::CreateUserRequest {
        name: "admin".into(),
        password: "pw".into(),
        ..Default::default()
    };
    for (request, code, message) in [
        (
            nadia("pw", "zzz", ""),
            Code::InvalidArgument,
            "domain_id: is not a valid id: \"zzz\"",
        ),
        (
            nadia("pw", "", "NoSuchDomain"),
            Code::NotFound,
            "domain NoSuchDomain not found",
        ),
        // An empty password is refused (update and authenticate refuse one too).
        (
            nadia("", "", ""),
            Code::InvalidArgument,
            "password: must not be empty",
        ),
        // A duplicate name in a domain.
        (
            admin_again,
            Code::AlreadyExists,
            "user admin already exists",
        ),
    ] {
        let r = s.users().create_user(auth(request, &admin)).await;
        assert_status(r, code, message);
    }
    let after = s.user_count(&admin).await;
    assert_eq!(before, after, "nothing was written");

    // Authenticate without method or with half a scope.
    assert_code(
        s.tokens()
            .authenticate(pb::AuthenticateRequest::default())
            .await,
        Code::InvalidArgument,
    );
    let r = s
        .tokens()
        .authenticate(password_request(
            "admin",
            ADMIN_PASSWORD,
            Some(pb::Scope {
                target: Some(pb::scope::Target::Project(pb::ProjectScope::default())),
            }),
        ))
        .await;
    assert_code(r, Code::InvalidArgument);
    // Endpoint with a bad URL and an unknown interface.
    let r = s
        .catalog()
        .create_endpoint(auth(
            pb::CreateEndpointRequest {
                service: "identity".into(),
                interface: pb::Interface::Admin as i32,
                url: "not a url".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await;
    assert_code(r, Code::InvalidArgument);
    let r = s
        .catalog()
        .create_endpoint(auth(
            pb::CreateEndpointRequest {
                service: "identity".into(),
                interface: 42,
                url: "http://x".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await;
    assert_code(r, Code::InvalidArgument);
    // Malformed bearer header.
    let mut req = tonic::Request::new(pb::ListRequest {});
    req.metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    assert_status(
        s.roles().list_roles(req).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
}

#[tokio::test]
async fn bootstrap_twice_is_harmless() {
    let s = Server::start().await;
    s.identity.bootstrap(&bootstrap_spec(s.addr)).await.unwrap();
    s.identity.bootstrap(&bootstrap_spec(s.addr)).await.unwrap();
    let admin = s.admin_token().await;
    let users = s
        .users()
        .list_users(auth(pb::ListUsersRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(users.iter().filter(|u| u.name == "admin").count(), 1);
    let roles = s
        .roles()
        .list_roles(auth(pb::ListRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert_eq!(roles.len(), 3);
    let endpoints = s
        .catalog()
        .list_endpoints(auth(pb::ListEndpointsRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(endpoints.len(), 2);
    let implied = s
        .roles()
        .list_implied_roles(auth(pb::ListRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .implied_roles;
    assert_eq!(implied.len(), 2);
}

#[tokio::test]
async fn domains_projects_and_catalog_round_trip() {
    let s = Server::start().await;
    let admin = s.admin_token().await;
    let d = s
        .resources()
        .create_domain(auth(
            pb::CreateDomainRequest {
                name: "Engineering".into(),
                description: "eng".into(),
                enabled: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(d.enabled);
    assert_code(
        s.resources()
            .create_domain(auth(
                pb::CreateDomainRequest {
                    name: "Engineering".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await,
        Code::AlreadyExists,
    );
    let p = s
        .resources()
        .create_project(auth(
            pb::CreateProjectRequest {
                name: "web".into(),
                domain_id: d.id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.domain_id, d.id);
    // The same project name in another domain is fine.
    s.resources()
        .create_project(auth(
            pb::CreateProjectRequest {
                name: "web".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    // An enabled domain, or one with projects, cannot be deleted.
    let del = pb::DeleteRequest {
        id: d.id.clone(),
        ..Default::default()
    };
    assert_status(
        s.resources().delete_domain(auth(del.clone(), &admin)).await,
        Code::FailedPrecondition,
        "disable the domain before deleting it",
    );
    s.resources()
        .update_domain(auth(
            pb::UpdateDomainRequest {
                id: d.id.clone(),
                enabled: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_status(
        s.resources().delete_domain(auth(del.clone(), &admin)).await,
        Code::FailedPrecondition,
        "domain Engineering still holds projects or users; delete them first",
    );
    s.resources()
        .delete_project(auth(
            pb::DeleteRequest {
                id: p.id,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    s.resources()
        .delete_domain(auth(del, &admin))
        .await
        .unwrap();

    let svc = s
        .catalog()
        .create_service(auth(
            pb::CreateServiceRequest {
                name: "compute".into(),
                r#type: "compute".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    s.catalog()
        .create_endpoint(auth(
            pb::CreateEndpointRequest {
                service: "compute".into(),
                interface: pb::Interface::Public as i32,
                url: "https://compute.example:8774".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let cat = s.catalog_of(&admin).await;
    let compute = cat.iter().find(|c| c.name == "compute").unwrap();
    assert_eq!(compute.endpoints[0].region, "RegionOne");
    s.catalog()
        .delete_service(auth(
            pb::DeleteRequest {
                id: svc.id,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let cat = s.catalog_of(&admin).await;
    assert!(cat.iter().all(|c| c.name != "compute"));
}
