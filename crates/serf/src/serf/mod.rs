//! The Serf layer on top of memberlist: Lamport clocks, member status and intents, user
//! events, queries, push-pull user state, reaping and reconnecting (serf/serf/*.go).
//!
//! Everything here is sans-IO: time comes in as `now`, randomness as an RNG argument, and
//! effects go out as values.

mod config;
mod event;
mod internal;
mod keys;
mod lamport;
mod layer;
mod member;
mod push_pull;
mod query;
mod state;

pub use config::{
    Config, RestoredClocks, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, USER_EVENT_SIZE_HARD_LIMIT,
};
pub use keys::{KeyOperation, KeyReport};
pub use lamport::{LamportClock, LamportTime};
pub use member::{Member, MemberStatus, NodeInfo};
pub use query::{
    default_query_timeout, should_process, Filter, QueryHandle, QueryParams, ResponderId,
};

pub use state::Lifecycle;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::memberlist::{
    self, JoinId, LocalNode, Memberlist, StreamId, StreamInput, Transmit, Vsn, META_MAX_SIZE,
};
use crate::wire::serf as wire;
use crate::wire::DecodeError;
use state::SerfState;

/// A user event (`serf event`), as delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEvent {
    /// Event Lamport time.
    pub ltime: LamportTime,
    /// Event name.
    pub name: String,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// The sender allows coalescing events of the same name.
    pub coalesce: bool,
}

/// A query from a member (possibly ourselves) addressed to us; answer with `respond(id, …)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Pass to `respond`.
    pub id: ResponderId,
    /// Query Lamport time.
    pub ltime: LamportTime,
    /// Query name.
    pub name: String,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// The member that sent it.
    pub source_node: String,
    /// Answers after this are refused.
    pub deadline: Instant,
}

/// What the Serf layer tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member joined or came back (`member-join`).
    MemberJoin(Member),
    /// A member left gracefully (`member-leave`).
    MemberLeave(Member),
    /// A member failed (`member-failed`).
    MemberFailed(Member),
    /// A member's tags, address or versions changed (`member-update`).
    MemberUpdate(Member),
    /// A failed or left member was forgotten (`member-reap`).
    MemberReap(Member),
    /// A user event, delivered once.
    UserEvent(UserEvent),
    /// A query addressed to us.
    Query(Query),
    /// A member acknowledged one of our queries.
    QueryAck {
        /// Which query.
        query: QueryHandle,
        /// The member.
        from: String,
    },
    /// A member answered one of our queries.
    QueryResponse {
        /// Which query.
        query: QueryHandle,
        /// The member.
        from: String,
        /// Its answer.
        payload: Vec<u8>,
    },
    /// One of our queries reached its timeout; nothing more will arrive for it.
    QueryDone {
        /// Which query.
        query: QueryHandle,
    },
    /// A [`Serf::join`] finished. With `contacted > 0` we are in the cluster and our join
    /// intent is being gossiped.
    JoinCompleted {
        /// Which join.
        join: JoinId,
        /// Seeds that completed a push-pull.
        contacted: usize,
        /// Seeds that failed, and why.
        errors: Vec<(SocketAddr, String)>,
    },
    /// A [`Serf::leave`] finished: the leave intent and memberlist's leave went out and the
    /// propagation delay passed. The member should stop now.
    LeaveCompleted,
    /// A [`Serf::keys`] operation finished: every live member answered, or the query timed
    /// out. Its acks and responses are counted here, never delivered as query events.
    KeysCompleted {
        /// Which key query.
        query: QueryHandle,
        /// The answers counted; [`KeyReport::error`] gives Go's verdict.
        report: KeyReport,
    },
    /// Another node claims our name and most members side with it (`_serf_conflict`): the
    /// Serf layer has shut down (as Go's Serf does) and ignores further input. Stop the member
    /// (`serf_agent::member::Handle::shutdown`, or stop driving a [`Serf`]) and pick another name.
    NameConflict {
        /// Our name.
        name: String,
        /// The other node's address.
        other: SocketAddr,
        /// Members that answered the conflict query.
        responses: usize,
        /// Members that know our name at our address.
        matching: usize,
    },
}

