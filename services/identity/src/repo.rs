//! Every SQL statement of the identity service, parameterised and prepared
//! once per connection. Callers choose a pooled connection or a transaction
//! through [`Db`]; a state change and the revocation rule it implies are
//! written in one transaction.

use deadpool_postgres::{Client, Transaction};
use time::OffsetDateTime;
use token::RevocationRule;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::{Error, Result, constraint};
use crate::model::*;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A pooled connection or an open transaction.
pub enum Db<'a> {
    Conn(&'a Client),
    Tx(&'a Transaction<'a>),
}

impl Db<'_> {
    async fn rows(&self, sql: &str, p: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self {
            Db::Conn(c) => {
                let st = c.prepare_cached(sql).await?;
                c.query(&st, p).await
            }
            Db::Tx(t) => {
                let st = t.prepare_cached(sql).await?;
                t.query(&st, p).await
            }
        }
    }

    async fn opt(&self, sql: &str, p: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        Ok(self.rows(sql, p).await?.into_iter().next())
    }

    async fn exec(&self, sql: &str, p: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        match self {
            Db::Conn(c) => {
                let st = c.prepare_cached(sql).await?;
                c.execute(&st, p).await
            }
            Db::Tx(t) => {
                let st = t.prepare_cached(sql).await?;
                t.execute(&st, p).await
            }
        }
    }
}

// ------------------------------------------------------------------ mapping

fn domain(r: &Row) -> Domain {
    Domain {
        id: r.get("id"),
        name: r.get("name"),
        description: r.get("description"),
        enabled: r.get("enabled"),
    }
}

fn project(r: &Row) -> Project {
    Project {
        id: r.get("id"),
        domain_id: r.get("domain_id"),
        name: r.get("name"),
        description: r.get("description"),
        enabled: r.get("enabled"),
    }
}

fn user(r: &Row) -> User {
    User {
        id: r.get("id"),
        domain_id: r.get("domain_id"),
        name: r.get("name"),
        email: r.get("email"),
        description: r.get("description"),
        enabled: r.get("enabled"),
        locked_until: r.get("locked_until"),
    }
}

fn role(r: &Row) -> Role {
    Role {
        id: r.get("id"),
        name: r.get("name"),
        description: r.get("description"),
    }
}

fn service(r: &Row) -> Service {
    Service {
        id: r.get("id"),
        name: r.get("name"),
        kind: r.get("type"),
        description: r.get("description"),
        enabled: r.get("enabled"),
    }
}

fn endpoint(r: &Row) -> Endpoint {
    let interface: String = r.get("interface");
    Endpoint {
        id: r.get("id"),
        service_id: r.get("service_id"),
        interface: Interface::parse(&interface).unwrap_or(Interface::Public),
        region: r.get("region"),
        url: r.get("url"),
        enabled: r.get("enabled"),
    }
}

fn assignment(r: &Row) -> Assignment {
    let project: Option<Uuid> = r.get("project_id");
    let domain: Option<Uuid> = r.get("domain_id");
    Assignment {
        user_id: r.get("user_id"),
        role_id: r.get("role_id"),
        role_name: r.get("role_name"),
        target: match (project, domain) {
            (Some(p), _) => Target::Project(p),
            (None, Some(d)) => Target::Domain(d),
            _ => Target::System,
        },
    }
}

fn split(t: Target) -> (Option<Uuid>, Option<Uuid>, bool) {
    match t {
        Target::Project(p) => (Some(p), None, false),
        Target::Domain(d) => (None, Some(d), false),
        Target::System => (None, None, true),
    }
}

/// What authentication needs to know of a user.
pub struct AuthUser {
    pub id: Uuid,
    pub name: String,
    pub domain_id: Uuid,
    pub enabled: bool,
    pub password_hash: Option<String>,
    pub locked_until: Option<OffsetDateTime>,
}

/// A project a token may be scoped to, with what decides whether it may.
pub struct ScopeProject {
    pub project: Project,
    pub domain_enabled: bool,
    pub is_admin_project: bool,
}

const USER_COLS: &str =
    "u.id, u.domain_id, u.name, u.email, u.description, u.enabled, u.locked_until";

