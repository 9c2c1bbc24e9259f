//! The Serf layer's state below the public API: what Go keeps in `serf.Serf` and reaches
//! through its memberlist delegates. [`SerfState`] is the [`Delegate`] the memberlist core
//! calls synchronously; effects that need memberlist (direct sends) are queued in `sends` and
//! flushed by [`super::Serf`] after each call.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::event::UserEvents;
use super::internal::{self, ConflictResolution};
use super::member::{IntentOutcome, Members, NodeInfo};
use super::query::{should_process, Inbound, Queries, QueryHandle, ResponderId, MAX_QUERY_TIMEOUT};
use super::{Config, Error, Event, LamportTime, MemberStatus, Query, UserEvent};
use crate::coordinate;
use crate::memberlist::MAX_NODE_NAME_BYTES;
use crate::memberlist::{BroadcastQueue, BroadcastToken, Delegate, JoinId, Node};
use crate::wire::serf::{
    self as wire, Filter, SerfMessage, QUERY_FLAG_ACK, QUERY_FLAG_NO_BROADCAST,
};

/// Token of our own leave intent in the intent queue.
pub(crate) const LEAVE_INTENT: BroadcastToken = BroadcastToken(1);

/// Serf's own lifecycle (Go's `SerfState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Running.
    Alive,
    /// `leave` in progress.
    Leaving,
    /// Left the cluster.
    Left,
    /// Stopped (after a lost name conflict).
    Shutdown,
}

/// Where a leave is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeavePhase {
    /// Our leave intent is being gossiped; go on at the deadline at the latest.
    Intent { deadline: Instant },
    /// memberlist is broadcasting our dead message.
    Memberlist,
    /// Waiting `leave_propagate_delay` before reporting done.
    Propagate { until: Instant },
}

#[derive(Debug)]
pub(crate) struct SerfState {
    pub(crate) config: Config,
    /// Our advertised address (from memberlist's join event about ourselves).
    pub(crate) local_addr: SocketAddr,
    /// The time of the input being handled (delegate calls carry no time).
    pub(crate) now: Instant,
    pub(crate) rng: StdRng,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) members: Members,
    pub(crate) user_events: UserEvents,
    pub(crate) queries: Queries,
    pub(crate) intent_queue: BroadcastQueue,
    pub(crate) event_queue: BroadcastQueue,
    pub(crate) query_queue: BroadcastQueue,
    /// memberlist's member count, refreshed before every memberlist call.
    pub(crate) n_members: usize,
    pub(crate) coordinates: Option<coordinate::Client>,
    pub(crate) coordinate_cache: HashMap<String, coordinate::Coordinate>,
    /// A join asked to ignore old events is in progress.
    pub(crate) ignore_old_events: bool,
    pub(crate) conflict: Option<ConflictResolution>,
    /// Our joins in progress and whether each ignores old events (reconnects are not listed).
    pub(crate) joins: BTreeMap<JoinId, bool>,
    pub(crate) leave: Option<LeavePhase>,
    /// Our leave intent went out its full retransmit count (noticed when broadcasts are taken).
    pub(crate) leave_intent_sent: bool,
    pub(crate) next_reap: Instant,
    pub(crate) next_queue_check: Instant,
    pub(crate) next_reconnect: Instant,
    pub(crate) events: Vec<Event>,
    pub(crate) sends: Vec<(SocketAddr, Vec<u8>)>,
    /// Serf messages that did not decode.
    pub(crate) decode_errors: u64,
    /// The gossip keyring the driver encrypts with (changed by key queries); `None` when
    /// gossip is not encrypted.
    pub(crate) keyring: Option<crate::wire::crypto::SharedKeyring>,
}

