//! One-step protocol tests: feed one input, assert the exact transmits, events and deadlines.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::SeedableRng;

use super::*;
use crate::wire::memberlist::{
    decode_packet, kind, AckResp, Alive, Dead, IndirectPingReq, Message, NackResp, NodeStateKind,
    Ping, PushNodeState, Suspect,
};
use crate::wire::stream::{decode_stream, encode_stream, PushPull, StreamMessage};

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, last), 7946))
}

fn core_with(config: Config, now: Instant) -> Memberlist {
    let local = LocalNode::new("a", addr(1));
    Memberlist::new(config, local, StdRng::seed_from_u64(1), now).expect("valid local node")
}

/// A core that sends packets uncompressed, so tests can read them.
fn uncompressed(now: Instant) -> Memberlist {
    core_with(
        Config {
            enable_compression: false,
            ..Config::lan()
        },
        now,
    )
}

fn core(now: Instant) -> Memberlist {
    core_with(Config::lan(), now)
}

fn alive(name: &str, last: u8, incarnation: u32, pmax: u8) -> Alive {
    Alive {
        incarnation,
        node: name.into(),
        addr: vec![10, 0, 0, last],
        port: 7946,
        meta: b"meta".to_vec(),
        vsn: vec![1, pmax, 2, 2, 5, 5],
    }
}

fn feed(memberlist: &mut Memberlist, now: Instant, from: SocketAddr, message: Message) {
    memberlist
        .handle_packet(now, from, &message.to_bytes(), &mut NoDelegate)
        .expect("a well-formed message");
}

/// Member `name` at `addr(last)` tells us it is alive (incarnation 1, protocol 5).
fn meet(memberlist: &mut Memberlist, now: Instant, name: &str, last: u8) {
    feed(
        memberlist,
        now,
        addr(last),
        Message::Alive(alive(name, last, 1, 5)),
    );
}

/// What the core thinks of member `name`, which it knows.
fn state_of(memberlist: &Memberlist, name: &str) -> NodeState {
    memberlist.member(name).expect("known").state
}

/// Member `b` at `addr(2)`, alive, as a push-pull lists it.
fn push_state_of_b(incarnation: u32, vsn: Vec<u8>) -> PushNodeState {
    PushNodeState {
        name: "b".into(),
        addr: vec![10, 0, 0, 2],
        port: 7946,
        meta: Vec::new(),
        incarnation,
        state: NodeStateKind::Alive.to_wire(),
        vsn,
    }
}

/// Every UDP packet sent, decoded, and the stream transmits, in order.
fn drain(memberlist: &mut Memberlist) -> (Vec<(SocketAddr, Vec<Message>)>, Vec<Transmit>) {
    let mut packets = Vec::new();
    let mut streams = Vec::new();
    while let Some(transmit) = memberlist.poll_transmit() {
        match transmit {
            Transmit::Packet { to, bytes } => {
                let mut messages = Vec::new();
                decode_packet(&bytes, &mut messages).expect("the core sends decodable packets");
                packets.push((to, messages));
            }
            other => streams.push(other),
        }
    }
    (packets, streams)
}

fn events(memberlist: &mut Memberlist) -> Vec<Event> {
    std::iter::from_fn(|| memberlist.poll_event()).collect()
}

/// Runs every timer due up to `until`, returning the time reached.
fn advance(memberlist: &mut Memberlist, until: Instant, delegate: &mut dyn Delegate) {
    while let Some(at) = memberlist.poll_timeout().filter(|at| *at <= until) {
        memberlist.handle_timeout(at, delegate);
    }
}

#[test]
fn new_member_announces_itself_with_six_version_bytes() {
    let now = Instant::now();
    let mut memberlist = core(now);
    let joined = events(&mut memberlist);
    assert!(matches!(&joined[..], [Event::NodeJoined(node)] if node.name == "a"));
    let local = memberlist.local_node();
    assert_eq!(local.incarnation, Incarnation(1));
    assert_eq!(local.vsn.0, [1, 5, 2, 2, 5, 5]);

    // The join's push-pull carries our state: Join set, one node, six Vsn bytes.
    let join = memberlist
        .join(now, &[addr(2)], &mut NoDelegate)
        .expect("a member can join");
    let (_, streams) = drain(&mut memberlist);
    let [Transmit::StreamOpen { stream, to }, Transmit::StreamWrite {
        stream: written,
        bytes,
    }] = &streams[..]
    else {
        panic!("expected open + write, got {streams:?}");
    };
    assert_eq!((*to, written), (addr(2), stream));
    assert_eq!(bytes[0], kind::COMPRESS, "streams are always compressed");
    let (message, used) = decode_stream(bytes).expect("decodes").expect("complete");
    assert_eq!(used, bytes.len());
    let StreamMessage::PushPull(push_pull) = message else {
        panic!("expected a push-pull, got {message:?}");
    };
    assert!(push_pull.join);
    assert_eq!(push_pull.nodes.len(), 1);
    assert_eq!(push_pull.nodes[0].vsn, [1, 5, 2, 2, 5, 5]);
    assert_eq!(push_pull.nodes[0].incarnation, 1);
    assert_eq!(push_pull.nodes[0].addr, [10, 0, 0, 1]);

    // The seed answers with its own state: B is merged and the join reports one contact.
    let reply = PushPull {
        join: true,
        nodes: vec![push_state_of_b(3, vec![1, 5, 2, 2, 5, 5])],
        user_state: Vec::new(),
    };
    let bytes = encode_stream(&StreamMessage::PushPull(reply), true);
    memberlist.handle_stream(now, *stream, StreamInput::Data(&bytes), &mut NoDelegate);
    let (_, streams) = drain(&mut memberlist);
    assert_eq!(streams, [Transmit::StreamClose { stream: *stream }]);
    let got = events(&mut memberlist);
    assert!(
        matches!(&got[0], Event::NodeJoined(node) if node.name == "b" && node.incarnation == Incarnation(3))
    );
    assert!(matches!(
        &got[1],
        Event::JoinCompleted { join: id, contacted: 1, errors } if *id == join && errors.is_empty()
    ));
}

