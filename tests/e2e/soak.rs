//! Load and soak: many concurrent clients, every byte checked, no resets, and no descriptor or
//! memory growth in the process under test.
//!
//! - Through `amb-serf run`: outside the default run (it takes a minute and the machine):
//!   `AMB_SOAK=1`, or `scripts/soak`.
//! - Through `amb-serf connect` while the providers of the role leave and join every few
//!   seconds: a short version (50 clients, 10 s) in the default run, the full one under
//!   `AMB_SOAK=1`.
//!
//! `AMB_SOAK_CLIENTS` (default 500) and `AMB_SOAK_SECS` (default 60) size the full runs.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{ensure_open_files, eventually, free_port, loopback, Ambassador, RandomBytes};

/// Descriptors the forwarder's splice pipe pool may keep (`crates/proxy/src/splice.rs`).
const PIPE_POOL_FDS: usize = 2 * 256;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading /proc/PID/fd")
        .count()
}

/// An echo upstream with one thread per connection.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind((loopback(1), 0)).expect("binding the upstream");
    let addr = listener.local_addr().expect("bound");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut reader = stream.try_clone().expect("clone");
                    let _ = std::io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                })
                .expect("spawning an echo thread");
        }
    });
    addr
}

#[derive(Default)]
struct Totals {
    bytes: AtomicU64,
    rounds: AtomicU64,
    connections: AtomicU64,
    failures: AtomicU64,
}

/// One client until `stop`: rounds of "send 1 B–64 KiB of random bytes, read them back,
/// compare", on a connection it replaces every 50 rounds.
fn client(addr: SocketAddr, stop: Arc<AtomicBool>, totals: Arc<Totals>) {
    let mut random = RandomBytes::new();
    let mut sent = vec![0u8; 64 * 1024];
    let mut received = vec![0u8; 64 * 1024];
    let mut sizes = RandomBytes::new();
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(error) => {
                totals.failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak: connect: {error}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        totals.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        for _ in 0..50 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut size = [0u8; 8];
            sizes.fill(&mut size);
            let len = (u64::from_le_bytes(size) % (64 * 1024)) as usize + 1;
            random.fill(&mut sent[..len]);
            let round = stream
                .write_all(&sent[..len])
                .and_then(|()| stream.read_exact(&mut received[..len]));
            if let Err(error) = round {
                totals.failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak: round of {len} bytes: {error}");
                break;
            }
            if sent[..len] != received[..len] {
                totals.failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak: {len} bytes came back different");
                break;
            }
            totals.bytes.fetch_add(len as u64, Ordering::Relaxed);
            totals.rounds.fetch_add(1, Ordering::Relaxed);
        }
        let _ = stream.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        if let Err(error) = stream.read_to_end(&mut rest) {
            totals.failures.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: closing: {error}");
        }
    }
}

/// How many clients, for how long.
#[derive(Debug, Clone, Copy)]
struct Size {
    n_clients: usize,
    duration: Duration,
}

impl Size {
    /// The full size under `AMB_SOAK=1` (`AMB_SOAK_CLIENTS`, `AMB_SOAK_SECS`), else `short`
    /// (`None`: not run by default).
    fn from_env(short: Option<Self>) -> Option<Self> {
        if !full_run() {
            return short;
        }
        Some(Self {
            n_clients: env_number("AMB_SOAK_CLIENTS", 500) as usize,
            duration: Duration::from_secs(env_number("AMB_SOAK_SECS", 60)),
        })
    }
}

/// Whether the soaks run at full size (`AMB_SOAK=1`).
fn full_run() -> bool {
    std::env::var("AMB_SOAK").as_deref() == Ok("1")
}

/// What a load run saw, in its clients and in the process under test.
struct Measured {
    size: Size,
    totals: Arc<Totals>,
    elapsed: Duration,
    idle_fds: usize,
    warm_rss: u64,
    end_rss: u64,
    peak_rss: u64,
    warm_fds: usize,
    end_fds: usize,
    settled_fds: usize,
}

