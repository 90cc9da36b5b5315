//! A real mesh in front of one image server, for tests: a PKI made by
//! `certs`, an identity server on its own database (tokens, keys, catalog),
//! and two real sidecars with real mTLS between them — the caller's
//! (outbound, as `compute-api`) and image's (inbound). A client speaks
//! plaintext to the outbound sidecar as `http://image` with a bearer token,
//! as every Cirrus service does.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use identity::model::Interface;
use proto::identity::v1 as ipb;
use runtime::config::{DatabaseConfig, ServerConfig};
use tonic::Request;
use tonic::transport::Channel;

const ADMIN_PASSWORD: &str = "mesh-admin-pw";
const MIB: u32 = 1024 * 1024;

/// A PKI and an identity server: what any set of sidecars needs.
pub struct Cloud {
    pub pki: tempfile::TempDir,
    pub identity: SocketAddr,
    /// The cloud admin's project-scoped token.
    pub token: String,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _db: runtime::db::TestDatabase,
}

pub struct Mesh {
    /// Plaintext to the outbound sidecar, addressed to `image`.
    pub channel: Channel,
    /// The outbound sidecar's listener (for raw HTTP/2 clients).
    pub outbound: SocketAddr,
    /// The cloud admin's project-scoped token.
    pub token: String,
    pub cloud: Cloud,
}

/// `m` with `token` as its bearer, nothing else: the sidecars set the rest.
pub fn auth<T>(m: T, token: &str) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