#[test]
fn join_reports_failed_seeds() {
    let now = Instant::now();
    let mut memberlist = core(now);
    events(&mut memberlist);
    let join = memberlist
        .join(now, &[addr(2)], &mut NoDelegate)
        .expect("a member can join");
    let (_, streams) = drain(&mut memberlist);
    let Transmit::StreamOpen { stream, .. } = streams[0] else {
        panic!("expected an open");
    };
    memberlist.handle_stream(
        now,
        stream,
        StreamInput::Failed("connection refused"),
        &mut NoDelegate,
    );
    assert_eq!(
        events(&mut memberlist),
        [Event::JoinCompleted {
            join,
            contacted: 0,
            errors: vec![(addr(2), "connection refused".into())],
        }]
    );
}

#[test]
fn ping_is_acked_to_its_source_address_with_the_delegate_payload() {
    struct Payload;
    impl Delegate for Payload {
        fn ack_payload(&mut self) -> Vec<u8> {
            b"coordinate".to_vec()
        }
    }
    let now = Instant::now();
    let mut memberlist = core(now);
    drain(&mut memberlist);
    let cases = [
        // (target node, source addr, source port, expected destination)
        (
            "a",
            vec![10, 0, 0, 9],
            9000,
            Some(SocketAddr::from(([10, 0, 0, 9], 9000))),
        ),
        ("", vec![], 0, Some(addr(2))),
        ("someone-else", vec![], 0, None),
    ];
    for (node, source_addr, source_port, expected) in cases {
        let ping = Ping {
            seq_no: 42,
            node: node.into(),
            source_addr,
            source_port,
            source_node: "b".into(),
        };
        memberlist
            .handle_packet(now, addr(2), &Message::Ping(ping).to_bytes(), &mut Payload)
            .expect("a well-formed ping");
        let (packets, _) = drain(&mut memberlist);
        match expected {
            Some(to) => {
                let ack = Message::Ack(AckResp {
                    seq_no: 42,
                    payload: b"coordinate".to_vec(),
                });
                assert_eq!(packets.len(), 1, "node {node:?}");
                assert_eq!(packets[0].0, to, "node {node:?}");
                assert_eq!(packets[0].1[0], ack, "node {node:?}");
            }
            None => assert!(packets.is_empty(), "node {node:?}: {packets:?}"),
        }
    }
}

#[test]
fn user_broadcasts_ride_after_memberlist_broadcasts() {
    struct Events {
        asked: Vec<(usize, usize)>,
    }
    impl Delegate for Events {
        fn broadcasts(&mut self, overhead: usize, limit: usize) -> Vec<Vec<u8>> {
            self.asked.push((overhead, limit));
            vec![b"\x03event".to_vec()]
        }
    }
    let now = Instant::now();
    let mut memberlist = uncompressed(now);
    meet(&mut memberlist, now, "b", 2);
    drain(&mut memberlist);
    let mut delegate = Events { asked: Vec::new() };
    let ping = Message::Ping(Ping {
        seq_no: 9,
        node: "a".into(),
        source_addr: Vec::new(),
        source_port: 0,
        source_node: "b".into(),
    });
    memberlist
        .handle_packet(now, addr(2), &ping.to_bytes(), &mut delegate)
        .expect("a well-formed ping");
    let (packets, _) = drain(&mut memberlist);
    let [(_, messages)] = &packets[..] else {
        panic!("expected one packet, got {packets:?}");
    };
    assert!(matches!(
        messages[0],
        Message::Ack(AckResp { seq_no: 9, .. })
    ));
    let alives = messages[1..messages.len() - 1]
        .iter()
        .filter(|m| matches!(m, Message::Alive(_)))
        .count();
    assert_eq!(
        alives, 2,
        "our alive and B's, before user messages: {messages:?}"
    );
    assert_eq!(messages.last(), Some(&Message::User(b"\x03event".to_vec())));
    let [(overhead, limit)] = delegate.asked[..] else {
        panic!("delegate asked {:?}", delegate.asked);
    };
    assert_eq!(overhead, 3, "2 bytes of compound length + the 08 type byte");
    assert!(limit < 1400 && limit > 1000, "limit {limit}");
}

