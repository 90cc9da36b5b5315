//! Every SQL statement of the identity service, parameterised and prepared
//! once per connection. Functions take any client (a pooled connection or a
//! transaction) so that the service decides what commits together: a state
//! change and the revocation rule it implies are written in one transaction.
//!
//! Lookups answer `Option`: whether "absent" becomes `NotFound`, and with
//! which key, is the service's decision (it must look the same as "may not
//! read").

use deadpool_postgres::GenericClient;
use runtime::error::{Error, Result, constraint};
use time::OffsetDateTime;
use token::RevocationRule;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::DEFAULT_DOMAIN;
use crate::model::*;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

async fn rows(c: &impl GenericClient, sql: &str, p: Params<'_>) -> Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

async fn opt(c: &impl GenericClient, sql: &str, p: Params<'_>) -> Result<Option<Row>> {
    Ok(rows(c, sql, p).await?.into_iter().next())
}

/// Executes; constraint violations are mapped for `kind` `name`.
async fn exec_as(
    c: &impl GenericClient,
    sql: &str,
    p: Params<'_>,
    kind: &'static str,
    name: &str,
) -> Result<u64> {
    let st = c.prepare_cached(sql).await?;
    c.execute(&st, p)
        .await
        .map_err(|e| constraint(e, kind, name))
}

async fn exec(c: &impl GenericClient, sql: &str, p: Params<'_>) -> Result<u64> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, p).await?)
}

fn all<T>(rows: Vec<Row>, f: fn(&Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(f).collect()
}

// ------------------------------------------------------------------ mapping

fn domain(r: &Row) -> Result<Domain> {
    Ok(Domain {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        enabled: r.try_get("enabled")?,
    })
}

fn project(r: &Row) -> Result<Project> {
    Ok(Project {
        id: r.try_get("id")?,
        domain_id: r.try_get("domain_id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        enabled: r.try_get("enabled")?,
    })
}

fn user(r: &Row) -> Result<User> {
    Ok(User {
        id: r.try_get("id")?,
        domain_id: r.try_get("domain_id")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        description: r.try_get("description")?,
        enabled: r.try_get("enabled")?,
        locked_until: r.try_get("locked_until")?,
        ignore_lockout: r.try_get("ignore_lockout_failure_attempts")?,
    })
}

fn role(r: &Row) -> Result<Role> {
    Ok(Role {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
    })
}

fn service(r: &Row) -> Result<Service> {
    Ok(Service {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        kind: r.try_get("type")?,
        description: r.try_get("description")?,
        enabled: r.try_get("enabled")?,
    })
}

fn endpoint(r: &Row) -> Result<Endpoint> {
    let interface: String = r.try_get("interface")?;
    Ok(Endpoint {
        id: r.try_get("id")?,
        service_id: r.try_get("service_id")?,
        interface: Interface::parse(&interface).ok_or_else(|| {
            Error::internal(format!(
                "unexpected interface {interface:?} in the database"
            ))
        })?,
        region: r.try_get("region")?,
        url: r.try_get("url")?,
        enabled: r.try_get("enabled")?,
    })
}

fn assignment(r: &Row) -> Result<Assignment> {
    let project: Option<Uuid> = r.try_get("project_id")?;
    let domain: Option<Uuid> = r.try_get("domain_id")?;
    Ok(Assignment {
        user_id: r.try_get("user_id")?,
        role_id: r.try_get("role_id")?,
        role_name: r.try_get("role_name")?,
        target: match (project, domain) {
            (Some(p), _) => Target::Project(p),
            (None, Some(d)) => Target::Domain(d),
            _ => Target::System,
        },
    })
}

fn revocation(r: &Row) -> Result<RevocationRule> {
    let s = |v: Option<Uuid>| v.map(|u| u.to_string());
    Ok(RevocationRule {
        user_id: s(r.try_get("user_id")?),
        project_id: s(r.try_get("project_id")?),
        domain_id: s(r.try_get("domain_id")?),
        audit_id: r.try_get("audit_id")?,
        issued_before: r.try_get("issued_before")?,
    })
}

fn split(t: Target) -> (Option<Uuid>, Option<Uuid>, bool) {
    match t {
        Target::Project(p) => (Some(p), None, false),
        Target::Domain(d) => (None, Some(d), false),
        Target::System => (None, None, true),
    }
}

/// `(id, name)` of a [`NameOrId`]-like reference, as SQL parameters.
fn id_or_name(r: &runtime::types::NameOrId) -> (Option<Uuid>, Option<&str>) {
    match r {
        runtime::types::NameOrId::Id(id) => (Some(*id), None),
        runtime::types::NameOrId::Name(n) => (None, Some(n.as_str())),
    }
}

/// `(id, name, domain id, domain name)` of a [`Ref`], as SQL parameters for
/// `WHERE ($1 IS NULL OR x.id = $1) AND ($2 IS NULL OR x.name = $2) AND
/// ($3 IS NULL OR d.id = $3) AND ($4 IS NULL OR d.name = $4)`: one query,
/// whichever way the object is named.
fn ref_params(r: &Ref) -> (Option<Uuid>, Option<&str>, Option<Uuid>, Option<&str>) {
    match r {
        Ref::Id(id) => (Some(*id), None, None, None),
        Ref::Name { name, domain } => match domain {
            Some(DomainRef::Id(d)) => (None, Some(name.as_str()), Some(*d), None),
            Some(DomainRef::Name(d)) => (None, Some(name.as_str()), None, Some(d.as_str())),
            None => (None, Some(name.as_str()), None, Some(DEFAULT_DOMAIN)),
        },
    }
}

const REF_WHERE: &str = "($1::uuid IS NULL OR x.id = $1) AND ($2::text IS NULL OR x.name = $2) \
     AND ($3::uuid IS NULL OR d.id = $3) AND ($4::text IS NULL OR d.name = $4)";

/// What authentication needs to know of a user.
pub struct AuthUser {
    pub id: Uuid,
    pub name: String,
    pub domain_id: Uuid,
    /// The user and its domain are enabled.
    pub enabled: bool,
    pub password_hash: Option<String>,
    pub locked_until: Option<OffsetDateTime>,
    pub ignore_lockout: bool,
}

/// A project a token may be scoped to, with what decides whether it may.
pub struct ScopeProject {
    pub project: Project,
    pub domain_enabled: bool,
    pub is_admin_project: bool,
    /// The user's effective roles on it (implied roles included).
    pub roles: Vec<String>,
}

const USER_COLS: &str = "x.id, x.domain_id, x.name, x.email, x.description, x.enabled, \
     x.locked_until, x.ignore_lockout_failure_attempts";

// ------------------------------------------------------------------ domains

pub async fn domain_id(c: &impl GenericClient, r: Option<&DomainRef>) -> Result<Option<Uuid>> {
    let (id, name) = match r {
        Some(DomainRef::Id(id)) => (Some(*id), None),
        Some(DomainRef::Name(n)) => (None, Some(n.as_str())),
        None => (None, Some(DEFAULT_DOMAIN)),
    };
    opt(
        c,
        "SELECT id FROM domains WHERE ($1::uuid IS NULL OR id = $1) AND ($2::text IS NULL OR name = $2)",
        &[&id, &name],
    )
    .await?
    .map(|r| Ok(r.try_get(0)?))
    .transpose()
}

pub async fn create_domain(c: &impl GenericClient, d: &Domain) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO domains (id, name, description, enabled) VALUES ($1, $2, $3, $4)",
        &[&d.id, &d.name, &d.description, &d.enabled],
        "domain",
        &d.name,
    )
    .await?;
    Ok(())
}

pub async fn get_domain(c: &impl GenericClient, r: &DomainRef) -> Result<Option<Domain>> {
    let (id, name) = match r {
        DomainRef::Id(id) => (Some(*id), None),
        DomainRef::Name(n) => (None, Some(n.as_str())),
    };
    opt(
        c,
        "SELECT * FROM domains WHERE ($1::uuid IS NULL OR id = $1) AND ($2::text IS NULL OR name = $2)",
        &[&id, &name],
    )
    .await?
    .map(|r| domain(&r))
    .transpose()
}

pub async fn list_domains(c: &impl GenericClient) -> Result<Vec<Domain>> {
    all(
        rows(c, "SELECT * FROM domains ORDER BY name", &[]).await?,
        domain,
    )
}

pub async fn update_domain(c: &impl GenericClient, id: Uuid, p: &Patch) -> Result<Option<Domain>> {
    let name = p.name.as_ref().map(|n| n.as_str());
    let row = rows_as(
        c,
        "UPDATE domains SET name = coalesce($2, name), description = coalesce($3, description), \
         enabled = coalesce($4, enabled) WHERE id = $1 RETURNING *",
        &[&id, &name, &p.description, &p.enabled],
        "domain",
        name.unwrap_or_default(),
    )
    .await?;
    row.first().map(domain).transpose()
}

/// Deletes the domain; false if there was none.
pub async fn delete_domain(c: &impl GenericClient, d: &Domain) -> Result<bool> {
    let sql = "DELETE FROM domains WHERE id = $1";
    Ok(exec_as(c, sql, &[&d.id], "domain", &d.name).await? > 0)
}

/// Whether anything still lives in the domain (projects or users).
pub async fn domain_in_use(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(opt(
        c,
        "SELECT 1 FROM projects WHERE domain_id = $1 UNION ALL SELECT 1 FROM users WHERE domain_id = $1 LIMIT 1",
        &[&id],
    )
    .await?
    .is_some())
}

async fn rows_as(
    c: &impl GenericClient,
    sql: &str,
    p: Params<'_>,
    kind: &'static str,
    name: &str,
) -> Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    c.query(&st, p).await.map_err(|e| constraint(e, kind, name))
}

