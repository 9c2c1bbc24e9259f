//! Load and soak through `amb-serf run`: many concurrent clients for a minute, every byte
//! checked, no resets, and no descriptor or memory growth in the forwarder.
//!
//! Outside the default run (it takes a minute and the machine): `AMB_SOAK=1`, or `scripts/soak`.
//! `AMB_SOAK_CLIENTS` (default 500) and `AMB_SOAK_SECS` (default 60) size it.

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

#[test]
fn soak_many_clients_through_amb_serf_run_lose_nothing_and_leak_nothing() {
    if std::env::var("AMB_SOAK").as_deref() != Ok("1") {
        eprintln!("soak not run: set AMB_SOAK=1 or use scripts/soak");
        return;
    }
    let n_clients = env_number("AMB_SOAK_CLIENTS", 500) as usize;
    let duration = Duration::from_secs(env_number("AMB_SOAK_SECS", 60));
    let warm_up = (duration / 6).max(Duration::from_secs(2));
    let limit = ensure_open_files(4 * n_clients as u64 + 1000);
    assert!(
        limit >= 3 * n_clients as u64,
        "open-file limit {limit} too low"
    );

    let upstream = echo_upstream();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}={upstream}");
    let ambassador = Ambassador::start(&[], &["--forward", &forward]);
    let pid = ambassador.pid();
    let idle_fds = open_fds(pid);
    let addr = SocketAddr::from((loopback(1), listen));

    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Totals::default());
    let clients: Vec<_> = (0..n_clients)
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
    while started.elapsed() < duration {
        thread::sleep(Duration::from_secs(1));
        peak_rss = peak_rss.max(rss_kib(pid));
    }
    let (end_rss, end_fds) = (rss_kib(pid), open_fds(pid));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }
    // Idle again, the forwarder holds its listeners plus at most its splice pipe pool
    // (256 pipes, two descriptors each): anything above is a leaked connection.
    let settled_fds = eventually(
        Duration::from_secs(30),
        "the forwarder back to its idle descriptors plus the pipe pool",
        || {
            let fds = open_fds(pid);
            (fds <= idle_fds + PIPE_POOL_FDS).then_some(fds)
        },
    );
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let report = format!(
        "soak: {n_clients} clients, {:?}: {} rounds, {} MiB each way, {} connections, {} failures; \
         RSS {warm_rss} KiB after warm-up, {end_rss} KiB at the end (peak {peak_rss}); \
         fds idle {idle_fds}, warm {warm_fds}, end {end_fds}, after {settled_fds}",
        started.elapsed(),
        totals.rounds.load(Ordering::Relaxed),
        bytes >> 20,
        totals.connections.load(Ordering::Relaxed),
        totals.failures.load(Ordering::Relaxed),
    );
    eprintln!("{report}");
    assert_eq!(totals.failures.load(Ordering::Relaxed), 0, "{report}");
    assert!(bytes > 0, "{report}");
    assert!(
        end_rss * 10 <= warm_rss * 11,
        "RSS grew more than 10 %: {report}"
    );
    // Each client holds at most one connection (two sockets in the forwarder), plus pipes.
    assert!(
        end_fds <= idle_fds + 2 * n_clients + PIPE_POOL_FDS,
        "more descriptors than connections: {report}"
    );
}
