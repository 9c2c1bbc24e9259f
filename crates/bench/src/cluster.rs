//! The cluster metrics (6–9 of issue 11): amb-serf's Serf member against Debian's `serf agent`.
//!
//! Everything runs on one thread that first moves into a network namespace of its own
//! ([`procs::isolate_network`]): every process it starts (and the backend, and the RPC clients)
//! lives there, so each member has its own loopback address (`127.1.x.y`) with the default
//! ports 7946 and 7373, nothing collides with other users of the machine's loopback, and the
//! namespace's `lo` counters are the cluster's traffic and nothing else.
//!
//! Real agents are read over their RPC port with `serf_agent::rpc::Client` (what `serf members` does),
//! polled every 10 ms. Each measurement starts its processes afresh and kills them (process
//! groups, by PID) on every path.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serf::memberlist::Config;
use serf_agent::rpc::Client;

use crate::backend::Backend;
use crate::plan::{push_pull_period, ClusterPlan};
use crate::procs::{self, Group};
use crate::report::{ClusterMetric, ClusterResults, Column};

/// Serf's gossip and RPC ports, the same for every member (each has its own address).
const GOSSIP_PORT: u16 = 7946;
const RPC_PORT: u16 = 7373;
/// How often a real agent's member list is read.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for anything (start, join, detection, convergence) before the rep fails.
const DEADLINE: Duration = Duration::from_secs(90);

/// What the cluster measurements need.
pub(crate) struct ClusterEnv<'a> {
    pub(crate) plan: ClusterPlan,
    pub(crate) dir: &'a Path,
    pub(crate) amb_serf: &'a Path,
    /// Parts to skip: register, detect, idle-member, gossip, sim.
    pub(crate) skip: &'a [String],
}

impl ClusterEnv<'_> {
    fn runs(&self, group: &str) -> bool {
        !self.skip.iter().any(|g| g == group)
    }
}

/// Runs every cluster metric, each `plan.reps` times, on a thread in its own network
/// namespace; failures are recorded in `results`.
pub(crate) fn measure(env: &ClusterEnv<'_>, results: &mut ClusterResults) {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            if let Err(error) = procs::isolate_network() {
                results.fail("cluster", error);
                return;
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    results.fail("cluster", error.into());
                    return;
                }
            };
            // One backend for every forwarding member (outside the runtime: it has its own).
            let server = match Backend::start(1, false) {
                Ok(server) => server,
                Err(error) => {
                    results.fail("cluster backend", error);
                    return;
                }
            };
            let backend = server.addr();
            let mut addrs = Addrs::default();
            for rep in 0..env.plan.reps {
                eprintln!("cluster rep {}/{}", rep + 1, env.plan.reps);
                if env.runs("register") {
                    for column in Column::ALL {
                        let result = runtime.block_on(register(env, &mut addrs, column, backend));
                        record(results, "registration", column, result, |ms| {
                            vec![(ClusterMetric::Register, ms)]
                        });
                    }
                }
                if env.runs("detect") {
                    for column in Column::ALL {
                        let result = runtime.block_on(detect(env, &mut addrs, column, backend));
                        record(results, "failure detection", column, result, |s| {
                            vec![(ClusterMetric::Detect, s)]
                        });
                    }
                }
                if env.runs("idle-member") {
                    match runtime.block_on(idle(env, &mut addrs, backend)) {
                        Ok(samples) => {
                            for (column, metric, value) in samples {
                                results.add(column, metric, value);
                            }
                        }
                        Err(error) => results.fail("idle member", error),
                    }
                }
                if env.runs("gossip") {
                    for column in Column::ALL {
                        let result = runtime.block_on(gossip(env, &mut addrs, column));
                        record(results, "gossip", column, result, |gossip| {
                            vec![
                                (ClusterMetric::Converge, gossip.converged),
                                (ClusterMetric::GossipBytes, gossip.bytes),
                                (ClusterMetric::GossipTcpOpens, gossip.tcp_opens),
                            ]
                        });
                    }
                }
                if env.runs("sim") {
                    simulate(&env.plan, rep as u64 + 1, results);
                }
            }
        });
        if thread.join().is_err() {
            eprintln!("the cluster thread panicked");
        }
    });
}

fn record<T>(
    results: &mut ClusterResults,
    what: &str,
    column: Column,
    result: anyhow::Result<T>,
    rows: impl FnOnce(T) -> Vec<(ClusterMetric, f64)>,
) {
    match result {
        Ok(value) => {
            for (metric, value) in rows(value) {
                results.add(column, metric, value);
            }
        }
        Err(error) => results.fail(&format!("{} {what}", column.name()), error),
    }
}

