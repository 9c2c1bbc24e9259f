//! `amb-serf members`: the member table `serf members` prints, over the Serf RPC protocol.
//!
//! Text output is Go's `columnize` layout (two-space glue, the whole output trimmed) with tags
//! sorted; `--format json` is `serf members -format json`'s shape. Filters are evaluated by the
//! agent (`members-filtered`), exactly like `serf members`. `--watch` subscribes to membership
//! events (no polling): on a terminal it redraws the table on each change, otherwise it prints
//! the table once and then one line per change.
//!
//! With `--registry etcd://…` the rows are the registrations under `--etcd-prefix`
//! ([`registrar::registry::member_row`] over the etcd [`registrar::discovery::Discovery`]), filtered locally, and `--watch` follows etcd's watch.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};

use std::time::Duration;

use anyhow::Context;
use registrar::registry::{member_row, View};
use serde::Serialize;
use serf::serf::Member;
use serf_agent::rpc::filter::MemberFilter;
use serf_agent::rpc::{Client, MemberRow, MembersFilter, StreamEvent};

use super::client::columnize;
use super::UsageError;
use crate::member::{self, GossipArgs};
use crate::registry::{self, Registry, RegistryArgs};

/// How to reach the cluster (shared by `members` and `resolve`): an agent over RPC or, when
/// none answers and a seed is configured (a Serf link variable or `--join`), a short-lived
/// member of our own tagged `role=serf-members` (join mode, like `ctlc/serf-members`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RpcArgs {
    /// RPC address of the Serf agent (a Go `serf agent` or amb-serf) [default: SERF_RPC_ADDR,
    /// else 127.0.0.1:7373].
    #[arg(long, env = "AMB_RPC_ADDR", default_value_t = super::client::default_rpc_addr(), hide_default_value = true)]
    pub(crate) rpc_addr: String,

    /// RPC auth key of the agent, if it has one (`rpc_auth`).
    #[arg(long, env = "AMB_RPC_AUTH", hide_env_values = true)]
    pub(crate) rpc_auth: Option<String>,

    /// Join mode: how our own member joins when no agent answers at --rpc-addr.
    #[command(flatten)]
    pub(crate) gossip: GossipArgs,
}

/// How long join mode waits for the first successful join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long join mode's leave may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// An RPC client, and in join mode the member it talks to.
pub(crate) struct Session {
    pub(crate) client: Client,
    member: Option<member::LocalMember>,
}

impl Session {
    /// Leaves the cluster in join mode (peers see `left`); nothing otherwise.
    pub(crate) async fn close(self) {
        if let Some(member) = self.member {
            if let Err(error) = member.leave(LEAVE_TIMEOUT).await {
                tracing::warn!(error = %format!("{error:#}"), "leaving the cluster");
            }
            member.shutdown().await;
        }
    }
}

impl RpcArgs {
    /// Connects to the agent at `--rpc-addr` or, if none answers and a seed is configured,
    /// joins the cluster (waiting up to `at_least` or [`JOIN_TIMEOUT`]) and talks to our own
    /// member's RPC server: the rendering code is the same either way.
    pub(crate) async fn connect(&self, at_least: Option<Duration>) -> anyhow::Result<Session> {
        let error = match Client::connect(&self.rpc_addr, self.rpc_auth.as_deref()).await {
            Ok(client) => {
                return Ok(Session {
                    client,
                    member: None,
                })
            }
            Err(error @ serf_agent::rpc::Error::Connect { .. }) => error,
            Err(other) => return Err(other.into()),
        };
        let seeds = self.gossip.seeds(crate::environment::vars())?;
        if seeds.is_empty() {
            return Err(anyhow::anyhow!(
                "{error}; no seed to join either (no --join, no {link}_PORT_7946_TCP or {link}_NAME, \
                 no {alias} in /etc/hosts)",
                link = self.gossip.serf_link.to_uppercase(),
                alias = self.gossip.serf_link,
            ));
        }
        tracing::info!(rpc_addr = %self.rpc_addr, seeds = ?seeds, "no agent answers; joining the cluster");
        let mut gossip = self.gossip.clone();
        if gossip.node.is_none() {
            gossip.node = Some(format!(
                "{}-members-{}",
                gossip.node_name(),
                std::process::id()
            ));
        }
        let tags = BTreeMap::from([("role".to_owned(), "serf-members".to_owned())]);
        let member = member::start_joiner(&gossip, tags, seeds.clone()).await?;
        let timeout = at_least.unwrap_or_default().max(JOIN_TIMEOUT);
        if tokio::time::timeout(timeout, member.joined())
            .await
            .is_err()
        {
            member.shutdown().await;
            anyhow::bail!(
                "no agent answers at {} and no seed of {seeds:?} could be joined within {timeout:?}",
                self.rpc_addr
            );
        }
        let rpc_addr = member
            .rpc_addr()
            .expect("a joiner always runs an rpc server")
            .to_string();
        let client = Client::connect(&rpc_addr, None).await?;
        Ok(Session {
            client,
            member: Some(member),
        })
    }
}

