//! `amb-serf run` end to end (issue 6): a real `serf agent` as serf_1, Debian's `redis-server` as
//! the backend, amb-serf configured by link variables only; everything on loopback.
//!
//! Each test forwards on a loopback address of its own ([`listen_ip`]), so it can forward
//! redis's well-known port 6379 and advertise `role=6379` exactly as the ambassador does in
//! Docker, even while another copy of the suite runs on the same machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use testkit::{time_until, Redis, SerfAgent};

use crate::support::{eventually, free_port, loopback, run_to_exit, Ambassador, DEADLINE};

/// What the issue asks for: registration, leave and tag changes seen at serf_1 within 2 s.
const WITHIN: Duration = Duration::from_secs(2);

/// A random address in 127.100.0.0–127.254.255.255 (all loopback on Linux, clear of the
/// 127.0.0.x other tests use) where TCP `port` is free now.
fn listen_ip(port: u16) -> Ipv4Addr {
    loop {
        let [a, b, c]: [u8; 3] = rand::random();
        let ip = Ipv4Addr::new(127, a.max(100), b, c.max(1));
        if TcpListener::bind((ip, port)).is_ok() {
            return ip;
        }
    }
}

/// The link variables Docker would inject for `--link serf_1:serf_1 --link redis:redis`.
fn link_vars(serf: SocketAddr, redis: SocketAddr) -> Vec<(String, String)> {
    vec![
        ("SERF_1_PORT_7946_TCP".to_owned(), format!("tcp://{serf}")),
        ("REDIS_PORT_6379_TCP".to_owned(), format!("tcp://{redis}")),
    ]
}

fn as_refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// The member flags every test passes: its own gossip address on loopback, a node name, and
/// an RPC port of its own (tests run in parallel; the default is 127.0.0.1:7373).
fn member_args(node: &str, gossip: SocketAddr) -> Vec<String> {
    vec![
        "--node".to_owned(),
        node.to_owned(),
        "--bind".to_owned(),
        gossip.to_string(),
        "--rpc-addr".to_owned(),
        "127.0.0.1:0".to_owned(),
    ]
}

fn start(listen: Ipv4Addr, vars: &[(String, String)], args: &[String]) -> Ambassador {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ambassador::start_on(listen, &as_refs(vars), &args)
}

/// `serf members -tag role=6379` (plus `extra` filters) at `agent` lists `node` as alive.
fn listed(agent: &SerfAgent, node: &str, filters: &[&str]) -> bool {
    let mut args = vec!["members", "-status=alive"];
    for filter in filters {
        args.push("-tag");
        args.push(filter);
    }
    let output = agent.cli(&args);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(node))
}

/// `node`'s status at `agent` (`alive`, `left`, …), if listed.
fn status(agent: &SerfAgent, node: &str) -> Option<String> {
    let output = agent.cli(&["members"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(node)).then(|| words.nth(1).unwrap_or_default().to_owned())
        })
}

/// A raw RESP `PING` through `addr`: `+PONG`.
fn ping(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"PING\r\n").ok()?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply).ok()?;
    Some(String::from_utf8_lossy(&reply[..n]).trim().to_owned())
}

