//! compute-api on its own (a real server on loopback, its own database; no
//! scheduler answers, so new servers end in error "scheduling failed"):
//! flavors, key pairs, server groups, quotas checked with the server row,
//! bad input refused with nothing written, idempotent creates, paging.
#![allow(clippy::unwrap_used)]

use compute_api::Config;
use proto::compute::v1 as pb;
use proto::compute::v1::flavors_client::FlavorsClient;
use proto::compute::v1::key_pairs_client::KeyPairsClient;
use proto::compute::v1::quotas_client::QuotasClient;
use proto::compute::v1::server_groups_client::ServerGroupsClient;
use proto::compute::v1::servers_client::ServersClient;
use runtime::config::{DatabaseConfig, ServerConfig};
use runtime::db::TestDatabase;
use runtime::testing::{
    PROJECT_A, Served, admin, assert_status, member_a, member_b, reader_a, req, wait_for,
};
use tonic::Code;

struct Api {
    _db: TestDatabase,
    served: Served,
    /// The image service compute-api asks at create (schema `image`).
    image: Served,
    /// A public, active raw image of 4 KiB.
    image_id: String,
    _store: tempfile::TempDir,
}

#[path = "support/image.rs"]
mod image_support;

async fn start() -> Api {
    let db = TestDatabase::create().await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let (image, image_id) = image_support::start_image(&db.url, store.path()).await;
    let cfg = Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        },
        database: DatabaseConfig {
            url: db.url.clone(),
            schema: "compute".into(),
            pool_size: 4,
        },
        // Nothing listens there: placement fails, which these tests do not need.
        scheduler_url: "http://127.0.0.1:9".into(),
        queue_url: "http://127.0.0.1:9".into(),
        // Image is here; network and volume are not configured.
        peers: compute_api::peers::PeersConfig {
            image: Some(format!("http://{}", image.addr)),
            ..Default::default()
        },
        ..Default::default()
    };
    let served = Served::spawn(|l, s| compute_api::run(cfg, l, s)).await;
    let addr = served.addr;
    wait_for(
        "compute-api",
        std::time::Duration::from_secs(20),
        || async move { runtime::serve::healthcheck(addr).await },
    )
    .await;
    Api {
        _db: db,
        served,
        image,
        image_id,
        _store: store,
    }
}

impl Api {
    fn server(&self, name: &str, flavor: &str) -> pb::CreateServerRequest {
        pb::CreateServerRequest {
            name: name.into(),
            flavor: flavor.into(),
            image_id: self.image_id.clone(),
            ..Default::default()
        }
    }
}

async fn count(api: &Api) -> usize {
    ServersClient::new(api.served.channel.clone())
        .list_servers(req(pb::ListServersRequest::default(), &member_a()))
        .await
        .unwrap()
        .into_inner()
        .servers
        .len()
}

#[tokio::test]
async fn bad_create_requests_are_refused_and_write_nothing() {
    let api = start().await;
    let mut c = ServersClient::new(api.served.channel.clone());
    let cases: Vec<(pb::CreateServerRequest, Code, &str)> = vec![
        (
            api.server("", "m1.tiny"),
            Code::InvalidArgument,
            "name: must not be empty",
        ),
        (
            api.server("x", "m9.huge"),
            Code::NotFound,
            "flavor m9.huge not found",
        ),
        (
            api.server("x", ""),
            Code::InvalidArgument,
            "flavor: is required",
        ),
        (
            pb::CreateServerRequest {
                image_id: "zz".into(),
                ..api.server("x", "m1.tiny")
            },
            Code::InvalidArgument,
            "image_id: is not a valid id: \"zz\"",
        ),
        (
            pb::CreateServerRequest {
                image_id: String::new(),
                ..api.server("x", "m1.tiny")
            },
            Code::InvalidArgument,
            "image_id: is required unless a boot volume is given",
        ),
        (
            pb::CreateServerRequest {
                key_name: "nokey".into(),
                ..api.server("x", "m1.tiny")
            },
            Code::NotFound,
            "key pair nokey not found",
        ),
        (
            pb::CreateServerRequest {
                user_data: vec![0; 64 * 1024 + 1],
                ..api.server("x", "m1.tiny")
            },
            Code::InvalidArgument,
            "user_data: is larger than 65536 bytes",
        ),
        (
            pb::CreateServerRequest {
                networks: vec![pb::NetworkRequest::default()],
                ..api.server("x", "m1.tiny")
            },
            Code::InvalidArgument,
            "networks: each entry names exactly one of network_id and port_id",
        ),
        (
            pb::CreateServerRequest {
                server_group_id: "22222222-2222-4222-8222-222222222222".into(),
                ..api.server("x", "m1.tiny")
            },
            Code::NotFound,
            "server group 22222222-2222-4222-8222-222222222222 not found",
        ),
    ];
    for (r, code, msg) in cases {
        assert_status(c.create_server(req(r, &member_a())).await, code, msg);
    }
    assert_eq!(count(&api).await, 0);
}

