//! Member status model and join/leave intents (serf/serf.go `handleNode*`, `reap`,
//! `reconnect`, `upsertIntent`).
//!
//! Serf's view of a member combines memberlist's liveness (joined / dead) with Lamport-timed
//! intents gossiped by Serf itself: a leave intent that arrives before memberlist reports the
//! node dead turns `failed` into `left`. Intents about nodes we have not met yet are kept for
//! `recent_intent_timeout` and applied when memberlist introduces the node.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use super::lamport::{LamportClock, LamportTime};
use super::Event;
use crate::memberlist::MAX_NODES;

/// A member's status as Serf reports it (`serf members`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberStatus {
    /// Not known (Go's `StatusNone`).
    None,
    /// Alive.
    Alive,
    /// A leave intent was seen; waiting for memberlist to report the node gone.
    Leaving,
    /// Left gracefully.
    Left,
    /// Dead without a leave intent.
    Failed,
}

impl MemberStatus {
    /// Go's numeric value (0 none … 4 failed), as carried in `_serf_conflict` responses.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Alive => 1,
            Self::Leaving => 2,
            Self::Left => 3,
            Self::Failed => 4,
        }
    }
}

impl fmt::Display for MemberStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Alive => "alive",
            Self::Leaving => "leaving",
            Self::Left => "left",
            Self::Failed => "failed",
        })
    }
}

/// A cluster member as Serf sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Unique node name.
    pub name: String,
    /// Gossip address.
    pub addr: IpAddr,
    /// Gossip port (UDP and TCP).
    pub port: u16,
    /// Tags decoded from the node meta.
    pub tags: BTreeMap<String, String>,
    /// Serf status.
    pub status: MemberStatus,
    /// memberlist protocol min / max / current, then Serf protocol min / max / current (`Vsn`).
    pub versions: [u8; 6],
}

impl Member {
    /// The gossip address as one value.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

/// What memberlist tells Serf about a node when it joins or changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub addr: IpAddr,
    /// Gossip port.
    pub port: u16,
    /// Tags decoded from its meta.
    pub tags: BTreeMap<String, String>,
    /// Its `Vsn` bytes.
    pub versions: [u8; 6],
}

#[derive(Debug, Clone)]
struct MemberState {
    member: Member,
    status_ltime: LamportTime,
    /// When it became failed or left; reaping counts from here.
    leave_time: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntentKind {
    Join,
    Leave,
}

#[derive(Debug, Clone, Copy)]
struct NodeIntent {
    kind: IntentKind,
    wall_time: Instant,
    ltime: LamportTime,
}

/// What to do after an intent was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntentOutcome {
    /// New information: gossip the message on.
    Rebroadcast,
    /// Old or irrelevant: drop it.
    Ignore,
    /// A leave intent about ourselves while we are alive: answer with a join intent.
    Refute,
}

impl IntentOutcome {
    fn from_new(new: bool) -> Self {
        if new {
            Self::Rebroadcast
        } else {
            Self::Ignore
        }
    }
}

/// The most intents kept about nodes memberlist has not introduced yet (Go keeps them all for
/// `recent_intent_timeout`; a peer could name millions). Past it, such intents are dropped:
/// the node's status time then starts at its first intent after memberlist introduces it.
pub(crate) const MAX_RECENT_INTENTS: usize = 1024;

/// The most members the table holds. memberlist holds at most [`MAX_NODES`] at a time, but
/// Serf keeps failed and left members for a day; when full, the oldest of those are reaped
/// early, so a peer forging nodes cannot grow the table past this.
pub(crate) const MAX_MEMBERS: usize = 2 * MAX_NODES;

/// Serf's member table and member clock.
#[derive(Debug)]
pub(crate) struct Members {
    local_name: String,
    pub(crate) clock: LamportClock,
    members: BTreeMap<String, MemberState>,
    recent_intents: HashMap<String, NodeIntent>,
    /// Prunes (`Prune: true` leave intents) waiting to happen: erase at the instant.
    pending_prunes: Vec<(Instant, String)>,
}

