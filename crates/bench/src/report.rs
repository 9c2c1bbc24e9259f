//! Samples per (tool, metric), their medians, and the markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::plan::{push_pull_period, ClusterPlan};
use crate::tools::Tool;

/// What a row compares: more is better, or less is better; latency rows also show the
/// microseconds added over direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Higher,
    /// Counts (held connections, errors): no ratio.
    Count,
    Latency,
    /// Proxy-only figures (CPU, memory): no direct column.
    ProxyCost,
    /// Less is better, direct included (the suite's own CPU): ratios to direct and HAProxy.
    Cost,
}

/// The rows of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Metric {
    Bulk1Up,
    Bulk1Down,
    Bulk8Up,
    Bulk8Down,
    PingP50,
    PingP99,
    PingP999,
    PinnedP50,
    PinnedP99,
    PinnedP999,
    Conc32Rate,
    Conc32P50,
    Conc32P99,
    ConnRate,
    ConnErrors,
    IdleHeld,
    IdleRss,
    IdlePss,
    CpuPerGib,
    SuiteCpuPerGib,
    CpuPerRoundTrip,
    CpuPer1000Conns,
}

impl Metric {
    const ALL: [Self; 22] = [
        Self::Bulk1Up,
        Self::Bulk1Down,
        Self::Bulk8Up,
        Self::Bulk8Down,
        Self::PingP50,
        Self::PingP99,
        Self::PingP999,
        Self::PinnedP50,
        Self::PinnedP99,
        Self::PinnedP999,
        Self::Conc32Rate,
        Self::Conc32P50,
        Self::Conc32P99,
        Self::ConnRate,
        Self::ConnErrors,
        Self::IdleHeld,
        Self::IdleRss,
        Self::IdlePss,
        Self::CpuPerGib,
        Self::SuiteCpuPerGib,
        Self::CpuPerRoundTrip,
        Self::CpuPer1000Conns,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Bulk1Up => "1. bulk, 1 stream, client→backend (Gbit/s)",
            Self::Bulk1Down => "1. bulk, 1 stream, backend→client (Gbit/s)",
            Self::Bulk8Up => "2. bulk, 8 streams, client→backend (Gbit/s)",
            Self::Bulk8Down => "2. bulk, 8 streams, backend→client (Gbit/s)",
            Self::PingP50 => "3. ping-pong 64 B, p50 (µs)",
            Self::PingP99 => "3. ping-pong 64 B, p99 (µs)",
            Self::PingP999 => "3. ping-pong 64 B, p99.9 (µs)",
            Self::PinnedP50 => "3. ping-pong pinned to CPU 0, p50 (µs)",
            Self::PinnedP99 => "3. ping-pong pinned to CPU 0, p99 (µs)",
            Self::PinnedP999 => "3. ping-pong pinned to CPU 0, p99.9 (µs)",
            Self::Conc32Rate => "3. 32 connections, round trips/s",
            Self::Conc32P50 => "3. 32 connections, p50 (µs)",
            Self::Conc32P99 => "3. 32 connections, p99 (µs)",
            Self::ConnRate => "4. new connections/s, 64 workers",
            Self::ConnErrors => "4. connection errors",
            Self::IdleHeld => "5. idle connections held",
            Self::IdleRss => "5. proxy RSS at the idle connections (MiB)",
            Self::IdlePss => "5. proxy PSS at the idle connections (MiB)",
            Self::CpuPerGib => "proxy CPU per GiB (ms)",
            Self::SuiteCpuPerGib => "client + backend CPU per GiB (ms; this suite's own threads)",
            Self::CpuPerRoundTrip => "proxy CPU per round trip (µs)",
            Self::CpuPer1000Conns => "proxy CPU per 1,000 connections (ms)",
        }
    }

    /// The part of the suite that measures it (the names `--skip` takes).
    pub(crate) fn group(self) -> &'static str {
        match self {
            Self::Bulk1Up
            | Self::Bulk1Down
            | Self::Bulk8Up
            | Self::Bulk8Down
            | Self::CpuPerGib
            | Self::SuiteCpuPerGib => "bulk",
            Self::PingP50 | Self::PingP99 | Self::PingP999 | Self::CpuPerRoundTrip => "ping",
            Self::PinnedP50 | Self::PinnedP99 | Self::PinnedP999 => "pinned",
            Self::Conc32Rate | Self::Conc32P50 | Self::Conc32P99 => "concurrent",
            Self::ConnRate | Self::ConnErrors | Self::CpuPer1000Conns => "rate",
            Self::IdleHeld | Self::IdleRss | Self::IdlePss => "idle",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Self::Bulk1Up
            | Self::Bulk1Down
            | Self::Bulk8Up
            | Self::Bulk8Down
            | Self::Conc32Rate
            | Self::ConnRate => Kind::Higher,
            Self::IdleHeld | Self::ConnErrors => Kind::Count,
            Self::PingP50
            | Self::PingP99
            | Self::PingP999
            | Self::PinnedP50
            | Self::PinnedP99
            | Self::PinnedP999
            | Self::Conc32P50
            | Self::Conc32P99 => Kind::Latency,
            Self::IdleRss
            | Self::IdlePss
            | Self::CpuPerGib
            | Self::CpuPerRoundTrip
            | Self::CpuPer1000Conns => Kind::ProxyCost,
            Self::SuiteCpuPerGib => Kind::Cost,
        }
    }
}

