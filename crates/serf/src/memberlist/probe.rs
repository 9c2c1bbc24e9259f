//! The probe loop (ml/state.go `probe`, `probeNode`) and the ping, indirect ping, ack and nack
//! handlers (ml/net.go). One probe at a time: direct ping, then after `probe_timeout` indirect
//! pings through `indirect_checks` members (asking for nacks from peers with PMax ≥ 4) and a
//! TCP ping (PMax ≥ 3); at the end of the scaled probe interval, no ack means suspect.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::debug;

use super::push_pull::StreamPurpose;
use super::timer::Timer;
use super::{ip_bytes, ip_from_bytes, Delegate, Memberlist, NodeState, StreamId};
use crate::wire::memberlist::{AckResp, IndirectPingReq, Message, NackResp, Ping, Suspect};

/// The probe in flight.
#[derive(Debug, Clone)]
pub(crate) struct ActiveProbe {
    pub(crate) seq_no: u32,
    pub(crate) target: String,
    pub(crate) sent: Instant,
    /// Whether the direct-ack window (`probe_timeout`) is over.
    pub(crate) indirect: bool,
    pub(crate) expected_nacks: usize,
    pub(crate) nacks: usize,
    pub(crate) tcp_stream: Option<StreamId>,
    pub(crate) tcp_contacted: bool,
}

/// An indirect ping we relay for another member.
#[derive(Debug, Clone)]
pub(crate) struct Relay {
    /// The requester's sequence number, used in our ack or nack to it.
    pub(crate) seq_no: u32,
    pub(crate) reply_to: SocketAddr,
    pub(crate) nack: bool,
}

impl Memberlist {
    /// A probe tick: picks the next member in the shuffled order and pings it.
    pub(crate) fn start_probe(&mut self, now: Instant, delegate: &mut dyn Delegate) {
        if self.probe.is_some() {
            return;
        }
        let mut checked = 0;
        let target = loop {
            if checked >= self.nodes.len() {
                return;
            }
            if self.probe_index >= self.nodes.len() {
                let keep_dead = self.config.gossip_to_the_dead_time;
                let local = self.local_name.clone();
                self.nodes.reset(now, keep_dead, &local, &mut self.rng);
                self.probe_index = 0;
                checked += 1;
                continue;
            }
            let entry = self.nodes.at(self.probe_index).cloned();
            self.probe_index += 1;
            match entry {
                Some(entry) if entry.name != self.local_name && !entry.is_dead_or_left() => {
                    break entry
                }
                _ => checked += 1,
            }
        };
        let seq_no = self.next_seq_no();
        let ping = self.ping_for(seq_no, &target.name);
        let scaled_interval = self.awareness.scale(self.config.probe_interval);
        self.probe = Some(ActiveProbe {
            seq_no,
            target: target.name.clone(),
            sent: now,
            indirect: false,
            expected_nacks: 0,
            nacks: 0,
            tcp_stream: None,
            tcp_contacted: false,
        });
        self.timers.set(
            now + self.config.probe_timeout,
            Timer::ProbeTimeout { seq_no },
        );
        self.timers
            .set(now + scaled_interval, Timer::ProbeDeadline { seq_no });
        debug!(node = %target.name, seq_no, "probing");
        if target.state == NodeState::Alive {
            self.send_message(target.addr, Message::Ping(ping).to_bytes(), delegate);
        } else {
            // A suspect gets the accusation with the ping, so it can refute at once.
            let suspect = Suspect {
                incarnation: target.incarnation,
                node: target.name.clone(),
                from: self.local_name.clone(),
            };
            let packet = crate::wire::memberlist::compound(&[
                Message::Ping(ping).to_bytes(),
                Message::Suspect(suspect).to_bytes(),
            ]);
            self.send_raw(target.addr, Some(target.vsn().pmax()), packet);
        }
    }

