//! Hostile peers: a real `amb-serf agent` in a cluster with a real Go `serf agent`, attacked
//! on its gossip port by this test, which speaks the wire format itself (no key is set, as on
//! a container network by default). Each attack runs for `AMB_HOSTILE_SECS` (10 s by default)
//! while the test checks, every few hundred milliseconds, that the member's RSS stays within
//! 64 MiB of idle and that `serf members` over its RPC answers within a second; afterwards its
//! fds and RSS must come back to idle and the Go agent must never have suspected it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serf::wire::memberlist::{compound, compress, AckResp, Message};
use serf::wire::serf::{self as serf_wire, SerfMessage};
use serf::wire::stream::{encode_stream, PushPull, StreamMessage};
use testkit::{eventually, free_port, loopback, require, Child, SerfAgent, DEADLINE};

use crate::support;

/// How long each attack runs.
fn attack_time() -> Duration {
    let secs = std::env::var("AMB_HOSTILE_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// The RPC key of the member under attack (`members_took` sends it; the guessing attack does
/// not know it).
const RPC_KEY: &str = "hostile-rpc-key";

/// The most RSS an attack may add to the idle member.
const RSS_HEADROOM_KIB: u64 = 64 * 1024;

/// An `amb-serf agent` under attack, killed on drop.
struct Target {
    child: Child,
    name: String,
    bind: SocketAddr,
    rpc: SocketAddr,
    log: PathBuf,
}

impl Target {
    /// Starts `amb-serf agent` on loopback `ip`, joined to `join` if given, with at most
    /// `nofile` open files if given.
    fn start(name: &str, ip: u8, join: Option<SocketAddr>, nofile: Option<u64>) -> Self {
        let ip = loopback(ip);
        let bind = SocketAddr::from((ip, free_port(ip)));
        let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
        let (bind_text, rpc_text) = (bind.to_string(), rpc.to_string());
        let join_text = join.map(|seed| seed.to_string());
        let mut args = vec![
            "agent",
            "--node",
            name,
            "--bind",
            &bind_text,
            "--rpc-addr",
            &rpc_text,
        ];
        if let Some(join) = &join_text {
            args.extend(["--join", join]);
        }
        let vars = [("RUST_LOG", "warn"), ("AMB_RPC_AUTH", RPC_KEY)];
        let mut command = support::command(&vars, &args);
        if let Some(nofile) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let log = std::env::temp_dir().join(format!(
            "amb-serf-hostile-{}-{name}.log",
            std::process::id()
        ));
        let child = Child::spawn(&format!("amb-serf agent {name}"), &mut command, Some(&log));
        let mut target = Self {
            child,
            name: name.to_owned(),
            bind,
            rpc,
            log,
        };
        eventually(DEADLINE, &format!("amb-serf agent {name} RPC"), || {
            if let Some(status) = target.child.wait_timeout(Duration::ZERO) {
                panic!("amb-serf agent {name} exited ({status}):\n{}", target.log());
            }
            target.members_took().map(|_| ())
        });
        target
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn proc_file(&self, file: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.pid())).unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        self.proc_file("status")
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.pid())).map_or(0, Iterator::count)
    }

    /// User + system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = self.proc_file("stat");
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// How long `serf members` (Go's CLI) took against our RPC, if it answered.
    fn members_took(&self) -> Option<Duration> {
        let started = Instant::now();
        let output = testkit::run_with_timeout(
            Command::new(require("serf"))
                .arg("members")
                .arg(format!("-rpc-addr={}", self.rpc))
                .arg(format!("-rpc-auth={RPC_KEY}")),
            Duration::from_secs(30),
        );
        output.status.success().then(|| started.elapsed())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- amb-serf agent {} log (last lines) ---", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What the member uses when nobody attacks it.
#[derive(Debug, Clone, Copy)]
struct Idle {
    rss_kib: u64,
    fds: usize,
}

/// Runs `attack` in a thread, over and over until the attack time is up, while checking the
/// member; then checks that it recovers. `attack` gets the stop flag for long-running rounds.
fn under_attack(
    target: &Target,
    go: &SerfAgent,
    what: &str,
    idle: Idle,
    attack: impl Fn(&AtomicBool) + Send + 'static,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                attack(&stop);
            }
        })
    };
    let started = Instant::now();
    let mut peak = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < attack_time() {
        let rss = target.rss_kib();
        peak = peak.max(rss);
        assert!(
            rss <= idle.rss_kib + RSS_HEADROOM_KIB,
            "{what}: RSS {rss} KiB, idle {} KiB",
            idle.rss_kib
        );
        let took = target.members_took();
        let took = took.unwrap_or_else(|| panic!("{what}: `serf members` failed"));
        slowest = slowest.max(took);
        assert!(
            took <= Duration::from_secs(1),
            "{what}: `serf members` took {took:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("the attack thread");
    eprintln!(
        "{what}: peak RSS {peak} KiB (idle {} KiB), slowest `serf members` {slowest:?}",
        idle.rss_kib
    );
    // Afterwards: fds and memory come back.
    let settled = Instant::now();
    while target.fds() > idle.fds + 2 || target.rss_kib() > idle.rss_kib + idle.rss_kib / 10 {
        assert!(
            settled.elapsed() < DEADLINE,
            "{what}: not back to idle after {DEADLINE:?}: {} fds (idle {}), RSS {} KiB (idle {} KiB)",
            target.fds(),
            idle.fds,
            target.rss_kib(),
            idle.rss_kib
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The Go agent never suspected us.
    let log = go.log();
    let name = &target.name;
    for needle in [
        format!("Suspect {name} has failed"),
        format!("Marking {name} as failed"),
        format!("EventMemberFailed: {name}"),
    ] {
        assert!(
            !log.contains(&needle),
            "{what}: the Go agent logged {needle:?}"
        );
    }
    assert!(
        status_at_go(go, name).as_deref() == Some("alive"),
        "{what}: the Go agent does not see {name} alive: {}",
        go.members_json()
    );
}

fn status_at_go(go: &SerfAgent, node: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(&go.members_json()).ok()?;
    value["members"]
        .as_array()?
        .iter()
        .find(|member| member["name"] == node)
        .and_then(|member| member["status"].as_str().map(str::to_owned))
}

/// Opens a stream to `to`, writes `message`, reads whatever comes back until the member
/// closes or a second passes.
fn stream_round(to: SocketAddr, message: &[u8]) {
    let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(message).is_err() {
        return;
    }
    let mut sink = [0u8; 16 * 1024];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// A UDP user message carrying a Serf message, as gossip does.
fn serf_packet(message: SerfMessage) -> Vec<u8> {
    Message::User(message.encode()).to_bytes()
}

/// A compressed stream Ack whose payload is `len` zero bytes (unexpected on an inbound stream:
/// it used to be logged whole).
fn big_ack(len: usize, compressed: bool) -> Vec<u8> {
    encode_stream(
        &StreamMessage::Ack(AckResp {
            seq_no: 1,
            payload: vec![0; len],
        }),
        compressed,
    )
}

/// A push-pull whose Serf state names `names` members, every second one as left.
fn huge_push_pull(names: usize) -> Vec<u8> {
    let user_state = SerfMessage::PushPull(serf_wire::PushPull {
        ltime: 10,
        status_ltimes: (0..names).map(|i| (format!("ghost-{i:06}"), 5)).collect(),
        left_members: (0..names)
            .step_by(2)
            .map(|i| format!("ghost-{i:06}"))
            .collect(),
        ..serf_wire::PushPull::default()
    })
    .encode();
    encode_stream(
        &StreamMessage::PushPull(PushPull {
            join: false,
            nodes: Vec::new(),
            user_state,
        }),
        false,
    )
}

/// One UDP packet as large as a datagram may be, of compound parts each an LZW bomb just
/// under the packet's decompression budget (so the member decompresses as much as it allows).
fn bomb_packet() -> Vec<u8> {
    let size = serf::wire::memberlist::MAX_DECOMPRESSED_PACKET - 1024;
    let part = compress(&Message::User(vec![0; size]).to_bytes());
    let parts = (65_000 / (part.len() + 2)).min(255);
    compound(&vec![part; parts])
}

#[test]
fn a_member_under_attack_stays_bounded_and_answers() {
    let go = SerfAgent::start("hostile-go", loopback(91), &[]);
    let target = Target::start("hostile-ours", 92, Some(go.bind), None);
    let (to, name) = (target.bind, target.name.clone());
    eventually(DEADLINE, "the Go agent sees our member", || {
        (status_at_go(&go, &name).as_deref() == Some("alive")).then_some(())
    });
    // Idle: after the join settled and a `serf members` or two.
    std::thread::sleep(Duration::from_secs(2));
    let idle = Idle {
        rss_kib: target.rss_kib(),
        fds: target.fds(),
    };
    eprintln!("idle: {idle:?}");

    // 1. Oversized messages, logged: 4 MB Acks and compressed Acks of 16 MB, with a monitor
    //    subscribed (its ring and broadcast copies).
    let monitor = Child::spawn(
        "serf monitor",
        Command::new(require("serf"))
            .arg("monitor")
            .arg("-log-level=debug")
            .arg(format!("-rpc-addr={}", target.rpc)),
        None,
    );
    let (plain, packed) = (
        Arc::new(big_ack(4 << 20, false)),
        Arc::new(big_ack(16 << 20, true)),
    );
    under_attack(&target, &go, "oversized acks", idle, move |_| {
        for _ in 0..5 {
            stream_round(to, &plain);
            stream_round(to, &packed);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    drop(monitor);

    // 2. Push-pulls naming 40,000 members (760 KB each), back to back.
    let push_pull = Arc::new(huge_push_pull(40_000));
    under_attack(&target, &go, "huge push-pulls", idle, move |_| {
        stream_round(to, &push_pull);
    });

    // 3. 300 push-pulls whose peer never reads, held open, while 60 KB user events arrive.
    let request = Arc::new(encode_stream(
        &StreamMessage::PushPull(PushPull::default()),
        false,
    ));
    under_attack(&target, &go, "peers that never read", idle, move |stop| {
        let udp = UdpSocket::bind((loopback(93), 0)).expect("a udp socket");
        for ltime in 0..100 {
            let event = serf_packet(SerfMessage::UserEvent(serf_wire::UserEvent {
                ltime: 1_000 + ltime,
                name: format!("flood-{ltime}"),
                payload: vec![7; 60_000],
                cc: false,
            }));
            let _ = udp.send_to(&event, to);
        }
        let held: Vec<TcpStream> = (0..300)
            .filter_map(|_| {
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
                stream.write_all(&request).ok()?;
                Some(stream)
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(held);
    });

    // 4. 400 spoofed 60 KB user events, then every later join must still work.
    under_attack(&target, &go, "spoofed user events", idle, move |_| {
        let udp = UdpSocket::bind((loopback(94), 0)).expect("a udp socket");
        for ltime in 0..400 {
            let event = serf_packet(SerfMessage::UserEvent(serf_wire::UserEvent {
                ltime: 5_000 + ltime,
                name: format!("spoof-{ltime}"),
                payload: vec![9; 60_000],
                cc: false,
            }));
            let _ = udp.send_to(&event, to);
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let late = SerfAgent::start("hostile-late", loopback(95), &[&format!("-join={to}")]);
    eventually(
        DEADLINE,
        "a Go agent joins through the attacked member",
        || (status_at_go(&late, &name).as_deref() == Some("alive")).then_some(()),
    );
    drop(late);

    // 5. Queries that ask to stay open for 292 years, thousands of them.
    under_attack(&target, &go, "everlasting queries", idle, move |_| {
        let udp = UdpSocket::bind((loopback(96), 0)).expect("a udp socket");
        for _ in 0..500 {
            let id: u32 = rand::random();
            let query = serf_packet(SerfMessage::Query(serf_wire::Query {
                ltime: u64::from(id),
                id,
                addr: vec![127, 0, 0, 96],
                port: 9,
                source_node: "q".repeat(400),
                filters: Vec::new(),
                flags: 0,
                relay_factor: 0,
                timeout: Duration::from_nanos(i64::MAX as u64),
                name: "forever".to_owned(),
                payload: vec![1; 1_000],
            }));
            let _ = udp.send_to(&query, to);
        }
        std::thread::sleep(Duration::from_millis(100));
    });

    // 9. Guessing the RPC key: wrong keys as fast as Go's CLI sends them.
    let rpc = target.rpc;
    under_attack(&target, &go, "RPC key guesses", idle, move |_| {
        let output = testkit::run_with_timeout(
            Command::new(require("serf"))
                .arg("members")
                .arg(format!("-rpc-addr={rpc}"))
                .arg("-rpc-auth=a-wrong-guess"),
            Duration::from_secs(30),
        );
        assert!(!output.status.success(), "a wrong RPC key was accepted");
    });

    // 8. LZW bombs: each datagram holds as many bombs as fit.
    let bomb = Arc::new(bomb_packet());
    under_attack(&target, &go, "LZW bombs", idle, move |_| {
        let udp = UdpSocket::bind((loopback(97), 0)).expect("a udp socket");
        for _ in 0..20 {
            let _ = udp.send_to(&bomb, to);
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

/// With the fd limit reached, a listener stays readable and `accept` fails at once: the
/// gossip loop must pause rather than spin (it burned a core before), and the member must
/// still answer probes (UDP), so the Go agent beside it never declares it failed.
#[test]
fn accepts_back_off_when_out_of_file_descriptors() {
    let go = SerfAgent::start("hostile-emfile-go", loopback(99), &[]);
    let target = Target::start("hostile-emfile", 98, Some(go.bind), Some(24));
    eventually(DEADLINE, "the Go agent sees the member", || {
        (status_at_go(&go, &target.name).as_deref() == Some("alive")).then_some(())
    });
    let held: Vec<TcpStream> = (0..30)
        .filter_map(|_| TcpStream::connect_timeout(&target.bind, Duration::from_secs(2)).ok())
        .collect();
    assert!(!held.is_empty());
    let (cpu, started) = (target.cpu(), Instant::now());
    std::thread::sleep(attack_time());
    let used = target.cpu() - cpu;
    let wall = started.elapsed();
    assert!(
        used < wall / 4,
        "{used:?} of CPU in {wall:?} with the fd limit reached and connections waiting"
    );
    let name = &target.name;
    let log = go.log();
    assert!(
        !log.contains(&format!("Suspect {name} has failed"))
            && !log.contains(&format!("EventMemberFailed: {name}")),
        "the Go agent failed the member while it was out of descriptors"
    );
    assert_eq!(status_at_go(&go, name).as_deref(), Some("alive"));
    drop(held);
}
