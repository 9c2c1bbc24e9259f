//! Memberlist: SWIM gossip membership with Lifeguard, wire-compatible with hashicorp/memberlist
//! 0.2.2 (the layer under Go Serf).
//!
//! # Shape
//!
//! [`Memberlist`] is a sans-IO state machine: a plain value with no sockets, no clock and no
//! global RNG (a seeded `StdRng` and every `now` come in as arguments). Inputs are `handle_*`
//! calls and commands; outputs are pulled with `poll_*`:
//!
//! | input | what |
//! |---|---|
//! | [`Memberlist::handle_packet`] | one UDP datagram from `from` (already decrypted) |
//! | [`Memberlist::handle_accept`] | the driver accepted a TCP connection; returns its [`StreamId`] |
//! | [`Memberlist::handle_stream`] | bytes read from a stream, its EOF, or its failure ([`StreamInput`]); for accepted streams and streams we asked to open |
//! | [`Memberlist::handle_timeout`] | the deadline from [`Memberlist::poll_timeout`] passed |
//! | [`Memberlist::join`], [`Memberlist::leave`], [`Memberlist::update_meta`], [`Memberlist::send_user`] | commands |
//!
//! | output | what |
//! |---|---|
//! | [`Memberlist::poll_transmit`] | a [`Transmit`]: a UDP packet, or open / write / close a TCP stream identified by [`StreamId`] |
//! | [`Memberlist::poll_event`] | an [`Event`]: node joined / updated / left (dead by itself) / failed (dead by others), join and leave results, address conflicts |
//! | [`Memberlist::poll_timeout`] | when to call `handle_timeout` next |
//!
//! The driver (see `crate::driver`) owns one UDP socket and one TCP listener on the same
//! `ip:port`, performs the transmits in order, bounds dials (`Config::tcp_timeout`) and stream
//! reads (20 MiB), and decides nothing protocol-wise: the core itself times out every stream
//! after `Config::tcp_timeout` (it emits `StreamClose`).
//!
//! # Plugging in the Serf layer: [`Delegate`]
//!
//! Every input that may need the layer above takes `&mut dyn Delegate` (use [`NoDelegate`] for
//! a bare memberlist). The core calls it synchronously, exactly where Go calls its delegates:
//!
//! - [`Delegate::notify_user_msg`]: a user message (type 8) arrived, by UDP, inside a compound,
//!   or on a stream. The bytes are the Serf message (Serf type byte + msgpack).
//! - [`Delegate::broadcasts`]: called whenever a packet goes out (gossip rounds and every
//!   ping/ack/indirect ping), *after* memberlist's own queue took its share; return whole Serf
//!   messages (without the `08` byte, the core adds it) that fit in `limit` bytes all together,
//!   counting `overhead` extra bytes per message. The Serf layer keeps its own [`BroadcastQueue`]s and calls
//!   [`BroadcastQueue::get_broadcasts`] with [`Memberlist::num_members`].
//! - [`Delegate::local_state`] / [`Delegate::merge_remote_state`]: the push-pull user state (Serf:
//!   `02` + `messagePushPull`), with the `join` flag.
//! - [`Delegate::ack_payload`] / [`Delegate::notify_ping_complete`]: Serf's coordinates on
//!   ping acks; `notify_ping_complete` gets the RTT of a direct probe and the ack's payload.
//! - [`Delegate::notify_merge`]: may veto a push-pull merge (Serf's merge delegate).
//!
//! A layer with timers of its own (Serf's reap, reconnect, query deadlines) composes them with
//! the core's in one [`crate::core::Core`], as [`crate::serf::Serf`] does; drivers run that.
//!
//! Node meta lives in the core: set it in [`LocalNode::meta`] and change it with
//! [`Memberlist::update_meta`] (≤ [`META_MAX_SIZE`] bytes; a larger one is an
//! [`Error::MetaTooLarge`]). Direct user messages (Serf query responses) go out with
//! [`Memberlist::send_user`]. Name conflicts come out as [`Event::Conflict`]. The member table
//! is readable with [`Memberlist::members`] and [`Memberlist::member`].
//!
//! Encryption is not implemented here: the driver is the seam (decrypt before
//! `handle_packet`, encrypt after `poll_transmit`).

