//! `--dataplane`: which data path carries `run`'s forwards, and the driver of the kernel one
//! (`proxy::kernel`): install the table, follow health and re-resolved names, close and remove
//! it on shutdown.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy::kernel::{self, Count, Options, Rights, Rule, Ruleset};
use proxy::link_env::{ForwardSpec, Host};
use registrar::tags::Health;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cmd::UsageError;

/// How often targets given by name are looked up again (a target that changes IP is followed).
const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// Which data path forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Every forward through the process (splice, counters, drain).
    Userspace,
    /// nftables DNAT in this network namespace; needs CAP_NET_ADMIN and IPv4 forwarding.
    Kernel,
    /// kernel when the process may, else userspace.
    Auto,
}

/// The `--dataplane` flag.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DataplaneArgs {
    /// userspace, kernel (nftables NAT in this network namespace: needs --cap-add NET_ADMIN
    /// and --sysctl net.ipv4.ip_forward=1; exits 2 without them) or auto (kernel when
    /// allowed, else userspace; the choice is logged at start).
    #[arg(long, env = "AMB_DATAPLANE", value_enum, default_value_t = Mode::Auto, value_name = "MODE")]
    pub(crate) dataplane: Mode,
}

/// The running kernel path: its table and the task that keeps it current.
pub(crate) struct KernelPath {
    table: String,
    stop: CancellationToken,
    /// Ends with the rules last applied.
    task: JoinHandle<Vec<Rule>>,
    counters: Arc<Counters>,
    /// Set once [`KernelPath::remove`] ran; otherwise dropping removes the table (an error
    /// return after the table went in must not leave rules behind).
    removed: bool,
}

/// The table as installed, and the counts of the tables it replaced (replacing a table
/// resets its counters), for `/metrics`.
#[derive(Default)]
pub(crate) struct Counters(Mutex<Installed>);

#[derive(Default)]
struct Installed {
    current: Option<(Ruleset, Vec<Rule>)>,
    /// (packets, bytes) per forward and count, from replaced tables.
    carried: HashMap<(Rule, Count), (u64, u64)>,
}

impl Counters {
    /// Replaces the table with `ruleset` (built from `rules`), carrying the old counts over.
    /// Blocking.
    fn replace(&self, ruleset: Ruleset, rules: Vec<Rule>) -> Result<(), kernel::Error> {
        let mut installed = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let old = installed.current.as_ref().map(read).unwrap_or_default();
        kernel::apply(&ruleset)?;
        for (key, (packets, bytes)) in old {
            let carried = installed.carried.entry(key).or_default();
            carried.0 += packets;
            carried.1 += bytes;
        }
        installed.current = Some((ruleset, rules));
        Ok(())
    }

    /// Totals per forward and count since the start. Blocking (one netlink dump).
    fn totals(&self) -> BTreeMap<(String, Count), (u64, u64)> {
        let installed = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let now = installed.current.as_ref().map(read).unwrap_or_default();
        let mut totals = BTreeMap::new();
        for ((rule, count), (packets, bytes)) in installed.carried.iter().chain(&now) {
            let total: &mut (u64, u64) = totals.entry((labels(rule), *count)).or_default();
            total.0 += packets;
            total.1 += bytes;
        }
        totals
    }

    /// The Prometheus lines of the kernel path's counters.
    pub(crate) async fn render(self: Arc<Self>) -> String {
        let totals = tokio::task::spawn_blocking(move || self.totals())
            .await
            .unwrap_or_default();
        render(&totals)
    }
}

/// The counters of an installed table, keyed by forward and count (none if unreadable).
fn read((ruleset, rules): &(Ruleset, Vec<Rule>)) -> HashMap<(Rule, Count), (u64, u64)> {
    let mut counts = HashMap::new();
    for counter in kernel::counters(ruleset).unwrap_or_default() {
        let Some(rule) = rules.get(counter.forward) else {
            continue;
        };
        let total: &mut (u64, u64) = counts.entry((*rule, counter.count)).or_default();
        total.0 += counter.packets;
        total.1 += counter.bytes;
    }
    counts
}

/// A forward's Prometheus labels.
fn labels(rule: &Rule) -> String {
    let listen = rule.listen.unwrap_or(Ipv4Addr::UNSPECIFIED);
    format!(
        "protocol=\"{}\",listen=\"{listen}:{}\",target=\"{}\"",
        rule.protocol, rule.port, rule.target
    )
}