/// Every sample, and every failure, of a run.
pub(crate) struct Results {
    tools: Vec<Tool>,
    skip: Vec<String>,
    samples: BTreeMap<(usize, Metric), Vec<f64>>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Results {
    pub(crate) fn new(tools: &[Tool], skip: &[String]) -> Self {
        Self {
            tools: tools.to_vec(),
            skip: skip.to_vec(),
            samples: BTreeMap::new(),
            failures: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn index(&self, tool: Tool) -> usize {
        self.tools
            .iter()
            .position(|t| *t == tool)
            .expect("results are only recorded for the tools of the run")
    }

    pub(crate) fn add(&mut self, tool: Tool, metric: Metric, value: f64) {
        eprintln!("  {:<16} {:<48} {value:.2}", tool.name(), metric.label());
        let index = self.index(tool);
        self.samples.entry((index, metric)).or_default().push(value);
    }

    pub(crate) fn fail(&mut self, tool: Tool, what: &str, error: anyhow::Error) {
        let line = format!("{} {what}: {error:#}", tool.name());
        eprintln!("  FAILED {line}");
        self.failures.push(line);
    }

    /// A measured fact worth a line under the table (once per distinct text).
    pub(crate) fn note(&mut self, tool: Tool, text: String) {
        let line = format!("{}: {text}", tool.name());
        eprintln!("  note: {line}");
        if !self.notes.contains(&line) {
            self.notes.push(line);
        }
    }

    pub(crate) fn failures(&self) -> &[String] {
        &self.failures
    }

    /// The median of a cell, if it has samples.
    fn median(&self, tool: Tool, metric: Metric) -> Option<f64> {
        median(self.samples.get(&(self.index(tool), metric))?)
    }

    /// Whether every cell that should have a number has one.
    pub(crate) fn complete(&self) -> bool {
        self.tools.iter().all(|&tool| {
            Metric::ALL.iter().all(|&metric| {
                (tool == Tool::Direct && metric.kind() == Kind::ProxyCost)
                    || self.skip.iter().any(|group| group == metric.group())
                    || self.median(tool, metric).is_some()
            })
        })
    }

    /// The HAProxy anchor of a row: the better of the two HAProxy columns.
    fn anchor(&self, metric: Metric) -> Option<f64> {
        let values = [Tool::Haproxy, Tool::HaproxySplice]
            .into_iter()
            .filter(|tool| self.tools.contains(tool))
            .filter_map(|tool| self.median(tool, metric));
        match metric.kind() {
            Kind::Higher => values.reduce(f64::max),
            _ => values.reduce(f64::min),
        }
    }
}

/// The median of `values`; `None` when empty or any is not finite.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

pub(crate) fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        // Thousands separators.
        let text = format!("{value:.0}");
        let (sign, digits) = text.split_at(usize::from(text.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A whole number, with thousands separators from 1,000 on.
fn count(n: usize) -> String {
    if n >= 1000 {
        number(n as f64)
    } else {
        n.to_string()
    }
}

fn signed(value: f64) -> String {
    if value >= 0.0 {
        format!("+{}", number(value))
    } else {
        format!("−{}", number(-value))
    }
}

fn cell(results: &Results, tool: Tool, metric: Metric) -> String {
    let Some(value) = results.median(tool, metric) else {
        return if tool == Tool::Direct && metric.kind() == Kind::ProxyCost {
            "—".to_owned()
        } else {
            "**missing**".to_owned()
        };
    };
    let mut text = number(value);
    if tool == Tool::Direct {
        return text;
    }
    let direct = results
        .tools
        .contains(&Tool::Direct)
        .then(|| results.median(Tool::Direct, metric))
        .flatten();
    let anchor = results.anchor(metric);
    let mut notes = Vec::new();
    match metric.kind() {
        Kind::Count => {}
        Kind::Higher => {
            if let Some(direct) = direct.filter(|d| *d > 0.0) {
                notes.push(format!("{:.2}× d", value / direct));
            }
            if let Some(anchor) = anchor.filter(|a| *a > 0.0) {
                notes.push(format!("{:.2}× h", value / anchor));
            }
        }
        Kind::Latency => {
            if let Some(direct) = direct {
                notes.push(format!("{} over d", signed(value - direct)));
                if let Some(anchor) = anchor {
                    notes.push(format!("{} vs h", signed(value - anchor)));
                }
            }
        }
        Kind::ProxyCost => {
            if let Some(anchor) = anchor.filter(|a| *a > 0.0) {
                notes.push(format!("{:.2}× h", value / anchor));
            }
        }
        Kind::Cost => {
            if let Some(direct) = direct.filter(|d| *d > 0.0) {
                notes.push(format!("{:.2}× d", value / direct));
            }
            if let Some(anchor) = anchor.filter(|a| *a > 0.0) {
                notes.push(format!("{:.2}× h", value / anchor));
            }
        }
    }
    if !notes.is_empty() {
        let _ = write!(text, " ({})", notes.join(", "));
    }
    text
}

/// What the report says besides the numbers.
pub(crate) struct Context<'a> {
    pub(crate) results: &'a Results,
    pub(crate) plan: &'a str,
    pub(crate) command: &'a str,
    pub(crate) versions: &'a BTreeMap<&'a str, String>,
    pub(crate) load: (&'a str, &'a str),
    pub(crate) elapsed: Duration,
    /// The cluster metrics, when they ran.
    pub(crate) cluster: &'a ClusterResults,
    /// The kernel section (`kernel.rs`), when it ran.
    pub(crate) kernel: Option<&'a Results>,
    /// The DNS metrics' table (`dns::DnsResults::render`), empty when they did not run.
    pub(crate) dns: &'a str,
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({model}), Linux {}", kernel.trim())
}

/// The markdown report.
pub(crate) fn render(context: &Context<'_>) -> String {
    let results = context.results;
    let mut out = String::new();
    let _ = writeln!(out, "Command: `{}`  ", context.command);
    let _ = writeln!(out, "Machine: {}  ", machine());
    let _ = writeln!(
        out,
        "Load average before / after: `{}` / `{}`; run took {:.0} s  ",
        context.load.0,
        context.load.1,
        context.elapsed.as_secs_f64()
    );
    let _ = writeln!(out, "Plan: `{}`  ", context.plan);
    for (tool, version) in context.versions {
        let _ = writeln!(out, "{tool}: `{version}`  ");
    }
    if !context.cluster.is_empty() {
        render_cluster(&mut out, context.cluster);
    }
    out.push_str(context.dns);
    if !results.tools.is_empty() {
        table(&mut out, results);
    }
    if let Some(kernel) = context.kernel {
        let _ = writeln!(
            out,
            "\nKernel data path (issue 25), in a network namespace of its own: client, backend \
             and proxies on its loopback; amb-serf on 127.0.0.2 (`amb-serf-kernel`: \
             `--dataplane kernel`, an nftables output-hook DNAT to the backend on 127.0.0.1)."
        );
        table(&mut out, kernel);
    }
    out
}

/// The table of `results`, with its notes and failures.
fn table(out: &mut String, results: &Results) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Cells are medians; `d` = direct, `h` = the better HAProxy column for that row; latency \
         cells show µs added over direct and the difference to HAProxy."
    );
    let _ = writeln!(out);
    let _ = write!(out, "| metric |");
    for tool in &results.tools {
        let _ = write!(out, " {} |", tool.name());
    }
    let _ = writeln!(out);
    let _ = write!(out, "|---|");
    for _ in &results.tools {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    for metric in Metric::ALL {
        if results.skip.iter().any(|group| group == metric.group()) {
            continue;
        }
        let _ = write!(out, "| {} |", metric.label());
        for &tool in &results.tools {
            let _ = write!(out, " {} |", cell(results, tool, metric));
        }
        let _ = writeln!(out);
    }
    if !results.notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for note in &results.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    if !results.failures.is_empty() {
        let _ = writeln!(out, "\nFailures:\n");
        for failure in &results.failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
}

const BEGIN: &str = "<!-- bench:begin (written by `cargo run --release -p bench`) -->";
const END: &str = "<!-- bench:end -->";

/// Writes `text` between the markers of `path`, keeping what is around them; creates the file
/// with the markers if it has none.
pub(crate) fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{text}{END}");
    let new = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{block}{}",
            &existing[..begin],
            &existing[end + END.len()..]
        ),
        _ => format!("# Benchmarks\n\n{block}\n{existing}"),
    };
    std::fs::write(path, new)
}

/// A column of the cluster table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Column {
    /// amb-serf's member (`run`, or `agent` for gossip).
    AmbSerf,
    /// Debian's `serf agent` (plus `socat` for the idle member).
    Serf,
}

