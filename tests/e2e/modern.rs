//! Beyond the 2014 `--link` world: a Kubernetes pod's service-link variables, lists with
//! spaces, SIGHUP, JSON logs and log filters.

use std::net::{SocketAddr, TcpListener};

use testkit::{eventually, free_port, loopback, DEADLINE};

use crate::support::{run_to_exit, Ambassador};

/// The `"ready"` line of an ambassador's JSON log.
fn ready_line(ambassador: &Ambassador) -> serde_json::Value {
    let log = ambassador.log();
    let line = log
        .lines()
        .find(|line| line.contains("\"ready\""))
        .unwrap_or_else(|| panic!("no ready line:\n{log}"));
    serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"))
}

/// `amb-serf run` on loopback `ip`, with one forward nobody uses and no health checks.
fn forwarding_nothing_much(ip: u8, vars: &[(&str, &str)]) -> Ambassador {
    let gossip = format!("{}:{}", loopback(ip), free_port(loopback(ip)));
    let args = [
        "--forward",
        "9=127.0.0.1:9",
        "--bind",
        &gossip,
        "--health-interval",
        "0",
    ];
    Ambassador::start_on(loopback(ip), vars, &args)
}

/// In a pod, the kubelet sets `KUBERNETES_PORT_443_TCP` (and the same form for every Service):
/// the API service is not forwarded nor advertised, and `--links` picks the links to serve.
#[test]
fn a_kubernetes_pod_forwards_its_backend_not_the_api_service() {
    let backend = TcpListener::bind((loopback(230), 0)).expect("binding a backend");
    let backend = backend.local_addr().expect("its address");
    let mysql = format!("tcp://{backend}");
    let gossip = format!("{}:{}", loopback(230), free_port(loopback(230)));
    let pod = [
        ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("MYSQL_PORT_3306_TCP", mysql.as_str()),
    ];
    let args = ["--bind", &gossip, "--health-interval", "0"];
    let ambassador = Ambassador::start_on(loopback(230), &pod, &args);
    let ready = ready_line(&ambassador);
    assert_eq!(ready["fields"]["role"], "3306", "{ready}");
    assert_eq!(ready["fields"]["forwards"], 1, "{ready}");
    assert!(
        !ambassador.log().contains("10.96.0.1"),
        "{}",
        ambassador.log()
    );
    drop(ambassador);

    // With --links naming the other Service of the pod, only that one is served.
    let cache = format!(
        "tcp://{}",
        SocketAddr::from((loopback(231), backend.port()))
    );
    let pod = [
        ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
        ("MYSQL_PORT_3306_TCP", mysql.as_str()),
        ("CACHE_PORT_6379_TCP", cache.as_str()),
        ("AMB_LINKS", "cache"),
    ];
    let ambassador = Ambassador::start_on(loopback(230), &pod, &args);
    let ready = ready_line(&ambassador);
    assert_eq!(ready["fields"]["role"], "6379", "{ready}");
    assert_eq!(ready["fields"]["forwards"], 1, "{ready}");
}

/// `serf agent` reloads on SIGHUP; its default action would end the process without leaving.
#[test]
fn sighup_is_survived() {
    let mut ambassador = forwarding_nothing_much(232, &[]);
    ambassador.signal(libc::SIGHUP);
    eventually(DEADLINE, "SIGHUP logged", || {
        ambassador.log().contains("SIGHUP").then_some(())
    });
    assert!(
        ambassador.is_running(),
        "SIGHUP ended it:\n{}",
        ambassador.log()
    );
    ambassador.signal(libc::SIGTERM);
    assert!(ambassador.wait_exit(DEADLINE).success());
}

/// Every JSON log line is an object whose keys are unique at every level (a span field once
/// repeated `name`, which parsers keep only once).
#[test]
fn json_log_lines_have_unique_keys() {
    let ambassador = forwarding_nothing_much(233, &[("RUST_LOG", "debug")]);
    // The member's spans log a moment after the ready line: poll until one has, checking
    // every line seen on the way.
    eventually(DEADLINE, "a JSON log line inside a span", || {
        let log = ambassador.log();
        let mut with_spans = 0;
        for line in log.lines().filter(|line| line.starts_with('{')) {
            if let Err(error) = serde_json::from_str::<UniqueKeys>(line) {
                panic!("{error}: {line}");
            }
            with_spans += usize::from(line.contains("\"span\":"));
        }
        (with_spans > 0).then_some(())
    });
}