/// `amb_serf_kernel_*` in the Prometheus text format.
fn render(totals: &BTreeMap<(String, Count), (u64, u64)>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let select = |count: Count, bytes: bool, direction: Option<&str>| {
        totals
            .iter()
            .filter(|((_, c), _)| *c == count)
            .map(|((labels, _), (p, b))| {
                let labels = match direction {
                    Some(direction) => format!("{labels},direction=\"{direction}\""),
                    None => labels.clone(),
                };
                (labels, if bytes { *b } else { *p })
            })
            .collect::<Vec<_>>()
    };
    metric(
        "amb_serf_kernel_connections_total",
        "Connections (UDP flows) the kernel data path DNAT-ed, per forward.",
        select(Count::Connections, false, None),
    );
    for (name, help, bytes) in [
        ("amb_serf_kernel_packets_total", "Packets", false),
        ("amb_serf_kernel_bytes_total", "Bytes", true),
    ] {
        let mut samples = select(Count::ToUpstream, bytes, Some("to_upstream"));
        samples.extend(select(Count::ToClient, bytes, Some("to_client")));
        let help = format!("{help} the kernel data path carried, per forward and direction.");
        metric(name, &help, samples);
    }
    out
}

/// Chooses the data path and, for the kernel one, installs the table. `Ok(None)`: user space
/// carries everything. An error is a [`UsageError`] (`kernel` without the rights) or, under
/// `kernel`, a table the kernel refused.
pub(crate) async fn start(
    mode: Mode,
    instance: &str,
    bound: Vec<(ForwardSpec, SocketAddr)>,
    health: watch::Receiver<Health>,
) -> anyhow::Result<Option<KernelPath>> {
    let table = kernel::table_name(instance);
    let user_space = |why: &str| {
        info!(dataplane = "userspace", "data path: user space ({why})");
        // A table left by a crashed run under our name would steal our clients.
        if kernel::net_admin() {
            let _ = kernel::remove(&table);
        }
        Ok(None)
    };
    if mode == Mode::Userspace {
        return user_space("--dataplane userspace");
    }
    let rights = Rights::check();
    match mode {
        Mode::Kernel if !rights.sufficient() => {
            return Err(UsageError(format!("--dataplane kernel: {rights}")).into())
        }
        Mode::Auto if !rights.sufficient() => return user_space(&rights.to_string()),
        Mode::Userspace | Mode::Kernel | Mode::Auto => {}
    }
    let names = resolve_names(&bound).await;
    let (rules, skipped) = kernel::plan(&bound, |name| names.get(name).copied());
    for skip in &skipped {
        warn!(forward = %skip.forward, reason = %skip.reason, "forward stays in user space");
    }
    if rules.is_empty() {
        return user_space("no forward the kernel can carry");
    }
    let route_localnet = kernel::route_localnet();
    let ruleset = ruleset(&table, &rules, *health.borrow(), route_localnet);
    let counters = Arc::new(Counters::default());
    match apply(&counters, ruleset.clone(), rules.clone()).await {
        Ok(()) => {}
        Err(error) if mode == Mode::Auto => {
            warn!(
                dataplane = "userspace",
                %error,
                "data path: user space (the kernel refused the nftables table)"
            );
            return Ok(None);
        }
        Err(error) => return Err(anyhow::Error::new(error).context("--dataplane kernel")),
    }
    info!(
        dataplane = "kernel",
        %table,
        forwards = rules.len(),
        route_localnet,
        "data path: kernel (nftables NAT; the user-space listeners catch what it does not take)"
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(follow(
        bound,
        (rules, ruleset),
        route_localnet,
        health,
        stop.clone(),
        Arc::clone(&counters),
    ));
    Ok(Some(KernelPath {
        table,
        stop,
        task,
        counters,
        removed: false,
    }))
}

impl KernelPath {
    /// Its counters, for `/metrics`.
    pub(crate) fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// No new connection through the kernel from now on (the user-space listeners close at
    /// the same time); connections in flight continue on their conntrack entries.
    pub(crate) async fn stop_new(&mut self) {
        self.stop.cancel();
        if let Ok(rules) = (&mut self.task).await {
            // Only the source NAT stays, for the connections in flight.
            let closed = ruleset(&self.table, &rules, Health::Critical, false);
            if let Err(error) = apply(&self.counters, closed, rules).await {
                warn!(%error, "could not close the kernel path to new connections");
            }
        }
    }

    /// Deletes the table (after the drain: connections in flight need its NAT hooks).
    pub(crate) async fn remove(mut self) {
        let table = self.table.clone();
        match tokio::task::spawn_blocking(move || kernel::remove(&table)).await {
            Ok(Ok(())) => info!(table = %self.table, "removed the nftables table"),
            Ok(Err(error)) => warn!(%error, "could not remove the nftables table"),
            Err(error) => warn!(%error, "removing the nftables table panicked"),
        }
        self.removed = true;
    }
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        if !self.removed {
            self.task.abort();
            // One netlink round trip; this is an error path on the way out.
            match kernel::remove(&self.table) {
                Ok(()) => info!(table = %self.table, "removed the nftables table"),
                Err(error) => warn!(%error, "could not remove the nftables table"),
            }
        }
    }
}

