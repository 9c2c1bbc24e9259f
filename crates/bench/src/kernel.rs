//! The kernel section (issue 25): direct, HAProxy, amb-serf in user space and amb-serf with
//! `--dataplane kernel`, measured like the loopback table but in a network namespace the suite
//! makes for it.
//!
//! Topology: one thread moves into a new, empty network namespace (`unshare(CLONE_NEWNET)`,
//! `lo` up) and starts everything from there, so every client, backend and proxy shares that
//! namespace's loopback: the backend on 127.0.0.1, the proxies on 127.0.0.1 or (amb-serf)
//! 127.0.0.2, which for the kernel column is an nftables `output`-hook DNAT to the backend and
//! a masquerade back. amb-serf's table lives and dies with the namespace: when the thread and
//! everything it started are gone, so is the namespace, whatever failed, and nothing outside it
//! was touched.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::bail;

use crate::report::Results;
use crate::tools::Tool;
use crate::{procs, Env};

/// The columns of the kernel table.
pub(crate) const TOOLS: [Tool; 4] = [
    Tool::Direct,
    Tool::Haproxy,
    Tool::AmbSerf,
    Tool::AmbSerfKernel,
];

/// Runs every metric of the loopback table for [`TOOLS`], `env.plan.reps` times, on a thread in
/// a network namespace of its own; failures are recorded in `results`.
pub(crate) fn measure(env: &Env, results: &mut Results) {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            if let Err(error) = procs::isolate_network() {
                results.fail(Tool::AmbSerfKernel, "network namespace", error);
                return;
            }
            for rep in 0..env.plan.reps {
                for tool in TOOLS {
                    eprintln!("kernel rep {}/{}: {}", rep + 1, env.plan.reps, tool.name());
                    crate::measure(tool, env, results);
                }
            }
        });
        if thread.join().is_err() {
            eprintln!("  FAILED the kernel section's thread panicked");
        }
    });
}

/// Waits until the kernel column's nftables table DNATs (the table is installed after the
/// user-space listeners are bound, and its rules only while the backend passes its health
/// check); until then a probe is served in user space and proves nothing.
pub(crate) fn wait_for_dnat(node: &str, log: &Path) -> anyhow::Result<()> {
    let table = format!("amb-serf-{node}");
    let mut listing = String::new();
    let ready = procs::wait_for(Duration::from_secs(20), || {
        listing = Command::new("nft")
            .args(["list", "table", "ip", &table])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        listing.contains("dnat")
    });
    if !ready {
        bail!(
            "{node}: no DNAT rule in table ip {table} within 20 s (listing: {listing:?}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

/// The kernel table, after the loopback one.
pub(crate) fn render(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "\nKernel data path (issue 25), in a network namespace of its own: client, backend and \
         proxies on its loopback; amb-serf on 127.0.0.2 (`amb-serf-kernel`: `--dataplane \
         kernel`, an nftables output-hook DNAT to the backend on 127.0.0.1)."
    );
    crate::report::table(out, results);
}
