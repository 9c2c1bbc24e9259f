//! `--dns-addr`: the member's DNS interface, asked by the real `dig` (Debian's
//! `bind9-dnsutils`) about real `amb-serf agent` and `run` members on loopback.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testkit::{eventually, free_port, loopback, require, time_until, Child, DEADLINE};

use crate::agent::AmbAgent as Agent;
use crate::support::{self, Ambassador};

/// A provider joining `seed`, with `tags`.
fn provider(name: &str, ip: Ipv4Addr, seed: &Agent, tags: &[&str]) -> Agent {
    let join = seed.bind.to_string();
    let mut extra = vec!["--join", &join];
    for tag in tags {
        extra.extend(["--tag", tag]);
    }
    Agent::start(name, ip, &extra)
}

/// An agent answering DNS on a port of its own; returns it and that address.
fn dns_seed(name: &str) -> (Agent, SocketAddr) {
    let dns = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let agent = Agent::start(name, loopback(1), &["--dns-addr", &dns.to_string()]);
    let node = format!("{name}.node.serf");
    eventually(DEADLINE, "the DNS interface answers", || {
        (short(dns, &[&node]) == set(&["127.0.0.1"])).then_some(())
    });
    (agent, dns)
}

/// `dig @SERVER -p PORT ARGS…`, one try of 2 s, its whole output.
pub(crate) fn dig(server: SocketAddr, args: &[&str]) -> String {
    let mut command = Command::new(require("dig"));
    command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args);
    let output = testkit::run_with_timeout(&mut command, Duration::from_secs(30));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `+short` answer lines as a set (their order is random).
pub(crate) fn short(server: SocketAddr, args: &[&str]) -> BTreeSet<String> {
    let mut args = args.to_vec();
    args.push("+short");
    dig(server, &args)
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with(';'))
        .map(str::to_owned)
        .collect()
}

pub(crate) fn set(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|line| (*line).to_owned()).collect()
}

/// The status in dig's header line (`NOERROR`, `NXDOMAIN`, …).
fn status(output: &str) -> &str {
    output
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig's output:\n{output}"))
}

/// The count dig prints for a section (`ANSWER: 2`).
fn count(output: &str, section: &str) -> usize {
    output
        .split(&format!("{section}: "))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no {section} count in dig's output:\n{output}"))
}

#[test]
fn roles_nodes_and_negative_answers() {
    let (seed, dns) = dns_seed("dns-seed-1");
    let passing = ["role=3306", "health=passing"];
    let _a = provider("db-a", loopback(2), &seed, &passing);
    let b = provider("db-b", loopback(3), &seed, &passing);
    let _c = provider(
        "db-c",
        loopback(4),
        &seed,
        &["role=3306", "health=critical"],
    );
    // Role A: the alive, passing providers only.
    eventually(DEADLINE, "both passing providers in 3306.role.serf", || {
        (short(dns, &["3306.role.serf", "A"]) == set(&["127.0.0.2", "127.0.0.3"])).then_some(())
    });
    eventually(DEADLINE, "db-c known", || {
        (short(dns, &["db-c.node.serf"]) == set(&["127.0.0.4"])).then_some(())
    });
    // The same over TCP.
    assert_eq!(
        short(dns, &["+tcp", "3306.role.serf", "A"]),
        set(&["127.0.0.2", "127.0.0.3"])
    );

    // SRV by both names, targets in the zone, their addresses in the additional section.
    let services = set(&["1 1 3306 db-a.node.serf.", "1 1 3306 db-b.node.serf."]);
    assert_eq!(short(dns, &["_3306._tcp.serf", "SRV"]), services);
    assert_eq!(short(dns, &["3306.role.serf", "SRV"]), services);
    let additional = dig(dns, &["_3306._tcp.serf", "SRV", "+noall", "+additional"]);
    assert!(
        additional.contains("db-a.node.serf.\t\t0\tIN\tA\t127.0.0.2")
            && additional.contains("db-b.node.serf.\t\t0\tIN\tA\t127.0.0.3"),
        "{additional}"
    );

    // Negative answers.
    let nxdomain = dig(dns, &["nobody.node.serf", "A"]);
    assert_eq!(status(&nxdomain), "NXDOMAIN", "{nxdomain}");
    assert!(
        nxdomain.contains("IN\tSOA\tns.serf. hostmaster.serf."),
        "{nxdomain}"
    );
    assert_eq!(status(&dig(dns, &["www.serf", "A"])), "NXDOMAIN");
    let nodata = dig(dns, &["6379.role.serf", "A"]);
    assert_eq!(status(&nodata), "NOERROR", "{nodata}");
    assert_eq!(count(&nodata, "ANSWER"), 0, "{nodata}");
    assert_eq!(count(&nodata, "AUTHORITY"), 1, "{nodata}");
    assert!(nodata.contains("IN\tSOA"), "{nodata}");
    assert!(nodata.contains(" aa"), "authoritative: {nodata}");
    let ipv6 = dig(dns, &["3306.role.serf", "AAAA"]);
    assert_eq!((status(&ipv6), count(&ipv6, "ANSWER")), ("NOERROR", 0));
    let refused = dig(dns, &["example.com", "A"]);
    assert_eq!(status(&refused), "REFUSED", "{refused}");
    assert_eq!(count(&refused, "ANSWER"), 0);
    // EDNS0 is answered with our payload size.
    assert!(dig(dns, &["3306.role.serf"]).contains("udp: 1232"));

    // A member that leaves is gone from the answer at once.
    b.child.signal(libc::SIGTERM);
    let took = time_until(
        Duration::from_secs(10),
        "db-b gone from 3306.role.serf",
        || short(dns, &["3306.role.serf", "A"]) == set(&["127.0.0.2"]),
    );
    // The leave is gossiped at once (well under a second here); the margin is for a busy CI.
    assert!(
        took < Duration::from_secs(5),
        "db-b left, still answered for {took:?}"
    );
    assert_eq!(status(&dig(dns, &["db-b.node.serf"])), "NXDOMAIN");
}