// ----------------------------------------------------------------- projects

pub async fn create_project(c: &impl GenericClient, p: &Project) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO projects (id, domain_id, name, description, enabled) VALUES ($1, $2, $3, $4, $5)",
        &[&p.id, &p.domain_id, &p.name, &p.description, &p.enabled],
        "project",
        &p.name,
    )
    .await?;
    Ok(())
}

pub async fn get_project(c: &impl GenericClient, r: &Ref) -> Result<Option<Project>> {
    let (id, name, d_id, d_name) = ref_params(r);
    opt(
        c,
        &format!(
            "SELECT x.* FROM projects x JOIN domains d ON d.id = x.domain_id WHERE {REF_WHERE}"
        ),
        &[&id, &name, &d_id, &d_name],
    )
    .await?
    .map(|r| project(&r))
    .transpose()
}

pub async fn list_projects(c: &impl GenericClient, f: ProjectFilter) -> Result<Vec<Project>> {
    all(
        rows(
            c,
            "SELECT p.* FROM projects p WHERE ($1::uuid IS NULL OR p.domain_id = $1) \
             AND ($2::uuid IS NULL OR EXISTS (SELECT 1 FROM role_assignments a \
                  WHERE a.project_id = p.id AND a.user_id = $2)) ORDER BY p.name",
            &[&f.domain_id, &f.user_id],
        )
        .await?,
        project,
    )
}