mod awareness;
mod broadcast;
mod config;
mod packet;
mod probe;
mod push_pull;
mod state;
mod suspicion;
mod timer;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

pub use broadcast::{BroadcastQueue, BroadcastToken};
pub use config::{push_pull_scale, retransmit_limit, suspicion_timeout, Config};

use awareness::Awareness;
use probe::{ActiveProbe, Relay};
use push_pull::{JoinProgress, Stream};
use state::NodeTable;
use timer::{Timer, Timers};

use crate::wire::DecodeError;

/// The largest node meta Go accepts (`MetaMaxSize`); an alive message with more is ignored.
pub const META_MAX_SIZE: usize = 512;
/// The longest node name accepted from a peer (Serf validates names to 128 characters when
/// asked to, a host name has at most 253; memberlist sets no limit, so a peer could name a
/// node with 60 KiB).
pub const MAX_NODE_NAME_BYTES: usize = 256;
/// The most nodes the table holds, alive or not; alive messages about further new nodes are
/// ignored. With names and meta bounded too, nodes forged by a peer cost at most some tens of
/// MiB, and a cluster of this size is far beyond one LAN gossip pool of sidecars.
pub const MAX_NODES: usize = 1 << 14;

/// A member's incarnation number: bumped by the member itself to refute suspicion or to
/// publish new meta. Never 0 for a live member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Incarnation(pub u32);

/// The six protocol version bytes `[PMin, PMax, PCur, DMin, DMax, DCur]` (memberlist, then
/// delegate = Serf). Always exactly six on the wire: fewer crash a Go agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vsn(pub [u8; 6]);

impl Vsn {
    /// What a native member advertises: memberlist 1..5 speaking 2, Serf 2..5 speaking 5.
    pub const DEFAULT: Self = Self([1, 5, 2, 2, 5, 5]);

    /// Memberlist protocol minimum.
    pub fn pmin(&self) -> u8 {
        self.0[0]
    }
    /// Memberlist protocol maximum (gates TCP pings ≥ 3, nacks ≥ 4, CRC ≥ 5).
    pub fn pmax(&self) -> u8 {
        self.0[1]
    }
    /// Memberlist protocol spoken.
    pub fn pcur(&self) -> u8 {
        self.0[2]
    }
    /// Delegate (Serf) protocol minimum.
    pub fn dmin(&self) -> u8 {
        self.0[3]
    }
    /// Delegate (Serf) protocol maximum.
    pub fn dmax(&self) -> u8 {
        self.0[4]
    }
    /// Delegate (Serf) protocol spoken.
    pub fn dcur(&self) -> u8 {
        self.0[5]
    }
}

impl Default for Vsn {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A member's state in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Answering probes.
    Alive,
    /// Missed a probe; dead unless it refutes before the suspicion timeout.
    Suspect,
    /// Declared dead by another member (Serf: failed).
    Dead,
    /// Declared dead by itself: a graceful leave.
    Left,
}

/// A member as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Unique name.
    pub name: String,
    /// Gossip address (UDP and TCP).
    pub addr: SocketAddr,
    /// Opaque meta (Serf: tags).
    pub meta: Vec<u8>,
    /// Protocol versions.
    pub vsn: Vsn,
    /// Current state.
    pub state: NodeState,
    /// Current incarnation.
    pub incarnation: Incarnation,
}

/// Who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Our unique name (non-empty).
    pub name: String,
    /// The address we advertise (UDP and TCP on the same port).
    pub addr: SocketAddr,
    /// Our meta, at most [`META_MAX_SIZE`] bytes.
    pub meta: Vec<u8>,
    /// Our protocol versions.
    pub vsn: Vsn,
    /// Our first incarnation (≥ 1). A member restarted with the same name may start higher to
    /// avoid a refutation round.
    pub incarnation: Incarnation,
}

impl LocalNode {
    /// A local node with empty meta, default versions and incarnation 1.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
            meta: Vec::new(),
            vsn: Vsn::DEFAULT,
            incarnation: Incarnation(1),
        }
    }
}

/// Identifies one TCP stream between the core and the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// Identifies one [`Memberlist::join`] call in [`Event::JoinCompleted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JoinId(pub u64);