impl Column {
    pub(crate) const ALL: [Self; 2] = [Self::AmbSerf, Self::Serf];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::AmbSerf => "amb-serf",
            Self::Serf => "serf",
        }
    }
}

/// The rows of the cluster table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ClusterMetric {
    Register,
    Detect,
    IdleRss,
    IdlePss,
    IdleCpu,
    Converge,
    GossipBytes,
    GossipTcpOpens,
    /// Simulated members.
    SimConverge(usize),
    SimBytes(usize),
    SimSpread(usize),
}

impl ClusterMetric {
    fn label(self, plan: &ClusterPlan) -> String {
        let (amb, serf) = (plan.gossip_amb, plan.gossip_serf);
        let period = push_pull_period(amb + serf);
        let window = format!(
            "over {} s from {} s after convergence: {} push-pull periods of {} s",
            plan.gossip_window.as_secs_f64(),
            plan.gossip_settle.as_secs_f64(),
            number(plan.gossip_window.as_secs_f64() / period.as_secs_f64()),
            period.as_secs_f64(),
        );
        match self {
            Self::Register => "6. start → alive with its tags at a real agent (ms)".to_owned(),
            Self::Detect => "7. SIGKILL → `failed` at a real agent (s)".to_owned(),
            Self::IdleRss => "8. idle member RSS (MiB; serf: agent + socat)".to_owned(),
            Self::IdlePss => "8. idle member PSS (MiB; serf: agent + socat)".to_owned(),
            Self::IdleCpu => "8. idle member CPU (% of a core; serf: agent + socat)".to_owned(),
            Self::Converge => format!(
                "9. convergence, {amb} amb-serf + {serf} serf agents (serf: {} serf agents) (s)",
                amb + serf
            ),
            Self::GossipBytes => format!(
                "9. bytes sent per member per second, same clusters (lo, headers included; \
                 {window})"
            ),
            Self::GossipTcpOpens => "9. TCP connections opened per member per push-pull period, \
                                      same window (push-pulls; a ping's TCP fallback)"
                .to_owned(),
            Self::SimConverge(n) => {
                format!(
                    "9. simulator, {} members: all join at once → converged (simulated s)",
                    count(n)
                )
            }
            Self::SimBytes(n) => format!(
                "9. simulator, {} members: payload bytes sent per member per second",
                count(n)
            ),
            Self::SimSpread(n) => format!(
                "9. simulator, {} members: one broadcast → every member (simulated s)",
                count(n)
            ),
        }
    }

