//! The identity service's domain logic: authentication, tokens, keys,
//! revocations, and the administration of domains, projects, users, roles and
//! the catalog. No tonic types here.
//!
//! Every public method takes the [`Caller`] and a validated request value,
//! and does its whole job in one place: **resolve** what the request names,
//! **authorize** the caller through [`crate::policy`], then **act**. Reads
//! answer `NotFound` for what the caller may not read, exactly as for what
//! does not exist (no existence oracle); admin-only actions check the caller
//! before looking anything up. A change and the revocation rules it implies
//! commit in one transaction ([`Identity::in_tx`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use deadpool_postgres::{GenericClient, Pool, Transaction};
use runtime::error::{Error, Result};
use runtime::types::{Name, NameOrId};
use time::{Duration, OffsetDateTime};
use token::{Claims, RevocationRule, Scope, SigningKey, Verifier};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::Config;
use crate::keys::{Kek, KeyState};
pub use crate::model::Interface;
use crate::model::*;
use crate::password::Hasher;
use crate::policy::{self, Caller};
use crate::repo;
use crate::sync::{self, Notice};

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
    /// One connection that re-scopes share, their reads pipelined on it
    /// (see `runtime::db::SharedReads`): the path a sidecar's caller takes
    /// for every new project token.
    reads: runtime::db::SharedReads,
    cfg: Config,
    hasher: Hasher,
    /// Seals and opens the shared signing keys.
    kek: Kek,
    /// This process among the replicas (skips its own notices).
    replica: Uuid,
    signer: RwLock<Arc<SigningKey>>,
    public_keys: RwLock<Vec<PublicKey>>,
    verifier: RwLock<Verifier>,
    /// Tokens whose signature was checked here (a re-scope presents its
    /// parent, every RPC its bearer token); expiry and revocation are still
    /// checked on every use.
    verified: token::VerifiedCache,
    changes: broadcast::Sender<Change>,
    /// The catalog returned with every token, re-read at most every few
    /// seconds and at once after a catalog change made by any replica.
    catalog: RwLock<Option<(std::time::Instant, Arc<Vec<CatalogEntry>>)>>,
    /// The ids (and `issued_before`, for pruning) of the revocation rules
    /// applied here, so that a rule heard twice (notice and resync) is
    /// applied and announced once. Locked before `verifier`.
    known_rules: Mutex<HashMap<i64, OffsetDateTime>>,
    /// How many times this replica resynced from the tables.
    resyncs: AtomicU64,
}

/// How long a cached catalog is served: a backstop only, since every
/// replica drops its cache when any replica notifies a catalog change.
const CATALOG_TTL: std::time::Duration = std::time::Duration::from_secs(5);

fn lock_err<T>(_: T) -> Error {
    Error::internal("a lock was poisoned")
}

/// A token the verifier refused; the reason is for the log (and mesh peers).
fn refused(e: token::TokenError) -> Error {
    Error::unauthenticated(e.to_string())
}

/// What start-up failures say: the detail, since no client is involved.
fn startup(e: Error) -> anyhow::Error {
    anyhow::anyhow!(
        e.internal_detail()
            .map_or_else(|| e.to_string(), str::to_owned)
    )
}

/// The future a step of [`Identity::in_tx`] returns.
type TxStep<'a, T> = Pin<Box<dyn Future<Output = Result<(T, Vec<RevocationRule>)>> + Send + 'a>>;

