//! The Serf layer's commands and timers, given the memberlist core: what Go's `serf.Serf`
//! methods do (`Join`, `Leave`, `SetTags`, `UserEvent`, `Query`, `handleReap`,
//! `handleReconnect`, `resolveNodeConflict`) and how memberlist's node events reach the member
//! table. [`super::Serf`] calls these.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;

use super::internal;
use super::internal::ConflictResolution;
use super::query::{default_query_timeout, QueryHandle, QueryParams};
use super::state::{LeavePhase, Lifecycle, SerfState, LEAVE_INTENT};
use super::{encode_meta, Error, Event, LamportTime, USER_EVENT_SIZE_HARD_LIMIT};
use crate::memberlist::{self, JoinId, Memberlist, META_MAX_SIZE};
use crate::wire::serf::{self as wire, SerfMessage, QUERY_FLAG_ACK};

impl SerfState {
    /// Records the time of the input being handled and memberlist's size.
    pub(crate) fn enter(&mut self, now: Instant, memberlist: &Memberlist) {
        self.now = now;
        self.n_members = memberlist.num_members();
    }

    pub(crate) fn require_alive(&self, command: &'static str) -> Result<(), Error> {
        match self.lifecycle {
            Lifecycle::Alive => Ok(()),
            state => Err(Error::NotAlive { command, state }),
        }
    }

