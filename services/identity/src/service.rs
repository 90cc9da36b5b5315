//! The identity service's domain logic: authentication, tokens, keys,
//! revocations, and the administration of domains, projects, users, roles and
//! the catalog. Every public method takes the [`Caller`] and checks, through
//! [`crate::policy`], that it may do what it asks.

use std::sync::{Arc, RwLock};

use deadpool_postgres::Pool;
use time::{Duration, OffsetDateTime};
use token::{Claims, RevocationRule, Scope, SigningKey, Verifier};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::Config;
use crate::error::{Error, Result};
use crate::keys::{KeyRepository, KeyState};
pub use crate::model::Interface;
use crate::model::*;
use crate::password::Hasher;
use crate::policy::{self, Caller};
use crate::repo::Db;

/// Now, to the microsecond, so that times survive a round trip through Postgres.
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}

/// A public key as verifiers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key_id: String,
    pub state: KeyState,
    pub public_key: Vec<u8>,
}

/// What `Watch` streams after its snapshot.
#[derive(Debug, Clone)]
pub enum Change {
    Keys(Vec<PublicKey>),
    Revocation(RevocationRule),
}

/// How a caller proves who it is.
pub enum Credentials {
    Password { user: Ref, password: String },
    Token(String),
}

/// What a new token should be scoped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRequest {
    Unscoped,
    Project(Ref),
    Domain(DomainRef),
    System,
}

pub struct Issued {
    pub token: String,
    pub claims: Claims,
    pub catalog: Vec<CatalogEntry>,
}

/// What bootstrap makes sure exists.
pub struct Bootstrap {
    pub admin_user: String,
    pub admin_password: String,
    pub admin_project: String,
    pub region: String,
    /// The identity service's own endpoints: (interface, url).
    pub endpoints: Vec<(Interface, String)>,
}

/// Names bootstrap creates; the default domain is where names without a domain live.
pub const DEFAULT_DOMAIN: &str = "Default";
pub const ROLES: [&str; 3] = ["admin", "member", "reader"];

#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    cfg: Config,
    hasher: Hasher,
    keys: KeyRepository,
    signer: RwLock<Arc<SigningKey>>,
    public_keys: RwLock<Vec<PublicKey>>,
    verifier: RwLock<Verifier>,
    changes: broadcast::Sender<Change>,
    /// The catalog returned with every token, re-read at most every few
    /// seconds and at once after a catalog change made here.
    catalog: RwLock<Option<(std::time::Instant, Arc<Vec<CatalogEntry>>)>>,
}

/// How long a cached catalog is served (other replicas' changes show up within this).
const CATALOG_TTL: std::time::Duration = std::time::Duration::from_secs(5);

fn lock_err<T>(_: T) -> Error {
    Error::Internal("a lock was poisoned".into())
}

impl Identity {
    /// Connects, migrates, opens the key repository and loads live revocations.
    pub async fn start(cfg: Config) -> Result<Self> {
        let pool = runtime::db::pool(&cfg.database_url, &cfg.schema, cfg.db_pool_size)
            .map_err(|e| Error::Internal(e.to_string()))?;
        runtime::db::migrate(&pool, &cfg.schema, crate::migrations::runner())
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let keys = KeyRepository::open(&cfg.key_dir, cfg.max_active_keys)?;
        let hasher = Hasher::new(cfg.password_hash)?;
        let (changes, _) = broadcast::channel(1024);
        let id = Self {
            inner: Arc::new(Inner {
                pool,
                hasher,
                keys,
                signer: RwLock::new(Arc::new(
                    SigningKey::generate().map_err(|e| Error::Internal(e.to_string()))?,
                )),
                public_keys: RwLock::new(Vec::new()),
                verifier: RwLock::new(Verifier::new()),
                changes,
                catalog: RwLock::new(None),
                cfg,
            }),
        };
        id.reload_keys()?;
        let since = now() - id.max_ttl();
        let conn = id.conn().await?;
        let rules = Db::Conn(&conn).active_revocations(since).await?;
        id.inner
            .verifier
            .write()
            .map_err(lock_err)?
            .set_rules(rules);
        Ok(id)
    }

    fn max_ttl(&self) -> Duration {
        Duration::seconds(i64::try_from(self.inner.cfg.token_ttl_secs).unwrap_or(i64::MAX / 2))
    }

