//! The forwarder end to end: the `amb-serf` binary between real sockets on loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::{
    ensure_open_files, eventually, free_port, loopback, reset_on_close, run_to_exit, Ambassador,
    Checksum, RandomBytes, DEADLINE,
};

const BIG: usize = 64 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn listen_upstream() -> (TcpListener, u16) {
    let listener = TcpListener::bind((loopback(1), 0)).expect("binding the upstream");
    let port = listener.local_addr().expect("bound").port();
    (listener, port)
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect((loopback(1), port)).expect("connecting to amb-serf");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

/// Sends `size` random bytes from a thread, then shuts the write side; returns their checksum.
fn send_random(mut stream: TcpStream, size: usize) -> JoinHandle<Checksum> {
    thread::spawn(move || {
        let mut random = RandomBytes::new();
        let mut checksum = Checksum::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(buffer.len());
            random.fill(&mut buffer[..n]);
            checksum.update(&buffer[..n]);
            stream.write_all(&buffer[..n]).expect("sending");
            left -= n;
        }
        stream
            .shutdown(Shutdown::Write)
            .expect("shutting the write side");
        checksum
    })
}

/// Reads until end of stream; returns the byte count and checksum.
fn receive_all(stream: &mut TcpStream) -> (usize, Checksum) {
    receive_all_continuing(stream, Checksum::new())
}

/// An upstream that echoes every connection until the client closes.
fn echo_upstream(listener: TcpListener) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
}

fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).expect("writing");
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).expect("reading the echo");
    assert_eq!(reply, message);
}

#[test]
fn transfers_64_mib_each_way_intact() {
    let (upstream, upstream_port) = listen_upstream();
    let listen = free_port(loopback(1));
    let var = format!("DATA_PORT_{listen}_TCP");
    let value = format!("tcp://127.0.0.1:{upstream_port}");
    let ambassador = Ambassador::start(&[(&var, &value)], &[]);
    let summary =
        format!("forward tcp 127.0.0.1:{listen} -> 127.0.0.1:{upstream_port} (link data)");
    assert!(ambassador.log().contains(&summary), "{}", ambassador.log());

    let server = thread::spawn(move || {
        let (mut stream, _) = upstream.accept().expect("accepting");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let sender = send_random(stream.try_clone().expect("clone"), BIG);
        let received = receive_all(&mut stream);
        (sender.join().expect("upstream sender"), received)
    });
    let mut client = connect(listen);
    let sender = send_random(client.try_clone().expect("clone"), BIG);
    let client_received = receive_all(&mut client);
    let client_sent = sender.join().expect("client sender");
    let (server_sent, server_received) = server.join().expect("upstream");
    assert_eq!(client_received, (BIG, server_sent), "upstream → client");
    assert_eq!(server_received, (BIG, client_sent), "client → upstream");
}

#[test]
fn half_close_keeps_the_reply_flowing() {
    let (upstream, upstream_port) = listen_upstream();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}=127.0.0.1:{upstream_port}");
    let _ambassador = Ambassador::start(&[], &["--forward", &forward]);

    // The upstream answers only after the client's FIN: it echoes everything, then closes.
    thread::spawn(move || {
        let (mut stream, _) = upstream.accept().expect("accepting");
        let mut request = Vec::new();
        stream
            .read_to_end(&mut request)
            .expect("reading to the FIN");
        stream.write_all(&request).expect("replying");
    });
    let mut client = connect(listen);
    let mut request = vec![0u8; 1 << 20];
    RandomBytes::new().fill(&mut request);
    client.write_all(&request).expect("sending");
    client.shutdown(Shutdown::Write).expect("half-closing");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("reading the whole reply");
    assert_eq!(reply.len(), request.len());
    assert!(reply == request, "the reply differs from the request");
}

#[test]
fn upstream_reset_reaches_the_client() {
    let (upstream, upstream_port) = listen_upstream();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}=127.0.0.1:{upstream_port}");
    let _ambassador = Ambassador::start(&[], &["--forward", &forward]);

    thread::spawn(move || {
        let (mut stream, _) = upstream.accept().expect("accepting");
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).expect("reading");
        reset_on_close(&stream);
    });
    let mut client = connect(listen);
    client.write_all(b"hello").expect("sending");
    let mut buffer = [0u8; 16];
    let error = loop {
        match client.read(&mut buffer) {
            Ok(0) => panic!("the client got a FIN, not the upstream's reset"),
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
}

#[test]
fn upstream_down_closes_clients_fast_then_recovers() {
    let upstream_port = free_port(loopback(1));
    let listen = free_port(loopback(1));
    // A host name, resolved on every connection.
    let forward = format!("{listen}=localhost:{upstream_port}");
    let ambassador = Ambassador::start(&[], &["--forward", &forward]);

    // Nothing listens upstream: each client is closed within a second.
    for _ in 0..50 {
        let start = Instant::now();
        let mut client = connect(listen);
        let mut buffer = [0u8; 1];
        match client.read(&mut buffer) {
            Ok(0) => {}
            Ok(_) => panic!("got data from a dead upstream"),
            Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        }
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(1), "closed after {elapsed:?}");
    }
    // The storm is logged, but rate-limited.
    let lines = eventually(DEADLINE, "upstream failure logged", || {
        let n = ambassador.log().matches("upstream unavailable").count();
        (n > 0).then_some(n)
    });
    assert!(
        lines < 10,
        "{lines} lines for 50 failures:\n{}",
        ambassador.log()
    );

    // The backend comes back: the next connection works, without a restart.
    let upstream = TcpListener::bind((loopback(1), upstream_port)).expect("binding the upstream");
    echo_upstream(upstream);
    let mut client = connect(listen);
    round_trip(&mut client, b"back again");
}