impl Cloud {
    /// A CA with a leaf certificate per service in `services` (files
    /// `<svc>.crt`, `<svc>.key`, `bundle.pem` in `pki`), identity on its own
    /// database, and the admin's token.
    pub async fn start(services: &[&str]) -> Self {
        let pki = tempfile::tempdir().unwrap();
        let ca = certs::Authority::create("test CA", time::Duration::days(1)).unwrap();
        ca.save(pki.path()).unwrap();
        for svc in services {
            let pair = ca
                .issue(
                    &certs::service_id(svc, None).unwrap(),
                    &[(*svc).into(), "localhost".into()],
                    time::Duration::hours(24),
                )
                .unwrap();
            certs::write_pair(pki.path(), svc, &pair).unwrap();
        }
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        // Identity: keys, tokens, the catalog the sidecars resolve through.
        let db = runtime::db::TestDatabase::create().await.unwrap();
        let id_listener = listener().await;
        let id_addr = id_listener.local_addr().unwrap();
        let id = identity::Identity::start(identity::Config {
            server: ServerConfig {
                listen: id_addr,
                metrics_listen: None,
            },
            database: DatabaseConfig {
                url: db.url.clone(),
                pool_size: 4,
                ..DatabaseConfig::local("identity")
            },
            key_dir: pki.path().join("keys"),
            password_hash: identity::password::HashParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..identity::Config::default()
        })
        .await
        .unwrap();
        id.bootstrap(&identity::Bootstrap {
            admin_user: "admin".into(),
            admin_password: ADMIN_PASSWORD.into(),
            admin_project: "admin".into(),
            region: "RegionOne".into(),
            endpoints: vec![
                (Interface::Public, format!("http://{id_addr}")),
                (Interface::Internal, format!("http://{id_addr}")),
            ],
        })
        .await
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            let _ = identity::serve(id, id_listener, async {
                let _ = stopped.await;
            })
            .await;
        }));
        let id_channel = Channel::from_shared(format!("http://{id_addr}"))
            .unwrap()
            .connect_lazy();
        let token = ipb::tokens_client::TokensClient::new(id_channel.clone())
            .authenticate(ipb::AuthenticateRequest {
                method: Some(ipb::authenticate_request::Method::Password(
                    ipb::PasswordCredentials {
                        user_name: "admin".into(),
                        user_domain_name: "Default".into(),
                        password: ADMIN_PASSWORD.into(),
                        ..Default::default()
                    },
                )),
                scope: Some(ipb::Scope {
                    target: Some(ipb::scope::Target::Project(ipb::ProjectScope {
                        name: "admin".into(),
                        domain_name: "Default".into(),
                        ..Default::default()
                    })),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .token;

        Self {
            pki,
            identity: id_addr,
            token,
            stops,
            tasks,
            _db: db,
        }
    }

    fn identity_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.identity))
            .unwrap()
            .connect_lazy()
    }

    /// Lists `service`'s internal endpoint (its inbound sidecar) in the catalog.
    pub async fn register(&self, service: &str, internal_url: String) {
        let mut catalog = ipb::catalog_client::CatalogClient::new(self.identity_channel());
        catalog
            .create_service(auth(
                ipb::CreateServiceRequest {
                    name: service.into(),
                    r#type: service.into(),
                    ..Default::default()
                },
                &self.token,
            ))
            .await
            .unwrap();
        catalog
            .create_endpoint(auth(
                ipb::CreateEndpointRequest {
                    service: service.into(),
                    interface: ipb::Interface::Internal as i32,
                    url: internal_url,
                    ..Default::default()
                },
                &self.token,
            ))
            .await
            .unwrap();
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Mesh {
    /// Starts identity and the sidecar pair in front of the image server at `image`.
    pub async fn start(image: SocketAddr) -> Self {
        let mut cloud = Cloud::start(&["image", "compute-api"]).await;
        let id_addr = cloud.identity;
        // The two sidecars.
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sidecar/policy");
        let (image_internal, caller_internal, outbound) =
            (listener().await, listener().await, listener().await);
        let inbound = image_internal.local_addr().unwrap();
        let outbound_addr = outbound.local_addr().unwrap();
        // (The caller's own inbound policy is never consulted here.)
        for (svc, policy_file, upstream, internal, out) in [
            ("image", "image.toml", image, image_internal, None),
            (
                "compute-api",
                "compute.toml",
                SocketAddr::from(([127, 0, 0, 1], 9)),
                caller_internal,
                Some(outbound),
            ),
        ] {
            let d = cloud.pki.path();
            let config = sidecar::Config {
                service: svc.into(),
                upstream,
                cert: d.join(format!("{svc}.crt")),
                key: d.join(format!("{svc}.key")),
                bundle: d.join("bundle.pem"),
                identity_url: format!("http://{id_addr}"),
                policy: policy.join(policy_file),
                max_message_bytes: 16 * MIB as usize,
                request_timeout_ms: 60_000,
                drain_secs: 1,
                ..sidecar::Config::default()
            };
            let listeners = sidecar::Listeners {
                internal,
                public: None,
                outbound: out,
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            cloud.stops.push(stop);
            cloud.tasks.push(tokio::spawn(async move {
                if let Err(e) = sidecar::run(config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                {
                    eprintln!("the {svc} sidecar stopped: {e:#}");
                }
            }));
        }

        // The catalog names image's inbound sidecar.
        cloud.register("image", format!("https://{inbound}")).await;

        let channel = Channel::from_shared(format!("http://{outbound_addr}"))
            .unwrap()
            .origin("http://image".parse().unwrap())
            .initial_stream_window_size(4 * MIB)
            .initial_connection_window_size(8 * MIB)
            .connect_lazy();
        let mesh = Self {
            channel,
            outbound: outbound_addr,
            token: cloud.token.clone(),
            cloud,
        };
        runtime::testing::wait_for(
            "the sidecar pair to forward to image",
            Duration::from_secs(30),
            || async {
                mesh.client()
                    .get_quota(auth(
                        proto::image::v1::GetQuotaRequest::default(),
                        &mesh.token,
                    ))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{s:?}"))
            },
        )
        .await;
        mesh
    }

    pub fn client(&self) -> proto::image::v1::images_client::ImagesClient<Channel> {
        proto::image::v1::images_client::ImagesClient::new(self.channel.clone())
            .max_decoding_message_size(8 * MIB as usize)
    }
}