impl Identity {
    /// Connects, migrates, opens the key repository and loads live revocations.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let db = &cfg.database;
        let pool = runtime::db::pool(&db.url, &db.schema, db.pool_size)?;
        runtime::db::migrate(&pool, &db.schema, crate::migrations::runner()).await?;
        // Identity's tables stay small: plan them as what they are.
        let c = pool.get().await?;
        runtime::db::analyze_unseen(&c, &db.schema).await?;
        drop(c);
        let kek = Kek::load_or_create(&cfg.kek_path()).map_err(startup)?;
        async {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            crate::keys::ensure(&tx, &kek, &cfg.key_dir).await?;
            tx.commit().await?;
            Ok::<_, Error>(())
        }
        .await
        .map_err(startup)?;
        let hasher = Hasher::new(cfg.password_hash).map_err(startup)?;
        let (changes, _) = broadcast::channel(1024);
        let signer = SigningKey::generate().map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
        let id = Self {
            inner: Arc::new(Inner {
                reads: runtime::db::SharedReads::new(pool.clone()),
                pool,
                hasher,
                kek,
                replica: Uuid::new_v4(),
                signer: RwLock::new(Arc::new(signer)),
                public_keys: RwLock::new(Vec::new()),
                verifier: RwLock::new(Verifier::new()),
                verified: token::VerifiedCache::default(),
                changes,
                catalog: RwLock::new(None),
                known_rules: Mutex::new(HashMap::new()),
                resyncs: AtomicU64::new(0),
                cfg,
            }),
        };
        id.reload_keys().await.map_err(startup)?;
        id.sync_rules().await.map_err(startup)?;
        Ok(id)
    }

    /// The database the replicas share.
    pub fn database_url(&self) -> &str {
        &self.inner.cfg.database.url
    }

    /// This process's id among the replicas.
    pub fn replica_id(&self) -> Uuid {
        self.inner.replica
    }

    /// How many times this replica has resynced from the tables (each
    /// (re)connection of its listener).
    pub fn resyncs(&self) -> u64 {
        self.inner.resyncs.load(Ordering::Relaxed)
    }

    /// Catches up with the tables: keys, live revocation rules, catalog.
    pub async fn resync(&self) -> Result<()> {
        self.apply(Notice::Unknown).await?;
        self.inner.resyncs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("identity_resyncs_total").increment(1);
        Ok(())
    }

    /// Applies what another replica committed, and tells this replica's watchers.
    pub async fn apply(&self, notice: Notice) -> Result<()> {
        match notice {
            Notice::Revocations(Some(ids)) => {
                let rules = repo::revocations_by_id(&self.conn().await?, &ids).await?;
                self.announce(rules)
            }
            Notice::Revocations(None) => self.sync_rules().await,
            Notice::Keys => self.sync_keys().await,
            Notice::Catalog => {
                self.forget_catalog();
                Ok(())
            }
            Notice::Unknown => {
                self.sync_keys().await?;
                self.sync_rules().await?;
                self.forget_catalog();
                Ok(())
            }
        }
    }

    /// Applies every live rule in the table not applied here yet.
    async fn sync_rules(&self) -> Result<()> {
        let since = now() - self.max_ttl();
        let rules = repo::active_revocations_with_ids(&self.conn().await?, since).await?;
        self.announce(rules)
    }

    /// Reloads the shared keys; announces them when the set changed.
    async fn sync_keys(&self) -> Result<()> {
        if self.reload_keys().await? {
            let keys = self.public_keys()?;
            let _ = self.inner.changes.send(Change::Keys(keys));
        }
        Ok(())
    }

    /// Tells the other replicas (after the commit) that the catalog changed.
    async fn catalog_changed(&self) {
        self.forget_catalog();
        let payload = format!("c {}", self.inner.replica);
        let sent = async { repo::notify(&self.conn().await?, &payload).await }.await;
        if let Err(e) = sent {
            // Committed already; the others' cache expires within CATALOG_TTL.
            tracing::warn!(error = %e, "could not notify the other replicas of a catalog change");
        }
    }

    fn max_ttl(&self) -> Duration {
        Duration::seconds(i64::try_from(self.inner.cfg.token_ttl_secs).unwrap_or(i64::MAX / 2))
    }

    async fn conn(&self) -> Result<deadpool_postgres::Client> {
        Ok(self.inner.pool.get().await?)
    }

    /// Reads the shared keys into the signer, the verifier and the public
    /// list; answers whether the set changed.
    async fn reload_keys(&self) -> Result<bool> {
        let keys = crate::keys::load(&self.conn().await?, &self.inner.kek).await?;
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
            .ok_or_else(|| Error::internal("no primary signing key"))?;
        *self.inner.signer.write().map_err(lock_err)? = Arc::new(primary.key);
        self.inner
            .verifier
            .write()
            .map_err(lock_err)?
            .set_keys(public.iter().map(|k| k.public_key.as_slice()));
        let mut current = self.inner.public_keys.write().map_err(lock_err)?;
        let changed = *current != public;
        *current = public;
        Ok(changed)
    }

    /// The catalog, from the cache when it is fresh.
    async fn cached_catalog(&self, c: &impl GenericClient) -> Result<Arc<Vec<CatalogEntry>>> {
        if let Some((at, cat)) = self.inner.catalog.read().map_err(lock_err)?.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(cat.clone());
        }
        let fresh = Arc::new(repo::catalog(c).await?);
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
        let v = self.inner.verifier.read().map_err(lock_err)?;
        self.inner
            .verified
            .verify(&v, token, OffsetDateTime::now_utc())
            .map(|c| c.as_ref().clone())
            .map_err(refused)
    }

    pub async fn authenticate(&self, login: Login) -> Result<Issued> {
        // A re-scope only reads: it shares one pipelined connection with
        // the others. A password login writes (failure counts, lockouts)
        // and takes a connection of its own.
        let c = match login.credentials {
            Credentials::Token(_) => self.inner.reads.get().await?,
            Credentials::Password { .. } => Arc::new(self.conn().await?),
        };
        let now = now();
        let (user_id, user_name, user_domain, methods, parent, scoped) = match login.credentials {
            Credentials::Password { user, password } => {
                let u = self.check_password(&*c, &user, &password).await?;
                let scoped = self.resolve_scope(&*c, u.id, login.scope).await?;
                (
                    u.id,
                    u.name,
                    u.domain_id,
                    vec!["password".to_string()],
                    None,
                    scoped,
                )
            }
            Credentials::Token(t) => {
                let parent = self.verify(&t)?;
                let malformed = || Error::unauthenticated("token names a malformed user");
                let id = Uuid::parse_str(&parent.sub).map_err(|_| malformed())?;
                let domain = Uuid::parse_str(&parent.user_domain_id).map_err(|_| malformed())?;
                // The user's state and the scope are read together (one
                // statement for a project, else two pipelined on one
                // connection); the user check still decides first.
                let (enabled, scoped) = match login.scope {
                    // A project: the user, the project and the roles in
                    // one statement.
                    ScopeRequest::Project(r) => {
                        let (enabled, p) = repo::scope_project(&*c, id, &r).await?;
                        (enabled, project_scope(p))
                    }
                    other => {
                        let (enabled, scoped) = tokio::join!(
                            repo::user_enabled(&*c, id),
                            self.resolve_scope(&*c, id, other)
                        );
                        (enabled?, scoped)
                    }
                };
                if enabled != Some(true) {
                    return Err(Error::unauthenticated(format!(
                        "re-scoping a token of user {id}: the user is disabled or gone"
                    )));
                }
                let scoped = scoped?;
                let mut methods = parent.methods.clone();
                if !methods.iter().any(|m| m == "token") {
                    methods.push("token".into());
                }
                (
                    id,
                    parent.user_name.clone(),
                    domain,
                    methods,
                    Some(parent),
                    scoped,
                )
            }
        };

        let (scope, roles, is_admin_project) = scoped;
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
            .map_err(|e| Error::internal(format!("signing: {e}")))?;
        // Cached: every replica drops it when any replica changes the catalog.
        let catalog = self.cached_catalog(&*c).await?.as_ref().clone();
        metrics::counter!("identity_tokens_issued_total").increment(1);
        Ok(Issued {
            token,
            claims,
            catalog,
        })
    }

    /// Checks a password, counting failures toward a lockout. Unknown users,
    /// wrong passwords, locked and disabled accounts all answer the same
    /// (`authentication failed`) after the same work; the reason goes to the
    /// log and to `identity_auth_failures_total{reason}`.
    async fn check_password(
        &self,
        c: &impl GenericClient,
        user: &Ref,
        password: &str,
    ) -> Result<repo::AuthUser> {
        let refuse = |reason: &'static str, why: &str| {
            metrics::counter!("identity_auth_failures_total", "reason" => reason).increment(1);
            Error::unauthenticated(format!("password login as {user}: {why}"))
        };
        let found = repo::auth_user(c, user).await?;
        let ok = self
            .inner
            .hasher
            .verify(
                password,
                found.as_ref().and_then(|u| u.password_hash.as_deref()),
            )
            .await?;
        let Some(u) = found else {
            return Err(refuse("invalid", "no such user"));
        };
        if !u.ignore_lockout
            && u.locked_until
                .is_some_and(|t| t > OffsetDateTime::now_utc())
        {
            return Err(refuse("locked", "the account is locked"));
        }
        if !ok {
            let cfg = &self.inner.cfg;
            if u.ignore_lockout {
                // Exempt from lockout (the bootstrap admin by default), so
                // that strangers cannot lock it out; still seen and counted.
                metrics::counter!("identity_lockout_exempt_failures_total").increment(1);
                tracing::warn!(user = %u.id, name = %u.name, "wrong password for an account exempt from lockout");
            } else if cfg.lockout_failure_attempts > 0 {
                repo::record_failed_login(
                    c,
                    u.id,
                    i32::try_from(cfg.lockout_failure_attempts).unwrap_or(i32::MAX),
                    cfg.lockout_duration_secs as f64,
                )
                .await?;
            }
            return Err(refuse("invalid", "wrong password"));
        }
        repo::clear_failed_logins(c, u.id).await?;
        if !u.enabled {
            return Err(refuse("disabled", "the user or its domain is disabled"));
        }
        Ok(u)
    }

    /// Checks the user may take the scope; returns it with the user's
    /// expanded roles there. A scope the user holds no role on answers the
    /// same whether or not it exists; only then is its state looked at.
    async fn resolve_scope(
        &self,
        c: &impl GenericClient,
        user_id: Uuid,
        scope: ScopeRequest,
    ) -> Result<(Option<Scope>, Vec<String>, bool)> {
        let (scope, roles, is_admin_project, enabled) = match scope {
            ScopeRequest::Unscoped => return Ok((None, Vec::new(), false)),
            ScopeRequest::Project(r) => {
                let (_, p) = repo::scope_project(c, user_id, &r).await?;
                return project_scope(p);
            }
            ScopeRequest::Domain(r) => {
                let d = repo::get_domain(c, &r).await?.ok_or_else(scope_denied)?;
                let roles = repo::effective_roles(c, user_id, Target::Domain(d.id)).await?;
                (
                    Scope::Domain {
                        id: d.id.to_string(),
                        name: d.name,
                    },
                    roles,
                    false,
                    d.enabled,
                )
            }
            ScopeRequest::System => {
                let roles = repo::effective_roles(c, user_id, Target::System).await?;
                (Scope::System, roles, false, true)
            }
        };
        checked_scope(scope, roles, is_admin_project, enabled)
    }

    /// Full validation for the `ValidateToken` RPC.
    pub async fn validate(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<(Claims, Vec<CatalogEntry>)> {
        policy::authenticated(caller)?;
        let claims = self.verify(token)?;
        let user = Uuid::parse_str(&claims.sub)
            .map_err(|_| Error::unauthenticated("token names a malformed user"))?;
        policy::admin_or_user(caller, user)?;
        let catalog = self.cached_catalog(&self.conn().await?).await?;
        Ok((claims, catalog.as_ref().clone()))
    }

    /// Revokes one token (its holder or an admin) or an audit chain (an admin).
    pub async fn revoke_token(&self, caller: &Caller, what: Revoke) -> Result<()> {
        let audit_id = match what {
            Revoke::Token(token) => {
                let claims = self
                    .inner
                    .verifier
                    .read()
                    .map_err(lock_err)?
                    .verify_signature(&token)
                    .map_err(refused)?;
                let owner = Uuid::parse_str(&claims.sub).unwrap_or_default();
                policy::admin_or_user(caller, owner)?;
                claims.audit_id().to_string()
            }
            Revoke::AuditId(a) => {
                policy::admin(caller)?;
                a
            }
        };
        self.revoke(vec![rule(None, None, None, Some(audit_id))])
            .await
    }

    /// Stores rules in their own transaction, then applies and announces them.
    async fn revoke(&self, rules: Vec<RevocationRule>) -> Result<()> {
        self.in_tx(move |_| Box::pin(async move { Ok(((), rules)) }))
            .await
    }

    /// Applies committed rules this process does not know yet and tells
    /// every watcher of this process.
    fn announce(&self, rules: Vec<(i64, RevocationRule)>) -> Result<()> {
        let mut known = self.inner.known_rules.lock().map_err(lock_err)?;
        let mut v = self.inner.verifier.write().map_err(lock_err)?;
        for (id, r) in rules {
            if known.insert(id, r.issued_before).is_some() {
                continue;
            }
            v.add_rule(r.clone());
            let _ = self.inner.changes.send(Change::Revocation(r));
        }
        metrics::gauge!("identity_revocation_rules").set(v.rules().len() as f64);
        Ok(())
    }

    /// Rotates the shared key set in one transaction that also tells the
    /// other replicas; they load it on the notice and announce it to their
    /// watchers, as this replica does here.
    pub async fn rotate_keys(&self, caller: &Caller) -> Result<Vec<PublicKey>> {
        policy::admin(caller)?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        crate::keys::rotate(&tx, &self.inner.kek, self.inner.cfg.max_active_keys).await?;
        repo::notify(&tx, &format!("k {}", self.inner.replica)).await?;
        tx.commit().await?;
        drop(conn);
        self.reload_keys().await?;
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
        repo::prune_revocations(&self.conn().await?, cutoff).await?;
        let mut known = self.inner.known_rules.lock().map_err(lock_err)?;
        known.retain(|_, issued_before| *issued_before > cutoff);
        self.inner
            .verifier
            .write()
            .map_err(lock_err)?
            .prune_rules(now(), self.max_ttl());
        Ok(())
    }

    // ------------------------------------------------- domains, projects

    pub async fn create_domain(&self, caller: &Caller, new: NewDomain) -> Result<Domain> {
        policy::admin(caller)?;
        let d = Domain {
            id: Uuid::new_v4(),
            name: new.name.into_string(),
            description: new.description,
            enabled: new.enabled,
        };
        repo::create_domain(&self.conn().await?, &d).await?;
        Ok(d)
    }

    /// A domain the caller may read; `NotFound` for any other.
    pub async fn get_domain(&self, caller: &Caller, r: DomainRef) -> Result<Domain> {
        let claims = policy::authenticated(caller)?;
        match repo::get_domain(&self.conn().await?, &r).await? {
            Some(d) if policy::reads_domain(claims, d.id) => Ok(d),
            _ => Err(Error::not_found("domain", &r)),
        }
    }

    pub async fn list_domains(&self, caller: &Caller) -> Result<Vec<Domain>> {
        policy::admin(caller)?;
        repo::list_domains(&self.conn().await?).await
    }

    /// Disabling a domain revokes every token scoped to it.
    pub async fn update_domain(&self, caller: &Caller, u: Update) -> Result<Domain> {
        policy::admin(caller)?;
        let disabling = u.patch.enabled == Some(false);
        self.in_tx(move |tx| {
            Box::pin(async move {
                let d = repo::update_domain(tx, u.id, &u.patch)
                    .await?
                    .ok_or_else(|| Error::not_found("domain", u.id))?;
                let rules = if disabling {
                    vec![rule(None, None, Some(u.id), None)]
                } else {
                    vec![]
                };
                Ok((d, rules))
            })
        })
        .await
    }

    /// Only a disabled, empty domain may be deleted.
    pub async fn delete_domain(&self, caller: &Caller, r: DomainRef) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let d = repo::get_domain(tx, &r)
                    .await?
                    .ok_or_else(|| Error::not_found("domain", &r))?;
                if d.enabled {
                    return Err(Error::precondition("disable the domain before deleting it"));
                }
                if repo::domain_in_use(tx, d.id).await? {
                    return Err(Error::precondition(format!(
                        "domain {} still holds projects or users; delete them first",
                        d.name
                    )));
                }
                repo::delete_domain(tx, &d).await?;
                Ok(((), vec![rule(None, None, Some(d.id), None)]))
            })
        })
        .await
    }

    pub async fn create_project(&self, caller: &Caller, new: NewProject) -> Result<Project> {
        policy::admin(caller)?;
        let c = self.conn().await?;
        let p = Project {
            id: Uuid::new_v4(),
            domain_id: domain_id(&c, new.domain.as_ref()).await?,
            name: new.name.into_string(),
            description: new.description,
            enabled: new.enabled,
        };
        repo::create_project(&c, &p).await?;
        Ok(p)
    }

    /// A project the caller may read; `NotFound` for any other.
    pub async fn get_project(&self, caller: &Caller, r: Ref) -> Result<Project> {
        let claims = policy::authenticated(caller)?;
        match repo::get_project(&self.conn().await?, &r).await? {
            Some(p) if policy::reads_project(claims, p.id) => Ok(p),
            _ => Err(Error::not_found("project", &r)),
        }
    }

    /// All projects (admin), or those a user holds a role on (itself or admin).
    pub async fn list_projects(&self, caller: &Caller, f: ProjectFilter) -> Result<Vec<Project>> {
        match f.user_id {
            Some(u) => policy::admin_or_user(caller, u)?,
            None => drop(policy::admin(caller)?),
        }
        repo::list_projects(&self.conn().await?, f).await
    }

    /// Disabling a project revokes every token scoped to it.
    pub async fn update_project(&self, caller: &Caller, u: Update) -> Result<Project> {
        policy::admin(caller)?;
        let disabling = u.patch.enabled == Some(false);
        self.in_tx(move |tx| {
            Box::pin(async move {
                let p = repo::update_project(tx, u.id, &u.patch)
                    .await?
                    .ok_or_else(|| Error::not_found("project", u.id))?;
                let rules = if disabling {
                    vec![rule(None, Some(u.id), None, None)]
                } else {
                    vec![]
                };
                Ok((p, rules))
            })
        })
        .await
    }

    /// Resolves and deletes in one transaction; tokens scoped to it are revoked.
    pub async fn delete_project(&self, caller: &Caller, r: Ref) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let p = repo::get_project(tx, &r)
                    .await?
                    .ok_or_else(|| Error::not_found("project", &r))?;
                repo::delete_project(tx, p.id).await?;
                Ok(((), vec![rule(None, Some(p.id), None, None)]))
            })
        })
        .await
    }

    // ------------------------------------------------------------ users

    pub async fn create_user(&self, caller: &Caller, new: NewUser) -> Result<User> {
        policy::admin(caller)?;
        if new.password.is_empty() {
            return Err(Error::invalid("password", "must not be empty"));
        }
        let hash = self.inner.hasher.hash(&new.password).await?;
        let c = self.conn().await?;
        let user = User {
            id: Uuid::new_v4(),
            domain_id: domain_id(&c, new.domain.as_ref()).await?,
            name: new.name.into_string(),
            email: new.email,
            description: new.description,
            enabled: new.enabled,
            locked_until: None,
            ignore_lockout: new.ignore_lockout,
        };
        repo::create_user(&c, &user, &hash).await?;
        Ok(user)
    }

    /// The user itself, or any user for an admin (who also sees a lock);
    /// `NotFound` for any other.
    pub async fn get_user(&self, caller: &Caller, r: Ref) -> Result<User> {
        let claims = policy::authenticated(caller)?;
        match repo::get_user(&self.conn().await?, &r).await? {
            Some(u) if policy::reads_user(claims, u.id) => Ok(u),
            _ => Err(Error::not_found("user", &r)),
        }
    }

    pub async fn list_users(&self, caller: &Caller, domain_id: Option<Uuid>) -> Result<Vec<User>> {
        policy::admin(caller)?;
        repo::list_users(&self.conn().await?, domain_id).await
    }

    /// Admin update. Disabling the user or resetting its password revokes its tokens.
    pub async fn update_user(&self, caller: &Caller, u: Update) -> Result<User> {
        policy::admin(caller)?;
        let hash = match &u.patch.password {
            Some(p) => Some(self.inner.hasher.hash(p).await?),
            None => None,
        };
        let revoke = u.patch.enabled == Some(false) || hash.is_some();
        self.in_tx(move |tx| {
            Box::pin(async move {
                let user = repo::update_user(tx, u.id, &u.patch, hash.as_deref())
                    .await?
                    .ok_or_else(|| Error::not_found("user", u.id))?;
                let rules = if revoke {
                    vec![rule(Some(u.id), None, None, None)]
                } else {
                    vec![]
                };
                Ok((user, rules))
            })
        })
        .await
    }

    /// Resolves and deletes in one transaction; the user's tokens are revoked.
    pub async fn delete_user(&self, caller: &Caller, r: Ref) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let u = repo::get_user(tx, &r)
                    .await?
                    .ok_or_else(|| Error::not_found("user", &r))?;
                repo::delete_user(tx, u.id).await?;
                Ok(((), vec![rule(Some(u.id), None, None, None)]))
            })
        })
        .await
    }

    /// A user changes its own password; every token it holds is revoked.
    pub async fn change_password(&self, caller: &Caller, ch: PasswordChange) -> Result<()> {
        policy::same_user(caller, ch.user_id)?;
        let current = repo::password_hash(&self.conn().await?, ch.user_id).await?;
        if !self
            .inner
            .hasher
            .verify(&ch.original, current.as_deref())
            .await?
        {
            return Err(Error::unauthenticated(format!(
                "password change for {}: the original password is wrong",
                ch.user_id
            )));
        }
        let hash = self.inner.hasher.hash(&ch.new).await?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                repo::update_user(tx, ch.user_id, &Patch::default(), Some(&hash))
                    .await?
                    .ok_or_else(|| Error::not_found("user", ch.user_id))?;
                Ok(((), vec![rule(Some(ch.user_id), None, None, None)]))
            })
        })
        .await
    }

    // ------------------------------------------------------------ roles

    pub async fn create_role(&self, caller: &Caller, new: NewRole) -> Result<Role> {
        policy::admin(caller)?;
        let r = Role {
            id: Uuid::new_v4(),
            name: new.name.into_string(),
            description: new.description,
        };
        repo::create_role(&self.conn().await?, &r).await?;
        Ok(r)
    }

    pub async fn get_role(&self, caller: &Caller, r: NameOrId) -> Result<Role> {
        policy::authenticated(caller)?;
        role(&self.conn().await?, &r).await
    }

    pub async fn list_roles(&self, caller: &Caller) -> Result<Vec<Role>> {
        policy::authenticated(caller)?;
        repo::list_roles(&self.conn().await?).await
    }

    /// Deleting a role revokes the tokens of everyone who held it.
    pub async fn delete_role(&self, caller: &Caller, r: NameOrId) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let role = role(tx, &r).await?;
                let holders = repo::holders_of_role(tx, role.id).await?;
                repo::delete_role(tx, role.id).await?;
                Ok(((), user_rules(holders)))
            })
        })
        .await
    }

    /// Returns the names of the two roles.
    pub async fn create_implied_role(
        &self,
        caller: &Caller,
        i: Implication,
    ) -> Result<(String, String)> {
        policy::admin(caller)?;
        let c = self.conn().await?;
        let (prior, implied) = (role(&c, &i.prior).await?, role(&c, &i.implied).await?);
        if prior.id == implied.id {
            return Err(Error::invalid("implied_role", "a role cannot imply itself"));
        }
        if repo::implies(&c, implied.id, prior.id).await? {
            return Err(Error::invalid(
                "implied_role",
                "that implication would make a cycle",
            ));
        }
        repo::create_implied_role(&c, prior.id, implied.id).await?;
        Ok((prior.name, implied.name))
    }

    pub async fn list_implied_roles(&self, caller: &Caller) -> Result<Vec<(String, String)>> {
        policy::authenticated(caller)?;
        repo::list_implied_roles(&self.conn().await?).await
    }

    /// Removing an implication revokes the tokens of the prior role's holders.
    pub async fn delete_implied_role(&self, caller: &Caller, i: Implication) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let (prior, implied) = (role(tx, &i.prior).await?, role(tx, &i.implied).await?);
                let holders = repo::holders_of_role(tx, prior.id).await?;
                if !repo::delete_implied_role(tx, prior.id, implied.id).await? {
                    return Err(Error::not_found(
                        "implied role",
                        format!("{} -> {}", prior.name, implied.name),
                    ));
                }
                Ok(((), user_rules(holders)))
            })
        })
        .await
    }

    pub async fn assign_role(&self, caller: &Caller, g: Grant) -> Result<Assignment> {
        policy::admin(caller)?;
        let c = self.conn().await?;
        repo::get_user(&c, &Ref::Id(g.user_id))
            .await?
            .ok_or_else(|| Error::not_found("user", g.user_id))?;
        let role = role(&c, &g.role).await?;
        match g.target {
            Target::Project(p) => drop(
                repo::get_project(&c, &Ref::Id(p))
                    .await?
                    .ok_or_else(|| Error::not_found("project", p))?,
            ),
            Target::Domain(d) => drop(
                repo::get_domain(&c, &DomainRef::Id(d))
                    .await?
                    .ok_or_else(|| Error::not_found("domain", d))?,
            ),
            Target::System => {}
        }
        repo::assign(&c, g.user_id, role.id, g.target).await?;
        Ok(Assignment {
            user_id: g.user_id,
            role_id: role.id,
            role_name: role.name,
            target: g.target,
        })
    }

    /// Removing an assignment revokes the user's tokens on that target.
    pub async fn unassign_role(&self, caller: &Caller, g: Grant) -> Result<()> {
        policy::admin(caller)?;
        self.in_tx(move |tx| {
            Box::pin(async move {
                let role = role(tx, &g.role).await?;
                if !repo::unassign(tx, g.user_id, role.id, g.target).await? {
                    return Err(Error::not_found(
                        "role assignment",
                        format!("{} of user {}", role.name, g.user_id),
                    ));
                }
                let r = match g.target {
                    Target::Project(p) => rule(Some(g.user_id), Some(p), None, None),
                    Target::Domain(d) => rule(Some(g.user_id), None, Some(d), None),
                    Target::System => rule(Some(g.user_id), None, None, None),
                };
                Ok(((), vec![r]))
            })
        })
        .await
    }

    /// Everyone's (admin), or one user's own (itself or admin).
    pub async fn list_assignments(
        &self,
        caller: &Caller,
        f: AssignmentFilter,
    ) -> Result<Vec<Assignment>> {
        match f.user_id {
            Some(u) => policy::admin_or_user(caller, u)?,
            None => drop(policy::admin(caller)?),
        }
        repo::list_assignments(&self.conn().await?, f).await
    }

    // ---------------------------------------------------------- catalog

    pub async fn create_service(&self, caller: &Caller, new: NewService) -> Result<Service> {
        policy::admin(caller)?;
        let s = Service {
            id: Uuid::new_v4(),
            name: new.name.into_string(),
            kind: new.kind.into_string(),
            description: new.description,
            enabled: new.enabled,
        };
        repo::create_service(&self.conn().await?, &s).await?;
        self.catalog_changed().await;
        Ok(s)
    }

    pub async fn list_services(&self, caller: &Caller) -> Result<Vec<Service>> {
        policy::authenticated_or_mesh(caller)?;
        repo::list_services(&self.conn().await?).await
    }

    pub async fn delete_service(&self, caller: &Caller, r: NameOrId) -> Result<()> {
        policy::admin(caller)?;
        let c = self.conn().await?;
        let s = repo::get_service(&c, &r)
            .await?
            .ok_or_else(|| Error::not_found("service", &r))?;
        repo::delete_service(&c, s.id).await?;
        self.catalog_changed().await;
        Ok(())
    }

    pub async fn create_endpoint(&self, caller: &Caller, new: NewEndpoint) -> Result<Endpoint> {
        policy::admin(caller)?;
        let c = self.conn().await?;
        let service = repo::get_service(&c, &new.service)
            .await?
            .ok_or_else(|| Error::not_found("service", &new.service))?;
        let e = Endpoint {
            id: Uuid::new_v4(),
            service_id: service.id,
            interface: new.interface,
            region: new.region,
            url: new.url,
            enabled: new.enabled,
        };
        repo::create_endpoint(&c, &e).await?;
        self.catalog_changed().await;
        Ok(e)
    }

    pub async fn list_endpoints(
        &self,
        caller: &Caller,
        f: EndpointFilter,
    ) -> Result<Vec<Endpoint>> {
        policy::authenticated_or_mesh(caller)?;
        repo::list_endpoints(&self.conn().await?, f).await
    }

    pub async fn delete_endpoint(&self, caller: &Caller, id: Uuid) -> Result<()> {
        policy::admin(caller)?;
        if !repo::delete_endpoint(&self.conn().await?, id).await? {
            return Err(Error::not_found("endpoint", id));
        }
        self.catalog_changed().await;
        Ok(())
    }

    pub async fn catalog(&self, caller: &Caller) -> Result<Vec<CatalogEntry>> {
        policy::authenticated_or_mesh(caller)?;
        repo::catalog(&self.conn().await?).await
    }

    // -------------------------------------------------------- bootstrap

    /// Like `keystone-manage bootstrap`: makes sure the default domain, the
    /// roles admin ⊇ member ⊇ reader, the admin project and user (with this
    /// password, admin on the project and the system) and the identity
    /// endpoints exist. Safe to run any number of times. The admin user is
    /// made exempt from lockout when bootstrap creates it (an admin may
    /// change that later; a later bootstrap leaves it as it is).
    pub async fn bootstrap(&self, b: &Bootstrap) -> Result<()> {
        let admin_user = Name::parse("admin_user", &b.admin_user)?;
        let admin_project = Name::parse("admin_project", &b.admin_project)?;
        if b.admin_password.is_empty() {
            return Err(Error::invalid("admin_password", "must not be empty"));
        }
        let hash = self.inner.hasher.hash(&b.admin_password).await?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // One bootstrap at a time, whatever process runs it.
        tx.batch_execute("LOCK TABLE settings IN EXCLUSIVE MODE")
            .await?;

        let domain_id = match repo::domain_id(&tx, None).await? {
            Some(id) => id,
            None => {
                let d = Domain {
                    id: Uuid::new_v4(),
                    name: DEFAULT_DOMAIN.into(),
                    description: "The default domain".into(),
                    enabled: true,
                };
                repo::create_domain(&tx, &d).await?;
                d.id
            }
        };
        let mut role_ids = Vec::new();
        for name in ROLES {
            let r = NameOrId::parse("role", name)?;
            let id = match repo::get_role(&tx, &r).await? {
                Some(role) => role.id,
                None => {
                    let role = Role {
                        id: Uuid::new_v4(),
                        name: name.into(),
                        description: String::new(),
                    };
                    repo::create_role(&tx, &role).await?;
                    role.id
                }
            };
            role_ids.push(id);
        }
        for pair in role_ids.windows(2) {
            repo::create_implied_role(&tx, pair[0], pair[1]).await?;
        }
        let in_default = |name: &Name| Ref::Name {
            name: name.clone(),
            domain: Some(DomainRef::Id(domain_id)),
        };
        let project_id = match repo::get_project(&tx, &in_default(&admin_project)).await? {
            Some(p) => p.id,
            None => {
                let p = Project {
                    id: Uuid::new_v4(),
                    domain_id,
                    name: admin_project.to_string(),
                    description: "Bootstrap project for the cloud's administrators".into(),
                    enabled: true,
                };
                repo::create_project(&tx, &p).await?;
                p.id
            }
        };
        repo::set_setting(&tx, "admin_project_id", &project_id.to_string()).await?;

        let user_id = match repo::get_user(&tx, &in_default(&admin_user)).await? {
            Some(u) => {
                let current = repo::password_hash(&tx, u.id).await?;
                if !self
                    .inner
                    .hasher
                    .verify(&b.admin_password, current.as_deref())
                    .await?
                {
                    repo::update_user(&tx, u.id, &Patch::default(), Some(&hash)).await?;
                }
                u.id
            }
            None => {
                let u = User {
                    id: Uuid::new_v4(),
                    domain_id,
                    name: admin_user.to_string(),
                    email: String::new(),
                    description: "Bootstrap administrator".into(),
                    enabled: true,
                    locked_until: None,
                    ignore_lockout: true,
                };
                repo::create_user(&tx, &u, &hash).await?;
                u.id
            }
        };
        let admin_role = role_ids[0];
        repo::assign(&tx, user_id, admin_role, Target::Project(project_id)).await?;
        repo::assign(&tx, user_id, admin_role, Target::System).await?;

        let identity = NameOrId::parse("service", "identity")?;
        let service_id = match repo::get_service(&tx, &identity).await? {
            Some(s) => s.id,
            None => {
                let s = Service {
                    id: Uuid::new_v4(),
                    name: "identity".into(),
                    kind: "identity".into(),
                    description: "Cirrus identity service".into(),
                    enabled: true,
                };
                repo::create_service(&tx, &s).await?;
                s.id
            }
        };
        let filter = EndpointFilter {
            service_id: Some(service_id),
            interface: None,
        };
        let existing = repo::list_endpoints(&tx, filter).await?;
        for (interface, url) in &b.endpoints {
            let same = |e: &&Endpoint| e.interface == *interface && e.region == b.region;
            match existing.iter().find(same) {
                Some(e) if e.url == *url => continue,
                Some(e) => drop(repo::delete_endpoint(&tx, e.id).await?),
                None => {}
            }
            let e = Endpoint {
                id: Uuid::new_v4(),
                service_id,
                interface: *interface,
                region: b.region.clone(),
                url: url.clone(),
                enabled: true,
            };
            repo::create_endpoint(&tx, &e).await?;
        }
        tx.commit().await?;
        self.catalog_changed().await;
        Ok(())
    }

    /// Runs `f` in one transaction; the revocation rules it returns are
    /// committed with its change, then applied and announced.
    async fn in_tx<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxStep<'a, T>,
    {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let (value, rules) = f(&tx).await?;
        let mut stored = Vec::with_capacity(rules.len());
        for r in rules {
            stored.push((repo::insert_revocation(&tx, &r).await?, r));
        }
        if !stored.is_empty() {
            let ids: Vec<i64> = stored.iter().map(|(id, _)| *id).collect();
            let payload = sync::revocations_payload(&self.inner.replica.to_string(), &ids);
            repo::notify(&tx, &payload).await?;
        }
        tx.commit().await?;
        self.announce(stored)?;
        Ok(value)
    }
}

