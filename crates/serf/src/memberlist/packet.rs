//! UDP packets in and out: dispatch of decoded messages, piggybacking of broadcasts,
//! compression and CRC (ml/net.go `handleCommand`, `sendMsg`, `rawSendMsgPacket`), and the
//! gossip round (ml/state.go `gossip`).

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, trace};

use super::{Delegate, Memberlist, NodeState, Transmit};
use crate::wire::memberlist::{
    compound, compress, decode_packet, kind, with_crc, Message, COMPOUND_HEADER_OVERHEAD,
    COMPOUND_PART_OVERHEAD, MAX_COMPOUND_PARTS,
};
use crate::wire::DecodeError;

/// The `08` byte the core prepends to each delegate broadcast.
const USER_MSG_OVERHEAD: usize = 1;

impl Memberlist {
    pub(crate) fn ingest_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        delegate: &mut dyn Delegate,
    ) -> Result<(), DecodeError> {
        let mut messages = Vec::new();
        let result = decode_packet(packet, &mut messages);
        if let Err(error) = &result {
            self.stats.packet_decode_errors += 1;
            debug!(peer = %from, %error, "dropping undecodable packet content");
        }
        for message in messages {
            trace!(peer = %from, ?message, "packet message");
            self.handle_message(now, from, message, delegate);
        }
        self.collect_finished();
        result
    }

    fn handle_message(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: Message,
        delegate: &mut dyn Delegate,
    ) {
        match message {
            Message::Ping(ping) => self.handle_ping(now, from, ping, delegate),
            Message::IndirectPing(request) => {
                self.handle_indirect_ping(now, from, request, delegate)
            }
            Message::Ack(ack) => self.handle_ack(now, ack, delegate),
            Message::Nack(nack) => self.handle_nack(nack),
            Message::Suspect(suspect) => self.suspect_node(now, suspect),
            Message::Alive(alive) => self.alive_node(now, alive, false),
            Message::Dead(dead) => self.dead_node(now, dead),
            Message::User(payload) => delegate.notify_user_msg(&payload),
            Message::Err(err) => {
                debug!(peer = %from, error = %err.error, "error message from peer")
            }
        }
    }

    /// Sends `message` to `to`, piggybacking as many queued broadcasts as fit
    /// (ml/net.go `sendMsg`).
    pub(crate) fn send_message(
        &mut self,
        to: SocketAddr,
        message: Vec<u8>,
        delegate: &mut dyn Delegate,
    ) {
        let available = self
            .config
            .udp_buffer_size
            .saturating_sub(message.len() + COMPOUND_HEADER_OVERHEAD + self.config.packet_overhead);
        let extra = self.take_broadcasts(COMPOUND_PART_OVERHEAD, available, delegate);
        if extra.is_empty() {
            self.send_raw(to, None, message);
        } else {
            let mut parts = Vec::with_capacity(extra.len() + 1);
            parts.push(message);
            parts.extend(extra);
            self.send_parts(to, None, parts);
        }
    }

    /// Broadcasts to piggyback: memberlist's queue first, then the delegate's
    /// (ml/broadcast.go `getBroadcasts`).
    pub(crate) fn take_broadcasts(
        &mut self,
        overhead: usize,
        limit: usize,
        delegate: &mut dyn Delegate,
    ) -> Vec<Vec<u8>> {
        let n = self.nodes.len();
        let mut messages = self.broadcasts.get_broadcasts(overhead, limit, n);
        let used: usize = messages.iter().map(|m| m.len() + overhead).sum();
        let available = limit.saturating_sub(used);
        if available > overhead + USER_MSG_OVERHEAD {
            for user in delegate.broadcasts(overhead + USER_MSG_OVERHEAD, available) {
                let mut message = Vec::with_capacity(user.len() + 1);
                message.push(kind::USER);
                message.extend_from_slice(&user);
                messages.push(message);
            }
        }
        messages
    }

    /// Sends `parts` as one packet: bare if there is one, else compounds of at most 255.
    fn send_parts(&mut self, to: SocketAddr, pmax: Option<u8>, parts: Vec<Vec<u8>>) {
        if parts.len() == 1 {
            let part = parts.into_iter().next().expect("one part");
            self.send_raw(to, pmax, part);
            return;
        }
        for chunk in parts.chunks(MAX_COMPOUND_PARTS) {
            self.send_raw(to, pmax, compound(chunk));
        }
    }

    /// Compresses when enabled and smaller, adds a CRC for peers with `pmax >= 5`
    /// (ml/net.go `rawSendMsgPacket`), and queues the packet.
    pub(crate) fn send_raw(&mut self, to: SocketAddr, pmax: Option<u8>, mut packet: Vec<u8>) {
        if self.config.enable_compression {
            let compressed = compress(&packet);
            if compressed.len() < packet.len() {
                packet = compressed;
            }
        }
        if self.config.enable_crc && pmax.is_some_and(|pmax| pmax >= 5) {
            packet = with_crc(&packet);
        }
        trace!(peer = %to, len = packet.len(), "sending packet");
        self.transmits
            .push_back(Transmit::Packet { to, bytes: packet });
    }

    /// One gossip round: queued broadcasts to a few random live (or recently dead) members.
    pub(crate) fn gossip(&mut self, now: Instant, delegate: &mut dyn Delegate) {
        let local = self.local_name.clone();
        let to_the_dead = self.config.gossip_to_the_dead_time;
        let targets = self
            .nodes
            .random(self.config.gossip_nodes, &mut self.rng, |entry| {
                entry.name != local
                    && match entry.state {
                        NodeState::Alive | NodeState::Suspect => true,
                        NodeState::Dead => {
                            now.saturating_duration_since(entry.state_change) <= to_the_dead
                        }
                        NodeState::Left => false,
                    }
            });
        let limit = self
            .config
            .udp_buffer_size
            .saturating_sub(COMPOUND_HEADER_OVERHEAD + self.config.packet_overhead);
        for target in targets {
            let messages = self.take_broadcasts(COMPOUND_PART_OVERHEAD, limit, delegate);
            if messages.is_empty() {
                return;
            }
            self.send_parts(target.addr, Some(target.vsn().pmax()), messages);
        }
    }
}
