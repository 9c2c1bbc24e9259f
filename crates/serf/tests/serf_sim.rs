//! Deterministic simulation of several native Serf members on a virtual network and clock:
//! joins, intents, user events, queries, leave, failure, tags, late joiners, reaping. The
//! members are [`serf::serf::Serf`], the composition the agent runs, on [`serf::sim`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serf::memberlist;
use serf::serf::{Config, Event, MemberStatus, QueryHandle, QueryParams, Serf};
use serf::sim::Net;

/// The error's message contains `needle`.
fn assert_says(error: &serf::serf::Error, needle: &str) {
    assert!(error.to_string().contains(needle), "{error}");
}

/// One-way delay of every packet and stream message: a FIFO network.
const HOP: Duration = Duration::from_millis(1);

/// Named Serf members on [`serf::sim::Sim`].
struct Sim {
    sim: serf::sim::Sim<Serf>,
    names: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        Self {
            sim: serf::sim::Sim::empty(seed, Net::fixed(HOP)),
            names: Vec::new(),
        }
    }

    fn config(name: &str) -> Config {
        Config {
            node_name: name.to_owned(),
            ..Config::default()
        }
    }

    fn seed(&self) -> u64 {
        self.sim.seed
    }

    /// Adds (or restarts, for an existing name) a member.
    fn start(&mut self, config: Config) -> usize {
        match self.names.iter().position(|name| *name == config.node_name) {
            Some(index) => {
                let build = Self::build(self.seed(), config);
                self.sim.restart(index, build);
                index
            }
            None => self.start_impostor(config),
        }
    }

    /// Adds a member at a new address even if its name is taken (a name conflict).
    fn start_impostor(&mut self, config: Config) -> usize {
        self.names.push(config.node_name.clone());
        let build = Self::build(self.seed(), config);
        self.sim.add(build)
    }

    fn build(
        seed: u64,
        config: Config,
    ) -> impl FnOnce(SocketAddr, rand::rngs::StdRng, Instant) -> Serf {
        move |addr, rng, now| {
            let mut ml = memberlist::Config::lan();
            ml.push_pull_interval = Duration::from_secs(30);
            Serf::new(config, ml, addr, rng, now)
                .unwrap_or_else(|error| panic!("seed {seed}: start: {error}"))
        }
    }

    /// Runs a command on member `index` at the current time.
    fn with<R>(&mut self, index: usize, job: impl FnOnce(&mut Serf, Instant) -> R) -> R {
        self.sim.with(index, job)
    }

    fn node(&self, index: usize) -> &Serf {
        &self.sim.nodes[index].core
    }

    fn addr(&self, index: usize) -> SocketAddr {
        self.sim.nodes[index].addr
    }

    /// Every event member `index` emitted so far.
    fn events(&self, index: usize) -> Vec<Event> {
        self.sim.nodes[index]
            .events
            .iter()
            .map(|(_, event)| event.clone())
            .collect()
    }

    fn kill(&mut self, index: usize) {
        self.sim.kill(index);
    }

    /// Runs the network and timers for `duration` of virtual time.
    fn run(&mut self, duration: Duration) {
        self.sim.run_for(duration);
    }

    fn join(&mut self, index: usize, seed: usize, ignore_old: bool) {
        let seed_addr = self.addr(seed);
        let sim_seed = self.seed();
        self.with(index, |serf, now| serf.join(now, &[seed_addr], ignore_old))
            .unwrap_or_else(|error| panic!("seed {sim_seed}: join: {error}"));
    }

    /// What member `at` thinks of `of`; `None` for a killed member.
    fn status(&self, at: usize, of: &str) -> Option<MemberStatus> {
        let node = &self.sim.nodes[at];
        node.running
            .then(|| node.core.member(of).map(|m| m.status))
            .flatten()
    }

    /// Member `at` starts a query asking for acks.
    fn query_with_acks(&mut self, at: usize, name: &str) -> QueryHandle {
        let params = QueryParams {
            request_ack: true,
            ..QueryParams::default()
        };
        self.with(at, |serf, now| serf.query(now, name, b"", &params))
            .expect("query fits")
    }

    /// Who acked member `at`'s query `handle`, in order.
    fn acks(&self, at: usize, handle: QueryHandle) -> Vec<String> {
        self.events(at)
            .into_iter()
            .filter_map(|e| match e {
                Event::QueryAck { query, from } if query == handle => Some(from),
                _ => None,
            })
            .collect()
    }

    fn user_events(&self, at: usize) -> Vec<(String, Vec<u8>)> {
        self.events(at)
            .into_iter()
            .filter_map(|event| match event {
                Event::UserEvent(e) => Some((e.name, e.payload)),
                _ => None,
            })
            .collect()
    }

    fn cluster(&mut self, names: &[&str]) {
        for name in names {
            self.start(Self::config(name));
        }
        for index in 1..names.len() {
            self.join(index, 0, true);
        }
        self.run(Duration::from_secs(3));
        for at in 0..names.len() {
            for name in names {
                assert_eq!(
                    self.status(at, name),
                    Some(MemberStatus::Alive),
                    "seed {}: {} sees {name}",
                    self.seed(),
                    names[at]
                );
            }
        }
    }
}

