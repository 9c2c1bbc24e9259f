//! A deterministic simulation of N sans-IO [`Core`]s: a virtual clock, one seeded RNG, and a
//! network with delay, loss and partitions. TCP streams are modelled as ordered, lossless
//! pipes that fail to open across a partition or to a killed member.
//!
//! [`Sim`] runs any core: [`crate::serf::Serf`], the member the agent ships (`tests/serf_sim.rs`,
//! cores added with [`Sim::add`]), or [`Gossip`], a bare memberlist with a small flooding
//! delegate ([`Sim::new`], `tests/sim/`, `crates/bench`). [`Net::fixed`] is a FIFO network
//! with one fixed delay.
//!
//! Behind the `sim` feature. Test and benchmark support, not product: it panics when a core
//! sends a packet another core cannot decode. It counts what the cores send
//! ([`Sim::bytes_sent`]: datagram payloads and stream bytes, no IP/UDP/TCP headers).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::core::Core;
use crate::memberlist::{
    BroadcastQueue, Config, Delegate, Event, LocalNode, Memberlist, NodeState, StreamId,
    StreamInput, Transmit,
};
use crate::wire::DecodeError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Network conditions.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    /// Minimum one-way delay.
    pub min_delay: Duration,
    /// Maximum one-way delay.
    pub max_delay: Duration,
    /// Probability that a UDP packet is lost.
    pub loss: f64,
}

impl Net {
    /// No loss and one fixed delay: a FIFO network (nothing is reordered).
    pub fn fixed(delay: Duration) -> Self {
        Self {
            min_delay: delay,
            max_delay: delay,
            loss: 0.0,
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

#[derive(Debug)]
enum Delivery {
    Packet { from: SocketAddr, bytes: Vec<u8> },
    Data { stream: StreamId, bytes: Vec<u8> },
    Closed { stream: StreamId },
    Failed { stream: StreamId },
}

/// A small stand-in for the Serf layer, through the `Delegate` seam: it floods user messages
/// (re-broadcasting each new one once through its own `BroadcastQueue`) and sends its name as
/// push-pull user state.
pub struct SimDelegate {
    name: String,
    queue: BroadcastQueue,
    n_members: usize,
    /// User messages received or originated, in order, without duplicates.
    pub messages: Vec<Vec<u8>>,
    /// Remote push-pull user states merged, with the join flag.
    pub remote_states: Vec<(Vec<u8>, bool)>,
}

impl SimDelegate {
    fn new(name: String) -> Self {
        Self {
            name,
            queue: BroadcastQueue::new(4),
            n_members: 1,
            messages: Vec::new(),
            remote_states: Vec::new(),
        }
    }

    fn remember(&mut self, message: &[u8]) {
        if !self.messages.iter().any(|seen| seen == message) {
            self.messages.push(message.to_vec());
            self.queue.push(None, message.to_vec(), None);
        }
    }
}

impl Delegate for SimDelegate {
    fn notify_user_msg(&mut self, message: &[u8]) {
        self.remember(message);
    }

    fn broadcasts(&mut self, overhead: usize, limit: usize) -> Vec<Vec<u8>> {
        self.queue.get_broadcasts(overhead, limit, self.n_members)
    }

    fn local_state(&mut self, _join: bool) -> Vec<u8> {
        self.name.as_bytes().to_vec()
    }

    fn merge_remote_state(&mut self, state: &[u8], join: bool) {
        self.remote_states.push((state.to_vec(), join));
    }
}

/// A bare memberlist core with a [`SimDelegate`], as one [`Core`]: the member of the
/// memberlist simulations ([`Sim::new`]).
pub struct Gossip {
    /// The core.
    pub memberlist: Memberlist,
    /// Its delegate.
    pub delegate: SimDelegate,
}

impl Gossip {
    /// A fresh member called `name` at `addr`, knowing only itself.
    pub fn new(config: Config, name: &str, addr: SocketAddr, rng: StdRng, now: Instant) -> Self {
        let local = LocalNode::new(name, addr);
        let memberlist = Memberlist::new(config, local, rng, now).expect("valid simulation config");
        Self {
            memberlist,
            delegate: SimDelegate::new(name.to_owned()),
        }
    }

    /// Tells the delegate the current cluster size (its broadcasts' retransmit limit).
    fn count_members(&mut self) {
        self.delegate.n_members = self.memberlist.num_members();
    }
}

impl Core for Gossip {
    type Event = Event;

    fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), DecodeError> {
        self.count_members();
        self.memberlist
            .handle_packet(now, from, packet, &mut self.delegate)
    }

    fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.memberlist.handle_accept(now, from)
    }

    fn handle_stream(&mut self, now: Instant, stream: StreamId, input: StreamInput<'_>) {
        self.count_members();
        self.memberlist
            .handle_stream(now, stream, input, &mut self.delegate);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.count_members();
        self.memberlist.handle_timeout(now, &mut self.delegate);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.memberlist.poll_transmit()
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.memberlist.poll_event()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.memberlist.poll_timeout()
    }
}

/// A member of the simulation.
pub struct SimNode<C: Core> {
    /// The core.
    pub core: C,
    /// Its address.
    pub addr: SocketAddr,
    /// False once killed: it neither receives nor sends nor ticks.
    pub running: bool,
    /// Every event it emitted, with the virtual time since the start (kept across a
    /// [`Sim::restart`]: the history of the address).
    pub events: Vec<(Duration, C::Event)>,
    /// Partition group: packets only flow within a group.
    pub group: u8,
}

/// The simulation.
pub struct Sim<C: Core = Gossip> {
    /// The seed everything derives from (printed by failing assertions).
    pub seed: u64,
    /// The members.
    pub nodes: Vec<SimNode<C>>,
    /// Network conditions (may be changed between steps).
    pub net: Net,
    start: Instant,
    now: Instant,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    deliveries: HashMap<u64, Delivery>,
    next_delivery: u64,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// (node, its stream) -> (peer node, peer's stream).
    links: HashMap<(usize, StreamId), (usize, StreamId)>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Packets delivered so far.
    pub packets: u64,
    /// Bytes the members sent so far: datagram payloads (delivered or not) and stream bytes.
    pub bytes_sent: u64,
}

/// Member `i`'s address: `10.0.<i/250>.<i%250+1>:7946`.
pub fn addr_of(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8);
    SocketAddr::from((ip, 7946))
}

