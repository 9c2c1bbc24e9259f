//! A native Serf member (memberlist and the Serf layer, the sans-IO `serf::Serf`) fed a
//! sequence of inputs decoded from the fuzzer's bytes: raw datagrams, Serf messages inside
//! user messages (intents, events, queries, responses), TCP streams (raw, or push-pulls whose
//! node list and Serf state come from the input), time passing, and local commands. After
//! every step the member's state must stay within its bounds, and nothing may panic.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serf::core::Core;
use serf::memberlist::{self, StreamInput, MAX_NODES};
use serf::serf::{Config, QueryParams, Serf};
use serf::wire::memberlist::{Message, NodeStateKind, PushNodeState};
use serf::wire::stream::{encode_stream, PushPull, StreamMessage};

/// Reads the fuzzer's bytes as a sequence of small records.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// A length-prefixed chunk (up to 64 KiB).
    fn chunk(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(u16::from_le_bytes([self.byte()?, self.byte()?]));
        let len = len.min(self.0.len());
        let (chunk, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(chunk)
    }
}

fn peer(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2 + n % 4), 7946))
}

/// Push-pull node records named by the input (a few per chunk byte).
fn nodes(names: &[u8]) -> Vec<PushNodeState> {
    names
        .chunks(3)
        .map(|name| PushNodeState {
            name: format!("n{}", u32::from_le_bytes([name[0], *name.get(1).unwrap_or(&0), 0, 0])),
            addr: vec![10, 0, 1, name[0]],
            port: 7946,
            meta: Vec::new(),
            incarnation: u32::from(*name.get(2).unwrap_or(&1)),
            state: [
                NodeStateKind::Alive,
                NodeStateKind::Suspect,
                NodeStateKind::Dead,
                NodeStateKind::Left,
            ][usize::from(name[0] % 4)]
            .to_wire(),
            vsn: vec![1, 5, 5, 2, 5, 5],
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let config = Config {
        node_name: "fuzzed".to_owned(),
        ..Config::default()
    };
    let local = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 7946));
    let mut member = Serf::new(
        config,
        memberlist::Config::lan(),
        local,
        StdRng::seed_from_u64(7),
        now,
    )
    .expect("a valid configuration");
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let from = peer(op / 8);
                let Some(packet) = input.chunk() else { break };
                let _ = member.handle_packet(now, from, packet);
            }
            1 => {
                // A Serf message (type byte and msgpack) inside a memberlist user message.
                let Some(body) = input.chunk() else { break };
                let packet = Message::User(body.to_vec()).to_bytes();
                let _ = member.handle_packet(now, peer(op / 8), &packet);
            }
            2 => {
                // A raw stream, in two pieces, then closed.
                let Some(bytes) = input.chunk() else { break };
                let stream = member.handle_accept(now, peer(op / 8));
                let (a, b) = bytes.split_at(bytes.len() / 2);
                member.handle_stream(now, stream, StreamInput::Data(a));
                member.handle_stream(now, stream, StreamInput::Data(b));
                member.handle_stream(now, stream, StreamInput::Closed);
            }
            3 => {
                // A push-pull with nodes and Serf state from the input.
                let (Some(names), Some(user_state)) = (input.chunk(), input.chunk()) else {
                    break;
                };
                let message = encode_stream(
                    &StreamMessage::PushPull(PushPull {
                        join: op & 8 != 0,
                        nodes: nodes(names),
                        user_state: user_state.to_vec(),
                    }),
                    op & 16 != 0,
                );
                let stream = member.handle_accept(now, peer(op / 8));
                member.handle_stream(now, stream, StreamInput::Data(&message));
            }
            4 => {
                let Some(step) = input.byte() else { break };
                now += Duration::from_millis(u64::from(step) * 250);
                member.handle_timeout(now);
            }
            5 => {
                let Some(payload) = input.chunk() else { break };
                let _ = member.user_event(now, "fuzz", payload, op & 8 != 0);
            }
            6 => {
                let Some(payload) = input.chunk() else { break };
                let _ = member.query(now, "fuzz", payload, &QueryParams::default());
            }
            _ => {
                let Some(step) = input.byte() else { break };
                now += Duration::from_secs(u64::from(step) * 60);
                member.handle_timeout(now);
            }
        }
        while member.poll_transmit().is_some() {}
        while member.poll_event().is_some() {}
        assert!(member.memberlist().num_members() <= MAX_NODES);
        assert!(member.members().count() <= 2 * MAX_NODES);
        assert!(member.poll_timeout().is_none_or(|at| at >= start));
    }
});
