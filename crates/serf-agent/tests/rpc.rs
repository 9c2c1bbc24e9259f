//! Serf RPC on loopback: our client against real `serf agent`s, the real `serf` command line
//! against our server (in-memory backend), and hostile clients against our server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serf_agent::rpc::codec::{decode, encode_into, FrameBuffer};
use serf_agent::rpc::memory::{member, MemoryBackend};
use serf_agent::rpc::messages::{RequestHeader, ResponseHeader};
use serf_agent::rpc::{
    Client, Config, Error, LogLevel, MembersFilter, Query, QueryReply, Server, StreamEvent,
};
use testkit::{free_port, loopback, run_with_timeout, SerfAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const KEY1: &str = "AAECAwQFBgcICQoLDA0ODw==";
const KEY2: &str = "EBESExQVFhcYGRobHB0eHw==";

/// Runs `serf <args> -rpc-addr=<rpc>` (blocking; call from `spawn_blocking`).
fn serf_cli_blocking(rpc: SocketAddr, args: &[String]) -> Output {
    let mut command = Command::new(testkit::require("serf"));
    // Go's flag parsing stops at the first positional argument: the address goes first.
    let (subcommand, rest) = args.split_first().expect("a serf subcommand");
    command
        .arg(subcommand)
        .arg(format!("-rpc-addr={rpc}"))
        .args(rest);
    run_with_timeout(&mut command, Duration::from_secs(30))
}

async fn serf_cli(rpc: SocketAddr, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    tokio::task::spawn_blocking(move || serf_cli_blocking(rpc, &args))
        .await
        .expect("serf cli task")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The serf command line prints errors on stdout; look at both streams.
fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The client's error message ends with the agent's `message`.
fn assert_error_ends_with(error: &serf_agent::rpc::Error, message: &str) {
    assert!(error.to_string().ends_with(message), "{error}");
}

/// The command failed and said `needle`.
fn assert_failed_with(output: &Output, needle: &str) {
    assert!(!output.status.success(), "{}", describe(output));
    assert!(all_output(output).contains(needle), "{}", describe(output));
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls an async condition until it holds or the deadline passes.
async fn eventually_async<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn with_deadline<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?}: {what}"))
}

async fn start_agent(name: &str, ip: u8, extra: &[&str]) -> SerfAgent {
    let name = name.to_owned();
    let extra: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        SerfAgent::start(&name, loopback(ip), &extra)
    })
    .await
    .expect("starting a serf agent")
}

/// A `-config-file=…` argument setting `rpc_auth` (the agent has no flag for it).
struct AuthConfig {
    arg: String,
    _dir: tempfile::TempDir,
}

fn auth_config(key: &str) -> AuthConfig {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rpc-auth.json");
    std::fs::write(&path, format!("{{\"rpc_auth\": \"{key}\"}}")).expect("writing config");
    AuthConfig {
        arg: format!("-config-file={}", path.display()),
        _dir: dir,
    }
}

/// Our server with a memory backend on a free loopback port.
struct TestServer {
    addr: SocketAddr,
    backend: Arc<MemoryBackend>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(backend: Arc<MemoryBackend>, config: Config) -> Self {
        let listener = TcpListener::bind((loopback(1), 0)).await.expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let server = Server::new(Arc::clone(&backend), config);
        let task = tokio::spawn(server.serve(listener, shutdown.clone()));
        Self {
            addr,
            backend,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        with_deadline("server stops", self.task)
            .await
            .expect("server task");
    }
}

fn gossip(ip: u8, port: u16) -> SocketAddr {
    SocketAddr::from((loopback(ip), port))
}

/// Lines sorted, with each `k=v,k=v` tag list sorted (Go prints tags in random map order).
fn sorted_lines(text: &str) -> Vec<String> {
    let sort_tags = |token: &str| -> String {
        if token.contains('=') {
            let mut tags: Vec<&str> = token.split(',').collect();
            tags.sort_unstable();
            tags.join(",")
        } else {
            token.to_owned()
        }
    };
    let mut lines: Vec<String> = text
        .lines()
        .map(|line| {
            line.split(' ')
                .map(sort_tags)
                .collect::<Vec<_>>()
                .join(" ")
                .trim_end()
                .to_owned()
        })
        .collect();
    lines.sort();
    lines
}

fn sorted_json_members(text: &str) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(text).expect("members json");
    if let Some(members) = value["members"].as_array_mut() {
        members.sort_by_key(|member| member["name"].as_str().unwrap_or("").to_owned());
    }
    value
}

