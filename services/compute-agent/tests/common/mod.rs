//! A real mesh for the agent's real-guest tests: a PKI made by `certs`, an
//! identity server on its own database (keys, tokens, the catalog), the
//! image service on its own database and store, image's inbound sidecar and
//! this host's compute-agent sidecar (outbound, with the host's SPIFFE id in
//! its certificate), with real mTLS between them. The agent reaches image as
//! `http://image` through its sidecar with the user's bearer token, exactly
//! as deployed. The tiny test guest (`scripts/guest/build.sh`) is uploaded
//! as three images: kernel (aki), ramdisk (ari) and root disk (qcow2, with
//! `kernel_id` / `ramdisk_id`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use identity::model::Interface;
use proto::identity::v1 as ipb;
use proto::image::v1 as pb;
use proto::image::v1::images_client::ImagesClient;
use runtime::config::{DatabaseConfig, ServerConfig};
use sha2::Digest;
use tonic::Request;
use tonic::transport::Channel;

const ADMIN_PASSWORD: &str = "guest-admin-pw";
const MIB: usize = 1024 * 1024;

/// A name unique to this test run (host names, bridges, namespaces).
pub fn uniq() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny guest's files, built if missing; libvirt's daemons started.
pub fn guest_files() -> PathBuf {
    let out = root().join("target/guest");
    for script in ["scripts/setup.d/libvirt.sh", "scripts/guest/build.sh"] {
        let mut c = std::process::Command::new("bash");
        c.arg(root().join(script));
        if script.ends_with("build.sh") {
            c.arg(&out);
        }
        let ok = c.status().expect("run a setup script");
        assert!(ok.success(), "{script} failed");
    }
    out
}

pub fn auth<T>(m: T, token: &str) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

pub struct Mesh {
    /// This host's name (the agent's certificate names it).
    pub host: String,
    /// The network service, when started (direct, for its host agent).
    pub network_url: Option<String>,
    pub pki: tempfile::TempDir,
    pub store: tempfile::TempDir,
    /// The compute agent's sidecar outbound listener.
    pub outbound: SocketAddr,
    /// The cloud admin's project-scoped token (the "user" of the builds).
    pub token: String,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dbs: Vec<runtime::db::TestDatabase>,
}

impl Drop for Mesh {
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
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With `network`: the network service too, behind its sidecar.
    pub async fn start_with(network: bool) -> Self {
        let host = format!("h-{}", uniq());
        let pki = tempfile::tempdir().unwrap();
        let ca = certs::Authority::create("test CA", time::Duration::days(1)).unwrap();
        ca.save(pki.path()).unwrap();
        for (svc, host) in [
            ("image", None),
            ("network", None),
            ("compute-agent", Some(host.as_str())),
        ] {
            let pair = ca
                .issue(
                    &certs::service_id(svc, host).unwrap(),
                    &[svc.into(), "localhost".into()],
                    time::Duration::hours(24),
                )
                .unwrap();
            certs::write_pair(pki.path(), svc, &pair).unwrap();
        }
        let mut stops = Vec::new();
        let mut tasks = Vec::new();

        // Identity: keys, tokens, the catalog the sidecars resolve through.
        let id_db = runtime::db::TestDatabase::create().await.unwrap();
        let id_listener = listener().await;
        let id_addr = id_listener.local_addr().unwrap();
        let id = identity::Identity::start(identity::Config {
            server: ServerConfig {
                listen: id_addr,
                metrics_listen: None,
            },
            database: DatabaseConfig {
                url: id_db.url.clone(),
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

        // The image service.
        let image_db = runtime::db::TestDatabase::create().await.unwrap();
        let store = tempfile::tempdir().unwrap();
        let image_cfg = image::Config {
            server: ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: None,
            },
            database: DatabaseConfig {
                url: image_db.url.clone(),
                pool_size: 4,
                ..DatabaseConfig::local("image")
            },
            store_dir: store.path().join("store"),
            ..image::Config::default()
        };
        let image_listener = listener().await;
        let image_addr = image_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = image::run(image_cfg, image_listener, async {
                let _ = stopped.await;
            })
            .await
            {
                eprintln!("image stopped: {e:#}");
            }
        }));

