//! A real identity server for one test: its own Postgres database, its own
//! key directory, an ephemeral port on loopback, bootstrapped.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use identity::model::Interface;
use identity::{Bootstrap, Config, Identity};
use proto::identity::v1 as pb;
use proto::identity::v1::{
    catalog_client::CatalogClient, resources_client::ResourcesClient, roles_client::RolesClient,
    tokens_client::TokensClient, users_client::UsersClient,
};
use runtime::db::TestDatabase;
use tonic::transport::Channel;
use tonic::{Code, Request};

pub const ADMIN_PASSWORD: &str = "admin-secret";

pub struct Server {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub channel: Channel,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _keys: tempfile::TempDir,
    _db: TestDatabase,
}

/// A config for tests: cheap argon2 (tests check behaviour, the benchmark checks cost).
pub fn test_config(db: &TestDatabase, keys: &tempfile::TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        database_url: db.url.clone(),
        key_dir: keys.path().join("keys"),
        db_pool_size: 4,
        password_hash: identity::password::HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
        ..Config::default()
    }
}

pub fn bootstrap_spec(addr: SocketAddr) -> Bootstrap {
    Bootstrap {
        admin_user: "admin".into(),
        admin_password: ADMIN_PASSWORD.into(),
        admin_project: "admin".into(),
        region: "RegionOne".into(),
        endpoints: vec![
            (Interface::Public, format!("http://{addr}")),
            (Interface::Internal, format!("http://{addr}")),
        ],
    }
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::create()
            .await
            .expect("test database (is Postgres running?)");
        let keys = tempfile::tempdir().unwrap();
        let mut config = test_config(&db, &keys);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let identity = Identity::start(config.clone()).await.unwrap();
        identity.bootstrap(&bootstrap_spec(addr)).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = identity.clone();
        let task = tokio::spawn(async move {
            identity::serve(served, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        Self {
            addr,
            identity,
            channel,
            config,
            stop: Some(stop),
            task: Some(task),
            _keys: keys,
            _db: db,
        }
    }

    /// Stops serving and waits for the graceful drain.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    pub fn tokens(&self) -> TokensClient<Channel> {
        TokensClient::new(self.channel.clone())
    }
    pub fn resources(&self) -> ResourcesClient<Channel> {
        ResourcesClient::new(self.channel.clone())
    }
    pub fn users(&self) -> UsersClient<Channel> {
        UsersClient::new(self.channel.clone())
    }
    pub fn roles(&self) -> RolesClient<Channel> {
        RolesClient::new(self.channel.clone())
    }
    pub fn catalog(&self) -> CatalogClient<Channel> {
        CatalogClient::new(self.channel.clone())
    }

    /// Password authentication by user name in the default domain.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        scope: Option<pb::Scope>,
    ) -> Result<pb::AuthenticateResponse, tonic::Status> {
        self.tokens()
            .authenticate(password_request(user, password, scope))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD, Some(project_scope("admin")))
            .await
            .unwrap()
            .token
    }

    /// Makes a project and a user holding `role` on it; returns (project id, user id).
    pub async fn user_with_role(
        &self,
        admin: &str,
        user: &str,
        password: &str,
        project: &str,
        role: &str,
    ) -> (String, String) {
        let p = match self
            .resources()
            .create_project(auth(
                pb::CreateProjectRequest {
                    name: project.into(),
                    ..Default::default()
                },
                admin,
            ))
            .await
        {
            Ok(p) => p.into_inner().id,
            Err(s) if s.code() == Code::AlreadyExists => {
                self.resources()
                    .get_project(auth(
                        pb::GetRequest {
                            name: project.into(),
                            ..Default::default()
                        },
                        admin,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .id
            }
            Err(s) => panic!("create project: {s:?}"),
        };
        let u = self
            .users()
            .create_user(auth(
                pb::CreateUserRequest {
                    name: user.into(),
                    password: password.into(),
                    ..Default::default()
                },
                admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .id;
        self.roles()
            .assign_role(auth(
                pb::RoleAssignment {
                    role: role.into(),
                    user_id: u.clone(),
                    project_id: p.clone(),
                    ..Default::default()
                },
                admin,
            ))
            .await
            .unwrap();
        (p, u)
    }

    pub async fn validate(
        &self,
        token: &str,
        as_token: &str,
    ) -> Result<pb::TokenClaims, tonic::Status> {
        self.tokens()
            .validate_token(auth(
                pb::ValidateTokenRequest {
                    token: token.into(),
                },
                as_token,
            ))
            .await
            .map(|r| r.into_inner().claims.unwrap())
    }
}

pub fn auth<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn project_scope(name: &str) -> pb::Scope {
    pb::Scope {
        target: Some(pb::scope::Target::Project(pb::ProjectScope {
            name: name.into(),
            domain_name: "Default".into(),
            ..Default::default()
        })),
    }
}

pub fn password_request(
    user: &str,
    password: &str,
    scope: Option<pb::Scope>,
) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        method: Some(pb::authenticate_request::Method::Password(
            pb::PasswordCredentials {
                user_name: user.into(),
                user_domain_name: "Default".into(),
                password: password.into(),
                ..Default::default()
            },
        )),
        scope,
    }
}

pub fn token_request(token: &str, scope: Option<pb::Scope>) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        method: Some(pb::authenticate_request::Method::Token(
            pb::TokenCredentials {
                token: token.into(),
            },
        )),
        scope,
    }
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
