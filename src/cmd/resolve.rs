//! `amb-serf resolve ROLE`: the address of a live, healthy member that advertises a role.
//!
//! A candidate is `alive`, matches `role=ROLE` exactly (and every `--tag KEY=REGEX`), and is
//! not tagged `health=critical`. Its address is its `service` tag (`host:port`) when present,
//! else its gossip IP and the role's port (the role itself when numeric, else the first entry
//! of its `ports` tag). Candidates are ordered by name; without `--all` the first one is
//! printed. `--wait` blocks on the agent's membership events (no polling) until one appears.
//! With `--registry etcd://…` the candidates are the registrations under `--etcd-prefix`, and
//! `--wait` follows etcd's watch.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serf_agent::rpc::{MemberRow, MembersFilter};

use super::members::{parse_tag_filter, RpcArgs};
use super::UsageError;

/// Output format of `resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// `10.0.0.5`
    Host,
    /// `10.0.0.5:3306`
    #[value(name = "host:port")]
    HostPort,
    /// `DB_HOST=10.0.0.5 DB_PORT=3306`, for `eval` in an entrypoint.
    Env,
    /// `{"name": …, "host": …, "port": …, "addr": …, "tags": {…}}`
    Json,
}

/// Flags of `amb-serf resolve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The role to find: members tagged `role=ROLE`.
    role: Option<String>,

    /// Also (or instead) require tag KEY to match REGEX (anchored); repeatable.
    #[arg(long = "tag", value_name = "KEY=REGEX", value_parser = parse_tag_filter)]
    tags: Vec<(String, String)>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::HostPort)]
    format: Format,

    /// Variable prefix of `--format env`.
    #[arg(long, default_value = "DB")]
    env_prefix: String,

    /// Print every matching member, not just the first.
    #[arg(long)]
    all: bool,

    /// Wait up to this long for a member to appear (e.g. `10s`, `500ms`, `2m`).
    #[arg(long, value_parser = crate::duration::parse)]
    wait: Option<Duration>,

    #[command(flatten)]
    rpc: RpcArgs,

    /// Serf (the default) or etcd.
    #[command(flatten)]
    registry: crate::registry::RegistryArgs,
}

/// Where to reach a member's service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Target {
    name: String,
    host: String,
    port: Option<u16>,
    addr: Option<String>,
    tags: BTreeMap<String, String>,
}

/// The service address of `member` (see the module docs): the rule consumers share,
/// [`registrar::targets::dial_address`].
pub(crate) fn target(member: &MemberRow) -> Target {
    use registrar::targets::{dial_address, Dial};
    let (host, port) = match dial_address(member.addr, &member.tags) {
        Some(Dial::Addr(addr)) => (addr.ip().to_string(), Some(addr.port())),
        Some(Dial::Host(host, port)) => (host, Some(port)),
        None => (member.addr.to_string(), None),
    };
    let addr = port.map(|port| {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    });
    Target {
        name: member.name.clone(),
        host,
        port,
        addr,
        tags: member.tags.clone(),
    }
}

/// Live, healthy members among `members`, by name.
pub(crate) fn candidates(mut members: Vec<MemberRow>) -> Vec<MemberRow> {
    members.retain(|member| {
        member.status == "alive"
            && member.tags.get("health").map(String::as_str) != Some("critical")
    });
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members
}