pub async fn update_project(
    c: &impl GenericClient,
    id: Uuid,
    p: &Patch,
) -> Result<Option<Project>> {
    let name = p.name.as_ref().map(|n| n.as_str());
    let row = rows_as(
        c,
        "UPDATE projects SET name = coalesce($2, name), description = coalesce($3, description), \
         enabled = coalesce($4, enabled) WHERE id = $1 RETURNING *",
        &[&id, &name, &p.description, &p.enabled],
        "project",
        name.unwrap_or_default(),
    )
    .await?;
    row.first().map(project).transpose()
}

pub async fn delete_project(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(exec(c, "DELETE FROM projects WHERE id = $1", &[&id]).await? > 0)
}

/// For a token scoped to a project, in one statement (one round trip, one
/// executor start in Postgres): whether `user_id` and its domain are enabled
/// (`None`: no such user), and the project named by `r` with the role names
/// the user holds on it, expanded through implied roles (`None`: no such
/// project).
pub async fn scope_project(
    c: &impl GenericClient,
    user_id: Uuid,
    r: &Ref,
) -> Result<(Option<bool>, Option<ScopeProject>)> {
    let (id, name, d_id, d_name) = ref_params(r);
    let row = opt(
        c,
        &format!(
            "WITH RECURSIVE x AS ( \
               SELECT x.*, d.enabled AS domain_enabled, \
               coalesce((SELECT value FROM settings WHERE key = 'admin_project_id') = x.id::text, false) AS is_admin \
               FROM projects x JOIN domains d ON d.id = x.domain_id WHERE {REF_WHERE}), \
             r(id) AS ( \
               SELECT a.role_id FROM role_assignments a JOIN x ON a.project_id = x.id \
               WHERE a.user_id = $5 AND a.domain_id IS NULL AND NOT a.system \
               UNION SELECT ir.implied_role_id FROM implied_roles ir JOIN r ON ir.prior_role_id = r.id) \
             SELECT (SELECT u.enabled AND d.enabled FROM users u JOIN domains d ON d.id = u.domain_id \
                     WHERE u.id = $5) AS user_enabled, \
               x.*, ARRAY(SELECT name FROM roles WHERE id IN (SELECT id FROM r) ORDER BY name) AS role_names \
             FROM (VALUES (1)) AS one LEFT JOIN x ON true"
        ),
        &[&id, &name, &d_id, &d_name, &user_id],
    )
    .await?;
    let Some(r) = row else {
        return Err(Error::internal("the scope statement returned no row"));
    };
    let user_enabled = r.try_get("user_enabled")?;
    if r.try_get::<_, Option<Uuid>>("id")?.is_none() {
        return Ok((user_enabled, None));
    }
    Ok((
        user_enabled,
        Some(ScopeProject {
            project: project(&r)?,
            domain_enabled: r.try_get("domain_enabled")?,
            is_admin_project: r.try_get("is_admin")?,
            roles: r.try_get("role_names")?,
        }),
    ))
}