impl SerfState {
    pub(crate) fn new(config: Config, rng: StdRng, retransmit_mult: usize, now: Instant) -> Self {
        let coordinates = (!config.disable_coordinates)
            .then(|| coordinate::Client::new(coordinate::Config::default()));
        let mut coordinate_cache = HashMap::new();
        if let Some(client) = &coordinates {
            coordinate_cache.insert(config.node_name.clone(), client.coordinate().clone());
        }
        let mut members = Members::new(&config.node_name);
        let mut user_events = UserEvents::new(config.event_buffer);
        let mut queries = Queries::new(config.query_buffer);
        if let Some(restored) = config.restored_clocks {
            members.clock.witness(restored.member);
            user_events.clock.witness(restored.event);
            user_events.min_time = LamportTime(restored.event.0.saturating_add(1));
            queries.clock.witness(restored.query);
            queries.min_time = LamportTime(restored.query.0.saturating_add(1));
        }
        Self {
            members,
            user_events,
            queries,
            next_reap: now + config.reap_interval,
            next_queue_check: now + config.queue_check_interval,
            next_reconnect: now + config.reconnect_interval,
            config,
            local_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            now,
            rng,
            lifecycle: Lifecycle::Alive,
            intent_queue: BroadcastQueue::new(retransmit_mult),
            event_queue: BroadcastQueue::new(retransmit_mult),
            query_queue: BroadcastQueue::new(retransmit_mult),
            n_members: 1,
            coordinates,
            coordinate_cache,
            ignore_old_events: false,
            conflict: None,
            joins: BTreeMap::new(),
            leave: None,
            leave_intent_sent: false,
            events: Vec::new(),
            sends: Vec::new(),
            decode_errors: 0,
            keyring: None,
        }
    }

    /// Go's `broadcastJoin`: witness, apply locally, gossip.
    pub(crate) fn broadcast_join(&mut self, ltime: LamportTime) {
        let join = wire::Join {
            ltime: ltime.0,
            node: self.config.node_name.clone(),
        };
        self.members.clock.witness(ltime);
        let now = self.now;
        self.members.handle_join_intent(now, ltime, &join.node);
        self.intent_queue
            .push(None, SerfMessage::Join(join).encode(), None);
    }

    /// Go's `forceLeave`: a leave intent about another (failed) node, applied locally and
    /// gossiped. A failed member becomes `left` (with `prune`, it is erased at once).
    pub(crate) fn force_leave(&mut self, node: &str, prune: bool) {
        let leave = wire::Leave {
            ltime: self.members.clock.time().0,
            node: node.to_owned(),
            prune,
        };
        self.members.clock.increment();
        self.apply_leave_intent(&leave);
        if self.members.has_alive_peers() {
            self.intent_queue
                .push(None, SerfMessage::Leave(leave).encode(), None);
        }
    }

    /// A leave intent, from the network, from a push-pull, or our own.
    pub(crate) fn apply_leave_intent(&mut self, leave: &wire::Leave) -> IntentOutcome {
        let prune_delay = self.config.broadcast_timeout + self.config.leave_propagate_delay;
        let local_alive = self.lifecycle == Lifecycle::Alive;
        let events_before = self.events.len();
        let outcome = self.members.handle_leave_intent(
            self.now,
            LamportTime(leave.ltime),
            &leave.node,
            leave.prune,
            local_alive,
            prune_delay,
            &mut self.events,
        );
        if outcome == IntentOutcome::Refute {
            let ltime = self.members.clock.time();
            self.broadcast_join(ltime);
        }
        self.forget_reaped(events_before);
        outcome
    }

    /// Drops coordinates of members that were just reaped: those of the reap events from
    /// index `from` of the pending events on.
    pub(crate) fn forget_reaped(&mut self, from: usize) {
        for event in self.events.iter().skip(from) {
            if let Event::MemberReap(member) = event {
                if let Some(client) = &mut self.coordinates {
                    client.forget_node(&member.name);
                }
                self.coordinate_cache.remove(&member.name);
            }
        }
    }

    /// A user event (ours or received); true when new.
    pub(crate) fn apply_user_event(&mut self, event: &wire::UserEvent) -> bool {
        self.user_events.handle(
            UserEvent {
                ltime: LamportTime(event.ltime),
                name: event.name.clone(),
                payload: event.payload.clone(),
                coalesce: event.cc,
            },
            &mut self.events,
        )
    }

