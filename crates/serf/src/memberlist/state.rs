//! The node table and the SWIM state transitions (ml/state.go `aliveNode`, `suspectNode`,
//! `deadNode`, `refute`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;
use tracing::debug;

use super::suspicion::Suspicion;
use super::timer::Timer;
use super::{
    ip_from_bytes, suspicion_timeout, Event, Incarnation, Memberlist, Node, NodeState, Vsn,
    LEAVE_TOKEN, MAX_NODES, MAX_NODE_NAME_BYTES, META_MAX_SIZE,
};
use crate::wire::memberlist::{Alive, Dead, Message, Suspect};

/// One member in the table.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// `Addr` exactly as the member sent it (4 or 16 bytes), re-sent verbatim.
    pub(crate) addr_bytes: Vec<u8>,
    pub(crate) meta: Vec<u8>,
    /// Raw version bytes as received (0 or 6 bytes).
    pub(crate) vsn_bytes: Vec<u8>,
    pub(crate) incarnation: u32,
    pub(crate) state: NodeState,
    pub(crate) state_change: Instant,
}

impl Entry {
    pub(crate) fn vsn(&self) -> Vsn {
        Vsn(<[u8; 6]>::try_from(self.vsn_bytes.as_slice()).unwrap_or([0; 6]))
    }

    pub(crate) fn to_node(&self) -> Node {
        Node {
            name: self.name.clone(),
            addr: self.addr,
            meta: self.meta.clone(),
            vsn: self.vsn(),
            state: self.state,
            incarnation: Incarnation(self.incarnation),
        }
    }

    pub(crate) fn is_dead_or_left(&self) -> bool {
        matches!(self.state, NodeState::Dead | NodeState::Left)
    }
}

/// Members by name, plus the shuffled probe order (ml/state.go `nodes` and `nodeMap`).
#[derive(Debug, Default)]
pub(crate) struct NodeTable {
    by_name: BTreeMap<String, Entry>,
    order: Vec<String>,
}

impl NodeTable {
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name)
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.by_name.get_mut(name)
    }

    /// Entries in name order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.by_name.values()
    }

    /// The entry at `index` of the probe order.
    pub(crate) fn at(&self, index: usize) -> Option<&Entry> {
        self.order
            .get(index)
            .and_then(|name| self.by_name.get(name))
    }

    /// Inserts at a random position of the probe order, as Go does.
    pub(crate) fn insert(&mut self, entry: Entry, rng: &mut impl Rng) {
        let n = self.order.len();
        self.order.push(entry.name.clone());
        if n > 0 {
            let offset = rng.random_range(0..n);
            self.order.swap(offset, n);
        }
        self.by_name.insert(entry.name.clone(), entry);
    }

    /// Drops members dead or left for longer than `keep_dead` and reshuffles the probe order
    /// (ml/state.go `resetNodes`, as memberlist does since it fixed `moveDeadNodes`; Debian's
    /// 0.2.2 drops only dead ones, so left members piled up). Never drops `local`.
    pub(crate) fn reset(
        &mut self,
        now: Instant,
        keep_dead: std::time::Duration,
        local: &str,
        rng: &mut impl Rng,
    ) {
        let by_name = &mut self.by_name;
        self.order.retain(|name| {
            let expired = by_name.get(name).is_some_and(|entry| {
                entry.is_dead_or_left()
                    && entry.name != local
                    && now.saturating_duration_since(entry.state_change) > keep_dead
            });
            if expired {
                by_name.remove(name);
            }
            !expired
        });
        // Fisher-Yates with the core's RNG, for reproducible simulations.
        for i in (1..self.order.len()).rev() {
            let j = rng.random_range(0..=i);
            self.order.swap(i, j);
        }
    }

    /// Up to `k` distinct random entries that pass `keep` (ml/util.go `kRandomNodes`).
    pub(crate) fn random(
        &self,
        k: usize,
        rng: &mut impl Rng,
        keep: impl Fn(&Entry) -> bool,
    ) -> Vec<Entry> {
        let n = self.order.len();
        let mut picked: Vec<Entry> = Vec::with_capacity(k);
        if n == 0 {
            return picked;
        }
        for _ in 0..3 * n {
            if picked.len() >= k {
                break;
            }
            let Some(entry) = self.at(rng.random_range(0..n)) else {
                continue;
            };
            if !keep(entry) || picked.iter().any(|other| other.name == entry.name) {
                continue;
            }
            picked.push(entry.clone());
        }
        picked
    }
}

