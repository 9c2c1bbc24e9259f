//! TCP streams: push-pull state exchange for join and anti-entropy (ml/net.go
//! `sendLocalState`, `readRemoteState`, `mergeRemoteState`; ml/state.go `mergeState`,
//! `verifyProtocol`), the TCP fallback ping, and stream user messages. One exchange per
//! stream; the core closes every stream after `tcp_timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::debug;

use super::timer::Timer;
use super::{
    Delegate, Event, JoinId, Memberlist, Node, NodeState, StreamId, StreamInput, Transmit,
};
use crate::wire::memberlist::{
    AckResp, Alive, Dead, ErrResp, NodeStateKind, PushNodeState, Suspect,
};
use crate::wire::stream::{decode_stream, encode_stream, PushPull, StreamMessage};

/// What a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamPurpose {
    /// Accepted from a peer: we answer whatever it sends first.
    Inbound,
    /// Our push-pull, maybe for a join.
    PushPull { join: Option<JoinId> },
    /// Our TCP fallback ping.
    TcpPing { seq_no: u32 },
}

/// Streams up to this size are decoded on every read.
const EAGER_DECODE_BYTES: usize = 64 * 1024;
/// A large stream whose reads stopped is decoded after this pause.
const DECODE_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub(crate) struct Stream {
    peer: SocketAddr,
    purpose: StreamPurpose,
    buffer: Vec<u8>,
    /// Buffer length at the last decode attempt.
    tried_at: usize,
    retry_pending: bool,
}

/// A join in progress.
#[derive(Debug, Clone)]
pub(crate) struct JoinProgress {
    pub(crate) pending: usize,
    pub(crate) contacted: usize,
    pub(crate) errors: Vec<(SocketAddr, String)>,
}

impl Memberlist {
    pub(crate) fn accept_stream(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.new_stream(now, from, StreamPurpose::Inbound)
    }

    /// Asks the driver to dial `to` and registers the stream.
    pub(crate) fn open_stream(
        &mut self,
        now: Instant,
        to: SocketAddr,
        purpose: StreamPurpose,
    ) -> StreamId {
        let stream = self.new_stream(now, to, purpose);
        self.transmits
            .push_back(Transmit::StreamOpen { stream, to });
        stream
    }

    fn new_stream(&mut self, now: Instant, peer: SocketAddr, purpose: StreamPurpose) -> StreamId {
        self.next_stream += 1;
        let stream = StreamId(self.next_stream);
        self.streams.insert(
            stream,
            Stream {
                peer,
                purpose,
                buffer: Vec::new(),
                tried_at: 0,
                retry_pending: false,
            },
        );
        self.timers
            .set(now + self.config.tcp_timeout, Timer::Stream { stream });
        stream
    }

    pub(crate) fn write_stream(&mut self, stream: StreamId, message: &StreamMessage) {
        let bytes = encode_stream(message, self.config.enable_compression);
        self.transmits
            .push_back(Transmit::StreamWrite { stream, bytes });
    }

    /// Closes a stream from our side and forgets it.
    pub(crate) fn close_stream(&mut self, stream: StreamId) {
        if self.streams.remove(&stream).is_some() {
            self.transmits.push_back(Transmit::StreamClose { stream });
        }
    }

    /// Starts a push-pull with `to` (for a join when `join` is set).
    pub(crate) fn open_push_pull(
        &mut self,
        now: Instant,
        to: SocketAddr,
        join: Option<JoinId>,
        delegate: &mut dyn Delegate,
    ) {
        debug!(peer = %to, join = join.is_some(), "starting push-pull");
        let stream = self.open_stream(now, to, StreamPurpose::PushPull { join });
        let local_state = self.local_push_pull(join.is_some(), delegate);
        self.write_stream(stream, &local_state);
    }

    /// The anti-entropy round: push-pull with one random alive member.
    pub(crate) fn periodic_push_pull(&mut self, now: Instant, delegate: &mut dyn Delegate) {
        let local = self.local_name.clone();
        let peers = self.nodes.random(1, &mut self.rng, |entry| {
            entry.name != local && entry.state == NodeState::Alive
        });
        if let Some(peer) = peers.into_iter().next() {
            self.open_push_pull(now, peer.addr, None, delegate);
        }
    }