/// Something for the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Send one UDP datagram from the gossip socket.
    Packet {
        /// Destination.
        to: SocketAddr,
        /// The datagram (encrypt here if a keyring is configured).
        bytes: Vec<u8>,
    },
    /// Dial `to` over TCP; report its bytes, EOF or failure with `handle_stream(stream, …)`.
    StreamOpen {
        /// The id the core chose.
        stream: StreamId,
        /// Destination.
        to: SocketAddr,
    },
    /// Write bytes to a stream (after it is open; in order).
    StreamWrite {
        /// Which stream.
        stream: StreamId,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Flush pending writes and close the stream; the core forgets it.
    StreamClose {
        /// Which stream.
        stream: StreamId,
    },
}

/// What happened on a stream, for [`Memberlist::handle_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamInput<'a> {
    /// Bytes read.
    Data(&'a [u8]),
    /// The peer closed its side (EOF).
    Closed,
    /// Dial, read or write failed (the text says why).
    Failed(&'a str),
}

/// Something that happened, for the layer above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member appeared or came back (also emitted once for ourselves at start).
    NodeJoined(Node),
    /// A member's meta changed.
    NodeUpdated(Node),
    /// A member declared itself dead: a graceful leave (Serf: left).
    NodeLeft(Node),
    /// A member was declared dead by others (Serf: failed).
    NodeFailed(Node),
    /// A [`Memberlist::join`] finished: how many seeds completed a push-pull, and why the
    /// others did not.
    JoinCompleted {
        /// Which join.
        join: JoinId,
        /// Seeds that completed the exchange.
        contacted: usize,
        /// Seeds that failed, with the reason.
        errors: Vec<(SocketAddr, String)>,
    },
    /// A [`Memberlist::leave`] finished: `broadcast_sent` is false if the timeout hit first.
    LeaveCompleted {
        /// Whether our dead message went out its full retransmit count.
        broadcast_sent: bool,
    },
    /// An alive message for a known name came from a different address (memberlist's
    /// conflict delegate). `existing` is what the table keeps.
    Conflict {
        /// The member in the table.
        existing: Node,
        /// The claimant.
        other: Node,
    },
}

/// Why a command was refused. None of these change the core's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Node meta above [`META_MAX_SIZE`].
    #[error("node meta is {len} bytes, above the limit of {limit} bytes")]
    MetaTooLarge {
        /// The length given.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// An empty local node name.
    #[error("local node name is empty")]
    EmptyName,
    /// Incarnation 0 is never accepted by other members.
    #[error("local incarnation is 0; it must be at least 1")]
    ZeroIncarnation,
    /// Protocol version bytes that Go rejects.
    #[error("invalid protocol versions {vsn:?}: need 0 < min <= cur <= max")]
    InvalidVsn {
        /// The bytes given.
        vsn: [u8; 6],
    },
    /// The command needs a member that has not left.
    #[error("this member has left the cluster")]
    Left,
    /// A configuration value the core cannot run with.
    #[error("invalid config {field} = {value}: {reason}")]
    InvalidConfig {
        /// The `Config` field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is required.
        reason: &'static str,
    },
}

/// The layer above memberlist (Serf). All methods have no-op defaults.
pub trait Delegate {
    /// A user message arrived (the bytes after memberlist's `08` type byte).
    fn notify_user_msg(&mut self, _message: &[u8]) {}

    /// User broadcasts to piggyback on an outgoing packet: each returned message plus
    /// `overhead` bytes must fit, all together, in `limit` bytes.
    fn broadcasts(&mut self, _overhead: usize, _limit: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }

    /// The user state to send in a push-pull (`join` is true during a join).
    fn local_state(&mut self, _join: bool) -> Vec<u8> {
        Vec::new()
    }

    /// The remote user state received in a push-pull.
    fn merge_remote_state(&mut self, _state: &[u8], _join: bool) {}

