//! The tokio driver with two native members on loopback: join, meta update, user messages,
//! graceful leave, and the delegate's user messages.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serf::memberlist::{Delegate, Event, NodeState, META_MAX_SIZE};
use serf_agent::driver::{self, Gossip, Handle, Options};
use testkit::{free_port, loopback};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Default, Clone)]
struct Recorder {
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Delegate for Recorder {
    fn notify_user_msg(&mut self, message: &[u8]) {
        self.messages.lock().expect("lock").push(message.to_vec());
    }
}

async fn start(
    name: &str,
    ip: u8,
    delegate: Recorder,
) -> (Handle<Gossip<Recorder>>, UnboundedReceiver<Event>) {
    let ip = loopback(ip);
    let mut options = Options::new(name, SocketAddr::from((ip, free_port(ip))));
    options.seed = Some(u64::from(ip.octets()[3]));
    driver::start(options, delegate)
        .await
        .expect("starting a member")
}

async fn next_matching(
    events: &mut UnboundedReceiver<Event>,
    what: &str,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    let wait = async {
        while let Some(event) = events.recv().await {
            if matches(&event) {
                return event;
            }
        }
        panic!("event stream ended while waiting for {what}");
    };
    tokio::time::timeout(testkit::DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_native_members_join_update_message_and_leave() {
    let recorder_a = Recorder::default();
    let (a, mut events_a) = start("drv-a", 61, recorder_a.clone()).await;
    let (b, _events_b) = start("drv-b", 62, Recorder::default()).await;

    assert_eq!(b.join(&[a.local_addr()]).await.expect("join"), 1);
    next_matching(
        &mut events_a,
        "a sees b join",
        |event| matches!(event, Event::NodeJoined(node) if node.name == "drv-b"),
    )
    .await;

    b.update_meta(b"v2".to_vec()).await.expect("small meta");
    let updated = next_matching(
        &mut events_a,
        "a sees b's new meta",
        |event| matches!(event, Event::NodeUpdated(node) if node.name == "drv-b"),
    )
    .await;
    let Event::NodeUpdated(node) = updated else {
        unreachable!("matched above")
    };
    assert_eq!(node.meta, b"v2");
    let error = b
        .update_meta(vec![0; META_MAX_SIZE + 1])
        .await
        .expect_err("meta too large");
    assert_eq!(
        error.to_string(),
        "node meta is 513 bytes, above the limit of 512 bytes"
    );

    b.send_user(a.local_addr(), b"hello".to_vec())
        .await
        .expect("driver running");
    testkit::eventually(testkit::DEADLINE, "a receives the user message", || {
        recorder_a
            .messages
            .lock()
            .expect("lock")
            .contains(&b"hello".to_vec())
            .then_some(())
    });

    assert!(b
        .leave(Duration::from_secs(5))
        .await
        .expect("driver running"));
    assert!(
        b.leave(Duration::from_secs(5))
            .await
            .expect("driver running"),
        "a second leave answers at once"
    );
    next_matching(
        &mut events_a,
        "a sees b leave",
        |event| matches!(event, Event::NodeLeft(node) if node.name == "drv-b"),
    )
    .await;
    let members = a.members().await.expect("driver running");
    let b_state = members
        .iter()
        .find(|node| node.name == "drv-b")
        .map(|node| node.state);
    assert_eq!(b_state, Some(NodeState::Left));
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_to_nobody_fails_with_the_reason() {
    let (a, _events) = start("drv-c", 63, Recorder::default()).await;
    let nobody = SocketAddr::from((loopback(64), free_port(loopback(64))));
    let error = a.join(&[nobody]).await.expect_err("nobody listens");
    let text = error.to_string();
    assert!(
        text.contains("join failed") && text.contains(&nobody.to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_both_ports_is_survived() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (a, _events) = start("drv-g", 65, Recorder::default()).await;
    let target = a.local_addr();
    let udp = tokio::net::UdpSocket::bind((loopback(66), 0))
        .await
        .expect("binding a udp socket");
    for packet in [
        &b""[..],
        &[0xff; 3],
        &[0x07, 0xff, 0x00],
        &[0x0c, 1, 2, 3, 4, 5],
        &[0x09, 0x82],
    ] {
        udp.send_to(packet, target).await.expect("sending garbage");
    }
    // A stream with garbage gets an error reply and is closed.
    let mut stream = tokio::net::TcpStream::connect(target)
        .await
        .expect("connecting");
    stream.write_all(&[0xee, 0, 1, 2]).await.expect("writing");
    let mut reply = Vec::new();
    tokio::time::timeout(testkit::DEADLINE, stream.read_to_end(&mut reply))
        .await
        .expect("the member closes a garbage stream")
        .expect("reading the reply");
    // A stream that stalls mid-message does not block others.
    let mut stalled = tokio::net::TcpStream::connect(target)
        .await
        .expect("connecting");
    stalled.write_all(&[0x06, 0x83]).await.expect("writing");
    let (b, _events_b) = start("drv-h", 67, Recorder::default()).await;
    assert_eq!(b.join(&[target]).await.expect("join after garbage"), 1);
    drop(stalled);
}

/// A delegate whose push-pull state is 8 MiB: more than the member's send buffer and a small
/// receive buffer of the peer hold, so a reply to a peer that never reads blocks in `write`.
#[derive(Default)]
struct BigState;

impl Delegate for BigState {
    fn local_state(&mut self, _join: bool) -> Vec<u8> {
        vec![0x42; 8 * 1024 * 1024]
    }
}

/// Peers that open push-pulls and never read the reply: each stream task ends at the TCP
/// deadline (it used to wait in `write` for as long as the peer held the connection, holding
/// its socket and, since the count dropped when the core closed the stream, not counting
/// against the 128 inbound streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_read_are_cut_at_the_deadline() {
    use serf::wire::stream::{encode_stream, PushPull, StreamMessage};
    use tokio::io::AsyncWriteExt;

    const PEERS: usize = 24;
    let ip = loopback(68);
    let mut options = Options::new("drv-slow", SocketAddr::from((ip, free_port(ip))));
    options.config.tcp_timeout = Duration::from_secs(2);
    // Sent as it is: compressed, the state would be small.
    options.config.enable_compression = false;
    let (member, _events) = driver::start(options, BigState)
        .await
        .expect("starting a member");
    let target = member.local_addr();
    let request = encode_stream(&StreamMessage::PushPull(PushPull::default()), false);
    let mut streams = Vec::new();
    for _ in 0..PEERS {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut stream = socket.connect(target).await.expect("connecting");
        stream.write_all(&request).await.expect("writing");
        streams.push(stream);
    }
    let wait_for = |what: &'static str, done: &'static dyn Fn(usize) -> bool| {
        let started = Instant::now();
        async move {
            while !done(open_streams_at(target)) {
                assert!(
                    started.elapsed() < testkit::DEADLINE,
                    "{what}: the member holds {} streams of {PEERS} peers",
                    open_streams_at(target)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The member accepts them all...
    wait_for("the member accepts every stream", &|open| open == PEERS).await;
    // ...and closes its ends once the deadline passes, though ours stay open.
    wait_for(
        "the member holds the streams of peers that never read",
        &|open| open == 0,
    )
    .await;
    drop(streams);
}

/// TCP sockets of this process (an inode) whose local address is `at`, not listening: the
/// member's ends of its streams (it runs in this process).
fn open_streams_at(at: SocketAddr) -> usize {
    let SocketAddr::V4(at) = at else {
        return 0;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(at.ip().octets()),
        at.port()
    );
    std::fs::read_to_string("/proc/self/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields.len() > 9 && fields[1] == local && fields[3] != "0A" && fields[9] != "0"
        })
        .count()
}