    fn local_push_pull(&mut self, join: bool, delegate: &mut dyn Delegate) -> StreamMessage {
        let nodes = self
            .nodes
            .iter()
            .map(|entry| PushNodeState {
                name: entry.name.clone(),
                addr: entry.addr_bytes.clone(),
                port: entry.addr.port(),
                meta: entry.meta.clone(),
                incarnation: entry.incarnation,
                state: match entry.state {
                    NodeState::Alive => NodeStateKind::Alive,
                    NodeState::Suspect => NodeStateKind::Suspect,
                    NodeState::Dead => NodeStateKind::Dead,
                    NodeState::Left => NodeStateKind::Left,
                }
                .to_wire(),
                vsn: entry.vsn_bytes.clone(),
            })
            .collect();
        StreamMessage::PushPull(PushPull {
            join,
            nodes,
            user_state: delegate.local_state(join),
        })
    }

    pub(crate) fn stream_input(
        &mut self,
        now: Instant,
        stream: StreamId,
        input: StreamInput<'_>,
        delegate: &mut dyn Delegate,
    ) {
        let Some(state) = self.streams.get_mut(&stream) else {
            return;
        };
        match input {
            StreamInput::Data(bytes) => {
                state.buffer.extend_from_slice(bytes);
                // Streams carry no length, so a whole message is recognised by decoding.
                // Small buffers are decoded on every read; large ones only after growing by a
                // quarter (or shortly after the reads stop), so a slow multi-megabyte stream
                // costs linear, not quadratic, decoding work.
                let len = state.buffer.len();
                if len <= EAGER_DECODE_BYTES || len >= state.tried_at + state.tried_at / 4 {
                    self.try_decode(now, stream, delegate);
                } else if !state.retry_pending {
                    state.retry_pending = true;
                    self.timers
                        .set(now + DECODE_RETRY, Timer::StreamDecode { stream });
                }
            }
            StreamInput::Closed => {
                if state.buffer.len() > state.tried_at {
                    self.try_decode(now, stream, delegate);
                }
                if self.streams.contains_key(&stream) {
                    self.fail_stream(stream, "stream closed before a complete message".into());
                }
            }
            StreamInput::Failed(reason) => self.fail_stream(stream, reason.to_owned()),
        }
        self.collect_finished();
    }

    /// The decode retry timer of a large stream fired.
    pub(crate) fn stream_decode_due(
        &mut self,
        now: Instant,
        stream: StreamId,
        delegate: &mut dyn Delegate,
    ) {
        let Some(state) = self.streams.get_mut(&stream) else {
            return;
        };
        state.retry_pending = false;
        if state.buffer.len() > state.tried_at {
            self.try_decode(now, stream, delegate);
        }
    }

    /// Decodes the stream's buffer; handles a whole message or a decode error.
    fn try_decode(&mut self, now: Instant, stream: StreamId, delegate: &mut dyn Delegate) {
        let Some(state) = self.streams.get_mut(&stream) else {
            return;
        };
        state.tried_at = state.buffer.len();
        let (peer, purpose) = (state.peer, state.purpose);
        match decode_stream(&state.buffer) {
            Ok(None) => {}
            Ok(Some((message, _consumed))) => {
                self.stream_message(now, stream, peer, purpose, message, delegate);
            }
            Err(error) => {
                self.stats.stream_errors += 1;
                debug!(%peer, %error, "dropping undecodable stream");
                if purpose == StreamPurpose::Inbound {
                    let reply = StreamMessage::Err(ErrResp {
                        error: error.to_string(),
                    });
                    self.write_stream(stream, &reply);
                }
                self.fail_stream(stream, format!("undecodable reply: {error}"));
            }
        }
    }