    /// The payload of our acks to pings.
    fn ack_payload(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// A direct probe of `node` was acked after `rtt`, with the ack's `payload`.
    fn notify_ping_complete(&mut self, _node: &Node, _rtt: Duration, _payload: &[u8]) {}

    /// A push-pull is about to merge `nodes`; an `Err` cancels the merge (and a join).
    fn notify_merge(&mut self, _nodes: &[Node]) -> Result<(), String> {
        Ok(())
    }
}

/// A delegate that does nothing: a bare memberlist.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDelegate;

impl Delegate for NoDelegate {}

/// Counters of push-pulls merged, and of what was dropped or refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Remote push-pull states merged (both directions).
    pub merges: u64,
    /// Packets (or compound parts) that did not decode.
    pub packet_decode_errors: u64,
    /// Stream messages that did not decode, or came unexpected.
    pub stream_errors: u64,
    /// Push-pull merges refused (protocol versions, delegate veto).
    pub merges_refused: u64,
    /// Times we refuted an accusation about ourselves.
    pub refutes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaveState {
    Member,
    Leaving,
    Left,
}

/// Token of our own dead message during a leave.
const LEAVE_TOKEN: BroadcastToken = BroadcastToken(u64::MAX);

/// The memberlist state machine. See the module docs.
#[derive(Debug)]
pub struct Memberlist {
    config: Config,
    local_name: String,
    local_addr: SocketAddr,
    rng: StdRng,
    nodes: NodeTable,
    seq_no: u32,
    awareness: Awareness,
    broadcasts: BroadcastQueue,
    probe: Option<ActiveProbe>,
    probe_index: usize,
    relays: BTreeMap<u32, Relay>,
    suspicions: BTreeMap<String, suspicion::Suspicion>,
    timers: Timers,
    streams: BTreeMap<StreamId, Stream>,
    next_stream: u64,
    joins: BTreeMap<JoinId, JoinProgress>,
    next_join: u64,
    leave: LeaveState,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Memberlist {
    /// A new member that knows only itself. Emits [`Event::NodeJoined`] for itself and queues
    /// its alive message; starts the probe, gossip and push-pull timers (staggered randomly).
    pub fn new(
        config: Config,
        local: LocalNode,
        mut rng: StdRng,
        now: Instant,
    ) -> Result<Self, Error> {
        config.validate()?;
        if local.name.is_empty() {
            return Err(Error::EmptyName);
        }
        if local.meta.len() > META_MAX_SIZE {
            return Err(Error::MetaTooLarge {
                len: local.meta.len(),
                limit: META_MAX_SIZE,
            });
        }
        if local.incarnation.0 == 0 {
            return Err(Error::ZeroIncarnation);
        }
        let vsn = local.vsn;
        if vsn.pmin() == 0
            || vsn.pmin() > vsn.pcur()
            || vsn.pcur() > vsn.pmax()
            || vsn.dmin() == 0
            || vsn.dmin() > vsn.dcur()
            || vsn.dcur() > vsn.dmax()
        {
            return Err(Error::InvalidVsn { vsn: vsn.0 });
        }
        let mut timers = Timers::default();
        timers.set(now + stagger(&mut rng, config.probe_interval), Timer::Probe);
        if !config.gossip_interval.is_zero() {
            timers.set(
                now + stagger(&mut rng, config.gossip_interval),
                Timer::Gossip,
            );
        }
        if !config.push_pull_interval.is_zero() {
            timers.set(
                now + stagger(&mut rng, config.push_pull_interval),
                Timer::PushPullStagger,
            );
        }
        let mut memberlist = Self {
            awareness: Awareness::new(config.awareness_max_multiplier),
            broadcasts: BroadcastQueue::new(config.retransmit_mult),
            config,
            local_name: local.name.clone(),
            local_addr: local.addr,
            rng,
            nodes: NodeTable::default(),
            seq_no: 0,
            probe: None,
            probe_index: 0,
            relays: BTreeMap::new(),
            suspicions: BTreeMap::new(),
            timers,
            streams: BTreeMap::new(),
            next_stream: 0,
            joins: BTreeMap::new(),
            next_join: 0,
            leave: LeaveState::Member,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        };
        let alive = crate::wire::memberlist::Alive {
            incarnation: local.incarnation.0,
            node: local.name,
            addr: ip_bytes(local.addr.ip()),
            port: local.addr.port(),
            meta: local.meta,
            vsn: local.vsn.0.to_vec(),
        };
        memberlist.alive_node(now, alive, true);
        Ok(memberlist)
    }

    /// Handles one UDP datagram. Every message in it that decodes is handled; the first
    /// decode error is returned (and counted) after that. Never panics on any input.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
        delegate: &mut dyn Delegate,
    ) -> Result<(), DecodeError> {
        self.ingest_packet(now, from, packet, delegate)
    }

