//! A deterministic simulation of N memberlist cores: a virtual clock, one seeded RNG, and a
//! network with delay, loss and partitions. TCP streams are modelled as ordered, lossless
//! pipes that fail to open across a partition or to a killed member.
//!
//! Test and benchmark support (the sim tests in `tests/sim/`, `crates/bench`), not product: it
//! panics when a core sends a packet another core cannot decode. It counts what the cores send
//! ([`Sim::bytes_sent`]: datagram payloads and stream bytes, no IP/UDP/TCP headers).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::memberlist::{
    BroadcastQueue, Config, Delegate, Event, LocalNode, Memberlist, NodeState, StreamId,
    StreamInput, Transmit,
};
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

/// A member of the simulation.
pub struct SimNode {
    /// The core.
    pub core: Memberlist,
    /// Its delegate.
    pub delegate: SimDelegate,
    /// Its address.
    pub addr: SocketAddr,
    /// False once killed: it neither receives nor sends nor ticks.
    pub running: bool,
    /// Every event it emitted, with the virtual time since the start.
    pub events: Vec<(Duration, Event)>,
    /// Partition group: packets only flow within a group.
    pub group: u8,
}

/// The simulation.
pub struct Sim {
    /// The seed everything derives from (printed by failing assertions).
    pub seed: u64,
    /// The members.
    pub nodes: Vec<SimNode>,
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
    config: Config,
    /// Packets delivered so far.
    pub packets: u64,
    /// Bytes the members sent so far: datagram payloads (delivered or not) and stream bytes.
    pub bytes_sent: u64,
}

impl Sim {
    /// `n` members named `node-<i>` at `10.0.<i/250>.<i%250+1>:7946`, not yet joined.
    pub fn new(seed: u64, n: usize, config: Config, net: Net) -> Self {
        let start = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes = Vec::with_capacity(n);
        let mut by_addr = HashMap::new();
        for i in 0..n {
            let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8);
            let addr = SocketAddr::from((ip, 7946));
            let local = LocalNode::new(format!("node-{i}"), addr);
            let core_rng = StdRng::seed_from_u64(rng.random());
            let core = Memberlist::new(config.clone(), local, core_rng, start)
                .expect("valid simulation config");
            by_addr.insert(addr, i);
            nodes.push(SimNode {
                core,
                delegate: SimDelegate::new(format!("node-{i}")),
                addr,
                running: true,
                events: Vec::new(),
                group: 0,
            });
        }
        let mut sim = Self {
            seed,
            nodes,
            net,
            start,
            now: start,
            rng,
            queue: BinaryHeap::new(),
            deliveries: HashMap::new(),
            next_delivery: 0,
            timers: BinaryHeap::new(),
            links: HashMap::new(),
            by_addr,
            config,
            packets: 0,
            bytes_sent: 0,
        };
        for i in 0..n {
            sim.flush(i);
        }
        sim
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Every member `i` in `members` joins through `seed_node`.
    pub fn join(&mut self, members: impl IntoIterator<Item = usize>, seed_node: usize) {
        let seed_addr = self.nodes[seed_node].addr;
        for i in members {
            if i == seed_node {
                continue;
            }
            let now = self.now;
            let node = self.node(i);
            node.core
                .join(now, &[seed_addr], &mut node.delegate)
                .expect("join before leave");
            self.flush(i);
        }
    }

    /// Member `i` leaves gracefully: it gossips its own death, then stays up answering.
    pub fn leave(&mut self, i: usize, timeout: Duration) {
        let now = self.now;
        self.nodes[i].core.leave(now, timeout);
        self.flush(i);
    }

    /// Replaces member `i` by a fresh member called `name` at the same address, not yet
    /// joined: a container replaced under a new name. Its old streams are cut.
    pub fn replace(&mut self, i: usize, name: &str) {
        self.links.retain(|(a, _), (b, _)| *a != i && *b != i);
        let local = LocalNode::new(name, self.nodes[i].addr);
        let core_rng = StdRng::seed_from_u64(self.rng.random());
        let core = Memberlist::new(self.config.clone(), local, core_rng, self.now)
            .expect("valid simulation config");
        self.nodes[i] = SimNode {
            core,
            delegate: SimDelegate::new(name.to_owned()),
            addr: self.nodes[i].addr,
            running: true,
            events: Vec::new(),
            group: 0,
        };
        self.flush(i);
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

    /// Member `i`'s view: name -> state of every member in its table.
    pub fn view(&self, i: usize) -> HashMap<String, NodeState> {
        self.nodes[i]
            .core
            .members()
            .map(|node| (node.name, node.state))
            .collect()
    }

    /// Whether every running member sees exactly the running members as alive.
    pub fn converged(&self) -> bool {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running)
            .collect();
        // Cheap first (alive or suspect, counted): the full check builds every member's view.
        if running
            .iter()
            .any(|&i| self.nodes[i].core.num_alive() < running.len())
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
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running)
            .collect();
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
            let now = self.now;
            let node = self.node(i);
            node.core.handle_timeout(now, &mut node.delegate);
            self.flush(i);
        }
        true
    }

    fn deliver(&mut self, to: usize, delivery: Delivery) {
        let now = self.now;
        match delivery {
            Delivery::Packet { from, bytes } => {
                self.packets += 1;
                let node = self.node(to);
                let result = node
                    .core
                    .handle_packet(now, from, &bytes, &mut node.delegate);
                assert!(
                    result.is_ok(),
                    "seed {}: a core sent an undecodable packet: {result:?}",
                    self.seed
                );
            }
            Delivery::Data { stream, bytes } => {
                let node = self.node(to);
                node.core
                    .handle_stream(now, stream, StreamInput::Data(&bytes), &mut node.delegate);
            }
            Delivery::Closed { stream } => {
                let node = self.node(to);
                node.core
                    .handle_stream(now, stream, StreamInput::Closed, &mut node.delegate);
            }
            Delivery::Failed { stream } => {
                let node = self.node(to);
                node.core.handle_stream(
                    now,
                    stream,
                    StreamInput::Failed("connection refused"),
                    &mut node.delegate,
                );
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
                    let now = self.now;
                    let from = self.nodes[i].addr;
                    let peer_stream = self.nodes[j].core.handle_accept(now, from);
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

impl Sim {
    /// Hands member `i` a packet as if `from` had sent it.
    pub fn inject(&mut self, i: usize, from: SocketAddr, packet: &[u8]) {
        let now = self.now;
        let node = self.node(i);
        let result = node
            .core
            .handle_packet(now, from, packet, &mut node.delegate);
        assert!(
            result.is_ok(),
            "seed {}: injected packet rejected: {result:?}",
            self.seed
        );
        self.flush(i);
    }
}

impl Sim {
    /// Member `i`, with its delegate told the current cluster size.
    fn node(&mut self, i: usize) -> &mut SimNode {
        let node = &mut self.nodes[i];
        node.delegate.n_members = node.core.num_members();
        node
    }

    /// Member `i` originates a user broadcast (through its delegate's queue).
    pub fn broadcast_user(&mut self, i: usize, message: &[u8]) {
        self.node(i).delegate.remember(message);
    }
}