    fn stream_message(
        &mut self,
        now: Instant,
        stream: StreamId,
        peer: SocketAddr,
        purpose: StreamPurpose,
        message: StreamMessage,
        delegate: &mut dyn Delegate,
    ) {
        match (purpose, message) {
            (StreamPurpose::Inbound, StreamMessage::PushPull(remote)) => {
                let reply = self.local_push_pull(remote.join, delegate);
                self.write_stream(stream, &reply);
                self.close_stream(stream);
                if let Err(reason) = self.merge_remote_state(now, &remote, delegate) {
                    debug!(peer = %peer, %reason, "push-pull merge refused");
                }
            }
            (StreamPurpose::Inbound, StreamMessage::Ping(ping)) => {
                if ping.node.is_empty() || ping.node == self.local_name {
                    let ack = StreamMessage::Ack(AckResp {
                        seq_no: ping.seq_no,
                        payload: Vec::new(),
                    });
                    self.write_stream(stream, &ack);
                } else {
                    debug!(peer = %peer, node = %ping.node, "tcp ping for another node");
                }
                self.close_stream(stream);
            }
            (StreamPurpose::Inbound, StreamMessage::User(payload)) => {
                self.close_stream(stream);
                delegate.notify_user_msg(&payload);
            }
            (StreamPurpose::PushPull { join }, StreamMessage::PushPull(remote)) => {
                self.close_stream(stream);
                let result = self.merge_remote_state(now, &remote, delegate);
                if let Some(join) = join {
                    self.join_result(join, peer, result);
                }
            }
            (StreamPurpose::TcpPing { seq_no }, StreamMessage::Ack(ack)) => {
                self.close_stream(stream);
                if ack.seq_no == seq_no {
                    self.tcp_ping_acked(stream, seq_no);
                }
            }
            (_, StreamMessage::Err(err)) => {
                // The peer's text is kept only in part: it ends up in join errors and logs.
                let mut end = err.error.len().min(256);
                while !err.error.is_char_boundary(end) {
                    end -= 1;
                }
                self.fail_stream(stream, format!("peer error: {}", &err.error[..end]));
            }
            (purpose, message) => {
                self.stats.stream_errors += 1;
                debug!(peer = %peer, ?purpose, kind = message.kind(), "unexpected stream message");
                self.fail_stream(stream, "unexpected stream message".into());
            }
        }
    }

    /// The stream failed or timed out: close it and tell whoever waited for it.
    fn fail_stream(&mut self, stream: StreamId, reason: String) {
        let Some((peer, purpose)) = self
            .streams
            .get(&stream)
            .map(|state| (state.peer, state.purpose))
        else {
            return;
        };
        self.close_stream(stream);
        debug!(%peer, %reason, "stream failed");
        if let StreamPurpose::PushPull { join: Some(join) } = purpose {
            self.join_result(join, peer, Err(reason));
        }
    }

    pub(crate) fn stream_timed_out(
        &mut self,
        _now: Instant,
        stream: StreamId,
        _delegate: &mut dyn Delegate,
    ) {
        let timeout = self.config.tcp_timeout;
        self.fail_stream(stream, format!("timed out after {timeout:?}"));
    }

    fn join_result(&mut self, join: JoinId, peer: SocketAddr, result: Result<(), String>) {
        if let Some(progress) = self.joins.get_mut(&join) {
            progress.pending = progress.pending.saturating_sub(1);
            match result {
                Ok(()) => progress.contacted += 1,
                Err(reason) => progress.errors.push((peer, reason)),
            }
        }
        self.finish_join_if_done(join);
    }

    pub(crate) fn finish_join_if_done(&mut self, join: JoinId) {
        if self
            .joins
            .get(&join)
            .is_some_and(|progress| progress.pending == 0)
        {
            let progress = self.joins.remove(&join).expect("checked above");
            debug!(
                contacted = progress.contacted,
                errors = progress.errors.len(),
                "join finished"
            );
            self.events.push_back(Event::JoinCompleted {
                join,
                contacted: progress.contacted,
                errors: progress.errors,
            });
        }
    }