    /// The part of the suite that measures it (the names `--skip` takes).
    pub(crate) fn group(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Detect => "detect",
            Self::IdleRss | Self::IdlePss | Self::IdleCpu => "idle-member",
            Self::Converge | Self::GossipBytes | Self::GossipTcpOpens => "gossip",
            Self::SimConverge(_) | Self::SimBytes(_) | Self::SimSpread(_) => "sim",
        }
    }

    /// Columns that get a number (the simulator is amb-serf's core only).
    fn columns(self) -> &'static [Column] {
        match self {
            Self::SimConverge(_) | Self::SimBytes(_) | Self::SimSpread(_) => &[Column::AmbSerf],
            _ => &Column::ALL,
        }
    }
}

/// Every sample and failure of the cluster metrics.
pub(crate) struct ClusterResults {
    /// The rows expected (those not skipped).
    rows: Vec<ClusterMetric>,
    /// The plan, for the labels (sizes of the gossip cluster, its window).
    plan: ClusterPlan,
    samples: BTreeMap<(ClusterMetric, Column), Vec<f64>>,
    failures: Vec<String>,
}

impl ClusterResults {
    pub(crate) fn new(plan: ClusterPlan, runs: impl Fn(&str) -> bool) -> Self {
        let mut rows = vec![
            ClusterMetric::Register,
            ClusterMetric::Detect,
            ClusterMetric::IdleRss,
            ClusterMetric::IdlePss,
            ClusterMetric::IdleCpu,
            ClusterMetric::Converge,
            ClusterMetric::GossipBytes,
            ClusterMetric::GossipTcpOpens,
        ];
        let sim_sizes = plan.sim_sizes;
        rows.extend(sim_sizes.iter().map(|&n| ClusterMetric::SimConverge(n)));
        rows.extend(sim_sizes.iter().map(|&n| ClusterMetric::SimSpread(n)));
        rows.extend(sim_sizes.iter().map(|&n| ClusterMetric::SimBytes(n)));
        rows.retain(|row| runs(row.group()));
        Self {
            rows,
            plan,
            samples: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, column: Column, metric: ClusterMetric, value: f64) {
        eprintln!(
            "  {:<9} {:<72} {value:.2}",
            column.name(),
            metric.label(&self.plan)
        );
        self.samples
            .entry((metric, column))
            .or_default()
            .push(value);
    }

    pub(crate) fn fail(&mut self, what: &str, error: anyhow::Error) {
        let line = format!("{what}: {error:#}");
        eprintln!("  FAILED {line}");
        self.failures.push(line);
    }

    pub(crate) fn failures(&self) -> &[String] {
        &self.failures
    }

    fn median(&self, metric: ClusterMetric, column: Column) -> Option<f64> {
        median(self.samples.get(&(metric, column))?)
    }

    /// Whether every expected cell has a number.
    pub(crate) fn complete(&self) -> bool {
        self.rows.iter().all(|&row| {
            row.columns()
                .iter()
                .all(|&column| self.median(row, column).is_some())
        })
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

fn cluster_cell(results: &ClusterResults, metric: ClusterMetric, column: Column) -> String {
    if !metric.columns().contains(&column) {
        return "—".to_owned();
    }
    let Some(value) = results.median(metric, column) else {
        return "**missing**".to_owned();
    };
    let mut text = number(value);
    if column != Column::Serf {
        if let Some(serf) = results
            .median(metric, Column::Serf)
            .filter(|serf| *serf > 0.0)
        {
            let _ = write!(text, " ({:.2}× s)", value / serf);
        }
    }
    text
}

fn render_cluster(out: &mut String, results: &ClusterResults) {
    let _ = writeln!(
        out,
        "\nCluster metrics against Debian's `serf agent`, in a network namespace of their own; \
         cells are medians, `s` = the serf column.\n"
    );
    let _ = writeln!(out, "| metric | amb-serf | serf |");
    let _ = writeln!(out, "|---|---|---|");
    for &metric in &results.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            metric.label(&results.plan),
            cluster_cell(results, metric, Column::AmbSerf),
            cluster_cell(results, metric, Column::Serf)
        );
    }
    if !results.failures.is_empty() {
        let _ = writeln!(out, "\nCluster failures:\n");
        for failure in &results.failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        for (value, text) in [
            (14158.4, "14,158"),
            (103_867.0, "103,867"),
            (785.2, "785"),
            (19.04, "19.0"),
            (0.4, "0.40"),
        ] {
            assert_eq!(number(value), text, "{value}");
        }
    }
}