#[test]
fn members_join_and_see_each_other_alive() {
    let mut sim = Sim::new(1);
    sim.cluster(&["a", "b", "c"]);
    let joins = sim
        .events(1)
        .iter()
        .filter(|e| matches!(e, Event::JoinCompleted { contacted: 1, .. }))
        .count();
    assert_eq!(joins, 1);
    // Everyone's member clock moved past the join intents.
    assert!(sim.node(0).clocks().0 .0 >= 2);
}

#[test]
fn user_event_is_delivered_exactly_once_everywhere() {
    let mut sim = Sim::new(2);
    sim.cluster(&["a", "b", "c"]);
    sim.with(1, |serf, now| serf.user_event(now, "deploy", b"v1", false))
        .expect("event fits");
    sim.run(Duration::from_secs(5));
    for at in 0..3 {
        assert_eq!(
            sim.user_events(at),
            [("deploy".to_owned(), b"v1".to_vec())],
            "member {at}"
        );
    }
    // Too large: a clear error naming the event.
    let payload = vec![0u8; 600];
    let error = sim
        .with(0, |serf, now| serf.user_event(now, "big", &payload, false))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "user event \"big\" is 603 bytes before encoding, above the configured limit of 512 bytes"
    );
}

#[test]
fn query_collects_acks_and_responses_and_filters_by_tag() {
    let mut sim = Sim::new(3);
    let mut c = Sim::config("c");
    c.tags.insert("role".to_owned(), "3306".to_owned());
    sim.start(Sim::config("a"));
    sim.start(Sim::config("b"));
    sim.start(c);
    sim.join(1, 0, true);
    sim.join(2, 0, true);
    sim.run(Duration::from_secs(3));
    let handle = sim.query_with_acks(0, "uptime");
    sim.run(Duration::from_millis(500));
    // Everyone (the sender included) got the query once; b and c answer.
    for at in 0..3 {
        let queries: Vec<_> = sim
            .events(at)
            .iter()
            .filter_map(|e| match e {
                Event::Query(q) => Some(q.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(queries.len(), 1, "member {at}: {queries:?}");
        if at > 0 {
            let answer = format!("up from {at}");
            sim.with(at, |serf, now| {
                serf.respond(now, queries[0].id, answer.as_bytes())
            })
            .expect("in time");
            let again = sim
                .with(at, |serf, now| serf.respond(now, queries[0].id, b"again"))
                .unwrap_err();
            assert_says(&again, "already sent");
        }
    }
    sim.run(Duration::from_secs(4));
    let mut acks = BTreeMap::new();
    let mut responses = BTreeMap::new();
    let mut done = 0;
    for event in &sim.events(0) {
        match event {
            Event::QueryAck { query, from } if *query == handle => {
                *acks.entry(from.clone()).or_insert(0) += 1;
            }
            Event::QueryResponse {
                query,
                from,
                payload,
            } if *query == handle => {
                responses.insert(from.clone(), String::from_utf8_lossy(payload).into_owned());
            }
            Event::QueryDone { query } if *query == handle => done += 1,
            _ => {}
        }
    }
    let everyone: BTreeMap<String, i32> =
        ["a", "b", "c"].iter().map(|n| (n.to_string(), 1)).collect();
    assert_eq!(acks, everyone);
    assert_eq!(
        responses.into_iter().collect::<Vec<_>>(),
        [
            ("b".to_owned(), "up from 1".to_owned()),
            ("c".to_owned(), "up from 2".to_owned())
        ]
    );
    assert_eq!(done, 1);

    // A tag filter: only c processes it.
    let params = QueryParams {
        request_ack: true,
        filter_tags: [("role".to_owned(), "^3306$".to_owned())]
            .into_iter()
            .collect(),
        ..QueryParams::default()
    };
    let handle = sim
        .with(0, |serf, now| serf.query(now, "whoami", b"", &params))
        .expect("query fits");
    sim.run(Duration::from_secs(4));
    let got: HashSet<usize> = (0..3)
        .filter(|at| {
            sim.events(*at)
                .iter()
                .any(|e| matches!(e, Event::Query(q) if q.name == "whoami"))
        })
        .collect();
    assert_eq!(got, HashSet::from([2]));
    assert_eq!(sim.acks(0, handle), ["c"]);
}

#[test]
fn internal_ping_query_is_acked_but_not_shown_to_the_application() {
    let mut sim = Sim::new(4);
    sim.cluster(&["a", "b"]);
    let handle = sim.query_with_acks(0, "_serf_ping");
    sim.run(Duration::from_secs(4));
    let acks = sim.acks(0, handle);
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(!sim.events(1).iter().any(|e| matches!(e, Event::Query(_))));
}

#[test]
fn graceful_leave_is_left_and_a_kill_is_failed_and_both_come_back() {
    let mut sim = Sim::new(5);
    sim.cluster(&["a", "b", "c"]);
    sim.with(1, |serf, now| serf.leave(now)).expect("alive");
    sim.run(Duration::from_secs(3));
    assert!(sim.events(1).contains(&Event::LeaveCompleted));
    assert_eq!(sim.node(1).lifecycle(), serf::serf::Lifecycle::Left);
    assert_eq!(sim.node(1).local_member().status, MemberStatus::Left);
    assert_eq!(sim.status(0, "b"), Some(MemberStatus::Left));
    assert_eq!(sim.status(2, "b"), Some(MemberStatus::Left));
    sim.kill(1);
    sim.kill(2);
    sim.run(Duration::from_secs(15));
    assert_eq!(sim.status(0, "c"), Some(MemberStatus::Failed));
    assert!(sim
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::MemberFailed(m) if m.name == "c")));
    // Both restart with their old names and rejoin: alive again.
    sim.start(Sim::config("b"));
    sim.start(Sim::config("c"));
    sim.join(1, 0, true);
    sim.join(2, 0, true);
    sim.run(Duration::from_secs(5));
    assert_eq!(sim.status(0, "b"), Some(MemberStatus::Alive));
    assert_eq!(sim.status(0, "c"), Some(MemberStatus::Alive));
    assert_eq!(sim.status(1, "c"), Some(MemberStatus::Alive));
}

#[test]
fn tag_change_propagates_as_an_update() {
    let mut sim = Sim::new(6);
    sim.cluster(&["a", "b"]);
    let tags: BTreeMap<String, String> = [("role".to_owned(), "web".to_owned())]
        .into_iter()
        .collect();
    sim.with(1, |serf, now| serf.set_tags(now, tags.clone()))
        .expect("small tags");
    sim.run(Duration::from_secs(2));
    assert_eq!(sim.node(0).member("b").map(|m| m.tags.clone()), Some(tags));
    assert!(sim
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::MemberUpdate(m) if m.name == "b")));
    let huge: BTreeMap<String, String> = [("k".to_owned(), "v".repeat(600))].into_iter().collect();
    let error = sim
        .with(1, |serf, now| serf.set_tags(now, huge))
        .unwrap_err();
    assert_says(&error, "above the limit of 512 bytes");
}