    /// Go's `handleQuery`: de-duplicate, filter, ack, deliver. Returns whether to re-gossip.
    pub(crate) fn apply_query(&mut self, query: &wire::Query) -> bool {
        let ltime = LamportTime(query.ltime);
        if !self.queries.first_sighting(ltime, query.id, &query.name) {
            return false;
        }
        let rebroadcast = query.flags & QUERY_FLAG_NO_BROADCAST == 0;
        if query.source_node.len() > MAX_NODE_NAME_BYTES {
            tracing::debug!(
                len = query.source_node.len(),
                "query source name too long, dropped"
            );
            return false;
        }
        let mut filters = Vec::with_capacity(query.filters.len());
        for raw in &query.filters {
            match Filter::decode(raw) {
                Ok(filter) => filters.push(filter),
                Err(error) => {
                    tracing::debug!(name = %query.name, %error, "query filter does not decode");
                    return rebroadcast;
                }
            }
        }
        if !should_process(&filters, &self.config.node_name, &self.config.tags) {
            return rebroadcast;
        }
        let Some(ip) = wire::ip_from_bytes(&query.addr) else {
            tracing::debug!(name = %query.name, addr = ?query.addr, "query has no usable reply address");
            return rebroadcast;
        };
        let reply_to = SocketAddr::new(ip, query.port);
        if query.flags & QUERY_FLAG_ACK != 0 {
            let ack = wire::QueryResponse {
                ltime: query.ltime,
                id: query.id,
                from: self.config.node_name.clone(),
                flags: QUERY_FLAG_ACK,
                payload: Vec::new(),
            };
            let raw = SerfMessage::QueryResponse(ack).encode();
            self.sends.push((reply_to, raw.clone()));
            self.relay(query.relay_factor, reply_to, &query.source_node, raw);
        }
        // The wire allows centuries; nobody waits that long for an answer.
        let timeout = query.timeout.min(MAX_QUERY_TIMEOUT);
        let deadline = self.now + timeout;
        let Some(responder) = self.queries.add_inbound(Inbound {
            ltime,
            id: query.id,
            reply_to,
            source_node: query.source_node.clone(),
            relay_factor: query.relay_factor,
            deadline,
            forget_at: deadline + timeout,
            responded: false,
        }) else {
            tracing::debug!(name = %query.name, "too many open queries, not delivered");
            return rebroadcast;
        };
        let delivered = Query {
            id: responder,
            ltime,
            name: query.name.clone(),
            payload: query.payload.clone(),
            source_node: query.source_node.clone(),
            deadline,
        };
        if query.name.starts_with(internal::PREFIX) {
            let context = internal::Context {
                keyring: self.keyring.as_ref(),
                members: &self.members,
                local_name: &self.config.node_name,
                response_limit: self.config.query_response_size_limit,
            };
            let fits = |payload: &[u8]| {
                self.encode_response(ltime, query.id, payload.to_vec())
                    .len()
                    <= self.config.query_response_size_limit
            };
            if let Some(payload) = internal::answer(&context, &delivered, fits) {
                if let Err(error) = self.respond(responder, payload) {
                    tracing::debug!(name = %query.name, %error, "failed to answer internal query");
                }
            }
        } else {
            self.events.push(Event::Query(delivered));
        }
        rebroadcast
    }

    /// Answers a query from `queries`' inbound list (Go's `Query.Respond`).
    pub(crate) fn respond(&mut self, id: ResponderId, payload: Vec<u8>) -> Result<(), Error> {
        let now = self.now;
        let limit = self.config.query_response_size_limit;
        let Some(inbound) = self.queries.inbound(id) else {
            return Err(Error::UnknownQuery { id });
        };
        if inbound.responded {
            return Err(Error::ResponseAlreadySent { id });
        }
        if now > inbound.deadline {
            return Err(Error::ResponsePastDeadline { id });
        }
        let raw = self.encode_response(inbound.ltime, inbound.id, payload);
        if raw.len() > limit {
            return Err(Error::ResponseTooLarge {
                len: raw.len(),
                limit,
            });
        }
        let Some(inbound) = self.queries.inbound_mut(id) else {
            return Err(Error::UnknownQuery { id });
        };
        inbound.responded = true;
        let (reply_to, relay_factor, source_node) = (
            inbound.reply_to,
            inbound.relay_factor,
            inbound.source_node.clone(),
        );
        self.sends.push((reply_to, raw.clone()));
        self.relay(relay_factor, reply_to, &source_node, raw);
        Ok(())
    }