impl Db<'_> {
    // ------------------------------------------------------------- domains

    pub async fn domain_id(&self, r: &DomainRef) -> Result<Uuid> {
        let row = match r {
            DomainRef::Id(id) => {
                self.opt("SELECT id FROM domains WHERE id = $1", &[id])
                    .await?
            }
            DomainRef::Name(n) => {
                self.opt("SELECT id FROM domains WHERE name = $1", &[n])
                    .await?
            }
        };
        row.map(|r| r.get(0))
            .ok_or_else(|| Error::NotFound("domain".into()))
    }

    pub async fn create_domain(&self, d: &Domain) -> Result<()> {
        self.exec(
            "INSERT INTO domains (id, name, description, enabled) VALUES ($1, $2, $3, $4)",
            &[&d.id, &d.name, &d.description, &d.enabled],
        )
        .await
        .map_err(|e| constraint(e, &format!("domain {:?}", d.name)))?;
        Ok(())
    }

    pub async fn get_domain(&self, r: &Ref) -> Result<Domain> {
        let row = match r {
            Ref::Id(id) => {
                self.opt("SELECT * FROM domains WHERE id = $1", &[id])
                    .await?
            }
            Ref::Name { name, .. } => {
                self.opt("SELECT * FROM domains WHERE name = $1", &[name])
                    .await?
            }
        };
        row.map(|r| domain(&r))
            .ok_or_else(|| Error::NotFound("domain".into()))
    }

    pub async fn list_domains(&self) -> Result<Vec<Domain>> {
        Ok(self
            .rows("SELECT * FROM domains ORDER BY name", &[])
            .await?
            .iter()
            .map(domain)
            .collect())
    }

    pub async fn update_domain(&self, id: Uuid, p: &Patch) -> Result<Domain> {
        self.opt(
            "UPDATE domains SET name = coalesce($2, name), description = coalesce($3, description), \
             enabled = coalesce($4, enabled) WHERE id = $1 RETURNING *",
            &[&id, &p.name, &p.description, &p.enabled],
        )
        .await
        .map_err(|e| constraint(e, "a domain with that name"))?
        .map(|r| domain(&r))
        .ok_or_else(|| Error::NotFound("domain".into()))
    }

    pub async fn delete_domain(&self, id: Uuid) -> Result<()> {
        let n = self
            .exec("DELETE FROM domains WHERE id = $1", &[&id])
            .await
            .map_err(|_| {
                Error::FailedPrecondition(
                    "domain still holds projects or users; delete them first".into(),
                )
            })?;
        if n == 0 {
            return Err(Error::NotFound("domain".into()));
        }
        Ok(())
    }

    // ------------------------------------------------------------ projects

    pub async fn create_project(&self, p: &Project) -> Result<()> {
        self.exec(
            "INSERT INTO projects (id, domain_id, name, description, enabled) VALUES ($1, $2, $3, $4, $5)",
            &[&p.id, &p.domain_id, &p.name, &p.description, &p.enabled],
        )
        .await
        .map_err(|e| constraint(e, &format!("project {:?} in that domain", p.name)))?;
        Ok(())
    }

    pub async fn get_project(&self, r: &Ref) -> Result<Project> {
        let row = match r {
            Ref::Id(id) => {
                self.opt("SELECT * FROM projects WHERE id = $1", &[id])
                    .await?
            }
            Ref::Name { name, domain } => {
                let d = match domain {
                    Some(d) => self.domain_id(d).await?,
                    None => {
                        self.domain_id(&DomainRef::Name(crate::DEFAULT_DOMAIN.into()))
                            .await?
                    }
                };
                self.opt(
                    "SELECT * FROM projects WHERE domain_id = $1 AND name = $2",
                    &[&d, name],
                )
                .await?
            }
        };
        row.map(|r| project(&r))
            .ok_or_else(|| Error::NotFound("project".into()))
    }

    pub async fn list_projects(
        &self,
        domain_id: Option<Uuid>,
        user_id: Option<Uuid>,
    ) -> Result<Vec<Project>> {
        Ok(self
            .rows(
                "SELECT p.* FROM projects p WHERE ($1::uuid IS NULL OR p.domain_id = $1) \
                 AND ($2::uuid IS NULL OR EXISTS (SELECT 1 FROM role_assignments a \
                      WHERE a.project_id = p.id AND a.user_id = $2)) ORDER BY p.name",
                &[&domain_id, &user_id],
            )
            .await?
            .iter()
            .map(project)
            .collect())
    }

    pub async fn update_project(&self, id: Uuid, p: &Patch) -> Result<Project> {
        self.opt(
            "UPDATE projects SET name = coalesce($2, name), description = coalesce($3, description), \
             enabled = coalesce($4, enabled) WHERE id = $1 RETURNING *",
            &[&id, &p.name, &p.description, &p.enabled],
        )
        .await
        .map_err(|e| constraint(e, "a project with that name in that domain"))?
        .map(|r| project(&r))
        .ok_or_else(|| Error::NotFound("project".into()))
    }

    pub async fn delete_project(&self, id: Uuid) -> Result<()> {
        if self
            .exec("DELETE FROM projects WHERE id = $1", &[&id])
            .await?
            == 0
        {
            return Err(Error::NotFound("project".into()));
        }
        Ok(())
    }

    /// The project a token asks to be scoped to, with its domain's state.
    pub async fn scope_project(&self, r: &Ref) -> Result<Option<ScopeProject>> {
        // One round trip: the project, its domain's state, and whether it is the admin project.
        let (id, name, domain_id, domain_name): (
            Option<Uuid>,
            Option<&str>,
            Option<Uuid>,
            Option<&str>,
        ) = match r {
            Ref::Id(id) => (Some(*id), None, None, None),
            Ref::Name { name, domain } => match domain {
                Some(DomainRef::Id(d)) => (None, Some(name), Some(*d), None),
                Some(DomainRef::Name(d)) => (None, Some(name), None, Some(d)),
                None => (None, Some(name), None, Some(crate::DEFAULT_DOMAIN)),
            },
        };
        let row = self
            .opt(
                "SELECT p.*, d.enabled AS domain_enabled, \
                 coalesce((SELECT value FROM settings WHERE key = 'admin_project_id') = p.id::text, false) AS is_admin \
                 FROM projects p JOIN domains d ON d.id = p.domain_id \
                 WHERE ($1::uuid IS NULL OR p.id = $1) AND ($2::text IS NULL OR p.name = $2) \
                 AND ($3::uuid IS NULL OR d.id = $3) AND ($4::text IS NULL OR d.name = $4)",
                &[&id, &name, &domain_id, &domain_name],
            )
            .await?;
        Ok(row.map(|r| ScopeProject {
            project: project(&r),
            domain_enabled: r.get("domain_enabled"),
            is_admin_project: r.get("is_admin"),
        }))
    }

    // --------------------------------------------------------------- users

    pub async fn create_user(&self, u: &User, password_hash: Option<&str>) -> Result<()> {
        self.exec(
            "INSERT INTO users (id, domain_id, name, email, description, enabled, password_hash, password_changed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() END)",
            &[&u.id, &u.domain_id, &u.name, &u.email, &u.description, &u.enabled, &password_hash],
        )
        .await
        .map_err(|e| constraint(e, &format!("user {:?} in that domain", u.name)))?;
        Ok(())
    }

    pub async fn get_user(&self, r: &Ref) -> Result<User> {
        let row = match r {
            Ref::Id(id) => {
                self.opt(
                    &format!("SELECT {USER_COLS} FROM users u WHERE u.id = $1"),
                    &[id],
                )
                .await?
            }
            Ref::Name { name, domain } => {
                let d = match domain {
                    Some(d) => self.domain_id(d).await?,
                    None => {
                        self.domain_id(&DomainRef::Name(crate::DEFAULT_DOMAIN.into()))
                            .await?
                    }
                };
                self.opt(
                    &format!(
                        "SELECT {USER_COLS} FROM users u WHERE u.domain_id = $1 AND u.name = $2"
                    ),
                    &[&d, name],
                )
                .await?
            }
        };
        row.map(|r| user(&r))
            .ok_or_else(|| Error::NotFound("user".into()))
    }

    pub async fn list_users(&self, domain_id: Option<Uuid>) -> Result<Vec<User>> {
        Ok(self
            .rows(
                &format!("SELECT {USER_COLS} FROM users u WHERE ($1::uuid IS NULL OR u.domain_id = $1) ORDER BY u.name"),
                &[&domain_id],
            )
            .await?
            .iter()
            .map(user)
            .collect())
    }

    /// Updates profile fields; a new password hash also clears any lockout.
    pub async fn update_user(
        &self,
        id: Uuid,
        p: &Patch,
        password_hash: Option<&str>,
    ) -> Result<User> {
        self.opt(
            &format!(
                "UPDATE users u SET name = coalesce($2, name), email = coalesce($3, email), \
                 description = coalesce($4, description), enabled = coalesce($5, enabled), \
                 password_hash = coalesce($6, password_hash), \
                 password_changed_at = CASE WHEN $6::text IS NULL THEN password_changed_at ELSE now() END, \
                 failed_attempts = CASE WHEN $6::text IS NULL THEN failed_attempts ELSE 0 END, \
                 locked_until = CASE WHEN $6::text IS NULL THEN locked_until ELSE NULL END \
                 WHERE id = $1 RETURNING {USER_COLS}"
            ),
            &[&id, &p.name, &p.email, &p.description, &p.enabled, &password_hash],
        )
        .await
        .map_err(|e| constraint(e, "a user with that name in that domain"))?
        .map(|r| user(&r))
        .ok_or_else(|| Error::NotFound("user".into()))
    }

    pub async fn delete_user(&self, id: Uuid) -> Result<()> {
        if self.exec("DELETE FROM users WHERE id = $1", &[&id]).await? == 0 {
            return Err(Error::NotFound("user".into()));
        }
        Ok(())
    }

    /// The user a password login names, whether or not it may log in.
    pub async fn auth_user(&self, r: &Ref) -> Result<Option<AuthUser>> {
        const COLS: &str = "u.id, u.name, u.domain_id, (u.enabled AND d.enabled) AS enabled, \
                            u.password_hash, u.locked_until";
        let row = match r {
            Ref::Id(id) => {
                self.opt(
                    &format!("SELECT {COLS} FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.id = $1"),
                    &[id],
                )
                .await?
            }
            Ref::Name { name, domain } => match domain {
                Some(DomainRef::Id(d)) => {
                    self.opt(
                        &format!(
                            "SELECT {COLS} FROM users u JOIN domains d ON d.id = u.domain_id \
                             WHERE d.id = $1 AND u.name = $2"
                        ),
                        &[d, name],
                    )
                    .await?
                }
                Some(DomainRef::Name(d)) => {
                    self.opt(
                        &format!(
                            "SELECT {COLS} FROM users u JOIN domains d ON d.id = u.domain_id \
                             WHERE d.name = $1 AND u.name = $2"
                        ),
                        &[d, name],
                    )
                    .await?
                }
                None => return Ok(None),
            },
        };
        Ok(row.map(|r| AuthUser {
            id: r.get("id"),
            name: r.get("name"),
            domain_id: r.get("domain_id"),
            enabled: r.get("enabled"),
            password_hash: r.get("password_hash"),
            locked_until: r.get("locked_until"),
        }))
    }

    /// Counts a failed login; at `max_attempts` locks the account for `lock_secs`.
    pub async fn record_failed_login(
        &self,
        id: Uuid,
        max_attempts: i32,
        lock_secs: f64,
    ) -> Result<()> {
        self.exec(
            "UPDATE users SET \
             locked_until = CASE WHEN failed_attempts + 1 >= $2 THEN now() + make_interval(secs => $3) ELSE locked_until END, \
             failed_attempts = CASE WHEN failed_attempts + 1 >= $2 THEN 0 ELSE failed_attempts + 1 END \
             WHERE id = $1",
            &[&id, &max_attempts, &lock_secs],
        )
        .await?;
        Ok(())
    }

    pub async fn clear_failed_logins(&self, id: Uuid) -> Result<()> {
        self.exec(
            "UPDATE users SET failed_attempts = 0, locked_until = NULL \
             WHERE id = $1 AND (failed_attempts <> 0 OR locked_until IS NOT NULL)",
            &[&id],
        )
        .await?;
        Ok(())
    }

    pub async fn password_hash(&self, id: Uuid) -> Result<Option<String>> {
        Ok(self
            .opt("SELECT password_hash FROM users WHERE id = $1", &[&id])
            .await?
            .and_then(|r| r.get(0)))
    }

    /// Whether the user and its domain are enabled (None: no such user).
    pub async fn user_enabled(&self, id: Uuid) -> Result<Option<bool>> {
        Ok(self
            .opt(
                "SELECT u.enabled AND d.enabled FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.id = $1",
                &[&id],
            )
            .await?
            .map(|r| r.get(0)))
    }

    // --------------------------------------------------------------- roles

    pub async fn role_id(&self, name_or_id: &str) -> Result<Uuid> {
        let row = match Uuid::parse_str(name_or_id) {
            Ok(id) => {
                self.opt("SELECT id FROM roles WHERE id = $1", &[&id])
                    .await?
            }
            Err(_) => {
                self.opt("SELECT id FROM roles WHERE name = $1", &[&name_or_id])
                    .await?
            }
        };
        row.map(|r| r.get(0))
            .ok_or_else(|| Error::NotFound(format!("role {name_or_id:?}")))
    }

    pub async fn create_role(&self, r: &Role) -> Result<()> {
        self.exec(
            "INSERT INTO roles (id, name, description) VALUES ($1, $2, $3)",
            &[&r.id, &r.name, &r.description],
        )
        .await
        .map_err(|e| constraint(e, &format!("role {:?}", r.name)))?;
        Ok(())
    }

    pub async fn get_role(&self, r: &Ref) -> Result<Role> {
        let row = match r {
            Ref::Id(id) => self.opt("SELECT * FROM roles WHERE id = $1", &[id]).await?,
            Ref::Name { name, .. } => {
                self.opt("SELECT * FROM roles WHERE name = $1", &[name])
                    .await?
            }
        };
        row.map(|r| role(&r))
            .ok_or_else(|| Error::NotFound("role".into()))
    }

    pub async fn list_roles(&self) -> Result<Vec<Role>> {
        Ok(self
            .rows("SELECT * FROM roles ORDER BY name", &[])
            .await?
            .iter()
            .map(role)
            .collect())
    }

    pub async fn delete_role(&self, id: Uuid) -> Result<()> {
        if self.exec("DELETE FROM roles WHERE id = $1", &[&id]).await? == 0 {
            return Err(Error::NotFound("role".into()));
        }
        Ok(())
    }

    /// Users holding `role_id` directly or through a role that implies it.
    pub async fn holders_of_role(&self, role_id: Uuid) -> Result<Vec<Uuid>> {
        Ok(self
            .rows(
                "WITH RECURSIVE priors(id) AS (SELECT $1::uuid UNION \
                 SELECT ir.prior_role_id FROM implied_roles ir JOIN priors ON ir.implied_role_id = priors.id) \
                 SELECT DISTINCT user_id FROM role_assignments WHERE role_id IN (SELECT id FROM priors)",
                &[&role_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub async fn create_implied_role(&self, prior: Uuid, implied: Uuid) -> Result<()> {
        // Refuse a cycle: implied must not already imply prior.
        let cycle = self
            .opt(
                "WITH RECURSIVE r(id) AS (SELECT $1::uuid UNION \
                 SELECT ir.implied_role_id FROM implied_roles ir JOIN r ON ir.prior_role_id = r.id) \
                 SELECT 1 FROM r WHERE id = $2",
                &[&implied, &prior],
            )
            .await?;
        if cycle.is_some() {
            return Err(Error::InvalidArgument(
                "that implication would make a cycle".into(),
            ));
        }
        self.exec(
            "INSERT INTO implied_roles (prior_role_id, implied_role_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&prior, &implied],
        )
        .await?;
        Ok(())
    }

    pub async fn list_implied_roles(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .rows(
                "SELECT p.name, i.name FROM implied_roles ir JOIN roles p ON p.id = ir.prior_role_id \
                 JOIN roles i ON i.id = ir.implied_role_id ORDER BY 1, 2",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    pub async fn delete_implied_role(&self, prior: Uuid, implied: Uuid) -> Result<()> {
        if self
            .exec(
                "DELETE FROM implied_roles WHERE prior_role_id = $1 AND implied_role_id = $2",
                &[&prior, &implied],
            )
            .await?
            == 0
        {
            return Err(Error::NotFound("implied role".into()));
        }
        Ok(())
    }

    /// Adds an assignment; true if it was new.
    pub async fn assign(&self, user_id: Uuid, role_id: Uuid, t: Target) -> Result<bool> {
        let (p, d, s) = split(t);
        let n = self
            .exec(
                "INSERT INTO role_assignments (user_id, role_id, project_id, domain_id, system) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&user_id, &role_id, &p, &d, &s],
            )
            .await
            .map_err(|e| constraint(e, "role assignment"))?;
        Ok(n > 0)
    }

    pub async fn unassign(&self, user_id: Uuid, role_id: Uuid, t: Target) -> Result<()> {
        let (p, d, s) = split(t);
        let n = self
            .exec(
                "DELETE FROM role_assignments WHERE user_id = $1 AND role_id = $2 \
                 AND project_id IS NOT DISTINCT FROM $3 AND domain_id IS NOT DISTINCT FROM $4 AND system = $5",
                &[&user_id, &role_id, &p, &d, &s],
            )
            .await?;
        if n == 0 {
            return Err(Error::NotFound("role assignment".into()));
        }
        Ok(())
    }

    pub async fn list_assignments(
        &self,
        user_id: Option<Uuid>,
        project_id: Option<Uuid>,
        domain_id: Option<Uuid>,
    ) -> Result<Vec<Assignment>> {
        Ok(self
            .rows(
                "SELECT a.user_id, a.role_id, r.name AS role_name, a.project_id, a.domain_id, a.system \
                 FROM role_assignments a JOIN roles r ON r.id = a.role_id \
                 WHERE ($1::uuid IS NULL OR a.user_id = $1) AND ($2::uuid IS NULL OR a.project_id = $2) \
                 AND ($3::uuid IS NULL OR a.domain_id = $3) ORDER BY a.user_id, r.name",
                &[&user_id, &project_id, &domain_id],
            )
            .await?
            .iter()
            .map(assignment)
            .collect())
    }

    /// The role names a user holds on a target, expanded through implied roles.
    pub async fn effective_roles(&self, user_id: Uuid, t: Target) -> Result<Vec<String>> {
        let (p, d, s) = split(t);
        Ok(self
            .rows(
                "WITH RECURSIVE r(id) AS ( \
                   SELECT role_id FROM role_assignments WHERE user_id = $1 \
                   AND project_id IS NOT DISTINCT FROM $2 AND domain_id IS NOT DISTINCT FROM $3 AND system = $4 \
                   UNION SELECT ir.implied_role_id FROM implied_roles ir JOIN r ON ir.prior_role_id = r.id) \
                 SELECT name FROM roles WHERE id IN (SELECT id FROM r) ORDER BY name",
                &[&user_id, &p, &d, &s],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    // ------------------------------------------------------------- catalog

    pub async fn service_id(&self, name_or_id: &str) -> Result<Uuid> {
        let row = match Uuid::parse_str(name_or_id) {
            Ok(id) => {
                self.opt("SELECT id FROM services WHERE id = $1", &[&id])
                    .await?
            }
            Err(_) => {
                self.opt("SELECT id FROM services WHERE name = $1", &[&name_or_id])
                    .await?
            }
        };
        row.map(|r| r.get(0))
            .ok_or_else(|| Error::NotFound(format!("service {name_or_id:?}")))
    }

    pub async fn create_service(&self, s: &Service) -> Result<()> {
        self.exec(
            "INSERT INTO services (id, name, type, description, enabled) VALUES ($1, $2, $3, $4, $5)",
            &[&s.id, &s.name, &s.kind, &s.description, &s.enabled],
        )
        .await
        .map_err(|e| constraint(e, &format!("service {:?}", s.name)))?;
        Ok(())
    }

    pub async fn list_services(&self) -> Result<Vec<Service>> {
        Ok(self
            .rows("SELECT * FROM services ORDER BY name", &[])
            .await?
            .iter()
            .map(service)
            .collect())
    }

    pub async fn delete_service(&self, id: Uuid) -> Result<()> {
        if self
            .exec("DELETE FROM services WHERE id = $1", &[&id])
            .await?
            == 0
        {
            return Err(Error::NotFound("service".into()));
        }
        Ok(())
    }

    pub async fn create_endpoint(&self, e: &Endpoint) -> Result<()> {
        self.exec(
            "INSERT INTO endpoints (id, service_id, interface, region, url, enabled) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&e.id, &e.service_id, &e.interface.as_str(), &e.region, &e.url, &e.enabled],
        )
        .await
        .map_err(|err| constraint(err, "an endpoint for that service, interface and region"))?;
        Ok(())
    }

    pub async fn list_endpoints(
        &self,
        service_id: Option<Uuid>,
        interface: Option<Interface>,
    ) -> Result<Vec<Endpoint>> {
        let interface = interface.map(Interface::as_str);
        Ok(self
            .rows(
                "SELECT * FROM endpoints WHERE ($1::uuid IS NULL OR service_id = $1) \
                 AND ($2::text IS NULL OR interface = $2) ORDER BY service_id, interface, region",
                &[&service_id, &interface],
            )
            .await?
            .iter()
            .map(endpoint)
            .collect())
    }

    pub async fn delete_endpoint(&self, id: Uuid) -> Result<()> {
        if self
            .exec("DELETE FROM endpoints WHERE id = $1", &[&id])
            .await?
            == 0
        {
            return Err(Error::NotFound("endpoint".into()));
        }
        Ok(())
    }

    pub async fn catalog(&self) -> Result<Vec<CatalogEntry>> {
        let rows = self
            .rows(
                "SELECT s.name AS s_name, s.type AS s_type, e.* FROM services s \
                 LEFT JOIN endpoints e ON e.service_id = s.id AND e.enabled \
                 WHERE s.enabled ORDER BY s.name, e.interface, e.region",
                &[],
            )
            .await?;
        let mut out: Vec<CatalogEntry> = Vec::new();
        for r in &rows {
            let name: String = r.get("s_name");
            if out.last().is_none_or(|last| last.name != name) {
                out.push(CatalogEntry {
                    name,
                    kind: r.get("s_type"),
                    endpoints: Vec::new(),
                });
            }
            let has_endpoint: Option<Uuid> = r.get("id");
            if let (Some(last), Some(_)) = (out.last_mut(), has_endpoint) {
                last.endpoints.push(endpoint(r));
            }
        }
        Ok(out)
    }

    // --------------------------------------------------------- revocations

    pub async fn insert_revocation(&self, rule: &RevocationRule) -> Result<()> {
        let id = |s: &Option<String>| s.as_deref().and_then(|s| Uuid::parse_str(s).ok());
        self.exec(
            "INSERT INTO revocation_events (user_id, project_id, domain_id, audit_id, issued_before) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &id(&rule.user_id),
                &id(&rule.project_id),
                &id(&rule.domain_id),
                &rule.audit_id,
                &rule.issued_before,
            ],
        )
        .await?;
        Ok(())
    }

    /// Rules that can still match a live token.
    pub async fn active_revocations(&self, since: OffsetDateTime) -> Result<Vec<RevocationRule>> {
        let s = |v: Option<Uuid>| v.map(|u| u.to_string());
        Ok(self
            .rows(
                "SELECT user_id, project_id, domain_id, audit_id, issued_before FROM revocation_events \
                 WHERE issued_before > $1 ORDER BY id",
                &[&since],
            )
            .await?
            .iter()
            .map(|r| RevocationRule {
                user_id: s(r.get(0)),
                project_id: s(r.get(1)),
                domain_id: s(r.get(2)),
                audit_id: r.get(3),
                issued_before: r.get(4),
            })
            .collect())
    }

    pub async fn prune_revocations(&self, before: OffsetDateTime) -> Result<u64> {
        Ok(self
            .exec(
                "DELETE FROM revocation_events WHERE issued_before <= $1",
                &[&before],
            )
            .await?)
    }

    // ------------------------------------------------------------ settings

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.exec(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
            &[&key, &value],
        )
        .await?;
        Ok(())
    }
}