        let mut dbs = vec![id_db, image_db];
        let mut network_addr = None;
        if network {
            let db = runtime::db::TestDatabase::create().await.unwrap();
            let mut c = network::Config::default();
            c.server.listen = "127.0.0.1:0".parse().unwrap();
            c.server.metrics_listen = None;
            c.database.url = db.url.clone();
            c.database.pool_size = 8;
            c.agent_down_secs = 5;
            let l = listener().await;
            network_addr = Some(l.local_addr().unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = network::run(c, l, async {
                    let _ = stopped.await;
                })
                .await
                {
                    eprintln!("network stopped: {e:#}");
                }
            }));
            dbs.push(db);
        }

        // image's (and network's) inbound sidecar and the agent's outbound one.
        let policy = root().join("sidecar/policy");
        let (image_internal, agent_internal, outbound, network_internal) = (
            listener().await,
            listener().await,
            listener().await,
            listener().await,
        );
        let inbound = image_internal.local_addr().unwrap();
        let network_inbound = network_internal.local_addr().unwrap();
        let outbound_addr = outbound.local_addr().unwrap();
        let mut sidecars = vec![("image", "image.toml", image_addr, image_internal, None)];
        if let Some(addr) = network_addr {
            sidecars.push(("network", "network.toml", addr, network_internal, None));
        }
        for (svc, policy_file, upstream, internal, out) in sidecars.into_iter().chain([(
            "compute-agent",
            // (The agent serves nothing through its sidecar; any policy.)
            "conductor.toml",
            SocketAddr::from(([127, 0, 0, 1], 9)),
            agent_internal,
            Some(outbound),
        )]) {
            let d = pki.path();
            let config = sidecar::Config {
                service: svc.into(),
                upstream,
                cert: d.join(format!("{svc}.crt")),
                key: d.join(format!("{svc}.key")),
                bundle: d.join("bundle.pem"),
                identity_url: format!("http://{id_addr}"),
                policy: policy.join(policy_file),
                max_message_bytes: 16 * MIB,
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
            stops.push(stop);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sidecar::run(config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                {
                    eprintln!("the {svc} sidecar stopped: {e:#}");
                }
            }));
        }

        // The catalog names the inbound sidecars.
        let mut catalog = ipb::catalog_client::CatalogClient::new(id_channel);
        let mut entries = vec![("image", inbound)];
        if network_addr.is_some() {
            entries.push(("network", network_inbound));
        }
        for (name, at) in entries {
            catalog
                .create_service(auth(
                    ipb::CreateServiceRequest {
                        name: name.into(),
                        r#type: name.into(),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap();
            catalog
                .create_endpoint(auth(
                    ipb::CreateEndpointRequest {
                        service: name.into(),
                        interface: ipb::Interface::Internal as i32,
                        url: format!("https://{at}"),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap();
        }

        let mesh = Self {
            host,
            network_url: network_addr.map(|a| format!("http://{a}")),
            pki,
            store,
            outbound: outbound_addr,
            token,
            stops,
            tasks,
            _dbs: dbs,
        };
        let client = mesh.images();
        let token = mesh.token.clone();
        runtime::testing::wait_for(
            "the sidecar pair to forward to image",
            Duration::from_secs(30),
            || {
                let mut c = client.clone();
                let token = token.clone();
                async move {
                    c.get_quota(auth(pb::GetQuotaRequest::default(), &token))
                        .await
                        .map(|_| ())
                        .map_err(|s| format!("{s:?}"))
                }
            },
        )
        .await;
        mesh
    }

    /// network through the agent's sidecar.
    pub fn networks(
        &self,
    ) -> proto::network::v1::networks_client::NetworksClient<runtime::trace::Channel> {
        let ch = runtime::serve::via_sidecar(self.outbound, "network").unwrap();
        proto::network::v1::networks_client::NetworksClient::new(ch)
    }

    /// image through the agent's sidecar.
    pub fn images(&self) -> ImagesClient<runtime::trace::Channel> {
        let ch = runtime::serve::via_sidecar(self.outbound, "image").unwrap();
        ImagesClient::new(ch).max_decoding_message_size(8 * MIB)
    }

    /// Creates and uploads an image; its id.
    pub async fn upload(
        &self,
        name: &str,
        format: pb::DiskFormat,
        data: &[u8],
        properties: &[(&str, &str)],
    ) -> String {
        let mut c = self.images();
        let img = c
            .create_image(auth(
                pb::CreateImageRequest {
                    name: name.into(),
                    disk_format: format as i32,
                    container_format: pb::ContainerFormat::Bare as i32,
                    properties: properties
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    expected_sha256: hex::encode(sha2::Sha256::digest(data)),
                    ..Default::default()
                },
                &self.token,
            ))
            .await
            .expect("create image")
            .into_inner();
        let msgs: Vec<pb::UploadRequest> = data
            .chunks(MIB)
            .enumerate()
            .map(|(i, d)| pb::UploadRequest {
                image_id: if i == 0 {
                    img.id.clone()
                } else {
                    String::new()
                },
                data: d.to_vec().into(),
            })
            .collect();
        let done = c
            .upload(auth(tokio_stream::iter(msgs), &self.token))
            .await
            .expect("upload")
            .into_inner();
        assert_eq!(done.status, pb::Status::Active as i32, "{done:?}");
        img.id
    }

    /// The tiny guest as three images; the root image's id.
    pub async fn upload_tiny_guest(&self, files: &Path) -> String {
        let kernel = std::fs::read(files.join("vmlinuz")).unwrap();
        let ramdisk = std::fs::read(files.join("initramfs.img")).unwrap();
        let rootdisk = std::fs::read(files.join("root.qcow2")).unwrap();
        let k = self
            .upload("tiny-kernel", pb::DiskFormat::Aki, &kernel, &[])
            .await;
        let r = self
            .upload("tiny-ramdisk", pb::DiskFormat::Ari, &ramdisk, &[])
            .await;
        self.upload(
            "tiny",
            pb::DiskFormat::Qcow2,
            &rootdisk,
            &[("kernel_id", &k), ("ramdisk_id", &r)],
        )
        .await
    }
}

/// Waits until `log` holds every one of `wanted` (each on some line), or
/// fails with what the console said.
pub async fn wait_console(log: &Path, wanted: &[String], bound: Duration) -> String {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let text = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).to_string())
            .unwrap_or_default();
        if wanted
            .iter()
            .all(|w| text.lines().any(|l| l.contains(w.as_str())))
        {
            return text;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the console did not show all of {wanted:#?} within {bound:?}; it said:\n{text}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// This host's network agent (OVS bridge, dnsmasq in namespaces), on a
/// test-unique bridge and namespace prefix; removed on drop.
pub struct NetworkHost {
    pub bridge: String,
    prefix: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl NetworkHost {
    pub fn start(host: &str, network_url: &str) -> Self {
        let u = uniq();
        let dir = tempfile::tempdir().unwrap();
        let config = network_agent::Config {
            host: host.into(),
            network_url: network_url.into(),
            bridge: format!("bg{u}"),
            namespace_prefix: format!("cg{u}-"),
            state_dir: dir.path().join("agent"),
            heartbeat_secs: 1,
            sync_wait_ms: 5000,
            ..network_agent::Config::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let bridge = config.bridge.clone();
        let prefix = config.namespace_prefix.clone();
        tokio::spawn(async move {
            if let Err(e) = network_agent::run(config, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("network agent stopped: {e:#}");
            }
        });
        Self {
            bridge,
            prefix,
            stop: Some(tx),
            _dir: dir,
        }
    }
}

impl Drop for NetworkHost {
    fn drop(&mut self) {
        drop(self.stop.take());
        let run = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .ok()
        };
        if let Some(out) = run(&["ip", "netns", "list"]) {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some(ns) = line.split_whitespace().next() else {
                    continue;
                };
                if ns.starts_with(&self.prefix) {
                    if let Some(p) = run(&["ip", "netns", "pids", ns]) {
                        for pid in String::from_utf8_lossy(&p.stdout).split_whitespace() {
                            run(&["kill", "-KILL", pid]);
                        }
                    }
                    run(&["ip", "netns", "del", ns]);
                }
            }
        }
        run(&[
            "ovs-vsctl",
            "--timeout=10",
            "--if-exists",
            "del-br",
            &self.bridge,
        ]);
    }
}
