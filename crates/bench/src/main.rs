//! `bench`: amb-serf against the proxies people would use instead, side by side on loopback.
//!
//! ```text
//! cargo run --release -p bench                  # the full suite (minutes), writes BENCHMARKS.md
//! cargo run --release -p bench -- --smoke       # a few seconds per metric, writes nothing
//! cargo run --release -p bench -- --only direct,haproxy,amb-serf --reps 5
//! cargo run --release -p bench -- --only cluster    # only the cluster metrics 6–9
//! cargo run --release -p bench -- --only dns        # only the DNS metrics (10)
//! ```
//!
//! Each repetition starts every tool afresh against a backend of its own (see [`backend`]) and
//! measures, for each: bulk throughput (1 and 8 streams, each direction), 64-byte ping-pong
//! latency (free and with everything pinned to CPU 0), 32 concurrent connections, the
//! new-connection rate with 64 workers, and many idle connections with the proxy's RSS and PSS.
//! Proxy CPU time comes from `/proc/<pid>/stat` of all the proxy's processes. Each table cell is
//! the median over the repetitions; any failed or unverified measurement makes the exit code 1.
//!
//! The cluster metrics (registration, failure detection, idle member, gossip at scale, and the
//! simulator) compare amb-serf's Serf member with Debian's `serf agent`; see [`cluster`]. The
//! DNS metrics compare `amb-serf agent --dns-addr` with dnsmasq under `dnsperf`; see [`dns`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;

mod backend;
mod cluster;
mod dns;
mod kernel;
mod load;
mod pattern;
mod plan;
mod procs;
mod report;
mod tools;

use load::Direction;
use report::{ClusterResults, Metric, Results};
use tools::Tool;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks amb-serf against direct, socat, HAProxy and nginx on loopback")]
struct Args {
    /// A few seconds per metric and one repetition: checks the harness, not the numbers.
    #[arg(long)]
    smoke: bool,
    /// Only these tools (comma-separated): direct, socat, haproxy, haproxy-splice, nginx,
    /// amb-serf, amb-serf-connect; `cluster` for the cluster metrics 6–9, `dns` for the DNS
    /// metrics and `kernel` for the kernel section (direct, haproxy, amb-serf, amb-serf-kernel in
    /// a namespace of their own); none of them runs when --only omits it.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Repetitions of every measurement (the table shows medians).
    #[arg(long)]
    reps: Option<usize>,
    /// The amb-serf binary (default: the one beside this program, built first under cargo).
    #[arg(long)]
    amb_serf: Option<PathBuf>,
    /// An earlier amb-serf binary measured in the same run as the column `amb-serf-baseline`
    /// (added to the tools; with --only, name it there too), for a change's before/after.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Where to write the report (default: BENCHMARKS.md in the repository; none with --smoke).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip parts of the suite (comma-separated): bulk, ping, concurrent, rate, pinned, idle;
    /// cluster (all of 6–9), or register, detect, idle-member, gossip, sim; dns; kernel (the
    /// kernel section).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Start every proxy under this command (e.g. `strace -c -f -o /tmp/trace`), for profiling.
    #[arg(long)]
    wrap: Option<String>,
    /// Do not apt-get install missing peers.
    #[arg(long)]
    no_install: bool,
}

/// Sizes and durations of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    reps: usize,
    bulk_bytes: u64,
    bulk8_bytes: u64,
    ping_warmup: usize,
    ping_count: usize,
    concurrent: Duration,
    rate: Duration,
    idle: usize,
    cluster: plan::ClusterPlan,
    dns: dns::DnsPlan,
}