    async fn conn(&self) -> Result<deadpool_postgres::Client> {
        Ok(self.inner.pool.get().await?)
    }

    /// Reads the key repository into the signer, the verifier and the public list.
    fn reload_keys(&self) -> Result<()> {
        let keys = self.inner.keys.load()?;
        let public: Vec<PublicKey> = keys
            .iter()
            .map(|k| PublicKey {
                key_id: k.key.key_id().to_string(),
                state: k.state,
                public_key: k.key.public_key().to_vec(),
            })
            .collect();
        let primary = keys
            .into_iter()
            .find(|k| k.state == KeyState::Primary)
            .ok_or_else(|| Error::Internal("no primary signing key".into()))?;
        *self.inner.signer.write().map_err(lock_err)? = Arc::new(primary.key);
        self.inner
            .verifier
            .write()
            .map_err(lock_err)?
            .set_keys(public.iter().map(|k| k.public_key.as_slice()));
        *self.inner.public_keys.write().map_err(lock_err)? = public;
        Ok(())
    }

    /// The catalog, from the cache when it is fresh.
    async fn cached_catalog(&self, db: &Db<'_>) -> Result<Arc<Vec<CatalogEntry>>> {
        if let Some((at, c)) = self.inner.catalog.read().map_err(lock_err)?.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(c.clone());
        }
        let fresh = Arc::new(db.catalog().await?);
        *self.inner.catalog.write().map_err(lock_err)? =
            Some((std::time::Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    fn forget_catalog(&self) {
        if let Ok(mut c) = self.inner.catalog.write() {
            *c = None;
        }
    }

    // ---------------------------------------------------------- tokens

    /// Turns a bearer token (or none) into the caller of an RPC.
    pub fn caller(&self, token: Option<&str>) -> Result<Caller> {
        match token {
            None => Ok(Caller::anonymous()),
            Some(t) => Ok(Caller::from(self.verify(t)?)),
        }
    }

    /// Offline verification: signature, expiry, revocation rules.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        Ok(self
            .inner
            .verifier
            .read()
            .map_err(lock_err)?
            .verify(token, OffsetDateTime::now_utc())?)
    }

    pub async fn authenticate(&self, creds: Credentials, scope: ScopeRequest) -> Result<Issued> {
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let now = now();
        let (user_id, user_name, user_domain, methods, parent) = match creds {
            Credentials::Password { user, password } => {
                let u = self.check_password(&db, &user, &password).await?;
                (
                    u.id,
                    u.name,
                    u.domain_id,
                    vec!["password".to_string()],
                    None,
                )
            }
            Credentials::Token(t) => {
                let parent = self.verify(&t)?;
                let id = Uuid::parse_str(&parent.sub)
                    .map_err(|_| Error::Unauthenticated("malformed token".into()))?;
                if db.user_enabled(id).await? != Some(true) {
                    return Err(Error::Unauthenticated("user is disabled".into()));
                }
                let domain = Uuid::parse_str(&parent.user_domain_id)
                    .map_err(|_| Error::Unauthenticated("malformed token".into()))?;
                let mut methods = parent.methods.clone();
                if !methods.iter().any(|m| m == "token") {
                    methods.push("token".into());
                }
                (id, parent.user_name.clone(), domain, methods, Some(parent))
            }
        };

        let (scope, roles, is_admin_project) = self.resolve_scope(&db, user_id, scope).await?;
        let mut exp = now + self.max_ttl();
        let mut audit_ids = vec![new_audit_id()];
        if let Some(p) = &parent {
            // A re-scoped token never outlives its parent, and keeps its chain.
            exp = exp.min(p.exp);
            if let Some(root) = p.audit_ids.last() {
                audit_ids.push(root.clone());
            }
        }
        let claims = Claims {
            sub: user_id.to_string(),
            user_name,
            user_domain_id: user_domain.to_string(),
            scope,
            roles,
            iat: now,
            exp,
            audit_ids,
            methods,
            is_admin_project,
        };
        let signer = self.inner.signer.read().map_err(lock_err)?.clone();
        let token = signer
            .sign(&claims)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let catalog = db.catalog().await?;
        metrics::counter!("identity_tokens_issued_total").increment(1);
        Ok(Issued {
            token,
            claims,
            catalog,
        })
    }