impl Sim<Gossip> {
    /// `n` memberlist members named `node-<i>` at [`addr_of`]`(i)`, not yet joined.
    pub fn new(seed: u64, n: usize, config: Config, net: Net) -> Self {
        let mut sim = Self::empty(seed, net);
        for i in 0..n {
            sim.add(|addr, rng, now| {
                Gossip::new(config.clone(), &format!("node-{i}"), addr, rng, now)
            });
        }
        sim
    }

    /// Every member `i` in `members` joins through `seed_node`.
    pub fn join(&mut self, members: impl IntoIterator<Item = usize>, seed_node: usize) {
        let seed_addr = self.nodes[seed_node].addr;
        for i in members {
            if i == seed_node {
                continue;
            }
            self.with(i, |gossip, now| {
                gossip.count_members();
                gossip
                    .memberlist
                    .join(now, &[seed_addr], &mut gossip.delegate)
                    .expect("join before leave");
            });
        }
    }

    /// Member `i` leaves gracefully: it gossips its own death, then stays up answering.
    pub fn leave(&mut self, i: usize, timeout: Duration) {
        self.with(i, |gossip, now| gossip.memberlist.leave(now, timeout));
    }

    /// Replaces member `i` by a fresh member called `name` at the same address, not yet
    /// joined: a container replaced under a new name. Its old streams are cut.
    pub fn replace(&mut self, i: usize, name: &str) {
        let config = self.nodes[i].core.memberlist.config().clone();
        self.restart(i, |addr, rng, now| {
            Gossip::new(config, name, addr, rng, now)
        });
    }

    /// Member `i`'s view: name -> state of every member in its table.
    pub fn view(&self, i: usize) -> HashMap<String, NodeState> {
        self.nodes[i]
            .core
            .memberlist
            .members()
            .map(|node| (node.name, node.state))
            .collect()
    }

    /// Whether every running member sees exactly the running members as alive.
    pub fn converged(&self) -> bool {
        let running = self.running();
        // Cheap first (alive or suspect, counted): the full check builds every member's view.
        if running
            .iter()
            .any(|&i| self.nodes[i].core.memberlist.num_alive() < running.len())
        {
            return false;
        }
        running.iter().all(|&i| {
            let view = self.view(i);
            running
                .iter()
                .all(|&j| view.get(&format!("node-{j}")) == Some(&NodeState::Alive))
        })
    }

    /// How many (observer, member) pairs among running members are not yet alive.
    pub fn missing_pairs(&self) -> usize {
        let running = self.running();
        running
            .iter()
            .map(|&i| {
                let view = self.view(i);
                running
                    .iter()
                    .filter(|&&j| view.get(&format!("node-{j}")) != Some(&NodeState::Alive))
                    .count()
            })
            .sum()
    }

