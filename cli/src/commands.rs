//! The identity commands: `cirrus login`, `token`, `key`, `user`, `project`,
//! `domain`, `role`, `service`, `endpoint`, `catalog`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use proto::identity::v1 as pb;
use proto::identity::v1::{
    catalog_client::CatalogClient, resources_client::ResourcesClient, roles_client::RolesClient,
    tokens_client::TokensClient, users_client::UsersClient,
};
use tonic::Request;
use tonic::transport::Channel;

use crate::output::{Format, Rows, one};
use crate::profile::{self, CachedToken, Profile};

/// Every call gets this deadline.
const DEADLINE: Duration = Duration::from_secs(30);

pub struct Client {
    channel: Channel,
    token: String,
}

impl Client {
    fn req<T>(&self, msg: T) -> Request<T> {
        with_token(msg, &self.token)
    }
    fn tokens(&self) -> TokensClient<Channel> {
        TokensClient::new(self.channel.clone())
    }
    fn resources(&self) -> ResourcesClient<Channel> {
        ResourcesClient::new(self.channel.clone())
    }
    fn users(&self) -> UsersClient<Channel> {
        UsersClient::new(self.channel.clone())
    }
    fn roles(&self) -> RolesClient<Channel> {
        RolesClient::new(self.channel.clone())
    }
    fn catalog(&self) -> CatalogClient<Channel> {
        CatalogClient::new(self.channel.clone())
    }
}