/// Why a Serf command was refused. Unless a variant says otherwise, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A configuration value out of range.
    #[error("invalid serf config {field}={value}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The encoded tags do not fit in node meta.
    #[error("encoded length of tags {tags:?} is {len} bytes, above the limit of {limit} bytes")]
    TagsTooLarge {
        /// The tags given.
        tags: BTreeMap<String, String>,
        /// Their encoded length.
        len: usize,
        /// The limit (512).
        limit: usize,
    },
    /// A user event above the size limit.
    #[error("user event {name:?} is {len} bytes {stage}, above the {kind} limit of {limit} bytes")]
    UserEventTooLarge {
        /// Event name.
        name: String,
        /// Size measured.
        len: usize,
        /// `"before encoding"` (name + payload) or `"after encoding"`.
        stage: &'static str,
        /// `"configured"` or `"sane"` (the 9 KiB hard cap).
        kind: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A query whose encoding exceeds `query_size_limit`.
    #[error("query {name:?} is {len} bytes encoded, above the limit of {limit} bytes")]
    QueryTooLarge {
        /// Query name.
        name: String,
        /// Encoded length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Queries need Serf protocol 4 or later.
    #[error("queries need serf protocol 4 or later, this member speaks {protocol_version}")]
    QueriesNotSupported {
        /// The configured protocol version.
        protocol_version: u8,
    },
    /// `respond` with an id that is unknown or expired.
    #[error("no pending query matching id {}", id.0)]
    UnknownQuery {
        /// The id given.
        id: ResponderId,
    },
    /// `respond` twice to the same query.
    #[error("response to query {} already sent", id.0)]
    ResponseAlreadySent {
        /// The id given.
        id: ResponderId,
    },
    /// `respond` after the query's deadline.
    #[error("response to query {} is past the deadline", id.0)]
    ResponsePastDeadline {
        /// The id given.
        id: ResponderId,
    },
    /// A response whose encoding exceeds `query_response_size_limit`.
    #[error("response is {len} bytes encoded, above the limit of {limit} bytes")]
    ResponseTooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The command needs a running member; this one is leaving, left or shut down.
    #[error("serf is {state:?}; {command} needs it alive")]
    NotAlive {
        /// The refused command.
        command: &'static str,
        /// Our lifecycle state.
        state: Lifecycle,
    },
    /// memberlist refused the command.
    #[error(transparent)]
    Memberlist(#[from] memberlist::Error),
}

/// A native Serf member: memberlist plus the Serf layer, as one sans-IO state machine.
///
/// Feed it packets, stream bytes and timeouts; pull transmits and events. Commands (`join`,
/// `leave`, `set_tags`, `user_event`, `query`, `respond`, `keys`, `force_leave`) take the
/// current time. This is the one composition: the simulation tests drive it, and so does the
/// tokio driver the agent runs (`serf_agent::member`).
#[derive(Debug)]
pub struct Serf {
    memberlist: Memberlist,
    state: SerfState,
    events: VecDeque<Event>,
    /// Our key queries until their timeout; the report is taken when it is delivered.
    key_queries: BTreeMap<QueryHandle, Option<KeyReport>>,
}

impl Serf {
    /// Starts a member named `config.node_name` advertising `addr` (UDP and TCP). It knows
    /// only itself until [`join`](Self::join) or until someone joins it.
    pub fn new(
        config: Config,
        memberlist_config: memberlist::Config,
        addr: SocketAddr,
        mut rng: StdRng,
        now: Instant,
    ) -> Result<Self, Error> {
        let mut local = LocalNode::new(config.node_name.clone(), addr);
        (local.meta, local.vsn) = validate(&config)?;
        let state_rng = StdRng::from_rng(&mut rng);
        let retransmit_mult = memberlist_config.retransmit_mult;
        let memberlist = Memberlist::new(memberlist_config, local, rng, now)?;
        let state = SerfState::new(config, state_rng, retransmit_mult, now);
        let mut serf = Self {
            memberlist,
            state,
            events: VecDeque::new(),
            key_queries: BTreeMap::new(),
        };
        serf.pump(now);
        Ok(serf)
    }

    /// Joins the cluster through `seeds` (a push-pull with each). With `ignore_old`, user
    /// events older than what the seeds report are not delivered (the agent's default,
    /// i.e. without `-replay`). Completion comes as [`Event::JoinCompleted`].
    pub fn join(
        &mut self,
        now: Instant,
        seeds: &[SocketAddr],
        ignore_old: bool,
    ) -> Result<JoinId, Error> {
        let join = self
            .state
            .join(now, &mut self.memberlist, seeds, ignore_old);
        self.pump(now);
        join
    }

    /// Leaves gracefully: gossips our leave intent (so others report us `left`, not
    /// `failed`), waits until it went out (at most `broadcast_timeout`), then memberlist's
    /// leave, then `leave_propagate_delay`. Keep driving the member until
    /// [`Event::LeaveCompleted`].
    pub fn leave(&mut self, now: Instant) -> Result<(), Error> {
        let result = self.state.leave(now, &mut self.memberlist);
        self.pump(now);
        result
    }

    /// Replaces our tags; they reach other members as new node meta.
    pub fn set_tags(&mut self, now: Instant, tags: BTreeMap<String, String>) -> Result<(), Error> {
        let result = self.state.set_tags(now, &mut self.memberlist, tags);
        self.pump(now);
        result
    }

    /// Sends a user event to the cluster (and delivers it here too, as Go does).
    pub fn user_event(
        &mut self,
        now: Instant,
        name: &str,
        payload: &[u8],
        coalesce: bool,
    ) -> Result<(), Error> {
        let result = self.state.user_event(now, name, payload, coalesce);
        self.pump(now);
        result
    }

    /// Sends a query; acks and responses come as [`Event::QueryAck`] and
    /// [`Event::QueryResponse`] with the returned handle, then [`Event::QueryDone`] at the
    /// timeout. We process our own query too (Go does): expect our own answer.
    pub fn query(
        &mut self,
        now: Instant,
        name: &str,
        payload: &[u8],
        params: &QueryParams,
    ) -> Result<QueryHandle, Error> {
        let handle = self
            .state
            .start_query(now, &mut self.memberlist, name, payload, params);
        self.pump(now);
        handle
    }

    /// Runs a key operation across the cluster (serf/keymanager.go `handleKeyRequest`): the
    /// internal query goes to every member (we answer our own), answers are counted until
    /// every live member answered or the query times out, then [`Event::KeysCompleted`]
    /// carries the report.
    pub fn keys(&mut self, now: Instant, operation: &KeyOperation) -> Result<QueryHandle, Error> {
        let num_nodes = self.memberlist.num_alive();
        let query = self.state.start_query(
            now,
            &mut self.memberlist,
            operation.query_name(),
            &operation.payload(),
            &QueryParams::default(),
        )?;
        let report = KeyReport {
            num_nodes,
            ..KeyReport::default()
        };
        self.key_queries.insert(query, Some(report));
        self.pump(now);
        Ok(query)
    }

    /// Go's `forceLeave` (`serf force-leave`): marks the failed member `node` as `left` and
    /// gossips that; with `prune`, the member is forgotten at once. Unknown names are no-ops.
    pub fn force_leave(&mut self, now: Instant, node: &str, prune: bool) {
        self.state.enter(now, &self.memberlist);
        self.state.force_leave(node, prune);
        self.pump(now);
    }

    /// Go's `Serf.Stats()`: the `serf` section of `serf info`, with Go's keys (`members`,
    /// `failed`, `left`, `health_score`, `member_time`, `event_time`, `query_time`,
    /// `intent_queue`, `event_queue`, `query_queue`, `encrypted`, `coordinate_resets`).
    pub fn stats(&self) -> BTreeMap<String, String> {
        let state = &self.state;
        let count = |status: MemberStatus| state.members.with_status(status).count().to_string();
        let mut stats: BTreeMap<String, String> = [
            ("members", state.members.len().to_string()),
            ("failed", count(MemberStatus::Failed)),
            ("left", count(MemberStatus::Left)),
            ("health_score", self.memberlist.health_score().to_string()),
            ("member_time", state.members.clock.time().0.to_string()),
            ("event_time", state.user_events.clock.time().0.to_string()),
            ("query_time", state.queries.clock.time().0.to_string()),
            ("intent_queue", state.intent_queue.len().to_string()),
            ("event_queue", state.event_queue.len().to_string()),
            ("query_queue", state.query_queue.len().to_string()),
            ("encrypted", state.keyring.is_some().to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        if let Some(client) = &state.coordinates {
            stats.insert("coordinate_resets".to_owned(), client.resets().to_string());
        }
        stats
    }

    /// Sets the gossip keyring the key queries change (the driver that encrypts with it
    /// must share it); `None` answers them as an unencrypted Go member does.
    pub fn set_keyring(&mut self, keyring: Option<crate::wire::crypto::SharedKeyring>) {
        self.state.keyring = keyring;
    }

    /// Answers a query delivered as [`Event::Query`] (once, before its deadline).
    pub fn respond(&mut self, now: Instant, id: ResponderId, payload: &[u8]) -> Result<(), Error> {
        self.state.enter(now, &self.memberlist);
        let result = self.state.respond(id, payload.to_vec());
        self.pump(now);
        result
    }

    /// Every member Serf knows, ourselves included (failed and left ones until reaped).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.state.members.iter()
    }

    /// One member by name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.state.members.get(name)
    }

    /// Ourselves.
    pub fn local_member(&self) -> &Member {
        self.state
            .members
            .get(&self.state.config.node_name)
            .expect("memberlist reports the local node at construction")
    }

    /// Our lifecycle state.
    pub fn lifecycle(&self) -> Lifecycle {
        self.state.lifecycle
    }

    /// Our Vivaldi coordinate (`None` with coordinates disabled).
    pub fn coordinate(&self) -> Option<&crate::coordinate::Coordinate> {
        self.state
            .coordinates
            .as_ref()
            .map(|client| client.coordinate())
    }

    /// The last coordinate seen for `node` (ours included).
    pub fn cached_coordinate(&self, node: &str) -> Option<&crate::coordinate::Coordinate> {
        self.state.coordinate_cache.get(node)
    }

    /// Estimated round trip to `node`, from the coordinates.
    pub fn estimated_rtt(&self, node: &str) -> Option<std::time::Duration> {
        self.state.estimated_rtt(node)
    }

    /// The three Lamport clocks: member, event, query.
    pub fn clocks(&self) -> (LamportTime, LamportTime, LamportTime) {
        self.state.clocks()
    }

    /// The memberlist core underneath (read-only).
    pub fn memberlist(&self) -> &Memberlist {
        &self.memberlist
    }

    /// The Serf configuration in use (tags reflect `set_tags`).
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The default query timeout for the current cluster size.
    pub fn default_query_timeout(&self) -> std::time::Duration {
        self.state.default_query_timeout(&self.memberlist)
    }

    fn pump(&mut self, now: Instant) {
        self.state.pump(now, &mut self.memberlist);
        for event in std::mem::take(&mut self.state.events) {
            if let Some(event) = self.count_key_answer(event) {
                self.events.push_back(event);
            }
        }
    }

    /// Counts an answer to one of our key queries (and swallows its acks); passes every
    /// other event through. The report goes out once: complete, or at the query's timeout.
    fn count_key_answer(&mut self, event: Event) -> Option<Event> {
        let query = match &event {
            Event::QueryResponse { query, .. }
            | Event::QueryAck { query, .. }
            | Event::QueryDone { query } => *query,
            _ => return Some(event),
        };
        let Some(pending) = self.key_queries.get_mut(&query) else {
            return Some(event);
        };
        match event {
            Event::QueryResponse { from, payload, .. } => {
                let report = pending.as_mut()?;
                report.count(&from, &payload);
                if !report.complete() {
                    return None;
                }
                let report = pending.take()?;
                Some(Event::KeysCompleted { query, report })
            }
            Event::QueryDone { .. } => {
                let report = self.key_queries.remove(&query).flatten()?;
                Some(Event::KeysCompleted { query, report })
            }
            _ => None,
        }
    }
}

/// The member as drivers and the simulator run it.
impl crate::core::Core for Serf {
    type Event = Event;

    /// Handles one UDP datagram (already decrypted).
    fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), DecodeError> {
        if self.state.lifecycle == Lifecycle::Shutdown {
            return Ok(());
        }
        self.state.enter(now, &self.memberlist);
        let result = self
            .memberlist
            .handle_packet(now, from, packet, &mut self.state);
        self.pump(now);
        result
    }

    /// The driver accepted a TCP connection from `from`.
    fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.state.enter(now, &self.memberlist);
        let stream = self.memberlist.handle_accept(now, from);
        self.pump(now);
        stream
    }

    /// Bytes, EOF or failure on a stream.
    fn handle_stream(&mut self, now: Instant, stream: StreamId, input: StreamInput<'_>) {
        self.state.enter(now, &self.memberlist);
        self.memberlist
            .handle_stream(now, stream, input, &mut self.state);
        self.pump(now);
    }

    /// Runs everything due at `now` (memberlist timers, reaping, reconnects, query
    /// deadlines, leave phases).
    fn handle_timeout(&mut self, now: Instant) {
        if self.state.lifecycle == Lifecycle::Shutdown {
            return;
        }
        self.state.enter(now, &self.memberlist);
        self.memberlist.handle_timeout(now, &mut self.state);
        self.pump(now);
        self.state.handle_own_timeout(now, &mut self.memberlist);
        self.pump(now);
    }

    /// The next transmit for the driver.
    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.memberlist.poll_transmit()
    }

    /// The next event for the application.
    fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](crate::core::Core::handle_timeout) is due next.
    fn poll_timeout(&self) -> Option<Instant> {
        if self.state.lifecycle == Lifecycle::Shutdown {
            return None;
        }
        [self.memberlist.poll_timeout(), self.state.own_timeout()]
            .into_iter()
            .flatten()
            .min()
    }
}