impl Measured {
    /// Runs `size.n_clients` clients against `addr` for `size.duration`, sampling process
    /// `pid` (its RSS after a warm-up, every second, and at the end), then waits until the
    /// process is back to its idle descriptors (taken now) plus at most its splice pipe pool.
    fn load(addr: SocketAddr, pid: u32, size: Size) -> Self {
        let warm_up = (size.duration / 6).max(Duration::from_secs(2));
        let limit = ensure_open_files(4 * size.n_clients as u64 + 1000);
        assert!(
            limit >= 3 * size.n_clients as u64,
            "open-file limit {limit} too low"
        );
        let idle_fds = open_fds(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Totals::default());
        let clients: Vec<_> = (0..size.n_clients)
            .map(|_| {
                let (stop, totals) = (Arc::clone(&stop), Arc::clone(&totals));
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || client(addr, stop, totals))
                    .expect("spawning a client")
            })
            .collect();
        let started = Instant::now();
        thread::sleep(warm_up);
        let (warm_rss, warm_fds) = (rss_kib(pid), open_fds(pid));
        let mut peak_rss = warm_rss;
        while started.elapsed() < size.duration {
            thread::sleep(Duration::from_secs(1));
            peak_rss = peak_rss.max(rss_kib(pid));
        }
        let (end_rss, end_fds) = (rss_kib(pid), open_fds(pid));
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().expect("client thread");
        }
        let elapsed = started.elapsed();
        // Idle again, the process holds what it held before plus at most its splice pipe pool
        // (256 pipes, two descriptors each): anything above is a leaked connection.
        let settled_fds = eventually(
            Duration::from_secs(30),
            "back to the idle descriptors plus the pipe pool",
            || {
                let fds = open_fds(pid);
                (fds <= idle_fds + PIPE_POOL_FDS).then_some(fds)
            },
        );
        Self {
            size,
            totals,
            elapsed,
            idle_fds,
            warm_rss,
            end_rss,
            peak_rss,
            warm_fds,
            end_fds,
            settled_fds,
        }
    }

    fn report(&self, what: &str) -> String {
        let totals = &self.totals;
        format!(
            "soak {what}: {} clients, {:?}: {} rounds, {} MiB each way, {} connections, {} \
             failures; RSS {} KiB after warm-up, {} KiB at the end (peak {}); fds idle {}, warm \
             {}, end {}, after {}",
            self.size.n_clients,
            self.elapsed,
            totals.rounds.load(Ordering::Relaxed),
            totals.bytes.load(Ordering::Relaxed) >> 20,
            totals.connections.load(Ordering::Relaxed),
            totals.failures.load(Ordering::Relaxed),
            self.warm_rss,
            self.end_rss,
            self.peak_rss,
            self.idle_fds,
            self.warm_fds,
            self.end_fds,
            self.settled_fds,
        )
    }

    /// Every round came back intact, nothing was reset, and the process did not grow: RSS
    /// within 10 % of the warm-up's, descriptors within two per client plus the pipe pool.
    fn check(&self, report: &str) {
        assert_eq!(self.totals.failures.load(Ordering::Relaxed), 0, "{report}");
        assert!(self.totals.bytes.load(Ordering::Relaxed) > 0, "{report}");
        assert!(
            self.end_rss * 10 <= self.warm_rss * 11,
            "RSS grew more than 10 %: {report}"
        );
        // Each client holds at most one connection (two sockets in the proxy), plus pipes.
        assert!(
            self.end_fds <= self.idle_fds + 2 * self.size.n_clients + PIPE_POOL_FDS,
            "more descriptors than connections: {report}"
        );
    }
}

#[test]
fn soak_many_clients_through_amb_serf_run_lose_nothing_and_leak_nothing() {
    let Some(size) = Size::from_env(None) else {
        eprintln!("soak not run: set AMB_SOAK=1 or use scripts/soak");
        return;
    };
    let upstream = echo_upstream();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}={upstream}");
    let ambassador = Ambassador::start(&[], &["--forward", &forward]);
    let measured = Measured::load(
        SocketAddr::from((loopback(1), listen)),
        ambassador.pid(),
        size,
    );
    let report = measured.report("through run");
    eprintln!("{report}");
    measured.check(&report);
}

/// The role the churning providers advertise.
const ROLE: &str = "echo";

/// Providers of [`ROLE`] on loopback, one per slot, each `amb-serf run` forwarding a port of
/// its own to the slot's echo upstream and joined to `seed`. [`Churn::rotate`] stops one
/// gracefully (SIGTERM: it leaves the cluster, then drains its open connections) and starts its
/// successor under a new node name; the other slots keep serving meanwhile.
struct Churn {
    seed: SocketAddr,
    upstreams: Vec<SocketAddr>,
    live: Vec<Ambassador>,
    draining: Vec<Ambassador>,
    /// Drained providers: how many connections each still had when it stopped accepting.
    drained: Vec<u64>,
    started: usize,
    next_slot: usize,
}

impl Churn {
    fn start(seed: SocketAddr, n_slots: usize) -> Self {
        let upstreams: Vec<SocketAddr> = (0..n_slots).map(|_| echo_upstream()).collect();
        let mut churn = Self {
            seed,
            upstreams,
            live: Vec::new(),
            draining: Vec::new(),
            drained: Vec::new(),
            started: 0,
            next_slot: 0,
        };
        for slot in 0..n_slots {
            let provider = churn.provider(slot);
            churn.live.push(provider);
        }
        churn
    }