/// A channel to the profile's endpoint: plaintext for `http://`, TLS with
/// the cluster's CA for `https://` (plus the operator certificate if given).
pub async fn channel(p: &Profile) -> anyhow::Result<Channel> {
    let url = &p.url;
    let Some(rest) = url.strip_prefix("https://") else {
        return tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("invalid url {url:?}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(DEADLINE)
            .connect()
            .await
            .with_context(|| format!("cannot reach {url}"));
    };
    if p.ca_cert.is_empty() {
        bail!(
            "{url} is https: set ca_cert in the profile (or CIRRUS_CA_CERT) to the cluster's bundle.pem"
        );
    }
    let client = match (p.client_cert.is_empty(), p.client_key.is_empty()) {
        (false, false) => Some((Path::new(&p.client_cert), Path::new(&p.client_key))),
        _ => None,
    };
    let tls = sidecar::tls::client_config(Path::new(&p.ca_cert), client)?;
    let connector = sidecar::connector::MeshConnector::with_config(tls);
    let authority = rest.split('/').next().unwrap_or(rest);
    connector.expect(authority, &p.server_name);
    tonic::transport::Endpoint::from_shared(format!("http://{authority}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(DEADLINE)
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("cannot reach {url}"))
}

/// A request carrying a bearer token and the CLI's deadline.
pub fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(DEADLINE);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn password_request(p: &Profile) -> pb::AuthenticateRequest {
    let scope = (!p.project_name.is_empty()).then(|| pb::Scope {
        target: Some(pb::scope::Target::Project(pb::ProjectScope {
            name: p.project_name.clone(),
            domain_name: p.project_domain_name.clone(),
            ..Default::default()
        })),
    });
    pb::AuthenticateRequest {
        method: Some(pb::authenticate_request::Method::Password(
            pb::PasswordCredentials {
                user_name: p.username.clone(),
                user_domain_name: p.user_domain_name.clone(),
                password: p.password.clone(),
                ..Default::default()
            },
        )),
        scope,
    }
}

/// Authenticates with the profile's password and caches the token.
pub async fn login(
    p: &Profile,
    profile_path: Option<&Path>,
) -> anyhow::Result<pb::AuthenticateResponse> {
    p.check_password_login()?;
    let mut req = Request::new(password_request(p));
    req.set_timeout(DEADLINE);
    let issued = TokensClient::new(channel(p).await?)
        .authenticate(req)
        .await?
        .into_inner();
    if let Some(path) = profile::cache_path(profile_path) {
        let cached = CachedToken {
            token: issued.token.clone(),
            expires_at: issued
                .claims
                .as_ref()
                .and_then(|c| c.expires_at)
                .map(|t| t.seconds)
                .unwrap_or(0),
            username: p.username.clone(),
            project_name: p.project_name.clone(),
            url: p.url.clone(),
        };
        profile::write_private(&path, serde_json::to_string(&cached)?.as_bytes())?;
    }
    Ok(issued)
}

/// A client with a token: `CIRRUS_TOKEN`/profile token, else the cached one, else a fresh login.
pub async fn client(p: &Profile, profile_path: Option<&Path>) -> anyhow::Result<Client> {
    let token = if !p.token.is_empty() {
        p.token.clone()
    } else if let Some(t) =
        profile::cache_path(profile_path).and_then(|c| profile::read_cache(&c, p))
    {
        t
    } else {
        login(p, profile_path).await?.token
    };
    Ok(Client {
        channel: channel(p).await?,
        token,
    })
}

fn ts(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn is_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

/// A get-by-id-or-name request; names of users and projects live in `domain`.
fn by(name_or_id: &str, domain: &str) -> pb::GetRequest {
    if is_id(name_or_id) {
        pb::GetRequest {
            id: name_or_id.into(),
            ..Default::default()
        }
    } else {
        pb::GetRequest {
            name: name_or_id.into(),
            domain_name: domain.into(),
            ..Default::default()
        }
    }
}

fn del(name_or_id: &str, domain: &str) -> pb::DeleteRequest {
    let g = by(name_or_id, domain);
    pb::DeleteRequest {
        id: g.id,
        name: g.name,
        domain_id: g.domain_id,
        domain_name: g.domain_name,
    }
}

fn claims_rows(c: &pb::TokenClaims, token: Option<&str>) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    if let Some(t) = token {
        v.push(("token", t.to_string()));
    }
    v.extend([
        ("user", format!("{} ({})", c.user_name, c.user_id)),
        (
            "scope",
            if !c.project_id.is_empty() {
                format!("project {} ({})", c.project_name, c.project_id)
            } else if !c.domain_id.is_empty() {
                format!("domain {}", c.domain_id)
            } else if c.system {
                "system".into()
            } else {
                "unscoped".into()
            },
        ),
        ("roles", c.roles.join(",")),
        ("issued_at", ts(c.issued_at)),
        ("expires_at", ts(c.expires_at)),
        ("audit_ids", c.audit_ids.join(",")),
        ("key_id", c.key_id.clone()),
    ]);
    v
}

// ------------------------------------------------------------- commands

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a token with the profile's credentials and print it.
    Issue,
    /// Revoke a token, or every token of an audit chain.
    Revoke {
        token: Option<String>,
        #[arg(long, conflicts_with = "token")]
        audit_id: Option<String>,
    },
    /// Show what a token says, if it is valid.
    Validate { token: String },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// List the signing keys' public halves.
    List,
    /// Promote the staged key to primary and stage a new one.
    Rotate,
}

#[derive(Subcommand)]
pub enum UserCmd {
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Show {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, env = "CIRRUS_NEW_PASSWORD")]
        password: Option<String>,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long)]
        disable: bool,
    },
    Set {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long)]
        enable: bool,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        email: Option<String>,
    },
    Delete {
        user: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
}

#[derive(Subcommand)]
pub enum ProjectCmd {
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Show {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        disable: bool,
    },
    Set {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
        #[arg(long)]
        enable: bool,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
    },
    Delete {
        project: String,
        #[arg(long, default_value = "Default")]
        domain: String,
    },
}