    /// Our answer to the query (`ltime`, `id`) as it goes on the wire.
    fn encode_response(&self, ltime: LamportTime, id: u32, payload: Vec<u8>) -> Vec<u8> {
        SerfMessage::QueryResponse(wire::QueryResponse {
            ltime: ltime.0,
            id,
            from: self.config.node_name.clone(),
            flags: 0,
            payload,
        })
        .encode()
    }

    /// Go's `relayResponse`: also send the answer through `relay_factor` other alive members
    /// that speak memberlist protocol ≥ 5.
    fn relay(&mut self, relay_factor: u8, dest: SocketAddr, dest_name: &str, raw: Vec<u8>) {
        let factor = usize::from(relay_factor);
        if factor == 0 || self.members.len() < factor + 1 {
            return;
        }
        let relay = SerfMessage::Relay(wire::Relay {
            dest,
            dest_name: dest_name.to_owned(),
            inner: raw,
        })
        .encode();
        if relay.len() > self.config.query_response_size_limit {
            tracing::debug!(len = relay.len(), "relayed response exceeds the size limit");
            return;
        }
        let mut candidates: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|member| {
                member.status == MemberStatus::Alive
                    && member.versions[1] >= 5
                    && member.name != self.config.node_name
            })
            .map(|member| member.socket_addr())
            .collect();
        candidates.shuffle(&mut self.rng);
        for via in candidates.into_iter().take(factor) {
            self.sends.push((via, relay.clone()));
        }
    }

    /// An ack or response to one of our queries.
    fn apply_query_response(&mut self, response: &wire::QueryResponse) {
        let handle = QueryHandle {
            ltime: LamportTime(response.ltime),
            id: response.id,
        };
        let is_ack = response.flags & QUERY_FLAG_ACK != 0;
        let mut delivered = Vec::new();
        self.queries.handle_response(
            self.now,
            handle,
            &response.from,
            is_ack,
            response.payload.clone(),
            &mut delivered,
        );
        match &mut self.conflict {
            Some(conflict) if conflict.query == handle => {
                for event in delivered {
                    if let Event::QueryResponse { payload, .. } = event {
                        conflict.count(self.local_addr, &payload);
                    }
                }
            }
            _ => self.events.extend(delivered),
        }
    }

    pub(crate) fn estimated_rtt(&self, node: &str) -> Option<Duration> {
        let ours = self.coordinates.as_ref()?.coordinate();
        ours.distance_to(self.coordinate_cache.get(node)?)
    }

    pub(crate) fn clocks(&self) -> (LamportTime, LamportTime, LamportTime) {
        (
            self.members.clock.time(),
            self.user_events.clock.time(),
            self.queries.clock.time(),
        )
    }

    /// Converts a memberlist node into what the member table needs.
    pub(crate) fn node_info(node: &Node) -> NodeInfo {
        let tags = crate::wire::serf::decode_tags(&node.meta).unwrap_or_else(|error| {
            tracing::debug!(node = %node.name, %error, "tags do not decode");
            Default::default()
        });
        NodeInfo {
            name: node.name.clone(),
            addr: node.addr.ip(),
            port: node.addr.port(),
            tags,
            versions: node.vsn.0,
        }
    }

    /// The coordinate ack payload: `01` + msgpack coordinate.
    fn coordinate_payload(&self) -> Vec<u8> {
        let Some(client) = &self.coordinates else {
            return Vec::new();
        };
        let coordinate = client.coordinate();
        wire::Coordinate {
            vec: coordinate.vec.clone(),
            error: coordinate.error,
            adjustment: coordinate.adjustment,
            height: coordinate.height,
        }
        .to_ping_payload()
    }

    fn update_coordinate(&mut self, node: &str, rtt: Duration, payload: &[u8]) {
        let Some(client) = &mut self.coordinates else {
            return;
        };
        let other = match wire::Coordinate::from_ping_payload(payload) {
            Ok(Some(other)) => coordinate::Coordinate {
                vec: other.vec,
                error: other.error,
                adjustment: other.adjustment,
                height: other.height,
            },
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(node, %error, "ping payload is not a coordinate");
                return;
            }
        };
        match client.update(node, &other, rtt, &mut self.rng) {
            Ok(ours) => {
                let ours = ours.clone();
                self.coordinate_cache.insert(node.to_owned(), other);
                self.coordinate_cache
                    .insert(self.config.node_name.clone(), ours);
            }
            Err(error) => tracing::trace!(node, %error, "rejected coordinate"),
        }
    }
}