/// Parses `KEY=REGEX` for `--tag`.
pub(crate) fn parse_tag_filter(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, regex)) if !key.is_empty() => Ok((key.to_owned(), regex.to_owned())),
        _ => Err(format!("{value:?} is not KEY=REGEX")),
    }
}

/// Output format of `members`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// The `serf members` table.
    Text,
    /// `serf members -format json`.
    Json,
}

/// Flags of `amb-serf members`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    rpc: RpcArgs,

    /// Serf (the default) or etcd.
    #[command(flatten)]
    registry: RegistryArgs,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// Only members whose tag KEY matches REGEX (anchored); repeatable.
    #[arg(long = "tag", value_name = "KEY=REGEX", value_parser = parse_tag_filter)]
    tags: Vec<(String, String)>,

    /// Only members whose status matches this regex (alive, leaving, left, failed).
    #[arg(long)]
    status: Option<String>,

    /// Only members whose name matches this regex.
    #[arg(long)]
    name: Option<String>,

    /// Deprecated in `serf`: the same as `--tag role=REGEX` (prints Go's warning).
    #[arg(long, value_name = "REGEX")]
    role: Option<String>,

    /// Add protocol versions to the text table.
    #[arg(long)]
    detailed: bool,

    /// Keep running and show every membership change (event-driven).
    #[arg(long)]
    watch: bool,
}

impl Args {
    fn filter(&self) -> MembersFilter {
        let role = self
            .role
            .iter()
            .map(|role| ("role".to_owned(), role.clone()));
        MembersFilter {
            tags: self.tags.iter().cloned().chain(role).collect(),
            status: self.status.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
        }
    }
}

/// One row of `serf members -format json`.
#[derive(Debug, Serialize)]
struct JsonMember<'a> {
    name: &'a str,
    addr: String,
    port: u16,
    tags: &'a BTreeMap<String, String>,
    status: &'a str,
    protocol: BTreeMap<&'static str, u8>,
}

#[derive(Debug, Serialize)]
struct JsonMembers<'a> {
    members: Option<Vec<JsonMember<'a>>>,
}

/// `serf members -format json` for `members` (sorted by name).
pub(crate) fn render_json(members: &[MemberRow]) -> String {
    let rows: Vec<JsonMember<'_>> = members
        .iter()
        .map(|member| JsonMember {
            name: &member.name,
            addr: member.socket_addr().to_string(),
            port: member.port,
            tags: &member.tags,
            status: &member.status,
            protocol: BTreeMap::from([
                ("min", member.delegate_min),
                ("max", member.delegate_max),
                ("version", member.delegate_cur),
            ]),
        })
        .collect();
    let document = JsonMembers {
        members: (!rows.is_empty()).then_some(rows),
    };
    serde_json::to_string_pretty(&document).expect("plain structs always serialize")
}

/// `k=v,k=v` with keys sorted.
pub(crate) fn tag_list(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `serf members` table for `members` (sorted by name).
pub(crate) fn render_table(members: &[MemberRow], detailed: bool) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|member| {
            let mut row = vec![
                member.name.clone(),
                member.socket_addr().to_string(),
                member.status.clone(),
                tag_list(&member.tags),
            ];
            if detailed {
                row.push(format!("Protocol Version: {}", member.delegate_cur));
                row.push(format!(
                    "Available Protocol Range: [{}, {}]",
                    member.delegate_min, member.delegate_max
                ));
            }
            row
        })
        .collect();
    columnize(&rows).trim().to_owned()
}