#[test]
fn late_joiner_does_not_replay_old_events_unless_asked() {
    let mut sim = Sim::new(7);
    sim.cluster(&["a", "b"]);
    sim.with(0, |serf, now| serf.user_event(now, "deploy", b"v1", false))
        .expect("event fits");
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.user_events(1).len(), 1);
    let late = sim.start(Sim::config("late"));
    sim.join(late, 0, true);
    let replay = sim.start(Sim::config("replay"));
    sim.join(replay, 1, false);
    sim.run(Duration::from_secs(3));
    assert_eq!(sim.status(late, "a"), Some(MemberStatus::Alive));
    assert_eq!(sim.user_events(late), [], "ignore-old joiner");
    assert_eq!(
        sim.user_events(replay),
        [("deploy".to_owned(), b"v1".to_vec())],
        "replaying joiner"
    );
    // A new event after the join reaches the late joiner.
    sim.with(1, |serf, now| serf.user_event(now, "deploy", b"v2", false))
        .expect("event fits");
    sim.run(Duration::from_secs(3));
    assert_eq!(
        sim.user_events(late),
        [("deploy".to_owned(), b"v2".to_vec())]
    );
    assert_eq!(sim.user_events(0).len(), 2);
}

#[test]
fn failed_member_is_reaped_after_the_reconnect_timeout() {
    let mut sim = Sim::new(8);
    for name in ["a", "b"] {
        let mut config = Sim::config(name);
        config.reconnect_timeout = Duration::from_secs(60);
        config.reap_interval = Duration::from_secs(5);
        sim.start(config);
    }
    sim.join(1, 0, true);
    sim.run(Duration::from_secs(3));
    sim.kill(1);
    sim.run(Duration::from_secs(20));
    assert_eq!(sim.status(0, "b"), Some(MemberStatus::Failed));
    sim.run(Duration::from_secs(40));
    assert_eq!(
        sim.status(0, "b"),
        Some(MemberStatus::Failed),
        "not before 60 s"
    );
    sim.run(Duration::from_secs(15));
    assert_eq!(sim.status(0, "b"), None);
    assert!(sim
        .events(0)
        .iter()
        .any(|e| matches!(e, Event::MemberReap(m) if m.name == "b")));
}