    /// Checks a password, counting failures toward a lockout. Unknown users
    /// and wrong passwords give the same error after the same work.
    async fn check_password(
        &self,
        db: &Db<'_>,
        user: &Ref,
        password: &str,
    ) -> Result<crate::repo::AuthUser> {
        let invalid = || Error::Unauthenticated("invalid user name or password".into());
        let found = db.auth_user(user).await?;
        let ok = self
            .inner
            .hasher
            .verify(
                password,
                found.as_ref().and_then(|u| u.password_hash.as_deref()),
            )
            .await?;
        let Some(u) = found else {
            metrics::counter!("identity_auth_failures_total", "reason" => "invalid").increment(1);
            return Err(invalid());
        };
        if u.locked_until
            .is_some_and(|t| t > OffsetDateTime::now_utc())
        {
            metrics::counter!("identity_auth_failures_total", "reason" => "locked").increment(1);
            return Err(Error::Unauthenticated(
                "account is locked after repeated failures; try again later".into(),
            ));
        }
        if !ok {
            let cfg = &self.inner.cfg;
            if cfg.lockout_failure_attempts > 0 {
                db.record_failed_login(
                    u.id,
                    i32::try_from(cfg.lockout_failure_attempts).unwrap_or(i32::MAX),
                    cfg.lockout_duration_secs as f64,
                )
                .await?;
            }
            metrics::counter!("identity_auth_failures_total", "reason" => "invalid").increment(1);
            return Err(invalid());
        }
        db.clear_failed_logins(u.id).await?;
        if !u.enabled {
            metrics::counter!("identity_auth_failures_total", "reason" => "disabled").increment(1);
            return Err(Error::Unauthenticated("user is disabled".into()));
        }
        Ok(u)
    }

    /// Checks the user may take the scope; returns it with the user's expanded roles there.
    async fn resolve_scope(
        &self,
        db: &Db<'_>,
        user_id: Uuid,
        scope: ScopeRequest,
    ) -> Result<(Option<Scope>, Vec<String>, bool)> {
        let denied =
            || Error::PermissionDenied("the user has no role on the requested scope".into());
        let (scope, target, is_admin_project) = match scope {
            ScopeRequest::Unscoped => return Ok((None, Vec::new(), false)),
            ScopeRequest::Project(r) => {
                let p = db.scope_project(&r).await?.ok_or_else(denied)?;
                if !p.project.enabled || !p.domain_enabled {
                    return Err(Error::Unauthenticated("project is disabled".into()));
                }
                (
                    Scope::Project {
                        id: p.project.id.to_string(),
                        name: p.project.name,
                        domain_id: p.project.domain_id.to_string(),
                    },
                    Target::Project(p.project.id),
                    p.is_admin_project,
                )
            }
            ScopeRequest::Domain(r) => {
                let d = match db.domain_id(&r).await {
                    Ok(id) => db.get_domain(&Ref::Id(id)).await?,
                    Err(Error::NotFound(_)) => return Err(denied()),
                    Err(e) => return Err(e),
                };
                if !d.enabled {
                    return Err(Error::Unauthenticated("domain is disabled".into()));
                }
                (
                    Scope::Domain {
                        id: d.id.to_string(),
                        name: d.name,
                    },
                    Target::Domain(d.id),
                    false,
                )
            }
            ScopeRequest::System => (Scope::System, Target::System, false),
        };
        let roles = db.effective_roles(user_id, target).await?;
        if roles.is_empty() {
            return Err(denied());
        }
        Ok((Some(scope), roles, is_admin_project))
    }

    /// Full validation for the `ValidateToken` RPC.
    pub async fn validate(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<(Claims, Vec<CatalogEntry>)> {
        let claims = self.verify(token)?;
        policy::admin_or_user(caller, &claims.sub)?;
        let conn = self.conn().await?;
        let catalog = self
            .cached_catalog(&Db::Conn(&conn))
            .await?
            .as_ref()
            .clone();
        Ok((claims, catalog))
    }

    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> Result<()> {
        let claims = self
            .inner
            .verifier
            .read()
            .map_err(lock_err)?
            .verify_signature(token)?;
        policy::admin_or_user(caller, &claims.sub)?;
        self.revoke(vec![rule(
            None,
            None,
            None,
            Some(claims.audit_id().to_string()),
        )])
        .await
    }

    pub async fn revoke_audit_id(&self, caller: &Caller, audit_id: &str) -> Result<()> {
        policy::admin(caller)?;
        self.revoke(vec![rule(None, None, None, Some(audit_id.to_string()))])
            .await
    }

    /// Stores rules in their own transaction, then applies and announces them.
    async fn revoke(&self, rules: Vec<RevocationRule>) -> Result<()> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        for r in &rules {
            Db::Tx(&tx).insert_revocation(r).await?;
        }
        tx.commit().await?;
        self.announce(rules)
    }

