//! The DNS metrics (issue 24): `dnsperf` against `amb-serf agent --dns-addr` and, in the same
//! run, against `dnsmasq` answering the same A records from a hosts file (the anchor).
//!
//! Like the cluster metrics, everything runs from one thread that first moves into a network
//! namespace of its own ([`procs::isolate_network`]). For each membership size `n`, the agent
//! (a release `amb-serf agent`, the DNS server measured) is joined by `n` native Serf members
//! running in this process (`serf_agent::member`, the member amb-serf runs, on a tokio runtime
//! of one worker thread, each on its own loopback address; 20 joins in flight, each to the agent
//! and to an earlier member; each member probes every 10 s instead of every second, while the
//! agent keeps the LAN defaults): real gossip, so the agent's zone is
//! the one live membership gives it. Member `i` is node `m<i>` with `role=<20000 + i/10>`: ten
//! providers per role. The queries are each member's node name and each member's role name (A),
//! so half of them answer ten records. `dnsmasq` gets the same names and addresses in a hosts
//! file. Both servers are measured while the members run, so both share the machine with the
//! same gossip; the agent's CPU includes its own gossip with `n` members.
//!
//! Before measuring, `dig` checks that both servers answer a role with its ten addresses and a
//! node with its address; a run where any answer is not NOERROR fails (lost queries are noted).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serf_agent::rpc::Client;

use crate::procs::{self, Group};
use crate::report::{median, number};

/// The port both servers answer on (each on its own address).
const DNS_PORT: u16 = 8600;
/// Serf's gossip and RPC ports (each member has its own address).
const GOSSIP_PORT: u16 = 7946;
const RPC_PORT: u16 = 7373;
/// Providers per role.
const PER_ROLE: usize = 10;
/// The first role (a port, as amb-serf's roles are).
const FIRST_ROLE: usize = 20_000;
/// Longest wait for the agent to list every member alive.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(180);

/// Sizes and durations of the DNS metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DnsPlan {
    pub(crate) reps: usize,
    /// Members beside the agent.
    pub(crate) sizes: &'static [usize],
    /// How long `dnsperf` sends queries to each server (`-l`).
    pub(crate) window: Duration,
}

/// A column: the server measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Server {
    AmbSerf,
    Dnsmasq,
}

impl Server {
    const ALL: [Self; 2] = [Self::AmbSerf, Self::Dnsmasq];

    fn name(self) -> &'static str {
        match self {
            Self::AmbSerf => "amb-serf",
            Self::Dnsmasq => "dnsmasq",
        }
    }
}

/// A row, per membership size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DnsMetric {
    Qps(usize),
    P50(usize),
    P99(usize),
    CpuPer1000(usize),
}

impl DnsMetric {
    fn label(self) -> String {
        match self {
            Self::Qps(n) => format!("10. DNS, {n} members: queries/s"),
            Self::P50(n) => format!("10. DNS, {n} members: latency p50 (µs)"),
            Self::P99(n) => format!("10. DNS, {n} members: latency p99 (µs)"),
            Self::CpuPer1000(n) => {
                format!("10. DNS, {n} members: server CPU per 1,000 queries (ms)")
            }
        }
    }
}