#[test]
fn encryption_overhead_comes_off_the_piggyback_budget() {
    struct Budget(Vec<usize>);
    impl Delegate for Budget {
        fn broadcasts(&mut self, _overhead: usize, limit: usize) -> Vec<Vec<u8>> {
            self.0.push(limit);
            Vec::new()
        }
    }
    // The delegate's budget when answering a ping, with and without the 29 bytes the driver
    // adds when it encrypts (ml/net.go `sendMsg`: bytesAvail -= encryptOverhead).
    let budget = |packet_overhead: usize| {
        let now = Instant::now();
        let config = Config {
            packet_overhead,
            ..Config::lan()
        };
        let mut memberlist = core_with(config, now);
        meet(&mut memberlist, now, "b", 2);
        drain(&mut memberlist);
        let mut delegate = Budget(Vec::new());
        let ping = Message::Ping(Ping {
            seq_no: 9,
            node: "a".into(),
            source_addr: Vec::new(),
            source_port: 0,
            source_node: "b".into(),
        });
        memberlist
            .handle_packet(now, addr(2), &ping.to_bytes(), &mut delegate)
            .expect("a well-formed ping");
        delegate.0[0]
    };
    assert_eq!(
        budget(0) - budget(crate::wire::crypto::PACKET_OVERHEAD),
        crate::wire::crypto::PACKET_OVERHEAD
    );
}

#[test]
fn probe_cycle_direct_then_tcp_then_suspect_then_dead() {
    let start = Instant::now();
    let mut memberlist = core(start);
    meet(&mut memberlist, start, "b", 2);
    events(&mut memberlist);
    drain(&mut memberlist);

    // The first probe tick pings B with our source address.
    let probe_at = start + Duration::from_secs(1);
    let mut ping = None;
    while ping.is_none() {
        let at = memberlist.poll_timeout().expect("timers are always set");
        assert!(at <= probe_at, "no probe within the first interval");
        memberlist.handle_timeout(at, &mut NoDelegate);
        let (packets, _) = drain(&mut memberlist);
        ping = packets.into_iter().find_map(|(to, messages)| {
            messages.into_iter().find_map(|message| match message {
                Message::Ping(ping) => Some((to, ping, at)),
                _ => None,
            })
        });
    }
    let (to, ping, sent) = ping.expect("found above");
    assert_eq!(to, addr(2));
    assert_eq!(ping.node, "b");
    assert_eq!(ping.source_addr, [10, 0, 0, 1]);
    assert_eq!(ping.source_port, 7946);
    assert_eq!(ping.source_node, "a");

    // No ack within the probe timeout: no one to ask indirectly, so a TCP ping (PMax 5).
    advance(
        &mut memberlist,
        sent + Duration::from_millis(500),
        &mut NoDelegate,
    );
    let (packets, streams) = drain(&mut memberlist);
    assert!(
        packets.iter().all(|(_, messages)| !messages
            .iter()
            .any(|m| matches!(m, Message::IndirectPing(_)))),
        "{packets:?}"
    );
    let Some(Transmit::StreamOpen { stream, to }) = streams.first().cloned() else {
        panic!("expected a TCP ping, got {streams:?}");
    };
    assert_eq!(to, addr(2));
    let Some(Transmit::StreamWrite { bytes, .. }) = streams.get(1) else {
        panic!("expected the TCP ping bytes");
    };
    let (message, _) = decode_stream(bytes).expect("decodes").expect("complete");
    assert!(matches!(message, StreamMessage::Ping(p) if p.seq_no == ping.seq_no));

    // The TCP ping fails too; at the end of the interval B is suspect.
    memberlist.handle_stream(
        sent,
        stream,
        StreamInput::Failed("refused"),
        &mut NoDelegate,
    );
    advance(
        &mut memberlist,
        sent + Duration::from_secs(1),
        &mut NoDelegate,
    );
    assert_eq!(state_of(&memberlist, "b"), NodeState::Suspect);
    assert_eq!(
        memberlist.health_score(),
        1,
        "a failed probe without nacks costs 1"
    );

    // Two members: the suspicion timeout is the minimum, 4 s (SuspicionMult 4 x 1 s).
    let suspected = sent + Duration::from_secs(1);
    advance(
        &mut memberlist,
        suspected + Duration::from_millis(3999),
        &mut NoDelegate,
    );
    assert_eq!(state_of(&memberlist, "b"), NodeState::Suspect);
    events(&mut memberlist);
    advance(
        &mut memberlist,
        suspected + Duration::from_secs(4),
        &mut NoDelegate,
    );
    let failed = events(&mut memberlist);
    assert!(
        matches!(&failed[..], [Event::NodeFailed(node)] if node.name == "b"),
        "{failed:?}"
    );
}