// -------------------------------------------------------------------- users

pub async fn create_user(c: &impl GenericClient, u: &User, password_hash: &str) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO users (id, domain_id, name, email, description, enabled, password_hash, \
         password_changed_at, ignore_lockout_failure_attempts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8)",
        &[
            &u.id,
            &u.domain_id,
            &u.name,
            &u.email,
            &u.description,
            &u.enabled,
            &password_hash,
            &u.ignore_lockout,
        ],
        "user",
        &u.name,
    )
    .await?;
    Ok(())
}

pub async fn get_user(c: &impl GenericClient, r: &Ref) -> Result<Option<User>> {
    let (id, name, d_id, d_name) = ref_params(r);
    opt(
        c,
        &format!(
            "SELECT {USER_COLS} FROM users x JOIN domains d ON d.id = x.domain_id WHERE {REF_WHERE}"
        ),
        &[&id, &name, &d_id, &d_name],
    )
    .await?
    .map(|r| user(&r))
    .transpose()
}

pub async fn list_users(c: &impl GenericClient, domain_id: Option<Uuid>) -> Result<Vec<User>> {
    all(
        rows(
            c,
            &format!(
                "SELECT {USER_COLS} FROM users x WHERE ($1::uuid IS NULL OR x.domain_id = $1) ORDER BY x.name"
            ),
            &[&domain_id],
        )
        .await?,
        user,
    )
}

/// Updates profile fields; a new password hash also clears any lockout.
pub async fn update_user(
    c: &impl GenericClient,
    id: Uuid,
    p: &Patch,
    password_hash: Option<&str>,
) -> Result<Option<User>> {
    let name = p.name.as_ref().map(|n| n.as_str());
    let row = rows_as(
        c,
        &format!(
            "UPDATE users x SET name = coalesce($2, name), email = coalesce($3, email), \
             description = coalesce($4, description), enabled = coalesce($5, enabled), \
             password_hash = coalesce($6, password_hash), \
             password_changed_at = CASE WHEN $6::text IS NULL THEN password_changed_at ELSE now() END, \
             failed_attempts = CASE WHEN $6::text IS NULL THEN failed_attempts ELSE 0 END, \
             locked_until = CASE WHEN $6::text IS NULL THEN locked_until ELSE NULL END, \
             ignore_lockout_failure_attempts = coalesce($7, ignore_lockout_failure_attempts) \
             WHERE id = $1 RETURNING {USER_COLS}"
        ),
        &[
            &id,
            &name,
            &p.email,
            &p.description,
            &p.enabled,
            &password_hash,
            &p.ignore_lockout,
        ],
        "user",
        name.unwrap_or_default(),
    )
    .await?;
    row.first().map(user).transpose()
}