#[tokio::test]
async fn quotas_are_checked_with_the_server_row() {
    let api = start().await;
    let mut q = QuotasClient::new(api.served.channel.clone());
    let limits = pb::QuotaLimits {
        instances: 2,
        cores: 3,
        ram_mb: -1,
        key_pairs: 1,
        server_groups: 1,
    };
    assert_status(
        q.set_quota(req(
            pb::SetQuotaRequest {
                project_id: PROJECT_A.into(),
                limits: Some(limits),
            },
            &member_a(),
        ))
        .await,
        Code::PermissionDenied,
        "only an administrator may do this",
    );
    q.set_quota(req(
        pb::SetQuotaRequest {
            project_id: PROJECT_A.into(),
            limits: Some(limits),
        },
        &admin(),
    ))
    .await
    .unwrap();
    let mut c = ServersClient::new(api.served.channel.clone());
    // Concurrent creates: exactly the quota's worth succeed.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut c = c.clone();
        let r = api.server(&format!("q{i}"), "m1.tiny");
        tasks.push(tokio::spawn(async move {
            c.create_server(req(r, &member_a())).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted);
                assert_eq!(
                    s.message(),
                    "quota exceeded for instances: 1 requested, 2 of 2 used"
                );
            }
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(count(&api).await, 2);
    let quota = q
        .get_quota(req(pb::GetQuotaRequest::default(), &reader_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.usage.unwrap().instances, 2);
    // Cores: m1.medium wants 2 more than the 1 left... after raising instances.
    q.set_quota(req(
        pb::SetQuotaRequest {
            project_id: PROJECT_A.into(),
            limits: Some(pb::QuotaLimits {
                instances: 10,
                ..limits
            }),
        },
        &admin(),
    ))
    .await
    .unwrap();
    assert_status(
        c.create_server(req(api.server("big", "m1.medium"), &member_a()))
            .await,
        Code::ResourceExhausted,
        "quota exceeded for cores: 2 requested, 2 of 3 used",
    );
    // Key pairs and server groups.
    let mut k = KeyPairsClient::new(api.served.channel.clone());
    k.create_key_pair(req(
        pb::CreateKeyPairRequest {
            name: "k1".into(),
            public_key: String::new(),
        },
        &member_a(),
    ))
    .await
    .unwrap();
    assert_status(
        k.create_key_pair(req(
            pb::CreateKeyPairRequest {
                name: "k2".into(),
                public_key: String::new(),
            },
            &member_a(),
        ))
        .await,
        Code::ResourceExhausted,
        "quota exceeded for key_pairs: 1 requested, 1 of 1 used",
    );
    let mut g = ServerGroupsClient::new(api.served.channel.clone());
    g.create_server_group(req(
        pb::CreateServerGroupRequest {
            name: "g1".into(),
            policy: "affinity".into(),
        },
        &member_a(),
    ))
    .await
    .unwrap();
    assert_status(
        g.create_server_group(req(
            pb::CreateServerGroupRequest {
                name: "g2".into(),
                policy: "affinity".into(),
            },
            &member_a(),
        ))
        .await,
        Code::ResourceExhausted,
        "quota exceeded for server_groups: 1 requested, 1 of 1 used",
    );
    // With no scheduler, placement fails visibly (never stuck in building).
    let first = c
        .list_servers(req(pb::ListServersRequest::default(), &member_a()))
        .await
        .unwrap()
        .into_inner()
        .servers;
    let id = first[0].id.clone();
    wait_for(
        "scheduling fault",
        std::time::Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                let s = c
                    .get_server(req(pb::ServerRef { id }, &member_a()))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                match s.fault {
                    Some(f) if s.vm_state == "error" => {
                        assert_eq!(f.message, "scheduling failed: the scheduler is unavailable");
                        Ok(())
                    }
                    _ => Err(s.vm_state),
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_retried_create_with_the_same_key_makes_one_server() {
    let api = start().await;
    let mut c = ServersClient::new(api.served.channel.clone());
    let r = pb::CreateServerRequest {
        idempotency_key: "retry-1".into(),
        ..api.server("once", "m1.tiny")
    };
    let a = c
        .create_server(req(r.clone(), &member_a()))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .create_server(req(r.clone(), &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.id, b.id);
    assert_eq!(count(&api).await, 1);
    // The same key in another project is another server.
    let other = c
        .create_server(req(r, &member_b()))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.id, a.id);
}

#[tokio::test]
async fn servers_page_by_marker_and_filter() {
    let api = start().await;
    let mut c = ServersClient::new(api.served.channel.clone());
    for i in 0..5 {
        c.create_server(req(
            api.server(&format!("page-{i}"), "m1.tiny"),
            &member_a(),
        ))
        .await
        .unwrap();
    }
    c.create_server(req(api.server("other", "m1.small"), &member_a()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut marker = String::new();
    loop {
        let page = c
            .list_servers(req(
                pb::ListServersRequest {
                    limit: 2,
                    marker: marker.clone(),
                    ..Default::default()
                },
                &member_a(),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.servers.len() <= 2);
        seen.extend(page.servers.into_iter().map(|s| s.id));
        if page.next_marker.is_empty() {
            break;
        }
        marker = page.next_marker;
    }
    assert_eq!(seen.len(), 6);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 6);
    let named = c
        .list_servers(req(
            pb::ListServersRequest {
                name: "PAGE".into(),
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.servers.len(), 5);
    assert_status(
        c.list_servers(req(
            pb::ListServersRequest {
                vm_state: "flying".into(),
                ..Default::default()
            },
            &member_a(),
        ))
        .await,
        Code::InvalidArgument,
        "vm_state: must be one of building, active, stopped, paused, suspended, error, deleted",
    );
    assert_status(
        c.list_servers(req(
            pb::ListServersRequest {
                limit: 5000,
                ..Default::default()
            },
            &member_a(),
        ))
        .await,
        Code::InvalidArgument,
        "limit: must be at most 1000",
    );
}

#[tokio::test]
async fn flavors_are_an_admins_and_private_ones_are_shared_by_project() {
    let api = start().await;
    let mut f = FlavorsClient::new(api.served.channel.clone());
    let new = pb::CreateFlavorRequest {
        name: "p1.secret".into(),
        vcpus: 2,
        ram_mb: 1024,
        disk_gb: 5,
        is_public: false,
        ..Default::default()
    };
    assert_status(
        f.create_flavor(req(new.clone(), &member_a())).await,
        Code::PermissionDenied,
        "only an administrator may do this",
    );
    assert_status(
        f.create_flavor(req(
            pb::CreateFlavorRequest {
                vcpus: 0,
                ..new.clone()
            },
            &admin(),
        ))
        .await,
        Code::InvalidArgument,
        "vcpus: must be between 1 and 1024",
    );
    let made = f
        .create_flavor(req(new.clone(), &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        f.create_flavor(req(new.clone(), &admin())).await,
        Code::AlreadyExists,
        "flavor p1.secret already exists",
    );
    let visible =
        |list: pb::ListFlavorsResponse| list.flavors.iter().any(|x| x.name == "p1.secret");
    assert!(!visible(
        f.list_flavors(req(pb::ListFlavorsRequest {}, &member_a()))
            .await
            .unwrap()
            .into_inner()
    ));
    assert_status(
        f.get_flavor(req(
            pb::FlavorRef {
                flavor: "p1.secret".into(),
            },
            &member_a(),
        ))
        .await,
        Code::NotFound,
        "flavor p1.secret not found",
    );
    let shared = f
        .add_flavor_access(req(
            pb::FlavorAccessRequest {
                flavor: made.id.clone(),
                project_id: PROJECT_A.into(),
            },
            &admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shared.projects, vec![PROJECT_A.to_string()]);
    assert!(visible(
        f.list_flavors(req(pb::ListFlavorsRequest {}, &member_a()))
            .await
            .unwrap()
            .into_inner()
    ));
    assert!(!visible(
        f.list_flavors(req(pb::ListFlavorsRequest {}, &member_b()))
            .await
            .unwrap()
            .into_inner()
    ));
    let defaults = f
        .list_flavors(req(pb::ListFlavorsRequest {}, &reader_a()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        defaults
            .flavors
            .iter()
            .any(|x| x.name == "m1.tiny" && x.vcpus == 1 && x.ram_mb == 512)
    );
    f.delete_flavor(req(
        pb::FlavorRef {
            flavor: "p1.secret".into(),
        },
        &admin(),
    ))
    .await
    .unwrap();
    assert_status(
        f.get_flavor(req(
            pb::FlavorRef {
                flavor: "p1.secret".into(),
            },
            &admin(),
        ))
        .await,
        Code::NotFound,
        "flavor p1.secret not found",
    );
}

#[tokio::test]
async fn key_pairs_import_or_generate_and_the_private_half_is_shown_once() {
    let api = start().await;
    let mut k = KeyPairsClient::new(api.served.channel.clone());
    let made = k
        .create_key_pair(req(
            pb::CreateKeyPairRequest {
                name: "gen".into(),
                public_key: String::new(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.r#type, "ssh-ed25519");
    assert!(
        made.private_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );
    assert!(made.fingerprint.starts_with("SHA256:"));
    let again = k
        .get_key_pair(req(pb::KeyPairRef { name: "gen".into() }, &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.private_key, "");
    assert_eq!(again.public_key, made.public_key);

    // Import the same public key under another name: same fingerprint.
    let imported = k
        .create_key_pair(req(
            pb::CreateKeyPairRequest {
                name: "imp".into(),
                public_key: made.public_key.clone(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.fingerprint, made.fingerprint);
    assert_eq!(imported.private_key, "");
    assert_status(
        k.create_key_pair(req(
            pb::CreateKeyPairRequest {
                name: "bad".into(),
                public_key: "ssh-ed25519 !!!".into(),
            },
            &member_a(),
        ))
        .await,
        Code::InvalidArgument,
        "public_key: is not valid base64",
    );
    assert_status(
        k.create_key_pair(req(
            pb::CreateKeyPairRequest {
                name: "imp".into(),
                public_key: made.public_key.clone(),
            },
            &member_a(),
        ))
        .await,
        Code::AlreadyExists,
        "key pair imp already exists",
    );
    // Key pairs are the user's: another user does not see them.
    assert_status(
        k.get_key_pair(req(pb::KeyPairRef { name: "gen".into() }, &member_b()))
            .await,
        Code::NotFound,
        "key pair gen not found",
    );
    // A server with a key carries it.
    let s = ServersClient::new(api.served.channel.clone())
        .create_server(req(
            pb::CreateServerRequest {
                key_name: "gen".into(),
                ..api.server("keyed", "m1.tiny")
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.key_name, "gen");
    k.delete_key_pair(req(pb::KeyPairRef { name: "imp".into() }, &member_a()))
        .await
        .unwrap();
    let left = k
        .list_key_pairs(req(pb::ListKeyPairsRequest {}, &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        left.key_pairs
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>(),
        vec!["gen"]
    );
}

#[tokio::test]
async fn server_groups_belong_to_their_project() {
    let api = start().await;
    let mut g = ServerGroupsClient::new(api.served.channel.clone());
    assert_status(
        g.create_server_group(req(
            pb::CreateServerGroupRequest {
                name: "g".into(),
                policy: "together".into(),
            },
            &member_a(),
        ))
        .await,
        Code::InvalidArgument,
        "policy: must be one of affinity, anti-affinity, soft-affinity, soft-anti-affinity",
    );
    let made = g
        .create_server_group(req(
            pb::CreateServerGroupRequest {
                name: "g".into(),
                policy: "anti-affinity".into(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    let nf = format!("server group {} not found", made.id);
    assert_status(
        g.get_server_group(req(
            pb::ServerGroupRef {
                id: made.id.clone(),
            },
            &member_b(),
        ))
        .await,
        Code::NotFound,
        &nf,
    );
    assert_status(
        g.delete_server_group(req(
            pb::ServerGroupRef {
                id: made.id.clone(),
            },
            &member_b(),
        ))
        .await,
        Code::NotFound,
        &nf,
    );
    // A server of another project cannot join it.
    assert_status(
        ServersClient::new(api.served.channel.clone())
            .create_server(req(
                pb::CreateServerRequest {
                    server_group_id: made.id.clone(),
                    ..api.server("x", "m1.tiny")
                },
                &member_b(),
            ))
            .await,
        Code::NotFound,
        &nf,
    );
    let s = ServersClient::new(api.served.channel.clone())
        .create_server(req(
            pb::CreateServerRequest {
                server_group_id: made.id.clone(),
                ..api.server("in", "m1.tiny")
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    let got = g
        .get_server_group(req(
            pb::ServerGroupRef {
                id: made.id.clone(),
            },
            &reader_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.members, vec![s.id.clone()]);
    assert_status(
        g.delete_server_group(req(
            pb::ServerGroupRef {
                id: made.id.clone(),
            },
            &member_a(),
        ))
        .await,
        Code::FailedPrecondition,
        &format!("server group {} still has 1 servers", made.id),
    );
}

#[tokio::test]
async fn the_image_is_looked_up_as_the_caller_and_must_fit_the_flavor() {
    use proto::image::v1 as ipb;
    let api = start().await;
    let mut c = ServersClient::new(api.served.channel.clone());
    // Another project's private image is, to project A, missing.
    let private_b = image_support::upload_image(
        &api.image,
        &member_b(),
        ipb::CreateImageRequest {
            name: "b-only".into(),
            ..Default::default()
        },
        Some(vec![1u8; 512]),
    )
    .await;
    // Queued: created, never uploaded.
    let queued = image_support::upload_image(
        &api.image,
        &member_a(),
        ipb::CreateImageRequest {
            name: "queued".into(),
            ..Default::default()
        },
        None,
    )
    .await;
    let big_min_disk = image_support::upload_image(
        &api.image,
        &member_a(),
        ipb::CreateImageRequest {
            name: "min-disk".into(),
            min_disk: 50,
            ..Default::default()
        },
        Some(vec![1u8; 512]),
    )
    .await;
    let big_min_ram = image_support::upload_image(
        &api.image,
        &member_a(),
        ipb::CreateImageRequest {
            name: "min-ram".into(),
            min_ram: 4096,
            ..Default::default()
        },
        Some(vec![1u8; 512]),
    )
    .await;
    let with = |image: &str| pb::CreateServerRequest {
        image_id: image.into(),
        ..api.server("x", "m1.tiny")
    };
    let missing = "33333333-3333-4333-8333-333333333333";
    let cases: Vec<(pb::CreateServerRequest, Code, String)> = vec![
        (
            with(missing),
            Code::NotFound,
            format!("image {missing} not found"),
        ),
        (
            with(&private_b),
            Code::NotFound,
            format!("image {private_b} not found"),
        ),
        (
            with(&queued),
            Code::FailedPrecondition,
            format!("image {queued} is not active (it is queued)"),
        ),
        (
            with(&big_min_disk),
            Code::InvalidArgument,
            format!(
                "flavor: m1.tiny's root disk of 1 GB is smaller than image {big_min_disk}'s min_disk of 50 GB"
            ),
        ),
        (
            with(&big_min_ram),
            Code::InvalidArgument,
            format!(
                "flavor: m1.tiny's 512 MB of RAM is less than image {big_min_ram}'s min_ram of 4096 MB"
            ),
        ),
        // No network or volume service in this cloud: refused, clearly.
        (
            pb::CreateServerRequest {
                networks: vec![pb::NetworkRequest {
                    network_id: missing.into(),
                    ..Default::default()
                }],
                ..api.server("x", "m1.tiny")
            },
            Code::FailedPrecondition,
            "this cloud has no network service configured (compute-api [peers] network)".into(),
        ),
        (
            pb::CreateServerRequest {
                block_devices: vec![pb::BlockDevice {
                    source: "volume".into(),
                    uuid: missing.into(),
                    boot_index: 1,
                    ..Default::default()
                }],
                ..api.server("x", "m1.tiny")
            },
            Code::FailedPrecondition,
            "this cloud has no volume service configured (compute-api [peers] volume)".into(),
        ),
    ];
    for (r, code, msg) in cases {
        assert_status(c.create_server(req(r, &member_a())).await, code, &msg);
    }
    assert_eq!(count(&api).await, 0);
    // The image's properties are recorded for the scheduler and the host.
    let s = c
        .create_server(req(api.server("ok", "m1.tiny"), &member_a()))
        .await
        .unwrap()
        .into_inner();
    let sql = runtime::db::connect(&api._db.url).await.unwrap();
    let props: serde_json::Value = sql
        .query_one(
            "SELECT image_properties FROM compute.servers WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(props["architecture"], "x86_64", "{props}");
}