fn redis_cli(addr: SocketAddr, args: &[&str]) -> String {
    let mut command = Command::new(testkit::require("redis-cli"));
    command
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(args);
    let output = testkit::run_with_timeout(&mut command, DEADLINE);
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `GET path` on `addr`: (status code, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

#[test]
fn registers_with_role_and_forwards() {
    let serf = SerfAgent::start("serf_1", loopback(160), &[]);
    let redis = Redis::start(loopback(160));
    let gossip = SocketAddr::from((loopback(160), free_port(loopback(160))));
    let listen = listen_ip(6379);
    let _ambassador = start(
        listen,
        &link_vars(serf.bind, redis.addr),
        &member_args("amb-redis", gossip),
    );
    let took = time_until(DEADLINE, "amb-redis listed with role=6379", || {
        listed(&serf, "amb-redis", &["role=6379"])
    });
    assert!(took < WITHIN, "registered {took:?} after it was ready");
    assert!(listed(
        &serf,
        "amb-redis",
        &["health=passing", "ports=6379/tcp"]
    ));
    let through = SocketAddr::from((listen, 6379));
    assert_eq!(ping(through).as_deref(), Some("+PONG"));
    assert_eq!(redis_cli(through, &["ping"]), "PONG");
}

#[test]
fn joins_when_serf_starts_later_and_again_after_it_restarts() {
    let redis = Redis::start(loopback(162));
    let serf_addr = SocketAddr::from((loopback(162), free_port(loopback(162))));
    let gossip = SocketAddr::from((loopback(162), free_port(loopback(162))));
    let ambassador = start(
        listen_ip(6379),
        &link_vars(serf_addr, redis.addr),
        &member_args("amb-late", gossip),
    );
    // It really is up before serf_1: it has tried to join and failed.
    eventually(DEADLINE, "a failed join logged", || {
        ambassador.log().contains("no seed reachable").then_some(())
    });
    let mut serf = SerfAgent::start_at("serf_1", serf_addr, &[]);
    let took = time_until(DEADLINE, "amb-late registered once serf_1 is up", || {
        listed(&serf, "amb-late", &["role=6379"])
    });
    assert!(took < WITHIN, "registered {took:?} after serf_1 started");

    serf.restart();
    let took = time_until(
        DEADLINE,
        "amb-late registered at the restarted serf_1",
        || listed(&serf, "amb-late", &["role=6379"]),
    );
    eprintln!("registered again {took:?} after serf_1 restarted");
    drop(ambassador);
}

#[test]
fn health_withdraws_and_restores_the_role() {
    let serf = SerfAgent::start("serf_1", loopback(164), &[]);
    let mut redis = Redis::start(loopback(164));
    let gossip = SocketAddr::from((loopback(164), free_port(loopback(164))));
    let interval = Duration::from_millis(700);
    let mut args = member_args("amb-health", gossip);
    args.extend(
        [
            "--health-interval",
            "700ms",
            "--service-addr",
            "192.0.2.7:49169",
        ]
        .map(String::from),
    );
    let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let at = args
        .iter()
        .position(|arg| arg == "--rpc-addr")
        .expect("--rpc-addr")
        + 1;
    args[at] = rpc.to_string();
    let listen = listen_ip(6379);
    let _ambassador = start(listen, &link_vars(serf.bind, redis.addr), &args);
    eventually(DEADLINE, "amb-health listed with role=6379", || {
        listed(&serf, "amb-health", &["role=6379", "health=passing"]).then_some(())
    });
    assert!(listed(&serf, "amb-health", &["service=192.0.2.7:49169"]));
    // A tag set over our RPC (`serf tags`) is kept through the health changes below.
    let mut command = Command::new(testkit::require("serf"));
    command
        .arg("tags")
        .arg(format!("-rpc-addr={rpc}"))
        .args(["-set", "owner=ops"]);
    let set = testkit::run_with_timeout(&mut command, DEADLINE);
    assert!(set.status.success(), "serf tags -set: {set:?}");
    eventually(DEADLINE, "owner=ops seen at serf_1", || {
        listed(&serf, "amb-health", &["owner=ops"]).then_some(())
    });

    redis.stop();
    let took = time_until(DEADLINE, "role withdrawn, health=critical", || {
        listed(&serf, "amb-health", &["health=critical"])
            && !listed(&serf, "amb-health", &["role=6379"])
    });
    assert!(
        listed(
            &serf,
            "amb-health",
            &["service=192.0.2.7:49169", "ports=6379/tcp", "owner=ops"]
        ),
        "only the role is withdrawn"
    );
    assert!(
        took < 2 * interval + Duration::from_millis(600),
        "critical after {took:?}"
    );

    redis.restart();
    time_until(DEADLINE, "role restored, health=passing", || {
        listed(
            &serf,
            "amb-health",
            &["role=6379", "health=passing", "owner=ops"],
        )
    });
    let through = SocketAddr::from((listen, 6379));
    assert_eq!(ping(through).as_deref(), Some("+PONG"));
}

/// A backend that answers every connection with `total` bytes, slowly (so a SIGTERM lands in
/// the middle), then closes.
fn slow_backend(total: usize) -> SocketAddr {
    let listener = TcpListener::bind((loopback(166), 0)).expect("binding the backend");
    let addr = listener.local_addr().expect("bound");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    let n = chunk.len().min(total - sent);
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    sent += n;
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    addr
}

#[test]
fn sigterm_leaves_first_then_drains() {
    let serf = SerfAgent::start("serf_1", loopback(166), &[]);
    let total = 64 * 1024 * 120; // ~2.4 s at 64 KiB per 20 ms
    let backend = slow_backend(total);
    let gossip = SocketAddr::from((loopback(166), free_port(loopback(166))));
    let vars = vec![
        (
            "SERF_1_PORT_7946_TCP".to_owned(),
            format!("tcp://{}", serf.bind),
        ),
        ("SLOW_PORT_7000_TCP".to_owned(), format!("tcp://{backend}")),
    ];
    let listen = listen_ip(7000);
    let mut ambassador = start(listen, &vars, &member_args("amb-term", gossip));
    eventually(DEADLINE, "amb-term listed with role=7000", || {
        listed(&serf, "amb-term", &["role=7000"]).then_some(())
    });

    let mut client = TcpStream::connect((listen, 7000)).expect("connecting through amb-serf");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = client.read(&mut buffer).expect("first bytes");
    assert!(received > 0);
    let reader = std::thread::spawn(move || {
        while let Ok(n) = client.read(&mut buffer) {
            if n == 0 {
                break;
            }
            received += n;
        }
        received
    });

    ambassador.signal(libc::SIGTERM);
    let took = time_until(DEADLINE, "amb-term shown `left` at serf_1", || {
        status(&serf, "amb-term").as_deref() == Some("left")
    });
    assert!(took < WITHIN, "left after {took:?}");
    let received = reader.join().expect("reader thread");
    assert_eq!(received, total, "the in-flight transfer completed");
    let exit = ambassador.wait_exit(DEADLINE);
    assert_eq!(exit.code(), Some(0), "{}", ambassador.log());
    let log = ambassador.log();
    let left = log.find("left the cluster").expect("logged the leave");
    let drained = log.find("\"drained\"").expect("logged the drain");
    assert!(left < drained, "leave before drain:\n{log}");
}

#[test]
fn user_event_runs_the_handler_against_the_backend() {
    let serf = SerfAgent::start("serf_1", loopback(168), &[]);
    let redis = Redis::start(loopback(168));
    let gossip = SocketAddr::from((loopback(168), free_port(loopback(168))));
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("events");
    // The seed's story: `serf event create_db wordpress` → the handler creates the database
    // with a client against the backend, found through AMB_BACKEND_HOST/PORT.
    let handler = format!(
        "user:create_db=name=$(cat); \
         echo \"$name $SERF_EVENT $SERF_USER_EVENT $AMB_BACKEND_HOST:$AMB_BACKEND_PORT\" >> {}; \
         redis-cli -h \"$AMB_BACKEND_HOST\" -p \"$AMB_BACKEND_PORT\" set \"db:$name\" created",
        record.display()
    );
    let mut args = member_args("amb-events", gossip);
    args.extend(["--event-handler".to_owned(), handler]);
    let _ambassador = start(listen_ip(6379), &link_vars(serf.bind, redis.addr), &args);
    eventually(DEADLINE, "amb-events listed", || {
        listed(&serf, "amb-events", &["role=6379"]).then_some(())
    });

    let sent = serf.cli(&["event", "create_db", "wordpress"]);
    assert!(sent.status.success(), "{sent:?}");
    eventually(DEADLINE, "the database created in redis", || {
        (redis_cli(redis.addr, &["get", "db:wordpress"]) == "created").then_some(())
    });
    // A second event marks the point after which a duplicate of the first would have run.
    let sent = serf.cli(&["event", "create_db", "blog"]);
    assert!(sent.status.success(), "{sent:?}");
    let lines = eventually(DEADLINE, "the second event handled", || {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        text.contains("blog ").then_some(text)
    });
    let backend = redis.addr.to_string();
    assert_eq!(
        lines
            .lines()
            .filter(|line| line.starts_with("wordpress "))
            .count(),
        1,
        "{lines}"
    );
    assert!(
        lines.contains(&format!("wordpress user create_db {backend}")),
        "{lines}"
    );
}

#[test]
fn bad_input_exits_2_naming_it() {
    for (vars, args, named) in [
        (
            vec![("REDIS_PORT_6379_TCP", "tcp://127.0.0.1:99999")],
            vec![],
            "REDIS_PORT_6379_TCP",
        ),
        (
            vec![("REDIS_PORT_6379_TCP", "tcp://127.0.0.1:6379")],
            vec!["--tag", "role=other"],
            "--tag role=other",
        ),
        (
            vec![("REDIS_PORT_6379_TCP", "tcp://127.0.0.1:6379")],
            vec!["--service-addr", "10.0.0.1"],
            "--service-addr \"10.0.0.1\"",
        ),
    ] {
        let mut full = vec!["run", "--listen-addr", "127.0.0.170"];
        full.extend(args);
        let output = run_to_exit(&vars, &full);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{vars:?}: {stderr}");
        assert!(stderr.contains(named), "{named} not named: {stderr}");
    }
    let big = format!("blob={}", "x".repeat(600));
    let output = run_to_exit(
        &[("REDIS_PORT_6379_TCP", "tcp://127.0.0.1:6379")],
        &["run", "--listen-addr", "127.0.0.170", "--tag", &big],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("limit of 512"), "{stderr}");
}

#[test]
fn without_serf_link_or_join_it_is_a_cluster_of_one_with_health_and_metrics() {
    let mut redis = Redis::start(loopback(171));
    let gossip = SocketAddr::from((loopback(171), free_port(loopback(171))));
    let metrics = SocketAddr::from((loopback(171), free_port(loopback(171))));
    let vars = vec![(
        "REDIS_PORT_6379_TCP".to_owned(),
        format!("tcp://{}", redis.addr),
    )];
    // No --node: the member is named after the host, as `serf agent` is.
    let mut args = vec![
        "--bind".to_owned(),
        gossip.to_string(),
        "--rpc-addr".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    args.extend([
        "--metrics-addr".to_owned(),
        metrics.to_string(),
        "--health-interval".to_owned(),
        "300ms".to_owned(),
    ]);
    let listen = listen_ip(6379);
    let ambassador = start(listen, &vars, &args);
    assert!(
        ambassador.log().contains("cluster of one"),
        "it says so:\n{}",
        ambassador.log()
    );
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert!(
        ambassador
            .log()
            .contains(&format!("\"node\":\"{}\"", hostname.trim())),
        "named after the host:\n{}",
        ambassador.log()
    );
    let through = SocketAddr::from((listen, 6379));
    assert_eq!(ping(through).as_deref(), Some("+PONG"));

    let (code, body) = eventually(DEADLINE, "/healthz answers", || {
        http_get(metrics, "/healthz")
    });
    assert_eq!((code, body.trim()), (200, "ok"));
    let metrics_addr = metrics.to_string();
    let check = run_to_exit(&[], &["health", "--addr", &metrics_addr]);
    assert_eq!(check.status.code(), Some(0), "amb-serf health: {check:?}");
    let (code, text) = http_get(metrics, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let labels = format!(
        "protocol=\"tcp\",listen=\"{listen}:6379\",target=\"{}\"",
        redis.addr
    );
    for line in [
        format!("amb_serf_connections_total{{{labels}}} 1"),
        format!("amb_serf_connections_active{{{labels}}} 0"),
        format!("amb_serf_bytes_total{{{labels},direction=\"to_client\"}} 7"),
        "amb_serf_upstream_up 1".to_owned(),
        "amb_serf_members{status=\"alive\"} 1".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
    }
    crate::support::promtool_check(&text);

    assert_eq!(http_get(metrics, "/readyz").map(|r| r.0), Some(200));
    assert_eq!(http_get(metrics, "/livez").map(|r| r.0), Some(200));

    redis.stop();
    let (code, body) = eventually(DEADLINE, "/healthz turns 503", || {
        http_get(metrics, "/healthz").filter(|(code, _)| *code == 503)
    });
    assert!(body.contains("backend critical"), "{code} {body}");
    // Not ready (no traffic should come), but alive (no restart would help).
    assert_eq!(http_get(metrics, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(metrics, "/livez").map(|r| r.0), Some(200));
    let check = run_to_exit(&[], &["health", "--addr", &metrics_addr]);
    assert_eq!(check.status.code(), Some(1), "amb-serf health: {check:?}");
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("503"),
        "{check:?}"
    );
    let (_, text) = http_get(metrics, "/metrics").expect("/metrics answers");
    assert!(text.contains("amb_serf_upstream_up 0"), "{text}");
}

#[test]
fn a_tags_file_survives_a_restart() {
    let redis = Redis::start(loopback(173));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("tags.json");
    std::fs::write(&file, r#"{"dc":"east"}"#).expect("writing the tags file");
    let vars = vec![(
        "REDIS_PORT_6379_TCP".to_owned(),
        format!("tcp://{}", redis.addr),
    )];
    for round in 0..2 {
        let gossip = SocketAddr::from((loopback(173), free_port(loopback(173))));
        let mut args = member_args("amb-file", gossip);
        args.extend(["--tags-file".to_owned(), file.display().to_string()]);
        // The second start reads back role/health/ports the first one wrote: still not the
        // user's tags, so no "set by amb-serf itself" error.
        let mut ambassador = start(listen_ip(6379), &vars, &args);
        let written = std::fs::read_to_string(&file).expect("the tags file");
        for tag in [
            "\"dc\": \"east\"",
            "\"role\": \"6379\"",
            "\"health\": \"passing\"",
        ] {
            assert!(written.contains(tag), "round {round}: {tag} in {written}");
        }
        ambassador.signal(libc::SIGTERM);
        let exit = ambassador.wait_exit(DEADLINE);
        assert_eq!(exit.code(), Some(0), "round {round}: {}", ambassador.log());
    }
}