    /// Applies committed rules to this process and tells every watcher.
    fn announce(&self, rules: Vec<RevocationRule>) -> Result<()> {
        let mut v = self.inner.verifier.write().map_err(lock_err)?;
        for r in rules {
            v.add_rule(r.clone());
            let _ = self.inner.changes.send(Change::Revocation(r));
        }
        metrics::gauge!("identity_revocation_rules").set(v.rules().len() as f64);
        Ok(())
    }

    pub fn rotate_keys(&self, caller: &Caller) -> Result<Vec<PublicKey>> {
        policy::admin(caller)?;
        self.inner.keys.rotate()?;
        self.reload_keys()?;
        let keys = self.public_keys()?;
        let _ = self.inner.changes.send(Change::Keys(keys.clone()));
        tracing::info!(primary = ?keys.iter().find(|k| k.state == KeyState::Primary).map(|k| &k.key_id), "signing keys rotated");
        Ok(keys)
    }

    pub fn public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.inner.public_keys.read().map_err(lock_err)?.clone())
    }

    /// The current keys and rules, and a receiver of every later change.
    /// Subscribes first, so nothing between the snapshot and the stream is lost.
    pub fn watch(
        &self,
        caller: &Caller,
    ) -> Result<(
        Vec<PublicKey>,
        Vec<RevocationRule>,
        broadcast::Receiver<Change>,
    )> {
        policy::authenticated_or_mesh(caller)?;
        let rx = self.inner.changes.subscribe();
        let keys = self.public_keys()?;
        let rules = self
            .inner
            .verifier
            .read()
            .map_err(lock_err)?
            .rules()
            .to_vec();
        Ok((keys, rules, rx))
    }

    /// Forgets revocation rules older than the longest token lifetime.
    pub async fn prune(&self) -> Result<()> {
        let cutoff = now() - self.max_ttl();
        let conn = self.conn().await?;
        Db::Conn(&conn).prune_revocations(cutoff).await?;
        self.inner
            .verifier
            .write()
            .map_err(lock_err)?
            .prune_rules(now(), self.max_ttl());
        Ok(())
    }

    // ------------------------------------------------- domains, projects

    pub async fn create_domain(
        &self,
        caller: &Caller,
        name: String,
        description: String,
        enabled: bool,
    ) -> Result<Domain> {
        policy::admin(caller)?;
        let d = Domain {
            id: Uuid::new_v4(),
            name,
            description,
            enabled,
        };
        Db::Conn(&self.conn().await?).create_domain(&d).await?;
        Ok(d)
    }

    pub async fn get_domain(&self, caller: &Caller, r: Ref) -> Result<Domain> {
        let conn = self.conn().await?;
        let d = Db::Conn(&conn).get_domain(&r).await?;
        policy::admin_or_domain_member(caller, &d.id.to_string())?;
        Ok(d)
    }

    pub async fn list_domains(&self, caller: &Caller) -> Result<Vec<Domain>> {
        policy::admin(caller)?;
        Db::Conn(&self.conn().await?).list_domains().await
    }

    pub async fn update_domain(&self, caller: &Caller, id: Uuid, patch: Patch) -> Result<Domain> {
        policy::admin(caller)?;
        let disabling = patch.enabled == Some(false);
        self.in_tx(move |db| {
            Box::pin(async move {
                let d = db.update_domain(id, &patch).await?;
                let rules = if disabling {
                    vec![rule(None, None, Some(id), None)]
                } else {
                    vec![]
                };
                Ok((d, rules))
            })
        })
        .await
    }

    pub async fn delete_domain(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                let d = db.get_domain(&Ref::Id(id)).await?;
                if d.enabled {
                    return Err(Error::FailedPrecondition(
                        "disable the domain before deleting it".into(),
                    ));
                }
                db.delete_domain(id).await?;
                Ok(((), vec![rule(None, None, Some(id), None)]))
            })
        })
        .await
    }

    pub async fn create_project(
        &self,
        caller: &Caller,
        name: String,
        domain: Option<DomainRef>,
        description: String,
        enabled: bool,
    ) -> Result<Project> {
        policy::admin(caller)?;
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let domain_id = db
            .domain_id(&domain.unwrap_or(DomainRef::Name(DEFAULT_DOMAIN.into())))
            .await?;
        let p = Project {
            id: Uuid::new_v4(),
            domain_id,
            name,
            description,
            enabled,
        };
        db.create_project(&p).await?;
        Ok(p)
    }

    pub async fn get_project(&self, caller: &Caller, r: Ref) -> Result<Project> {
        let conn = self.conn().await?;
        let p = Db::Conn(&conn).get_project(&r).await?;
        policy::admin_or_project_member(caller, &p.id.to_string())?;
        Ok(p)
    }

    pub async fn list_projects(
        &self,
        caller: &Caller,
        domain_id: Option<Uuid>,
        user_id: Option<Uuid>,
    ) -> Result<Vec<Project>> {
        match user_id {
            Some(u) => policy::admin_or_user(caller, &u.to_string())?,
            None => drop(policy::admin(caller)?),
        }
        Db::Conn(&self.conn().await?)
            .list_projects(domain_id, user_id)
            .await
    }

    pub async fn update_project(&self, caller: &Caller, id: Uuid, patch: Patch) -> Result<Project> {
        policy::admin(caller)?;
        let disabling = patch.enabled == Some(false);
        self.in_tx(move |db| {
            Box::pin(async move {
                let p = db.update_project(id, &patch).await?;
                let rules = if disabling {
                    vec![rule(None, Some(id), None, None)]
                } else {
                    vec![]
                };
                Ok((p, rules))
            })
        })
        .await
    }

    pub async fn delete_project(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                db.delete_project(id).await?;
                Ok(((), vec![rule(None, Some(id), None, None)]))
            })
        })
        .await
    }

    // ------------------------------------------------------------ users

    pub async fn create_user(&self, caller: &Caller, u: NewUser) -> Result<User> {
        policy::admin(caller)?;
        let hash = match &u.password {
            Some(p) => Some(self.inner.hasher.hash(p).await?),
            None => None,
        };
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let domain_id = db
            .domain_id(&u.domain.unwrap_or(DomainRef::Name(DEFAULT_DOMAIN.into())))
            .await?;
        let user = User {
            id: Uuid::new_v4(),
            domain_id,
            name: u.name,
            email: u.email,
            description: u.description,
            enabled: u.enabled,
            locked_until: None,
        };
        db.create_user(&user, hash.as_deref()).await?;
        Ok(user)
    }

    pub async fn get_user(&self, caller: &Caller, r: Ref) -> Result<User> {
        let conn = self.conn().await?;
        let u = Db::Conn(&conn).get_user(&r).await?;
        policy::admin_or_user(caller, &u.id.to_string())?;
        Ok(u)
    }

    pub async fn list_users(&self, caller: &Caller, domain_id: Option<Uuid>) -> Result<Vec<User>> {
        policy::admin(caller)?;
        Db::Conn(&self.conn().await?).list_users(domain_id).await
    }

    /// Admin update. Disabling the user or resetting its password revokes its tokens.
    pub async fn update_user(&self, caller: &Caller, id: Uuid, patch: Patch) -> Result<User> {
        policy::admin(caller)?;
        let hash = match &patch.password {
            Some(p) => Some(self.inner.hasher.hash(p).await?),
            None => None,
        };
        let revoke = patch.enabled == Some(false) || hash.is_some();
        self.in_tx(move |db| {
            Box::pin(async move {
                let u = db.update_user(id, &patch, hash.as_deref()).await?;
                let rules = if revoke {
                    vec![rule(Some(id), None, None, None)]
                } else {
                    vec![]
                };
                Ok((u, rules))
            })
        })
        .await
    }

    pub async fn delete_user(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                db.delete_user(id).await?;
                Ok(((), vec![rule(Some(id), None, None, None)]))
            })
        })
        .await
    }

    /// A user changes its own password; every token it holds is revoked.
    pub async fn change_password(
        &self,
        caller: &Caller,
        id: Uuid,
        original: &str,
        new: &str,
    ) -> Result<()> {
        policy::same_user(caller, &id.to_string())?;
        let conn = self.conn().await?;
        let current = Db::Conn(&conn).password_hash(id).await?;
        if !self
            .inner
            .hasher
            .verify(original, current.as_deref())
            .await?
        {
            return Err(Error::Unauthenticated(
                "the original password is wrong".into(),
            ));
        }
        let hash = self.inner.hasher.hash(new).await?;
        drop(conn);
        self.in_tx(move |db| {
            Box::pin(async move {
                let patch = Patch::default();
                db.update_user(id, &patch, Some(&hash)).await?;
                Ok(((), vec![rule(Some(id), None, None, None)]))
            })
        })
        .await
    }

    // ------------------------------------------------------------ roles

    pub async fn create_role(
        &self,
        caller: &Caller,
        name: String,
        description: String,
    ) -> Result<Role> {
        policy::admin(caller)?;
        let r = Role {
            id: Uuid::new_v4(),
            name,
            description,
        };
        Db::Conn(&self.conn().await?).create_role(&r).await?;
        Ok(r)
    }

    pub async fn get_role(&self, caller: &Caller, r: Ref) -> Result<Role> {
        policy::authenticated(caller)?;
        Db::Conn(&self.conn().await?).get_role(&r).await
    }

    pub async fn list_roles(&self, caller: &Caller) -> Result<Vec<Role>> {
        policy::authenticated(caller)?;
        Db::Conn(&self.conn().await?).list_roles().await
    }

    /// Deleting a role revokes the tokens of everyone who held it.
    pub async fn delete_role(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                let holders = db.holders_of_role(id).await?;
                db.delete_role(id).await?;
                Ok((
                    (),
                    holders
                        .into_iter()
                        .map(|u| rule(Some(u), None, None, None))
                        .collect(),
                ))
            })
        })
        .await
    }

    pub async fn create_implied_role(
        &self,
        caller: &Caller,
        prior: String,
        implied: String,
    ) -> Result<(String, String)> {
        policy::admin(caller)?;
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let (p, i) = (db.role_id(&prior).await?, db.role_id(&implied).await?);
        if p == i {
            return Err(Error::InvalidArgument("a role cannot imply itself".into()));
        }
        db.create_implied_role(p, i).await?;
        Ok((prior, implied))
    }

    pub async fn list_implied_roles(&self, caller: &Caller) -> Result<Vec<(String, String)>> {
        policy::authenticated(caller)?;
        Db::Conn(&self.conn().await?).list_implied_roles().await
    }

    /// Removing an implication revokes the tokens of the prior role's holders.
    pub async fn delete_implied_role(
        &self,
        caller: &Caller,
        prior: String,
        implied: String,
    ) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                let (p, i) = (db.role_id(&prior).await?, db.role_id(&implied).await?);
                let holders = db.holders_of_role(p).await?;
                db.delete_implied_role(p, i).await?;
                Ok((
                    (),
                    holders
                        .into_iter()
                        .map(|u| rule(Some(u), None, None, None))
                        .collect(),
                ))
            })
        })
        .await
    }

    pub async fn assign_role(
        &self,
        caller: &Caller,
        user_id: Uuid,
        role: String,
        target: Target,
    ) -> Result<Assignment> {
        policy::admin(caller)?;
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        db.get_user(&Ref::Id(user_id)).await?;
        let role_id = db.role_id(&role).await?;
        let role_name = db.get_role(&Ref::Id(role_id)).await?.name;
        match target {
            Target::Project(p) => drop(db.get_project(&Ref::Id(p)).await?),
            Target::Domain(d) => drop(db.get_domain(&Ref::Id(d)).await?),
            Target::System => {}
        }
        db.assign(user_id, role_id, target).await?;
        Ok(Assignment {
            user_id,
            role_id,
            role_name,
            target,
        })
    }

    /// Removing an assignment revokes the user's tokens on that target.
    pub async fn unassign_role(
        &self,
        caller: &Caller,
        user_id: Uuid,
        role: String,
        target: Target,
    ) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |db| {
            Box::pin(async move {
                let role_id = db.role_id(&role).await?;
                db.unassign(user_id, role_id, target).await?;
                let r = match target {
                    Target::Project(p) => rule(Some(user_id), Some(p), None, None),
                    Target::Domain(d) => rule(Some(user_id), None, Some(d), None),
                    Target::System => rule(Some(user_id), None, None, None),
                };
                Ok(((), vec![r]))
            })
        })
        .await
    }

    pub async fn list_assignments(
        &self,
        caller: &Caller,
        user_id: Option<Uuid>,
        project_id: Option<Uuid>,
        domain_id: Option<Uuid>,
    ) -> Result<Vec<Assignment>> {
        match user_id {
            Some(u) => policy::admin_or_user(caller, &u.to_string())?,
            None => drop(policy::admin(caller)?),
        }
        Db::Conn(&self.conn().await?)
            .list_assignments(user_id, project_id, domain_id)
            .await
    }

    // ---------------------------------------------------------- catalog

    pub async fn create_service(
        &self,
        caller: &Caller,
        name: String,
        kind: String,
        description: String,
        enabled: bool,
    ) -> Result<Service> {
        policy::admin(caller)?;
        let s = Service {
            id: Uuid::new_v4(),
            name,
            kind,
            description,
            enabled,
        };
        Db::Conn(&self.conn().await?).create_service(&s).await?;
        self.forget_catalog();
        Ok(s)
    }

    pub async fn list_services(&self, caller: &Caller) -> Result<Vec<Service>> {
        policy::authenticated_or_mesh(caller)?;
        Db::Conn(&self.conn().await?).list_services().await
    }

    pub async fn delete_service(&self, caller: &Caller, name_or_id: &str) -> Result<()> {
        policy::admin(caller)?;
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let id = db.service_id(name_or_id).await?;
        db.delete_service(id).await?;
        self.forget_catalog();
        Ok(())
    }

    pub async fn create_endpoint(
        &self,
        caller: &Caller,
        service: &str,
        interface: Interface,
        region: String,
        url: String,
        enabled: bool,
    ) -> Result<Endpoint> {
        policy::admin(caller)?;
        let conn = self.conn().await?;
        let db = Db::Conn(&conn);
        let e = Endpoint {
            id: Uuid::new_v4(),
            service_id: db.service_id(service).await?,
            interface,
            region,
            url,
            enabled,
        };
        db.create_endpoint(&e).await?;
        self.forget_catalog();
        Ok(e)
    }

    pub async fn list_endpoints(
        &self,
        caller: &Caller,
        service_id: Option<Uuid>,
        interface: Option<Interface>,
    ) -> Result<Vec<Endpoint>> {
        policy::authenticated_or_mesh(caller)?;
        Db::Conn(&self.conn().await?)
            .list_endpoints(service_id, interface)
            .await
    }

    pub async fn delete_endpoint(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        Db::Conn(&self.conn().await?).delete_endpoint(id).await?;
        self.forget_catalog();
        Ok(())
    }

    pub async fn catalog(&self, caller: &Caller) -> Result<Vec<CatalogEntry>> {
        policy::authenticated_or_mesh(caller)?;
        Db::Conn(&self.conn().await?).catalog().await
    }

    // -------------------------------------------------------- bootstrap

    /// Like `keystone-manage bootstrap`: makes sure the default domain, the
    /// roles admin ⊇ member ⊇ reader, the admin project and user (with this
    /// password, admin on the project and the system) and the identity
    /// endpoints exist. Safe to run any number of times.
    pub async fn bootstrap(&self, b: &Bootstrap) -> Result<()> {
        let hash = self.inner.hasher.hash(&b.admin_password).await?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // One bootstrap at a time, whatever process runs it.
        tx.batch_execute("LOCK TABLE settings IN EXCLUSIVE MODE")
            .await?;
        let db = Db::Tx(&tx);

        let domain_id = match db.domain_id(&DomainRef::Name(DEFAULT_DOMAIN.into())).await {
            Ok(id) => id,
            Err(Error::NotFound(_)) => {
                let d = Domain {
                    id: Uuid::new_v4(),
                    name: DEFAULT_DOMAIN.into(),
                    description: "The default domain".into(),
                    enabled: true,
                };
                db.create_domain(&d).await?;
                d.id
            }
            Err(e) => return Err(e),
        };
        for name in ROLES {
            if db.role_id(name).await.is_err() {
                db.create_role(&Role {
                    id: Uuid::new_v4(),
                    name: name.into(),
                    description: String::new(),
                })
                .await?;
            }
        }
        for pair in ROLES.windows(2) {
            db.create_implied_role(db.role_id(pair[0]).await?, db.role_id(pair[1]).await?)
                .await?;
        }
        let project_ref = Ref::Name {
            name: b.admin_project.clone(),
            domain: Some(DomainRef::Id(domain_id)),
        };
        let project_id = match db.get_project(&project_ref).await {
            Ok(p) => p.id,
            Err(Error::NotFound(_)) => {
                let p = Project {
                    id: Uuid::new_v4(),
                    domain_id,
                    name: b.admin_project.clone(),
                    description: "Bootstrap project for the cloud's administrators".into(),
                    enabled: true,
                };
                db.create_project(&p).await?;
                p.id
            }
            Err(e) => return Err(e),
        };
        db.set_setting("admin_project_id", &project_id.to_string())
            .await?;

        let user_ref = Ref::Name {
            name: b.admin_user.clone(),
            domain: Some(DomainRef::Id(domain_id)),
        };
        let user_id = match db.get_user(&user_ref).await {
            Ok(u) => {
                let current = db.password_hash(u.id).await?;
                if !self
                    .inner
                    .hasher
                    .verify(&b.admin_password, current.as_deref())
                    .await?
                {
                    db.update_user(u.id, &Patch::default(), Some(&hash)).await?;
                }
                u.id
            }
            Err(Error::NotFound(_)) => {
                let u = User {
                    id: Uuid::new_v4(),
                    domain_id,
                    name: b.admin_user.clone(),
                    email: String::new(),
                    description: "Bootstrap administrator".into(),
                    enabled: true,
                    locked_until: None,
                };
                db.create_user(&u, Some(&hash)).await?;
                u.id
            }
            Err(e) => return Err(e),
        };
        let admin_role = db.role_id("admin").await?;
        db.assign(user_id, admin_role, Target::Project(project_id))
            .await?;
        db.assign(user_id, admin_role, Target::System).await?;

        let service_id = match db.service_id("identity").await {
            Ok(id) => id,
            Err(Error::NotFound(_)) => {
                let s = Service {
                    id: Uuid::new_v4(),
                    name: "identity".into(),
                    kind: "identity".into(),
                    description: "Cirrus identity service".into(),
                    enabled: true,
                };
                db.create_service(&s).await?;
                s.id
            }
            Err(e) => return Err(e),
        };
        let existing = db.list_endpoints(Some(service_id), None).await?;
        for (interface, url) in &b.endpoints {
            match existing
                .iter()
                .find(|e| e.interface == *interface && e.region == b.region)
            {
                Some(e) if e.url == *url => {}
                Some(e) => {
                    db.delete_endpoint(e.id).await?;
                    self.insert_endpoint(&db, service_id, *interface, &b.region, url)
                        .await?;
                }
                None => {
                    self.insert_endpoint(&db, service_id, *interface, &b.region, url)
                        .await?
                }
            }
        }
        tx.commit().await?;
        self.forget_catalog();
        Ok(())
    }

    async fn insert_endpoint(
        &self,
        db: &Db<'_>,
        service_id: Uuid,
        interface: Interface,
        region: &str,
        url: &str,
    ) -> Result<()> {
        db.create_endpoint(&Endpoint {
            id: Uuid::new_v4(),
            service_id,
            interface,
            region: region.into(),
            url: url.into(),
            enabled: true,
        })
        .await
    }

    /// Runs `f` in one transaction; the revocation rules it returns are
    /// committed with its change, then applied and announced.
    async fn in_tx<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'a> FnOnce(
            &'a Db<'a>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(T, Vec<RevocationRule>)>> + Send + 'a>,
        >,
    {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let (value, rules) = {
            let db = Db::Tx(&tx);
            let (value, rules) = f(&db).await?;
            for r in &rules {
                db.insert_revocation(r).await?;
            }
            (value, rules)
        };
        tx.commit().await?;
        self.announce(rules)?;
        Ok(value)
    }
}

/// A user to create.
pub struct NewUser {
    pub name: String,
    pub domain: Option<DomainRef>,
    pub password: Option<String>,
    pub email: String,
    pub description: String,
    pub enabled: bool,
}

fn rule(
    user: Option<Uuid>,
    project: Option<Uuid>,
    domain: Option<Uuid>,
    audit: Option<String>,
) -> RevocationRule {
    RevocationRule {
        user_id: user.map(|u| u.to_string()),
        project_id: project.map(|p| p.to_string()),
        domain_id: domain.map(|d| d.to_string()),
        audit_id: audit,
        issued_before: now(),
    }
}

fn new_audit_id() -> String {
    Uuid::new_v4().simple().to_string()
}