#[test]
fn coordinates_give_an_rtt_estimate() {
    let mut sim = Sim::new(9);
    sim.cluster(&["a", "b"]);
    sim.run(Duration::from_secs(30));
    let estimate = sim
        .node(0)
        .estimated_rtt("b")
        .expect("b's coordinate is cached");
    // One hop each way is 2 ms.
    assert!(estimate < Duration::from_millis(10), "{estimate:?}");
}

#[test]
fn name_conflict_shuts_down_the_member_the_cluster_does_not_know() {
    let mut sim = Sim::new(10);
    sim.cluster(&["a", "b", "c"]);
    let impostor = sim.start_impostor(Sim::config("b"));
    sim.join(impostor, 0, true);
    sim.run(Duration::from_secs(10));
    let conflict = sim
        .events(impostor)
        .iter()
        .find(|e| matches!(e, Event::NameConflict { .. }))
        .cloned();
    let Some(Event::NameConflict {
        name,
        other,
        matching,
        ..
    }) = conflict
    else {
        panic!(
            "seed 10: no name conflict at the impostor: {:?}",
            sim.events(impostor)
        );
    };
    assert_eq!((name.as_str(), other, matching), ("b", sim.addr(1), 0));
    assert_eq!(
        sim.node(impostor).lifecycle(),
        serf::serf::Lifecycle::Shutdown
    );
    // The original keeps its name and its place.
    assert!(!sim
        .events(1)
        .iter()
        .any(|e| matches!(e, Event::NameConflict { .. })));
    assert_eq!(sim.node(1).lifecycle(), serf::serf::Lifecycle::Alive);
    assert_eq!(sim.status(0, "b"), Some(MemberStatus::Alive));
    assert_eq!(
        sim.node(0).member("b").map(|m| m.socket_addr()),
        Some(sim.addr(1))
    );
}

