//! The `serf` command line of amb-serf: every subcommand, run through a symlink named `serf`
//! with Go's single-dash flags, prints what Go's own `serf` prints for the same arguments,
//! against a real `serf agent` and against an `amb-serf agent` alike.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{eventually, free_port, loopback, require, Child, SerfAgent, DEADLINE};

use crate::agent::AmbAgent;
use crate::support::{stdout_lines, unordered_lines, wait_for_line};

/// A directory holding `serf`, a symlink to the amb-serf binary.
struct Symlink {
    dir: tempfile::TempDir,
}

impl Symlink {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_amb-serf"), dir.path().join("serf"))
            .expect("symlink named serf");
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("serf")
    }
}

/// `PROGRAM SUBCOMMAND -rpc-addr=RPC REST…`, without the variables that would change it.
fn command(program: PathBuf, rpc: SocketAddr, args: &[&str]) -> Command {
    let (subcommand, rest) = args.split_first().expect("a subcommand");
    let mut command = Command::new(program);
    command
        .arg(subcommand)
        .arg(format!("-rpc-addr={rpc}"))
        .args(rest);
    for var in [
        "AMB_RPC_ADDR",
        "AMB_RPC_AUTH",
        "SERF_RPC_ADDR",
        "SERF_RPC_AUTH",
        "AMB_LOG_LEVEL",
    ] {
        command.env_remove(var);
    }
    command
}