impl Memberlist {
    /// Handles an alive message (ml/state.go `aliveNode`). `bootstrap` is set for our own
    /// alive messages (start, meta update): they update us instead of being refuted.
    pub(crate) fn alive_node(&mut self, now: Instant, mut alive: Alive, bootstrap: bool) {
        let is_local = alive.node == self.local_name;
        if is_local && self.has_left() {
            return;
        }
        if !alive.vsn.is_empty() {
            // Go crashes on 1..5 version bytes; we refuse anything but six.
            let bad_range = alive.vsn.len() >= 3
                && (alive.vsn[0] == 0 || alive.vsn[1] == 0 || alive.vsn[0] > alive.vsn[1]);
            if alive.vsn.len() != 6 || bad_range {
                debug!(node = %alive.node, vsn = ?alive.vsn, "ignoring alive with bad protocol versions");
                return;
            }
        }
        if alive.node.len() > MAX_NODE_NAME_BYTES || alive.meta.len() > META_MAX_SIZE {
            debug!(
                name_len = alive.node.len(),
                meta_len = alive.meta.len(),
                "ignoring alive with an oversized name or meta"
            );
            return;
        }
        let Some(ip) = ip_from_bytes(&alive.addr) else {
            debug!(node = %alive.node, addr = ?alive.addr, "ignoring alive with a bad address");
            return;
        };
        if alive.port == 0 {
            alive.port = self.local_addr.port();
        }
        let addr = SocketAddr::new(ip, alive.port);
        let mut updates_node = false;
        match self.nodes.get(&alive.node) {
            None => {
                if alive.incarnation == 0 {
                    debug!(node = %alive.node, "ignoring alive with incarnation 0");
                    return;
                }
                if self.nodes.len() >= MAX_NODES {
                    debug!(node = %alive.node, "node table full, ignoring a new node");
                    return;
                }
                let entry = Entry {
                    name: alive.node.clone(),
                    addr,
                    addr_bytes: alive.addr.clone(),
                    meta: alive.meta.clone(),
                    vsn_bytes: alive.vsn.clone(),
                    incarnation: 0,
                    state: NodeState::Dead,
                    state_change: now,
                };
                self.nodes.insert(entry, &mut self.rng);
            }
            Some(entry) if entry.addr != addr => {
                let reclaimable = self.config.dead_node_reclaim_time.is_some_and(|reclaim| {
                    now.saturating_duration_since(entry.state_change) > reclaim
                });
                if entry.state == NodeState::Left || (entry.state == NodeState::Dead && reclaimable)
                {
                    debug!(node = %alive.node, old = %entry.addr, new = %addr, "updating address of a left or dead member");
                    updates_node = true;
                } else {
                    debug!(node = %alive.node, mine = %entry.addr, theirs = %addr, "conflicting address");
                    let existing = entry.to_node();
                    let other = Node {
                        name: alive.node.clone(),
                        addr,
                        meta: alive.meta.clone(),
                        vsn: Vsn(<[u8; 6]>::try_from(alive.vsn.as_slice()).unwrap_or([0; 6])),
                        state: NodeState::Alive,
                        incarnation: Incarnation(alive.incarnation),
                    };
                    self.events.push_back(Event::Conflict { existing, other });
                    return;
                }
            }
            Some(_) => {}
        }
        let entry = self
            .nodes
            .get(&alive.node)
            .expect("the entry exists: found or inserted above");
        if alive.incarnation <= entry.incarnation && !is_local && !updates_node {
            return;
        }
        if alive.incarnation < entry.incarnation && is_local {
            return;
        }
        self.suspicions.remove(&alive.node);
        let old_state = entry.state;
        let old_meta = entry.meta.clone();
        if !bootstrap && is_local {
            if alive.incarnation == entry.incarnation
                && alive.meta == entry.meta
                && alive.vsn == entry.vsn_bytes
            {
                return;
            }
            debug!(
                incarnation = alive.incarnation,
                "refuting an alive message about us"
            );
            self.refute(alive.incarnation);
        } else {
            let name = alive.node.clone();
            let message = Message::Alive(alive.clone()).to_bytes();
            self.broadcasts.push(Some(name), message, None);
            let entry = self
                .nodes
                .get_mut(&alive.node)
                .expect("the entry exists: found or inserted above");
            if !alive.vsn.is_empty() {
                entry.vsn_bytes = alive.vsn;
            }
            entry.incarnation = alive.incarnation;
            entry.meta = alive.meta;
            entry.addr = addr;
            entry.addr_bytes = alive.addr;
            if entry.state != NodeState::Alive {
                entry.state = NodeState::Alive;
                entry.state_change = now;
            }
        }
        let entry = self
            .nodes
            .get(&alive.node)
            .expect("the entry exists: found or inserted above");
        if matches!(old_state, NodeState::Dead | NodeState::Left) {
            debug!(node = %entry.name, addr = %entry.addr, "member joined");
            self.events.push_back(Event::NodeJoined(entry.to_node()));
        } else if old_meta != entry.meta {
            debug!(node = %entry.name, "member updated");
            self.events.push_back(Event::NodeUpdated(entry.to_node()));
        }
    }