#[test]
fn direct_ack_completes_the_probe_and_reports_rtt_and_payload() {
    #[derive(Default)]
    struct Pings(Vec<(String, Duration, Vec<u8>)>);
    impl Delegate for Pings {
        fn notify_ping_complete(&mut self, node: &Node, rtt: Duration, payload: &[u8]) {
            self.0.push((node.name.clone(), rtt, payload.to_vec()));
        }
    }
    let start = Instant::now();
    let mut memberlist = core(start);
    meet(&mut memberlist, start, "b", 2);
    let mut delegate = Pings::default();
    let (seq_no, sent) = loop {
        let at = memberlist.poll_timeout().expect("timers are always set");
        memberlist.handle_timeout(at, &mut delegate);
        let (packets, _) = drain(&mut memberlist);
        let found = packets
            .into_iter()
            .flat_map(|(_, m)| m)
            .find_map(|m| match m {
                Message::Ping(ping) => Some(ping.seq_no),
                _ => None,
            });
        if let Some(seq_no) = found {
            break (seq_no, at);
        }
    };
    let ack = Message::Ack(AckResp {
        seq_no,
        payload: b"xyz".to_vec(),
    });
    let acked = sent + Duration::from_millis(3);
    memberlist
        .handle_packet(acked, addr(2), &ack.to_bytes(), &mut delegate)
        .expect("a well-formed ack");
    assert_eq!(
        delegate.0,
        [("b".to_owned(), Duration::from_millis(3), b"xyz".to_vec())]
    );
    // The probe is over: nothing else goes to B before the next probe tick.
    advance(
        &mut memberlist,
        sent + Duration::from_millis(999),
        &mut delegate,
    );
    let (_, streams) = drain(&mut memberlist);
    assert!(streams.is_empty(), "no TCP ping after an ack: {streams:?}");
    assert_eq!(state_of(&memberlist, "b"), NodeState::Alive);
    assert_eq!(memberlist.health_score(), 0);
}

/// Runs timers until a ping to `target` goes out, acking pings to anyone else at once.
fn probe_until_ping_to(
    memberlist: &mut Memberlist,
    target: &str,
    from_addr: impl Fn(&str) -> SocketAddr,
) -> (u32, Instant) {
    for _ in 0..1000 {
        let at = memberlist.poll_timeout().expect("timers are always set");
        memberlist.handle_timeout(at, &mut NoDelegate);
        let (packets, _) = drain(memberlist);
        for (_, messages) in packets {
            for message in messages {
                if let Message::Ping(ping) = message {
                    if ping.node == target {
                        return (ping.seq_no, at);
                    }
                    let ack = Message::Ack(AckResp {
                        seq_no: ping.seq_no,
                        payload: Vec::new(),
                    });
                    let from = from_addr(&ping.node);
                    memberlist
                        .handle_packet(at, from, &ack.to_bytes(), &mut NoDelegate)
                        .expect("a well-formed ack");
                }
            }
        }
    }
    panic!("{target} was never probed");
}

#[test]
fn failed_direct_probe_goes_indirect_with_nacks_for_protocol_4_and_up() {
    let start = Instant::now();
    let config = Config {
        disable_tcp_pings: true,
        ..Config::lan()
    };
    let mut memberlist = core_with(config, start);
    for (name, last, pmax) in [("b", 2, 5), ("c", 3, 5), ("d", 4, 3)] {
        feed(
            &mut memberlist,
            start,
            addr(last),
            Message::Alive(alive(name, last, 1, pmax)),
        );
    }
    drain(&mut memberlist);
    let address_of = |name: &str| match name {
        "c" => addr(3),
        "d" => addr(4),
        _ => addr(2),
    };
    let (seq_no, sent) = probe_until_ping_to(&mut memberlist, "b", address_of);
    advance(
        &mut memberlist,
        sent + Duration::from_millis(500),
        &mut NoDelegate,
    );
    let (packets, streams) = drain(&mut memberlist);
    assert!(streams.is_empty(), "TCP pings are disabled: {streams:?}");
    let mut requests: Vec<(SocketAddr, IndirectPingReq)> = packets
        .into_iter()
        .flat_map(|(to, messages)| {
            messages
                .into_iter()
                .filter_map(move |message| match message {
                    Message::IndirectPing(request) => Some((to, request)),
                    _ => None,
                })
        })
        .collect();
    requests.sort_by_key(|(to, _)| *to);
    assert_eq!(requests.len(), 2, "{requests:?}");
    for ((to, request), (expected_to, nack)) in
        requests.iter().zip([(addr(3), true), (addr(4), false)])
    {
        assert_eq!(*to, expected_to);
        assert_eq!(request.seq_no, seq_no);
        assert_eq!(request.node, "b");
        assert_eq!(request.target, [10, 0, 0, 2]);
        assert_eq!(request.port, 7946);
        assert_eq!(request.nack, nack, "nack only for PMax >= 4 ({to})");
    }
    // C answers with a nack: it is healthy, so our score does not grow for the failure.
    let score = memberlist.health_score();
    let nack = Message::Nack(NackResp { seq_no });
    feed(
        &mut memberlist,
        sent + Duration::from_millis(600),
        addr(3),
        nack,
    );
    advance(
        &mut memberlist,
        sent + Duration::from_secs(1),
        &mut NoDelegate,
    );
    assert_eq!(state_of(&memberlist, "b"), NodeState::Suspect);
    assert_eq!(
        memberlist.health_score(),
        score,
        "1 nack expected, 1 received: delta 0"
    );
}

