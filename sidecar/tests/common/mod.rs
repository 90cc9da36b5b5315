//! A small mesh for one test: a PKI, a real identity server on its own
//! database, and real sidecars (with real TLS) on ephemeral loopback ports.
#![allow(dead_code, clippy::unwrap_used, clippy::new_without_default)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use identity::model::Interface;
use identity::{Bootstrap, Identity};
use proto::identity::v1 as pb;
use sidecar::connector::MeshConnector;
use sidecar::tls::{Files, Tls};
use time::Duration as TDuration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

pub const ADMIN_PASSWORD: &str = "mesh-admin-pw";

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, leaf certs for identity, echo, compute-api and user bob, and a
    /// foreign CA with a compute-api cert of its own.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Authority::create("test CA", TDuration::days(1)).unwrap();
        ca.save(dir.path()).unwrap();
        for svc in ["identity", "echo", "compute-api", "image"] {
            Self::issue_with(&ca, dir.path(), svc, TDuration::hours(24));
        }
        let bob = ca
            .issue(&certs::user_id("bob").unwrap(), &[], TDuration::hours(1))
            .unwrap();
        certs::write_pair(dir.path(), "user-bob", &bob).unwrap();
        let foreign = certs::Authority::create("foreign CA", TDuration::days(1)).unwrap();
        let f = foreign
            .issue(
                &certs::service_id("compute-api", None).unwrap(),
                &["compute-api".into()],
                TDuration::hours(1),
            )
            .unwrap();
        certs::write_pair(dir.path(), "foreign", &f).unwrap();
        Self { dir }
    }

    pub fn issue_with(ca: &certs::Authority, dir: &Path, svc: &str, validity: TDuration) {
        let pair = ca
            .issue(
                &certs::service_id(svc, None).unwrap(),
                &[svc.into(), "localhost".into()],
                validity,
            )
            .unwrap();
        certs::write_pair(dir, svc, &pair).unwrap();
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    pub fn files(&self, name: &str) -> Files {
        Files {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            bundle: self.path("bundle.pem"),
        }
    }

    /// An mTLS channel presenting `name`'s certificate to `addr`, expecting `service` there.
    pub fn channel(&self, name: &str, addr: SocketAddr, service: &str) -> Channel {
        let conn = MeshConnector::new(Tls::load(self.files(name)).unwrap());
        conn.expect(&addr.to_string(), service);
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_with_connector_lazy(conn)
    }
}

/// A server-TLS channel (no client certificate) to a public listener, as a user's tool has.
pub fn public_channel(pki: &Pki, addr: SocketAddr, service: &str) -> Channel {
    let tls = sidecar::tls::client_config(&pki.path("bundle.pem"), None).unwrap();
    let conn = MeshConnector::with_config(tls);
    conn.expect(&addr.to_string(), service);
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(conn)
}

/// An mTLS channel as [`Pki::channel`], counting the TCP connections it opens.
pub fn counted_channel(
    pki: &Pki,
    name: &str,
    addr: SocketAddr,
    service: &str,
) -> (Channel, Arc<std::sync::atomic::AtomicUsize>) {
    use tower::ServiceExt;
    let conn = MeshConnector::new(Tls::load(pki.files(name)).unwrap());
    conn.expect(&addr.to_string(), service);
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    let counting = tower::service_fn(move |uri: http::Uri| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        conn.clone().oneshot(uri)
    });
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(counting);
    (ch, count)
}

/// One gRPC call by hand over `channel`: `path` exactly as given (no
/// normalisation), `body` as the raw request bytes. Returns the status.
pub async fn raw_call(
    channel: Channel,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> tonic::Status {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://svc{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(tonic::body::Body::new(
            http_body_util::Full::new(bytes::Bytes::from(body)).map_err(|e| match e {}),
        ))
        .unwrap();
    assert_eq!(
        req.uri().path_and_query().map(|p| p.as_str()),
        Some(path),
        "the client keeps the path as given"
    );
    let rsp = channel.oneshot(req).await.unwrap();
    if let Some(s) = tonic::Status::from_header_map(rsp.headers()) {
        return s;
    }
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).unwrap_or_else(|| tonic::Status::ok(""))
}

/// A gRPC message frame: flag 0, big-endian length, the bytes.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub struct IdentityServer {
    pub addr: SocketAddr,
    pub identity: Identity,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _keys: tempfile::TempDir,
    _db: runtime::db::TestDatabase,
}