impl Delegate for SerfState {
    fn notify_user_msg(&mut self, message: &[u8]) {
        if self.lifecycle == Lifecycle::Shutdown {
            return;
        }
        let decoded = match SerfMessage::decode(message) {
            Ok(decoded) => decoded,
            Err(error) => {
                self.decode_errors += 1;
                tracing::debug!(%error, first = ?message.first(), "dropping undecodable serf message");
                return;
            }
        };
        match decoded {
            SerfMessage::Leave(leave) => {
                tracing::debug!(node = %leave.node, ltime = leave.ltime, "leave intent");
                if self.apply_leave_intent(&leave) == IntentOutcome::Rebroadcast {
                    self.intent_queue.push(None, message.to_vec(), None);
                }
            }
            SerfMessage::Join(join) => {
                tracing::debug!(node = %join.node, ltime = join.ltime, "join intent");
                let now = self.now;
                let outcome =
                    self.members
                        .handle_join_intent(now, LamportTime(join.ltime), &join.node);
                if outcome == IntentOutcome::Rebroadcast {
                    self.intent_queue.push(None, message.to_vec(), None);
                }
            }
            SerfMessage::UserEvent(event) => {
                if self.apply_user_event(&event) {
                    self.event_queue.push(None, message.to_vec(), None);
                }
            }
            SerfMessage::Query(query) => {
                tracing::debug!(name = %query.name, ltime = query.ltime, id = query.id, "query");
                if self.apply_query(&query) {
                    self.query_queue.push(None, message.to_vec(), None);
                }
            }
            SerfMessage::QueryResponse(response) => self.apply_query_response(&response),
            SerfMessage::Relay(relay) => {
                tracing::debug!(dest = %relay.dest, "relaying query response");
                self.sends.push((relay.dest, relay.inner));
            }
            SerfMessage::PushPull(_) => {
                tracing::debug!("push-pull state outside a push-pull, dropped");
            }
        }
    }

    fn broadcasts(&mut self, overhead: usize, limit: usize) -> Vec<Vec<u8>> {
        let n = self.n_members;
        let mut messages = self.intent_queue.get_broadcasts(overhead, limit, n);
        let mut used: usize = messages.iter().map(|m| m.len() + overhead).sum();
        for queue in [&mut self.query_queue, &mut self.event_queue] {
            let more = queue.get_broadcasts(overhead, limit.saturating_sub(used), n);
            used += more.iter().map(|m| m.len() + overhead).sum::<usize>();
            messages.extend(more);
        }
        if self.intent_queue.take_finished().contains(&LEAVE_INTENT) {
            self.leave_intent_sent = true;
        }
        messages
    }

    fn local_state(&mut self, join: bool) -> Vec<u8> {
        self.encode_local_state(join)
    }

    fn merge_remote_state(&mut self, state: &[u8], join: bool) {
        if self.lifecycle == Lifecycle::Shutdown {
            return;
        }
        self.merge_state(state, join);
    }

    fn ack_payload(&mut self) -> Vec<u8> {
        self.coordinate_payload()
    }

    fn notify_ping_complete(&mut self, node: &Node, rtt: Duration, payload: &[u8]) {
        self.update_coordinate(&node.name, rtt, payload);
    }
}