/// `--log-level inf` is a typo, not a target named `inf` that would silence every log line.
#[test]
fn an_invalid_log_filter_exits_2_naming_it() {
    for args in [
        &["--log-level", "inf", "agent"][..],
        &["agent", "--log-level", "serf=verbose"],
    ] {
        let output = run_to_exit(&[], args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--log-level") && stderr.contains("is neither a level"),
            "{stderr}"
        );
    }
    let output = run_to_exit(&[("AMB_LOG_LEVEL", "inf")], &["agent"]);
    assert_eq!(output.status.code(), Some(2));
}

/// A JSON value that refuses duplicate keys in any object.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// The image's `HEALTHCHECK` (`amb-serf health`, `AMB_METRICS_ADDR`) works for `agent` too.
/// An `amb-serf agent` with `--metrics-addr`, once its health endpoint answers.
fn agent_with_metrics(ip: std::net::Ipv4Addr, node: &str) -> (testkit::Child, String) {
    let metrics = format!("{ip}:{}", free_port(ip));
    let gossip = format!("{ip}:{}", free_port(ip));
    let rpc = format!("{ip}:{}", free_port(ip));
    // `agent` has no `ready` line: its health endpoint answering is the sign.
    let mut agent = testkit::Child::spawn(
        "amb-serf agent",
        &mut crate::support::command(
            &[("AMB_METRICS_ADDR", metrics.as_str())],
            &[
                "agent",
                "--node",
                node,
                "--bind",
                &gossip,
                "--rpc-addr",
                &rpc,
            ],
        ),
        None,
    );
    eventually(DEADLINE, "the agent's /readyz answers", || {
        if let Some(status) = agent.wait_timeout(std::time::Duration::ZERO) {
            panic!("amb-serf agent exited ({status})");
        }
        let check = run_to_exit(&[], &["health", "--addr", &metrics]);
        check.status.success().then_some(())
    });
    (agent, metrics)
}

#[test]
fn an_agent_serves_its_health_endpoints() {
    let (mut agent, _) = agent_with_metrics(loopback(234), "modern-agent");
    agent.signal(libc::SIGTERM);
    let status = agent.wait_timeout(DEADLINE).expect("the agent stops");
    assert!(status.success(), "{status}");
}

/// Connections to the metrics port that never send a request are served 64 at a time; the rest
/// are closed at once, so a flood of them cannot use the process's descriptors, and the endpoint
/// answers again once the flood ends.
#[test]
fn idle_metrics_connections_are_capped() {
    use std::io::Read as _;
    let (mut agent, metrics) = agent_with_metrics(loopback(235), "metrics-flood");
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map_or(0, Iterator::count);
    let before = fds();
    let mut idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&metrics).expect("connecting to --metrics-addr"))
        .collect();
    for stream in &idle {
        stream.set_nonblocking(true).expect("non-blocking");
    }
    // The most descriptors seen while the agent sorts the flood out (without the cap, all 300
    // stay open until the 5 s read timeout).
    let mut most = fds();
    eventually(
        DEADLINE,
        "all but 64 idle connections closed by the agent",
        || {
            most = most.max(fds());
            let closed = idle
                .iter_mut()
                .filter_map(|stream| matches!(stream.read(&mut [0u8; 16]), Ok(0)).then_some(()))
                .count();
            (closed >= 300 - 64).then_some(())
        },
    );
    assert!(
        most <= before + 64 + 8,
        "{most} descriptors open with 300 idle connections (before: {before})"
    );
    drop(idle);
    eventually(
        DEADLINE,
        "the health endpoint answers after the flood",
        || {
            run_to_exit(&[], &["health", "--addr", &metrics])
                .status
                .success()
                .then_some(())
        },
    );
    agent.signal(libc::SIGTERM);
    let status = agent.wait_timeout(DEADLINE).expect("the agent stops");
    assert!(status.success(), "{status}");
}