#[test]
fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let (seed, dns) = dns_seed("dns-seed-2");
    // Long node names make long SRV targets: four of them do not fit in 512 bytes.
    let names: Vec<String> = (0..4)
        .map(|index| {
            let label = "x".repeat(50);
            format!("web-{index}.{label}.{label}")
        })
        .collect();
    let _providers: Vec<Agent> = names
        .iter()
        .map(|name| provider(name, loopback(1), &seed, &["role=8080", "health=passing"]))
        .collect();
    eventually(DEADLINE, "four providers of 8080 over TCP", || {
        (short(dns, &["+tcp", "_8080._tcp.serf", "SRV"]).len() == 4).then_some(())
    });
    // Without EDNS0 (512 bytes), no retry: TC and no answer.
    let truncated = dig(dns, &["+noedns", "+ignore", "_8080._tcp.serf", "SRV"]);
    assert!(truncated.contains(" tc"), "{truncated}");
    assert_eq!(count(&truncated, "ANSWER"), 0, "{truncated}");
    // dig's default: it retries over TCP and gets everything.
    let retried = dig(dns, &["+noedns", "_8080._tcp.serf", "SRV"]);
    assert!(retried.contains("retrying in TCP mode"), "{retried}");
    assert_eq!(count(&retried, "ANSWER"), 4, "{retried}");
    assert!(retried.contains("(TCP)"), "{retried}");
}

#[test]
fn a_critical_backend_disappears_within_the_health_interval() {
    let backend = TcpListener::bind((loopback(1), 0)).unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let dns = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let listen_port = free_port(loopback(1));
    let forward = format!("{listen_port}={backend_addr}");
    let dns_text = dns.to_string();
    let _ambassador = Ambassador::start(
        &[],
        &[
            "--forward",
            &forward,
            "--role",
            "web",
            "--node",
            "web-dns",
            "--health-interval",
            "1s",
            "--dns-addr",
            &dns_text,
        ],
    );
    eventually(DEADLINE, "web.role.serf answered", || {
        (short(dns, &["web.role.serf"]) == set(&["127.0.0.1"])).then_some(())
    });
    // The port dialled is the forwarded one (the role is a name).
    assert_eq!(
        short(dns, &["_web._tcp.serf", "SRV"]),
        set(&[&format!("1 1 {listen_port} web-dns.node.serf.")])
    );
    drop(backend);
    let took = time_until(
        Duration::from_secs(20),
        "web gone from web.role.serf",
        || short(dns, &["web.role.serf"]).is_empty(),
    );
    // One interval to the next probe, its timeout (at most the interval), the tag's gossip;
    // the margin is for a busy CI.
    assert!(
        took < Duration::from_secs(6),
        "critical for {took:?} and still answered"
    );
    let nodata = dig(dns, &["web.role.serf"]);
    assert_eq!((status(&nodata), count(&nodata, "ANSWER")), ("NOERROR", 0));
    // The member itself is still there.
    assert_eq!(short(dns, &["web-dns.node.serf"]), set(&["127.0.0.1"]));
}