    fn ping_for(&self, seq_no: u32, node: &str) -> Ping {
        Ping {
            seq_no,
            node: node.to_owned(),
            source_addr: ip_bytes(self.local_addr.ip()),
            source_port: self.local_addr.port(),
            source_node: self.local_name.clone(),
        }
    }

    /// No direct ack in time: indirect pings and a TCP ping.
    pub(crate) fn probe_timeout(&mut self, now: Instant, seq_no: u32, delegate: &mut dyn Delegate) {
        let Some(probe) = self.probe.as_mut().filter(|probe| probe.seq_no == seq_no) else {
            return;
        };
        probe.indirect = true;
        let target_name = probe.target.clone();
        let Some(target) = self.nodes.get(&target_name).cloned() else {
            return;
        };
        debug!(node = %target.name, seq_no, "no direct ack, probing indirectly");
        let local = self.local_name.clone();
        let helpers = self
            .nodes
            .random(self.config.indirect_checks, &mut self.rng, |entry| {
                entry.name != local && entry.name != target.name && entry.state == NodeState::Alive
            });
        let mut expected_nacks = 0;
        for helper in helpers {
            let nack = helper.vsn().pmax() >= 4;
            expected_nacks += usize::from(nack);
            let request = IndirectPingReq {
                seq_no,
                target: target.addr_bytes.clone(),
                port: target.addr.port(),
                node: target.name.clone(),
                nack,
                source_addr: ip_bytes(self.local_addr.ip()),
                source_port: self.local_addr.port(),
                source_node: self.local_name.clone(),
            };
            self.send_message(
                helper.addr,
                Message::IndirectPing(request).to_bytes(),
                delegate,
            );
        }
        let tcp = !self.config.disable_tcp_pings && target.vsn().pmax() >= 3;
        let tcp_stream = tcp.then(|| {
            let ping = self.ping_for(seq_no, &target.name);
            self.open_tcp_ping(now, target.addr, ping)
        });
        if let Some(probe) = self.probe.as_mut() {
            probe.expected_nacks = expected_nacks;
            probe.tcp_stream = tcp_stream;
        }
    }

    /// End of the probe interval without an ack: suspect, unless the TCP ping got through.
    pub(crate) fn probe_deadline(&mut self, now: Instant, seq_no: u32) {
        let Some(probe) = self.probe.take_if(|probe| probe.seq_no == seq_no) else {
            return;
        };
        if let Some(stream) = probe.tcp_stream {
            self.close_stream(stream);
        }
        if probe.tcp_contacted {
            debug!(node = %probe.target, "tcp ping succeeded where udp failed; network may be misconfigured");
            self.awareness.apply_delta(-1);
            return;
        }
        let delta = if probe.expected_nacks > 0 {
            probe.expected_nacks.saturating_sub(probe.nacks) as i64
        } else {
            1
        };
        self.awareness.apply_delta(delta);
        let Some(target) = self.nodes.get(&probe.target) else {
            return;
        };
        debug!(node = %probe.target, "no acks received, suspecting");
        let suspect = Suspect {
            incarnation: target.incarnation,
            node: probe.target.clone(),
            from: self.local_name.clone(),
        };
        self.suspect_node(now, suspect);
    }

    /// The ack for our probe arrived (by UDP, relayed, or on the TCP ping stream).
    pub(crate) fn probe_acked(
        &mut self,
        now: Instant,
        seq_no: u32,
        payload: &[u8],
        delegate: &mut dyn Delegate,
    ) -> bool {
        let Some(probe) = self.probe.take_if(|probe| probe.seq_no == seq_no) else {
            return false;
        };
        if let Some(stream) = probe.tcp_stream {
            self.close_stream(stream);
        }
        self.awareness.apply_delta(-1);
        if !probe.indirect {
            if let Some(target) = self.nodes.get(&probe.target) {
                let node = target.to_node();
                delegate.notify_ping_complete(
                    &node,
                    now.saturating_duration_since(probe.sent),
                    payload,
                );
            }
        }
        true
    }

