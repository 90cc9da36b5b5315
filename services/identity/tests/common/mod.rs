//! Identity's verbs on top of `runtime::testing`: a real identity server for
//! one test (its own Postgres database, its own key directory, an ephemeral
//! loopback port, bootstrapped), logins, and bearer requests. Identity reads
//! bearer tokens itself, so its callers are tokens, not the sidecar headers
//! of `runtime::testing::req`.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::net::SocketAddr;

use identity::model::Interface;
use identity::{Bootstrap, Config, Identity};
use proto::identity::v1 as pb;
use proto::identity::v1::{
    catalog_client::CatalogClient, resources_client::ResourcesClient, roles_client::RolesClient,
    tokens_client::TokensClient, users_client::UsersClient,
};
use runtime::config::{DatabaseConfig, ServerConfig};
use runtime::db::TestDatabase;
pub use runtime::testing::{Served, assert_code, assert_status, wait_for};
use tonic::transport::Channel;
use tonic::{Code, Request};

pub const ADMIN_PASSWORD: &str = "admin-secret";
/// What every public caller reads for any refused credential or token.
pub const AUTH_FAILED: &str = "authentication failed";
/// The SPIFFE id tests use to act as a mesh peer (a sidecar).
pub const MESH_PEER: &str = "spiffe://cirrus.local/svc/compute-api";

pub struct Server {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub identity: Identity,
    pub config: Config,
    served: Served,
    _keys: tempfile::TempDir,
    pub db: TestDatabase,
}

/// A config for tests: cheap argon2 (tests check behaviour, the benchmark checks cost).
pub fn test_config(db: &TestDatabase, keys: &tempfile::TempDir) -> Config {
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        },
        database: DatabaseConfig {
            url: db.url.clone(),
            pool_size: 4,
            ..DatabaseConfig::local("identity")
        },
        key_dir: keys.path().join("keys"),
        password_hash: identity::password::HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
        ..Config::default()
    }
}

/// Another replica on a [`Server`]'s database.
pub struct Replica {
    pub channel: Channel,
    pub identity: Identity,
    served: Served,
    _keys: tempfile::TempDir,
}

impl Replica {
    pub fn tokens(&self) -> TokensClient<Channel> {
        TokensClient::new(self.channel.clone())
    }
    pub fn catalog(&self) -> CatalogClient<Channel> {
        CatalogClient::new(self.channel.clone())
    }
    pub async fn stop(self) {
        self.served.stop().await.unwrap();
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
        let identity = Identity::start(config.clone()).await.unwrap();
        let served = identity.clone();
        let served =
            Served::spawn(|listener, shutdown| identity::serve(served, listener, shutdown)).await;
        identity
            .bootstrap(&bootstrap_spec(served.addr))
            .await
            .unwrap();
        Self {
            addr: served.addr,
            channel: served.channel.clone(),
            identity,
            config,
            served,
            _keys: keys,
            db,
        }
    }

    /// Stops serving and waits for the graceful drain.
    pub async fn stop(self) {
        self.served.stop().await.unwrap();
    }

    /// A second identity process on this server's database, with its own
    /// key directory holding a copy of this one's key-encryption key (what
    /// an operator distributes), on its own ephemeral port.
    pub async fn replica(&self) -> Replica {
        let keys = tempfile::tempdir().unwrap();
        let mut config = test_config(&self.db, &keys);
        std::fs::create_dir_all(&config.key_dir).unwrap();
        let kek = config.key_dir.join("kek");
        std::fs::copy(self.config.kek_path(), &kek).unwrap();
        config.key_encryption_key_file = Some(kek);
        let identity = Identity::start(config).await.unwrap();
        let served = identity.clone();
        let served =
            Served::spawn(|listener, shutdown| identity::serve(served, listener, shutdown)).await;
        Replica {
            channel: served.channel.clone(),
            identity,
            served,
            _keys: keys,
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

    /// A token of `user` scoped to `project`.
    pub async fn project_token(&self, user: &str, password: &str, project: &str) -> String {
        self.login(user, password, Some(project_scope(project)))
            .await
            .unwrap()
            .token
    }

    /// Makes a project (if needed) and a user holding `role` on it; returns (project id, user id).
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
            Err(s) if s.code() == Code::AlreadyExists => self.project(admin, project).await.id,
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

    pub async fn project(&self, token: &str, name: &str) -> pb::Project {
        self.resources()
            .get_project(auth(by_name(name), token))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn user(&self, token: &str, name: &str) -> pb::User {
        self.users()
            .get_user(auth(by_name(name), token))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn user_count(&self, admin: &str) -> usize {
        self.users()
            .list_users(auth(pb::ListUsersRequest::default(), admin))
            .await
            .unwrap()
            .into_inner()
            .users
            .len()
    }

    pub async fn catalog_of(&self, token: &str) -> Vec<pb::CatalogService> {
        self.catalog()
            .get_catalog(auth(pb::GetCatalogRequest {}, token))
            .await
            .unwrap()
            .into_inner()
            .catalog
    }

    /// `ValidateToken` of `token`, as the bearer of `as_token`, from outside the mesh.
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

    /// The same, from a mesh peer (which may read why a token was refused).
    pub async fn validate_as_mesh(
        &self,
        token: &str,
        as_token: &str,
    ) -> Result<pb::TokenClaims, tonic::Status> {
        self.tokens()
            .validate_token(mesh(auth(
                pb::ValidateTokenRequest {
                    token: token.into(),
                },
                as_token,
            )))
            .await
            .map(|r| r.into_inner().claims.unwrap())
    }
}

/// A request with `authorization: Bearer <token>`.
pub fn auth<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// The request as identity's sidecar forwards it from a mesh workload.
pub fn mesh<T>(mut r: Request<T>) -> Request<T> {
    r.metadata_mut()
        .insert(runtime::caller::PEER, MESH_PEER.parse().unwrap());
    r
}

pub fn by_name(name: &str) -> pb::GetRequest {
    pb::GetRequest {
        name: name.into(),
        ..Default::default()
    }
}

pub fn delete_by_name(name: &str) -> pb::DeleteRequest {
    pb::DeleteRequest {
        name: name.into(),
        ..Default::default()
    }
}

pub fn by_id(id: &str) -> pb::GetRequest {
    pb::GetRequest {
        id: id.into(),
        ..Default::default()
    }
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