/// Keeps the table current: DNAT only while the backend passes, names re-resolved. Returns
/// the rules last applied.
async fn follow(
    bound: Vec<(ForwardSpec, SocketAddr)>,
    (mut applied, mut current): (Vec<Rule>, Ruleset),
    route_localnet: bool,
    mut health: watch::Receiver<Health>,
    stop: CancellationToken,
    counters: Arc<Counters>,
) -> Vec<Rule> {
    let has_names = bound
        .iter()
        .any(|(spec, _)| matches!(spec.target.host, Host::Name(_)));
    let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
    resolve.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return applied,
            changed = health.changed() => if changed.is_err() { return applied },
            _ = resolve.tick(), if has_names => {}
        }
        let names = resolve_names(&bound).await;
        let (rules, _) = kernel::plan(&bound, |name| names.get(name).copied());
        let wanted = ruleset(&current.table, &rules, *health.borrow(), route_localnet);
        if wanted == current {
            continue;
        }
        match apply(&counters, wanted.clone(), rules.clone()).await {
            Ok(()) => {
                info!(
                    table = %current.table,
                    passing = *health.borrow() == Health::Passing,
                    rules = rules.len(),
                    "updated the nftables table"
                );
                current = wanted;
                applied = rules;
            }
            Err(error) => warn!(%error, "could not update the nftables table"),
        }
    }
}

fn ruleset(table: &str, rules: &[Rule], health: Health, route_localnet: bool) -> Ruleset {
    let options = Options {
        passing: health == Health::Passing,
        route_localnet,
    };
    Ruleset::build(table, rules, options)
}

async fn apply(
    counters: &Arc<Counters>,
    ruleset: Ruleset,
    rules: Vec<Rule>,
) -> Result<(), kernel::Error> {
    let counters = Arc::clone(counters);
    tokio::task::spawn_blocking(move || counters.replace(ruleset, rules))
        .await
        .unwrap_or_else(|panic| {
            Err(kernel::Error {
                step: "applying the nftables table".into(),
                source: std::io::Error::other(panic.to_string()),
            })
        })
}

/// The first IPv4 address of each target given by name (none: left out).
async fn resolve_names(bound: &[(ForwardSpec, SocketAddr)]) -> HashMap<String, Ipv4Addr> {
    let mut names = HashMap::new();
    for (spec, _) in bound {
        if let Host::Name(name) = &spec.target.host {
            if names.contains_key(name) {
                continue;
            }
            let found = tokio::net::lookup_host((name.as_str(), spec.target.port))
                .await
                .ok()
                .and_then(|mut addrs| {
                    addrs.find_map(|addr| match addr.ip() {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                });
            if let Some(ip) = found {
                names.insert(name.clone(), ip);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_per_forward_and_direction() {
        let rule = Rule {
            protocol: proxy::Protocol::Tcp,
            listen: None,
            port: 80,
            target: "10.0.0.5:8080".parse().unwrap(),
        };
        let forward = labels(&rule);
        assert_eq!(
            forward,
            "protocol=\"tcp\",listen=\"0.0.0.0:80\",target=\"10.0.0.5:8080\""
        );
        let totals = BTreeMap::from([
            ((forward.clone(), Count::Connections), (3, 180)),
            ((forward.clone(), Count::ToUpstream), (10, 1000)),
            ((forward.clone(), Count::ToClient), (20, 2000)),
        ]);
        let text = render(&totals);
        for line in [
            format!("amb_serf_kernel_connections_total{{{forward}}} 3"),
            format!("amb_serf_kernel_packets_total{{{forward},direction=\"to_upstream\"}} 10"),
            format!("amb_serf_kernel_packets_total{{{forward},direction=\"to_client\"}} 20"),
            format!("amb_serf_kernel_bytes_total{{{forward},direction=\"to_upstream\"}} 1000"),
            format!("amb_serf_kernel_bytes_total{{{forward},direction=\"to_client\"}} 2000"),
            "# TYPE amb_serf_kernel_bytes_total counter".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