#[test]
fn indirect_ping_requests_are_relayed_with_ack_or_nack() {
    for acked in [true, false] {
        let now = Instant::now();
        let mut memberlist = core(now);
        drain(&mut memberlist);
        let request = IndirectPingReq {
            seq_no: 77,
            target: vec![10, 0, 0, 5],
            port: 7000,
            node: "e".into(),
            nack: true,
            source_addr: vec![10, 0, 0, 2],
            source_port: 7946,
            source_node: "b".into(),
        };
        feed(
            &mut memberlist,
            now,
            addr(9),
            Message::IndirectPing(request),
        );
        let (packets, _) = drain(&mut memberlist);
        let [(to, messages)] = &packets[..] else {
            panic!("expected one ping, got {packets:?}");
        };
        assert_eq!(*to, SocketAddr::from(([10, 0, 0, 5], 7000)));
        let Message::Ping(ping) = &messages[0] else {
            panic!("expected a ping, got {messages:?}");
        };
        assert_eq!(ping.node, "e");
        assert_ne!(ping.seq_no, 77, "the relay uses its own sequence number");
        let reply = if acked {
            let ack = Message::Ack(AckResp {
                seq_no: ping.seq_no,
                payload: b"ignored".to_vec(),
            });
            feed(&mut memberlist, now, *to, ack);
            Message::Ack(AckResp {
                seq_no: 77,
                payload: Vec::new(),
            })
        } else {
            advance(
                &mut memberlist,
                now + Duration::from_millis(500),
                &mut NoDelegate,
            );
            Message::Nack(NackResp { seq_no: 77 })
        };
        let (packets, _) = drain(&mut memberlist);
        let relayed: Vec<&Message> = packets
            .iter()
            .filter(|(to, _)| *to == addr(2))
            .flat_map(|(_, messages)| messages)
            .filter(|message| matches!(message, Message::Ack(_) | Message::Nack(_)))
            .collect();
        assert_eq!(relayed, [&reply], "acked: {acked}");
    }
}

#[test]
fn suspicion_about_us_is_refuted_with_a_higher_incarnation() {
    let now = Instant::now();
    let mut memberlist = core(now);
    meet(&mut memberlist, now, "b", 2);
    drain(&mut memberlist);
    for (message, expected_incarnation) in [
        (
            Message::Suspect(Suspect {
                incarnation: 1,
                node: "a".into(),
                from: "b".into(),
            }),
            2,
        ),
        (
            Message::Dead(Dead {
                incarnation: 7,
                node: "a".into(),
                from: "b".into(),
            }),
            8,
        ),
    ] {
        feed(&mut memberlist, now, addr(2), message);
        let local = memberlist.local_node();
        assert_eq!(local.state, NodeState::Alive);
        assert_eq!(local.incarnation, Incarnation(expected_incarnation));
    }
    assert_eq!(memberlist.stats().refutes, 2);
    // The refutation is gossiped: the next gossip round carries our alive at incarnation 8.
    advance(
        &mut memberlist,
        now + Duration::from_millis(400),
        &mut NoDelegate,
    );
    let (packets, _) = drain(&mut memberlist);
    let refuted = packets.iter().flat_map(|(_, m)| m).any(|m| {
        matches!(m, Message::Alive(a) if a.node == "a" && a.incarnation == 8 && a.vsn == [1, 5, 2, 2, 5, 5])
    });
    assert!(refuted, "{packets:?}");
}

#[test]
fn alive_messages_are_checked() {
    let now = Instant::now();
    let cases: Vec<(Alive, bool)> = vec![
        (alive("b", 2, 1, 5), true),
        (alive("b", 2, 0, 5), false),
        (
            Alive {
                vsn: vec![1, 5, 2],
                ..alive("b", 2, 1, 5)
            },
            false,
        ),
        (
            Alive {
                vsn: vec![0, 5, 2, 2, 5, 5],
                ..alive("b", 2, 1, 5)
            },
            false,
        ),
        (
            Alive {
                addr: vec![1, 2, 3],
                ..alive("b", 2, 1, 5)
            },
            false,
        ),
        (
            Alive {
                addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2].to_vec(),
                ..alive("b", 2, 1, 5)
            },
            true,
        ),
    ];
    for (alive, accepted) in cases {
        let mut memberlist = core(now);
        feed(&mut memberlist, now, addr(2), Message::Alive(alive.clone()));
        assert_eq!(memberlist.member("b").is_some(), accepted, "{alive:?}");
        if accepted {
            assert_eq!(memberlist.member("b").expect("accepted").addr, addr(2));
        }
    }
}

