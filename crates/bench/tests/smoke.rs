//! The benchmark suite in smoke mode (a second or so per metric, one repetition): every tool
//! installed here runs every metric, and each produces a verified number; so do the cluster
//! metrics against Debian's `serf agent`, the DNS metrics against dnsmasq, and the kernel
//! section (direct, haproxy, amb-serf, amb-serf-kernel in a namespace of their own); they need
//! root for their network namespaces: without it they are skipped, with a line saying so, unless
//! `AMB_REQUIRE_PEERS=1`. No performance
//! assertion: this keeps the harness from rotting, the numbers come from the full run.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The amb-serf binary of the same profile, built if `cargo test -p bench` did not build it.
fn amb_serf(bench: &Path) -> PathBuf {
    let path = bench.with_file_name("amb-serf");
    if !path.exists() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(root).args(["build", "--bin", "amb-serf"]);
        if bench.parent().is_some_and(|dir| dir.ends_with("release")) {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build --bin amb-serf: {status}");
    }
    path
}

#[test]
fn every_metric_of_every_tool_produces_a_verified_number() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let amb_serf = amb_serf(&bench);
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.md");
    let log = dir.path().join("bench.log");
    let cluster = is_root() || std::env::var("AMB_REQUIRE_PEERS").as_deref() == Ok("1");
    if !cluster {
        eprintln!(
            "skipping the cluster and DNS metrics and the kernel section: they need root (a network namespace)"
        );
    }
    let mut child = Command::new(&bench)
        .arg("--smoke")
        .args(if cluster {
            &[][..]
        } else {
            &["--skip", "cluster,dns,kernel"][..]
        })
        .arg("--amb-serf")
        .arg(&amb_serf)
        .arg("--out")
        .arg(&report)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting bench");
    // Bounded: on a timeout, SIGTERM lets the suite kill the proxies it started, then SIGKILL.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for bench") {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(300) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        kill(child.id(), libc::SIGTERM);
        std::thread::sleep(Duration::from_secs(2));
        kill(child.id(), libc::SIGKILL);
        let _ = child.wait();
        panic!(
            "bench --smoke did not finish in 300 s; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "bench --smoke failed ({status}):\n{log}");
    let report = std::fs::read_to_string(&report).expect("bench wrote its report");
    assert!(!report.contains("**missing**"), "{report}");
    for tool in [
        "direct",
        "socat",
        "haproxy",
        "haproxy-splice",
        "nginx",
        "amb-serf",
        "amb-serf-connect",
    ] {
        assert!(
            report.contains(&format!(" {tool} |")),
            "no {tool} column:\n{report}"
        );
    }
    if cluster {
        assert!(
            report.contains("Kernel data path") && report.contains(" amb-serf-kernel |"),
            "no kernel section:\n{report}"
        );
        for row in [
            "6. ",
            "7. ",
            "8. idle member RSS",
            "9. convergence",
            "9. bytes sent",
            "9. TCP connections",
            "9. simulator",
            "10. DNS, 10 members: queries/s",
            "10. DNS, 10 members: latency p99",
        ] {
            assert!(
                report.contains(&format!("| {row}")),
                "no {row:?} row:\n{report}"
            );
        }
    }
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[allow(unsafe_code)]
fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the bench process we started.
    unsafe { libc::kill(pid as i32, signal) };
}