pub async fn delete_user(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(exec(c, "DELETE FROM users WHERE id = $1", &[&id]).await? > 0)
}

/// The user a password login names, whether or not it may log in.
pub async fn auth_user(c: &impl GenericClient, r: &Ref) -> Result<Option<AuthUser>> {
    let (id, name, d_id, d_name) = ref_params(r);
    let row = opt(
        c,
        &format!(
            "SELECT x.id, x.name, x.domain_id, (x.enabled AND d.enabled) AS enabled, \
             x.password_hash, x.locked_until, x.ignore_lockout_failure_attempts \
             FROM users x JOIN domains d ON d.id = x.domain_id WHERE {REF_WHERE}"
        ),
        &[&id, &name, &d_id, &d_name],
    )
    .await?;
    row.map(|r| {
        Ok(AuthUser {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            domain_id: r.try_get("domain_id")?,
            enabled: r.try_get("enabled")?,
            password_hash: r.try_get("password_hash")?,
            locked_until: r.try_get("locked_until")?,
            ignore_lockout: r.try_get("ignore_lockout_failure_attempts")?,
        })
    })
    .transpose()
}

/// Counts a failed login; at `max_attempts` locks the account for `lock_secs`.
pub async fn record_failed_login(
    c: &impl GenericClient,
    id: Uuid,
    max_attempts: i32,
    lock_secs: f64,
) -> Result<()> {
    exec(
        c,
        "UPDATE users SET \
         locked_until = CASE WHEN failed_attempts + 1 >= $2 THEN now() + make_interval(secs => $3) ELSE locked_until END, \
         failed_attempts = CASE WHEN failed_attempts + 1 >= $2 THEN 0 ELSE failed_attempts + 1 END \
         WHERE id = $1",
        &[&id, &max_attempts, &lock_secs],
    )
    .await?;
    Ok(())
}

pub async fn clear_failed_logins(c: &impl GenericClient, id: Uuid) -> Result<()> {
    exec(
        c,
        "UPDATE users SET failed_attempts = 0, locked_until = NULL \
         WHERE id = $1 AND (failed_attempts <> 0 OR locked_until IS NOT NULL)",
        &[&id],
    )
    .await?;
    Ok(())
}

pub async fn password_hash(c: &impl GenericClient, id: Uuid) -> Result<Option<String>> {
    match opt(c, "SELECT password_hash FROM users WHERE id = $1", &[&id]).await? {
        Some(r) => Ok(r.try_get(0)?),
        None => Ok(None),
    }
}

/// Whether the user and its domain are enabled (None: no such user).
pub async fn user_enabled(c: &impl GenericClient, id: Uuid) -> Result<Option<bool>> {
    opt(
        c,
        "SELECT u.enabled AND d.enabled FROM users u JOIN domains d ON d.id = u.domain_id WHERE u.id = $1",
        &[&id],
    )
    .await?
    .map(|r| Ok(r.try_get(0)?))
    .transpose()
}

// -------------------------------------------------------------------- roles

pub async fn get_role(
    c: &impl GenericClient,
    r: &runtime::types::NameOrId,
) -> Result<Option<Role>> {
    let (id, name) = id_or_name(r);
    opt(
        c,
        "SELECT * FROM roles WHERE ($1::uuid IS NULL OR id = $1) AND ($2::text IS NULL OR name = $2)",
        &[&id, &name],
    )
    .await?
    .map(|r| role(&r))
    .transpose()
}

pub async fn create_role(c: &impl GenericClient, r: &Role) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO roles (id, name, description) VALUES ($1, $2, $3)",
        &[&r.id, &r.name, &r.description],
        "role",
        &r.name,
    )
    .await?;
    Ok(())
}

pub async fn list_roles(c: &impl GenericClient) -> Result<Vec<Role>> {
    all(
        rows(c, "SELECT * FROM roles ORDER BY name", &[]).await?,
        role,
    )
}

pub async fn delete_role(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(exec(c, "DELETE FROM roles WHERE id = $1", &[&id]).await? > 0)
}