    /// Member `i` originates a user broadcast (through its delegate's queue).
    pub fn broadcast_user(&mut self, i: usize, message: &[u8]) {
        self.with(i, |gossip, _| {
            gossip.count_members();
            gossip.delegate.remember(message);
        });
    }
}

impl<C: Core> Sim<C> {
    /// A simulation with no member yet ([`add`](Self::add) them).
    pub fn empty(seed: u64, net: Net) -> Self {
        let start = Instant::now();
        Self {
            seed,
            nodes: Vec::new(),
            net,
            start,
            now: start,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            deliveries: HashMap::new(),
            next_delivery: 0,
            timers: BinaryHeap::new(),
            links: HashMap::new(),
            by_addr: HashMap::new(),
            packets: 0,
            bytes_sent: 0,
        }
    }

    /// Adds a member at [`addr_of`] its index, built by `build` from its address, an RNG
    /// seeded from the simulation's and the current time; returns its index.
    pub fn add(&mut self, build: impl FnOnce(SocketAddr, StdRng, Instant) -> C) -> usize {
        let i = self.nodes.len();
        let addr = addr_of(i);
        let core = build(addr, StdRng::seed_from_u64(self.rng.random()), self.now);
        self.by_addr.insert(addr, i);
        self.nodes.push(SimNode {
            core,
            addr,
            running: true,
            events: Vec::new(),
            group: 0,
        });
        self.flush(i);
        i
    }

    /// Replaces member `i`'s core by a fresh one built by `build` (as in [`add`](Self::add))
    /// at the same address, running and in no partition: a restart. Its old streams are cut.
    pub fn restart(&mut self, i: usize, build: impl FnOnce(SocketAddr, StdRng, Instant) -> C) {
        self.links.retain(|(a, _), (b, _)| *a != i && *b != i);
        let node = &mut self.nodes[i];
        node.core = build(
            node.addr,
            StdRng::seed_from_u64(self.rng.random()),
            self.now,
        );
        node.running = true;
        node.group = 0;
        self.flush(i);
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Runs `job` on member `i`'s core at the current time (a command, like the driver's
    /// `Handle::with`), then moves what it caused onto the network.
    pub fn with<R>(&mut self, i: usize, job: impl FnOnce(&mut C, Instant) -> R) -> R {
        let result = job(&mut self.nodes[i].core, self.now);
        self.flush(i);
        result
    }

    /// Stops member `i` dead: no more packets, streams or timers (a SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].running = false;
    }

    /// Assigns partition groups; members in different groups cannot reach each other.
    pub fn partition(&mut self, groups: &[u8]) {
        for (node, group) in self.nodes.iter_mut().zip(groups) {
            node.group = *group;
        }
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        for node in &mut self.nodes {
            node.group = 0;
        }
    }