    /// A new provider for `slot`: a new port, a new node name.
    fn provider(&mut self, slot: usize) -> Ambassador {
        let node = format!("echo-{slot}-{}", self.started);
        let join = self.seed.to_string();
        self.started += 1;
        // Long enough for any client to finish its connection: a drain that timed out would
        // reset clients, which a graceful leave must not.
        let extra = ["--join", &join, "--drain-timeout", "120s"];
        Ambassador::start_provider(ROLE, &node, self.upstreams[slot], &[], &extra)
    }

    /// Stops the next slot's provider gracefully and starts its successor.
    fn rotate(&mut self) {
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % self.live.len();
        let successor = self.provider(slot);
        let leaving = std::mem::replace(&mut self.live[slot], successor);
        leaving.signal(libc::SIGTERM);
        self.draining.push(leaving);
        self.reap(Duration::ZERO);
    }

    /// Collects providers that have finished draining, waiting up to `deadline` for each;
    /// every one must exit 0 having drained, never having timed out.
    fn reap(&mut self, deadline: Duration) {
        let mut still = Vec::new();
        for mut provider in self.draining.drain(..) {
            if provider.is_running() && deadline.is_zero() {
                still.push(provider);
                continue;
            }
            let status = provider.wait_exit(deadline.max(Duration::from_secs(1)));
            let log = provider.log();
            assert!(status.success(), "a provider exited with {status}:\n{log}");
            assert!(
                provider.lines_with(&["\"drained\""]) == 1
                    && provider.lines_with(&["drain timed out"]) == 0,
                "a provider did not drain:\n{log}"
            );
            let open = log
                .lines()
                .find(|line| line.contains("stopped accepting, draining"))
                .and_then(|line| line.split("\"open\":").nth(1))
                .and_then(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .unwrap_or_else(|| panic!("no open count in the drain line:\n{log}"));
            self.drained.push(open);
        }
        self.draining = still;
    }

    /// Stops every provider gracefully and collects them all.
    fn finish(mut self) -> Vec<u64> {
        for provider in self.live.drain(..) {
            provider.signal(libc::SIGTERM);
            self.draining.push(provider);
        }
        self.reap(Duration::from_secs(150));
        self.drained
    }
}

/// `amb-serf connect` under load while its providers leave and join: three providers on
/// loopback, one stopped gracefully and replaced every few seconds, so at least two are always
/// up. A graceful leave drains (the leaving provider is dropped by the consumer at once, and
/// keeps serving the connections it has until their clients close them), so clients see no
/// error at all: every round comes back intact, no connection is reset, and the `connect`
/// process neither grows in memory nor keeps descriptors.
#[test]
fn soak_through_connect_while_providers_leave_and_join_loses_nothing_and_leaks_nothing() {
    let short = Size {
        n_clients: 50,
        duration: Duration::from_secs(10),
    };
    let size = Size::from_env(Some(short)).expect("a short run by default");
    let period = if full_run() {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(2)
    };
    let seed = testkit::SerfAgent::start("seed", loopback(1), &[]);
    let churn = Churn::start(seed.bind, 3);
    let listen = free_port(loopback(1));
    let role = format!("{ROLE}={listen}");
    let bind = format!("{}:{}", loopback(1), free_port(loopback(1)));
    let join = seed.bind.to_string();
    let consumer = Ambassador::start_command(
        &[],
        &[
            "connect",
            &role,
            "--listen-addr",
            "127.0.0.1",
            "--node",
            "consumer",
            "--bind",
            &bind,
            "--join",
            &join,
            "--rpc-addr",
            "127.0.0.1:0",
        ],
    );
    eventually(
        Duration::from_secs(30),
        "the consumer has all three providers",
        || (consumer.lines_with(&["provider added"]) >= 3).then_some(()),
    );

    let stop = AtomicBool::new(false);
    let (measured, churn) = thread::scope(|scope| {
        let rotations = scope.spawn(|| {
            let mut churn = churn;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= period {
                    churn.rotate();
                    last = Instant::now();
                }
            }
            churn
        });
        let measured = Measured::load(
            SocketAddr::from((loopback(1), listen)),
            consumer.pid(),
            size,
        );
        stop.store(true, Ordering::Relaxed);
        (measured, rotations.join().expect("the churn thread"))
    });
    let rotations = churn.started - 3;
    // The consumer followed every join and every leave.
    eventually(
        Duration::from_secs(30),
        "the consumer added every provider and removed every one that left",
        || {
            (consumer.lines_with(&["provider added"]) >= churn.started
                && consumer.lines_with(&["provider removed"]) >= rotations)
                .then_some(())
        },
    );
    let drained = churn.finish();
    let report = format!(
        "{}; {rotations} providers left and as many joined (every {period:?}), holding {} \
         connections in all when they stopped accepting, every one drained",
        measured.report("through connect"),
        drained.iter().take(rotations).sum::<u64>(),
    );
    eprintln!("{report}");
    measured.check(&report);
    assert!(rotations >= 3, "too few rotations: {report}");
}