#[test]
fn respond_refuses_late_unknown_and_oversized_answers() {
    let mut sim = Sim::new(11);
    sim.cluster(&["a", "b"]);
    let params = QueryParams {
        timeout: Some(Duration::from_secs(1)),
        ..QueryParams::default()
    };
    sim.with(0, |serf, now| serf.query(now, "slow", b"", &params))
        .expect("query fits");
    // Gossip goes out every 200 ms.
    sim.run(Duration::from_millis(300));
    let id = sim
        .events(1)
        .iter()
        .find_map(|e| match e {
            Event::Query(q) => Some(q.id),
            _ => None,
        })
        .unwrap_or_else(|| panic!("b got the query: {:?}", sim.events(1)));
    let error = sim
        .with(1, |serf, now| serf.respond(now, id, &[0u8; 1100]))
        .unwrap_err();
    assert_says(&error, "above the limit of 1024 bytes");
    sim.run(Duration::from_millis(1100));
    let error = sim
        .with(1, |serf, now| serf.respond(now, id, b"late"))
        .unwrap_err();
    assert_says(&error, "past the deadline");
    sim.run(Duration::from_secs(2));
    let error = sim
        .with(1, |serf, now| serf.respond(now, id, b"later"))
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("no pending query matching id"),
        "{error}"
    );
    let big_query = vec![0u8; 1100];
    let error = sim
        .with(0, |serf, now| serf.query(now, "big", &big_query, &params))
        .unwrap_err();
    assert_says(&error, "above the limit of 1024 bytes");
}

#[test]
fn reconnect_brings_back_members_failed_by_a_partition() {
    let partition_then_heal = |reconnect_interval: Duration| {
        let mut sim = Sim::new(12);
        for name in ["a", "b"] {
            let mut config = Sim::config(name);
            config.reconnect_interval = reconnect_interval;
            sim.start(config);
        }
        sim.join(1, 0, true);
        sim.run(Duration::from_secs(3));
        sim.sim.partition(&[0, 1]);
        sim.run(Duration::from_secs(20));
        assert_eq!(sim.status(0, "b"), Some(MemberStatus::Failed));
        assert_eq!(sim.status(1, "a"), Some(MemberStatus::Failed));
        sim.sim.heal();
        sim.run(Duration::from_secs(65));
        (sim.status(0, "b"), sim.status(1, "a"))
    };
    // Nobody probes failed members: without reconnects they stay failed after the heal.
    let failed = Some(MemberStatus::Failed);
    assert_eq!(
        partition_then_heal(Duration::from_secs(3600)),
        (failed, failed)
    );
    // Serf's reconnect (every 30 s, probability failed/alive = 1) joins them again.
    let alive = Some(MemberStatus::Alive);
    assert_eq!(partition_then_heal(Duration::from_secs(30)), (alive, alive));
}