/// The id of a domain (the default one when none is named), or `NotFound`.
async fn domain_id(c: &impl GenericClient, d: Option<&DomainRef>) -> Result<Uuid> {
    repo::domain_id(c, d).await?.ok_or_else(|| match d {
        Some(d) => Error::not_found("domain", d),
        None => Error::not_found("domain", DEFAULT_DOMAIN),
    })
}

/// A role by name or id, or `NotFound`.
async fn role(c: &impl GenericClient, r: &NameOrId) -> Result<Role> {
    repo::get_role(c, r)
        .await?
        .ok_or_else(|| Error::not_found("role", r))
}

fn user_rules(users: Vec<Uuid>) -> Vec<RevocationRule> {
    users
        .into_iter()
        .map(|u| rule(Some(u), None, None, None))
        .collect()
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

/// The one answer for a scope the user may not take (it does not tell
/// whether the scope exists).
fn scope_denied() -> Error {
    Error::forbidden("the user has no role on the requested scope")
}

/// A project scope read by [`repo::scope_project`], checked.
fn project_scope(p: Option<repo::ScopeProject>) -> Result<(Option<Scope>, Vec<String>, bool)> {
    let p = p.ok_or_else(scope_denied)?;
    checked_scope(
        Scope::Project {
            id: p.project.id.to_string(),
            name: p.project.name,
            domain_id: p.project.domain_id.to_string(),
        },
        p.roles,
        p.is_admin_project,
        p.project.enabled && p.domain_enabled,
    )
}

/// A scope the user holds no role on answers the same whether or not it
/// exists; only then is its state looked at.
fn checked_scope(
    scope: Scope,
    roles: Vec<String>,
    is_admin_project: bool,
    enabled: bool,
) -> Result<(Option<Scope>, Vec<String>, bool)> {
    if roles.is_empty() {
        return Err(scope_denied());
    }
    if !enabled {
        return Err(Error::unauthenticated("the requested scope is disabled"));
    }
    Ok((Some(scope), roles, is_admin_project))
}