    /// Handles a suspect message (ml/state.go `suspectNode`).
    pub(crate) fn suspect_node(&mut self, now: Instant, suspect: Suspect) {
        let Some(entry) = self.nodes.get(&suspect.node) else {
            return;
        };
        if suspect.incarnation < entry.incarnation {
            return;
        }
        if let Some(suspicion) = self.suspicions.get_mut(&suspect.node) {
            if suspicion.confirm(&suspect.from) {
                let deadline = suspicion.deadline();
                self.timers.set(
                    deadline,
                    Timer::Suspicion {
                        node: suspect.node.clone(),
                    },
                );
                let name = suspect.node.clone();
                self.broadcasts
                    .push(Some(name), Message::Suspect(suspect).to_bytes(), None);
            }
            return;
        }
        if entry.state != NodeState::Alive {
            return;
        }
        if suspect.node == self.local_name {
            debug!(from = %suspect.from, "refuting a suspect message");
            self.refute(suspect.incarnation);
            return;
        }
        debug!(node = %suspect.node, from = %suspect.from, "member suspected");
        let name = suspect.node.clone();
        self.broadcasts.push(
            Some(name.clone()),
            Message::Suspect(suspect.clone()).to_bytes(),
            None,
        );
        let entry = self
            .nodes
            .get_mut(&name)
            .expect("the entry was found above");
        entry.incarnation = suspect.incarnation;
        entry.state = NodeState::Suspect;
        entry.state_change = now;
        let n = self.nodes.len();
        let mut expected = self.config.suspicion_mult.saturating_sub(2);
        if n < 2 || n - 2 < expected {
            expected = 0;
        }
        let min = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval);
        let max = min * self.config.suspicion_max_timeout_mult as u32;
        let suspicion = Suspicion::new(&suspect.from, expected as u32, min, max, now);
        self.timers.set(
            suspicion.deadline(),
            Timer::Suspicion { node: name.clone() },
        );
        self.suspicions.insert(name, suspicion);
    }

    /// A suspicion timer fired: declare the member dead if it is still suspect.
    pub(crate) fn suspicion_expired(&mut self, now: Instant, node: &str) {
        let Some(suspicion) = self.suspicions.get(node) else {
            return;
        };
        if suspicion.deadline() > now {
            return;
        }
        let confirmations = suspicion.confirmations();
        self.suspicions.remove(node);
        let Some(entry) = self.nodes.get(node) else {
            return;
        };
        if entry.state != NodeState::Suspect {
            return;
        }
        debug!(
            node,
            confirmations, "suspect timeout reached, marking failed"
        );
        let dead = Dead {
            incarnation: entry.incarnation,
            node: node.to_owned(),
            from: self.local_name.clone(),
        };
        self.dead_node(now, dead);
    }

    /// Handles a dead message (ml/state.go `deadNode`).
    pub(crate) fn dead_node(&mut self, now: Instant, dead: Dead) {
        let Some(entry) = self.nodes.get(&dead.node) else {
            return;
        };
        if dead.incarnation < entry.incarnation {
            return;
        }
        self.suspicions.remove(&dead.node);
        if entry.is_dead_or_left() {
            return;
        }
        let name = dead.node.clone();
        if name == self.local_name {
            if !self.has_left() {
                debug!(from = %dead.from, "refuting a dead message");
                self.refute(dead.incarnation);
                return;
            }
            self.broadcasts.push(
                Some(name.clone()),
                Message::Dead(dead.clone()).to_bytes(),
                Some(LEAVE_TOKEN),
            );
        } else {
            self.broadcasts.push(
                Some(name.clone()),
                Message::Dead(dead.clone()).to_bytes(),
                None,
            );
        }
        let entry = self
            .nodes
            .get_mut(&name)
            .expect("the entry was found above");
        entry.incarnation = dead.incarnation;
        entry.state = if dead.node == dead.from {
            NodeState::Left
        } else {
            NodeState::Dead
        };
        entry.state_change = now;
        let node = entry.to_node();
        debug!(node = %node.name, state = ?node.state, "member gone");
        self.events.push_back(match node.state {
            NodeState::Left => Event::NodeLeft(node),
            _ => Event::NodeFailed(node),
        });
    }

    /// Refutes an accusation about us at `accused` incarnation: bump ours past it and
    /// broadcast a fresh alive (ml/state.go `refute`).
    pub(crate) fn refute(&mut self, accused: u32) {
        self.stats.refutes += 1;
        self.awareness.apply_delta(1);
        let local_name = self.local_name.clone();
        let entry = self
            .nodes
            .get_mut(&local_name)
            .expect("the local node is inserted at construction and never removed");
        let mut incarnation = entry.incarnation.saturating_add(1);
        if accused >= incarnation {
            incarnation = accused.saturating_add(1);
        }
        entry.incarnation = incarnation;
        let alive = Alive {
            incarnation,
            node: entry.name.clone(),
            addr: entry.addr_bytes.clone(),
            port: entry.addr.port(),
            meta: entry.meta.clone(),
            vsn: entry.vsn_bytes.clone(),
        };
        self.broadcasts
            .push(Some(local_name), Message::Alive(alive).to_bytes(), None);
    }
}