// ---------------------------------------------------------------------------------------------
// The client against real agents.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_a_missing_agent_clearly() {
    let port = free_port(loopback(1));
    let addr = format!("127.0.0.1:{port}");
    let error = Client::connect(&addr, None).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("no Serf agent at 127.0.0.1:{port}: connection refused")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_against_real_agent() {
    let config = auth_config("s3cret");
    let agent = start_agent("auth-a", 1, &[&config.arg]).await;
    let addr = agent.rpc.to_string();

    let client = Client::connect(&addr, None).await.expect("handshake only");
    let error = client.members().await.unwrap_err();
    assert!(matches!(error, Error::Auth { .. }), "{error:?}");
    assert!(
        error.to_string().contains("Authentication required"),
        "{error}"
    );

    let error = Client::connect(&addr, Some("wrong")).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("Serf agent at {addr}: RPC auth failed: Invalid authentication token")
    );

    let client = Client::connect(&addr, Some("s3cret")).await.expect("auth");
    let members = client.members().await.expect("members");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].name, "auth-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_drives_a_two_agent_cluster() {
    let encrypt = format!("-encrypt={KEY1}");
    let a = start_agent("ca", 1, &["-tag=role=web", &encrypt]).await;
    let b = start_agent(
        "cb",
        2,
        &[
            "-tag=dc=x",
            &encrypt,
            "-event-handler=query:whoami=echo b-here",
        ],
    )
    .await;
    let client_a = Client::connect(&a.rpc.to_string(), None).await.unwrap();
    let client_b = Client::connect(&b.rpc.to_string(), None).await.unwrap();

    // join
    let joined = client_a.join(&[b.bind.to_string()], false).await.unwrap();
    assert_eq!(joined, 1);
    eventually_async("both members alive at a", || async {
        let members = client_a.members().await.unwrap();
        (members.len() == 2 && members.iter().all(|m| m.status == "alive")).then_some(())
    })
    .await;
    let members = client_a.members().await.unwrap();
    let mb = members.iter().find(|m| m.name == "cb").unwrap();
    assert_eq!(mb.socket_addr(), b.bind);
    assert_eq!(mb.tags.get("dc").map(String::as_str), Some("x"));
    assert_eq!(
        (mb.protocol_min, mb.protocol_max, mb.delegate_max),
        (1, 5, 5)
    );

    // members-filtered
    let filter = MembersFilter {
        tags: BTreeMap::from([("role".to_owned(), "w.b".to_owned())]),
        ..MembersFilter::default()
    };
    let names: Vec<String> = client_a
        .members_filtered(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["ca"]);
    let filter = MembersFilter {
        status: "alive".to_owned(),
        name: "c[b]".to_owned(),
        ..MembersFilter::default()
    };
    assert_eq!(client_a.members_filtered(&filter).await.unwrap().len(), 1);

    // event, received through a stream
    let mut events = client_a.stream("user").await.unwrap();
    client_b.user_event("deploy", b"hello", true).await.unwrap();
    let event = with_deadline("user event at a", events.recv())
        .await
        .unwrap()
        .unwrap();
    match event {
        StreamEvent::User {
            name,
            payload,
            coalesce,
            ..
        } => {
            assert_eq!(name, "deploy");
            assert_eq!(payload, b"hello");
            assert!(coalesce);
        }
        other => panic!("expected a user event, got {other:?}"),
    }
    client_a.stop(events.handle()).await.unwrap();

    // tags, visible in members at the other agent
    let mut updates = client_a.stream("member-update").await.unwrap();
    client_b
        .update_tags(
            &BTreeMap::from([("role".to_owned(), "db".to_owned())]),
            &["dc".to_owned()],
        )
        .await
        .unwrap();
    let event = with_deadline("member-update at a", updates.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, StreamEvent::Member { members, .. } if members[0].name == "cb"),
        "{event:?}"
    );
    eventually_async("b's new tags at a", || async {
        let members = client_a.members().await.unwrap();
        let b = members.iter().find(|m| m.name == "cb")?;
        (b.tags == BTreeMap::from([("role".to_owned(), "db".to_owned())])).then_some(())
    })
    .await;
    drop(updates);

    // query with acks and a response from b's event handler
    let mut replies = client_a
        .query(&Query {
            name: "whoami".to_owned(),
            request_ack: true,
            timeout: Some(Duration::from_secs(3)),
            ..Query::default()
        })
        .await
        .unwrap();
    let mut acks = Vec::new();
    let mut responses = Vec::new();
    while let Some(reply) = with_deadline("query records", replies.recv()).await {
        match reply.unwrap() {
            QueryReply::Ack(from) => acks.push(from),
            QueryReply::Response { from, payload } => responses.push((from, payload)),
        }
    }
    acks.sort();
    assert_eq!(acks, ["ca", "cb"]);
    assert_eq!(responses, [("cb".to_owned(), b"b-here\n".to_vec())]);

    // respond: a stream client at a answers b's query
    let mut queries = client_a.stream("query:ping-rpc").await.unwrap();
    let mut replies = client_b
        .query(&Query {
            name: "ping-rpc".to_owned(),
            payload: b"ping".to_vec(),
            filter_nodes: vec!["ca".to_owned()],
            timeout: Some(Duration::from_secs(5)),
            ..Query::default()
        })
        .await
        .unwrap();
    let event = with_deadline("query at a", queries.recv())
        .await
        .unwrap()
        .unwrap();
    let StreamEvent::Query {
        responder: id,
        name,
        payload,
        ..
    } = event
    else {
        panic!("expected a query, got {event:?}");
    };
    assert_eq!(
        (name.as_str(), payload.as_slice()),
        ("ping-rpc", &b"ping"[..])
    );
    client_a.respond(id, b"via-rpc").await.unwrap();
    let error = client_a.respond(id + 100, b"x").await.unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("No pending queries matching ID"),
        "{error}"
    );
    let reply = with_deadline("response at b", replies.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply,
        QueryReply::Response {
            from: "ca".to_owned(),
            payload: b"via-rpc".to_vec()
        }
    );

    // agent error text
    let error = client_a
        .query(&Query {
            name: "_serf_x".to_owned(),
            ..Query::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "Serf agent at {}: query: Queries cannot contain the '_serf_' prefix",
            a.rpc
        )
    );

    // stats and coordinates
    let stats = client_a.stats().await.unwrap();
    assert_eq!(stats["agent"]["name"], "ca");
    assert_eq!(stats["serf"]["members"], "2");
    assert_eq!(stats["serf"]["encrypted"], "true");
    assert!(client_a.get_coordinate("ca").await.unwrap().is_some());
    assert!(client_a.get_coordinate("nobody").await.unwrap().is_none());
    let coordinate = eventually_async("a coordinate for cb", || async {
        client_a.get_coordinate("cb").await.unwrap()
    })
    .await;
    assert_eq!(coordinate.vec.len(), 8);

    // keys
    let listed = client_a.list_keys().await.unwrap();
    assert_eq!(listed.keys, BTreeMap::from([(KEY1.to_owned(), 2)]));
    assert_eq!(listed.num_nodes, 2);
    client_a.install_key(KEY2).await.unwrap();
    client_a.use_key(KEY2).await.unwrap();
    client_a.remove_key(KEY1).await.unwrap();
    let listed = client_a.list_keys().await.unwrap();
    assert_eq!(listed.keys, BTreeMap::from([(KEY2.to_owned(), 2)]));
    let error = client_a.remove_key(KEY2).await.unwrap_err();
    assert!(
        error.to_string().contains("nodes reported failure"),
        "{error}"
    );

    // monitor
    let error = client_a.monitor("bogus").await.unwrap_err();
    assert_error_ends_with(&error, "Unknown log level: BOGUS");
    let mut logs = client_a.monitor("debug").await.unwrap();
    client_a.user_event("logged", b"", false).await.unwrap();
    let line = with_deadline("a log line", async {
        loop {
            let line = logs.recv().await.unwrap().unwrap();
            if line.contains("logged") {
                return line;
            }
        }
    })
    .await;
    assert!(
        line.contains("[DEBUG]") || line.contains("[INFO]"),
        "{line}"
    );
    client_a.stop(logs.handle()).await.unwrap();

    // force-leave of an unknown node is accepted
    client_a.force_leave("ghost", false).await.unwrap();

    // leave: b shuts down, a sees it as left
    client_b.leave().await.unwrap();
    eventually_async("cb left at a", || async {
        let members = client_a.members().await.unwrap();
        members
            .iter()
            .any(|m| m.name == "cb" && m.status == "left")
            .then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The real `serf` command line against our server.

/// A real agent and a memory backend holding the same member records.
async fn mirrored() -> (SerfAgent, TestServer) {
    let agent = start_agent("mx", 1, &["-tag=role=web", "-tag=dc=x"]).await;
    let client = Client::connect(&agent.rpc.to_string(), None).await.unwrap();
    let members = client.members().await.unwrap();
    let backend = MemoryBackend::new("mx", agent.bind, &[]);
    for member in members {
        backend.add_member(member);
    }
    backend.add_member(member("other", gossip(9, 7946), &[("role", "db")]));
    backend.set_status("other", "failed");
    let server = TestServer::start(backend, Config::default()).await;
    (agent, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serf_members_matches_a_real_agent() {
    let (agent, server) = mirrored().await;
    // The real agent gets the same second member (failed) so both lists match.
    let other = start_agent("other", 9, &["-tag=role=db"]).await;
    let client = Client::connect(&agent.rpc.to_string(), None).await.unwrap();
    client.join(&[other.bind.to_string()], false).await.unwrap();
    drop(other); // killed: the agent marks it failed
    eventually_async("other failed at the real agent", || async {
        let members = client.members().await.unwrap();
        members
            .iter()
            .any(|m| m.name == "other" && m.status == "failed")
            .then_some(())
    })
    .await;
    let real_other = client
        .members()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.name == "other")
        .unwrap();
    server.backend.add_member(real_other);

    for args in [
        vec!["members"],
        vec!["members", "-status=alive"],
        vec!["members", "-tag=role=web"],
        vec!["members", "-tag=role=w.*", "-tag=dc=x"],
        vec!["members", "-name=oth.*"],
        vec!["members", "-status=failed", "-tag=role=db"],
        vec!["members", "-detailed"],
    ] {
        let real = serf_cli(agent.rpc, &args).await;
        let ours = serf_cli(server.addr, &args).await;
        assert!(ours.status.success(), "{args:?}: {}", describe(&ours));
        assert!(real.status.success(), "{args:?}: {}", describe(&real));
        assert_eq!(
            sorted_lines(&stdout(&ours)),
            sorted_lines(&stdout(&real)),
            "{args:?}"
        );
    }
    for args in [
        vec!["members", "-format=json"],
        vec!["members", "-format=json", "-tag=role=db"],
    ] {
        let real = serf_cli(agent.rpc, &args).await;
        let ours = serf_cli(server.addr, &args).await;
        assert!(ours.status.success(), "{}", describe(&ours));
        assert_eq!(
            sorted_json_members(&stdout(&ours)),
            sorted_json_members(&stdout(&real)),
            "{args:?}"
        );
    }
    // A bad regex is an error at both (Go closes the connection; we say why).
    let ours = serf_cli(server.addr, &["members", "-name=("]).await;
    assert_failed_with(&ours, "Failed to compile regex");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serf_info_rtt_and_reachability_match_a_real_agent() {
    let (agent, server) = mirrored().await;
    // `serf info`: the same sections and keys.
    let keys = |text: &str| -> Vec<String> {
        text.lines()
            .map(|line| line.split(" = ").next().unwrap_or("").trim().to_owned())
            .filter(|key| key != "role" && key != "dc")
            .collect()
    };
    let real = serf_cli(agent.rpc, &["info"]).await;
    let ours = serf_cli(server.addr, &["info"]).await;
    assert!(ours.status.success(), "{}", describe(&ours));
    assert_eq!(keys(&stdout(&ours)), keys(&stdout(&real)));
    assert!(stdout(&ours).contains("\tname = mx\n"), "{}", stdout(&ours));
    let ours = serf_cli(server.addr, &["info", "-format=json"]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&ours)).unwrap();
    assert_eq!(json["tags"]["role"], "web");

    // `serf rtt`
    let pattern = regex::Regex::new(r"^Estimated mx <-> mx rtt: \d+\.\d{3} ms\n$").unwrap();
    for rpc in [agent.rpc, server.addr] {
        let output = serf_cli(rpc, &["rtt", "mx"]).await;
        assert!(pattern.is_match(&stdout(&output)), "{}", describe(&output));
    }
    let output = serf_cli(server.addr, &["rtt", "nobody"]).await;
    assert_failed_with(&output, "Could not find a coordinate for node \"nobody\"");

    // `serf reachability`: one live member (the failed one is not counted).
    let real = serf_cli(agent.rpc, &["reachability"]).await;
    let ours = serf_cli(server.addr, &["reachability"]).await;
    assert!(ours.status.success(), "{}", describe(&ours));
    assert_eq!(
        stdout(&ours),
        "Total members: 2, live members: 1\nStarting reachability test...\nSuccessfully contacted all live nodes\n"
    );
    assert_eq!(
        stdout(&real).lines().skip(1).collect::<Vec<_>>(),
        stdout(&ours).lines().skip(1).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serf_commands_print_what_they_print_against_a_real_agent() {
    let real = start_agent("sa", 1, &["-tag=role=web"]).await;
    let peer = start_agent("sp", 2, &["-event-handler=query:whoami=echo sp-here"]).await;
    let backend = MemoryBackend::new("sa", gossip(1, 7946), &[("role", "web")]);
    backend.add_joinable(&peer.bind.to_string(), member("sp", peer.bind, &[]));
    backend.answer_queries("sp", "whoami", b"sp-here\n");
    let server = TestServer::start(Arc::clone(&backend), Config::default()).await;
    let join_target = peer.bind.to_string();

    let same = |what: &str, real: &Output, ours: &Output| {
        assert!(real.status.success(), "{what} (real): {}", describe(real));
        assert!(ours.status.success(), "{what} (ours): {}", describe(ours));
        assert_eq!(stdout(ours), stdout(real), "{what}");
    };

    // join
    let args = ["join", join_target.as_str()];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    same("join", &r, &o);
    assert_eq!(
        stdout(&o),
        "Successfully joined cluster by contacting 1 nodes.\n"
    );
    let bad = serf_cli(server.addr, &["join", "127.0.0.1:1"]).await;
    assert_failed_with(&bad, "Error joining the cluster");

    // event (watched through a stream of our own)
    let client = Client::connect(&server.addr.to_string(), None)
        .await
        .unwrap();
    let mut events = client.stream("user:deploy").await.unwrap();
    let args = ["event", "deploy", "v2"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    same("event", &r, &o);
    assert_eq!(
        stdout(&o),
        "Event 'deploy' dispatched! Coalescing enabled: true\n"
    );
    let event = with_deadline("deploy event", events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, StreamEvent::User { name, payload, .. } if name == "deploy" && payload == b"v2"),
        "{event:?}"
    );
    let too_big = "x".repeat(600);
    let bad = serf_cli(server.addr, &["event", "big", &too_big]).await;
    assert_failed_with(
        &bad,
        "Error sending event: user event exceeds configured limit of 512 bytes",
    );

    // query: acks from both members, a response from sp
    let args = ["query", "-timeout=1s", "whoami"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    assert!(r.status.success() && o.status.success(), "{}", describe(&o));
    assert_eq!(
        sorted_lines(&stdout(&o)),
        sorted_lines(&stdout(&r)),
        "query"
    );
    assert!(
        stdout(&o).contains("Response from 'sp': sp-here\n"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).ends_with("Total Acks: 2\nTotal Responses: 1\n"));
    let args = ["query", "-timeout=1s", "-format=json", "whoami"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    let parse = |output: &Output| {
        let mut value: serde_json::Value = serde_json::from_str(&stdout(output))
            .unwrap_or_else(|_| panic!("query json: {}", describe(output)));
        if let Some(acks) = value["Acks"].as_array_mut() {
            acks.sort_by_key(|ack| ack.as_str().unwrap_or("").to_owned());
        }
        value
    };
    assert_eq!(parse(&o), parse(&r), "query json");

    // tags
    let args = ["tags", "-set", "version=2", "-delete", "role"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    same("tags", &r, &o);
    assert_eq!(stdout(&o), "Successfully updated agent tags\n");
    let listing = serf_cli(server.addr, &["members", "-name=sa"]).await;
    assert!(
        stdout(&listing).contains("version=2"),
        "{}",
        stdout(&listing)
    );
    assert!(
        !stdout(&listing).contains("role=web"),
        "{}",
        stdout(&listing)
    );

    // keys: no encryption on either side, the same failure report
    let args = ["keys", "-list"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert_eq!(r.status.code(), Some(1), "{}", describe(&r));
    assert_eq!(sorted_lines(&all_output(&o)), sorted_lines(&all_output(&r)));

    // force-leave
    backend.set_status("sp", "failed");
    let args = ["force-leave", "sp"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    same("force-leave", &r, &o);
    let listing = serf_cli(server.addr, &["members", "-name=sp"]).await;
    assert!(stdout(&listing).contains("  left"), "{}", stdout(&listing));

    // monitor: start it, read a line, kill it
    monitor_prints_a_line(&server).await;

    // leave: the reply comes back, then the member shuts down
    let args = ["leave"];
    let (r, o) = (
        serf_cli(real.rpc, &args).await,
        serf_cli(server.addr, &args).await,
    );
    same("leave", &r, &o);
    assert_eq!(stdout(&o), "Graceful leave complete\n");
    with_deadline("backend shut down", backend.shutdown_token().cancelled()).await;
    server.stop().await;
}

async fn monitor_prints_a_line(server: &TestServer) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(testkit::require("serf"));
    command
        .args(["monitor", "-log-level=info"])
        .arg(format!("-rpc-addr={}", server.addr))
        .stdout(std::process::Stdio::piped());
    let mut monitor = testkit::Child::spawn_piped("serf monitor", &mut command);
    let stdout = monitor.take_stdout();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = with_deadline("serf monitor prints the log line", async {
        loop {
            server.backend.log(LogLevel::Info, "agent: hello monitor");
            tokio::select! {
                line = lines_rx.recv() => {
                    let line = line.expect("serf monitor exited");
                    if line.contains("hello monitor") {
                        return line;
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
    .await;
    assert!(line.contains("[INFO] agent: hello monitor"), "{line}");
    monitor.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serf_cli_with_rpc_auth() {
    let backend = MemoryBackend::new("au", gossip(1, 7946), &[]);
    let server = TestServer::start(
        backend,
        Config {
            auth_key: Some("k3y".to_owned()),
            ..Config::default()
        },
    )
    .await;
    let config = auth_config("k3y");
    let real = start_agent("au", 1, &[&config.arg]).await;
    let mut refusals = Vec::new();
    for rpc in [real.rpc, server.addr] {
        let output = serf_cli(rpc, &["members", "-rpc-auth=k3y"]).await;
        assert!(output.status.success(), "{}", describe(&output));
        assert!(stdout(&output).starts_with("au "), "{}", describe(&output));
        let output = serf_cli(rpc, &["members", "-rpc-auth=nope"]).await;
        assert_failed_with(
            &output,
            "Error connecting to Serf agent: Invalid authentication token",
        );
        refusals.push((
            output.status.code(),
            all_output(&output).replace(&rpc.to_string(), "ADDR"),
        ));
    }
    // A wrong key reads exactly as from a Go agent.
    assert_eq!(refusals[0], refusals[1]);
    let output = serf_cli(server.addr, &["info"]).await;
    assert_failed_with(&output, "Authentication required");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Streams, stop, disconnects and hostile clients against our server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_stop_cleanly_and_disconnects_cost_nothing() {
    let backend = MemoryBackend::new("st", gossip(1, 7946), &[]);
    let server = TestServer::start(Arc::clone(&backend), Config::default()).await;
    let client = Client::connect(&server.addr.to_string(), None)
        .await
        .unwrap();

    let mut events = client.stream("*").await.unwrap();
    backend.log(LogLevel::Debug, "agent: below the monitor's level");
    backend.log(LogLevel::Info, "agent: logged before the monitor");
    let mut logs = client.monitor("INFO").await.unwrap();
    // The backlog is replayed first, filtered by level.
    let line = with_deadline("the backlog", logs.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        line.ends_with("[INFO] agent: logged before the monitor"),
        "{line}"
    );
    assert_eq!(backend.subscribers(), 2);
    let error = client.monitor("INFO").await.unwrap_err();
    assert_error_ends_with(&error, "Monitor already exists");
    let error = client.stream("bogus").await.unwrap_err();
    assert_error_ends_with(&error, "Invalid event filter");

    backend.add_member(member("n2", gossip(2, 7946), &[("role", "db")]));
    let event = with_deadline("member-join", events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&event, StreamEvent::Member { kind: serf_agent::rpc::MemberEventKind::Join, members } if members[0].name == "n2"),
        "{event:?}"
    );

    client.stop(events.handle()).await.unwrap();
    client.stop(logs.handle()).await.unwrap();
    eventually_async("stopped streams unsubscribe", || async {
        (backend.subscribers() == 0).then_some(())
    })
    .await;
    assert!(with_deadline("stopped stream ends", events.recv())
        .await
        .is_none());
    // The connection still works after stops.
    assert_eq!(client.members().await.unwrap().len(), 2);

    // A client that disconnects mid-stream (and mid-query) leaves nothing behind.
    let other = Client::connect(&server.addr.to_string(), None)
        .await
        .unwrap();
    let _events = other.stream("").await.unwrap();
    let _logs = other.monitor("trace").await.unwrap();
    let _query = other
        .query(&Query {
            name: "slow".to_owned(),
            timeout: Some(Duration::from_secs(30)),
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(backend.subscribers(), 2);
    drop((other, _events, _logs, _query));
    eventually_async("a dropped client unsubscribes", || async {
        (backend.subscribers() == 0).then_some(())
    })
    .await;
    assert_eq!(client.members().await.unwrap().len(), 2);
    server.stop().await;
}

/// A raw connection for hostile-client tests.
struct Raw {
    stream: TcpStream,
    frames: FrameBuffer,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            frames: FrameBuffer::new(1 << 20),
        }
    }

    async fn connect_small_window(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Self {
            stream: socket.connect(addr).await.unwrap(),
            frames: FrameBuffer::new(1 << 20),
        }
    }

    async fn send<T: serde::Serialize>(&mut self, command: &str, seq: u64, body: Option<&T>) {
        let mut bytes = Vec::new();
        encode_into(
            &mut bytes,
            &RequestHeader {
                command: command.to_owned(),
                seq,
            },
        );
        if let Some(body) = body {
            encode_into(&mut bytes, body);
        }
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn handshake(&mut self) {
        self.send(
            "handshake",
            1,
            Some(&serf_agent::rpc::messages::HandshakeRequest { version: 1 }),
        )
        .await;
        assert_eq!(self.header().await.unwrap().error, "");
    }

    /// The next value, or `None` at EOF.
    async fn frame(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(frame) = self.frames.next_frame().unwrap() {
                return Some(frame);
            }
            let n = with_deadline("a reply", self.stream.read(&mut chunk))
                .await
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.frames.extend(&chunk[..n]);
        }
    }

    async fn header(&mut self) -> Option<ResponseHeader> {
        let frame = self.frame().await?;
        Some(decode("responseHeader", &frame).unwrap())
    }

    async fn closed(&mut self) -> bool {
        self.frame().await.is_none()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_serf_errors_and_never_affect_others() {
    let backend = MemoryBackend::new("h", gossip(1, 7946), &[]);
    let server = TestServer::start(
        Arc::clone(&backend),
        Config {
            max_frame: 64 * 1024,
            write_timeout: Duration::from_secs(2),
            ..Config::default()
        },
    )
    .await;
    let good = Client::connect(&server.addr.to_string(), None)
        .await
        .unwrap();

    // A command before the handshake: "Handshake required", then closed.
    let mut raw = Raw::connect(server.addr).await;
    raw.send::<()>("members", 7, None).await;
    let header = raw.header().await.unwrap();
    assert_eq!(
        (header.seq, header.error.as_str()),
        (7, "Handshake required")
    );
    assert!(raw.closed().await);

    // Handshake errors keep the connection.
    let mut raw = Raw::connect(server.addr).await;
    raw.send(
        "handshake",
        1,
        Some(&serf_agent::rpc::messages::HandshakeRequest { version: 2 }),
    )
    .await;
    assert_eq!(raw.header().await.unwrap().error, "Unsupported IPC version");
    raw.handshake().await;
    raw.send(
        "handshake",
        2,
        Some(&serf_agent::rpc::messages::HandshakeRequest { version: 1 }),
    )
    .await;
    assert_eq!(
        raw.header().await.unwrap().error,
        "Handshake already performed"
    );

    // An unknown command: "Unsupported command", then closed.
    raw.send::<()>("bogus", 3, None).await;
    let header = raw.header().await.unwrap();
    assert_eq!(
        (header.seq, header.error.as_str()),
        (3, "Unsupported command")
    );
    assert!(raw.closed().await);

    // Garbage bytes: closed.
    let mut raw = Raw::connect(server.addr).await;
    raw.stream
        .write_all(&[0xc1, 0x00, 0xff, 0x13])
        .await
        .unwrap();
    assert!(raw.closed().await);
    // A header that is not a map: closed.
    let mut raw = Raw::connect(server.addr).await;
    raw.stream.write_all(&[0x2a]).await.unwrap();
    assert!(raw.closed().await);

    // A huge declared length: closed at once, nothing allocated for it.
    let mut raw = Raw::connect(server.addr).await;
    raw.handshake().await;
    raw.stream
        .write_all(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0x00])
        .await
        .unwrap();
    assert!(raw.closed().await);
    let mut raw = Raw::connect(server.addr).await;
    raw.stream
        .write_all(&[0xdd, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    raw.stream
        .write_all(&vec![0xc0; 70 * 1024])
        .await
        .unwrap_or(());
    assert!(raw.closed().await);

    // A header without its body: that client waits, the others are served.
    let mut waiting = Raw::connect(server.addr).await;
    waiting.handshake().await;
    waiting.send::<()>("event", 2, None).await;
    assert_eq!(good.members().await.unwrap().len(), 1);
    // The body arriving later completes the request.
    let mut body = Vec::new();
    encode_into(
        &mut body,
        &serf_agent::rpc::messages::EventRequest {
            name: "late".to_owned(),
            payload: vec![],
            coalesce: false,
        },
    );
    waiting.stream.write_all(&body).await.unwrap();
    assert_eq!(waiting.header().await.unwrap().error, "");

    // A slow reader: subscribes to everything and never reads while events flood in. Its
    // receive window is kept small so the server's writes stall quickly.
    let mut slow = Raw::connect_small_window(server.addr).await;
    slow.handshake().await;
    slow.send(
        "stream",
        2,
        Some(&serf_agent::rpc::messages::StreamRequest {
            kind: "*".to_owned(),
        }),
    )
    .await;
    slow.send(
        "monitor",
        3,
        Some(&serf_agent::rpc::messages::MonitorRequest {
            log_level: "TRACE".to_owned(),
        }),
    )
    .await;
    eventually_async("slow client subscribed", || async {
        (backend.subscribers() == 2).then_some(())
    })
    .await;
    let payload = vec![b'x'; 400];
    for i in 0..5_000 {
        good.user_event(&format!("e{}", i % 10), &payload, false)
            .await
            .unwrap();
    }
    assert_eq!(good.members().await.unwrap().len(), 1);
    // The slow client is dropped once a write stalls; its subscriptions go with it.
    eventually_async("the stalled client is dropped", || async {
        (backend.subscribers() == 0).then_some(())
    })
    .await;
    drop(slow);

    // Auth-refused commands have their body consumed; the connection stays usable.
    let auth_backend = MemoryBackend::new("ha", gossip(1, 7946), &[]);
    let auth_server = TestServer::start(
        auth_backend,
        Config {
            auth_key: Some("k".to_owned()),
            ..Config::default()
        },
    )
    .await;
    let mut raw = Raw::connect(auth_server.addr).await;
    raw.handshake().await;
    raw.send(
        "members-filtered",
        2,
        Some(&serf_agent::rpc::messages::MembersFilteredRequest::default()),
    )
    .await;
    assert_eq!(raw.header().await.unwrap().error, "Authentication required");
    raw.send(
        "auth",
        3,
        Some(&serf_agent::rpc::messages::AuthRequest {
            auth_key: "k".to_owned(),
        }),
    )
    .await;
    let header = raw.header().await.unwrap();
    assert_eq!((header.seq, header.error.as_str()), (3, ""));
    raw.send::<()>("members", 4, None).await;
    assert_eq!(raw.header().await.unwrap().error, "");
    assert!(raw.frame().await.is_some());

    assert_eq!(good.members().await.unwrap().len(), 1);
    auth_server.stop().await;
    server.stop().await;
}

/// Log lines written by the subscriber of the current thread.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// A brute-force client: thousands of wrong keys, then the right one, in one write. Only
/// `MAX_AUTH_FAILURES` are answered (with Go's error), each is logged at warn with the peer and
/// without the key, and the connection is closed before the right key is read.
// One thread: the server's tasks log through this thread's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn wrong_auth_keys_close_the_connection_and_are_logged() {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let backend = MemoryBackend::new("bf", gossip(1, 7946), &[]);
    let server = TestServer::start(
        backend,
        Config {
            auth_key: Some("right-key".to_owned()),
            ..Config::default()
        },
    )
    .await;

    let mut raw = Raw::connect(server.addr).await;
    let local = raw.stream.local_addr().unwrap();
    raw.handshake().await;
    let mut bytes = Vec::new();
    for (seq, key) in (2..2002)
        .map(|seq| (seq, format!("guess-{seq}")))
        .chain([(2002, "right-key".to_owned())])
    {
        let header = RequestHeader {
            command: "auth".to_owned(),
            seq,
        };
        encode_into(&mut bytes, &header);
        encode_into(
            &mut bytes,
            &serf_agent::rpc::messages::AuthRequest { auth_key: key },
        );
    }
    // The server may close (and reset) before taking all of it.
    let _ = raw.stream.write_all(&bytes).await;

    let mut answered = Vec::new();
    while let Some(frame) = raw.frame().await {
        let header: ResponseHeader = decode("responseHeader", &frame).unwrap();
        answered.push((header.seq, header.error));
    }
    let invalid = "Invalid authentication token".to_owned();
    assert_eq!(
        answered,
        [(2, invalid.clone()), (3, invalid.clone()), (4, invalid)],
        "three wrong keys are answered, then the connection closes"
    );
    assert_eq!(serf_agent::rpc::server::MAX_AUTH_FAILURES, 3);

    let text = logs.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("wrong auth key"))
        .collect();
    assert_eq!(warnings.len(), 3, "{text}");
    for line in &warnings {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&format!("peer={local}")), "{line}");
    }
    assert!(!text.contains("guess-"), "a key reached the log:\n{text}");

    // The server still serves a client with the right key.
    let client = Client::connect(&server.addr.to_string(), Some("right-key"))
        .await
        .expect("the right key");
    assert_eq!(client.members().await.unwrap().len(), 1);
    drop(client);
    server.stop().await;
}

/// A fake agent that keeps sending records for a stream after the client stopped it, as a Go
/// agent may (records already queued): the client must discard them and stay in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_discards_records_of_stopped_streams() {
    let listener = TcpListener::bind((loopback(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut frames = FrameBuffer::new(1 << 20);
        let mut chunk = [0u8; 4096];
        let mut next = async |stream: &mut TcpStream, frames: &mut FrameBuffer| -> Vec<u8> {
            loop {
                if let Some(frame) = frames.next_frame().unwrap() {
                    return frame;
                }
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                frames.extend(&chunk[..n]);
            }
        };
        let reply = |seq: u64, body: Option<&serf_agent::rpc::messages::MembersResponse>| {
            let mut bytes = Vec::new();
            encode_into(
                &mut bytes,
                &ResponseHeader {
                    seq,
                    error: String::new(),
                },
            );
            if let Some(body) = body {
                encode_into(&mut bytes, body);
            }
            bytes
        };
        let record = |seq: u64| {
            let mut bytes = Vec::new();
            encode_into(
                &mut bytes,
                &ResponseHeader {
                    seq,
                    error: String::new(),
                },
            );
            let mut members = BTreeMap::new();
            members.insert("Event", "user");
            members.insert("Name", "late");
            encode_into(&mut bytes, &members);
            bytes
        };
        loop {
            let header: RequestHeader =
                decode("requestHeader", &next(&mut stream, &mut frames).await).unwrap();
            match header.command.as_str() {
                "handshake" | "stream" | "stop" => {
                    let _body = next(&mut stream, &mut frames).await;
                    let mut out = Vec::new();
                    if header.command == "stop" {
                        // Two records of the stopped stream arrive before the stop reply.
                        out.extend(record(2));
                        out.extend(record(2));
                    }
                    out.extend(reply(header.seq, None));
                    if header.command == "stream" {
                        out.extend(record(header.seq));
                    }
                    stream.write_all(&out).await.unwrap();
                }
                "members" => {
                    let body = serf_agent::rpc::messages::MembersResponse {
                        members: vec![member("m", gossip(1, 7946), &[])],
                    };
                    // A header for a sequence nobody asked for, with a body, comes first.
                    let mut out = record(99);
                    out.extend(reply(header.seq, Some(&body)));
                    stream.write_all(&out).await.unwrap();
                }
                other => panic!("unexpected command {other}"),
            }
        }
    });
    let client = Client::connect(&addr.to_string(), None).await.unwrap();
    let mut events = client.stream("user").await.unwrap();
    let event = with_deadline("the first record", events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(event, StreamEvent::User { ref name, .. } if name == "late"),
        "{event:?}"
    );
    client.stop(events.handle()).await.unwrap();
    let members = with_deadline("members after stop", client.members())
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].name, "m");
    fake.abort();
}