/// The key rotation the agent's `serf keys` runs ([`Serf::keys`]): answers counted into one
/// report, never shown as query events; a silent member makes the report wait for the
/// timeout and say how many answered.
#[test]
fn key_queries_rotate_every_keyring_and_report_silent_members() {
    use serf::serf::{KeyOperation, KeyReport};
    use serf::wire::crypto::{Keyring, SharedKeyring};

    let (old, new) = ([1u8; 16], [2u8; 16]);
    let mut sim = Sim::new(14);
    sim.cluster(&["a", "b", "c"]);
    let keyrings: Vec<SharedKeyring> = (0..3)
        .map(|index| {
            let keyring = SharedKeyring::new(Keyring::new(&[old]).expect("valid key"));
            sim.with(index, |serf, _| serf.set_keyring(Some(keyring.clone())));
            keyring
        })
        .collect();
    let report_of = |sim: &mut Sim, operation: KeyOperation| -> KeyReport {
        let query = sim
            .with(0, |serf, now| serf.keys(now, &operation))
            .expect("alive");
        sim.sim.nodes[0].events.clear();
        sim.run(Duration::from_secs(10));
        let events = sim.events(0);
        let reports: Vec<KeyReport> = events
            .iter()
            .filter_map(|event| match event {
                Event::KeysCompleted {
                    query: done,
                    report,
                } if *done == query => Some(report.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(reports.len(), 1, "seed {}: {events:?}", sim.seed());
        assert!(
            !events.iter().any(|event| matches!(event,
                Event::QueryAck { query: q, .. } | Event::QueryResponse { query: q, .. } | Event::QueryDone { query: q } if *q == query)),
            "key answers are not query events: {events:?}"
        );
        reports[0].clone()
    };

    let installed = report_of(&mut sim, KeyOperation::Install(new.to_vec()));
    assert_eq!(
        (installed.num_nodes, installed.num_resp, installed.num_err),
        (3, 3, 0)
    );
    assert_eq!(installed.error(), None);
    for keyring in &keyrings {
        assert_eq!(keyring.read().keys().count(), 2);
        assert_eq!(keyring.read().primary(), old);
    }
    let used = report_of(&mut sim, KeyOperation::Use(new.to_vec()));
    assert_eq!(used.error(), None);
    assert!(keyrings
        .iter()
        .all(|keyring| keyring.read().primary() == new));

    // A killed member is still alive to the others for a while: the list waits for the
    // timeout and reports two answers out of three.
    sim.kill(2);
    let listed = report_of(&mut sim, KeyOperation::List);
    assert_eq!((listed.num_nodes, listed.num_resp), (3, 2), "{listed:?}");
    assert_eq!(
        listed.error().as_deref(),
        Some("2/3 nodes reported success")
    );
    assert_eq!(listed.keys.len(), 2);
    assert!(listed.keys.values().all(|count| *count == 2));
}

/// `serf force-leave` on the composition the agent runs ([`Serf::force_leave`]): a failed
/// member becomes `left` everywhere; with prune it is forgotten at once. `stats` counts it.
#[test]
fn force_leave_marks_a_failed_member_left_everywhere_and_prune_forgets_it() {
    let mut sim = Sim::new(15);
    sim.cluster(&["a", "b", "c", "d"]);
    sim.kill(2);
    sim.kill(3);
    sim.run(Duration::from_secs(20));
    assert_eq!(sim.status(1, "c"), Some(MemberStatus::Failed));
    assert_eq!(sim.node(0).stats()["failed"], "2");

    sim.with(0, |serf, now| serf.force_leave(now, "c", false));
    sim.run(Duration::from_secs(2));
    for at in [0, 1] {
        assert_eq!(
            sim.status(at, "c"),
            Some(MemberStatus::Left),
            "seed {}",
            sim.seed()
        );
    }
    assert_eq!(sim.node(0).stats()["left"], "1");

    sim.with(1, |serf, now| serf.force_leave(now, "d", true));
    sim.run(Duration::from_secs(2));
    for at in [0, 1] {
        assert_eq!(sim.status(at, "d"), None, "seed {}: pruned", sim.seed());
        assert!(sim
            .events(at)
            .iter()
            .any(|e| matches!(e, Event::MemberReap(m) if m.name == "d")));
    }
    // Unknown names are no-ops.
    sim.with(0, |serf, now| serf.force_leave(now, "nobody", true));
}
