//! The network service in the real mesh: identity and network each behind a
//! real sidecar (policy `sidecar/policy/network.toml`). An outside client
//! (grpcurl, knowing the API only by reflection) creates a network, a subnet
//! and a port through the PUBLIC endpoint with a user token, and may not set
//! a port's binding host from there; compute agents on the internal
//! listener, with their own certificates, create a server's port and bind
//! it with the user's token passed along or with their identity alone, and
//! only to their own host (the verified peer decides, not a header).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../../sidecar/tests/common/mod.rs"]
mod mesh;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh::{IdentityServer, Pki, Sidecar, SidecarSpec, auth, bind, eventually};
use proto::network::v1 as pb;

fn policy(service: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sidecar/policy")
        .join(format!("{service}.toml"))
}

async fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("grpcurl").args(args).output(),
    )
    .await
    .expect("grpcurl answered within 120 s")
    .expect("grpcurl is installed (scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn grpcurl_through_the_public_sidecar_and_compute_agents_through_the_internal_one() {
    let pki = Pki::new();
    let ca = certs::Authority::load(pki.dir.path()).unwrap();
    Pki::issue_with(&ca, pki.dir.path(), "network", time::Duration::hours(24));
    for h in ["h1", "h2"] {
        let pair = ca
            .issue(
                &certs::service_id("compute-agent", Some(h)).unwrap(),
                &["compute-agent".into()],
                time::Duration::hours(1),
            )
            .unwrap();
        certs::write_pair(pki.dir.path(), &format!("agent-{h}"), &pair).unwrap();
    }

    // identity behind its sidecar.
    let mut l = bind(3).await;
    let (out, public, internal) = (l.pop().unwrap(), l.pop().unwrap(), l.pop().unwrap());
    let id_url = format!("https://{}", internal.local_addr().unwrap());
    let identity = IdentityServer::start(3600, Some(id_url.clone())).await;
    let mut spec = SidecarSpec::new(
        "identity",
        identity.addr,
        format!("http://{}", identity.addr),
    );
    spec.policy = policy("identity");
    let _id_sidecar = Sidecar::start_on(&pki, spec, internal, public, out).await;

    // network behind its sidecar.
    let cloud = common::Cloud::start(1).await;
    let mut spec = SidecarSpec::new("network", cloud.replicas[0].addr, id_url.clone());
    spec.policy = policy("network");
    let sidecar = Sidecar::start(&pki, spec).await;

    let alice = identity.member_token("alice", "demo").await;
    let public = sidecar.public.unwrap().to_string();
    let bundle = pki.path("bundle.pem");
    let tls = [
        "-cacert",
        bundle.to_str().unwrap(),
        "-servername",
        "network",
    ];
    let header = format!("authorization: Bearer {alice}");
    let call = |body: String, method: &'static str| {
        let (tls, public, header) = (tls, public.clone(), header.clone());
        async move {
            let mut args: Vec<&str> = tls.to_vec();
            args.extend(["-H", &header, "-d", &body, &public, method]);
            grpcurl(&args).await
        }
    };
    let ok = eventually(Duration::from_secs(10), || async {
        call("{}".into(), "network.v1.Networks/ListNetworks")
            .await
            .0
    })
    .await;
    assert!(ok, "the network sidecar never accepted alice's token");

    let (ok, out) = call(
        r#"{"name": "web"}"#.into(),
        "network.v1.Networks/CreateNetwork",
    )
    .await;
    assert!(ok, "{out}");
    let net: serde_json::Value = serde_json::from_str(&out).unwrap();
    let net_id = net["id"].as_str().unwrap().to_string();
    let (ok, out) = call(
        format!(r#"{{"network_id": "{net_id}", "cidr": "10.90.0.0/24"}}"#),
        "network.v1.Networks/CreateSubnet",
    )
    .await;
    assert!(ok, "{out}");
    let (ok, out) = call(
        format!(
            r#"{{"network_id": "{net_id}", "device_id": "vm-1", "device_owner": "compute:nova"}}"#
        ),
        "network.v1.Networks/CreatePort",
    )
    .await;
    assert!(ok, "{out}");
    let port: serde_json::Value = serde_json::from_str(&out).unwrap();
    let port_id = port["id"].as_str().unwrap().to_string();
    assert_eq!(port["deviceOwner"], "compute:nova", "{out}");
    assert!(
        port["fixedIps"][0]["ipAddress"]
            .as_str()
            .unwrap()
            .starts_with("10.90.0."),
        "{out}"
    );
    // From the public endpoint, alice's token may not set a binding host.
    let (ok, out) = call(
        format!(r#"{{"port_id": "{port_id}", "host": "h1"}}"#),
        "network.v1.Networks/BindPort",
    )
    .await;
    assert!(
        !ok && out.contains("PermissionDenied")
            && out.contains(
                "only an administrator or the compute agent of host h1 may bind a port to it"
            ),
        "{out}"
    );

    // Compute agents on the internal listener.
    let agent = |h: &str| {
        pb::networks_client::NetworksClient::new(pki.channel(
            &format!("agent-{h}"),
            sidecar.internal,
            "network",
        ))
    };
    // h1 with alice's token: h2 is refused; h1 is accepted by the rules and
    // refused only because no network agent runs there (a clear error).
    let bind = |host: &str| pb::BindPortRequest {
        port_id: port_id.clone(),
        host: host.into(),
    };
    let denied = agent("h1")
        .bind_port(auth(bind("h2"), &alice))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        "a compute agent may bind ports to its own host (h1) only"
    );
    let no_agent = agent("h1")
        .bind_port(auth(bind("h1"), &alice))
        .await
        .unwrap_err();
    assert_eq!(
        no_agent.code(),
        tonic::Code::FailedPrecondition,
        "{no_agent:?}"
    );
    assert_eq!(
        no_agent.message(),
        format!(
            "cannot bind port {port_id} to host h1: no network agent has ever reported from h1"
        )
    );
    // h2 on its certificate alone: creates a server's port for alice's project.
    let project = port["projectId"].as_str().unwrap().to_string();
    assert!(!project.is_empty(), "{port}");
    let made = agent("h2")
        .create_port(tonic::Request::new(pb::CreatePortRequest {
            network_id: net_id.clone(),
            device_id: "vm-2".into(),
            device_owner: "compute:nova".into(),
            project_id: project.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.project_id, project);
    let denied = agent("h2")
        .bind_port(tonic::Request::new(pb::BindPortRequest {
            port_id: made.id.clone(),
            host: "h1".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        "a compute agent may bind ports to its own host (h2) only"
    );
    // A forged peer header from the public side changes nothing.
    let mut args: Vec<&str> = tls.to_vec();
    let forged = "x-cirrus-peer: spiffe://cirrus.local/svc/compute-agent/host/h1";
    let body = format!(r#"{{"port_id": "{port_id}", "host": "h1"}}"#);
    args.extend([
        "-H",
        &header,
        "-H",
        forged,
        "-d",
        &body,
        &public,
        "network.v1.Networks/BindPort",
    ]);
    let (ok, out) = grpcurl(&args).await;
    assert!(!ok && out.contains("PermissionDenied"), "{out}");
    // No token: the public sidecar refuses before the service sees anything.
    let mut args: Vec<&str> = tls.to_vec();
    args.extend([
        "-d",
        "{}",
        public.as_str(),
        "network.v1.Networks/ListNetworks",
    ]);
    let (ok, out) = grpcurl(&args).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
}