impl IdentityServer {
    /// Starts identity; `internal_url` is what the catalog lists for it.
    pub async fn start(ttl_secs: u64, internal_url: Option<String>) -> Self {
        let db = runtime::db::TestDatabase::create().await.unwrap();
        let keys = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = identity::Config {
            server: runtime::config::ServerConfig {
                listen: addr,
                metrics_listen: None,
            },
            database: runtime::config::DatabaseConfig {
                url: db.url.clone(),
                pool_size: 4,
                ..runtime::config::DatabaseConfig::local("identity")
            },
            key_dir: keys.path().join("keys"),
            token_ttl_secs: ttl_secs,
            password_hash: identity::password::HashParams {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            ..identity::Config::default()
        };
        let id = Identity::start(config).await.unwrap();
        id.bootstrap(&Bootstrap {
            admin_user: "admin".into(),
            admin_password: ADMIN_PASSWORD.into(),
            admin_project: "admin".into(),
            region: "RegionOne".into(),
            endpoints: vec![
                (Interface::Public, format!("http://{addr}")),
                (
                    Interface::Internal,
                    internal_url.unwrap_or_else(|| format!("http://{addr}")),
                ),
            ],
        })
        .await
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = id.clone();
        let task = tokio::spawn(async move {
            identity::serve(served, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            identity: id,
            stop: Some(stop),
            task: Some(task),
            _keys: keys,
            _db: db,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    pub async fn token(&self, user: &str, password: &str, project: Option<&str>) -> String {
        let scope = project.map(|p| pb::Scope {
            target: Some(pb::scope::Target::Project(pb::ProjectScope {
                name: p.into(),
                domain_name: "Default".into(),
                ..Default::default()
            })),
        });
        pb::tokens_client::TokensClient::new(self.channel())
            .authenticate(pb::AuthenticateRequest {
                method: Some(pb::authenticate_request::Method::Password(
                    pb::PasswordCredentials {
                        user_name: user.into(),
                        user_domain_name: "Default".into(),
                        password: password.into(),
                        ..Default::default()
                    },
                )),
                scope,
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    pub async fn admin_token(&self) -> String {
        self.token("admin", ADMIN_PASSWORD, Some("admin")).await
    }

    /// A user with `member` on project `proj`; returns its project-scoped token.
    pub async fn member_token(&self, user: &str, proj: &str) -> String {
        let admin = self.admin_token().await;
        let p = pb::resources_client::ResourcesClient::new(self.channel())
            .create_project(auth(
                pb::CreateProjectRequest {
                    name: proj.into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let u = pb::users_client::UsersClient::new(self.channel())
            .create_user(auth(
                pb::CreateUserRequest {
                    name: user.into(),
                    password: "pw".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        pb::roles_client::RolesClient::new(self.channel())
            .assign_role(auth(
                pb::RoleAssignment {
                    role: "member".into(),
                    user_id: u.id,
                    project_id: p.id,
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap();
        self.token(user, "pw", Some(proj)).await
    }
}

/// Sidecar settings a test may change.
pub struct SidecarSpec {
    pub service: String,
    pub cert_name: String,
    pub upstream: SocketAddr,
    pub identity_url: String,
    pub policy: PathBuf,
    pub public: bool,
    pub outbound: bool,
    pub max_concurrent_requests: usize,
    pub max_message_bytes: usize,
}

impl SidecarSpec {
    pub fn new(service: &str, upstream: SocketAddr, identity_url: String) -> Self {
        Self {
            service: service.into(),
            cert_name: service.into(),
            upstream,
            identity_url,
            policy: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("policy")
                .join(format!("{service}.toml")),
            public: true,
            outbound: false,
            max_concurrent_requests: 64,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }
}

pub struct Sidecar {
    pub internal: SocketAddr,
    pub public: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn bind(n: usize) -> Vec<tokio::net::TcpListener> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    v
}

impl Sidecar {
    pub async fn start(pki: &Pki, spec: SidecarSpec) -> Self {
        let mut l = bind(3).await;
        let (outbound, public, internal) = (l.pop().unwrap(), l.pop().unwrap(), l.pop().unwrap());
        Self::start_on(pki, spec, internal, public, outbound).await
    }

    pub async fn start_on(
        pki: &Pki,
        spec: SidecarSpec,
        internal: tokio::net::TcpListener,
        public: tokio::net::TcpListener,
        outbound: tokio::net::TcpListener,
    ) -> Self {
        let files = pki.files(&spec.cert_name);
        let config = sidecar::Config {
            service: spec.service,
            upstream: spec.upstream,
            cert: files.cert,
            key: files.key,
            bundle: files.bundle,
            identity_url: spec.identity_url,
            policy: spec.policy,
            max_concurrent_requests: spec.max_concurrent_requests,
            max_message_bytes: spec.max_message_bytes,
            request_timeout_ms: 10_000,
            drain_secs: 2,
            ..sidecar::Config::default()
        };
        let addrs = (
            internal.local_addr().unwrap(),
            public.local_addr().unwrap(),
            outbound.local_addr().unwrap(),
        );
        let listeners = sidecar::Listeners {
            internal,
            public: spec.public.then_some(public),
            outbound: spec.outbound.then_some(outbound),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sidecar::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Self {
            internal: addrs.0,
            public: spec.public.then_some(addrs.1),
            outbound: spec.outbound.then_some(addrs.2),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("sidecar drained within 10 s")
                .unwrap()
                .unwrap();
        }
    }
}

pub fn auth<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "status: {s:?}");
            s
        }
    }
}

/// Retries `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gRPC health server that records the headers of every request it gets
/// (at the health service) and the path of every request (at the HTTP level,
/// before any routing).
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<tonic::metadata::MetadataMap>>>,
    pub paths: Arc<Mutex<Vec<String>>>,
}

impl Echo {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<tonic::metadata::MetadataMap>>> = Arc::default();
        let record = seen.clone();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let svc =
            tonic::service::interceptor::InterceptedService::new(health, move |req: Request<()>| {
                record.lock().unwrap().push(req.metadata().clone());
                Ok(req)
            });
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let at_http = paths.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(
                    move |r: http::Request<tonic::body::Body>| {
                        at_http.lock().unwrap().push(r.uri().path().to_string());
                        r
                    },
                ))
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self { addr, seen, paths }
    }
}
