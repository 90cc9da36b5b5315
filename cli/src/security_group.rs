//! `cirrus security-group create|list|show|delete` and
//! `cirrus security-group rule create|delete` (network.v1 `Networks`).

use anyhow::bail;
use clap::Subcommand;
use proto::network::v1 as pb;

use crate::api::{Api, NETWORK, enum_name, pick};
use crate::common::is_id;
use crate::network::client;
use crate::output::{View, record};
use crate::session::Ctx;

#[derive(Subcommand)]
pub enum SecurityGroupCmd {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        /// Every project's (admin only).
        #[arg(long)]
        all_projects: bool,
    },
    Show {
        group: String,
    },
    Delete {
        group: String,
    },
    /// A group's rules.
    #[command(subcommand)]
    Rule(RuleCmd),
}

#[derive(Subcommand)]
pub enum RuleCmd {
    Create {
        /// The group (name or id).
        group: String,
        /// Outgoing traffic (default: incoming).
        #[arg(long)]
        egress: bool,
        /// tcp, udp, icmp or any.
        #[arg(long, default_value = "any")]
        protocol: String,
        /// A port or a range, e.g. 22 or 8000:8080 (tcp and udp only).
        #[arg(long)]
        dst_port: Option<String>,
        /// From (or to) this CIDR only.
        #[arg(long)]
        remote_ip: Option<String>,
        /// From (or to) this group's members only (name or id).
        #[arg(long, conflicts_with = "remote_ip")]
        remote_group: Option<String>,
    },
    Delete {
        /// The rule's id.
        rule: String,
    },
}

fn direction(d: i32) -> String {
    pb::Direction::try_from(d)
        .map(|d| enum_name(d.as_str_name(), "DIRECTION_"))
        .unwrap_or_default()
}

fn protocol(p: i32) -> String {
    pb::Protocol::try_from(p)
        .map(|p| enum_name(p.as_str_name(), "PROTOCOL_"))
        .unwrap_or_default()
}

fn ports(r: &pb::SecurityGroupRule) -> String {
    match (r.port_range_min, r.port_range_max) {
        (0, 0) => String::new(),
        (a, b) if a == b => a.to_string(),
        (a, b) => format!("{a}:{b}"),
    }
}

fn rule_line(r: &pb::SecurityGroupRule) -> String {
    let remote = if !r.remote_group_id.is_empty() {
        format!("group {}", r.remote_group_id)
    } else if !r.remote_ip_prefix.is_empty() {
        r.remote_ip_prefix.clone()
    } else {
        "any".into()
    };
    let p = ports(r);
    let p = if p.is_empty() {
        p
    } else {
        format!(" port {p}")
    };
    format!(
        "{} {}{p} {} (id {})",
        direction(r.direction),
        protocol(r.protocol),
        remote,
        r.id
    )
}

record!(pb::SecurityGroup, |g| {
    "ID": g.id, "Name": g.name, "Description": g.description, "Project ID": g.project_id,
    "Rules": g.rules.iter().map(rule_line).collect::<Vec<_>>().join("\n"),
    "Created At": g.created_at,
});

record!(pb::SecurityGroupRule, |r| {
    "ID": r.id, "Security Group ID": r.security_group_id, "Direction": direction(r.direction),
    "Protocol": protocol(r.protocol), "Port Range": ports(r),
    "Remote IP Prefix": r.remote_ip_prefix, "Remote Group ID": r.remote_group_id,
});

/// A group by id or name.
pub async fn find(api: &Api, group: &str) -> anyhow::Result<pb::SecurityGroup> {
    if is_id(group) {
        let r = api.req(pb::GetRequest { id: group.into() });
        return Ok(client(api).get_security_group(r).await?.into_inner());
    }
    let r = api.req(pb::ListRequest::default());
    let list = client(api)
        .list_security_groups(r)
        .await?
        .into_inner()
        .security_groups;
    pick("security group", group, list, |g| &g.id, |g| &g.name)
}

fn parse_protocol(p: &str) -> anyhow::Result<pb::Protocol> {
    Ok(match p {
        "tcp" => pb::Protocol::Tcp,
        "udp" => pb::Protocol::Udp,
        "icmp" => pb::Protocol::Icmp,
        "any" => pb::Protocol::Any,
        other => bail!("--protocol must be tcp, udp, icmp or any, not {other:?}"),
    })
}

fn parse_ports(p: Option<&str>) -> anyhow::Result<(u32, u32)> {
    let Some(p) = p else { return Ok((0, 0)) };
    let bad = || anyhow::anyhow!("--dst-port must be PORT or MIN:MAX, not {p:?}");
    let (a, b) = p.split_once(':').unwrap_or((p, p));
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

pub async fn run(cmd: SecurityGroupCmd, ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let api = Api::open(ctx, NETWORK).await?;
    let mut c = client(&api);
    match cmd {
        SecurityGroupCmd::Create { name, description } => {
            let r = api.req(pb::CreateSecurityGroupRequest { name, description });
            ctx.out.one(&c.create_security_group(r).await?.into_inner())
        }
        SecurityGroupCmd::List { all_projects } => {
            let r = api.req(pb::ListRequest { all_projects });
            let list = c.list_security_groups(r).await?.into_inner();
            ctx.out.print(View::list(&list.security_groups))
        }
        SecurityGroupCmd::Show { group } => ctx.out.one(&find(&api, &group).await?),
        SecurityGroupCmd::Delete { group } => {
            let id = find(&api, &group).await?.id;
            c.delete_security_group(api.req(pb::DeleteRequest { id }))
                .await?;
            ctx.out.done(&format!("deleted security group {group}"));
            Ok(())
        }
        SecurityGroupCmd::Rule(RuleCmd::Create {
            group,
            egress,
            protocol,
            dst_port,
            remote_ip,
            remote_group,
        }) => {
            let (port_range_min, port_range_max) = parse_ports(dst_port.as_deref())?;
            let remote_group_id = match remote_group {
                Some(g) => find(&api, &g).await?.id,
                None => String::new(),
            };
            let r = api.req(pb::CreateSecurityGroupRuleRequest {
                security_group_id: find(&api, &group).await?.id,
                direction: if egress {
                    pb::Direction::Egress
                } else {
                    pb::Direction::Ingress
                } as i32,
                ethertype: pb::IpVersion::IpVersion4 as i32,
                protocol: parse_protocol(&protocol)? as i32,
                port_range_min,
                port_range_max,
                remote_ip_prefix: remote_ip.unwrap_or_default(),
                remote_group_id,
            });
            ctx.out
                .one(&c.create_security_group_rule(r).await?.into_inner())
        }
        SecurityGroupCmd::Rule(RuleCmd::Delete { rule }) => {
            c.delete_security_group_rule(api.req(pb::DeleteRequest { id: rule.clone() }))
                .await?;
            ctx.out.done(&format!("deleted security group rule {rule}"));
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_ports(None).unwrap(), (0, 0));
        assert_eq!(parse_ports(Some("22")).unwrap(), (22, 22));
        assert_eq!(parse_ports(Some("8000:8080")).unwrap(), (8000, 8080));
        assert!(parse_ports(Some("ssh")).is_err());
    }
}
