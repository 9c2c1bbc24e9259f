//! `amb-serf members` and `amb-serf resolve` against real `serf agent`s over RPC.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::{free_port, loopback, run_with_timeout, Child, SerfAgent, DEADLINE};

use crate::support::{stdout_lines, wait_for_line};

fn amb_serf(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_amb-serf"));
    command
        .args(args)
        .env_remove("AMB_RPC_ADDR")
        .env_remove("AMB_RPC_AUTH")
        .env_remove("AMB_JOIN")
        .env_remove("AMB_RETRY_JOIN")
        .env_remove("SERF_1_PORT_7946_TCP");
    run_with_timeout(&mut command, Duration::from_secs(60))
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Lines sorted, with each `k=v,k=v` tag list sorted (Go prints tags in random order).
fn normalized(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(|line| {
            line.split(' ')
                .map(|token| {
                    if token.contains('=') {
                        let mut tags: Vec<&str> = token.split(',').collect();
                        tags.sort_unstable();
                        tags.join(",")
                    } else {
                        token.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
                .trim_end()
                .to_owned()
        })
        .collect();
    lines.sort();
    lines
}

fn sorted_json(text: &str) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(text).expect("members json");
    if let Some(members) = value["members"].as_array_mut() {
        members.sort_by_key(|member| member["name"].as_str().unwrap_or("").to_owned());
    }
    value
}

/// Two joined agents: `ra` (role=web, dc=x) and `rb` (role=3306).
fn cluster() -> (SerfAgent, SerfAgent) {
    let a = SerfAgent::start("ra", loopback(1), &["-tag=role=web", "-tag=dc=x"]);
    let b = SerfAgent::start(
        "rb",
        loopback(2),
        &["-tag=role=3306", &format!("-join={}", a.bind)],
    );
    testkit::eventually(DEADLINE, "both agents see each other", || {
        let json = a.members_json();
        (json.contains("\"rb\"") && !json.contains("failed")).then_some(())
    });
    (a, b)
}

#[test]
fn members_matches_serf_members() {
    let (a, _b) = cluster();
    let rpc = a.rpc.to_string();
    for (ours, theirs) in [
        (vec![], vec!["members"]),
        (vec!["--tag", "role=web"], vec!["members", "-tag=role=web"]),
        (
            vec!["--tag", "role=.*", "--tag", "dc=x"],
            vec!["members", "-tag=role=.*", "-tag=dc=x"],
        ),
        (vec!["--status", "alive"], vec!["members", "-status=alive"]),
        (vec!["--name", "r[b]"], vec!["members", "-name=r[b]"]),
        (vec!["--detailed"], vec!["members", "-detailed"]),
        (vec!["--name", "nobody"], vec!["members", "-name=nobody"]),
    ] {
        let mut args = vec!["members", "--rpc-addr", &rpc];
        args.extend(&ours);
        let output = amb_serf(&args);
        assert!(output.status.success(), "{ours:?}: {}", describe(&output));
        let expected = a.cli(&theirs);
        assert_eq!(
            normalized(&text(&output)),
            normalized(&text(&expected)),
            "{ours:?}"
        );
    }
    for (ours, theirs) in [
        (vec![], vec!["members", "-format=json"]),
        (
            vec!["--tag", "role=3306"],
            vec!["members", "-format=json", "-tag=role=3306"],
        ),
        (
            vec!["--name", "nobody"],
            vec!["members", "-format=json", "-name=nobody"],
        ),
    ] {
        let mut args = vec!["members", "--rpc-addr", &rpc, "--format", "json"];
        args.extend(&ours);
        let output = amb_serf(&args);
        assert!(output.status.success(), "{}", describe(&output));
        assert_eq!(
            sorted_json(&text(&output)),
            sorted_json(&text(&a.cli(&theirs))),
            "{ours:?}"
        );
    }
}

#[test]
fn members_reports_a_missing_agent() {
    let port = free_port(loopback(1));
    let output = amb_serf(&["members", "--rpc-addr", &format!("127.0.0.1:{port}")]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!(
            "amb-serf: no Serf agent at 127.0.0.1:{port}: connection refused; \
             no seed to join either (no --join, no SERF_1_PORT_7946_TCP or SERF_1_NAME, \
             no serf_1 in /etc/hosts)"
        )
    );
}

#[test]
fn members_watch_prints_a_line_per_change() {
    let (a, _b) = cluster();
    let mut command = Command::new(env!("CARGO_BIN_EXE_amb-serf"));
    command.args(["members", "--watch", "--rpc-addr", &a.rpc.to_string()]);
    let mut watcher = Child::spawn_piped("amb-serf members --watch", &mut command);
    let lines = stdout_lines(&mut watcher);
    // The initial table comes first.
    wait_for_line(&lines, "the initial table", "rb ");

    let c = SerfAgent::start("rc", loopback(3), &["-tag=role=cache"]);
    let joined = c.cli(&["join", &a.bind.to_string()]);
    assert!(joined.status.success(), "{}", describe(&joined));
    let start = Instant::now();
    let line = wait_for_line(&lines, "rc joining", "member-join rc ");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "join seen after {:?}",
        start.elapsed()
    );
    assert!(line.contains("alive role=cache"), "{line}");

    let left = c.cli(&["leave"]);
    assert!(left.status.success(), "{}", describe(&left));
    let start = Instant::now();
    wait_for_line(&lines, "rc leaving", "member-leave rc ");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "leave seen after {:?}",
        start.elapsed()
    );
    watcher.kill();
}

#[test]
fn resolve_finds_live_healthy_members() {
    let (a, b) = cluster();
    let rpc = a.rpc.to_string();
    let resolve = |args: &[&str]| {
        let mut all = vec!["resolve", "--rpc-addr", rpc.as_str()];
        all.extend(args);
        amb_serf(&all)
    };
    let check = |args: &[&str], expected: &str| {
        let output = resolve(args);
        assert!(output.status.success(), "{args:?}: {}", describe(&output));
        assert_eq!(text(&output), format!("{expected}\n"), "{args:?}");
    };
    check(&["3306"], "127.0.0.2:3306");
    check(&["3306", "--format", "host"], "127.0.0.2");
    check(
        &["3306", "--format", "env"],
        "DB_HOST=127.0.0.2 DB_PORT=3306",
    );
    check(
        &["3306", "--format", "env", "--env-prefix", "MYSQL"],
        "MYSQL_HOST=127.0.0.2 MYSQL_PORT=3306",
    );
    check(&["--tag", "dc=x", "--format", "host"], "127.0.0.1");
    let output = resolve(&["3306", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_str(&text(&output)).unwrap();
    assert_eq!(json["name"], "rb");
    assert_eq!(json["addr"], "127.0.0.2:3306");
    assert_eq!(json["tags"]["role"], "3306");

    // A service tag wins over the gossip address.
    let tagged = b.cli(&["tags", "-set", "service=10.9.8.7:33060"]);
    assert!(tagged.status.success(), "{}", describe(&tagged));
    testkit::eventually(DEADLINE, "the service tag at ra", || {
        let output = resolve(&["3306"]);
        (text(&output) == "10.9.8.7:33060\n").then_some(())
    });
    let output = resolve(&["3306", "--all", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_str(&text(&output)).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");

    // A critical member is not a candidate.
    let critical = b.cli(&["tags", "-set", "health=critical"]);
    assert!(critical.status.success(), "{}", describe(&critical));
    testkit::eventually(DEADLINE, "the critical member is skipped", || {
        let output = resolve(&["3306"]);
        (output.status.code() == Some(1)).then_some(output)
    });
    let output = resolve(&["3306"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!(
            "amb-serf: no live, healthy member advertises role=3306 (asked the Serf agent at {rpc})"
        )
    );
}

#[test]
fn resolve_waits_for_a_member_event_driven() {
    let (a, b) = cluster();
    let rpc = a.rpc.to_string();

    // Nobody has role=4000: exit 1 after the wait.
    let start = Instant::now();
    let output = amb_serf(&["resolve", "4000", "--wait", "1s", "--rpc-addr", &rpc]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("after waiting 1s"),
        "{}",
        describe(&output)
    );

    // It returns as soon as a member with the role appears.
    let mut command = Command::new(env!("CARGO_BIN_EXE_amb-serf"));
    command
        .args(["resolve", "4000", "--wait", "20s", "--rpc-addr", &rpc])
        .stdout(Stdio::piped());
    let mut waiter = Child::spawn_piped("amb-serf resolve --wait", &mut command);
    let lines = stdout_lines(&mut waiter);
    // Give it a moment to subscribe; correctness does not depend on it (it lists after
    // subscribing), only the timing assertion below does.
    std::thread::sleep(Duration::from_millis(300));
    let tagged = b.cli(&["tags", "-set", "role=4000"]);
    assert!(tagged.status.success(), "{}", describe(&tagged));
    let start = Instant::now();
    let line = wait_for_line(&lines, "resolve output", "127.0.0.2");
    assert_eq!(line, "127.0.0.2:4000");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "resolved after {:?}",
        start.elapsed()
    );
    let status = waiter
        .wait_timeout(DEADLINE)
        .expect("resolve exits once it printed");
    assert!(status.success());
}

#[test]
fn members_with_rpc_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("auth.json");
    std::fs::write(&config, r#"{"rpc_auth": "k3y"}"#).expect("writing config");
    let agent = SerfAgent::start(
        "au",
        loopback(1),
        &[&format!("-config-file={}", config.display())],
    );
    let rpc = agent.rpc.to_string();
    let output = amb_serf(&["members", "--rpc-addr", &rpc, "--rpc-auth", "k3y"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text(&output).starts_with("au "), "{}", describe(&output));
    let output = amb_serf(&["members", "--rpc-addr", &rpc]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!(
            "amb-serf: Serf agent at {rpc}: RPC auth failed: Authentication required \
             (this agent needs an RPC auth key)"
        )
    );
    let output = amb_serf(&["members", "--rpc-addr", &rpc, "--rpc-auth", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        format!("amb-serf: Serf agent at {rpc}: RPC auth failed: Invalid authentication token")
    );
}