#[derive(Subcommand)]
pub enum DomainCmd {
    List,
    Show {
        domain: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Set {
        domain: String,
        #[arg(long)]
        enable: bool,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
    },
    Delete {
        domain: String,
    },
}

#[derive(Args)]
pub struct AssignmentArgs {
    /// Role name or id.
    role: String,
    #[arg(long)]
    user: String,
    #[arg(long, default_value = "Default")]
    user_domain: String,
    #[arg(long, conflicts_with_all = ["domain", "system"])]
    project: Option<String>,
    #[arg(long, default_value = "Default")]
    project_domain: String,
    #[arg(long, conflicts_with = "system")]
    domain: Option<String>,
    #[arg(long)]
    system: bool,
}

#[derive(Subcommand)]
pub enum RoleCmd {
    List,
    Show {
        role: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        role: String,
    },
    /// Give a user a role on a project, a domain or the system.
    Add(AssignmentArgs),
    /// Take a role away.
    Remove(AssignmentArgs),
    /// List role assignments.
    Assignments {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    List,
    Show {
        service: String,
    },
    Create {
        name: String,
        #[arg(long = "type")]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        service: String,
    },
}

#[derive(Subcommand)]
pub enum EndpointCmd {
    List {
        #[arg(long)]
        service: Option<String>,
    },
    Show {
        endpoint: String,
    },
    Create {
        service: String,
        /// public, internal or admin.
        interface: String,
        url: String,
        #[arg(long, default_value = "RegionOne")]
        region: String,
    },
    Delete {
        endpoint: String,
    },
}

fn interface(s: &str) -> anyhow::Result<pb::Interface> {
    Ok(match s {
        "public" => pb::Interface::Public,
        "internal" => pb::Interface::Internal,
        "admin" => pb::Interface::Admin,
        other => bail!("interface must be public, internal or admin, not {other:?}"),
    })
}

fn interface_name(i: i32) -> String {
    match pb::Interface::try_from(i) {
        Ok(pb::Interface::Public) => "public",
        Ok(pb::Interface::Internal) => "internal",
        Ok(pb::Interface::Admin) => "admin",
        _ => "?",
    }
    .into()
}

fn toggle(enable: bool, disable: bool) -> Option<bool> {
    match (enable, disable) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn user_row(u: &pb::User) -> Vec<String> {
    vec![
        u.id.clone(),
        u.name.clone(),
        u.domain_id.clone(),
        u.enabled.to_string(),
        u.email.clone(),
        ts(u.locked_until),
    ]
}
const USER_COLS: [&str; 6] = [
    "ID",
    "Name",
    "Domain ID",
    "Enabled",
    "Email",
    "Locked Until",
];

fn project_row(p: &pb::Project) -> Vec<String> {
    vec![
        p.id.clone(),
        p.name.clone(),
        p.domain_id.clone(),
        p.enabled.to_string(),
        p.description.clone(),
    ]
}
const PROJECT_COLS: [&str; 5] = ["ID", "Name", "Domain ID", "Enabled", "Description"];

fn domain_row(d: &pb::Domain) -> Vec<String> {
    vec![
        d.id.clone(),
        d.name.clone(),
        d.enabled.to_string(),
        d.description.clone(),
    ]
}
const DOMAIN_COLS: [&str; 4] = ["ID", "Name", "Enabled", "Description"];

fn endpoint_row(e: &pb::Endpoint) -> Vec<String> {
    vec![
        e.id.clone(),
        e.service_id.clone(),
        interface_name(e.interface),
        e.region.clone(),
        e.url.clone(),
        e.enabled.to_string(),
    ]
}
const ENDPOINT_COLS: [&str; 6] = ["ID", "Service ID", "Interface", "Region", "URL", "Enabled"];

fn print_list<T>(cols: &[&'static str], items: &[T], row: fn(&T) -> Vec<String>, f: Format) {
    let mut r = Rows::new(cols);
    for i in items {
        r.push(row(i));
    }
    r.print_list(f);
}

fn print_one<T>(cols: &[&'static str], item: &T, row: fn(&T) -> Vec<String>, f: Format) {
    let mut r = Rows::new(cols);
    r.push(row(item));
    r.print_one(f);
}

pub async fn token(
    cmd: TokenCmd,
    p: &Profile,
    path: Option<&Path>,
    f: Format,
) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Issue => {
            let issued = login(p, path).await?;
            one(
                &claims_rows(&issued.claims.unwrap_or_default(), Some(&issued.token)),
                f,
            );
        }
        TokenCmd::Revoke { token, audit_id } => {
            let c = client(p, path).await?;
            let target = match (token, audit_id) {
                (Some(t), None) => pb::revoke_token_request::Target::Token(t),
                (None, Some(a)) => pb::revoke_token_request::Target::AuditId(a),
                _ => bail!("give a token or --audit-id"),
            };
            c.tokens()
                .revoke_token(c.req(pb::RevokeTokenRequest {
                    target: Some(target),
                }))
                .await?;
            println!("revoked");
        }
        TokenCmd::Validate { token } => {
            let c = client(p, path).await?;
            let v = c
                .tokens()
                .validate_token(c.req(pb::ValidateTokenRequest { token }))
                .await?
                .into_inner();
            one(&claims_rows(&v.claims.unwrap_or_default(), None), f);
        }
    }
    Ok(())
}

pub async fn key(cmd: KeyCmd, p: &Profile, path: Option<&Path>, f: Format) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    let keys = match cmd {
        KeyCmd::List => {
            c.tokens()
                .list_signing_keys(c.req(pb::ListSigningKeysRequest {}))
                .await?
                .into_inner()
                .keys
        }
        KeyCmd::Rotate => {
            c.tokens()
                .rotate_keys(c.req(pb::RotateKeysRequest {}))
                .await?
                .into_inner()
                .keys
        }
    };
    let mut r = Rows::new(&["Key ID", "State"]);
    for k in keys {
        let state = pb::KeyState::try_from(k.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        r.push(vec![
            k.key_id,
            state.trim_start_matches("KEY_STATE_").to_lowercase(),
        ]);
    }
    r.print_list(f);
    Ok(())
}

pub async fn user(cmd: UserCmd, p: &Profile, path: Option<&Path>, f: Format) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    match cmd {
        UserCmd::List { domain } => {
            let domain_id = match domain {
                Some(d) => {
                    c.resources()
                        .get_domain(c.req(by(&d, "")))
                        .await?
                        .into_inner()
                        .id
                }
                None => String::new(),
            };
            let users = c
                .users()
                .list_users(c.req(pb::ListUsersRequest { domain_id }))
                .await?
                .into_inner()
                .users;
            print_list(&USER_COLS, &users, user_row, f);
        }
        UserCmd::Show { user, domain } => {
            let u = c
                .users()
                .get_user(c.req(by(&user, &domain)))
                .await?
                .into_inner();
            print_one(&USER_COLS, &u, user_row, f);
        }
        UserCmd::Create {
            name,
            password,
            email,
            description,
            domain,
            disable,
        } => {
            let u = c
                .users()
                .create_user(c.req(pb::CreateUserRequest {
                    name,
                    domain_name: domain,
                    password: password.unwrap_or_default(),
                    email,
                    description,
                    enabled: Some(!disable),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            print_one(&USER_COLS, &u, user_row, f);
        }
        UserCmd::Set {
            user,
            domain,
            enable,
            disable,
            password,
            email,
        } => {
            let id = c
                .users()
                .get_user(c.req(by(&user, &domain)))
                .await?
                .into_inner()
                .id;
            let u = c
                .users()
                .update_user(c.req(pb::UpdateUserRequest {
                    id,
                    enabled: toggle(enable, disable),
                    password,
                    email,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            print_one(&USER_COLS, &u, user_row, f);
        }
        UserCmd::Delete { user, domain } => {
            c.users().delete_user(c.req(del(&user, &domain))).await?;
            println!("deleted user {user}");
        }
    }
    Ok(())
}

pub async fn project(
    cmd: ProjectCmd,
    p: &Profile,
    path: Option<&Path>,
    f: Format,
) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    match cmd {
        ProjectCmd::List { domain } => {
            let domain_id = match domain {
                Some(d) => {
                    c.resources()
                        .get_domain(c.req(by(&d, "")))
                        .await?
                        .into_inner()
                        .id
                }
                None => String::new(),
            };
            let list = c
                .resources()
                .list_projects(c.req(pb::ListProjectsRequest {
                    domain_id,
                    ..Default::default()
                }))
                .await?
                .into_inner()
                .projects;
            print_list(&PROJECT_COLS, &list, project_row, f);
        }
        ProjectCmd::Show { project, domain } => {
            let x = c
                .resources()
                .get_project(c.req(by(&project, &domain)))
                .await?
                .into_inner();
            print_one(&PROJECT_COLS, &x, project_row, f);
        }
        ProjectCmd::Create {
            name,
            domain,
            description,
            disable,
        } => {
            let x = c
                .resources()
                .create_project(c.req(pb::CreateProjectRequest {
                    name,
                    domain_name: domain,
                    description,
                    enabled: Some(!disable),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            print_one(&PROJECT_COLS, &x, project_row, f);
        }
        ProjectCmd::Set {
            project,
            domain,
            enable,
            disable,
        } => {
            let id = c
                .resources()
                .get_project(c.req(by(&project, &domain)))
                .await?
                .into_inner()
                .id;
            let x = c
                .resources()
                .update_project(c.req(pb::UpdateProjectRequest {
                    id,
                    enabled: toggle(enable, disable),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            print_one(&PROJECT_COLS, &x, project_row, f);
        }
        ProjectCmd::Delete { project, domain } => {
            c.resources()
                .delete_project(c.req(del(&project, &domain)))
                .await?;
            println!("deleted project {project}");
        }
    }
    Ok(())
}

pub async fn domain(
    cmd: DomainCmd,
    p: &Profile,
    path: Option<&Path>,
    f: Format,
) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    match cmd {
        DomainCmd::List => {
            let list = c
                .resources()
                .list_domains(c.req(pb::ListRequest {}))
                .await?
                .into_inner()
                .domains;
            print_list(&DOMAIN_COLS, &list, domain_row, f);
        }
        DomainCmd::Show { domain } => {
            let d = c
                .resources()
                .get_domain(c.req(by(&domain, "")))
                .await?
                .into_inner();
            print_one(&DOMAIN_COLS, &d, domain_row, f);
        }
        DomainCmd::Create { name, description } => {
            let d = c
                .resources()
                .create_domain(c.req(pb::CreateDomainRequest {
                    name,
                    description,
                    enabled: None,
                }))
                .await?
                .into_inner();
            print_one(&DOMAIN_COLS, &d, domain_row, f);
        }
        DomainCmd::Set {
            domain,
            enable,
            disable,
        } => {
            let id = c
                .resources()
                .get_domain(c.req(by(&domain, "")))
                .await?
                .into_inner()
                .id;
            let d = c
                .resources()
                .update_domain(c.req(pb::UpdateDomainRequest {
                    id,
                    enabled: toggle(enable, disable),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            print_one(&DOMAIN_COLS, &d, domain_row, f);
        }
        DomainCmd::Delete { domain } => {
            c.resources().delete_domain(c.req(del(&domain, ""))).await?;
            println!("deleted domain {domain}");
        }
    }
    Ok(())
}

async fn assignment(c: &Client, a: AssignmentArgs) -> anyhow::Result<pb::RoleAssignment> {
    let user_id = c
        .users()
        .get_user(c.req(by(&a.user, &a.user_domain)))
        .await?
        .into_inner()
        .id;
    let mut out = pb::RoleAssignment {
        role: a.role,
        user_id,
        ..Default::default()
    };
    if let Some(p) = a.project {
        out.project_id = c
            .resources()
            .get_project(c.req(by(&p, &a.project_domain)))
            .await?
            .into_inner()
            .id;
    } else if let Some(d) = a.domain {
        out.domain_id = c
            .resources()
            .get_domain(c.req(by(&d, "")))
            .await?
            .into_inner()
            .id;
    } else if a.system {
        out.system = true;
    } else {
        bail!("give --project, --domain or --system");
    }
    Ok(out)
}

pub async fn role(cmd: RoleCmd, p: &Profile, path: Option<&Path>, f: Format) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    let role_row = |r: &pb::Role| vec![r.id.clone(), r.name.clone(), r.description.clone()];
    match cmd {
        RoleCmd::List => {
            let roles = c
                .roles()
                .list_roles(c.req(pb::ListRequest {}))
                .await?
                .into_inner()
                .roles;
            let mut rows = Rows::new(&["ID", "Name", "Description"]);
            roles.iter().for_each(|r| rows.push(role_row(r)));
            rows.print_list(f);
        }
        RoleCmd::Show { role } => {
            let r = c.roles().get_role(c.req(by(&role, ""))).await?.into_inner();
            let mut rows = Rows::new(&["ID", "Name", "Description"]);
            rows.push(role_row(&r));
            rows.print_one(f);
        }
        RoleCmd::Create { name, description } => {
            let r = c
                .roles()
                .create_role(c.req(pb::CreateRoleRequest { name, description }))
                .await?
                .into_inner();
            let mut rows = Rows::new(&["ID", "Name", "Description"]);
            rows.push(role_row(&r));
            rows.print_one(f);
        }
        RoleCmd::Delete { role } => {
            c.roles().delete_role(c.req(del(&role, ""))).await?;
            println!("deleted role {role}");
        }
        RoleCmd::Add(a) => {
            let a = assignment(&c, a).await?;
            c.roles().assign_role(c.req(a)).await?;
            println!("role added");
        }
        RoleCmd::Remove(a) => {
            let a = assignment(&c, a).await?;
            c.roles().unassign_role(c.req(a)).await?;
            println!("role removed");
        }
        RoleCmd::Assignments { user, project } => {
            let user_id = match user {
                Some(u) => {
                    c.users()
                        .get_user(c.req(by(&u, "Default")))
                        .await?
                        .into_inner()
                        .id
                }
                None => String::new(),
            };
            let project_id = match project {
                Some(x) => {
                    c.resources()
                        .get_project(c.req(by(&x, "Default")))
                        .await?
                        .into_inner()
                        .id
                }
                None => String::new(),
            };
            let list = c
                .roles()
                .list_role_assignments(c.req(pb::ListRoleAssignmentsRequest {
                    user_id,
                    project_id,
                    ..Default::default()
                }))
                .await?
                .into_inner()
                .assignments;
            let mut rows = Rows::new(&["Role", "User ID", "Project ID", "Domain ID", "System"]);
            for a in list {
                rows.push(vec![
                    a.role,
                    a.user_id,
                    a.project_id,
                    a.domain_id,
                    a.system.to_string(),
                ]);
            }
            rows.print_list(f);
        }
    }
    Ok(())
}

pub async fn service(
    cmd: ServiceCmd,
    p: &Profile,
    path: Option<&Path>,
    f: Format,
) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    let cols = ["ID", "Name", "Type", "Enabled", "Description"];
    let row = |s: &pb::Service| {
        vec![
            s.id.clone(),
            s.name.clone(),
            s.r#type.clone(),
            s.enabled.to_string(),
            s.description.clone(),
        ]
    };
    match cmd {
        ServiceCmd::List => {
            let list = c
                .catalog()
                .list_services(c.req(pb::ListRequest {}))
                .await?
                .into_inner()
                .services;
            let mut rows = Rows::new(&cols);
            list.iter().for_each(|s| rows.push(row(s)));
            rows.print_list(f);
        }
        ServiceCmd::Show { service } => {
            let list = c
                .catalog()
                .list_services(c.req(pb::ListRequest {}))
                .await?
                .into_inner()
                .services;
            let s = list
                .iter()
                .find(|s| s.id == service || s.name == service)
                .with_context(|| format!("NOT_FOUND: service {service:?} not found"))?;
            let mut rows = Rows::new(&cols);
            rows.push(row(s));
            rows.print_one(f);
        }
        ServiceCmd::Create {
            name,
            kind,
            description,
        } => {
            let s = c
                .catalog()
                .create_service(c.req(pb::CreateServiceRequest {
                    name,
                    r#type: kind,
                    description,
                    enabled: None,
                }))
                .await?
                .into_inner();
            let mut rows = Rows::new(&cols);
            rows.push(row(&s));
            rows.print_one(f);
        }
        ServiceCmd::Delete { service } => {
            c.catalog().delete_service(c.req(del(&service, ""))).await?;
            println!("deleted service {service}");
        }
    }
    Ok(())
}

pub async fn endpoint(
    cmd: EndpointCmd,
    p: &Profile,
    path: Option<&Path>,
    f: Format,
) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    match cmd {
        EndpointCmd::List { service } => {
            let service_id = match service {
                Some(s) if is_id(&s) => s,
                Some(s) => {
                    let list = c
                        .catalog()
                        .list_services(c.req(pb::ListRequest {}))
                        .await?
                        .into_inner()
                        .services;
                    list.into_iter()
                        .find(|x| x.name == s)
                        .with_context(|| format!("NOT_FOUND: service {s:?} not found"))?
                        .id
                }
                None => String::new(),
            };
            let list = c
                .catalog()
                .list_endpoints(c.req(pb::ListEndpointsRequest {
                    service_id,
                    interface: 0,
                }))
                .await?
                .into_inner()
                .endpoints;
            print_list(&ENDPOINT_COLS, &list, endpoint_row, f);
        }
        EndpointCmd::Show { endpoint } => {
            let list = c
                .catalog()
                .list_endpoints(c.req(pb::ListEndpointsRequest::default()))
                .await?
                .into_inner()
                .endpoints;
            let e = list
                .iter()
                .find(|e| e.id == endpoint)
                .with_context(|| format!("NOT_FOUND: endpoint {endpoint:?} not found"))?;
            print_one(&ENDPOINT_COLS, e, endpoint_row, f);
        }
        EndpointCmd::Create {
            service,
            interface: i,
            url,
            region,
        } => {
            let e = c
                .catalog()
                .create_endpoint(c.req(pb::CreateEndpointRequest {
                    service,
                    interface: interface(&i)? as i32,
                    region,
                    url,
                    enabled: None,
                }))
                .await?
                .into_inner();
            print_one(&ENDPOINT_COLS, &e, endpoint_row, f);
        }
        EndpointCmd::Delete { endpoint } => {
            c.catalog()
                .delete_endpoint(c.req(pb::DeleteRequest {
                    id: endpoint.clone(),
                    ..Default::default()
                }))
                .await?;
            println!("deleted endpoint {endpoint}");
        }
    }
    Ok(())
}

pub async fn catalog(p: &Profile, path: Option<&Path>, f: Format) -> anyhow::Result<()> {
    let c = client(p, path).await?;
    let cat = c
        .catalog()
        .get_catalog(c.req(pb::GetCatalogRequest {}))
        .await?
        .into_inner()
        .catalog;
    let mut rows = Rows::new(&["Name", "Type", "Interface", "Region", "URL"]);
    for s in cat {
        for e in s.endpoints {
            rows.push(vec![
                s.name.clone(),
                s.r#type.clone(),
                interface_name(e.interface),
                e.region,
                e.url,
            ]);
        }
    }
    rows.print_list(f);
    Ok(())
}