    /// Serf's own next deadline (reap, reconnect, queries, prunes, leave phases).
    pub(crate) fn own_timeout(&self) -> Option<Instant> {
        if self.lifecycle == Lifecycle::Shutdown {
            return None;
        }
        let leave = match self.leave {
            Some(LeavePhase::Intent { deadline }) => Some(deadline),
            Some(LeavePhase::Propagate { until }) => Some(until),
            _ => None,
        };
        [
            Some(self.next_reap),
            Some(self.next_reconnect),
            Some(self.next_queue_check),
            self.queries.next_deadline(),
            self.members.next_prune(),
            leave,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Serf's timers: reap, reconnect, query deadlines, prunes, leave phases.
    pub(crate) fn handle_own_timeout(&mut self, now: Instant, memberlist: &mut Memberlist) {
        if self.lifecycle == Lifecycle::Shutdown {
            return;
        }
        self.enter(now, memberlist);
        if now >= self.next_reap {
            self.next_reap = now + self.config.reap_interval;
            let (reconnect, tombstone, intents) = (
                self.config.reconnect_timeout,
                self.config.tombstone_timeout,
                self.config.recent_intent_timeout,
            );
            let events_before = self.events.len();
            self.members
                .reap(now, reconnect, tombstone, intents, &mut self.events);
            self.forget_reaped(events_before);
        }
        if now >= self.next_reconnect {
            self.next_reconnect = now + self.config.reconnect_interval;
            let target = self
                .members
                .reconnect_target(&mut self.rng)
                .map(|member| (member.name.clone(), member.socket_addr()));
            if let Some((name, addr)) = target {
                tracing::debug!(node = %name, %addr, "attempting reconnect");
                if let Err(error) = memberlist.join(now, &[addr], self) {
                    tracing::debug!(%error, "reconnect refused");
                }
            }
        }
        if now >= self.next_queue_check {
            self.next_queue_check = now + self.config.queue_check_interval;
            self.check_queue_depths();
        }
        let events_before = self.events.len();
        self.members.run_prunes(now, &mut self.events);
        self.forget_reaped(events_before);
        let mut expired = Vec::new();
        self.queries.expire(now, &mut expired);
        for event in expired {
            match (&event, &self.conflict) {
                (Event::QueryDone { query }, Some(conflict)) if *query == conflict.query => {
                    self.resolve_conflict();
                }
                _ => self.events.push(event),
            }
        }
        match self.leave {
            Some(LeavePhase::Intent { deadline }) if now >= deadline => {
                tracing::debug!("timeout while waiting for the leave intent to spread");
                self.leave_memberlist(now, memberlist);
            }
            Some(LeavePhase::Propagate { until }) if now >= until => self.finish_leave(),
            _ => {}
        }
        self.flush(now, memberlist);
    }

    /// Moves queued direct sends into memberlist and notices a finished leave intent.
    pub(crate) fn flush(&mut self, now: Instant, memberlist: &mut Memberlist) {
        loop {
            let mut progressed = false;
            for (to, message) in std::mem::take(&mut self.sends) {
                progressed = true;
                memberlist.send_user(now, to, &message);
            }
            if self.intent_queue.take_finished().contains(&LEAVE_INTENT) {
                self.leave_intent_sent = true;
            }
            if self.leave_intent_sent {
                self.leave_intent_sent = false;
                if matches!(self.leave, Some(LeavePhase::Intent { .. })) {
                    progressed = true;
                    self.leave_memberlist(now, memberlist);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// The sans-IO pump: memberlist's events into the Serf layer, Serf's sends into
    /// memberlist, until both are quiet.
    pub(crate) fn pump(&mut self, now: Instant, memberlist: &mut Memberlist) {
        loop {
            self.flush(now, memberlist);
            let Some(event) = memberlist.poll_event() else {
                return;
            };
            self.handle_memberlist_event(now, &event, memberlist);
        }
    }

    /// One memberlist event: node join / update / leave, join and leave completion, conflicts.
    pub(crate) fn handle_memberlist_event(
        &mut self,
        now: Instant,
        event: &memberlist::Event,
        memberlist: &mut Memberlist,
    ) {
        self.enter(now, memberlist);
        match event {
            memberlist::Event::NodeJoined(node) => {
                if node.name == self.config.node_name {
                    self.local_addr = node.addr;
                }
                self.members
                    .handle_node_join(now, Self::node_info(node), &mut self.events);
            }
            memberlist::Event::NodeUpdated(node) => {
                self.members
                    .handle_node_update(Self::node_info(node), &mut self.events);
            }
            memberlist::Event::NodeLeft(node) | memberlist::Event::NodeFailed(node) => {
                self.members
                    .handle_node_leave(now, &node.name, &mut self.events);
            }
            memberlist::Event::JoinCompleted {
                join,
                contacted,
                errors,
            } => {
                let Some(ignore_old) = self.joins.remove(join) else {
                    tracing::debug!(contacted, "reconnect finished");
                    return;
                };
                if ignore_old {
                    self.ignore_old_events = self.joins.values().any(|ignore| *ignore);
                }
                if *contacted > 0 {
                    let ltime = self.members.clock.time();
                    self.broadcast_join(ltime);
                }
                self.events.push(Event::JoinCompleted {
                    join: *join,
                    contacted: *contacted,
                    errors: errors.clone(),
                });
            }
            memberlist::Event::LeaveCompleted { broadcast_sent } => {
                tracing::debug!(broadcast_sent, "memberlist leave done");
                if self.leave == Some(LeavePhase::Memberlist) {
                    self.leave = Some(LeavePhase::Propagate {
                        until: now + self.config.leave_propagate_delay,
                    });
                }
            }
            memberlist::Event::Conflict { existing, other } => {
                if existing.name != self.config.node_name {
                    tracing::debug!(node = %existing.name, existing = %existing.addr, other = %other.addr, "name conflict between other members");
                    return;
                }
                tracing::debug!(other = %other.addr, "another node claims our name");
                if self.config.enable_name_conflict_resolution && self.conflict.is_none() {
                    let name = self.config.node_name.clone();
                    let params = QueryParams::default();
                    match self.start_query(
                        now,
                        memberlist,
                        internal::CONFLICT,
                        name.as_bytes(),
                        &params,
                    ) {
                        Ok(query) => {
                            self.conflict = Some(ConflictResolution {
                                query,
                                other: other.addr,
                                responses: 0,
                                matching: 0,
                            });
                        }
                        Err(error) => tracing::debug!(%error, "cannot start name resolution"),
                    }
                }
            }
        }
        self.flush(now, memberlist);
    }

    pub(crate) fn join(
        &mut self,
        now: Instant,
        memberlist: &mut Memberlist,
        seeds: &[SocketAddr],
        ignore_old: bool,
    ) -> Result<JoinId, Error> {
        self.require_alive("join")?;
        self.enter(now, memberlist);
        if ignore_old {
            self.ignore_old_events = true;
        }
        let join = memberlist.join(now, seeds, self)?;
        self.joins.insert(join, ignore_old);
        Ok(join)
    }

    pub(crate) fn leave(&mut self, now: Instant, memberlist: &mut Memberlist) -> Result<(), Error> {
        match self.lifecycle {
            Lifecycle::Alive => {}
            Lifecycle::Left => return Ok(()),
            state => {
                return Err(Error::NotAlive {
                    command: "leave",
                    state,
                })
            }
        }
        self.enter(now, memberlist);
        self.lifecycle = Lifecycle::Leaving;
        let leave = wire::Leave {
            ltime: self.members.clock.time().0,
            node: self.config.node_name.clone(),
            prune: false,
        };
        self.members.clock.increment();
        self.apply_leave_intent(&leave);
        if self.members.has_alive_peers() {
            self.intent_queue
                .push(None, SerfMessage::Leave(leave).encode(), Some(LEAVE_INTENT));
            self.leave = Some(LeavePhase::Intent {
                deadline: now + self.config.broadcast_timeout,
            });
        } else {
            self.leave_memberlist(now, memberlist);
        }
        self.flush(now, memberlist);
        Ok(())
    }

    pub(crate) fn set_tags(
        &mut self,
        now: Instant,
        memberlist: &mut Memberlist,
        tags: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let meta = encode_meta(&tags, self.config.protocol_version);
        if meta.len() > META_MAX_SIZE {
            return Err(Error::TagsTooLarge {
                tags,
                len: meta.len(),
                limit: META_MAX_SIZE,
            });
        }
        self.enter(now, memberlist);
        memberlist.update_meta(now, meta)?;
        self.config.tags = tags;
        Ok(())
    }

    pub(crate) fn user_event(
        &mut self,
        now: Instant,
        name: &str,
        payload: &[u8],
        coalesce: bool,
    ) -> Result<(), Error> {
        let limit = self.config.user_event_size_limit;
        let too_large = |len: usize, stage: &'static str| {
            let (kind, limit) = if len > limit {
                ("configured", limit)
            } else {
                ("sane", USER_EVENT_SIZE_HARD_LIMIT)
            };
            (len > limit).then(|| Error::UserEventTooLarge {
                name: name.to_owned(),
                len,
                stage,
                kind,
                limit,
            })
        };
        if let Some(error) = too_large(name.len() + payload.len(), "before encoding") {
            return Err(error);
        }
        let event = wire::UserEvent {
            ltime: self.user_events.clock.time().0,
            name: name.to_owned(),
            payload: payload.to_vec(),
            cc: coalesce,
        };
        let raw = SerfMessage::UserEvent(event.clone()).encode();
        if let Some(error) = too_large(raw.len(), "after encoding") {
            return Err(error);
        }
        self.now = now;
        self.user_events.clock.increment();
        self.apply_user_event(&event);
        self.event_queue.push(None, raw, None);
        Ok(())
    }

    pub(crate) fn default_query_timeout(&self, memberlist: &Memberlist) -> Duration {
        default_query_timeout(
            memberlist.config().gossip_interval,
            self.config.query_timeout_mult,
            memberlist.num_alive(),
        )
    }

    pub(crate) fn start_query(
        &mut self,
        now: Instant,
        memberlist: &mut Memberlist,
        name: &str,
        payload: &[u8],
        params: &QueryParams,
    ) -> Result<QueryHandle, Error> {
        if self.config.protocol_version < 4 {
            return Err(Error::QueriesNotSupported {
                protocol_version: self.config.protocol_version,
            });
        }
        self.enter(now, memberlist);
        let timeout = params
            .timeout
            .unwrap_or_else(|| self.default_query_timeout(memberlist));
        let local = memberlist.local_node();
        let query = wire::Query {
            ltime: self.queries.clock.time().0,
            id: self.rng.random_range(0..i32::MAX as u32),
            addr: wire::ip_to_bytes(local.addr.ip()),
            port: local.addr.port(),
            source_node: local.name,
            filters: params.filters().iter().map(wire::Filter::encode).collect(),
            flags: if params.request_ack {
                QUERY_FLAG_ACK
            } else {
                0
            },
            relay_factor: params.relay_factor,
            timeout,
            name: name.to_owned(),
            payload: payload.to_vec(),
        };
        let raw = SerfMessage::Query(query.clone()).encode();
        if raw.len() > self.config.query_size_limit {
            return Err(Error::QueryTooLarge {
                name: name.to_owned(),
                len: raw.len(),
                limit: self.config.query_size_limit,
            });
        }
        let handle = QueryHandle {
            ltime: LamportTime(query.ltime),
            id: query.id,
        };
        self.queries
            .register(handle, params.request_ack, now + timeout);
        self.apply_query(&query);
        self.query_queue.push(None, raw, None);
        Ok(handle)
    }

    /// Go's `checkQueueDepth`: warn about deep broadcast queues and prune them to the limit.
    fn check_queue_depths(&mut self) {
        let max = if self.config.min_queue_depth > 0 {
            (2 * self.members.len()).max(self.config.min_queue_depth)
        } else {
            self.config.max_queue_depth
        };
        let warning = self.config.queue_depth_warning;
        for (name, queue) in [
            ("intent", &mut self.intent_queue),
            ("event", &mut self.event_queue),
            ("query", &mut self.query_queue),
        ] {
            let depth = queue.len();
            if depth >= warning {
                tracing::debug!(queue = name, depth, "deep broadcast queue");
            }
            if depth > max {
                tracing::debug!(
                    queue = name,
                    depth,
                    limit = max,
                    "broadcast queue over its limit, dropping messages"
                );
                queue.prune(max);
            }
        }
    }

    fn resolve_conflict(&mut self) {
        let Some(conflict) = self.conflict.take() else {
            return;
        };
        let majority = conflict.responses / 2 + 1;
        if conflict.matching >= majority {
            tracing::debug!(
                matching = conflict.matching,
                responses = conflict.responses,
                "majority in name conflict resolution"
            );
            return;
        }
        tracing::debug!(
            matching = conflict.matching,
            responses = conflict.responses,
            "minority in name conflict resolution, shutting down"
        );
        self.lifecycle = Lifecycle::Shutdown;
        self.events.push(Event::NameConflict {
            name: self.config.node_name.clone(),
            other: conflict.other,
            responses: conflict.responses,
            matching: conflict.matching,
        });
    }

    fn leave_memberlist(&mut self, now: Instant, memberlist: &mut Memberlist) {
        self.leave = Some(LeavePhase::Memberlist);
        memberlist.leave(now, self.config.broadcast_timeout);
    }

    fn finish_leave(&mut self) {
        self.leave = None;
        if self.lifecycle != Lifecycle::Shutdown {
            self.lifecycle = Lifecycle::Left;
        }
        self.events.push(Event::LeaveCompleted);
    }
}