    /// Runs the simulation for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.step(until) {}
        self.now = until;
    }

    /// Runs until `condition` holds (checked every 100 ms of virtual time) or `limit` passes;
    /// returns the virtual time it took.
    pub fn run_until(
        &mut self,
        limit: Duration,
        condition: impl Fn(&Self) -> bool,
    ) -> Option<Duration> {
        let begin = self.now;
        while self.now - begin <= limit {
            if condition(self) {
                return Some(self.now - begin);
            }
            self.run_for(Duration::from_millis(100));
        }
        None
    }

    /// Hands member `i` a packet as if `from` had sent it.
    pub fn inject(&mut self, i: usize, from: SocketAddr, packet: &[u8]) {
        let result = self.with(i, |core, now| core.handle_packet(now, from, packet));
        assert!(
            result.is_ok(),
            "seed {}: injected packet rejected: {result:?}",
            self.seed
        );
    }

    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running)
            .collect()
    }

    /// Processes the next delivery or timer due before `until`; false when none is left.
    fn step(&mut self, until: Instant) -> bool {
        let next_delivery = self.queue.peek().map(|Reverse((at, _, _))| *at);
        let next_timer = loop {
            match self.timers.peek() {
                Some(Reverse((at, i))) => {
                    let (at, i) = (*at, *i);
                    if !self.nodes[i].running || self.nodes[i].core.poll_timeout() != Some(at) {
                        self.timers.pop();
                        continue;
                    }
                    break Some(at);
                }
                None => break None,
            }
        };
        let delivery_first = match (next_delivery, next_timer) {
            (None, None) => return false,
            (Some(d), Some(t)) => d <= t,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if delivery_first {
            let at = next_delivery.expect("checked");
            if at > until {
                return false;
            }
            let Reverse((at, id, to)) = self.queue.pop().expect("peeked");
            self.now = at;
            let delivery = self
                .deliveries
                .remove(&id)
                .expect("every queued id has a delivery");
            if self.nodes[to].running {
                self.deliver(to, delivery);
                self.flush(to);
            }
        } else {
            let at = next_timer.expect("checked");
            if at > until {
                return false;
            }
            let Reverse((at, i)) = self.timers.pop().expect("peeked");
            self.now = at;
            self.with(i, |core, now| core.handle_timeout(now));
        }
        true
    }

    fn deliver(&mut self, to: usize, delivery: Delivery) {
        let now = self.now;
        let core = &mut self.nodes[to].core;
        match delivery {
            Delivery::Packet { from, bytes } => {
                self.packets += 1;
                let result = core.handle_packet(now, from, &bytes);
                assert!(
                    result.is_ok(),
                    "seed {}: a core sent an undecodable packet: {result:?}",
                    self.seed
                );
            }
            Delivery::Data { stream, bytes } => {
                core.handle_stream(now, stream, StreamInput::Data(&bytes));
            }
            Delivery::Closed { stream } => core.handle_stream(now, stream, StreamInput::Closed),
            Delivery::Failed { stream } => {
                core.handle_stream(now, stream, StreamInput::Failed("connection refused"));
            }
        }
    }

    /// Moves member `i`'s transmits onto the network and records its events and timer.
    fn flush(&mut self, i: usize) {
        while let Some(event) = self.nodes[i].core.poll_event() {
            let elapsed = self.elapsed();
            self.nodes[i].events.push((elapsed, event));
        }
        while let Some(transmit) = self.nodes[i].core.poll_transmit() {
            if !self.nodes[i].running {
                continue;
            }
            self.transmit(i, transmit);
        }
        if let Some(at) = self.nodes[i].core.poll_timeout() {
            self.timers.push(Reverse((at, i)));
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[b].running && self.nodes[a].group == self.nodes[b].group
    }

    fn delay(&mut self) -> Duration {
        let (min, max) = (self.net.min_delay, self.net.max_delay);
        if max <= min {
            return min;
        }
        min + Duration::from_nanos(self.rng.random_range(0..(max - min).as_nanos() as u64))
    }

    fn schedule(&mut self, at: Instant, to: usize, delivery: Delivery) {
        self.next_delivery += 1;
        self.deliveries.insert(self.next_delivery, delivery);
        self.queue.push(Reverse((at, self.next_delivery, to)));
    }

    fn transmit(&mut self, i: usize, transmit: Transmit) {
        // Streams use a fixed delay so that their bytes stay in order.
        let stream_at = self.now + self.net.min_delay;
        match transmit {
            Transmit::Packet { to, bytes } => {
                self.bytes_sent += bytes.len() as u64;
                let Some(&j) = self.by_addr.get(&to) else {
                    return;
                };
                let lost = self.net.loss > 0.0 && self.rng.random_bool(self.net.loss);
                if lost || !self.reachable(i, j) {
                    return;
                }
                let at = self.now + self.delay();
                let from = self.nodes[i].addr;
                self.schedule(at, j, Delivery::Packet { from, bytes });
            }
            Transmit::StreamOpen { stream, to } => match self.by_addr.get(&to) {
                Some(&j) if self.reachable(i, j) => {
                    // The accept happens at once; only the bytes take time.
                    let from = self.nodes[i].addr;
                    let peer_stream = self.nodes[j].core.handle_accept(self.now, from);
                    self.links.insert((i, stream), (j, peer_stream));
                    self.links.insert((j, peer_stream), (i, stream));
                    self.flush(j);
                }
                _ => self.schedule(stream_at, i, Delivery::Failed { stream }),
            },
            Transmit::StreamWrite { stream, bytes } => {
                self.bytes_sent += bytes.len() as u64;
                if let Some(&(j, peer_stream)) = self.links.get(&(i, stream)) {
                    self.schedule(
                        stream_at,
                        j,
                        Delivery::Data {
                            stream: peer_stream,
                            bytes,
                        },
                    );
                }
            }
            Transmit::StreamClose { stream } => {
                if let Some((j, peer_stream)) = self.links.remove(&(i, stream)) {
                    self.schedule(
                        stream_at,
                        j,
                        Delivery::Closed {
                            stream: peer_stream,
                        },
                    );
                }
            }
        }
    }
}
