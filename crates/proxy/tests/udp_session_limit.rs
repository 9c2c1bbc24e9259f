//! More UDP clients than the open-file limit allows sessions for: the forwarder stays under
//! its session limit, drops the rest, leaves descriptors free, and keeps serving the clients
//! it has. Its own test binary (one process, one test), because it lowers the process's
//! open-file limit.
#![cfg(target_os = "linux")]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proxy::{CancellationToken, Host, Stats, Target, TaskTracker, UdpForwarder};
use tokio::net::UdpSocket;

/// The soft open-file limit while the test runs: sessions get (400 - 64) / 2 = 168.
const OPEN_FILES: u64 = 400;
/// Clients, one per loopback address: more than the session limit, and few enough that
/// clients + sessions + the runtime's descriptors fit under `OPEN_FILES`.
const CLIENTS: usize = 200;
const DEADLINE: Duration = Duration::from_secs(30);

#[allow(unsafe_code)]
fn set_soft_open_files_limit(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert!(limit.rlim_max >= soft, "hard open-file limit below {soft}");
    limit.rlim_cur = soft;
    // SAFETY: setrlimit reads one valid rlimit; lowering the soft limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for: {what}"));
}

async fn echo(client: &UdpSocket, message: &[u8]) {
    client.send(message).await.expect("send");
    let mut buffer = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, client.recv(&mut buffer))
        .await
        .expect("an echo")
        .expect("recv");
    assert_eq!(&buffer[..n], message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_clients_than_the_session_limit_never_exhaust_descriptors() {
    set_soft_open_files_limit(OPEN_FILES);
    let upstream = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = [0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buffer).await {
            let _ = upstream.send_to(&buffer[..n], from).await;
        }
    });
    let stats = Arc::new(Stats::new(100_000));
    let forwarder = UdpForwarder::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        Target {
            host: Host::Ip(upstream_addr.ip()),
            port: upstream_addr.port(),
        },
        Duration::from_secs(600),
        Duration::from_secs(5),
        Arc::clone(&stats),
    )
    .await
    .unwrap();
    let limit = forwarder.session_limit();
    assert_eq!(limit, proxy::udp::session_limit(Some(OPEN_FILES)));
    assert!(limit < CLIENTS);
    let listen = forwarder.local_addr();
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    tasks.spawn(forwarder.run(tasks.clone(), shutdown.clone()));

    let mut clients = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let ip = Ipv4Addr::new(127, 0, 1 + (index / 250) as u8, 1 + (index % 250) as u8);
        let client = UdpSocket::bind((ip, 0)).await.expect("binding a client");
        client.connect(listen).await.unwrap();
        clients.push(client);
    }
    // In batches, so the listener's receive buffer never overflows: every datagram opens a
    // session or is counted as rejected.
    for (batch, chunk) in clients.chunks(20).enumerate() {
        for client in chunk {
            client.send(b"hello").await.unwrap();
        }
        let sent = (batch * 20 + chunk.len()) as u64;
        wait_until("every new client is accounted for", || {
            let opened = stats.accepted.load(Ordering::Relaxed);
            opened + stats.rejected.load(Ordering::Relaxed) >= sent
        })
        .await;
    }
    // Descriptors are left for everything else, and no session failed for want of one.
    let spare: Vec<std::net::UdpSocket> = (0..16)
        .map(|_| std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("a spare descriptor"))
        .collect();
    drop(spare);
    assert_eq!(stats.upstream_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.rejected.load(Ordering::Relaxed),
        (CLIENTS - limit) as u64
    );
    assert_eq!(stats.accepted.load(Ordering::Relaxed), limit as u64);
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), limit);

    // The clients with sessions are still served, and a dropped one is dropped again.
    for (index, client) in clients.iter().take(limit).step_by(17).enumerate() {
        let mut buffer = [0u8; 64];
        let n = tokio::time::timeout(DEADLINE, client.recv(&mut buffer))
            .await
            .expect("the first echo")
            .unwrap();
        assert_eq!(&buffer[..n], b"hello");
        echo(client, format!("again {index}").as_bytes()).await;
    }
    let rejected = stats.rejected.load(Ordering::Relaxed);
    clients[CLIENTS - 1].send(b"still there?").await.unwrap();
    wait_until("the extra client is dropped again", || {
        stats.rejected.load(Ordering::Relaxed) > rejected
    })
    .await;
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), limit);

    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(DEADLINE, tasks.wait())
        .await
        .expect("the forwarder stops");
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), 0);
}
