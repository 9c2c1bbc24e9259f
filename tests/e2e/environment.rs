//! What the binary takes from its environment: a variable that is not UTF-8 crashes no command,
//! an absurd duration is refused at start, and event handlers do not inherit secrets.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{eventually, free_port, loopback, require, Child, DEADLINE};

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
fn absurd_durations_are_refused_at_start_naming_the_flag_or_variable() {
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
        // A value from the environment is reported under the variable the user set.
        for (var, _) in &vars {
            assert!(stderr.contains(var), "{vars:?} {args:?}: {stderr}");
        }
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

/// A handler that dumps its environment sees the Serf variables but none of the daemon's
/// secrets: the link's `<ALIAS>_ENV_*`, `AMB_ENCRYPT`, `AMB_RPC_AUTH`.
#[test]
fn event_handlers_do_not_inherit_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("env.txt");
    let handler = format!("user:dump=env > {}.tmp && mv {0}.tmp {0}", dump.display());
    let rpc = format!("127.0.0.1:{}", free_port(loopback(1)));
    let bind = format!("127.0.0.1:{}", free_port(loopback(1)));
    const SECRETS: [(&str, &str); 4] = [
        ("MYSQL_ENV_MARIADB_ROOT_PASSWORD", "root-secret-1"),
        ("SERF_1_ENV_TOKEN", "serf-secret-2"),
        ("AMB_ENCRYPT", "cg8StVXbQJ0gPvMd9o7yrg=="),
        ("AMB_RPC_AUTH", "rpc-secret-3"),
    ];
    let mut vars = SECRETS.to_vec();
    vars.push(("MYSQL_PORT_3306_TCP", "tcp://127.0.0.1:3306"));
    let log = dir.path().join("agent.log");
    let mut agent = Child::spawn(
        "amb-serf agent",
        &mut support::command(
            &vars,
            &[
                "agent",
                "--node",
                "h",
                "--bind",
                &bind,
                "--rpc-addr",
                &rpc,
                "--event-handler",
                &handler,
            ],
        ),
        Some(&log),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let serf = require("serf");
    eventually(DEADLINE, "the user event sent over RPC", || {
        if let Some(status) = agent.wait_timeout(Duration::ZERO) {
            panic!("amb-serf agent exited ({status}):\n{}", agent_log());
        }
        let output = testkit::run_with_timeout(
            Command::new(&serf).args([
                "event",
                &format!("-rpc-addr={rpc}"),
                "-rpc-auth=rpc-secret-3",
                "dump",
                "x",
            ]),
            DEADLINE,
        );
        output.status.success().then_some(())
    });
    let env = eventually(DEADLINE, "the handler's environment dump", || {
        std::fs::read_to_string(&dump).ok()
    });
    assert!(env.contains("SERF_EVENT=user\n"), "{env}");
    assert!(env.contains("SERF_USER_EVENT=dump\n"), "{env}");
    assert!(env.contains("MYSQL_PORT_3306_TCP="), "{env}");
    for (name, value) in SECRETS {
        assert!(!env.contains(name), "{name} reached the handler:\n{env}");
        assert!(
            !env.contains(value),
            "{name}'s value reached the handler:\n{env}"
        );
    }
    let logged = agent_log();
    for (_, value) in SECRETS {
        assert!(!logged.contains(value), "a secret was logged:\n{logged}");
    }
}
