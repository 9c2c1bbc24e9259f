//! `--dataplane kernel|auto`: forwards carried by nftables NAT in the ambassador's network
//! namespace. Three namespaces made by the test on one bridge (client h0, ambassador h1,
//! backend h2); `nft` reads the ambassador's ruleset (the binary itself never runs `nft`).

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use testkit::netns::{Host, Net};
use testkit::{require, run_with_timeout};

use crate::ambassador::http_get;
use crate::faults::{echo_on, echoes};
use crate::support::{binary, eventually, Ambassador, RandomBytes, DEADLINE};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const HEALTH_PORT: u16 = 7002;

/// `nft ARGS` in `host`; its stdout, or `None` when it fails (e.g. no such table).
fn nft(host: &Host, args: &[&str]) -> Option<String> {
    let output = run_with_timeout(host.command(require("nft")).args(args), DEADLINE);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ruleset(host: &Host) -> String {
    nft(host, &["list", "ruleset"]).expect("nft list ruleset")
}

/// The packets counted by the DNAT rules of `chain` in `table` that mention `needle`
/// (`tcp dport 7000`); `None` when there is no such rule (or table).
fn dnat_packets(host: &Host, table: &str, chain: &str, needle: &str) -> Option<u64> {
    let listing = nft(host, &["list", "chain", "ip", table, chain])?;
    let line = listing
        .lines()
        .find(|line| line.contains(needle) && line.contains("dnat to"))?;
    let after = line.split("packets ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

/// A UDP echo server on `addr` in `host` (a thread of the test; stops on drop).
struct UdpEcho(Arc<AtomicBool>);

impl UdpEcho {
    fn start(host: &Host, addr: SocketAddr) -> Self {
        let socket = host
            .enter(|| UdpSocket::bind(addr))
            .expect("binding the UDP echo");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        thread::spawn(move || {
            let mut buffer = vec![0; 65536];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(&buffer[..len], from);
                }
            }
        });
        Self(stop)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends `total` pseudo-random bytes through a new connection to `addr` from `client` and
/// checks the echo byte for byte.
fn tcp_round_trip(client: &Host, addr: SocketAddr, total: usize) {
    let stream = client
        .connect(addr, Duration::from_secs(5))
        .expect("connecting through the forward");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let random = RandomBytes::new();
    let mut writer = stream.try_clone().expect("clone");
    let mut source = random.clone();
    let sender = thread::spawn(move || {
        let mut block = vec![0; 16 * 1024];
        let mut left = total;
        while left > 0 {
            let len = left.min(block.len());
            source.fill(&mut block[..len]);
            writer.write_all(&block[..len]).expect("writing");
            left -= len;
        }
    });
    let mut received = vec![0; total];
    (&stream)
        .read_exact(&mut received)
        .expect("reading the echo");
    sender.join().expect("the writer");
    let mut expected = vec![0; total];
    let mut again = random;
    for block in expected.chunks_mut(16 * 1024) {
        again.fill(block);
    }
    assert!(received == expected, "the echo differs from what was sent");
}

/// Datagrams of several sizes from `client` to `addr` come back unchanged.
fn udp_round_trips(client: &Host, addr: SocketAddr) {
    let socket = client
        .enter(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("client socket");
    socket.connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let mut random = RandomBytes::new();
    for size in [1, 100, 1400, 8000] {
        let mut datagram = vec![0; size];
        random.fill(&mut datagram);
        eventually(DEADLINE, "a datagram echoed through the forward", || {
            socket.send(&datagram).ok()?;
            let mut reply = vec![0; 65536];
            let len = socket.recv(&mut reply).ok()?;
            (reply[..len] == datagram[..]).then_some(())
        });
    }
}

/// `amb-serf run` in `host` (listening on every address) as `node`, forwarding TCP and UDP to
/// `backend`, with `extra` flags.
fn start_ambassador(host: &Host, node: &str, backend: &Host, extra: &[&str]) -> Ambassador {
    let tcp = format!("{TCP_PORT}={}:{TCP_PORT}", backend.ip);
    let udp = format!("{UDP_PORT}={}:{UDP_PORT}/udp", backend.ip);
    let mut args = vec![
        "run",
        "--listen-addr",
        "0.0.0.0",
        "--forward",
        &tcp,
        "--forward",
        &udp,
        "--node",
        node,
    ];
    args.extend_from_slice(extra);
    if !args.contains(&"--health-interval") {
        args.extend(["--health-interval", "0"]);
    }
    Ambassador::start_command_in(host, &[], &args)
}

fn table(node: &str) -> String {
    format!("amb-serf-{node}")
}

#[test]
fn kernel_path_carries_tcp_and_udp_byte_for_byte_and_sigterm_removes_its_table() {
    let Some(net) = Net::for_test(3) else { return };
    let (client, proxy, backend) = (net.host(0), net.host(1), net.host(2));
    let _tcp_echo = echo_on(backend, SocketAddr::from((backend.ip, TCP_PORT)));
    let _udp_echo = UdpEcho::start(backend, SocketAddr::from((backend.ip, UDP_PORT)));
    let before = ruleset(proxy);

    let mut ambassador = start_ambassador(
        proxy,
        "k1",
        backend,
        &["--dataplane", "kernel", "--metrics-addr", "127.0.0.1:9090"],
    );
    assert_eq!(
        ambassador.lines_with(&["data path: kernel", "amb-serf-k1"]),
        1,
        "{}",
        ambassador.log()
    );
    let table = table("k1");
    let tcp = SocketAddr::from((proxy.ip, TCP_PORT));
    let udp = SocketAddr::from((proxy.ip, UDP_PORT));

    // From another namespace: prerouting.
    tcp_round_trip(client, tcp, 4 << 20);
    udp_round_trips(client, udp);
    let tcp_dnat = dnat_packets(proxy, &table, "prerouting", "tcp dport 7000");
    let udp_dnat = dnat_packets(proxy, &table, "prerouting", "udp dport 7001");
    assert!(tcp_dnat >= Some(1), "{}", ruleset(proxy));
    assert!(udp_dnat >= Some(1), "{}", ruleset(proxy));

    // From the ambassador's own namespace (a sidecar sharing its consumer's): output.
    tcp_round_trip(proxy, tcp, 1 << 20);
    udp_round_trips(proxy, udp);
    assert!(dnat_packets(proxy, &table, "output", "tcp dport 7000") >= Some(1));
    assert!(dnat_packets(proxy, &table, "output", "udp dport 7001") >= Some(1));

    // /metrics: the rules' counters, every packet of both paths.
    let metrics = proxy
        .enter(|| http_get(SocketAddr::from(([127, 0, 0, 1], 9090)), "/metrics"))
        .expect("GET /metrics")
        .1;
    let sample = |name: &str, protocol: &str, direction: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|line| {
                line.starts_with(name)
                    && line.contains(&format!("protocol=\"{protocol}\""))
                    && line.contains(direction)
            })
            .unwrap_or_else(|| panic!("no {name} {protocol} {direction} in:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().expect("a number")
    };
    for direction in ["to_upstream", "to_client"] {
        assert!(sample("amb_serf_kernel_bytes_total", "tcp", direction) > 5 << 20);
        assert!(sample("amb_serf_kernel_packets_total", "udp", direction) >= 8);
    }
    assert!(sample("amb_serf_kernel_connections_total", "tcp", "") >= 2);

    // A loopback client: without route_localnet the kernel leaves it to the user-space
    // listener, which still serves it.
    let loopback = SocketAddr::from(([127, 0, 0, 1], TCP_PORT));
    let counted = dnat_packets(proxy, &table, "output", "tcp dport 7000");
    assert!(echoes(proxy, loopback));
    assert_eq!(
        dnat_packets(proxy, &table, "output", "tcp dport 7000"),
        counted
    );

    ambassador.signal(libc::SIGTERM);
    assert!(ambassador.wait_exit(DEADLINE).success());
    assert_eq!(
        ruleset(proxy),
        before,
        "SIGTERM leaves the ruleset as it was"
    );
}

#[test]
fn failing_backend_withdraws_the_dnat_rules_and_connections_in_flight_continue() {
    let Some(net) = Net::for_test(3) else { return };
    let (client, proxy, backend) = (net.host(0), net.host(1), net.host(2));
    let _tcp_echo = echo_on(backend, SocketAddr::from((backend.ip, TCP_PORT)));
    let health_addr = SocketAddr::from((backend.ip, HEALTH_PORT));
    let mut health = echo_on(backend, health_addr);
    let health_target = health_addr.to_string();
    let _ambassador = start_ambassador(
        proxy,
        "k2",
        backend,
        &[
            "--dataplane",
            "kernel",
            "--health-target",
            &health_target,
            "--health-check",
            "tcp",
            "--health-interval",
            "500ms",
        ],
    );
    let table = table("k2");
    let tcp = SocketAddr::from((proxy.ip, TCP_PORT));
    let mut held = client
        .connect(tcp, Duration::from_secs(5))
        .expect("connecting");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut echo_held = |word: &[u8; 4]| {
        let mut reply = [0; 4];
        held.write_all(word)
            .expect("writing on the held connection");
        held.read_exact(&mut reply)
            .expect("reading on the held connection");
        assert_eq!(&reply, word);
    };
    echo_held(b"one.");
    assert!(dnat_packets(proxy, &table, "prerouting", "tcp dport 7000") >= Some(1));

    health.kill();
    eventually(DEADLINE, "the DNAT rules withdrawn", || {
        dnat_packets(proxy, &table, "prerouting", "tcp dport 7000")
            .is_none()
            .then_some(())
    });
    assert!(
        nft(proxy, &["list", "chain", "ip", &table, "postrouting"])
            .is_some_and(|chain| chain.contains("masquerade")),
        "source NAT stays for connections in flight"
    );
    echo_held(b"two.");

    let _health = echo_on(backend, health_addr);
    eventually(DEADLINE, "the DNAT rules back", || {
        dnat_packets(proxy, &table, "prerouting", "tcp dport 7000").map(|_| ())
    });
    assert!(echoes(client, tcp));
    assert!(dnat_packets(proxy, &table, "prerouting", "tcp dport 7000") >= Some(1));
    echo_held(b"thr.");
}

#[test]
fn a_crashed_runs_table_is_replaced_on_restart_and_another_ambassadors_is_untouched() {
    let Some(net) = Net::for_test(3) else { return };
    let (client, proxy, backend) = (net.host(0), net.host(1), net.host(2));
    let _tcp_echo = echo_on(backend, SocketAddr::from((backend.ip, TCP_PORT)));
    let before = ruleset(proxy);
    // Another ambassador in the same namespace, its own ports and table.
    let other_forward = format!("7100={}:{TCP_PORT}", backend.ip);
    let other_bind = format!("{}:7947", proxy.ip);
    let mut other = Ambassador::start_command_in(
        proxy,
        &[],
        &[
            "run",
            "--forward",
            &other_forward,
            "--node",
            "other",
            "--bind",
            &other_bind,
            "--rpc-addr",
            "127.0.0.1:7374",
            "--health-interval",
            "0",
            "--dataplane",
            "kernel",
        ],
    );
    let other_addr = SocketAddr::from((proxy.ip, 7100));

    // A run that fails after its table went in (its gossip port is taken) removes it.
    let failing_forward = format!("7200={}:{TCP_PORT}", backend.ip);
    let failed = run_with_timeout(
        &mut wrapped(
            proxy,
            &[],
            &[
                "run",
                "--forward",
                &failing_forward,
                "--node",
                "k6",
                "--bind",
                &other_bind,
                "--rpc-addr",
                "127.0.0.1:7375",
                "--health-interval",
                "0",
                "--dataplane",
                "kernel",
            ],
        ),
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("removed the nftables table"), "{stderr}");
    assert!(nft(proxy, &["list", "table", "ip", &table("k6")]).is_none());

    let mut crashed = start_ambassador(proxy, "k3", backend, &["--dataplane", "kernel"]);
    crashed.signal(libc::SIGKILL);
    crashed.wait_exit(DEADLINE);
    assert!(nft(proxy, &["list", "table", "ip", &table("k3")]).is_some());

    let mut restarted = start_ambassador(proxy, "k3", backend, &["--dataplane", "kernel"]);
    let tables = nft(proxy, &["list", "tables"]).expect("nft list tables");
    assert_eq!(tables.matches("table ip amb-serf-k3\n").count(), 1);
    let rules = nft(proxy, &["list", "table", "ip", &table("k3")]).expect("the table");
    assert_eq!(rules.matches("dnat to").count(), 4, "{rules}");
    tcp_round_trip(client, SocketAddr::from((proxy.ip, TCP_PORT)), 64 << 10);
    assert!(echoes(client, other_addr));

    restarted.signal(libc::SIGTERM);
    assert!(restarted.wait_exit(DEADLINE).success());
    assert!(nft(proxy, &["list", "table", "ip", &table("k3")]).is_none());
    assert!(dnat_packets(proxy, &table("other"), "prerouting", "tcp dport 7100") >= Some(1));
    assert!(echoes(client, other_addr));

    // Crashed again, restarted in user space: the stale table goes all the same.
    let mut crashed = start_ambassador(proxy, "k3", backend, &["--dataplane", "kernel"]);
    crashed.signal(libc::SIGKILL);
    crashed.wait_exit(DEADLINE);
    let user_space = start_ambassador(proxy, "k3", backend, &["--dataplane", "userspace"]);
    assert!(nft(proxy, &["list", "table", "ip", &table("k3")]).is_none());
    assert!(echoes(client, SocketAddr::from((proxy.ip, TCP_PORT))));
    drop(user_space);

    other.signal(libc::SIGTERM);
    assert!(other.wait_exit(DEADLINE).success());
    assert_eq!(ruleset(proxy), before);
}

/// `WRAPPER… amb-serf ARGS` in `host` (no wrapper: the binary itself), with the environment
/// the other e2e tests give it.
fn wrapped(host: &Host, wrapper: &[&str], args: &[&str]) -> Command {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = host.command(require(program));
            command.args(rest).arg(binary());
            command
        }
        None => host.command(binary()),
    };
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .args(["--log-format", "json"])
        .args(args);
    command
}

/// `amb-serf ARGS` in `host` without `CAP_NET_ADMIN` (dropped from the bounding set, so root
/// does not get it at exec).
fn without_net_admin(host: &Host, args: &[&str]) -> Command {
    wrapped(
        host,
        &["setpriv", "--bounding-set", "-net_admin", "--"],
        args,
    )
}

#[test]
fn auto_without_net_admin_serves_in_user_space_and_kernel_exits_2_naming_what_is_missing() {
    let Some(net) = Net::for_test(3) else { return };
    let (client, proxy, backend) = (net.host(0), net.host(1), net.host(2));
    let _tcp_echo = echo_on(backend, SocketAddr::from((backend.ip, TCP_PORT)));
    let before = ruleset(proxy);
    let forward = format!("{TCP_PORT}={}:{TCP_PORT}", backend.ip);
    let args = |mode| {
        vec![
            "run",
            "--listen-addr",
            "0.0.0.0",
            "--forward",
            &forward,
            "--health-interval",
            "0",
            "--dataplane",
            mode,
        ]
    };

    let output = run_with_timeout(&mut without_net_admin(proxy, &args("kernel")), DEADLINE);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cap-add NET_ADMIN"), "{stderr}");

    let ambassador = Ambassador::start_prepared(without_net_admin(proxy, &args("auto")));
    assert_eq!(
        ambassador.lines_with(&["data path: user space", "missing CAP_NET_ADMIN"]),
        1,
        "{}",
        ambassador.log()
    );
    tcp_round_trip(client, SocketAddr::from((proxy.ip, TCP_PORT)), 256 << 10);
    assert_eq!(ruleset(proxy), before, "no rule without the capability");
}

#[test]
fn with_route_localnet_loopback_clients_go_through_the_kernel_too() {
    let Some(net) = Net::for_test(3) else { return };
    let (proxy, backend) = (net.host(1), net.host(2));
    let _tcp_echo = echo_on(backend, SocketAddr::from((backend.ip, TCP_PORT)));
    let _udp_echo = UdpEcho::start(backend, SocketAddr::from((backend.ip, UDP_PORT)));
    // Net sysctls are those of the writing thread's namespace.
    proxy
        .enter(|| std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1\n"))
        .expect("net.ipv4.conf.all.route_localnet=1 in the ambassador's namespace");
    let _ambassador = start_ambassador(proxy, "k4", backend, &["--dataplane", "kernel"]);
    let table = table("k4");
    tcp_round_trip(proxy, SocketAddr::from(([127, 0, 0, 1], TCP_PORT)), 1 << 20);
    udp_round_trips(proxy, SocketAddr::from(([127, 0, 0, 1], UDP_PORT)));
    assert!(dnat_packets(proxy, &table, "output", "tcp dport 7000") >= Some(1));
    assert!(dnat_packets(proxy, &table, "output", "udp dport 7001") >= Some(1));
}

#[test]
fn a_target_name_that_changes_address_is_followed() {
    let Some(net) = Net::for_test(4) else { return };
    let (client, proxy) = (net.host(0), net.host(1));
    let (first, second) = (net.host(2), net.host(3));
    let _first_echo = echo_on(first, SocketAddr::from((first.ip, TCP_PORT)));
    let _second_echo = echo_on(second, SocketAddr::from((second.ip, TCP_PORT)));
    // The ambassador alone sees this hosts file (a private mount namespace); rewritten in
    // place, the bind mount shows the new text.
    let dir = tempfile::tempdir().expect("temporary directory");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("{} backend\n", first.ip)).expect("hosts file");
    let hosts_arg = hosts.to_str().expect("UTF-8 path");
    let forward = format!("{TCP_PORT}=backend:{TCP_PORT}");
    let mount = "mount --bind \"$0\" /etc/hosts && exec \"$@\"";
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        hosts_arg,
    ];
    let args = [
        "run",
        "--listen-addr",
        "0.0.0.0",
        "--forward",
        &forward,
        "--node",
        "k5",
        "--health-interval",
        "0",
        "--dataplane",
        "kernel",
    ];
    let _ambassador = Ambassador::start_prepared(wrapped(proxy, &wrapper, &args));
    let dnat_to = |ip| {
        let rules = nft(proxy, &["list", "chain", "ip", &table("k5"), "prerouting"]);
        rules.is_some_and(|rules| rules.contains(&format!("dnat to {ip}:{TCP_PORT}")))
    };
    assert!(dnat_to(first.ip), "{}", ruleset(proxy));
    let tcp = SocketAddr::from((proxy.ip, TCP_PORT));
    assert!(echoes(client, tcp));

    std::fs::write(&hosts, format!("{} backend\n", second.ip)).expect("rewriting hosts");
    eventually(DEADLINE, "the DNAT rule follows the new address", || {
        dnat_to(second.ip).then_some(())
    });
    assert!(echoes(client, tcp));
    assert!(dnat_packets(proxy, &table("k5"), "prerouting", "tcp dport 7000") >= Some(1));
}

#[test]
fn a_loopback_target_is_served_in_the_kernel_from_another_loopback_address() {
    let Some(net) = Net::for_test(1) else { return };
    let host = net.host(0);
    let backend = SocketAddr::from(([127, 0, 0, 1], TCP_PORT));
    let _echo = echo_on(host, backend);
    let forward = format!("{TCP_PORT}={backend}");
    let _ambassador = Ambassador::start_command_in(
        host,
        &[],
        &[
            "run",
            "--listen-addr",
            "127.0.0.2",
            "--forward",
            &forward,
            "--node",
            "k7",
            "--health-interval",
            "0",
            "--dataplane",
            "kernel",
        ],
    );
    tcp_round_trip(host, SocketAddr::from(([127, 0, 0, 2], TCP_PORT)), 1 << 20);
    assert!(dnat_packets(host, &table("k7"), "output", "tcp dport 7000") >= Some(1));
}