#[test]
fn address_conflicts_and_reclaiming_left_or_dead_members() {
    let now = Instant::now();
    let later = now + Duration::from_secs(60);
    // (config reclaim time, how B went away, whether B's new address is accepted)
    let cases = [
        (None, None, false),
        (None, Some("left"), true),
        (None, Some("dead"), false),
        (Some(Duration::from_secs(30)), Some("dead"), true),
    ];
    for (reclaim, gone, accepted) in cases {
        let config = Config {
            dead_node_reclaim_time: reclaim,
            ..Config::lan()
        };
        let mut memberlist = core_with(config, now);
        meet(&mut memberlist, now, "b", 2);
        if let Some(gone) = gone {
            let from = if gone == "left" { "b" } else { "a" };
            let dead = Dead {
                incarnation: 1,
                node: "b".into(),
                from: from.into(),
            };
            feed(&mut memberlist, now, addr(2), Message::Dead(dead));
        }
        events(&mut memberlist);
        // B comes back from another address with the same incarnation.
        meet(&mut memberlist, later, "b", 7);
        let got = events(&mut memberlist);
        let member = memberlist.member("b").expect("known");
        let case = format!("reclaim {reclaim:?}, gone {gone:?}: {got:?}");
        if accepted {
            assert_eq!(member.addr, addr(7), "{case}");
            assert_eq!(member.state, NodeState::Alive, "{case}");
            assert!(
                matches!(&got[..], [Event::NodeJoined(node)] if node.addr == addr(7)),
                "{case}"
            );
        } else {
            assert_eq!(member.addr, addr(2), "{case}");
            assert!(
                matches!(&got[..], [Event::Conflict { existing, other }] if existing.addr == addr(2) && other.addr == addr(7)),
                "{case}"
            );
        }
    }
}

#[test]
fn gossip_reaches_the_recently_dead_but_never_the_left() {
    let now = Instant::now();
    let mut memberlist = uncompressed(now);
    meet(&mut memberlist, now, "b", 2);
    meet(&mut memberlist, now, "c", 3);
    let dead = |node: &str, from: &str| Dead {
        incarnation: 1,
        node: node.into(),
        from: from.into(),
    };
    feed(&mut memberlist, now, addr(2), Message::Dead(dead("b", "x")));
    feed(&mut memberlist, now, addr(3), Message::Dead(dead("c", "c")));
    drain(&mut memberlist);
    // Gossip rounds for a second: only the dead B (dead < 30 s) receives anything.
    advance(
        &mut memberlist,
        now + Duration::from_secs(1),
        &mut NoDelegate,
    );
    let (packets, _) = drain(&mut memberlist);
    let gossiped: std::collections::BTreeSet<SocketAddr> =
        packets.iter().map(|(to, _)| *to).collect();
    assert_eq!(gossiped, [addr(2)].into(), "{packets:?}");
}

#[test]
fn meta_update_bumps_the_incarnation_and_meta_is_limited() {
    let now = Instant::now();
    let mut memberlist = core(now);
    events(&mut memberlist);
    memberlist
        .update_meta(now, b"role=web".to_vec())
        .expect("small meta");
    let local = memberlist.local_node();
    assert_eq!(local.incarnation, Incarnation(2));
    assert_eq!(local.meta, b"role=web");
    assert!(matches!(&events(&mut memberlist)[..], [Event::NodeUpdated(node)] if node.name == "a"));
    assert_eq!(
        memberlist.update_meta(now, vec![0; 513]),
        Err(Error::MetaTooLarge {
            len: 513,
            limit: 512
        })
    );
    let too_big = LocalNode {
        meta: vec![0; 513],
        ..LocalNode::new("a", addr(1))
    };
    let error = Memberlist::new(Config::lan(), too_big, StdRng::seed_from_u64(1), now)
        .expect_err("meta too large");
    assert_eq!(
        error.to_string(),
        "node meta is 513 bytes, above the limit of 512 bytes"
    );
}

#[test]
fn gossip_adds_crc_only_for_protocol_5_peers() {
    for (pmax, crc) in [(5, true), (4, false)] {
        let now = Instant::now();
        let mut memberlist = uncompressed(now);
        feed(
            &mut memberlist,
            now,
            addr(2),
            Message::Alive(alive("b", 2, 1, pmax)),
        );
        drain(&mut memberlist);
        advance(
            &mut memberlist,
            now + Duration::from_millis(250),
            &mut NoDelegate,
        );
        let mut first = None;
        while let Some(transmit) = memberlist.poll_transmit() {
            if let Transmit::Packet { bytes, .. } = transmit {
                first.get_or_insert(bytes);
            }
        }
        let bytes = first.expect("a gossip packet");
        assert_eq!(bytes[0] == kind::HAS_CRC, crc, "pmax {pmax}: {bytes:02x?}");
    }
}