impl Members {
    pub(crate) fn new(local_name: &str) -> Self {
        let mut clock = LamportClock::new();
        clock.increment();
        Self {
            local_name: local_name.to_owned(),
            clock,
            members: BTreeMap::new(),
            recent_intents: HashMap::new(),
            pending_prunes: Vec::new(),
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Member> {
        self.members.get(name).map(|state| &state.member)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.values().map(|state| &state.member)
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    #[cfg(test)]
    pub(crate) fn recent_intents(&self) -> usize {
        self.recent_intents.len()
    }

    #[cfg(test)]
    pub(crate) fn status_ltime(&self, name: &str) -> Option<LamportTime> {
        self.members.get(name).map(|state| state.status_ltime)
    }

    /// Every member's status Lamport time (push-pull `StatusLTimes`).
    pub(crate) fn status_ltimes(&self) -> BTreeMap<String, LamportTime> {
        self.members
            .iter()
            .map(|(name, state)| (name.clone(), state.status_ltime))
            .collect()
    }

    /// Names of left members (push-pull `LeftMembers`).
    pub(crate) fn left_names(&self) -> Vec<String> {
        self.with_status(MemberStatus::Left)
            .map(|member| member.name.clone())
            .collect()
    }

    pub(crate) fn with_status(&self, status: MemberStatus) -> impl Iterator<Item = &Member> {
        self.iter().filter(move |member| member.status == status)
    }

    /// True if some member other than us is alive (Go's `hasAliveMembers`).
    pub(crate) fn has_alive_peers(&self) -> bool {
        self.iter()
            .any(|member| member.name != self.local_name && member.status == MemberStatus::Alive)
    }

    /// memberlist reports a node joined (or came back).
    pub(crate) fn handle_node_join(
        &mut self,
        now: Instant,
        node: NodeInfo,
        events: &mut Vec<Event>,
    ) {
        if !self.members.contains_key(&node.name) && self.members.len() >= MAX_MEMBERS {
            self.evict_oldest_gone(events);
            if self.members.len() >= MAX_MEMBERS {
                tracing::debug!(node = %node.name, "member table full of live members, ignoring a join");
                return;
            }
        }
        let member = match self.members.get_mut(&node.name) {
            None => {
                let mut state = MemberState {
                    member: Member {
                        name: node.name.clone(),
                        addr: node.addr,
                        port: node.port,
                        tags: node.tags,
                        status: MemberStatus::Alive,
                        versions: node.versions,
                    },
                    status_ltime: LamportTime(0),
                    leave_time: None,
                };
                if let Some(intent) = self.recent_intents.get(&node.name) {
                    state.status_ltime = intent.ltime;
                    if intent.kind == IntentKind::Leave {
                        state.member.status = MemberStatus::Leaving;
                    }
                }
                self.members.entry(node.name.clone()).or_insert(state)
            }
            Some(state) => {
                if state.member.status == MemberStatus::Failed {
                    if let Some(dead_since) = state.leave_time {
                        tracing::debug!(node = %node.name, down = ?now.saturating_duration_since(dead_since), "failed member back");
                    }
                }
                state.member.status = MemberStatus::Alive;
                state.leave_time = None;
                state.member.addr = node.addr;
                state.member.port = node.port;
                state.member.tags = node.tags;
                state.member.versions = node.versions;
                state
            }
        };
        tracing::debug!(node = %member.member.name, addr = %member.member.addr, "member join");
        events.push(Event::MemberJoin(member.member.clone()));
    }

    /// Makes room in a full table: reaps the tenth of failed and left members that went
    /// longest ago (early, as a reap would later), so the next joins need no scan each.
    fn evict_oldest_gone(&mut self, events: &mut Vec<Event>) {
        let mut gone: Vec<(Instant, String)> = self
            .members
            .values()
            .filter_map(|state| Some((state.leave_time?, state.member.name.clone())))
            .collect();
        gone.sort_unstable();
        for (_, name) in gone.into_iter().take((MAX_MEMBERS / 10).max(1)) {
            if let Some(state) = self.members.remove(&name) {
                tracing::debug!(node = %name, status = %state.member.status, "member reap (table full)");
                events.push(Event::MemberReap(state.member));
            }
        }
    }

    /// memberlist reports a node dead (`left` is memberlist's view: dead from itself, which
    /// Serf does not use: only a prior leave intent makes `left`).
    pub(crate) fn handle_node_leave(&mut self, now: Instant, name: &str, events: &mut Vec<Event>) {
        let Some(state) = self.members.get_mut(name) else {
            return;
        };
        let event = match state.member.status {
            MemberStatus::Leaving => {
                state.member.status = MemberStatus::Left;
                Event::MemberLeave(state.member.clone())
            }
            MemberStatus::Alive => {
                state.member.status = MemberStatus::Failed;
                Event::MemberFailed(state.member.clone())
            }
            status => {
                tracing::debug!(node = name, %status, "leave in unexpected state");
                return;
            }
        };
        state.leave_time = Some(now);
        tracing::debug!(node = name, status = %state.member.status, "member gone");
        events.push(event);
    }

    /// memberlist reports new meta (tags), address or versions.
    pub(crate) fn handle_node_update(&mut self, node: NodeInfo, events: &mut Vec<Event>) {
        let Some(state) = self.members.get_mut(&node.name) else {
            return;
        };
        state.member.addr = node.addr;
        state.member.port = node.port;
        state.member.tags = node.tags;
        state.member.versions = node.versions;
        events.push(Event::MemberUpdate(state.member.clone()));
    }

    /// A join intent `{ltime, node}` arrived (or was made by us).
    pub(crate) fn handle_join_intent(
        &mut self,
        now: Instant,
        ltime: LamportTime,
        node: &str,
    ) -> IntentOutcome {
        self.clock.witness(ltime);
        let Some(state) = self.members.get_mut(node) else {
            return IntentOutcome::from_new(self.upsert_intent(now, node, IntentKind::Join, ltime));
        };
        if ltime <= state.status_ltime {
            return IntentOutcome::Ignore;
        }
        state.status_ltime = ltime;
        if state.member.status == MemberStatus::Leaving {
            state.member.status = MemberStatus::Alive;
        }
        IntentOutcome::Rebroadcast
    }

    /// A leave intent `{ltime, node, prune}` arrived (or was made by us). `local_alive` is
    /// whether we ourselves are alive (not leaving): only then is a leave about us refuted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle_leave_intent(
        &mut self,
        now: Instant,
        ltime: LamportTime,
        node: &str,
        prune: bool,
        local_alive: bool,
        prune_delay: Duration,
        events: &mut Vec<Event>,
    ) -> IntentOutcome {
        self.clock.witness(ltime);
        let Some(state) = self.members.get_mut(node) else {
            return IntentOutcome::from_new(self.upsert_intent(
                now,
                node,
                IntentKind::Leave,
                ltime,
            ));
        };
        if ltime <= state.status_ltime {
            return IntentOutcome::Ignore;
        }
        if node == self.local_name && local_alive {
            tracing::debug!(%ltime, "refuting an older leave intent");
            return IntentOutcome::Refute;
        }
        state.status_ltime = ltime;
        let outcome = match state.member.status {
            MemberStatus::Alive => {
                state.member.status = MemberStatus::Leaving;
                IntentOutcome::Rebroadcast
            }
            MemberStatus::Failed => {
                state.member.status = MemberStatus::Left;
                events.push(Event::MemberLeave(state.member.clone()));
                IntentOutcome::Rebroadcast
            }
            MemberStatus::Leaving | MemberStatus::Left => IntentOutcome::Rebroadcast,
            MemberStatus::None => return IntentOutcome::Ignore,
        };
        if prune {
            let at = if state.member.status == MemberStatus::Leaving {
                now + prune_delay
            } else {
                now
            };
            self.pending_prunes.push((at, node.to_owned()));
            self.run_prunes(now, events);
        }
        outcome
    }

    fn upsert_intent(
        &mut self,
        now: Instant,
        node: &str,
        kind: IntentKind,
        ltime: LamportTime,
    ) -> bool {
        match self.recent_intents.get(node) {
            Some(existing) if ltime <= existing.ltime => false,
            None if self.recent_intents.len() >= MAX_RECENT_INTENTS => {
                tracing::debug!(node, "too many intents about unknown nodes, dropping one");
                false
            }
            _ => {
                self.recent_intents.insert(
                    node.to_owned(),
                    NodeIntent {
                        kind,
                        wall_time: now,
                        ltime,
                    },
                );
                true
            }
        }
    }

    /// Erases members whose prune time has come; returns the erased members.
    pub(crate) fn run_prunes(&mut self, now: Instant, events: &mut Vec<Event>) -> Vec<Member> {
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending_prunes
            .drain(..)
            .partition(|(at, _)| *at <= now);
        self.pending_prunes = later;
        let mut erased = Vec::new();
        for (_, name) in due {
            if let Some(state) = self.members.remove(&name) {
                tracing::debug!(node = %name, "member reap (forced)");
                events.push(Event::MemberReap(state.member.clone()));
                erased.push(state.member);
            }
        }
        erased
    }

    /// The earliest pending prune.
    pub(crate) fn next_prune(&self) -> Option<Instant> {
        self.pending_prunes.iter().map(|(at, _)| *at).min()
    }

    /// One reap pass: erase failed members down longer than `reconnect_timeout` and left ones
    /// longer than `tombstone_timeout`; forget intents older than `intent_timeout`.
    pub(crate) fn reap(
        &mut self,
        now: Instant,
        reconnect_timeout: Duration,
        tombstone_timeout: Duration,
        intent_timeout: Duration,
        events: &mut Vec<Event>,
    ) -> Vec<Member> {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|state| {
                let timeout = match state.member.status {
                    MemberStatus::Failed => reconnect_timeout,
                    MemberStatus::Left => tombstone_timeout,
                    _ => return false,
                };
                state
                    .leave_time
                    .is_some_and(|since| now.saturating_duration_since(since) > timeout)
            })
            .map(|state| state.member.name.clone())
            .collect();
        let mut erased = Vec::new();
        for name in expired {
            if let Some(state) = self.members.remove(&name) {
                tracing::debug!(node = %name, status = %state.member.status, "member reap");
                events.push(Event::MemberReap(state.member.clone()));
                erased.push(state.member);
            }
        }
        self.recent_intents
            .retain(|_, intent| now.saturating_duration_since(intent.wall_time) <= intent_timeout);
        erased
    }

    /// Serf's reconnect choice: with probability failed/alive (alive counted as members minus
    /// failed minus left, at least 1), one failed member picked at random.
    pub(crate) fn reconnect_target<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<&Member> {
        let failed: Vec<&Member> = self.with_status(MemberStatus::Failed).collect();
        if failed.is_empty() {
            return None;
        }
        let left = self.with_status(MemberStatus::Left).count();
        let alive = (self.members.len() - failed.len() - left).max(1);
        let probability = failed.len() as f32 / alive as f32;
        if rng.random::<f32>() > probability {
            tracing::debug!("forgoing reconnect for random throttling");
            return None;
        }
        Some(failed[rng.random_range(0..failed.len())])
    }
}