    /// Merges a remote push-pull (ml/net.go `mergeRemoteState`): protocol check, delegate
    /// veto, node states, then the user state.
    fn merge_remote_state(
        &mut self,
        now: Instant,
        remote: &PushPull,
        delegate: &mut dyn Delegate,
    ) -> Result<(), String> {
        if let Err(reason) = self.verify_protocol(&remote.nodes) {
            self.stats.merges_refused += 1;
            return Err(reason);
        }
        let nodes: Vec<Node> = remote
            .nodes
            .iter()
            .filter_map(|state| {
                let ip = super::ip_from_bytes(&state.addr)?;
                Some(Node {
                    name: state.name.clone(),
                    addr: SocketAddr::new(ip, state.port),
                    meta: state.meta.clone(),
                    vsn: super::Vsn(<[u8; 6]>::try_from(state.vsn.as_slice()).unwrap_or([0; 6])),
                    state: match NodeStateKind::from_wire(state.state) {
                        Some(NodeStateKind::Suspect) => NodeState::Suspect,
                        Some(NodeStateKind::Dead) => NodeState::Dead,
                        Some(NodeStateKind::Left) => NodeState::Left,
                        _ => NodeState::Alive,
                    },
                    incarnation: super::Incarnation(state.incarnation),
                })
            })
            .collect();
        if let Err(reason) = delegate.notify_merge(&nodes) {
            self.stats.merges_refused += 1;
            return Err(format!("merge refused by delegate: {reason}"));
        }
        for state in &remote.nodes {
            match NodeStateKind::from_wire(state.state) {
                Some(NodeStateKind::Alive) => {
                    let alive = Alive {
                        incarnation: state.incarnation,
                        node: state.name.clone(),
                        addr: state.addr.clone(),
                        port: state.port,
                        meta: state.meta.clone(),
                        vsn: state.vsn.clone(),
                    };
                    self.alive_node(now, alive, false);
                }
                Some(NodeStateKind::Left) => {
                    let dead = Dead {
                        incarnation: state.incarnation,
                        node: state.name.clone(),
                        from: state.name.clone(),
                    };
                    self.dead_node(now, dead);
                }
                Some(NodeStateKind::Dead | NodeStateKind::Suspect) => {
                    // Remote dead is only a suspicion here: the member gets to refute it.
                    let suspect = Suspect {
                        incarnation: state.incarnation,
                        node: state.name.clone(),
                        from: self.local_name.clone(),
                    };
                    self.suspect_node(now, suspect);
                }
                None => {
                    debug!(node = %state.name, state = state.state, "unknown node state in push-pull")
                }
            }
        }
        if !remote.user_state.is_empty() {
            delegate.merge_remote_state(&remote.user_state, remote.join);
        }
        self.stats.merges += 1;
        Ok(())
    }

    /// Every alive member's current versions must lie within the range all alive members
    /// support (ml/state.go `verifyProtocol`).
    fn verify_protocol(&self, remote: &[PushNodeState]) -> Result<(), String> {
        let six = |vsn: &[u8]| <[u8; 6]>::try_from(vsn).ok();
        let mut p_low = 0u8;
        let mut p_high = u8::MAX;
        let mut d_low = 0u8;
        let mut d_high = u8::MAX;
        let remote_alive = remote
            .iter()
            .filter(|state| state.state == NodeStateKind::Alive.to_wire())
            .filter_map(|state| six(&state.vsn));
        let local_alive = self
            .nodes
            .iter()
            .filter(|entry| entry.state == NodeState::Alive)
            .map(|entry| entry.vsn().0);
        for vsn in remote_alive.chain(local_alive) {
            p_low = p_low.max(vsn[0]);
            p_high = p_high.min(vsn[1]);
            d_low = d_low.max(vsn[3]);
            d_high = d_high.min(vsn[4]);
        }
        let remote_current = remote
            .iter()
            .map(|state| (state.name.as_str(), six(&state.vsn).unwrap_or([0; 6])));
        let local_current = self
            .nodes
            .iter()
            .map(|entry| (entry.name.as_str(), entry.vsn().0));
        for (name, vsn) in remote_current.chain(local_current) {
            if vsn[2] < p_low || vsn[2] > p_high {
                return Err(format!(
                    "node {name:?} protocol version ({}) is incompatible: [{p_low}, {p_high}]",
                    vsn[2]
                ));
            }
            if vsn[5] < d_low || vsn[5] > d_high {
                return Err(format!(
                    "node {name:?} delegate protocol version ({}) is incompatible: [{d_low}, {d_high}]",
                    vsn[5]
                ));
            }
        }
        Ok(())
    }
}