#[test]
fn leave_waits_for_the_dead_broadcast() {
    let now = Instant::now();
    // Alone: done at once.
    let mut alone = core(now);
    events(&mut alone);
    alone.leave(now, Duration::from_secs(5));
    let got = events(&mut alone);
    assert!(
        matches!(&got[0], Event::NodeLeft(node) if node.name == "a"),
        "{got:?}"
    );
    assert_eq!(
        got[1],
        Event::LeaveCompleted {
            broadcast_sent: true
        }
    );

    // With a peer: after the dead message went out its 4 transmits.
    let mut memberlist = core(now);
    meet(&mut memberlist, now, "b", 2);
    events(&mut memberlist);
    memberlist.leave(now, Duration::from_secs(5));
    assert!(memberlist.has_left());
    let mut sent_dead = 0;
    let mut done = None;
    let mut at = now;
    while done.is_none() && at < now + Duration::from_secs(6) {
        at = memberlist.poll_timeout().expect("timers");
        memberlist.handle_timeout(at, &mut NoDelegate);
        let (packets, _) = drain(&mut memberlist);
        sent_dead += packets
            .iter()
            .flat_map(|(_, m)| m)
            .filter(|m| matches!(m, Message::Dead(d) if d.node == "a" && d.from == "a"))
            .count();
        done = events(&mut memberlist)
            .into_iter()
            .find_map(|event| match event {
                Event::LeaveCompleted { broadcast_sent } => Some(broadcast_sent),
                _ => None,
            });
    }
    assert_eq!(done, Some(true));
    assert_eq!(sent_dead, 4);
    assert!(at < now + Duration::from_secs(2), "took until {at:?}");
}

#[test]
fn inbound_push_pull_is_answered_then_merged() {
    struct State(Vec<(Vec<u8>, bool)>);
    impl Delegate for State {
        fn local_state(&mut self, _join: bool) -> Vec<u8> {
            b"local".to_vec()
        }
        fn merge_remote_state(&mut self, state: &[u8], join: bool) {
            self.0.push((state.to_vec(), join));
        }
    }
    let now = Instant::now();
    let mut memberlist = core(now);
    events(&mut memberlist);
    let mut delegate = State(Vec::new());
    let stream = memberlist.handle_accept(now, addr(2));
    let remote = PushPull {
        join: true,
        nodes: vec![push_state_of_b(1, vec![1, 5, 2, 2, 5, 5])],
        user_state: b"remote".to_vec(),
    };
    let bytes = encode_stream(&StreamMessage::PushPull(remote), false);
    // Delivered in two pieces: nothing happens until the message is whole.
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    memberlist.handle_stream(now, stream, StreamInput::Data(head), &mut delegate);
    assert_eq!(memberlist.poll_transmit(), None);
    memberlist.handle_stream(now, stream, StreamInput::Data(tail), &mut delegate);
    let (_, streams) = drain(&mut memberlist);
    let [Transmit::StreamWrite { bytes, .. }, Transmit::StreamClose { .. }] = &streams[..] else {
        panic!("expected reply + close, got {streams:?}");
    };
    let (reply, _) = decode_stream(bytes).expect("decodes").expect("complete");
    let StreamMessage::PushPull(reply) = reply else {
        panic!("expected a push-pull reply");
    };
    assert!(reply.join, "the join flag is echoed");
    assert_eq!(reply.user_state, b"local");
    assert_eq!(delegate.0, [(b"remote".to_vec(), true)]);
    assert!(matches!(&events(&mut memberlist)[..], [Event::NodeJoined(node)] if node.name == "b"));
}

#[test]
fn large_push_pull_in_small_reads_is_decoded() {
    let now = Instant::now();
    let nodes: Vec<PushNodeState> = (0..600u32)
        .map(|i| PushNodeState {
            name: format!("node-{i}"),
            addr: vec![10, 1, (i / 250) as u8, (i % 250) as u8 + 1],
            port: 7946,
            meta: vec![b'm'; 200],
            incarnation: 1,
            state: 0,
            vsn: vec![1, 5, 2, 2, 5, 5],
        })
        .collect();
    let bytes = encode_stream(
        &StreamMessage::PushPull(PushPull {
            join: false,
            nodes,
            user_state: Vec::new(),
        }),
        false,
    );
    assert!(bytes.len() > 100_000, "{} bytes", bytes.len());
    for end in ["timer", "eof"] {
        let mut memberlist = core(now);
        drain(&mut memberlist);
        let stream = memberlist.handle_accept(now, addr(2));
        for chunk in bytes.chunks(4096) {
            memberlist.handle_stream(now, stream, StreamInput::Data(chunk), &mut NoDelegate);
        }
        if end == "eof" {
            memberlist.handle_stream(now, stream, StreamInput::Closed, &mut NoDelegate);
        } else {
            advance(
                &mut memberlist,
                now + Duration::from_millis(20),
                &mut NoDelegate,
            );
        }
        let (_, streams) = drain(&mut memberlist);
        assert!(
            matches!(streams.first(), Some(Transmit::StreamWrite { .. })),
            "{end}: expected our push-pull reply"
        );
        assert_eq!(memberlist.num_members(), 601, "{end}");
    }
}

