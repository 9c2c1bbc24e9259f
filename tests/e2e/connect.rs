//! `amb-serf connect 6379` against a real `serf agent` as serf_1 and real redis backends.
//!
//! Providers are `amb-serf run` ambassadors, each forwarding to its own `redis-server` and
//! advertising `role=6379` with a `service` address (free loopback ports, so parallel test runs
//! never compete for 6379); each redis holds a `who` key that names it, so every connection
//! through `connect` tells which backend served it (`GET who`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{eventually, free_port, loopback, time_until, Redis, SerfAgent, DEADLINE};

use crate::support::{run_to_exit, Ambassador};

const ROLE: &str = "6379";

/// Reads one RESP reply (a status line, an error, or a bulk string) and returns its payload.
fn read_reply(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
            let header = String::from_utf8_lossy(&buffer[..end]).into_owned();
            if let Some(len) = header.strip_prefix('$') {
                let len: i64 = len.parse().expect("bulk length");
                if len < 0 {
                    return Ok(Vec::new());
                }
                let total = end + 2 + len as usize + 2;
                if buffer.len() >= total {
                    return Ok(buffer[end + 2..total - 2].to_vec());
                }
            } else {
                return Ok(header.into_bytes());
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut bytes = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        bytes.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        bytes.extend_from_slice(part);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes
}

fn open(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect((loopback(1), port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(stream)
}

/// `GET who` on a new connection: the name of the backend that served it.
fn who(port: u16) -> std::io::Result<String> {
    let mut stream = open(port)?;
    stream.write_all(&command(&[b"GET", b"who"]))?;
    Ok(String::from_utf8_lossy(&read_reply(&mut stream)?).into_owned())
}

/// A provider: an `amb-serf run` ambassador on a loopback address of its own (forwarding 6379
/// and advertising `role=6379` at its gossip IP, as in Docker) for a redis backend named `who`.
struct Provider {
    ambassador: Ambassador,
    redis: Redis,
}

impl Provider {
    /// Starts redis and its ambassador: `amb-serf run --forward PORT=<redis> --role 6379
    /// --service-addr 127.0.0.1:PORT` (the cross-host form, on a free port, so tests running in
    /// parallel never compete for 6379).
    fn start(node: &str, who_am_i: &str, serf_1: &SerfAgent) -> Self {
        let redis = Redis::start(loopback(1));
        let mut stream = open(redis.addr.port()).expect("connecting to redis");
        stream
            .write_all(&command(&[b"SET", b"who", who_am_i.as_bytes()]))
            .unwrap();
        assert_eq!(read_reply(&mut stream).unwrap(), b"+OK");
        let vars = [("SERF_1_PORT_7946_TCP", format!("tcp://{}", serf_1.bind))];
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ambassador = Ambassador::start_provider(ROLE, node, redis.addr, &vars, &[]);
        Self { ambassador, redis }
    }
}

/// `GET path` on `addr`: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
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

/// `serf members` status of `node` as serf_1 sees it.
fn status(serf_1: &SerfAgent, node: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(&serf_1.members_json()).ok()?;
    json["members"]
        .as_array()?
        .iter()
        .find(|member| member["name"] == node)
        .and_then(|member| member["status"].as_str().map(str::to_owned))
}

/// `amb-serf connect 6379=PORT` as `node`, joined to serf_1; returns it and its listen port.
fn start_connect(serf_1: &SerfAgent, node: &str, extra: &[&str]) -> (Ambassador, u16) {
    let listen = free_port(loopback(1));
    let gossip = format!("{}:{}", loopback(1), free_port(loopback(1)));
    let role = format!("{ROLE}={listen}");
    let join = serf_1.bind.to_string();
    let mut args = vec![
        "connect",
        &role,
        "--listen-addr",
        "127.0.0.1",
        "--node",
        node,
        "--bind",
        &gossip,
        "--rpc-addr=",
        "--join",
        &join,
    ];
    args.extend_from_slice(extra);
    (Ambassador::start_command(&[], &args), listen)
}

/// Whether one line of the log contains every needle.
fn logged(connect: &Ambassador, needles: &[&str]) -> bool {
    connect.lines_with(needles) > 0
}

fn wait_provider_added(connect: &Ambassador, node: &str) {
    let quoted = format!("\"{node}\"");
    eventually(DEADLINE, &format!("connect uses {node}"), || {
        logged(connect, &["provider added", &quoted]).then_some(())
    });
}

/// serf_1 and two providers, `p1` ("one") and `p2` ("two").
fn cluster() -> (SerfAgent, Provider, Provider) {
    let serf_1 = SerfAgent::start("serf_1", loopback(1), &[]);
    let one = Provider::start("p1", "one", &serf_1);
    let two = Provider::start("p2", "two", &serf_1);
    (serf_1, one, two)
}

#[test]
fn spreads_over_providers_and_survives_a_killed_one() {
    let (serf_1, mut one, _two) = cluster();
    let (connect, port) = start_connect(&serf_1, "consumer", &[]);
    wait_provider_added(&connect, "p1");
    wait_provider_added(&connect, "p2");

    let mut counts = BTreeMap::new();
    for i in 0..200 {
        let name = who(port).unwrap_or_else(|error| panic!("connection {i}: {error}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts.values().all(|&n| n >= 50),
        "each gets a quarter: {counts:?}"
    );

    one.ambassador.signal(libc::SIGKILL);
    one.ambassador.wait_exit(DEADLINE);
    eventually(DEADLINE, "serf_1 marks p1 failed", || {
        (status(&serf_1, "p1").as_deref() == Some("failed")).then_some(())
    });
    for i in 0..100 {
        let name =
            who(port).unwrap_or_else(|error| panic!("connection {i} after the kill: {error}"));
        assert_eq!(name, "two", "connection {i}");
    }
    eventually(DEADLINE, "connect drops p1", || {
        logged(&connect, &["provider removed", "\"p1\""]).then_some(())
    });
}

#[test]
fn a_graceful_leave_fails_no_connection() {
    let (serf_1, mut one, _two) = cluster();
    let (connect, port) = start_connect(&serf_1, "consumer", &[]);
    wait_provider_added(&connect, "p1");
    wait_provider_added(&connect, "p2");

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match who(port) {
                        Ok(_) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                failures
            })
        })
        .collect();

    let before = served.load(Ordering::Relaxed);
    eventually(DEADLINE, "clients are being served", || {
        (served.load(Ordering::Relaxed) > before + 20).then_some(())
    });
    one.ambassador.signal(libc::SIGTERM);
    assert!(
        one.ambassador.wait_exit(DEADLINE).success(),
        "p1 leaves, drains, exits 0"
    );
    eventually(DEADLINE, "serf_1 shows p1 left", || {
        (status(&serf_1, "p1").as_deref() == Some("left")).then_some(())
    });
    eventually(DEADLINE, "connect drops p1", || {
        logged(&connect, &["provider removed", "\"p1\""]).then_some(())
    });
    // Its backend goes away too, as when the containers stop.
    one.redis.stop();
    let after = served.load(Ordering::Relaxed);
    eventually(DEADLINE, "clients keep being served", || {
        (served.load(Ordering::Relaxed) > after + 100).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let failures = client.join().expect("client thread");
        assert!(failures.is_empty(), "failed connections: {failures:?}");
    }
    for i in 0..20 {
        assert_eq!(who(port).unwrap(), "two", "connection {i}");
    }
}

#[test]
fn follows_health_and_new_providers_without_cutting_a_long_transfer() {
    let (serf_1, mut one, mut two) = cluster();
    let (connect, port) = start_connect(&serf_1, "consumer", &[]);
    wait_provider_added(&connect, "p1");
    wait_provider_added(&connect, "p2");

    // A long transfer: a large SET sent in two halves around the membership changes.
    let mut long = open(port).unwrap();
    long.write_all(&command(&[b"GET", b"who"])).unwrap();
    let target = String::from_utf8(read_reply(&mut long).unwrap()).unwrap();
    let (other, other_name) = if target == "one" {
        (&mut two, "two")
    } else {
        (&mut one, "one")
    };
    let value: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut set = format!("*3\r\n$3\r\nSET\r\n$4\r\nbulk\r\n${}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    let half = set.len() / 2;
    long.write_all(&set[..half]).unwrap();

    // The other provider's backend stops, so its ambassador turns critical: new connections
    // avoid it within 2 health intervals (the default interval is 2 s).
    other.redis.stop();
    let took = time_until(
        DEADLINE,
        "new connections avoid the critical provider",
        || (0..20).all(|_| who(port).is_ok_and(|name| name == target)),
    );
    assert!(took <= Duration::from_secs(4), "took {took:?}");
    assert!(!(0..20).any(|_| who(port).is_ok_and(|name| name == other_name)));

    // A third provider joins and is used without restarting connect.
    let _three = Provider::start("p3", "three", &serf_1);
    eventually(DEADLINE, "the third provider gets connections", || {
        who(port).is_ok_and(|name| name == "three").then_some(())
    });

    // The long transfer was untouched by both changes.
    long.write_all(&set[half..]).unwrap();
    assert_eq!(read_reply(&mut long).unwrap(), b"+OK");
    long.write_all(&command(&[b"GET", b"bulk"])).unwrap();
    assert!(
        read_reply(&mut long).unwrap() == value,
        "the value came back intact"
    );
}

#[test]
fn a_client_waits_for_the_first_provider() {
    let serf_1 = SerfAgent::start("serf_1", loopback(1), &[]);
    let metrics = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let metrics_flag = metrics.to_string();
    let (connect, port) = start_connect(
        &serf_1,
        "consumer",
        &["--wait-for-target", "40s", "--metrics-addr", &metrics_flag],
    );
    eventually(DEADLINE, "connect says it has no provider yet", || {
        logged(&connect, &["no provider yet"]).then_some(())
    });
    assert_eq!(http_get(metrics, "/healthz").map(|r| r.0), Some(503));
    let start = Instant::now();
    let client = std::thread::spawn(move || who(port));
    // Not an assertion on time: the client must be waiting before the provider exists.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !client.is_finished(),
        "the client waits instead of being closed"
    );
    let _one = Provider::start("p1", "one", &serf_1);
    let provider_up = start.elapsed();
    let name = client
        .join()
        .unwrap()
        .expect("served once a provider appeared");
    assert_eq!(name, "one");
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "served within the wait (provider up after {provider_up:?})"
    );
    assert!(logged(&connect, &["role available"]), "{}", connect.log());
    assert_eq!(http_get(metrics, "/healthz").map(|r| r.0), Some(200));
    let (_, body) = http_get(metrics, "/metrics").expect("metrics answer");
    let series = format!(
        "amb_serf_connections_total{{protocol=\"tcp\",listen=\"127.0.0.1:{port}\",role=\"{ROLE}\"}} 1"
    );
    assert!(body.lines().any(|l| l == series), "{series} in:\n{body}");
    crate::support::promtool_check(&body);

    // SIGTERM: connect leaves the cluster, drains, exits 0.
    let mut connect = connect;
    connect.signal(libc::SIGTERM);
    assert!(connect.wait_exit(DEADLINE).success());
    eventually(DEADLINE, "serf_1 shows connect left", || {
        (status(&serf_1, "consumer").as_deref() == Some("left")).then_some(())
    });
}

#[test]
fn bad_roles_exit_2_with_a_clear_message() {
    for (args, needle) in [
        (
            &["connect", "web"][..],
            "role \"web\" is not a port number, so give the listen port: web=PORT",
        ),
        (&["connect", "web=http"][..], "listen port \"http\""),
        (
            &["connect", "3306", "db=3306"][..],
            "both listen on port 3306",
        ),
        (&["connect"][..], "no role given"),
    ] {
        let output = run_to_exit(&[], args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn drain_on_removal_closes_connections_only_when_asked() {
    let serf_1 = SerfAgent::start("serf_1", loopback(1), &[]);
    let redis = Redis::start(loopback(1));
    // A real serf agent as the provider, so its role can be withdrawn while its backend serves.
    let provider = SerfAgent::start(
        "p1",
        loopback(1),
        &[
            &format!("-tag=role={ROLE}"),
            &format!("-tag=service={}", redis.addr),
            &format!("-join={}", serf_1.bind),
        ],
    );
    let (kept, kept_port) = start_connect(&serf_1, "keeps", &[]);
    let (cut, cut_port) = start_connect(&serf_1, "cuts", &["--drain-on-removal"]);
    for connect in [&kept, &cut] {
        wait_provider_added(connect, "p1");
    }
    let mut streams = Vec::new();
    for port in [kept_port, cut_port] {
        let mut stream = open(port).unwrap();
        stream.write_all(&command(&[b"PING"])).unwrap();
        assert_eq!(read_reply(&mut stream).unwrap(), b"+PONG");
        streams.push(stream);
    }
    let output = provider.cli(&["tags", "-delete=role"]);
    assert!(output.status.success(), "serf tags: {output:?}");
    for connect in [&kept, &cut] {
        eventually(DEADLINE, "connect drops p1", || {
            logged(connect, &["provider removed", "\"p1\""]).then_some(())
        });
    }
    let (mut kept_stream, mut cut_stream) = (streams.remove(0), streams.remove(0));
    let mut byte = [0u8; 1];
    assert_eq!(
        cut_stream
            .read(&mut byte)
            .map_err(|e| e.kind())
            .unwrap_or(0),
        0,
        "closed"
    );
    kept_stream.write_all(&command(&[b"PING"])).unwrap();
    assert_eq!(
        read_reply(&mut kept_stream).unwrap(),
        b"+PONG",
        "kept by default"
    );
}

/// `run --connect`: one process serves its own backend (advertised in Serf) and consumes
/// another role from the cluster — an ambassador that serves one service and uses another.
#[test]
fn run_serves_one_role_and_consumes_another_in_one_process() {
    let serf_1 = SerfAgent::start("serf_1", loopback(1), &[]);
    let _provider = Provider::start("provider", "provider-redis", &serf_1);
    let own = Redis::start(loopback(1));
    let vars = [("SERF_1_PORT_7946_TCP", format!("tcp://{}", serf_1.bind))];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let consume_port = free_port(loopback(1));
    let own_port = free_port(loopback(1));
    let connect = format!("{ROLE}={consume_port}");
    let forward = format!("{own_port}={}", own.addr);
    let gossip = SocketAddr::from((loopback(1), free_port(loopback(1)))).to_string();
    let both = Ambassador::start_on(
        loopback(1),
        &vars,
        &[
            "--forward",
            &forward,
            "--role",
            "cache",
            "--node",
            "both",
            "--bind",
            &gossip,
            "--rpc-addr",
            "127.0.0.1:0",
            "--connect",
            &connect,
        ],
    );
    assert!(
        both.log().contains(&format!("role={ROLE}")),
        "the summary names the consumed role:\n{}",
        both.log()
    );
    // It serves: serf_1 sees it advertise its own role, and its forward answers.
    eventually(DEADLINE, "serf_1 lists `both` with role=cache", || {
        let output = serf_1.cli(&["members", "-tag", "role=cache", "-status", "alive"]);
        String::from_utf8_lossy(&output.stdout)
            .contains("both")
            .then_some(())
    });
    let mut stream = open(own_port).expect("connecting to the own forward");
    stream.write_all(&command(&[b"PING"])).unwrap();
    assert_eq!(read_reply(&mut stream).unwrap(), b"+PONG");
    // It consumes: its connect port reaches the provider's backend.
    eventually(DEADLINE, "GET who through run --connect", || {
        (who(consume_port).ok()?.as_str() == "provider-redis").then_some(())
    });
}