fn shell_quote(value: &str) -> String {
    let safe = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:/[]@%+,".contains(c));
    if safe && !value.is_empty() {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

/// Renders the chosen targets (one, or all with `--all`).
pub(crate) fn render(
    targets: &[Target],
    format: Format,
    prefix: &str,
    all: bool,
) -> Result<String, String> {
    let missing_port = |target: &Target| {
        format!(
            "member {} advertises no port (no `service` tag, the role is not a port number and \
             it has no `ports` tag); use --format host",
            target.name
        )
    };
    let shown = if all { targets } else { &targets[..1] };
    Ok(match format {
        Format::Host => shown
            .iter()
            .map(|target| target.host.clone())
            .collect::<Vec<_>>()
            .join("\n"),
        Format::HostPort => shown
            .iter()
            .map(|target| target.addr.clone().ok_or_else(|| missing_port(target)))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        Format::Env => {
            let first = &shown[0];
            let mut line = format!("{prefix}_HOST={}", shell_quote(&first.host));
            if let Some(port) = first.port {
                line.push_str(&format!(" {prefix}_PORT={port}"));
            }
            if all {
                let addrs: Vec<String> = shown
                    .iter()
                    .map(|target| target.addr.clone().unwrap_or_else(|| target.host.clone()))
                    .collect();
                line.push_str(&format!(
                    " {prefix}_ADDRS={}",
                    shell_quote(&addrs.join(","))
                ));
            }
            line
        }
        Format::Json => {
            let value = if all {
                serde_json::to_value(shown)
            } else {
                serde_json::to_value(&shown[0])
            };
            value.expect("plain structs always serialize").to_string()
        }
    })
}

fn valid_prefix(prefix: &str) -> bool {
    let mut chars = prefix.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.role.is_none() && args.tags.is_empty() {
        return Err(UsageError("give a ROLE or at least one --tag KEY=REGEX".to_owned()).into());
    }
    if !valid_prefix(&args.env_prefix) {
        return Err(UsageError(format!(
            "--env-prefix {:?} is not a shell variable name",
            args.env_prefix
        ))
        .into());
    }
    let mut tags: BTreeMap<String, String> = args.tags.iter().cloned().collect();
    if let Some(role) = &args.role {
        tags.insert("role".to_owned(), regex::escape(role));
    }
    let filter = MembersFilter {
        tags,
        ..MembersFilter::default()
    };
    let local_filter = serf_agent::rpc::filter::MemberFilter::new(&filter.tags, "", "")
        .map_err(|error| UsageError(error.to_string()))?;
    let wanted = match (&args.role, args.tags.is_empty()) {
        (Some(role), true) => format!("role={role}"),
        (Some(role), false) => format!("role={role} and the --tag filters"),
        (None, _) => "the --tag filters".to_owned(),
    };
    if let crate::registry::Registry::Etcd(etcd) =
        args.registry.registry(crate::environment::vars())?
    {
        return resolve_etcd(&args, &etcd, &local_filter, &wanted).await;
    }
    let session = args.rpc.connect(args.wait).await?;
    let result = resolve(&args, &session.client, &filter, &wanted).await;
    session.close().await;
    result
}

async fn resolve(
    args: &Args,
    client: &serf_agent::rpc::Client,
    filter: &MembersFilter,
    wanted: &str,
) -> anyhow::Result<()> {
    let found = match args.wait {
        None => candidates(client.members_filtered(filter).await?),
        Some(wait) => {
            // Subscribe before looking, so a member joining in between is not missed.
            let mut events = client
                .stream("member-join,member-leave,member-failed,member-update,member-reap")
                .await?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let found = candidates(client.members_filtered(filter).await?);
                if !found.is_empty() {
                    break found;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break Vec::new(),
                    event = events.recv() => match event {
                        Some(event) => { event?; }
                        None => anyhow::bail!(
                            "the Serf agent at {} ended the event stream while waiting",
                            client.addr()
                        ),
                    },
                }
            }
        }
    };
    if found.is_empty() {
        let waited = args
            .wait
            .map(|wait| format!(" after waiting {wait:?}"))
            .unwrap_or_default();
        anyhow::bail!(
            "no live, healthy member advertises {wanted}{waited} (asked the Serf agent at {})",
            client.addr()
        );
    }
    let targets: Vec<Target> = found.iter().map(target).collect();
    let text =
        render(&targets, args.format, &args.env_prefix, args.all).map_err(anyhow::Error::msg)?;
    println!("{text}");
    Ok(())
}

/// `resolve` over etcd: the same candidates and output, from the registrations under the
/// prefix; `--wait` follows etcd's watch until one appears.
async fn resolve_etcd(
    args: &Args,
    etcd: &registrar::registry::Etcd,
    filter: &serf_agent::rpc::filter::MemberFilter,
    wanted: &str,
) -> anyhow::Result<()> {
    use crate::registry;
    use registrar::registry::{member_row, View};
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut view = View::new(&etcd.discovery(shutdown));
    let found = |members: Vec<serf::serf::Member>| {
        let mut members: Vec<MemberRow> = members.into_iter().map(member_row).collect();
        members.retain(|member| filter.matches(member));
        candidates(members)
    };
    let listed = etcd
        .first(
            &mut view,
            args.wait
                .unwrap_or_default()
                .max(registry::FIRST_LIST_TIMEOUT),
        )
        .await?;
    let mut members = found(listed);
    if let (Some(wait), true) = (args.wait, members.is_empty()) {
        // Until a change brings a candidate, or `wait` is over.
        let _ = tokio::time::timeout(wait, async {
            while let Some(next) = view.next().await {
                members = found(next);
                if !members.is_empty() {
                    break;
                }
            }
        })
        .await;
    }
    if members.is_empty() {
        let waited = args
            .wait
            .map(|wait| format!(" after waiting {wait:?}"))
            .unwrap_or_default();
        anyhow::bail!(
            "no registration advertises {wanted}{waited} (looked under {} in etcd at {})",
            etcd.prefix.all(),
            etcd.client.endpoints()
        );
    }
    let targets: Vec<Target> = members.iter().map(target).collect();
    let text =
        render(&targets, args.format, &args.env_prefix, args.all).map_err(anyhow::Error::msg)?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, ip: &str, status: &str, tags: &[(&str, &str)]) -> MemberRow {
        MemberRow {
            name: name.into(),
            addr: ip.parse().unwrap(),
            port: 7946,
            status: status.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..MemberRow::default()
        }
    }

    #[test]
    fn targets() {
        let check = |member: MemberRow, host: &str, port: Option<u16>| {
            let target = target(&member);
            assert_eq!(
                (target.host.as_str(), target.port),
                (host, port),
                "{member:?}"
            );
        };
        check(
            member("a", "10.0.0.5", "alive", &[("role", "3306")]),
            "10.0.0.5",
            Some(3306),
        );
        check(
            member(
                "a",
                "10.0.0.5",
                "alive",
                &[("role", "3306"), ("service", "192.168.1.2:33060")],
            ),
            "192.168.1.2",
            Some(33060),
        );
        check(
            member(
                "a",
                "10.0.0.5",
                "alive",
                &[("role", "web"), ("ports", "8080/tcp,8443/tcp")],
            ),
            "10.0.0.5",
            Some(8080),
        );
        check(
            member("a", "10.0.0.5", "alive", &[("role", "web")]),
            "10.0.0.5",
            None,
        );
        check(
            member("a", "::1", "alive", &[("service", "[::2]:80")]),
            "::2",
            Some(80),
        );
    }

    #[test]
    fn only_live_healthy_members_by_name() {
        let members = vec![
            member("c", "10.0.0.3", "alive", &[]),
            member("b", "10.0.0.2", "alive", &[("health", "critical")]),
            member("a", "10.0.0.1", "failed", &[]),
            member("d", "10.0.0.4", "alive", &[("health", "passing")]),
        ];
        let names: Vec<String> = candidates(members).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["c", "d"]);
    }

    #[test]
    fn renders_every_format() {
        let targets = vec![
            target(&member("a", "10.0.0.1", "alive", &[("role", "3306")])),
            target(&member("b", "::1", "alive", &[("role", "3306")])),
        ];
        let check = |format: Format, all: bool, expected: &str| {
            assert_eq!(
                render(&targets, format, "DB", all).unwrap(),
                expected,
                "{format:?} {all}"
            );
        };
        check(Format::Host, false, "10.0.0.1");
        check(Format::HostPort, false, "10.0.0.1:3306");
        check(Format::HostPort, true, "10.0.0.1:3306\n[::1]:3306");
        check(Format::Env, false, "DB_HOST=10.0.0.1 DB_PORT=3306");
        check(
            Format::Env,
            true,
            "DB_HOST=10.0.0.1 DB_PORT=3306 DB_ADDRS=10.0.0.1:3306,[::1]:3306",
        );
        check(
            Format::Json,
            false,
            r#"{"addr":"10.0.0.1:3306","host":"10.0.0.1","name":"a","port":3306,"tags":{"role":"3306"}}"#,
        );
        let no_port = vec![target(&member(
            "w",
            "10.0.0.9",
            "alive",
            &[("role", "web")],
        ))];
        assert!(render(&no_port, Format::HostPort, "DB", false)
            .unwrap_err()
            .contains("member w advertises no port"));
        assert_eq!(
            render(&no_port, Format::Env, "WEB", false).unwrap(),
            "WEB_HOST=10.0.0.9"
        );
    }
}
