//! The volume service in the real mesh: identity, image and volume each
//! behind a real sidecar (mTLS between them, TLS + tokens for users), the
//! sidecars following identity's keys and catalog. An outside client
//! (grpcurl, knowing the API only by reflection) creates a volume from an
//! image through the volume sidecar's public endpoint with a user token;
//! the volume service fetches the image's bytes through its own sidecar
//! *with that token*, so image's sidecar and image's own rules decide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// The sidecar crate's own test mesh (PKI, identity, sidecars), shared.
#[path = "../../../sidecar/tests/common/mod.rs"]
mod mesh;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mesh::{IdentityServer, Pki, Sidecar, SidecarSpec, auth, bind, eventually};
use proto::identity::v1 as idpb;
use proto::image::v1 as ipb;
use proto::volume::v1 as pb;

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
async fn grpcurl_makes_a_volume_from_an_image_through_the_sidecars_with_its_token() {
    // PKI: the sidecar harness's certificates, plus one for volume.
    let pki = Pki::new();
    let ca = certs::Authority::load(pki.dir.path()).unwrap();
    Pki::issue_with(&ca, pki.dir.path(), "volume", time::Duration::hours(24));

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

    // image behind its sidecar, in the catalog.
    let dir = tempfile::tempdir().unwrap();
    let images = ImageServer::start(&dir.path().join("image-store")).await;
    let mut spec = SidecarSpec::new("image", images.served.addr, id_url.clone());
    spec.policy = policy("image");
    let image_sidecar = Sidecar::start(&pki, spec).await;
    let admin = identity.admin_token().await;
    let catalog = || idpb::catalog_client::CatalogClient::new(identity.channel());
    catalog()
        .create_service(auth(
            idpb::CreateServiceRequest {
                name: "image".into(),
                r#type: "image".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    catalog()
        .create_endpoint(auth(
            idpb::CreateEndpointRequest {
                service: "image".into(),
                interface: idpb::Interface::Internal as i32,
                url: format!("https://{}", image_sidecar.internal),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();

    // volume behind its sidecar, calling image through the sidecar's outbound side.
    let mut l = bind(3).await;
    let (out, public, internal) = (l.pop().unwrap(), l.pop().unwrap(), l.pop().unwrap());
    let db = runtime::db::TestDatabase::create().await.unwrap();
    let store = dir.path().join("store");
    let mut config = test_config(&db.url, &store, None);
    config.image.outbound = Some(out.local_addr().unwrap());
    let volumes = volume::Volumes::start(config).await.unwrap();
    let served = runtime::testing::Served::spawn(move |l, s| volume::serve(volumes, l, s)).await;
    let mut spec = SidecarSpec::new("volume", served.addr, id_url.clone());
    spec.policy = policy("volume");
    spec.outbound = true;
    let volume_sidecar = Sidecar::start_on(&pki, spec, internal, public, out).await;

    // Alice uploads an image through image's sidecar with her token.
    let alice = identity.member_token("alice", "demo").await;
    let image_client = || {
        ipb::images_client::ImagesClient::new(pki.channel(
            "compute-api",
            image_sidecar.internal,
            "image",
        ))
    };
    let ready = eventually(Duration::from_secs(10), || async {
        image_client()
            .list_images(auth(ipb::ListImagesRequest::default(), &alice))
            .await
            .is_ok()
    })
    .await;
    assert!(ready, "image's sidecar never accepted alice's token");
    let img = image_client()
        .create_image(auth(
            ipb::CreateImageRequest {
                name: "alice-disk".into(),
                disk_format: ipb::DiskFormat::Qcow2 as i32,
                container_format: ipb::ContainerFormat::Bare as i32,
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let data = pattern(3 * MIB, 21);
    let qcow2 = qcow2_of(&data);
    let msgs: Vec<ipb::UploadRequest> = qcow2
        .chunks(MIB)
        .enumerate()
        .map(|(i, c)| ipb::UploadRequest {
            image_id: if i == 0 {
                img.id.clone()
            } else {
                String::new()
            },
            data: c.to_vec().into(),
        })
        .collect();
    image_client()
        .upload(auth(tokio_stream::iter(msgs), &alice))
        .await
        .unwrap();

    // grpcurl, through the public endpoint: TLS, a token, reflection.
    let public = volume_sidecar.public.unwrap().to_string();
    let ca = pki.path("bundle.pem");
    let tls = ["-cacert", ca.to_str().unwrap(), "-servername", "volume"];
    let header = format!("authorization: Bearer {alice}");
    let call = |body: String, method: &'static str, header: String| {
        let (tls, public) = (tls, public.clone());
        async move {
            let mut args: Vec<&str> = tls.to_vec();
            args.extend(["-H", &header, "-d", &body, &public, method]);
            grpcurl(&args).await
        }
    };
    let ok = eventually(Duration::from_secs(10), || async {
        call("{}".into(), "volume.v1.Volumes/ListVolumes", header.clone())
            .await
            .0
    })
    .await;
    assert!(ok, "the volume sidecar never accepted alice's token");
    let mut args: Vec<&str> = tls.to_vec();
    args.extend([public.as_str(), "list"]);
    let (ok, listed) = grpcurl(&args).await;
    assert!(ok && listed.contains("volume.v1.Volumes"), "{listed}");

    let body = format!(
        r#"{{"name": "from-grpcurl", "image_id": "{}", "wait": true}}"#,
        img.id
    );
    let (ok, created) = call(body, "volume.v1.Volumes/CreateVolume", header.clone()).await;
    assert!(ok, "{created}");
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(v["status"], "VOLUME_STATUS_AVAILABLE", "{created}");
    assert_eq!(v["sourceImageId"], img.id.as_str());
    let id = v["id"].as_str().unwrap().to_string();
    assert_holds(&store.join("volumes").join(&id), &data, GIB);

    let (ok, list) = call("{}".into(), "volume.v1.Volumes/ListVolumes", header.clone()).await;
    assert!(ok, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["volumes"][0]["id"], id.as_str());
    assert_eq!(list["volumes"][0]["name"], "from-grpcurl");

    // Bob, of another project: the volume is not found, and alice's private
    // image is not found either — image's rules, applied to bob's token.
    let bob = identity.member_token("bob", "other").await;
    let bob_header = format!("authorization: Bearer {bob}");
    let (ok, out) = call(
        format!(r#"{{"id": "{id}"}}"#),
        "volume.v1.Volumes/GetVolume",
        bob_header.clone(),
    )
    .await;
    assert!(
        !ok && out.contains("NotFound") && out.contains(&format!("volume {id} not found")),
        "{out}"
    );
    let (ok, out) = call(
        format!(r#"{{"image_id": "{}", "wait": true}}"#, img.id),
        "volume.v1.Volumes/CreateVolume",
        bob_header,
    )
    .await;
    assert!(
        !ok && out.contains("NotFound") && out.contains(&format!("image {} not found", img.id)),
        "{out}"
    );
    // No token at all: the sidecar refuses before the service sees anything.
    let mut args: Vec<&str> = tls.to_vec();
    args.extend(["-d", "{}", public.as_str(), "volume.v1.Volumes/ListVolumes"]);
    let (ok, out) = grpcurl(&args).await;
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    assert_eq!(store_files(&store), vec![format!("volumes/{id}")]);

    // Compute agents on the internal listener, with their own certificates
    // (spiffe://cirrus.local/svc/compute-agent/host/<h>): the agent of h1
    // attaches alice's volume with her token passed along, completes and
    // detaches it on its certificate alone; the agent of h2 is refused.
    let authority = certs::Authority::load(pki.dir.path()).unwrap();
    for h in ["h1", "h2"] {
        let pair = authority
            .issue(
                &certs::service_id("compute-agent", Some(h)).unwrap(),
                &["compute-agent".into()],
                time::Duration::hours(1),
            )
            .unwrap();
        certs::write_pair(pki.dir.path(), &format!("agent-{h}"), &pair).unwrap();
    }
    let agent = |h: &str| {
        pb::volumes_client::VolumesClient::new(pki.channel(
            &format!("agent-{h}"),
            volume_sidecar.internal,
            "volume",
        ))
    };
    let conn = |h: &str| pb::HostConnector {
        host: h.into(),
        transports: vec![pb::Transport::LocalFile as i32],
    };
    let create = |h: &str| pb::CreateAttachmentRequest {
        volume_id: id.clone(),
        server_id: "srv-1".into(),
        connector: Some(conn(h)),
    };
    let denied = agent("h2")
        .create_attachment(auth(create("h1"), &alice))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        "the compute agent of host h2 may connect volumes only to its own host, not to h1"
    );
    let a = agent("h1")
        .create_attachment(auth(create("h1"), &alice))
        .await
        .unwrap()
        .into_inner();
    let complete = || {
        tonic::Request::new(pb::CompleteAttachmentRequest {
            id: a.id.clone(),
            mountpoint: "vdb".into(),
        })
    };
    let denied = agent("h2")
        .complete_attachment(complete())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        format!("attachment {} is not on host h2", a.id)
    );
    agent("h1").complete_attachment(complete()).await.unwrap();
    agent("h1")
        .delete_attachment(tonic::Request::new(pb::DeleteAttachmentRequest {
            id: a.id.clone(),
        }))
        .await
        .unwrap();
    // No token from a certificate that is not an agent's: the sidecar refuses.
    let refused = pb::volumes_client::VolumesClient::new(pki.channel(
        "compute-api",
        volume_sidecar.internal,
        "volume",
    ))
    .delete_attachment(tonic::Request::new(pb::DeleteAttachmentRequest {
        id: a.id.clone(),
    }))
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}
