use super::*;
use crate::link_env::Host;

#[tokio::test]
async fn sessions_route_replies_and_expire_when_idle() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let target = Target {
        host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        port: upstream.local_addr().expect("addr").port(),
    };
    tokio::spawn(async move {
        let mut buffer = [0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buffer).await {
            let _ = upstream.send_to(&buffer[..n], from).await;
        }
    });
    let stats = Arc::new(Stats::new(10));
    let forwarder = UdpForwarder::bind(
        "127.0.0.1:0".parse().expect("addr"),
        target,
        Duration::from_millis(200),
        Duration::from_secs(5),
        Arc::clone(&stats),
    )
    .await
    .expect("bind");
    let listen = forwarder.local_addr();
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    tasks.spawn(forwarder.run(tasks.clone(), shutdown.clone()));

    let mut clients = Vec::new();
    for index in 0..2u8 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(listen).await.expect("connect");
        client.send(&[index; 3]).await.expect("send");
        let mut buffer = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buffer))
            .await
            .expect("a reply")
            .expect("recv");
        assert_eq!(&buffer[..n], &[index; 3]);
        clients.push(client);
    }
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 2);
    assert_eq!(stats.bytes_to_upstream.load(Ordering::Relaxed), 6);
    assert_eq!(stats.bytes_to_client.load(Ordering::Relaxed), 6);
    // Both sessions expire after 200 ms without traffic.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.active.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("idle sessions expire");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
}

fn check_limit(open_files: Option<u64>, expected: usize) {
    assert_eq!(session_limit(open_files), expected, "{open_files:?}");
}

#[test]
fn session_limit_is_half_the_free_descriptors_and_capped() {
    check_limit(Some(1024), 480);
    check_limit(Some(20_000), 9_968);
    check_limit(Some(1_048_576), MAX_SESSIONS);
    check_limit(Some(FD_RESERVE), 0);
    check_limit(Some(10), 0);
    check_limit(None, MAX_SESSIONS);
}

#[test]
fn open_files_limit_is_read_from_proc_limits() {
    let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                  Max cpu time              unlimited            unlimited            seconds   \n\
                  Max open files            20000                40000                files     \n";
    assert_eq!(parse_open_files_limit(limits), Some(20_000));
    let unlimited = "Max open files            unlimited            unlimited            files\n";
    assert_eq!(parse_open_files_limit(unlimited), None);
    assert_eq!(parse_open_files_limit(""), None);
}

/// An echo server on loopback; its address.
async fn echo_upstream() -> SocketAddr {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buffer = [0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buffer).await {
            let _ = upstream.send_to(&buffer[..n], from).await;
        }
    });
    addr
}

/// The next datagram `client` receives, within a generous deadline.
async fn next_reply(client: &UdpSocket) -> Vec<u8> {
    let mut buffer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), client.recv(&mut buffer))
        .await
        .expect("a reply within 20 s")
        .expect("recv");
    buffer[..n].to_vec()
}

/// A forwarder to `backend.test:port` (resolved by each test's own resolver hook).
async fn name_forwarder(port: u16, resolve_timeout: Duration, stats: &Arc<Stats>) -> UdpForwarder {
    UdpForwarder::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Target {
            host: Host::Name("backend.test".to_owned()),
            port,
        },
        Duration::from_secs(60),
        resolve_timeout,
        Arc::clone(stats),
    )
    .await
    .expect("bind")
}

/// A host-name target whose resolution never ends for a new client must not hold up the
/// clients that already have a session; the stalled client's first datagram is delivered
/// once its name resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_resolution_does_not_stall_other_sessions() {
    let echo = echo_upstream().await;
    let stats = Arc::new(Stats::new(10));
    // Far beyond the test's deadlines: only the gate below ends the stall.
    let mut forwarder = name_forwarder(echo.port(), Duration::from_secs(600), &stats).await;
    // The first lookup answers at once; every later one waits for the gate.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let lookups = Arc::new(AtomicUsize::new(0));
    forwarder.resolver = Resolver(Arc::new({
        let (gate, lookups) = (Arc::clone(&gate), Arc::clone(&lookups));
        move |_name, _port| {
            let first = lookups.fetch_add(1, Ordering::SeqCst) == 0;
            let gate = Arc::clone(&gate);
            Box::pin(async move {
                if !first {
                    gate.acquire().await.expect("gate open").forget();
                }
                Ok(echo)
            })
        }
    }));
    let listen = forwarder.local_addr();
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    tasks.spawn(forwarder.run(tasks.clone(), shutdown.clone()));

    let established = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    established.connect(listen).await.expect("connect");
    established.send(b"a0").await.expect("send");
    assert_eq!(next_reply(&established).await, b"a0");

    let stalled = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    stalled.connect(listen).await.expect("connect");
    stalled.send(b"b0").await.expect("send");
    tokio::time::timeout(Duration::from_secs(20), async {
        while lookups.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second client's lookup starts");

    // While that lookup hangs, the first client is served as before.
    for round in 1..=5u8 {
        let message = [b'a', b'0' + round];
        established.send(&message).await.expect("send");
        assert_eq!(next_reply(&established).await, message);
    }
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), 2);

    // Once the name resolves, the stalled client's first datagram goes through.
    gate.add_permits(1);
    assert_eq!(next_reply(&stalled).await, b"b0");
    stalled.send(b"b1").await.expect("send");
    assert_eq!(next_reply(&stalled).await, b"b1");

    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(20), tasks.wait())
        .await
        .expect("the forwarder stops");
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), 0);
}

/// A client whose name lookup fails is forgotten: its next datagram tries again.
#[tokio::test]
async fn a_failed_resolution_is_retried_by_the_next_datagram() {
    let echo = echo_upstream().await;
    let stats = Arc::new(Stats::new(10));
    let mut forwarder = name_forwarder(echo.port(), Duration::from_secs(5), &stats).await;
    let lookups = Arc::new(AtomicUsize::new(0));
    forwarder.resolver = Resolver(Arc::new({
        let lookups = Arc::clone(&lookups);
        move |name, _port| {
            let first = lookups.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                if first {
                    Err(std::io::Error::new(std::io::ErrorKind::NotFound, name))
                } else {
                    Ok(echo)
                }
            })
        }
    }));
    let listen = forwarder.local_addr();
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    tasks.spawn(forwarder.run(tasks.clone(), shutdown.clone()));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.connect(listen).await.expect("connect");
    client.send(b"lost").await.expect("send");
    tokio::time::timeout(Duration::from_secs(20), async {
        while stats.upstream_failures.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the failed lookup is counted");
    assert_eq!(stats.udp_sessions.load(Ordering::Relaxed), 0);
    client.send(b"again").await.expect("send");
    assert_eq!(next_reply(&client).await, b"again");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
}