    pub(crate) fn handle_ping(
        &mut self,
        _now: Instant,
        from: SocketAddr,
        ping: Ping,
        delegate: &mut dyn Delegate,
    ) {
        if !ping.node.is_empty() && ping.node != self.local_name {
            debug!(peer = %from, node = %ping.node, "ping for another node");
            return;
        }
        let ack = AckResp {
            seq_no: ping.seq_no,
            payload: delegate.ack_payload(),
        };
        let to = reply_address(&ping.source_addr, ping.source_port, from);
        self.send_message(to, Message::Ack(ack).to_bytes(), delegate);
    }

    pub(crate) fn handle_indirect_ping(
        &mut self,
        now: Instant,
        from: SocketAddr,
        mut request: IndirectPingReq,
        delegate: &mut dyn Delegate,
    ) {
        if request.port == 0 {
            request.port = self.local_addr.port();
        }
        let Some(target_ip) = ip_from_bytes(&request.target) else {
            debug!(peer = %from, target = ?request.target, "indirect ping with a bad target");
            return;
        };
        let local_seq_no = self.next_seq_no();
        let reply_to = reply_address(&request.source_addr, request.source_port, from);
        self.relays.insert(
            local_seq_no,
            Relay {
                seq_no: request.seq_no,
                reply_to,
                nack: request.nack,
            },
        );
        self.timers.set(
            now + self.config.probe_timeout,
            Timer::RelayExpired {
                seq_no: local_seq_no,
            },
        );
        let ping = self.ping_for(local_seq_no, &request.node);
        self.send_message(
            SocketAddr::new(target_ip, request.port),
            Message::Ping(ping).to_bytes(),
            delegate,
        );
    }

    pub(crate) fn handle_ack(&mut self, now: Instant, ack: AckResp, delegate: &mut dyn Delegate) {
        if self.probe_acked(now, ack.seq_no, &ack.payload, delegate) {
            return;
        }
        if let Some(relay) = self.relays.remove(&ack.seq_no) {
            let ack = AckResp {
                seq_no: relay.seq_no,
                payload: Vec::new(),
            };
            self.send_message(relay.reply_to, Message::Ack(ack).to_bytes(), delegate);
        }
    }

    pub(crate) fn handle_nack(&mut self, nack: NackResp) {
        if let Some(probe) = self
            .probe
            .as_mut()
            .filter(|probe| probe.seq_no == nack.seq_no)
        {
            probe.nacks += 1;
        }
    }

    /// A relayed ping got no ack within the probe timeout: nack if asked to.
    pub(crate) fn relay_expired(
        &mut self,
        _now: Instant,
        seq_no: u32,
        delegate: &mut dyn Delegate,
    ) {
        let Some(relay) = self.relays.remove(&seq_no) else {
            return;
        };
        if relay.nack {
            let nack = NackResp {
                seq_no: relay.seq_no,
            };
            self.send_message(relay.reply_to, Message::Nack(nack).to_bytes(), delegate);
        }
    }

    /// The TCP ping of the current probe was answered.
    pub(crate) fn tcp_ping_acked(&mut self, stream: StreamId, seq_no: u32) {
        if let Some(probe) = self
            .probe
            .as_mut()
            .filter(|probe| probe.seq_no == seq_no && probe.tcp_stream == Some(stream))
        {
            probe.tcp_contacted = true;
        }
    }

    fn open_tcp_ping(&mut self, now: Instant, to: SocketAddr, ping: Ping) -> StreamId {
        let seq_no = ping.seq_no;
        let stream = self.open_stream(now, to, StreamPurpose::TcpPing { seq_no });
        self.write_stream(stream, &crate::wire::stream::StreamMessage::Ping(ping));
        stream
    }
}

/// Where to answer: the message's source address and port when both are set, else the
/// packet's source.
pub(crate) fn reply_address(addr: &[u8], port: u16, from: SocketAddr) -> SocketAddr {
    match ip_from_bytes(addr) {
        Some(ip) if port > 0 => SocketAddr::new(ip, port),
        _ => from,
    }
}