/// Hands out a fresh loopback address per member (a killed member's address is not reused, so
/// no late packet of it reaches a newcomer).
#[derive(Default)]
struct Addrs {
    next: u32,
}

impl Addrs {
    fn next(&mut self) -> Ipv4Addr {
        self.next += 1;
        let n = self.next;
        Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8)
    }
}

/// A member process, by kind.
fn spawn_serf(
    dir: &Path,
    name: &str,
    ip: Ipv4Addr,
    join: Option<Ipv4Addr>,
    tags: &[(&str, String)],
) -> anyhow::Result<Group> {
    let mut command = Command::new("serf");
    command
        .arg("agent")
        .arg(format!("-node={name}"))
        .arg(format!("-bind={ip}:{GOSSIP_PORT}"))
        .arg(format!("-rpc-addr={ip}:{RPC_PORT}"));
    if let Some(join) = join {
        command.arg(format!("-join={join}:{GOSSIP_PORT}"));
    }
    for (key, value) in tags {
        command.arg(format!("-tag={key}={value}"));
    }
    Group::spawn(name, &mut command, &dir.join(format!("{name}.log")))
}

/// `amb-serf agent`, joined to `join`, without an RPC server.
fn spawn_amb_agent(
    dir: &Path,
    amb_serf: &Path,
    name: &str,
    ip: Ipv4Addr,
    join: Ipv4Addr,
) -> anyhow::Result<Group> {
    let mut command = Command::new(amb_serf);
    command
        .arg("agent")
        .arg("--node")
        .arg(name)
        .arg("--bind")
        .arg(format!("{ip}:{GOSSIP_PORT}"))
        .arg("--rpc-addr=")
        .arg("--join")
        .arg(format!("{join}:{GOSSIP_PORT}"));
    Group::spawn(name, &mut command, &dir.join(format!("{name}.log")))
}

/// `amb-serf run` as the image runs it: a Docker link variable for the backend and one for the
/// Serf agent (`serf_1`), listening on its own address.
fn spawn_amb_run(
    env: &ClusterEnv<'_>,
    name: &str,
    ip: Ipv4Addr,
    join: Ipv4Addr,
    backend: SocketAddr,
) -> anyhow::Result<Group> {
    let mut command = Command::new(env.amb_serf);
    command
        .arg("run")
        .env("AMB_DATAPLANE", "userspace")
        .env(
            format!("BACKEND_PORT_{}_TCP", backend.port()),
            format!("tcp://{backend}"),
        )
        .env(
            format!("SERF_1_PORT_{GOSSIP_PORT}_TCP"),
            format!("tcp://{join}:{GOSSIP_PORT}"),
        )
        .env("AMB_LISTEN_ADDR", ip.to_string())
        .env("AMB_NODE", name)
        .env("AMB_BIND", format!("{ip}:{GOSSIP_PORT}"))
        .env("AMB_RPC_ADDR", format!("{ip}:{RPC_PORT}"));
    Group::spawn(name, &mut command, &env.dir.join(format!("{name}.log")))
}

