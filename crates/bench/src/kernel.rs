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

use crate::procs;
use crate::report::Results;
use crate::tools::Tool;

/// The columns of the kernel table.
pub(crate) const TOOLS: [Tool; 4] = [
    Tool::Direct,
    Tool::Haproxy,
    Tool::AmbSerf,
    Tool::AmbSerfKernel,
];

/// Runs `measure` (every metric of the loopback table) for each of [`TOOLS`], `reps` times, on
/// a thread in a network namespace of its own; failures are recorded in `results`.
pub(crate) fn measure(
    reps: usize,
    measure: impl Fn(Tool, &mut Results) + Sync,
    results: &mut Results,
) {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            if let Err(error) = procs::isolate_network() {
                results.fail(Tool::AmbSerfKernel, "network namespace", error);
                return;
            }
            for rep in 0..reps {
                for tool in TOOLS {
                    eprintln!("kernel rep {}/{reps}: {}", rep + 1, tool.name());
                    measure(tool, results);
                }
            }
        });
        if thread.join().is_err() {
            eprintln!("  FAILED the kernel section's thread panicked");
        }
    });
}