    /// The driver accepted a TCP connection from `from`: returns the id to report its bytes
    /// with [`handle_stream`](Self::handle_stream) and to expect in transmits.
    pub fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.accept_stream(now, from)
    }

    /// Bytes, EOF or failure on a stream (accepted, or opened by a `StreamOpen`). Unknown
    /// (already closed) streams are ignored.
    pub fn handle_stream(
        &mut self,
        now: Instant,
        stream: StreamId,
        input: StreamInput<'_>,
        delegate: &mut dyn Delegate,
    ) {
        self.stream_input(now, stream, input, delegate);
    }

    /// Runs every timer due at `now`: probes, gossip, push-pull, suspicion, stream timeouts.
    pub fn handle_timeout(&mut self, now: Instant, delegate: &mut dyn Delegate) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Probe => {
                    self.timers
                        .set(now + self.config.probe_interval, Timer::Probe);
                    self.start_probe(now, delegate);
                }
                Timer::Gossip => {
                    self.timers
                        .set(now + self.config.gossip_interval, Timer::Gossip);
                    self.gossip(now, delegate);
                }
                Timer::PushPullStagger => {
                    let interval =
                        push_pull_scale(self.config.push_pull_interval, self.nodes.len());
                    self.timers.set(now + interval, Timer::PushPull);
                }
                Timer::PushPull => {
                    let interval =
                        push_pull_scale(self.config.push_pull_interval, self.nodes.len());
                    self.timers.set(now + interval, Timer::PushPull);
                    self.periodic_push_pull(now, delegate);
                }
                Timer::ProbeTimeout { seq_no } => self.probe_timeout(now, seq_no, delegate),
                Timer::ProbeDeadline { seq_no } => self.probe_deadline(now, seq_no),
                Timer::RelayExpired { seq_no } => self.relay_expired(now, seq_no, delegate),
                Timer::Suspicion { node } => self.suspicion_expired(now, &node),
                Timer::Stream { stream } => self.stream_timed_out(now, stream, delegate),
                Timer::StreamDecode { stream } => self.stream_decode_due(now, stream, delegate),
                Timer::Leave => self.leave_timed_out(),
            }
        }
        self.collect_finished();
    }

    /// Joins a cluster through `seeds`: a push-pull (join flag set) with each. Reports
    /// [`Event::JoinCompleted`] with the returned id when every seed answered or failed.
    pub fn join(
        &mut self,
        now: Instant,
        seeds: &[SocketAddr],
        delegate: &mut dyn Delegate,
    ) -> Result<JoinId, Error> {
        if self.leave != LeaveState::Member {
            return Err(Error::Left);
        }
        self.next_join += 1;
        let join = JoinId(self.next_join);
        self.joins.insert(
            join,
            JoinProgress {
                pending: seeds.len(),
                contacted: 0,
                errors: Vec::new(),
            },
        );
        for seed in seeds {
            self.open_push_pull(now, *seed, Some(join), delegate);
        }
        self.finish_join_if_done(join);
        Ok(join)
    }

    /// Leaves gracefully: marks ourselves left, broadcasts our own dead message and reports
    /// [`Event::LeaveCompleted`] once it went out its full retransmit count (at once if no
    /// other member is alive), or after `timeout`. Keep driving the core meanwhile: acks
    /// and gossip still go out. Called again while leaving, it adds nothing (the pending
    /// event answers); called after the leave finished, it reports completion again.
    pub fn leave(&mut self, now: Instant, timeout: Duration) {
        match self.leave {
            LeaveState::Member => {}
            // The leave in progress reports for this call too.
            LeaveState::Leaving => return,
            LeaveState::Left => {
                self.events.push_back(Event::LeaveCompleted {
                    broadcast_sent: true,
                });
                return;
            }
        }
        self.leave = LeaveState::Leaving;
        let incarnation = self.local_incarnation();
        let dead = crate::wire::memberlist::Dead {
            incarnation: incarnation.0,
            node: self.local_name.clone(),
            from: self.local_name.clone(),
        };
        self.dead_node(now, dead);
        if self.any_other_alive() {
            self.timers.set(now + timeout, Timer::Leave);
        } else {
            self.finish_leave(true);
        }
    }

    /// Publishes new meta: an alive message with incarnation + 1 (emits
    /// [`Event::NodeUpdated`] for ourselves if it changed).
    pub fn update_meta(&mut self, now: Instant, meta: Vec<u8>) -> Result<(), Error> {
        if meta.len() > META_MAX_SIZE {
            return Err(Error::MetaTooLarge {
                len: meta.len(),
                limit: META_MAX_SIZE,
            });
        }
        if self.leave != LeaveState::Member {
            return Err(Error::Left);
        }
        let local = self.local_node();
        let alive = crate::wire::memberlist::Alive {
            incarnation: local.incarnation.0 + 1,
            node: local.name,
            addr: ip_bytes(local.addr.ip()),
            port: local.addr.port(),
            meta,
            vsn: local.vsn.0.to_vec(),
        };
        self.alive_node(now, alive, true);
        Ok(())
    }

    /// Sends a user message (`08` + `message`) to `to` in one UDP packet (Serf: query
    /// responses, acks and relays).
    pub fn send_user(&mut self, now: Instant, to: SocketAddr, message: &[u8]) {
        let _ = now;
        let mut bytes = Vec::with_capacity(message.len() + 1);
        bytes.push(crate::wire::memberlist::kind::USER);
        bytes.extend_from_slice(message);
        self.send_raw(to, None, bytes);
    }

    /// The next thing to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Every member in the table, ourselves included (dead ones until they are reaped after
    /// `gossip_to_the_dead_time`).
    pub fn members(&self) -> impl Iterator<Item = Node> + '_ {
        self.nodes.iter().map(|entry| entry.to_node())
    }

    /// One member by name.
    pub fn member(&self, name: &str) -> Option<Node> {
        self.nodes.get(name).map(|entry| entry.to_node())
    }

    /// Ourselves.
    pub fn local_node(&self) -> Node {
        self.member(&self.local_name)
            .expect("the local node is inserted at construction and never removed")
    }

    /// Members in the table (memberlist's `estNumNodes`): the `n` of retransmit limits.
    pub fn num_members(&self) -> usize {
        self.nodes.len()
    }

    /// Members alive or suspect, ourselves included.
    pub fn num_alive(&self) -> usize {
        self.nodes
            .iter()
            .filter(|entry| matches!(entry.state, NodeState::Alive | NodeState::Suspect))
            .count()
    }

    /// Lifeguard's local health score (0 = healthy).
    pub fn health_score(&self) -> usize {
        self.awareness.score()
    }

    /// Whether [`leave`](Self::leave) was called.
    pub fn has_left(&self) -> bool {
        self.leave != LeaveState::Member
    }

    /// Drop and refusal counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn local_incarnation(&self) -> Incarnation {
        self.local_node().incarnation
    }

    fn next_seq_no(&mut self) -> u32 {
        self.seq_no = self.seq_no.wrapping_add(1);
        self.seq_no
    }

    fn any_other_alive(&self) -> bool {
        self.nodes.iter().any(|entry| {
            entry.name != self.local_name
                && matches!(entry.state, NodeState::Alive | NodeState::Suspect)
        })
    }

    fn collect_finished(&mut self) {
        for token in self.broadcasts.take_finished() {
            if token == LEAVE_TOKEN && self.leave == LeaveState::Leaving {
                self.finish_leave(true);
            }
        }
    }

    fn leave_timed_out(&mut self) {
        if self.leave == LeaveState::Leaving {
            self.finish_leave(false);
        }
    }

    fn finish_leave(&mut self, broadcast_sent: bool) {
        self.leave = LeaveState::Left;
        self.events
            .push_back(Event::LeaveCompleted { broadcast_sent });
    }
}

pub(crate) use crate::wire::{ip_from_bytes, ip_to_bytes as ip_bytes};

/// A random delay in `[0, interval)` so members do not tick in lockstep.
fn stagger(rng: &mut StdRng, interval: Duration) -> Duration {
    let nanos = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..nanos))
}

#[cfg(test)]
mod tests;