/// Users holding `role_id` directly or through a role that implies it.
pub async fn holders_of_role(c: &impl GenericClient, role_id: Uuid) -> Result<Vec<Uuid>> {
    rows(
        c,
        "WITH RECURSIVE priors(id) AS (SELECT $1::uuid UNION \
         SELECT ir.prior_role_id FROM implied_roles ir JOIN priors ON ir.implied_role_id = priors.id) \
         SELECT DISTINCT user_id FROM role_assignments WHERE role_id IN (SELECT id FROM priors)",
        &[&role_id],
    )
    .await?
    .iter()
    .map(|r| Ok(r.try_get(0)?))
    .collect()
}

/// Whether `from` already implies `to`, directly or through other roles.
pub async fn implies(c: &impl GenericClient, from: Uuid, to: Uuid) -> Result<bool> {
    Ok(opt(
        c,
        "WITH RECURSIVE r(id) AS (SELECT $1::uuid UNION \
         SELECT ir.implied_role_id FROM implied_roles ir JOIN r ON ir.prior_role_id = r.id) \
         SELECT 1 FROM r WHERE id = $2",
        &[&from, &to],
    )
    .await?
    .is_some())
}

pub async fn create_implied_role(c: &impl GenericClient, prior: Uuid, implied: Uuid) -> Result<()> {
    exec(
        c,
        "INSERT INTO implied_roles (prior_role_id, implied_role_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&prior, &implied],
    )
    .await?;
    Ok(())
}

pub async fn list_implied_roles(c: &impl GenericClient) -> Result<Vec<(String, String)>> {
    rows(
        c,
        "SELECT p.name, i.name FROM implied_roles ir JOIN roles p ON p.id = ir.prior_role_id \
         JOIN roles i ON i.id = ir.implied_role_id ORDER BY 1, 2",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

pub async fn delete_implied_role(
    c: &impl GenericClient,
    prior: Uuid,
    implied: Uuid,
) -> Result<bool> {
    Ok(exec(
        c,
        "DELETE FROM implied_roles WHERE prior_role_id = $1 AND implied_role_id = $2",
        &[&prior, &implied],
    )
    .await?
        > 0)
}

/// Adds an assignment; true if it was new.
pub async fn assign(
    c: &impl GenericClient,
    user_id: Uuid,
    role_id: Uuid,
    t: Target,
) -> Result<bool> {
    let (p, d, s) = split(t);
    let n = exec_as(
        c,
        "INSERT INTO role_assignments (user_id, role_id, project_id, domain_id, system) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[&user_id, &role_id, &p, &d, &s],
        "role assignment of user",
        &user_id.to_string(),
    )
    .await?;
    Ok(n > 0)
}

pub async fn unassign(
    c: &impl GenericClient,
    user_id: Uuid,
    role_id: Uuid,
    t: Target,
) -> Result<bool> {
    let (p, d, s) = split(t);
    Ok(exec(
        c,
        "DELETE FROM role_assignments WHERE user_id = $1 AND role_id = $2 \
         AND project_id IS NOT DISTINCT FROM $3 AND domain_id IS NOT DISTINCT FROM $4 AND system = $5",
        &[&user_id, &role_id, &p, &d, &s],
    )
    .await?
        > 0)
}

pub async fn list_assignments(
    c: &impl GenericClient,
    f: AssignmentFilter,
) -> Result<Vec<Assignment>> {
    all(
        rows(
            c,
            "SELECT a.user_id, a.role_id, r.name AS role_name, a.project_id, a.domain_id, a.system \
             FROM role_assignments a JOIN roles r ON r.id = a.role_id \
             WHERE ($1::uuid IS NULL OR a.user_id = $1) AND ($2::uuid IS NULL OR a.project_id = $2) \
             AND ($3::uuid IS NULL OR a.domain_id = $3) ORDER BY a.user_id, r.name",
            &[&f.user_id, &f.project_id, &f.domain_id],
        )
        .await?,
        assignment,
    )
}

/// The role names a user holds on a target, expanded through implied roles.
pub async fn effective_roles(
    c: &impl GenericClient,
    user_id: Uuid,
    t: Target,
) -> Result<Vec<String>> {
    let (p, d, s) = split(t);
    rows(
        c,
        "WITH RECURSIVE r(id) AS ( \
           SELECT role_id FROM role_assignments WHERE user_id = $1 \
           AND project_id IS NOT DISTINCT FROM $2 AND domain_id IS NOT DISTINCT FROM $3 AND system = $4 \
           UNION SELECT ir.implied_role_id FROM implied_roles ir JOIN r ON ir.prior_role_id = r.id) \
         SELECT name FROM roles WHERE id IN (SELECT id FROM r) ORDER BY name",
        &[&user_id, &p, &d, &s],
    )
    .await?
    .iter()
    .map(|r| Ok(r.try_get(0)?))
    .collect()
}

// ------------------------------------------------------------------ catalog

pub async fn get_service(
    c: &impl GenericClient,
    r: &runtime::types::NameOrId,
) -> Result<Option<Service>> {
    let (id, name) = id_or_name(r);
    opt(
        c,
        "SELECT * FROM services WHERE ($1::uuid IS NULL OR id = $1) AND ($2::text IS NULL OR name = $2)",
        &[&id, &name],
    )
    .await?
    .map(|r| service(&r))
    .transpose()
}

pub async fn create_service(c: &impl GenericClient, s: &Service) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO services (id, name, type, description, enabled) VALUES ($1, $2, $3, $4, $5)",
        &[&s.id, &s.name, &s.kind, &s.description, &s.enabled],
        "service",
        &s.name,
    )
    .await?;
    Ok(())
}