#[test]
fn serves_1000_concurrent_connections() {
    const CONNECTIONS: usize = 1000;
    // Per connection: the client and upstream ends here, plus slack for the other tests.
    let limit = ensure_open_files(4 * CONNECTIONS as u64 + 1000);
    assert!(
        limit >= 2 * CONNECTIONS as u64 + 100,
        "the open-file limit ({limit}) is too low for {CONNECTIONS} connections"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listen = free_port(loopback(1));
    runtime.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = tokio::net::TcpListener::bind((loopback(1), 0))
            .await
            .expect("binding the upstream");
        let upstream_port = upstream.local_addr().expect("bound").port();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = upstream.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        let forward = format!("{listen}=127.0.0.1:{upstream_port}");
        let _ambassador =
            tokio::task::spawn_blocking(move || Ambassador::start(&[], &["--forward", &forward]))
                .await
                .expect("starting amb-serf");

        let all_open = std::sync::Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
        let mut clients = tokio::task::JoinSet::new();
        for index in 0..CONNECTIONS {
            let all_open = std::sync::Arc::clone(&all_open);
            clients.spawn(async move {
                let addr = SocketAddr::from((loopback(1), listen));
                let mut stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .expect("connecting");
                let message = (index as u64).to_le_bytes();
                let mut reply = [0u8; 8];
                stream.write_all(&message).await.expect("writing");
                stream.read_exact(&mut reply).await.expect("reading");
                assert_eq!(reply, message);
                // Every connection is open and served at the same time.
                all_open.wait().await;
                stream.write_all(&message).await.expect("writing again");
                stream.read_exact(&mut reply).await.expect("reading again");
                assert_eq!(reply, message);
            });
        }
        let served = tokio::time::timeout(Duration::from_secs(120), async {
            let mut served = 0;
            while let Some(result) = clients.join_next().await {
                result.expect("a client failed");
                served += 1;
            }
            served
        })
        .await
        .expect("all connections served within 120 s");
        assert_eq!(served, CONNECTIONS);
    });
}

#[test]
fn max_connections_closes_new_clients_only() {
    let (upstream, upstream_port) = listen_upstream();
    echo_upstream(upstream);
    let listen = free_port(loopback(1));
    let forward = format!("{listen}=127.0.0.1:{upstream_port}");
    let _ambassador = Ambassador::start(&[], &["--forward", &forward, "--max-connections", "2"]);

    let mut first = connect(listen);
    round_trip(&mut first, b"one");
    let mut second = connect(listen);
    round_trip(&mut second, b"two");
    let mut third = connect(listen);
    let mut buffer = [0u8; 1];
    match third.read(&mut buffer) {
        Ok(0) => {}
        Err(error) if error.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the third client was not closed: {other:?}"),
    }
    round_trip(&mut first, b"still one");
    round_trip(&mut second, b"still two");
    drop(first);
    eventually(DEADLINE, "a slot frees up", || {
        let mut fourth = connect(listen);
        fourth
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        fourth.write_all(b"four").ok()?;
        let mut reply = [0u8; 4];
        fourth.read_exact(&mut reply).ok()?;
        (&reply == b"four").then_some(())
    });
}

#[test]
fn udp_echo_per_client() {
    let upstream = UdpSocket::bind((loopback(1), 0)).expect("binding the upstream");
    let upstream_port = upstream.local_addr().expect("bound").port();
    upstream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while let Ok((n, from)) = upstream.recv_from(&mut buffer) {
            let _ = upstream.send_to(&buffer[..n], from);
        }
    });
    let listen = free_port(loopback(1));
    let var = format!("DNS_PORT_{listen}_UDP");
    let value = format!("udp://127.0.0.1:{upstream_port}");
    let _ambassador = Ambassador::start(&[(&var, &value)], &[]);

    let clients: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let socket = UdpSocket::bind((loopback(1), 0)).expect("binding a client");
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            socket.connect((loopback(1), listen)).expect("connecting");
            socket
        })
        .collect();
    for round in 0..5 {
        for (index, client) in clients.iter().enumerate() {
            let message = format!("client {index} round {round}");
            // UDP may drop on a busy machine: resend until the echo comes back.
            eventually(DEADLINE, "a UDP echo", || {
                client.send(message.as_bytes()).ok()?;
                let mut buffer = [0u8; 2048];
                let n = client.recv(&mut buffer).ok()?;
                // Each client gets only its own replies.
                assert!(
                    buffer[..n].starts_with(format!("client {index} ").as_bytes()),
                    "client {index} got {:?}",
                    String::from_utf8_lossy(&buffer[..n])
                );
                (buffer[..n] == *message.as_bytes()).then_some(())
            });
        }
    }
}