/// A real agent's RPC, once it answers.
pub(crate) async fn connect(ip: Ipv4Addr, group: &mut Group) -> anyhow::Result<Client> {
    let addr = format!("{ip}:{RPC_PORT}");
    let start = Instant::now();
    loop {
        group.check_alive()?;
        match Client::connect(&addr, None).await {
            Ok(client) => return Ok(client),
            Err(error) if start.elapsed() > DEADLINE => {
                bail!("no RPC at {addr} within {DEADLINE:?}: {error}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// A seed `serf agent` that answers RPC.
async fn start_observer(
    env: &ClusterEnv<'_>,
    addrs: &mut Addrs,
    name: &str,
) -> anyhow::Result<(Group, Ipv4Addr, Client)> {
    let ip = addrs.next();
    let mut group = spawn_serf(env.dir, name, ip, None, &[])?;
    let client = connect(ip, &mut group).await?;
    Ok((group, ip, client))
}

/// Polls `client`'s member list until `done` holds for it; the time it took from `since`.
async fn wait_members(
    client: &Client,
    since: Instant,
    what: &str,
    mut done: impl FnMut(&[serf_agent::rpc::MemberRow]) -> bool,
) -> anyhow::Result<Duration> {
    loop {
        let members = client
            .members()
            .await
            .with_context(|| format!("members at {}", client.addr()))?;
        if done(&members) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > DEADLINE {
            bail!("{what}: not within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn has(
    members: &[serf_agent::rpc::MemberRow],
    name: &str,
    status: &str,
    tags: &[(&str, String)],
) -> bool {
    members.iter().any(|member| {
        member.name == name
            && member.status == status
            && tags
                .iter()
                .all(|(key, value)| member.tags.get(*key) == Some(value))
    })
}

/// The subject of metrics 6 and 7: `amb-serf run` in front of a backend, or a `serf agent`
/// with the same `role` tag; joined to the observer at `join`.
fn spawn_subject(
    env: &ClusterEnv<'_>,
    column: Column,
    name: &str,
    ip: Ipv4Addr,
    join: Ipv4Addr,
    backend: SocketAddr,
) -> anyhow::Result<Group> {
    match column {
        Column::AmbSerf => spawn_amb_run(env, name, ip, join, backend),
        Column::Serf => spawn_serf(
            env.dir,
            name,
            ip,
            Some(join),
            &[("role", backend.port().to_string())],
        ),
    }
}

/// A fresh observer and a subject joined to it: the observer's RPC client, both processes,
/// and the time from spawning the subject until the observer lists it alive with its `role`
/// tag.
struct Joined {
    client: Client,
    subject: Group,
    registered: Duration,
    _observer: Group,
}

async fn join_subject(
    env: &ClusterEnv<'_>,
    addrs: &mut Addrs,
    column: Column,
    backend: SocketAddr,
    name: &str,
) -> anyhow::Result<Joined> {
    let (observer, observer_ip, client) = start_observer(env, addrs, "observer").await?;
    let tags = [("role", backend.port().to_string())];
    let ip = addrs.next();
    let start = Instant::now();
    let mut subject = spawn_subject(env, column, name, ip, observer_ip, backend)?;
    let registered = wait_members(&client, start, &format!("{name} alive"), |members| {
        has(members, name, "alive", &tags)
    })
    .await?;
    subject.check_alive()?;
    Ok(Joined {
        client,
        subject,
        registered,
        _observer: observer,
    })
}

/// Metric 6: milliseconds from spawning the subject until the observer lists it alive with
/// its `role` tag.
async fn register(
    env: &ClusterEnv<'_>,
    addrs: &mut Addrs,
    column: Column,
    backend: SocketAddr,
) -> anyhow::Result<f64> {
    let name = format!("{}-registers", column.name());
    let mut joined = join_subject(env, addrs, column, backend, &name).await?;
    joined.subject.kill_now();
    Ok(joined.registered.as_secs_f64() * 1e3)
}

/// Metric 7: seconds from SIGKILL of a joined subject until the observer lists it `failed`.
/// A cluster of two, afresh each time, so both sides run with the same cluster size.
async fn detect(
    env: &ClusterEnv<'_>,
    addrs: &mut Addrs,
    column: Column,
    backend: SocketAddr,
) -> anyhow::Result<f64> {
    let name = format!("{}-fails", column.name());
    let mut joined = join_subject(env, addrs, column, backend, &name).await?;
    // Past the join's own gossip, as a member that has been up a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    joined.subject.check_alive()?;
    let start = Instant::now();
    joined.subject.kill_now();
    let took = wait_members(
        &joined.client,
        start,
        &format!("{name} failed"),
        |members| has(members, &name, "failed", &[]),
    )
    .await?;
    Ok(took.as_secs_f64())
}

/// Metric 8: an `amb-serf run` (forwarding one port) and a `serf agent` + `socat` (the original
/// image), both joined to one observer, watched together for `idle_window`.
async fn idle(
    env: &ClusterEnv<'_>,
    addrs: &mut Addrs,
    backend: SocketAddr,
) -> anyhow::Result<Vec<(Column, ClusterMetric, f64)>> {
    let (_observer, observer_ip, client) = start_observer(env, addrs, "observer").await?;
    let amb_ip = addrs.next();
    let serf_ip = addrs.next();
    let port = backend.port();
    let mut amb = spawn_amb_run(env, "amb-serf-idle", amb_ip, observer_ip, backend)?;
    let mut serf = spawn_serf(
        env.dir,
        "serf-idle",
        serf_ip,
        Some(observer_ip),
        &[("role", port.to_string())],
    )?;
    let mut socat = Group::spawn(
        "socat",
        Command::new("socat")
            .arg(format!("TCP4-LISTEN:{port},bind={serf_ip},fork,reuseaddr"))
            .arg(format!("TCP4:{}", backend)),
        &env.dir.join("socat.log"),
    )?;
    let tags = [("role", port.to_string())];
    wait_members(&client, Instant::now(), "idle members alive", |members| {
        has(members, "amb-serf-idle", "alive", &tags) && has(members, "serf-idle", "alive", &tags)
    })
    .await?;
    // Both forward: one echo through each before the window.
    for addr in [amb_ip, serf_ip] {
        let addr = SocketAddr::from((addr, port));
        if !procs::wait_for(Duration::from_secs(20), || crate::load::probe(addr)) {
            bail!("nothing forwards at {addr}");
        }
    }
    // The join's own gossip settles first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let groups = |column| match column {
        Column::AmbSerf => vec![amb.pid()],
        Column::Serf => vec![serf.pid(), socat.pid()],
    };
    let cpu = |column| -> Duration { groups(column).into_iter().map(procs::group_cpu).sum() };
    let before = Column::ALL.map(cpu);
    let start = Instant::now();
    tokio::time::sleep(env.plan.idle_window).await;
    let after = Column::ALL.map(cpu);
    let elapsed = start.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for (i, column) in Column::ALL.into_iter().enumerate() {
        let memory = groups(column)
            .into_iter()
            .map(procs::group_memory)
            .fold((0, 0), |(rss, pss), m| (rss + m.rss_kib, pss + m.pss_kib));
        samples.push((column, ClusterMetric::IdleRss, memory.0 as f64 / 1024.0));
        samples.push((column, ClusterMetric::IdlePss, memory.1 as f64 / 1024.0));
        samples.push((
            column,
            ClusterMetric::IdleCpu,
            (after[i] - before[i]).as_secs_f64() / elapsed * 100.0,
        ));
    }
    amb.check_alive()?;
    serf.check_alive()?;
    socat.check_alive()?;
    Ok(samples)
}

/// What metric 9 measures in one real cluster.
struct Gossip {
    /// Seconds to convergence.
    converged: f64,
    /// Bytes sent per member per second over the window.
    bytes: f64,
    /// TCP connections opened per member per push-pull period over the window.
    tcp_opens: f64,
}

/// Metric 9, real processes: `gossip_serf` agents (the first the seed) and `gossip_amb`
/// amb-serf agents, each joined to one agent (round robin); or, in the serf column, as many
/// `serf agent`s in all. Seconds from spawning all but the seed (once it answers RPC) until
/// every real agent lists every member alive; then, `gossip_settle` later, bytes sent on the
/// namespace's loopback per member per second over `gossip_window`, and TCP connections opened
/// per member per push-pull period (each a push-pull, or a ping's TCP fallback).
async fn gossip(env: &ClusterEnv<'_>, addrs: &mut Addrs, column: Column) -> anyhow::Result<Gossip> {
    let plan = &env.plan;
    let total = plan.gossip_amb + plan.gossip_serf;
    let (n_serf, n_amb) = match column {
        Column::AmbSerf => (plan.gossip_serf, plan.gossip_amb),
        Column::Serf => (total, 0),
    };
    // Names of one length in both columns (`gossip-a07`, `gossip-s07`; serf agents first): pings
    // and push-pulls carry them, so longer names in one column would count as its gossip volume.
    let width = total.to_string().len();
    let tag = match column {
        Column::AmbSerf => 'a',
        Column::Serf => 's',
    };
    let name = |i: usize| format!("gossip-{tag}{i:0width$}");
    let mut groups: Vec<Group> = Vec::with_capacity(total);
    let result = async {
        let (seed, seed_ip, seed_client) = start_observer(env, addrs, &name(0)).await?;
        groups.push(seed);
        let mut agents = vec![(seed_ip, Some(seed_client))];
        let start = Instant::now();
        for i in 1..n_serf {
            let ip = addrs.next();
            groups.push(spawn_serf(env.dir, &name(i), ip, Some(seed_ip), &[])?);
            agents.push((ip, None));
        }
        for i in 0..n_amb {
            let ip = addrs.next();
            let join = agents[i % agents.len()].0;
            groups.push(spawn_amb_agent(
                env.dir,
                env.amb_serf,
                &name(n_serf + i),
                ip,
                join,
            )?);
        }
        // Every real agent, until each lists all members alive.
        let mut pending: Vec<usize> = (0..agents.len()).collect();
        while !pending.is_empty() {
            if start.elapsed() > DEADLINE {
                bail!(
                    "{} of {} real agents did not see {total} members alive within {DEADLINE:?}",
                    pending.len(),
                    agents.len()
                );
            }
            for group in &mut groups {
                group.check_alive()?;
            }
            let mut still = Vec::new();
            for i in pending {
                let (ip, client) = &mut agents[i];
                if client.is_none() {
                    *client = Client::connect(&format!("{ip}:{RPC_PORT}"), None)
                        .await
                        .ok();
                }
                let alive = match client {
                    Some(client) => client
                        .members()
                        .await
                        .map(|members| members.iter().filter(|m| m.status == "alive").count())
                        .unwrap_or(0),
                    None => 0,
                };
                if alive < total {
                    still.push(i);
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(POLL).await;
            }
        }
        let converged = start.elapsed().as_secs_f64();
        // Close the RPC connections so that their bytes are not counted.
        drop(agents);
        tokio::time::sleep(plan.gossip_settle).await;
        let before = procs::loopback_counters()?;
        let window = Instant::now();
        tokio::time::sleep(plan.gossip_window).await;
        let after = procs::loopback_counters()?;
        let seconds = window.elapsed().as_secs_f64();
        let periods = seconds / push_pull_period(total).as_secs_f64();
        for group in &mut groups {
            group.check_alive()?;
        }
        Ok(Gossip {
            converged,
            bytes: (after.tx_bytes - before.tx_bytes) as f64 / total as f64 / seconds,
            tcp_opens: (after.tcp_active_opens - before.tcp_active_opens) as f64
                / total as f64
                / periods,
        })
    }
    .await;
    // SIGKILL all at once: a graceful leave of 53 members, one after the other, takes minutes.
    for group in &mut groups {
        group.kill_now();
    }
    result
}

/// Metric 9, simulated, for each size: the virtual time from every member joining member 0 at
/// once until every member sees every member alive (a join storm); payload bytes sent per
/// member per second over the next 10 simulated seconds; then the virtual time one broadcast
/// (a user message, piggybacked on gossip like a Serf event) takes to reach every member.
fn simulate(plan: &ClusterPlan, seed: u64, results: &mut ClusterResults) {
    use serf::sim::{Net, Sim};
    let limit = Duration::from_secs(600);
    for &n in plan.sim_sizes {
        let real = Instant::now();
        let mut sim = Sim::new(seed, n, Config::lan(), Net::default());
        sim.join(1..n, 0);
        let Some(took) = sim.run_until(limit, Sim::converged) else {
            results.fail(
                &format!("simulator, {n} members"),
                anyhow::anyhow!(
                    "seed {seed}: not converged within {limit:?} of simulated time; {} pairs not alive",
                    sim.missing_pairs()
                ),
            );
            continue;
        };
        let before = sim.bytes_sent;
        let window = Duration::from_secs(10);
        sim.run_for(window);
        let rate = (sim.bytes_sent - before) as f64 / n as f64 / window.as_secs_f64();
        let message = format!("bench-{seed}").into_bytes();
        sim.broadcast_user(0, &message);
        let reached = |sim: &Sim| {
            sim.nodes
                .iter()
                .all(|node| node.core.delegate.messages.contains(&message))
        };
        let begin = sim.elapsed();
        while !reached(&sim) && sim.elapsed() - begin < limit {
            sim.run_for(Duration::from_millis(10));
        }
        let spread = sim.elapsed() - begin;
        if !reached(&sim) {
            results.fail(
                &format!("simulator, {n} members"),
                anyhow::anyhow!("seed {seed}: a broadcast did not reach everyone in {limit:?}"),
            );
            continue;
        }
        eprintln!(
            "  sim n={n}: converged in {:.1} simulated s, {rate:.0} B/member/s, broadcast in \
             {:.2} s ({:.1} s real)",
            took.as_secs_f64(),
            spread.as_secs_f64(),
            real.elapsed().as_secs_f64()
        );
        results.add(
            Column::AmbSerf,
            ClusterMetric::SimConverge(n),
            took.as_secs_f64(),
        );
        results.add(Column::AmbSerf, ClusterMetric::SimBytes(n), rate);
        results.add(
            Column::AmbSerf,
            ClusterMetric::SimSpread(n),
            spread.as_secs_f64(),
        );
    }
}

/// The `serf` version line, for the report.
pub(crate) fn serf_version() -> String {
    Command::new("serf")
        .arg("version")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|error| format!("serf: {error}"))
}

/// Labels of the groups `--skip` takes for the cluster part.
pub(crate) const GROUPS: [&str; 6] = [
    "cluster",
    "register",
    "detect",
    "idle-member",
    "gossip",
    "sim",
];