#[test]
fn incompatible_protocol_versions_refuse_the_merge() {
    let now = Instant::now();
    let mut memberlist = core(now);
    let stream = memberlist.handle_accept(now, addr(2));
    let remote = PushPull {
        join: false,
        // Speaks delegate protocol 1, below our minimum of 2.
        nodes: vec![push_state_of_b(1, vec![1, 5, 2, 1, 1, 1])],
        user_state: Vec::new(),
    };
    let bytes = encode_stream(&StreamMessage::PushPull(remote), true);
    memberlist.handle_stream(now, stream, StreamInput::Data(&bytes), &mut NoDelegate);
    assert!(memberlist.member("b").is_none());
    assert_eq!(memberlist.stats().merges_refused, 1);
}

#[test]
fn garbage_is_counted_and_dropped() {
    let now = Instant::now();
    let mut memberlist = core(now);
    for packet in [
        &[][..],
        &[0xff],
        &[kind::PING, 0xc1],
        &[kind::COMPOUND, 9, 0],
        &[kind::HAS_CRC, 0, 0, 0, 0, 4],
    ] {
        assert!(memberlist
            .handle_packet(now, addr(2), packet, &mut NoDelegate)
            .is_err());
    }
    assert_eq!(memberlist.stats().packet_decode_errors, 5);
    let stream = memberlist.handle_accept(now, addr(2));
    memberlist.handle_stream(
        now,
        stream,
        StreamInput::Data(&[0xee, 1, 2]),
        &mut NoDelegate,
    );
    let (_, streams) = drain(&mut memberlist);
    assert!(
        matches!(streams.last(), Some(Transmit::StreamClose { stream: s }) if *s == stream),
        "{streams:?}"
    );
    assert_eq!(memberlist.stats().stream_errors, 1);
}

#[test]
fn streams_time_out() {
    let now = Instant::now();
    let mut memberlist = core(now);
    let stream = memberlist.handle_accept(now, addr(2));
    advance(
        &mut memberlist,
        now + Duration::from_secs(10),
        &mut NoDelegate,
    );
    let (_, streams) = drain(&mut memberlist);
    assert!(
        streams.contains(&Transmit::StreamClose { stream }),
        "{streams:?}"
    );
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_packet_or_stream_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let now = Instant::now();
            let mut memberlist = core(now);
            let _ = memberlist.handle_packet(now, addr(2), &bytes, &mut NoDelegate);
            let stream = memberlist.handle_accept(now, addr(2));
            memberlist.handle_stream(now, stream, StreamInput::Data(&bytes), &mut NoDelegate);
            memberlist.handle_stream(now, stream, StreamInput::Closed, &mut NoDelegate);
            while memberlist.poll_transmit().is_some() {}
        }
    }
}

#[test]
fn forged_nodes_are_bounded_in_count_name_and_meta() {
    let now = Instant::now();
    let mut memberlist = core(now);
    let peer = addr(2);
    // An oversized name or meta is ignored.
    let mut long_name = alive(&"n".repeat(MAX_NODE_NAME_BYTES + 1), 3, 1, 5);
    feed(
        &mut memberlist,
        now,
        peer,
        Message::Alive(long_name.clone()),
    );
    long_name.node = "ok-name".into();
    long_name.meta = vec![0; META_MAX_SIZE + 1];
    feed(&mut memberlist, now, peer, Message::Alive(long_name));
    assert_eq!(memberlist.num_members(), 1);
    // More new nodes than the table holds: it stops at MAX_NODES.
    for i in 0..MAX_NODES + 100 {
        feed(
            &mut memberlist,
            now,
            peer,
            Message::Alive(alive(&format!("forged-{i}"), 3, 1, 5)),
        );
        while memberlist.poll_event().is_some() {}
    }
    assert_eq!(memberlist.num_members(), MAX_NODES);
    // A node already known is still updated.
    feed(
        &mut memberlist,
        now,
        peer,
        Message::Alive(alive("forged-7", 3, 2, 5)),
    );
    assert!(memberlist
        .members()
        .any(|node| node.name == "forged-7" && node.incarnation == Incarnation(2)));
}

#[test]
fn the_first_periodic_push_pull_waits_the_stagger_and_a_whole_period_as_go() {
    let start = Instant::now();
    // No probes: their TCP fallback would open streams too.
    let config = Config {
        probe_interval: Duration::from_secs(3600),
        ..Config::lan()
    };
    let mut memberlist = core_with(config, start);
    meet(&mut memberlist, start, "b", 2);
    let push_pulls = |memberlist: &mut Memberlist| {
        let (_, streams) = drain(memberlist);
        streams
            .iter()
            .filter(|t| matches!(t, Transmit::StreamOpen { .. }))
            .count()
    };
    push_pulls(&mut memberlist);
    let period = Config::lan().push_pull_interval;
    let mut now = start;
    let mut first = None;
    while now < start + 3 * period && first.is_none() {
        now += Duration::from_millis(100);
        memberlist.handle_timeout(now, &mut NoDelegate);
        if push_pulls(&mut memberlist) > 0 {
            first = Some(now - start);
        }
    }
    let first = first.expect("a push-pull within three periods");
    assert!(
        first >= period,
        "first push-pull after {first:?}, before a whole period"
    );
}