fn sorted(mut members: Vec<MemberRow>) -> Vec<MemberRow> {
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.role.is_some() {
        println!("Deprecation warning: 'Role' has been replaced with 'Tags'");
    }
    let filter = args.filter();
    // Check the regexes here, so a typo is a usage error rather than an agent error.
    let local_filter = MemberFilter::new(&filter.tags, &filter.status, &filter.name)
        .map_err(|error| UsageError(error.to_string()))?;
    if let Registry::Etcd(etcd) = args.registry.registry(crate::environment::vars())? {
        return etcd_members(&args, &etcd, &local_filter).await;
    }
    let session = args.rpc.connect(None).await?;
    let result = if args.watch {
        watch(&args, &session.client, &filter, &local_filter).await
    } else {
        print_once(&args, &session.client, &filter).await
    };
    session.close().await;
    result
}

async fn print_once(args: &Args, client: &Client, filter: &MembersFilter) -> anyhow::Result<()> {
    let members = sorted(client.members_filtered(filter).await?);
    let text = match args.format {
        Format::Text => render_table(&members, args.detailed),
        Format::Json => render_json(&members),
    };
    println!("{text}");
    Ok(())
}

async fn watch(
    args: &Args,
    client: &Client,
    filter: &MembersFilter,
    local_filter: &MemberFilter,
) -> anyhow::Result<()> {
    // Subscribe first, then list: no change between the two is missed.
    let mut events = client
        .stream("member-join,member-leave,member-failed,member-update,member-reap")
        .await?;
    let terminal = std::io::stdout().is_terminal();
    let draw = |members: &[MemberRow]| {
        let text = match args.format {
            Format::Text => render_table(members, args.detailed),
            Format::Json => render_json(members),
        };
        let mut stdout = std::io::stdout().lock();
        if terminal {
            // Home the cursor and clear the screen, then draw the whole table.
            let _ = write!(stdout, "\x1b[H\x1b[2J");
        }
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    };
    draw(&sorted(client.members_filtered(filter).await?));
    // Ctrl-C or `docker stop`: return, so that join mode leaves the cluster.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            event = events.recv() => event,
        };
        let Some(event) = event else {
            anyhow::bail!(
                "the Serf agent at {} ended the event stream (it left or stopped)",
                client.addr()
            );
        };
        let StreamEvent::Member { kind, members } =
            event.with_context(|| format!("watching the Serf agent at {}", client.addr()))?
        else {
            continue;
        };
        if terminal {
            draw(&sorted(client.members_filtered(filter).await?));
            continue;
        }
        let mut stdout = std::io::stdout().lock();
        for member in members.iter().filter(|member| local_filter.matches(member)) {
            let _ = writeln!(stdout, "{}", event_line(args.format, kind.as_str(), member));
        }
        let _ = stdout.flush();
    }
}

/// One membership change as `--watch` prints it when stdout is not a terminal: `kind name
/// addr status tags`, or a JSON object.
fn event_line(format: Format, kind: &str, member: &MemberRow) -> String {
    let line = match format {
        Format::Text => format!(
            "{kind} {} {} {} {}",
            member.name,
            member.socket_addr(),
            member.status,
            tag_list(&member.tags)
        ),
        Format::Json => serde_json::json!({
            "event": kind,
            "name": member.name,
            "addr": member.socket_addr().to_string(),
            "status": member.status,
            "tags": member.tags,
        })
        .to_string(),
    };
    line.trim_end().to_owned()
}

/// `members` over etcd: the registrations under the prefix as member rows (node, its address,
/// `alive`, its tags), filtered locally; `--watch` follows etcd's watch.
async fn etcd_members(
    args: &Args,
    etcd: &registrar::registry::Etcd,
    filter: &MemberFilter,
) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut view = View::new(&etcd.discovery(shutdown));
    let rows = |members: Vec<Member>| -> Vec<MemberRow> {
        let mut members: Vec<MemberRow> = members.into_iter().map(member_row).collect();
        members.retain(|member| filter.matches(member));
        sorted(members)
    };
    let render = |members: &[MemberRow]| match args.format {
        Format::Text => render_table(members, args.detailed),
        Format::Json => render_json(members),
    };
    let snapshot = etcd.first(&mut view, registry::FIRST_LIST_TIMEOUT).await?;
    let mut shown = rows(snapshot);
    println!("{}", render(&shown));
    if !args.watch {
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let snapshot = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            snapshot = view.next() => snapshot,
        };
        let Some(snapshot) = snapshot else {
            anyhow::bail!("the etcd watch stopped");
        };
        let next = rows(snapshot);
        let mut stdout = std::io::stdout().lock();
        if terminal {
            let _ = write!(stdout, "\x1b[H\x1b[2J");
            let _ = writeln!(stdout, "{}", render(&next));
        } else {
            for (kind, member) in membership_changes(&shown, &next) {
                let _ = writeln!(stdout, "{}", event_line(args.format, kind, member));
            }
        }
        let _ = stdout.flush();
        shown = next;
    }
}