pub async fn list_services(c: &impl GenericClient) -> Result<Vec<Service>> {
    all(
        rows(c, "SELECT * FROM services ORDER BY name", &[]).await?,
        service,
    )
}

pub async fn delete_service(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(exec(c, "DELETE FROM services WHERE id = $1", &[&id]).await? > 0)
}

pub async fn create_endpoint(c: &impl GenericClient, e: &Endpoint) -> Result<()> {
    exec_as(
        c,
        "INSERT INTO endpoints (id, service_id, interface, region, url, enabled) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&e.id, &e.service_id, &e.interface.as_str(), &e.region, &e.url, &e.enabled],
        "endpoint",
        &format!("{} {}", e.interface.as_str(), e.region),
    )
    .await?;
    Ok(())
}

pub async fn list_endpoints(c: &impl GenericClient, f: EndpointFilter) -> Result<Vec<Endpoint>> {
    let interface = f.interface.map(Interface::as_str);
    all(
        rows(
            c,
            "SELECT * FROM endpoints WHERE ($1::uuid IS NULL OR service_id = $1) \
             AND ($2::text IS NULL OR interface = $2) ORDER BY service_id, interface, region",
            &[&f.service_id, &interface],
        )
        .await?,
        endpoint,
    )
}

pub async fn delete_endpoint(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(exec(c, "DELETE FROM endpoints WHERE id = $1", &[&id]).await? > 0)
}

pub async fn catalog(c: &impl GenericClient) -> Result<Vec<CatalogEntry>> {
    let rows = rows(
        c,
        "SELECT s.name AS s_name, s.type AS s_type, e.* FROM services s \
         LEFT JOIN endpoints e ON e.service_id = s.id AND e.enabled \
         WHERE s.enabled ORDER BY s.name, e.interface, e.region",
        &[],
    )
    .await?;
    let mut out: Vec<CatalogEntry> = Vec::new();
    for r in &rows {
        let name: String = r.try_get("s_name")?;
        if out.last().is_none_or(|last| last.name != name) {
            out.push(CatalogEntry {
                name,
                kind: r.try_get("s_type")?,
                endpoints: Vec::new(),
            });
        }
        let has_endpoint: Option<Uuid> = r.try_get("id")?;
        if let (Some(last), Some(_)) = (out.last_mut(), has_endpoint) {
            last.endpoints.push(endpoint(r)?);
        }
    }
    Ok(out)
}

// -------------------------------------------------------------- revocations