impl Plan {
    fn new(smoke: bool, reps: Option<usize>, open_files: u64) -> Self {
        // The proxy needs two descriptors per connection, and so does this process (client and
        // backend ends): stay under the hard limit with room for listeners and pipes.
        let idle_max = (open_files.saturating_sub(200) / 2) as usize;
        let cluster = if smoke {
            plan::ClusterPlan {
                reps: reps.unwrap_or(1),
                idle_window: Duration::from_secs(3),
                gossip_amb: 10,
                gossip_serf: 3,
                // Not whole push-pull periods: this only keeps the harness from rotting.
                gossip_settle: Duration::ZERO,
                gossip_window: Duration::from_secs(2),
                sim_sizes: &[10, 20, 50],
            }
        } else {
            let (gossip_amb, gossip_serf) = (50, 3);
            plan::ClusterPlan {
                reps: reps.unwrap_or(3),
                idle_window: Duration::from_secs(60),
                gossip_amb,
                gossip_serf,
                gossip_settle: plan::gossip_settle(),
                // One push-pull period (60 s at 53 members): one push-pull per member.
                gossip_window: plan::push_pull_period(gossip_amb + gossip_serf),
                sim_sizes: &[50, 100, 250, 500, 1_000],
            }
        };
        let dns = dns::DnsPlan {
            reps: reps.unwrap_or(if smoke { 1 } else { 3 }),
            sizes: if smoke { &[10] } else { &[10, 1_000] },
            window: Duration::from_secs(if smoke { 1 } else { 10 }),
        };
        if smoke {
            Self {
                reps: reps.unwrap_or(1),
                bulk_bytes: 32 << 20,
                bulk8_bytes: 4 << 20,
                ping_warmup: 100,
                ping_count: 1_000,
                concurrent: Duration::from_millis(500),
                rate: Duration::from_secs(1),
                idle: 200.min(idle_max),
                cluster,
                dns,
            }
        } else {
            Self {
                reps: reps.unwrap_or(3),
                bulk_bytes: 2 << 30,
                bulk8_bytes: 256 << 20,
                ping_warmup: 1_000,
                ping_count: 20_000,
                concurrent: Duration::from_secs(3),
                rate: Duration::from_secs(10),
                idle: 10_000.min(idle_max),
                cluster,
                dns,
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    procs::install_cleanup();
    match run(Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(error) => {
            eprintln!("bench: {error:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Runs the suite; `Ok(false)` when some measurement failed.
fn run(args: Args) -> anyhow::Result<bool> {
    let mut tools: Vec<Tool> = if args.only.is_empty() {
        Tool::ALL.to_vec()
    } else {
        args.only
            .iter()
            .filter(|name| *name != "cluster" && *name != "kernel" && *name != "dns")
            .map(|name| Tool::parse(name))
            .collect::<anyhow::Result<_>>()?
    };
    match (&args.baseline, tools.contains(&Tool::AmbSerfBaseline)) {
        (Some(_), false) if args.only.is_empty() => tools.push(Tool::AmbSerfBaseline),
        (None, true) => anyhow::bail!("--only amb-serf-baseline needs --baseline PATH"),
        _ => {}
    }
    const GROUPS: [&str; 6] = ["bulk", "ping", "concurrent", "rate", "pinned", "idle"];
    if let Some(unknown) = args.skip.iter().find(|g| {
        !GROUPS.contains(&g.as_str())
            && !cluster::GROUPS.contains(&g.as_str())
            && g.as_str() != "kernel"
            && g.as_str() != "dns"
    }) {
        anyhow::bail!(
            "--skip {unknown:?}: not one of {}, {}, dns, kernel",
            GROUPS.join(", "),
            cluster::GROUPS.join(", ")
        );
    }
    let run_cluster = (args.only.is_empty() || args.only.iter().any(|name| name == "cluster"))
        && !args.skip.iter().any(|group| group == "cluster");
    let run_kernel = (args.only.is_empty() || args.only.iter().any(|name| name == "kernel"))
        && !args.skip.iter().any(|group| group == "kernel");
    let run_dns = (args.only.is_empty() || args.only.iter().any(|name| name == "dns"))
        && !args.skip.iter().any(|group| group == "dns");
    if !args.no_install {
        let mut extra: Vec<&str> = Vec::new();
        if run_cluster {
            extra.extend(["serf", "socat"]);
        }
        if run_kernel {
            extra.extend(["haproxy", "nftables"]);
        }
        if run_dns {
            extra.extend(["dnsperf", "dnsmasq-base", "bind9-dnsutils"]);
        }
        tools::install(&tools, &extra)?;
    }
    let amb_serf = tools::amb_serf_binary(args.amb_serf.clone())?;
    let (_, hard) = procs::raise_open_files();
    let plan = Plan::new(args.smoke, args.reps, hard);
    let dir = tempfile::Builder::new().prefix("amb-bench").tempdir()?;
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "plan: {plan:?}; tools: {tools:?}; load: {}",
        load_before.trim()
    );

    let env = Env {
        plan,
        dir: dir.path().to_owned(),
        amb_serf,
        baseline: args.baseline.clone(),
        skip: args.skip.clone(),
        wrap: args
            .wrap
            .as_deref()
            .map(|w| w.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let mut results = Results::new(&tools, &args.skip);
    for rep in 0..plan.reps {
        for &tool in &tools {
            eprintln!("rep {}/{}: {}", rep + 1, plan.reps, tool.name());
            measure(tool, &env, &mut results);
        }
    }
    let cluster_env = cluster::ClusterEnv {
        plan: plan.cluster,
        dir: &env.dir,
        amb_serf: &env.amb_serf,
        skip: &args.skip,
    };
    let mut cluster_results = ClusterResults::new(plan.cluster, |group| {
        run_cluster && !args.skip.iter().any(|g| g == group)
    });
    if run_cluster {
        cluster::measure(&cluster_env, &mut cluster_results);
    }
    let mut kernel_results = Results::new(&kernel::TOOLS, &args.skip);
    if run_kernel {
        kernel::measure(
            plan.reps,
            |tool, results| measure(tool, &env, results),
            &mut kernel_results,
        );
    }
    let mut dns_results = dns::DnsResults::new(&plan.dns, run_dns);
    if run_dns {
        let dns_env = dns::DnsEnv {
            plan: plan.dns,
            dir: &env.dir,
            amb_serf: &env.amb_serf,
        };
        dns::measure(&dns_env, &mut dns_results);
    }

    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let command = std::iter::once("cargo run --release -p bench --".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut versions: BTreeMap<&str, String> = tools
        .iter()
        .filter(|tool| **tool != Tool::Direct)
        .map(|tool| (tool.name(), tool.version(env.binary(*tool))))
        .collect();
    if run_cluster || tools.contains(&Tool::AmbSerfConnect) {
        versions.insert("serf", cluster::serf_version());
    }
    if run_cluster {
        versions.insert("amb-serf", Tool::AmbSerf.version(&env.amb_serf));
        versions.insert("socat", Tool::Socat.version(&env.amb_serf));
    }
    if run_kernel {
        versions.insert("amb-serf", Tool::AmbSerf.version(&env.amb_serf));
        versions.insert("haproxy", Tool::Haproxy.version(&env.amb_serf));
    }
    if run_dns {
        versions.insert("amb-serf", Tool::AmbSerf.version(&env.amb_serf));
        versions.extend(dns::versions());
    }
    let mut dns_table = String::new();
    if !dns_results.is_empty() {
        dns_results.render(&mut dns_table);
    }
    let text = report::render(&report::Context {
        results: &results,
        plan: &format!("{plan:?}"),
        command: &command,
        versions: &versions,
        load: (load_before.trim(), load_after.trim()),
        elapsed: started.elapsed(),
        cluster: &cluster_results,
        kernel: run_kernel.then_some(&kernel_results),
        dns: &dns_table,
    });
    println!("{text}");
    let out = match (&args.out, args.smoke) {
        (Some(out), _) => Some(out.clone()),
        (None, true) => None,
        (None, false) => {
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md"))
        }
    };
    if let Some(out) = out {
        report::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    let complete = results.complete()
        && cluster_results.complete()
        && dns_results.complete()
        && (!run_kernel || kernel_results.complete());
    let failures: Vec<&String> = results
        .failures()
        .iter()
        .chain(cluster_results.failures())
        .chain(kernel_results.failures())
        .chain(dns_results.failures())
        .collect();
    let ok = failures.is_empty() && complete;
    if !ok {
        for failure in failures {
            eprintln!("failed: {failure}");
        }
        if !complete {
            eprintln!("failed: some metric has no number");
        }
    }
    Ok(ok)
}

/// One repetition of every metric for `tool`; failures are recorded, not fatal.
/// What every measurement needs.
struct Env {
    plan: Plan,
    dir: PathBuf,
    amb_serf: PathBuf,
    /// `--baseline`: the binary of [`Tool::AmbSerfBaseline`].
    baseline: Option<PathBuf>,
    skip: Vec<String>,
    wrap: Vec<String>,
}

impl Env {
    fn runs(&self, group: &str) -> bool {
        !self.skip.iter().any(|g| g == group)
    }

    /// The amb-serf binary `tool` runs (`--baseline`'s for the baseline column).
    fn binary(&self, tool: Tool) -> &std::path::Path {
        match (tool, &self.baseline) {
            (Tool::AmbSerfBaseline, Some(baseline)) => baseline,
            _ => &self.amb_serf,
        }
    }

    fn start(
        &self,
        tool: Tool,
        backend: &backend::Backend,
        pinned: bool,
    ) -> anyhow::Result<tools::Running> {
        tools::start(
            tool,
            backend.addr(),
            pinned,
            &self.dir,
            self.binary(tool),
            &self.wrap,
        )
    }
}

fn measure(tool: Tool, env: &Env, results: &mut Results) {
    if ["bulk", "ping", "concurrent", "rate"]
        .iter()
        .any(|g| env.runs(g))
    {
        if let Err(error) = measure_free(tool, env, results) {
            results.fail(tool, "throughput, latency and connection rate", error);
        }
    }
    if env.runs("pinned") {
        if let Err(error) = measure_pinned(tool, env, results) {
            results.fail(tool, "pinned latency", error);
        }
    }
    if env.runs("idle") {
        if let Err(error) = measure_idle(tool, env, results) {
            results.fail(tool, "idle connections", error);
        }
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn gbits(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

/// The `p`-th percentile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index] as f64 / 1000.0
}

fn measure_free(tool: Tool, env: &Env, results: &mut Results) -> anyhow::Result<()> {
    let plan = &env.plan;
    let backend = backend::Backend::start(2, false)?;
    let mut proxy = env.start(tool, &backend, false)?;

    if env.runs("bulk") {
        bulk(tool, plan, &proxy, results)?;
    }
    if env.runs("ping") {
        ping(tool, plan, &proxy, results)?;
    }
    if env.runs("concurrent") {
        concurrent(tool, plan, &proxy, results)?;
    }
    if env.runs("rate") {
        rate(tool, plan, &proxy, results)?;
    }
    proxy.check_alive()?;
    drop(proxy);
    drop(backend);
    Ok(())
}

/// Bulk: one stream each way, then eight; CPU per GiB over all of them.
fn bulk(
    tool: Tool,
    plan: &Plan,
    proxy: &tools::Running,
    results: &mut Results,
) -> anyhow::Result<()> {
    let addr = proxy.addr;
    let cpu_before = proxy.cpu();
    let own_before = procs::own_cpu();
    let mut moved = 0u64;
    for (streams, bytes, metric_up, metric_down) in [
        (1, plan.bulk_bytes, Metric::Bulk1Up, Metric::Bulk1Down),
        (8, plan.bulk8_bytes, Metric::Bulk8Up, Metric::Bulk8Down),
    ] {
        for (direction, metric) in [
            (Direction::Upload, metric_up),
            (Direction::Download, metric_down),
        ] {
            let elapsed = load::bulk(addr, direction, streams, bytes).context(metric.label())?;
            let total = bytes * streams as u64;
            moved += total;
            results.add(tool, metric, gbits(total, elapsed));
        }
    }
    // The client and the backend are this process's threads: what every column pays, and what
    // the proxy's CPU competes with for the machine's cores.
    let own_ms = (procs::own_cpu() - own_before).as_secs_f64() * 1e3;
    results.add(tool, Metric::SuiteCpuPerGib, own_ms / gib(moved));
    if let (Some(before), Some(after)) = (cpu_before, proxy.cpu()) {
        let ms = (after - before).as_secs_f64() * 1e3;
        results.add(tool, Metric::CpuPerGib, ms / gib(moved));
    }
    Ok(())
}

/// Ping-pong over one connection; CPU per round trip.
fn ping(
    tool: Tool,
    plan: &Plan,
    proxy: &tools::Running,
    results: &mut Results,
) -> anyhow::Result<()> {
    let addr = proxy.addr;
    let cpu_before = proxy.cpu();
    let mut samples = load::ping_pong(addr, plan.ping_warmup, plan.ping_count, false)?;
    if let (Some(before), Some(after)) = (cpu_before, proxy.cpu()) {
        let round_trips = (plan.ping_warmup + plan.ping_count) as f64;
        results.add(
            tool,
            Metric::CpuPerRoundTrip,
            (after - before).as_secs_f64() * 1e6 / round_trips,
        );
    }
    samples.sort_unstable();
    results.add(tool, Metric::PingP50, percentile_us(&samples, 50.0));
    results.add(tool, Metric::PingP99, percentile_us(&samples, 99.0));
    results.add(tool, Metric::PingP999, percentile_us(&samples, 99.9));
    Ok(())
}

/// 32 concurrent connections.
fn concurrent(
    tool: Tool,
    plan: &Plan,
    proxy: &tools::Running,
    results: &mut Results,
) -> anyhow::Result<()> {
    let addr = proxy.addr;
    let (mut samples, elapsed) = load::concurrent(addr, 32, plan.concurrent)?;
    results.add(
        tool,
        Metric::Conc32Rate,
        samples.len() as f64 / elapsed.as_secs_f64(),
    );
    samples.sort_unstable();
    results.add(tool, Metric::Conc32P50, percentile_us(&samples, 50.0));
    results.add(tool, Metric::Conc32P99, percentile_us(&samples, 99.0));
    Ok(())
}

/// New connections; CPU per 1,000.
fn rate(
    tool: Tool,
    plan: &Plan,
    proxy: &tools::Running,
    results: &mut Results,
) -> anyhow::Result<()> {
    let addr = proxy.addr;
    let cpu_before = proxy.cpu();
    let rate = load::connection_rate(addr, 64, plan.rate)?;
    if let (Some(before), Some(after)) = (cpu_before, proxy.cpu()) {
        if rate.ok > 0 {
            results.add(
                tool,
                Metric::CpuPer1000Conns,
                (after - before).as_secs_f64() * 1e3 * 1000.0 / rate.ok as f64,
            );
        }
    }
    results.add(
        tool,
        Metric::ConnRate,
        rate.ok as f64 / rate.elapsed.as_secs_f64(),
    );
    results.add(tool, Metric::ConnErrors, rate.errors as f64);
    Ok(())
}

fn measure_pinned(tool: Tool, env: &Env, results: &mut Results) -> anyhow::Result<()> {
    let plan = &env.plan;
    let backend = backend::Backend::start(1, true)?;
    let mut proxy = env.start(tool, &backend, true)?;
    let mut samples = load::ping_pong(proxy.addr, plan.ping_warmup, plan.ping_count, true)?;
    samples.sort_unstable();
    results.add(tool, Metric::PinnedP50, percentile_us(&samples, 50.0));
    results.add(tool, Metric::PinnedP99, percentile_us(&samples, 99.0));
    results.add(tool, Metric::PinnedP999, percentile_us(&samples, 99.9));
    proxy.check_alive()?;
    Ok(())
}

fn measure_idle(tool: Tool, env: &Env, results: &mut Results) -> anyhow::Result<()> {
    let plan = &env.plan;
    let backend = backend::Backend::start(2, false)?;
    let mut proxy = env.start(tool, &backend, false)?;
    let (mut streams, error) = load::open_idle(proxy.addr, plan.idle, Duration::from_secs(120));
    let opened = streams.len();
    // Let the proxy settle (socat's children, allocator caches) before reading memory.
    std::thread::sleep(Duration::from_millis(500));
    let memory = proxy.pgid().map(procs::group_memory);
    let alive = load::still_alive(&mut streams);
    results.add(tool, Metric::IdleHeld, alive as f64);
    if let Some(memory) = memory {
        results.add(tool, Metric::IdleRss, memory.rss_kib as f64 / 1024.0);
        results.add(tool, Metric::IdlePss, memory.pss_kib as f64 / 1024.0);
    }
    load::reset_all(streams);
    proxy.check_alive()?;
    if alive != opened {
        anyhow::bail!("only {alive} of {opened} open idle connections still echoed");
    }
    if let Some(error) = error {
        // A proxy that stops accepting at its own limit is a result (the row shows how many it
        // held), not a failure of the harness.
        results.note(
            tool,
            format!("held {alive} of {} idle connections: {error}", plan.idle),
        );
    }
    Ok(())
}
