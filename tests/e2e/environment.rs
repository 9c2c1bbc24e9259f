//! What the binary takes from its environment: a variable that is not UTF-8 crashes no command,
//! and an absurd duration is refused at start.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{eventually, free_port, loopback, Child, DEADLINE};

use crate::support::{self, Ambassador};

/// A name and a value that are not UTF-8 (`std::env::vars()` panics on either).
fn with_non_utf8(mut command: Command) -> Command {
    command
        .env(OsStr::from_bytes(b"JUNK_\xff_NAME"), "1")
        .env("JUNK_VALUE", OsStr::from_bytes(b"caf\xe9 \xfe\xff"));
    command
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn one_shot_commands_survive_a_non_utf8_variable() {
    let rpc = format!("127.0.0.1:{}", free_port(loopback(1)));
    for args in [
        vec!["members", "--rpc-addr", &rpc],
        vec!["resolve", "3306", "--rpc-addr", &rpc],
    ] {
        let mut command = with_non_utf8(support::command(&[], &args));
        let output = testkit::run_with_timeout(&mut command, DEADLINE);
        // No agent and no seed: the usual error (exit 1), not a panic (exit 101).
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("no Serf agent at {rpc}")),
            "{args:?}: {}",
            describe(&output)
        );
    }
}

#[test]
fn long_running_commands_survive_a_non_utf8_variable() {
    let bind = |n: u8| format!("127.0.0.1:{}", free_port(loopback(n)));
    // `run` and `connect` log `ready`; the support helper fails if they exit first.
    let run = Ambassador::start_prepared(with_non_utf8(support::command(
        &[],
        &[
            "run",
            "--listen-addr",
            "127.0.0.1",
            "--bind",
            &bind(1),
            "--rpc-addr",
            "127.0.0.1:0",
        ],
    )));
    let listen = free_port(loopback(1)).to_string();
    let role = format!("web={listen}");
    let connect = Ambassador::start_prepared(with_non_utf8(support::command(
        &[],
        &[
            "connect",
            &role,
            "--listen-addr",
            "127.0.0.1",
            "--bind",
            &bind(1),
            "--rpc-addr",
            "127.0.0.1:0",
        ],
    )));
    // `agent` has no `ready` line: its RPC answering is the sign.
    let rpc = bind(1);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = Child::spawn(
        "amb-serf agent",
        &mut with_non_utf8(support::command(
            &[],
            &[
                "agent",
                "--node",
                "a",
                "--bind",
                &bind(1),
                "--rpc-addr",
                &rpc,
            ],
        )),
        Some(&log),
    );
    eventually(DEADLINE, "the agent's RPC answering", || {
        if let Some(status) = agent.wait_timeout(Duration::ZERO) {
            panic!(
                "amb-serf agent exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        support::run_to_exit(&[], &["members", "--rpc-addr", &rpc])
            .status
            .success()
            .then_some(())
    });
    for ambassador in [run, connect] {
        let mut ambassador = ambassador;
        assert!(ambassador.is_running(), "{}", ambassador.log());
    }
}

#[test]
fn absurd_durations_are_refused_at_start_naming_the_flag() {
    for (vars, args, flag) in [
        (
            vec![("AMB_DRAIN_TIMEOUT", "18000000000000000000s")],
            vec!["run"],
            "--drain-timeout",
        ),
        (
            vec![],
            vec!["run", "--health-interval", "101y"],
            "--health-interval",
        ),
        (
            vec![("AMB_WAIT_FOR_TARGET", "900000h")],
            vec!["connect", "web=8080"],
            "--wait-for-target",
        ),
        (vec![], vec!["resolve", "x", "--wait=-1s"], "--wait"),
    ] {
        let output = support::run_to_exit(&vars, &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{vars:?} {args:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{vars:?} {args:?}: {stderr}");
    }
}

/// The longest accepted drain timeout is one SIGTERM survives: the process leaves, drains
/// (nothing is open) and exits 0 instead of aborting on `Instant + timeout`.
#[test]
fn a_100_year_drain_timeout_still_stops_cleanly() {
    let mut ambassador = Ambassador::start(&[("AMB_DRAIN_TIMEOUT", "876000h")], &[]);
    ambassador.signal(libc::SIGTERM);
    let status = ambassador.wait_exit(DEADLINE);
    assert!(status.success(), "{status}:\n{}", ambassador.log());
}