fn run(command: &mut Command) -> Output {
    testkit::run_with_timeout(command, Duration::from_secs(30))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Ours and Go's output of the same arguments at `rpc`.
fn both(serf: &Symlink, rpc: SocketAddr, args: &[&str]) -> (Output, Output) {
    let ours = run(&mut command(serf.path(), rpc, args));
    let go = run(&mut command(require("serf"), rpc, args));
    assert_eq!(
        ours.status.code(),
        go.status.code(),
        "{args:?} exit status\nours: {}\ngo: {}",
        describe(&ours),
        describe(&go)
    );
    (ours, go)
}

/// Ours and Go's stdout must be equal after `normalize`.
fn same(serf: &Symlink, rpc: SocketAddr, args: &[&str], normalize: fn(&str) -> String) {
    let (ours, go) = both(serf, rpc, args);
    assert_eq!(
        normalize(&text(&ours.stdout)),
        normalize(&text(&go.stdout)),
        "{args:?} at {rpc}\nours: {}\ngo: {}",
        describe(&ours),
        describe(&go)
    );
}

fn exact(text: &str) -> String {
    text.to_owned()
}

/// Lines sorted, and each `k=v,k=v` tag list sorted (Go prints maps in random order).
fn unordered(text: &str) -> String {
    unordered_lines(text, false).join("\n")
}

/// `serf info`: the section and key names (the values move on with time).
fn info_keys(text: &str) -> String {
    text.lines()
        .map(|line| line.split(" = ").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `serf info -format json`: the key structure.
fn json_keys(text: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(text).expect("json");
    let sections = value.as_object().expect("an object");
    sections
        .iter()
        .map(|(name, keys)| {
            let keys: Vec<&String> = keys.as_object().expect("a section").keys().collect();
            format!("{name}: {keys:?}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `serf query -format json` with the acks sorted (they arrive in any order).
fn query_json(text: &str) -> String {
    let mut value: serde_json::Value = serde_json::from_str(text).expect("json");
    if let Some(acks) = value["Acks"].as_array_mut() {
        acks.sort_by_key(|ack| ack.as_str().unwrap_or_default().to_owned());
    }
    value.to_string()
}

/// `Estimated a <-> b rtt:` without the estimate, which changes with every probe.
fn rtt_nodes(text: &str) -> String {
    text.split(" rtt: ").next().unwrap_or_default().to_owned()
}

/// A Go agent (`go`, answers the `whoami` query) and an amb-serf agent (`amb`) joined.
fn cluster() -> (SerfAgent, AmbAgent) {
    let go = SerfAgent::start(
        "go",
        loopback(1),
        &["-tag=role=web", "-event-handler=query:whoami=echo go-here"],
    );
    let amb = AmbAgent::start(
        "amb",
        loopback(2),
        &["--tag", "role=3306", "--join", &go.bind.to_string()],
    );
    for rpc in [go.rpc, amb.rpc] {
        eventually(DEADLINE, "both agents see two alive members", || {
            let output = run(&mut command(
                require("serf"),
                rpc,
                &["members", "-status=alive"],
            ));
            (text(&output.stdout).lines().count() == 2).then_some(())
        });
    }
    (go, amb)
}

#[test]
fn every_serf_subcommand_prints_what_go_serf_prints() {
    let serf = Symlink::new();
    let (go, amb) = cluster();
    let go_bind = go.bind.to_string();
    for rpc in [go.rpc, amb.rpc] {
        same(&serf, rpc, &["members"], unordered);
        same(&serf, rpc, &["members", "-role=web"], unordered);
        same(
            &serf,
            rpc,
            &["members", "-detailed=false", "-format", "json"],
            unordered,
        );
        same(
            &serf,
            rpc,
            &["members", "-status=alive", "-name=am."],
            unordered,
        );
        same(&serf, rpc, &["event", "deploy", "v2"], exact);
        same(&serf, rpc, &["event", "-coalesce=false", "deploy"], exact);
        same(
            &serf,
            rpc,
            &["tags", "-set", "version=2", "-set=zone=a"],
            exact,
        );
        same(&serf, rpc, &["tags", "-delete", "zone"], exact);
        same(&serf, rpc, &["join", &go_bind], exact);
        same(&serf, rpc, &["join", "-replay", &go_bind], exact);
        same(&serf, rpc, &["force-leave", "nobody"], exact);
        same(&serf, rpc, &["force-leave", "-prune", "nobody"], exact);
        same(&serf, rpc, &["query", "-timeout=1s", "whoami"], unordered);
        same(
            &serf,
            rpc,
            &["query", "-timeout", "1s", "-no-ack", "whoami"],
            unordered,
        );
        same(
            &serf,
            rpc,
            &["query", "-timeout=1s", "-node=go", "whoami", "x"],
            unordered,
        );
        same(
            &serf,
            rpc,
            &["query", "-timeout=1s", "-tag", "role=3306", "whoami"],
            unordered,
        );
        same(
            &serf,
            rpc,
            &["query", "-timeout=1s", "-format=json", "whoami"],
            query_json,
        );
        same(&serf, rpc, &["reachability"], exact);
        same(&serf, rpc, &["info"], info_keys);
        same(&serf, rpc, &["info", "-format", "json"], json_keys);
        same(&serf, rpc, &["rtt", "go", "amb"], rtt_nodes);
        same(&serf, rpc, &["rtt", "go"], rtt_nodes);
        // Unencrypted: every member reports an empty keyring (in any order); exit 1.
        same(&serf, rpc, &["keys", "-list"], unordered);
    }
    let (ours, _) = both(&serf, go.rpc, &["rtt", "nobody"]);
    assert!(
        text(&ours.stderr).contains("Could not find a coordinate for node \"nobody\""),
        "{}",
        describe(&ours)
    );

    // version: the protocol line is Go's.
    let ours = run(Command::new(serf.path()).arg("version"));
    let go_version = run(Command::new(require("serf")).arg("version"));
    assert_eq!(
        text(&ours.stdout).lines().nth(1),
        text(&go_version.stdout).lines().nth(1),
        "{}",
        describe(&ours)
    );

    // keygen: 32 random bytes in base64, different each time.
    let key = run(Command::new(serf.path()).arg("keygen"));
    let again = run(Command::new(serf.path()).arg("keygen"));
    assert!(key.status.success(), "{}", describe(&key));
    assert_eq!(text(&key.stdout).trim().len(), 44, "{}", describe(&key));
    assert_ne!(key.stdout, again.stdout);

    // leave, last and once per agent: ours makes the Go agent leave, Go's the amb-serf agent.
    let ours = run(&mut command(serf.path(), go.rpc, &["leave"]));
    let go_cli = run(&mut command(require("serf"), amb.rpc, &["leave"]));
    for output in [&ours, &go_cli] {
        assert!(output.status.success(), "{}", describe(output));
        assert_eq!(text(&output.stdout), "Graceful leave complete\n");
    }
}

#[test]
fn keys_rotate_through_both_agents_as_go_serf_shows_them() {
    let serf = Symlink::new();
    let key = text(&run(Command::new(require("serf")).arg("keygen")).stdout)
        .trim()
        .to_owned();
    let new_key = text(&run(Command::new(serf.path()).arg("keygen")).stdout)
        .trim()
        .to_owned();
    let encrypt = format!("-encrypt={key}");
    let go = SerfAgent::start("kgo", loopback(3), &[&encrypt]);
    let amb = AmbAgent::start(
        "kamb",
        loopback(4),
        &["--encrypt", &key, "--join", &go.bind.to_string()],
    );
    eventually(DEADLINE, "the encrypted agents see each other", || {
        let output = run(&mut command(require("serf"), go.rpc, &["members"]));
        (text(&output.stdout).lines().count() == 2).then_some(())
    });
    let install = format!("-install={new_key}");
    let use_new = format!("-use={new_key}");
    let remove_old = format!("-remove={key}");
    for rpc in [go.rpc, amb.rpc] {
        same(&serf, rpc, &["keys", "-list"], unordered);
        same(&serf, rpc, &["keys", &install], unordered);
        same(&serf, rpc, &["keys", "-list"], unordered);
        same(&serf, rpc, &["keys", "-install=not-base64"], unordered);
    }
    // The primary key cannot be removed; once the new one is primary, the old one can.
    let remove_new = format!("-remove={new_key}");
    same(&serf, amb.rpc, &["keys", &use_new], unordered);
    same(&serf, go.rpc, &["keys", &remove_new], unordered);
    same(&serf, amb.rpc, &["keys", &remove_old], unordered);
    same(&serf, go.rpc, &["keys", "-list"], unordered);
}

#[test]
fn monitor_streams_logs_and_events_until_interrupted() {
    let serf = Symlink::new();
    let (go, amb) = cluster();
    for rpc in [go.rpc, amb.rpc] {
        let mut monitor = command(serf.path(), rpc, &["monitor", "-log-level=debug"]);
        let mut child = Child::spawn_piped("serf monitor", &mut monitor);
        let lines = stdout_lines(&mut child);
        // The event stream is up before the first log line arrives.
        wait_for_line(&lines, "a log line", "[");
        let sent = run(&mut command(
            require("serf"),
            rpc,
            &["event", "hello", "wo"],
        ));
        assert!(sent.status.success(), "{}", describe(&sent));
        wait_for_line(&lines, "the event", "Event Info:");
        wait_for_line(&lines, "its payload", "\tPayload: []byte{0x77, 0x6f}");
        child.signal(libc::SIGINT);
        let status = child
            .wait_timeout(DEADLINE)
            .expect("monitor exits on SIGINT");
        assert!(status.success(), "{status:?}");
    }
}

/// `serf agent -node x -bind IP -profile local …`: one dash, a bind address without a port.
#[test]
fn agent_takes_go_flags_and_binds_7946_without_a_port() {
    let serf = Symlink::new();
    let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let ip = loopback(231);
    let mut agent = Command::new(serf.path());
    agent.args([
        "agent",
        "-node=gox",
        &format!("-bind={ip}"),
        &format!("-rpc-addr={rpc}"),
        "-tag",
        "role=web",
        "-log-level=debug",
        "-profile=local",
    ]);
    let _agent = Child::spawn("serf agent (amb-serf)", &mut agent, None);
    let output = eventually(DEADLINE, "the agent answers", || {
        let output = run(&mut command(require("serf"), rpc, &["members"]));
        output.status.success().then_some(output)
    });
    assert_eq!(
        text(&output.stdout),
        format!("gox  {ip}:7946  alive  role=web\n")
    );
}

#[test]
fn a_binary_named_serf_needs_a_subcommand() {
    let serf = Symlink::new();
    let output = run(&mut Command::new(serf.path()));
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("Usage: serf"),
        "{}",
        describe(&output)
    );
}

#[test]
fn agent_reloads_config_tags_file_and_handlers_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.json");
    let tags_file = dir.path().join("tags.json");
    std::fs::write(&config, r#"{"log_level": "warn", "tags": {"zone": "a"}}"#).unwrap();
    std::fs::write(&tags_file, r#"{"rack": "r1"}"#).unwrap();
    let (config_text, tags_text) = (
        config.display().to_string(),
        tags_file.display().to_string(),
    );
    let agent = AmbAgent::start(
        "hup",
        loopback(5),
        &[
            "-config-file",
            &config_text,
            "-tags-file",
            &tags_text,
            "-tag=fixed=1",
        ],
    );
    // Tags sorted: Go prints them in map order.
    let members = |rpc| {
        unordered(&text(
            &run(&mut command(require("serf"), rpc, &["members"])).stdout,
        ))
    };
    assert!(
        members(agent.rpc).contains("alive  fixed=1,rack=r1,zone=a"),
        "{}",
        members(agent.rpc)
    );
    assert!(
        !agent.log().contains("rpc request"),
        "warn from the config file:\n{}",
        agent.log()
    );

    // New level, tags and handler in the config file, a new rack in the tags file; `-tag` wins.
    std::fs::write(
        &config,
        r#"{"log_level": "debug", "tags": {"zone": "b", "fixed": "2"},
            "event_handlers": ["query:whoami=echo reloaded"]}"#,
    )
    .unwrap();
    std::fs::write(&tags_file, r#"{"rack": "r2", "zone": "x"}"#).unwrap();
    agent.child.signal(libc::SIGHUP);
    eventually(DEADLINE, "the reloaded tags", || {
        members(agent.rpc)
            .contains("alive  fixed=1,rack=r2,zone=b")
            .then_some(())
    });
    let query = run(&mut command(
        require("serf"),
        agent.rpc,
        &["query", "-timeout=1s", "whoami"],
    ));
    assert!(
        text(&query.stdout).contains("Response from 'hup': reloaded"),
        "{}",
        describe(&query)
    );
    eventually(DEADLINE, "debug lines after the reload", || {
        agent.log().contains("rpc request").then_some(())
    });
    // `serf info` lists the reloaded handlers, not the ones at start (none).
    let info = run(&mut command(
        require("serf"),
        agent.rpc,
        &["info", "-format=json"],
    ));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert_eq!(
        info["event_handlers"],
        serde_json::json!({"query:whoami": "echo reloaded"}),
        "{info}"
    );

    // A broken config file keeps the running configuration, and the agent.
    std::fs::write(&config, r#"{"log_level": "inf"}"#).unwrap();
    agent.child.signal(libc::SIGHUP);
    eventually(DEADLINE, "the failed reload logged", || {
        agent.log().contains("reload failed").then_some(())
    });
    assert!(
        agent
            .log()
            .contains(r#"log_level \"inf\" is neither a level"#),
        "{}",
        agent.log()
    );
    assert!(members(agent.rpc).contains("alive  fixed=1,rack=r2,zone=b"));
}

#[test]
fn run_reloads_its_event_handlers_and_tags_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"event_handlers": [], "tags": {"zone": "a"}}"#).unwrap();
    let ip = loopback(233);
    let gossip = format!("{ip}:{}", free_port(ip));
    let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let (rpc_text, config_text) = (rpc.to_string(), config.display().to_string());
    let ambassador = crate::support::Ambassador::start_on(
        ip,
        &[],
        &[
            "--forward",
            "9=127.0.0.1:9",
            "--bind",
            &gossip,
            "--rpc-addr",
            &rpc_text,
            "--health-interval",
            "0",
            "-config-file",
            &config_text,
        ],
    );
    let ask = || {
        run(&mut command(
            require("serf"),
            rpc,
            &["query", "-timeout=1s", "whoami"],
        ))
    };
    let before = ask();
    assert!(
        text(&before.stdout).contains("Total Responses: 0"),
        "{}",
        describe(&before)
    );
    // Our tags: one member, the ambassador.
    let tags = || {
        let output = run(&mut command(
            require("serf"),
            rpc,
            &["members", "-format=json"],
        ));
        let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        value["members"][0]["tags"].clone()
    };
    assert_eq!(
        tags(),
        serde_json::json!({"zone": "a", "role": "9", "health": "passing", "ports": "9/tcp"})
    );

    // The config file's tags are reloaded; the tags `run` manages (role, health, ports,
    // service) stay its own even when the file names them.
    std::fs::write(
        &config,
        r#"{"event_handlers": ["query:whoami=echo run-reloaded"],
            "tags": {"zone": "b", "rack": "r1", "role": "mine"}}"#,
    )
    .unwrap();
    ambassador.signal(libc::SIGHUP);
    eventually(DEADLINE, "the reloaded handler answering", || {
        text(&ask().stdout)
            .contains("': run-reloaded")
            .then_some(())
    });
    eventually(DEADLINE, "the reloaded tags", || {
        (tags()
            == serde_json::json!({
                "zone": "b", "rack": "r1", "role": "9", "health": "passing", "ports": "9/tcp"
            }))
        .then_some(())
    });
    assert!(
        ambassador.log().contains("reloaded"),
        "{}",
        ambassador.log()
    );
}