/// Stores a rule; answers its id (what replicas tell each other).
pub async fn insert_revocation(c: &impl GenericClient, rule: &RevocationRule) -> Result<i64> {
    let id = |s: &Option<String>| s.as_deref().and_then(|s| Uuid::parse_str(s).ok());
    let row = opt(
        c,
        "INSERT INTO revocation_events (user_id, project_id, domain_id, audit_id, issued_before) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
        &[
            &id(&rule.user_id),
            &id(&rule.project_id),
            &id(&rule.domain_id),
            &rule.audit_id,
            &rule.issued_before,
        ],
    )
    .await?
    .ok_or_else(|| Error::internal("INSERT ... RETURNING returned no row"))?;
    Ok(row.try_get(0)?)
}

/// Rules by id (those another replica announced), with their ids.
pub async fn revocations_by_id(
    c: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<(i64, RevocationRule)>> {
    rows(
        c,
        "SELECT id, user_id, project_id, domain_id, audit_id, issued_before FROM revocation_events \
         WHERE id = ANY($1) ORDER BY id",
        &[&ids],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get("id")?, revocation(r)?)))
    .collect()
}

/// [`active_revocations`] with their ids (a replica's resync).
pub async fn active_revocations_with_ids(
    c: &impl GenericClient,
    since: OffsetDateTime,
) -> Result<Vec<(i64, RevocationRule)>> {
    rows(
        c,
        "SELECT id, user_id, project_id, domain_id, audit_id, issued_before FROM revocation_events \
         WHERE issued_before > $1 ORDER BY id",
        &[&since],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get("id")?, revocation(r)?)))
    .collect()
}

/// Rules that can still match a live token.
pub async fn active_revocations(
    c: &impl GenericClient,
    since: OffsetDateTime,
) -> Result<Vec<RevocationRule>> {
    all(
        rows(
            c,
            "SELECT user_id, project_id, domain_id, audit_id, issued_before FROM revocation_events \
             WHERE issued_before > $1 ORDER BY id",
            &[&since],
        )
        .await?,
        revocation,
    )
}

pub async fn prune_revocations(c: &impl GenericClient, before: OffsetDateTime) -> Result<u64> {
    exec(
        c,
        "DELETE FROM revocation_events WHERE issued_before <= $1",
        &[&before],
    )
    .await
}

// ------------------------------------------------------------ signing keys

/// Serialises key set changes (first start, rotation) across replicas.
pub async fn lock_signing_keys(c: &impl GenericClient) -> Result<()> {
    exec(
        c,
        "LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE",
        &[],
    )
    .await?;
    Ok(())
}

/// (index, public key, sealed private key), by index.
pub async fn signing_keys(c: &impl GenericClient) -> Result<Vec<(i32, Vec<u8>, Vec<u8>)>> {
    rows(
        c,
        "SELECT idx, public_key, sealed FROM signing_keys ORDER BY idx",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    .collect()
}

pub async fn insert_signing_key(
    c: &impl GenericClient,
    idx: i32,
    public_key: &[u8],
    sealed: &[u8],
) -> Result<()> {
    exec(
        c,
        "INSERT INTO signing_keys (idx, public_key, sealed) VALUES ($1, $2, $3)",
        &[&idx, &public_key, &sealed],
    )
    .await?;
    Ok(())
}

pub async fn renumber_signing_key(c: &impl GenericClient, from: i32, to: i32) -> Result<()> {
    exec(
        c,
        "UPDATE signing_keys SET idx = $2 WHERE idx = $1",
        &[&from, &to],
    )
    .await?;
    Ok(())
}

pub async fn delete_signing_key(c: &impl GenericClient, idx: i32) -> Result<()> {
    exec(c, "DELETE FROM signing_keys WHERE idx = $1", &[&idx]).await?;
    Ok(())
}

// ------------------------------------------------------------ notifications

/// The channel on which replicas announce committed changes to each other.
pub const CHANGES_CHANNEL: &str = "identity_changes";

/// Queues a notice; Postgres delivers it to every listener when (and only
/// if) the surrounding transaction commits.
pub async fn notify(c: &impl GenericClient, payload: &str) -> Result<()> {
    exec(c, "SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload]).await?;
    Ok(())
}

// ----------------------------------------------------------------- settings

pub async fn set_setting(c: &impl GenericClient, key: &str, value: &str) -> Result<()> {
    exec(
        c,
        "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
        &[&key, &value],
    )
    .await?;
    Ok(())
}