#[test]
fn bad_flags_are_usage_errors() {
    let output = support::run_to_exit(
        &[],
        &[
            "agent",
            "--bind",
            "127.0.0.1:0",
            "--rpc-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
            "--dns-domain",
            ".",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--dns-domain"), "{stderr}");
}

/// `/etc/netns/<namespace>/resolv.conf`, which `ip netns exec` mounts over `/etc/resolv.conf`
/// for what runs in that namespace; removed on drop.
struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    fn write(netns: &str, text: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/<namespace>");
        let guard = Self { dir };
        std::fs::write(guard.dir.join("resolv.conf"), text).expect("writing resolv.conf");
        guard
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `getent hosts NAME` in `host`: glibc's stub resolver, reading the namespace's resolv.conf.
fn getent(host: &testkit::netns::Host, name: &str) -> (Option<i32>, String) {
    let output = testkit::run_with_timeout(
        host.command("getent").args(["hosts", name]),
        Duration::from_secs(30),
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn the_system_resolver_finds_a_role() {
    let Some(net) = testkit::netns::Net::for_test(1) else {
        return;
    };
    let host = net.host(0);
    // glibc takes no port in resolv.conf: the member answers on 53 in a namespace of its own.
    let _resolv_conf = NetnsResolvConf::write(
        &host.netns,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n",
    );
    let bind = format!("{}:7946", host.ip);
    let log = std::env::temp_dir().join(format!("amb-serf-dns-glibc-{}.log", std::process::id()));
    let mut command = host.command(support::binary());
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args([
            "agent",
            "--node",
            "glibc-db",
            "--bind",
            &bind,
            "--rpc-addr",
            "127.0.0.1:7373",
            "--tag",
            "role=3306",
            "--tag",
            "health=passing",
            "--dns-addr",
            "127.0.0.1:53",
        ]);
    let _agent = Child::spawn("amb-serf agent glibc-db", &mut command, Some(&log));
    let expected = host.ip.to_string();
    let found = std::panic::catch_unwind(|| {
        eventually(DEADLINE, "getent hosts 3306.role.serf", || {
            let (code, stdout) = getent(host, "3306.role.serf");
            (code == Some(0)).then_some(stdout)
        })
    });
    let found = found.unwrap_or_else(|panic| {
        eprintln!(
            "--- amb-serf agent glibc-db log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(panic)
    });
    assert!(found.starts_with(&format!("{expected} ")), "{found}");
    let (code, node) = getent(host, "glibc-db.node.serf");
    assert_eq!(code, Some(0));
    assert!(node.starts_with(&format!("{expected} ")), "{node}");
    // Not found: getent's exit status 2.
    assert_eq!(getent(host, "nobody.node.serf").0, Some(2));
    assert_eq!(getent(host, "6379.role.serf").0, Some(2));
    let _ = std::fs::remove_file(&log);
}

#[test]
fn connect_answers_too() {
    let seed = Agent::start("dns-seed-3", loopback(1), &[]);
    let _db = provider("db-x", loopback(5), &seed, &["role=3306", "health=passing"]);
    let listen = format!("3306={}", free_port(loopback(1)));
    let gossip = format!("{}:{}", loopback(1), free_port(loopback(1)));
    let dns = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let (join, dns_text) = (seed.bind.to_string(), dns.to_string());
    let _connect = Ambassador::start_command(
        &[],
        &[
            "connect",
            &listen,
            "--listen-addr",
            "127.0.0.1",
            "--node",
            "dns-consumer",
            "--bind",
            &gossip,
            "--rpc-addr=",
            "--join",
            &join,
            "--dns-addr",
            &dns_text,
        ],
    );
    eventually(DEADLINE, "the provider through connect's DNS", || {
        (short(dns, &["3306.role.serf"]) == set(&["127.0.0.5"])).then_some(())
    });
    assert_eq!(short(dns, &["dns-consumer.node.serf"]), set(&["127.0.0.1"]));
}