/// Checks a config and returns the node meta and protocol versions it implies.
fn validate(config: &Config) -> Result<(Vec<u8>, Vsn), Error> {
    if config.node_name.is_empty() {
        return Err(Error::Config {
            field: "node_name",
            value: String::new(),
            reason: "must not be empty",
        });
    }
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&config.protocol_version) {
        return Err(Error::Config {
            field: "protocol_version",
            value: config.protocol_version.to_string(),
            reason: "must be in 2..=5",
        });
    }
    if config.user_event_size_limit > USER_EVENT_SIZE_HARD_LIMIT {
        return Err(Error::Config {
            field: "user_event_size_limit",
            value: config.user_event_size_limit.to_string(),
            reason: "must be at most 9216 bytes",
        });
    }
    let meta = encode_meta(&config.tags, config.protocol_version);
    if meta.len() > META_MAX_SIZE {
        return Err(Error::TagsTooLarge {
            tags: config.tags.clone(),
            len: meta.len(),
            limit: META_MAX_SIZE,
        });
    }
    // memberlist protocol 2 for every serf version (Go's ProtocolVersionMap).
    let vsn = Vsn([
        1,
        5,
        2,
        PROTOCOL_VERSION_MIN,
        PROTOCOL_VERSION_MAX,
        config.protocol_version,
    ]);
    Ok((meta, vsn))
}

/// Tags as node meta for a Serf protocol version: `ff` + msgpack map from protocol 3 on,
/// the bare `role` tag before.
fn encode_meta(tags: &BTreeMap<String, String>, protocol_version: u8) -> Vec<u8> {
    if protocol_version < 3 {
        tags.get("role").cloned().unwrap_or_default().into_bytes()
    } else {
        wire::encode_tags(tags)
    }
}

#[cfg(test)]
mod tests;