/// Every sample and failure of the DNS metrics.
pub(crate) struct DnsResults {
    rows: Vec<DnsMetric>,
    samples: BTreeMap<(DnsMetric, Server), Vec<f64>>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl DnsResults {
    /// The rows of `plan`, or none when the DNS metrics do not run.
    pub(crate) fn new(plan: &DnsPlan, runs: bool) -> Self {
        let rows = if runs {
            plan.sizes
                .iter()
                .flat_map(|&n| {
                    [
                        DnsMetric::Qps(n),
                        DnsMetric::P50(n),
                        DnsMetric::P99(n),
                        DnsMetric::CpuPer1000(n),
                    ]
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            rows,
            samples: BTreeMap::new(),
            failures: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn add(&mut self, server: Server, metric: DnsMetric, value: f64) {
        eprintln!("  {:<10} {:<56} {value:.2}", server.name(), metric.label());
        self.samples
            .entry((metric, server))
            .or_default()
            .push(value);
    }

    fn fail(&mut self, what: &str, error: anyhow::Error) {
        let line = format!("{what}: {error:#}");
        eprintln!("  FAILED {line}");
        self.failures.push(line);
    }

    fn note(&mut self, text: String) {
        eprintln!("  note: {text}");
        if !self.notes.contains(&text) {
            self.notes.push(text);
        }
    }

    pub(crate) fn failures(&self) -> &[String] {
        &self.failures
    }

    fn median(&self, metric: DnsMetric, server: Server) -> Option<f64> {
        median(self.samples.get(&(metric, server))?)
    }

    /// Whether every cell has a number.
    pub(crate) fn complete(&self) -> bool {
        self.rows.iter().all(|&row| {
            Server::ALL
                .iter()
                .all(|&server| self.median(row, server).is_some())
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, for the report.
    pub(crate) fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nDNS (issue 24): `dnsperf` against `amb-serf agent --dns-addr` joined by n native \
             members, and against `dnsmasq` answering the same A records from a hosts file, in \
             one network namespace while the members gossip; half the queries are node names \
             (one record), half role names (ten records). Cells are medians, `m` = the dnsmasq \
             column.\n"
        );
        let _ = writeln!(out, "| metric | amb-serf | dnsmasq |");
        let _ = writeln!(out, "|---|---|---|");
        for &metric in &self.rows {
            let cell = |server| match self.median(metric, server) {
                None => "**missing**".to_owned(),
                Some(value) => {
                    let mut text = number(value);
                    if server == Server::AmbSerf {
                        if let Some(anchor) =
                            self.median(metric, Server::Dnsmasq).filter(|m| *m > 0.0)
                        {
                            let _ = write!(text, " ({:.2}× m)", value / anchor);
                        }
                    }
                    text
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                metric.label(),
                cell(Server::AmbSerf),
                cell(Server::Dnsmasq)
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nDNS notes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nDNS failures:\n");
            for failure in &self.failures {
                let _ = writeln!(out, "- {failure}");
            }
        }
    }
}

/// What the DNS measurements need.
pub(crate) struct DnsEnv<'a> {
    pub(crate) plan: DnsPlan,
    pub(crate) dir: &'a Path,
    pub(crate) amb_serf: &'a Path,
}

/// Runs every size `plan.reps` times on a thread in its own network namespace; failures are
/// recorded in `results`.
pub(crate) fn measure(env: &DnsEnv<'_>, results: &mut DnsResults) {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // The members' runtime, built after the move: its worker is spawned from this
            // thread, so it lives in the namespace too. One worker, so that the members take at
            // most one core.
            let setup = procs::isolate_network().and_then(|()| {
                Ok(tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?)
            });
            let runtime = match setup {
                Ok(runtime) => runtime,
                Err(error) => return results.fail("dns", error),
            };
            let mut run = 0u8;
            for rep in 0..env.plan.reps {
                for &n in env.plan.sizes {
                    eprintln!("dns rep {}/{}: {n} members", rep + 1, env.plan.reps);
                    run += 1;
                    if let Err(error) = measure_size(env, &runtime, run, n, rep, results) {
                        results.fail(&format!("dns, {n} members"), error);
                    }
                }
            }
        });
        if thread.join().is_err() {
            eprintln!("the dns thread panicked");
        }
    });
}

/// The address of member `i` in run `run` (a fresh block of loopback per run: no socket of an
/// earlier run is in the way).
fn member_ip(run: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 10 + run, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn role_of(i: usize) -> usize {
    FIRST_ROLE + i / PER_ROLE
}

fn measure_size(
    env: &DnsEnv<'_>,
    runtime: &tokio::runtime::Runtime,
    run: u8,
    n: usize,
    rep: usize,
    results: &mut DnsResults,
) -> anyhow::Result<()> {
    let agent_ip = Ipv4Addr::new(127, 9, run, 1);
    let dnsmasq_ip = Ipv4Addr::new(127, 9, run, 2);
    let dir = env.dir.join(format!("dns-{run}"));
    std::fs::create_dir_all(&dir)?;

    let mut agent = Command::new(env.amb_serf);
    agent
        .arg("agent")
        .arg("--node=dns-agent")
        .arg(format!("--bind={agent_ip}:{GOSSIP_PORT}"))
        .arg(format!("--rpc-addr={agent_ip}:{RPC_PORT}"))
        .arg(format!("--dns-addr={agent_ip}:{DNS_PORT}"))
        .arg("--log-level=warn");
    let mut agent = Group::spawn("amb-serf agent (dns)", &mut agent, &dir.join("agent.log"))?;

    // The members, each joined to the agent (50 joins at a time).
    let seed = SocketAddr::from((agent_ip, GOSSIP_PORT));
    let members = runtime.block_on(async {
        let client = crate::cluster::connect(agent_ip, &mut agent).await?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let config = serf::serf::Config {
                node_name: format!("m{i:04}"),
                tags: [("role".to_owned(), role_of(i).to_string())].into(),
                ..serf::serf::Config::default()
            };
            let mut options = serf_agent::driver::Options::new(
                config.node_name.clone(),
                SocketAddr::from((member_ip(run, i), GOSSIP_PORT)),
            );
            // Lighter members: each probes every 10 s (not 1 s), so that 1,000 of them on one
            // worker of a busy machine still answer the agent's probes in time (at LAN defaults
            // they fell behind and the agent declared dozens failed). The agent keeps the LAN
            // defaults: it probes, gossips and push-pulls as in production.
            options.config.probe_interval = Duration::from_secs(10);
            let (member, _events) = serf_agent::member::start(config, options)
                .await
                .with_context(|| format!("starting member {i}"))?;
            members.push(member);
        }
        // 20 joins in flight, each tried up to 5 times: in the join storm of 1,000 members on
        // a busy machine, a push-pull may miss its 10 s deadline.
        let mut joins: tokio::task::JoinSet<Result<(), serf_agent::member::Error>> =
            tokio::task::JoinSet::new();
        for (i, member) in members.iter().enumerate() {
            if joins.len() >= 20 {
                if let Some(joined) = joins.join_next().await {
                    joined?.context("a member joining the agent (5 tries)")?;
                }
            }
            if i % 100 == 99 {
                eprintln!("  {} members joining or joined", i + 1);
            }
            let member = member.clone();
            // The agent, and a member that joined before (Serf's join succeeds when one seed
            // answers; the agent then hears of the newcomer through gossip).
            let seeds = match i {
                0 => vec![seed],
                _ => vec![seed, members[i / 2].local_addr()],
            };
            joins.spawn(async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match member.join(&seeds, true).await {
                        Ok(_) => return Ok(()),
                        Err(error) if tries >= 5 => return Err(error),
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            });
        }
        while let Some(joined) = joins.join_next().await {
            joined?.context("a member joining the agent (5 tries)")?;
        }
        let start = Instant::now();
        loop {
            agent.check_alive()?;
            let alive = alive(&client).await?;
            if alive == n + 1 {
                eprintln!(
                    "  the agent lists {alive} members alive ({:.1} s after the joins)",
                    start.elapsed().as_secs_f64()
                );
                break;
            }
            if start.elapsed() > CONVERGE_DEADLINE {
                bail!(
                    "the agent lists {alive} of {} members alive after {CONVERGE_DEADLINE:?}",
                    n + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(members)
    })?;
    let result = (|| {
        // The same names for dnsmasq, and the queries.
        let mut hosts = String::new();
        let mut queries = String::new();
        for i in 0..n {
            let ip = member_ip(run, i);
            let _ = writeln!(hosts, "{ip} m{i:04}.node.serf");
            let _ = writeln!(hosts, "{ip} {}.role.serf", role_of(i));
            let _ = writeln!(queries, "m{i:04}.node.serf A");
            let _ = writeln!(queries, "{}.role.serf A", role_of(i));
        }
        let hosts_file = dir.join("hosts");
        let queries_file = dir.join("queries");
        std::fs::write(&hosts_file, hosts)?;
        std::fs::write(&queries_file, queries)?;
        let mut dnsmasq = Command::new("dnsmasq");
        dnsmasq
            .arg("--no-daemon")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-poll")
            .arg("--bind-interfaces")
            .arg(format!("--listen-address={dnsmasq_ip}"))
            .arg(format!("--port={DNS_PORT}"))
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .arg("--pid-file=")
            .arg("--user=root");
        let mut dnsmasq = Group::spawn("dnsmasq", &mut dnsmasq, &dir.join("dnsmasq.log"))?;

        let servers = [
            (Server::AmbSerf, agent_ip, &mut agent),
            (Server::Dnsmasq, dnsmasq_ip, &mut dnsmasq),
        ];
        let role_ips: Vec<String> = (0..n.min(PER_ROLE))
            .map(|i| member_ip(run, i).to_string())
            .collect();
        let last = n - 1;
        let mut servers = servers;
        for (server, ip, group) in &mut servers {
            // Both answer before anything is measured (dnsmasq may still be starting).
            let ready = procs::wait_for(Duration::from_secs(20), || {
                group.check_alive().is_ok()
                    && dig(*ip, &format!("m{last:04}.node.serf"))
                        .is_ok_and(|ips| ips == [member_ip(run, last).to_string()])
            });
            group.check_alive()?;
            if !ready {
                bail!("{} does not answer m{last:04}.node.serf", server.name());
            }
            let mut got = dig(*ip, &format!("{FIRST_ROLE}.role.serf"))?;
            got.sort();
            let mut want = role_ips.clone();
            want.sort();
            if got != want {
                bail!(
                    "{} answers {FIRST_ROLE}.role.serf with {got:?}, not {want:?}",
                    server.name()
                );
            }
        }
        // Alternate which goes first, so neither always meets a fresher machine.
        if rep % 2 == 1 {
            servers.reverse();
        }
        for (server, ip, group) in &mut servers {
            let cpu_before = procs::group_cpu(group.pid());
            let perf = dnsperf(*ip, &queries_file, env.plan.window, &dir, *server)?;
            let cpu = procs::group_cpu(group.pid()) - cpu_before;
            group.check_alive()?;
            if perf.completed == 0 {
                bail!("{}: dnsperf completed no query", server.name());
            }
            if perf.lost > 0 {
                results.note(format!(
                    "{}, {n} members: {} of {} queries lost (dnsperf timeout 5 s)",
                    server.name(),
                    perf.lost,
                    perf.completed + perf.lost
                ));
            }
            if let Some(rcode) = perf.rcodes.keys().find(|rcode| *rcode != "NOERROR") {
                bail!(
                    "{}: dnsperf got {rcode} answers: {:?}",
                    server.name(),
                    perf.rcodes
                );
            }
            let mut latencies = perf.latencies_ns;
            latencies.sort_unstable();
            results.add(*server, DnsMetric::Qps(n), perf.qps);
            results.add(
                *server,
                DnsMetric::P50(n),
                crate::percentile_us(&latencies, 50.0),
            );
            results.add(
                *server,
                DnsMetric::P99(n),
                crate::percentile_us(&latencies, 99.0),
            );
            results.add(
                *server,
                DnsMetric::CpuPer1000(n),
                cpu.as_secs_f64() * 1e3 * 1000.0 / perf.completed as f64,
            );
            results.note(format!(
                "{}, {n} members: average response {} bytes",
                server.name(),
                perf.response_size
            ));
        }
        // Still the whole membership: no answer above came from a member that had failed.
        let alive = runtime.block_on(async {
            let client = crate::cluster::connect(agent_ip, &mut agent).await?;
            alive(&client).await
        })?;
        if alive != n + 1 {
            bail!(
                "the agent listed {alive} of {} members alive after the queries",
                n + 1
            );
        }
        Ok(())
    })();
    runtime.block_on(async {
        for member in &members {
            member.shutdown();
        }
    });
    drop(members);
    agent.kill_now();
    result
}

async fn alive(client: &Client) -> anyhow::Result<usize> {
    Ok(client
        .members()
        .await
        .with_context(|| format!("members at {}", client.addr()))?
        .iter()
        .filter(|member| member.status == "alive")
        .count())
}

/// The A records `dig` gets for `name` from the server at `ip`.
fn dig(ip: Ipv4Addr, name: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new("dig")
        .arg(format!("@{ip}"))
        .arg("-p")
        .arg(DNS_PORT.to_string())
        .args(["+short", "+time=2", "+tries=1", "A"])
        .arg(name)
        .output()
        .context("running dig")?;
    if !output.status.success() {
        bail!(
            "dig @{ip} {name}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// What one `dnsperf` run reports.
#[derive(Debug, Default)]
struct Perf {
    qps: f64,
    completed: u64,
    lost: u64,
    rcodes: BTreeMap<String, u64>,
    response_size: u64,
    /// Every answered query's latency (`-v`), in ns.
    latencies_ns: Vec<u64>,
}

/// `dnsperf -v` against `ip` for `window`; its output is kept in `dir`.
fn dnsperf(
    ip: Ipv4Addr,
    queries: &Path,
    window: Duration,
    dir: &Path,
    server: Server,
) -> anyhow::Result<Perf> {
    let out = dir.join(format!("dnsperf-{}.out", server.name()));
    let status = Command::new("dnsperf")
        .arg("-s")
        .arg(ip.to_string())
        .arg("-p")
        .arg(DNS_PORT.to_string())
        .arg("-d")
        .arg(queries)
        .arg("-l")
        .arg(window.as_secs().max(1).to_string())
        .arg("-v")
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running dnsperf")?;
    let text = std::fs::read_to_string(&out)?;
    if !status.success() {
        bail!("dnsperf exited {status}: {:.2000}", text);
    }
    let perf = parse_dnsperf(&text);
    let _ = std::fs::remove_file(&out);
    perf
}

/// The summary and the per-query lines (`> NOERROR name A 0.000123`) of `dnsperf -v`.
fn parse_dnsperf(text: &str) -> anyhow::Result<Perf> {
    let mut perf = Perf::default();
    let mut qps = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("> ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let Some(seconds) = fields.last().and_then(|f| f.parse::<f64>().ok()) {
                perf.latencies_ns.push((seconds * 1e9).round() as u64);
            }
        } else if let Some(rest) = line.strip_prefix("Queries per second:") {
            qps = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("Queries completed:") {
            perf.completed = first_number(rest).unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Queries lost:") {
            perf.lost = first_number(rest).unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Response codes:") {
            // `NOERROR 82205 (100.00%), NXDOMAIN 3 (0.00%)`
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(code), Some(count)) = (words.next(), words.next()) {
                    perf.rcodes
                        .insert(code.to_owned(), count.parse().unwrap_or(0));
                }
            }
        } else if let Some(rest) = line.strip_prefix("Average packet size:") {
            // `request 29, response 52`
            perf.response_size = rest
                .rsplit("response")
                .next()
                .and_then(first_number)
                .unwrap_or(0);
        }
    }
    perf.qps = qps.context("dnsperf printed no queries per second")?;
    Ok(perf)
}

fn first_number(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `dnsmasq --version` and `dnsperf`'s version line, for the report.
pub(crate) fn versions() -> Vec<(&'static str, String)> {
    let line = |program: &str, arg: &str, pick: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .map(|out| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                text.lines()
                    .find(|line| line.contains(pick))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|error| format!("{program}: {error}"))
    };
    vec![
        ("dnsmasq", line("dnsmasq", "--version", "version")),
        ("dnsperf", line("dnsperf", "-h", "Version")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsperf_output() {
        let text = "[Status] Sending queries\n\
                    > NOERROR a.node.serf A 0.000182\n\
                    > NOERROR r.role.serf A 0.000058\n\
                    Statistics:\n\n  Queries sent:         46743\n\
                    \x20 Queries completed:    46740 (99.99%)\n\
                    \x20 Queries lost:         3 (0.01%)\n\n\
                    \x20 Response codes:       NOERROR 46739 (100.00%), NXDOMAIN 1 (0.00%)\n\
                    \x20 Average packet size:  request 29, response 52\n\
                    \x20 Queries per second:   23252.863888\n";
        let perf = parse_dnsperf(text).unwrap();
        assert_eq!(perf.completed, 46740);
        assert_eq!(perf.lost, 3);
        assert_eq!(perf.response_size, 52);
        assert_eq!(perf.rcodes.get("NXDOMAIN"), Some(&1));
        assert_eq!(perf.rcodes.get("NOERROR"), Some(&46739));
        assert!((perf.qps - 23252.86).abs() < 0.01);
        assert_eq!(perf.latencies_ns, [182_000, 58_000]);
    }
}