/// What changed from `before` to `after`, as Serf event names: `member-join` for a new row,
/// `member-update` for a changed one, `member-leave` for one that is gone (with its last state).
fn membership_changes<'a>(
    before: &'a [MemberRow],
    after: &'a [MemberRow],
) -> Vec<(&'static str, &'a MemberRow)> {
    let old: BTreeMap<&str, &MemberRow> = before.iter().map(|m| (m.name.as_str(), m)).collect();
    let new: BTreeMap<&str, &MemberRow> = after.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut changes = Vec::new();
    for (name, member) in &new {
        match old.get(name) {
            None => changes.push(("member-join", *member)),
            Some(previous) if previous != member => changes.push(("member-update", *member)),
            Some(_) => {}
        }
    }
    for (name, member) in &old {
        if !new.contains_key(name) {
            changes.push(("member-leave", *member));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str, status: &str, tags: &[(&str, &str)]) -> MemberRow {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        MemberRow {
            name: name.into(),
            addr: addr.ip(),
            port: addr.port(),
            status: status.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            delegate_min: 2,
            delegate_max: 5,
            delegate_cur: 5,
            ..MemberRow::default()
        }
    }

    #[test]
    fn table_is_go_columnize() {
        let members = [
            member(
                "a",
                "127.0.0.1:7946",
                "alive",
                &[("role", "web"), ("dc", "x")],
            ),
            member("longer-name", "[::1]:7946", "failed", &[]),
        ];
        assert_eq!(
            render_table(&members, false),
            "a            127.0.0.1:7946  alive   dc=x,role=web\nlonger-name  [::1]:7946      failed"
        );
        assert_eq!(
            render_table(&members[..1], true),
            "a  127.0.0.1:7946  alive  dc=x,role=web  Protocol Version: 5  Available Protocol Range: [2, 5]"
        );
        assert_eq!(render_table(&[], false), "");
    }

    #[test]
    fn json_is_serf_shape() {
        let members = [member("a", "127.0.0.1:7946", "alive", &[("role", "web")])];
        assert_eq!(
            render_json(&members),
            r#"{
  "members": [
    {
      "name": "a",
      "addr": "127.0.0.1:7946",
      "port": 7946,
      "tags": {
        "role": "web"
      },
      "status": "alive",
      "protocol": {
        "max": 5,
        "min": 2,
        "version": 5
      }
    }
  ]
}"#
        );
        assert_eq!(render_json(&[]), "{\n  \"members\": null\n}");
    }

    #[test]
    fn tag_filters_parse() {
        assert_eq!(
            parse_tag_filter("role=web|db"),
            Ok(("role".into(), "web|db".into()))
        );
        assert_eq!(
            parse_tag_filter("role=a=b"),
            Ok(("role".into(), "a=b".into()))
        );
        assert!(parse_tag_filter("role").is_err());
        assert!(parse_tag_filter("=x").is_err());
    }

    #[test]
    fn membership_changes_between_snapshots() {
        let a = member("a", "10.0.0.1:6379", "alive", &[("role", "6379")]);
        let b = member("b", "10.0.0.2:6379", "alive", &[("role", "6379")]);
        let b2 = member("b", "10.0.0.3:6379", "alive", &[("role", "6379")]);
        let c = member("c", "10.0.0.4:80", "alive", &[("role", "web")]);
        type Case<'a> = (Vec<MemberRow>, Vec<MemberRow>, &'a [(&'a str, &'a str)]);
        let cases: Vec<Case<'_>> = vec![
            (vec![], vec![], &[]),
            (vec![], vec![a.clone()], &[("member-join", "a")]),
            (
                vec![a.clone(), b.clone()],
                vec![b2, c],
                &[
                    ("member-update", "b"),
                    ("member-join", "c"),
                    ("member-leave", "a"),
                ],
            ),
            (vec![a.clone(), b.clone()], vec![a, b], &[]),
        ];
        for (before, after, expected) in cases {
            let got: Vec<(&str, &str)> = membership_changes(&before, &after)
                .into_iter()
                .map(|(kind, member)| (kind, member.name.as_str()))
                .collect();
            assert_eq!(got, expected, "{before:?} -> {after:?}");
        }
    }
}