#[test]
fn sigterm_drains_a_transfer_then_exits_0() {
    let (upstream, upstream_port) = listen_upstream();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}=127.0.0.1:{upstream_port}");
    let mut ambassador =
        Ambassador::start(&[], &["--forward", &forward, "--drain-timeout", "120s"]);

    // The first connection gets 64 MiB; any later one (a probe) is closed at once.
    let sent = thread::spawn(move || {
        let (stream, _) = upstream.accept().expect("accepting");
        let sender = send_random(stream, BIG);
        thread::spawn(move || {
            for stream in upstream.incoming() {
                drop(stream);
            }
        });
        sender.join().expect("upstream sender")
    });
    let mut client = connect(listen);
    let mut head = vec![0u8; 1 << 20];
    client.read_exact(&mut head).expect("reading the first MiB");

    ambassador.signal(libc::SIGTERM);
    eventually(
        DEADLINE,
        "new connections refused",
        || match TcpStream::connect((loopback(1), listen)) {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );

    // The transfer in flight completes.
    let mut checksum = Checksum::new();
    checksum.update(&head);
    let (rest, rest_checksum) = receive_all_continuing(&mut client, checksum);
    let sent = sent.join().expect("upstream");
    assert_eq!((head.len() + rest, rest_checksum), (BIG, sent));
    // The client is done too: with both directions closed the drain finishes.
    drop(client);
    let status = ambassador.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", ambassador.log());
}

/// Like [`receive_all`], continuing a checksum already started.
fn receive_all_continuing(stream: &mut TcpStream, mut checksum: Checksum) -> (usize, Checksum) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buffer).expect("receiving") {
            0 => return (total, checksum),
            n => {
                checksum.update(&buffer[..n]);
                total += n;
            }
        }
    }
}

#[test]
fn malformed_link_variable_exits_2_naming_it() {
    let output = run_to_exit(
        &[
            ("MYSQL_PORT_3306_TCP", "tcp://172.17.0.5:99999"),
            ("MYSQL_ENV_MYSQL_ROOT_PASSWORD", "hunter2"),
        ],
        &["run"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("MYSQL_PORT_3306_TCP") && stderr.contains("tcp://172.17.0.5:99999"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "a secret leaked: {stderr}");

    let output = run_to_exit(&[("AMB_FORWARD", "3306=mysql")], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--forward=\"3306=mysql\""), "{stderr}");
}

#[test]
fn no_links_runs_forwarding_nothing_until_signalled() {
    let mut ambassador = Ambassador::start(&[], &[]);
    assert!(
        ambassador.log().contains("nothing to forward"),
        "{}",
        ambassador.log()
    );
    ambassador.signal(libc::SIGINT);
    let status = ambassador.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", ambassador.log());
}

#[test]
fn drain_ends_at_the_timeout_or_a_second_signal() {
    let (upstream, upstream_port) = listen_upstream();
    echo_upstream(upstream);
    for second_signal in [false, true] {
        let listen = free_port(loopback(1));
        let forward = format!("{listen}=127.0.0.1:{upstream_port}");
        let drain = if second_signal { "300s" } else { "1s" };
        let mut ambassador =
            Ambassador::start(&[], &["--forward", &forward, "--drain-timeout", drain]);
        // An idle connection that never ends by itself.
        let mut idle = connect(listen);
        round_trip(&mut idle, b"idle");
        ambassador.signal(libc::SIGTERM);
        eventually(DEADLINE, "draining", || {
            ambassador.log().contains("draining").then_some(())
        });
        if second_signal {
            ambassador.signal(libc::SIGINT);
        }
        let status = ambassador.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "{}", ambassador.log());
        let expected = if second_signal {
            "second signal"
        } else {
            "drain timed out"
        };
        assert!(ambassador.log().contains(expected), "{}", ambassador.log());
    }
}

#[test]
fn busy_port_exits_1_naming_the_address() {
    let busy = TcpListener::bind((loopback(1), 0)).expect("binding");
    let port = busy.local_addr().expect("bound").port();
    let forward = format!("{port}=127.0.0.1:9");
    let output = run_to_exit(
        &[],
        &["run", "--listen-addr", "127.0.0.1", "--forward", &forward],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}
