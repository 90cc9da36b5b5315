//! The local trust boundary (issue 13): a service listens on a Unix socket
//! that only its own user and its sidecar can open, the sidecar reaches it
//! there, and the service's outbound calls enter its sidecar through another
//! such socket. A process of another uid cannot connect to either; the mesh
//! path works end to end over real mTLS with real tokens.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use proto::identity::v1 as pb;
use runtime::config::SocketConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn echo_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/echo.toml")
}

/// A real gRPC service (health and reflection, `runtime::serve::serve`,
/// what `service_main` runs for a service with a `[socket]` table) on `socket`.
async fn service_on(socket: &SocketConfig) -> tokio::sync::oneshot::Sender<()> {
    let listener = runtime::process::bind_unix(socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(runtime::serve::serve(
        tonic::service::Routes::default(),
        &[],
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    stop
}

/// A sidecar for `service` reaching its service on `upstream_socket`, with
/// outbound on `outbound_socket` when given; returns its internal address.
async fn sidecar(
    pki: &Pki,
    service: &str,
    identity_url: String,
    upstream_socket: Option<PathBuf>,
    outbound_socket: Option<SocketConfig>,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = internal.local_addr().unwrap();
    let files = pki.files(service);
    let config = sidecar::Config {
        service: service.into(),
        // Only the authority requests carry: the socket is where they go.
        upstream: "127.0.0.1:9".parse().unwrap(),
        upstream_socket,
        outbound_socket,
        cert: files.cert,
        key: files.key,
        bundle: files.bundle,
        identity_url,
        policy: echo_policy(),
        request_timeout_ms: 10_000,
        drain_secs: 1,
        ..sidecar::Config::default()
    };
    let listeners = sidecar::Listeners {
        internal,
        public: None,
        outbound: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sidecar::run(config, listeners, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// `socat` connecting to `socket` as `user` (through `runuser`): Ok, or the error it printed.
fn connect_as(user: Option<&str>, socket: &Path) -> Result<(), String> {
    let target = format!("UNIX-CONNECT:{}", socket.display());
    let out = match user {
        Some(u) => std::process::Command::new("runuser")
            .args(["-u", u, "--", "socat", "-u", "OPEN:/dev/null", &target])
            .output(),
        None => std::process::Command::new("socat")
            .args(["-u", "OPEN:/dev/null", &target])
            .output(),
    }
    .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Another uid cannot connect to `socket`, whose owner can; the socket
/// itself refuses them even where its directory lets them through.
fn only_the_owner_connects(socket: &Path) {
    let meta = std::fs::metadata(socket).unwrap();
    assert_eq!(mode(socket), 0o660, "{}", socket.display());
    assert_eq!(
        meta.uid(),
        nix_uid(),
        "the socket belongs to this process's user"
    );
    let dir = socket.parent().unwrap();
    assert_eq!(mode(dir) & 0o007, 0, "the directory admits no other user");
    // The owner's connection is the control: the tool works.
    connect_as(None, socket).unwrap();
    if nix_uid() != 0 {
        eprintln!("not root: connecting as another uid is not tried (modes checked above)");
        return;
    }
    let e = connect_as(Some("nobody"), socket).unwrap_err();
    assert!(e.contains("Permission denied"), "nobody got: {e}");
    // With the directories (the socket's and the test's) opened to everyone,
    // the socket's own mode still refuses.
    let dirs = [dir, dir.parent().unwrap()];
    let before: Vec<_> = dirs
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().permissions())
        .collect();
    for d in dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let e = connect_as(Some("nobody"), socket).unwrap_err();
    for (d, p) in dirs.iter().zip(before) {
        std::fs::set_permissions(d, p).unwrap();
    }
    assert!(e.contains("Permission denied"), "nobody got: {e}");
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test]
async fn a_service_on_its_socket_is_reached_through_its_sidecar_and_by_no_other_uid() {
    let pki = Pki::new();
    let identity = IdentityServer::start(3600, None).await;
    let token = identity.admin_token().await;
    let run = tempfile::tempdir().unwrap();
    let socket = SocketConfig::at(run.path().join("echo/api.sock"));
    let _service = service_on(&socket).await;
    let (internal, _side) = sidecar(
        &pki,
        "echo",
        format!("http://{}", identity.addr),
        Some(socket.path.clone()),
        None,
    )
    .await;

    // Through the sidecar (mTLS, a token, the policy) the service answers.
    let client = HealthClient::new(pki.channel("compute-api", internal, "echo"));
    let ok = eventually(Duration::from_secs(10), || {
        let mut c = client.clone();
        let t = token.clone();
        async move {
            c.check(auth(HealthCheckRequest::default(), &t))
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
        }
    })
    .await;
    assert!(ok, "the sidecar never reached the service on its socket");

    only_the_owner_connects(&socket.path);
}

#[tokio::test]
async fn outbound_calls_enter_the_sidecar_by_a_socket_no_other_uid_can_open() {
    let pki = Pki::new();
    let identity = IdentityServer::start(3600, None).await;
    let token = identity.admin_token().await;
    let run = tempfile::tempdir().unwrap();
    let echo_socket = SocketConfig::at(run.path().join("echo/api.sock"));
    let _service = service_on(&echo_socket).await;
    let identity_url = format!("http://{}", identity.addr);
    let (echo_internal, _echo_side) = sidecar(
        &pki,
        "echo",
        identity_url.clone(),
        Some(echo_socket.path.clone()),
        None,
    )
    .await;
    // compute-api's sidecar: outbound on a socket of its own directory.
    let outbound = SocketConfig::at(run.path().join("compute-api/outbound.sock"));
    let (_api_internal, _api_side) = sidecar(
        &pki,
        "compute-api",
        identity_url,
        Some(run.path().join("compute-api/api.sock")),
        Some(outbound.clone()),
    )
    .await;

    // The catalog tells compute-api's sidecar where echo is.
    let cat = || pb::catalog_client::CatalogClient::new(identity.channel());
    cat()
        .create_service(auth(
            pb::CreateServiceRequest {
                name: "echo".into(),
                r#type: "echo".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap();
    cat()
        .create_endpoint(auth(
            pb::CreateEndpointRequest {
                service: "echo".into(),
                interface: pb::Interface::Internal as i32,
                url: format!("https://{echo_internal}"),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap();

    // The service calls http://echo through its sidecar's outbound socket:
    // compute-api's sidecar → mTLS → echo's sidecar → echo's socket.
    let via =
        HealthClient::new(runtime::process::via_sidecar_unix(&outbound.path, "echo").unwrap());
    let ok = eventually(Duration::from_secs(15), || {
        let mut c = via.clone();
        let t = token.clone();
        async move {
            c.check(auth(HealthCheckRequest::default(), &t))
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
        }
    })
    .await;
    assert!(ok, "the call through both sidecars never succeeded");

    only_the_owner_connects(&outbound.path);
}

#[tokio::test]
async fn a_sidecar_refuses_an_outbound_socket_in_a_directory_open_to_everyone() {
    let pki = Pki::new();
    let run = tempfile::tempdir().unwrap();
    let open = run.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let files = pki.files("echo");
    let config = sidecar::Config {
        service: "echo".into(),
        outbound_socket: Some(SocketConfig::at(open.join("outbound.sock"))),
        cert: files.cert,
        key: files.key,
        bundle: files.bundle,
        identity_url: "http://127.0.0.1:9".into(),
        policy: echo_policy(),
        ..sidecar::Config::default()
    };
    let listeners = sidecar::Listeners {
        internal: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        public: None,
        outbound: None,
    };
    let e = sidecar::run(config, listeners, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot listen on {}: the socket's directory {} admits every local user (mode 777): make it 0750 or 0700",
            open.join("outbound.sock").display(),
            open.display()
        )
    );
}
