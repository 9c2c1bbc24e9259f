//! Deterministic tests of the Serf state machines, on a virtual clock.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::event::UserEvents;
use super::member::{IntentOutcome, Members};
use super::query::Queries;
use super::*;
use crate::core::Core;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// A virtual clock: a fixed origin plus an offset moved by the test.
struct Clock {
    origin: Instant,
    offset: Duration,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            offset: Duration::ZERO,
        }
    }
    fn now(&self) -> Instant {
        self.origin + self.offset
    }
    fn advance(&mut self, by: Duration) -> Instant {
        self.offset += by;
        self.now()
    }
}

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        port: 7946,
        tags: BTreeMap::new(),
        versions: [1, 5, 2, 2, 5, 5],
    }
}

fn status(members: &Members, name: &str) -> Option<MemberStatus> {
    members.get(name).map(|member| member.status)
}

fn kinds(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|event| match event {
            Event::MemberJoin(m) => format!("join {}", m.name),
            Event::MemberLeave(m) => format!("leave {}", m.name),
            Event::MemberFailed(m) => format!("failed {}", m.name),
            Event::MemberUpdate(m) => format!("update {}", m.name),
            Event::MemberReap(m) => format!("reap {}", m.name),
            Event::UserEvent(e) => format!("event {} {}", e.name, e.ltime),
            Event::Query(q) => format!("query {}", q.name),
            Event::QueryAck { from, .. } => format!("ack {from}"),
            Event::QueryResponse { from, .. } => format!("response {from}"),
            Event::QueryDone { .. } => "done".to_owned(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn leave(
    members: &mut Members,
    now: Instant,
    ltime: u64,
    name: &str,
    events: &mut Vec<Event>,
) -> IntentOutcome {
    members.handle_leave_intent(
        now,
        LamportTime(ltime),
        name,
        false,
        true,
        Duration::from_secs(6),
        events,
    )
}

#[test]
fn intents_before_the_member_are_buffered_and_applied_on_join() {
    let clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    assert_eq!(
        members.handle_join_intent(clock.now(), LamportTime(5), "b"),
        IntentOutcome::Rebroadcast
    );
    // The same or an older intent about the unknown node is not news.
    assert_eq!(
        members.handle_join_intent(clock.now(), LamportTime(5), "b"),
        IntentOutcome::Ignore
    );
    assert_eq!(
        members.clock.time(),
        LamportTime(6),
        "intents are witnessed"
    );
    // A leave intent newer than the buffered join replaces it.
    assert_eq!(
        leave(&mut members, clock.now(), 7, "b", &mut events),
        IntentOutcome::Rebroadcast
    );
    members.handle_node_join(clock.now(), node("b"), &mut events);
    assert_eq!(status(&members, "b"), Some(MemberStatus::Leaving));
    assert_eq!(members.status_ltime("b"), Some(LamportTime(7)));
    // memberlist then reports it dead: it left, not failed.
    members.handle_node_leave(clock.now(), "b", &mut events);
    assert_eq!(status(&members, "b"), Some(MemberStatus::Left));
    assert_eq!(kinds(&events), ["join b", "leave b"]);
}

#[test]
fn out_of_order_join_and_leave_intents() {
    let clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    members.handle_node_join(clock.now(), node("b"), &mut events);
    // Leave at 10 arrives first, then a stale join at 8: still leaving.
    assert_eq!(
        leave(&mut members, clock.now(), 10, "b", &mut events),
        IntentOutcome::Rebroadcast
    );
    assert_eq!(
        members.handle_join_intent(clock.now(), LamportTime(8), "b"),
        IntentOutcome::Ignore
    );
    assert_eq!(status(&members, "b"), Some(MemberStatus::Leaving));
    // A stale leave is ignored too; a newer join (the node rejoined) makes it alive again.
    assert_eq!(
        leave(&mut members, clock.now(), 9, "b", &mut events),
        IntentOutcome::Ignore
    );
    assert_eq!(
        members.handle_join_intent(clock.now(), LamportTime(11), "b"),
        IntentOutcome::Rebroadcast
    );
    assert_eq!(status(&members, "b"), Some(MemberStatus::Alive));
    // Without a (newer) leave intent, death is a failure.
    members.handle_node_leave(clock.now(), "b", &mut events);
    assert_eq!(status(&members, "b"), Some(MemberStatus::Failed));
    // A leave intent that arrives after the failure turns it into a forced leave.
    assert_eq!(
        leave(&mut members, clock.now(), 12, "b", &mut events),
        IntentOutcome::Rebroadcast
    );
    assert_eq!(status(&members, "b"), Some(MemberStatus::Left));
    // The node comes back: alive again.
    members.handle_node_join(clock.now(), node("b"), &mut events);
    assert_eq!(status(&members, "b"), Some(MemberStatus::Alive));
    assert_eq!(kinds(&events), ["join b", "failed b", "leave b", "join b"]);
}

#[test]
fn leave_intent_about_ourselves_is_refuted_while_alive() {
    let clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    members.handle_node_join(clock.now(), node("me"), &mut events);
    assert_eq!(
        leave(&mut members, clock.now(), 3, "me", &mut events),
        IntentOutcome::Refute
    );
    assert_eq!(status(&members, "me"), Some(MemberStatus::Alive));
    assert_eq!(members.clock.time(), LamportTime(4));
    // While we leave ourselves, our own intent is applied.
    let outcome = members.handle_leave_intent(
        clock.now(),
        LamportTime(4),
        "me",
        false,
        false,
        Duration::ZERO,
        &mut events,
    );
    assert_eq!(outcome, IntentOutcome::Rebroadcast);
    assert_eq!(status(&members, "me"), Some(MemberStatus::Leaving));
}

#[test]
fn reap_after_reconnect_and_tombstone_timeouts() {
    let mut clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    for name in ["me", "failed", "left"] {
        members.handle_node_join(clock.now(), node(name), &mut events);
    }
    leave(&mut members, clock.now(), 2, "left", &mut events);
    members.handle_node_leave(clock.now(), "left", &mut events);
    members.handle_node_leave(clock.now(), "failed", &mut events);
    members.handle_join_intent(clock.now(), LamportTime(3), "stranger");
    events.clear();
    let reap = |members: &mut Members, now: Instant, events: &mut Vec<Event>| {
        members.reap(now, 2 * HOUR, HOUR, 5 * MINUTE, events)
    };
    // Exactly at the timeout nothing goes (Go reaps when elapsed > timeout).
    let now = clock.advance(5 * MINUTE);
    assert!(reap(&mut members, now, &mut events).is_empty());
    let now = clock.advance(Duration::from_millis(1));
    assert!(reap(&mut members, now, &mut events).is_empty());
    assert!(
        !members
            .handle_join_intent(now, LamportTime(3), "stranger")
            .eq(&IntentOutcome::Ignore),
        "the intent buffer forgot the stranger after 5 minutes"
    );
    let now = clock.advance(HOUR - 5 * MINUTE - Duration::from_millis(1));
    assert!(reap(&mut members, now, &mut events).is_empty());
    let now = clock.advance(Duration::from_millis(1));
    let erased = reap(&mut members, now, &mut events);
    assert_eq!(
        erased.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["left"]
    );
    let now = clock.advance(HOUR);
    let erased = reap(&mut members, now, &mut events);
    assert_eq!(
        erased.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["failed"]
    );
    assert_eq!(kinds(&events), ["reap left", "reap failed"]);
    assert_eq!(
        members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["me"]
    );
}

#[test]
fn prune_erases_left_now_and_leaving_after_the_delay() {
    let mut clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    members.handle_node_join(clock.now(), node("b"), &mut events);
    members.handle_node_join(clock.now(), node("c"), &mut events);
    members.handle_node_leave(clock.now(), "c", &mut events);
    events.clear();
    let delay = Duration::from_secs(6);
    members.handle_leave_intent(
        clock.now(),
        LamportTime(2),
        "c",
        true,
        true,
        delay,
        &mut events,
    );
    assert_eq!(kinds(&events), ["leave c", "reap c"]);
    events.clear();
    members.handle_leave_intent(
        clock.now(),
        LamportTime(3),
        "b",
        true,
        true,
        delay,
        &mut events,
    );
    assert_eq!(status(&members, "b"), Some(MemberStatus::Leaving));
    assert_eq!(members.next_prune(), Some(clock.now() + delay));
    let now = clock.advance(delay);
    members.run_prunes(now, &mut events);
    assert_eq!(kinds(&events), ["reap b"]);
    assert_eq!(members.len(), 0);
}

#[test]
fn reconnect_picks_a_failed_member_with_probability_failed_over_alive() {
    let clock = Clock::new();
    let mut rng = StdRng::seed_from_u64(11);
    let mut members = Members::new("me");
    let mut events = Vec::new();
    members.handle_node_join(clock.now(), node("me"), &mut events);
    assert!(
        members.reconnect_target(&mut rng).is_none(),
        "nobody failed"
    );
    members.handle_node_join(clock.now(), node("b"), &mut events);
    members.handle_node_leave(clock.now(), "b", &mut events);
    // 1 failed / 1 alive: always.
    for _ in 0..20 {
        assert_eq!(
            members.reconnect_target(&mut rng).map(|m| m.name.as_str()),
            Some("b")
        );
    }
    // 1 failed / 4 alive: about a quarter of the time.
    for name in ["c", "d", "e"] {
        members.handle_node_join(clock.now(), node(name), &mut events);
    }
    let chosen = (0..4000)
        .filter(|_| members.reconnect_target(&mut rng).is_some())
        .count();
    assert!((800..1200).contains(&chosen), "chosen {chosen} of 4000");
}

fn user_event(ltime: u64, name: &str, payload: &[u8]) -> UserEvent {
    UserEvent {
        ltime: LamportTime(ltime),
        name: name.to_owned(),
        payload: payload.to_vec(),
        coalesce: true,
    }
}

#[test]
fn user_events_are_delivered_once() {
    let mut buffer = UserEvents::new(512);
    let mut events = Vec::new();
    let check =
        |buffer: &mut UserEvents, events: &mut Vec<Event>, event: UserEvent, expected: bool| {
            let what = format!("{event:?}");
            assert_eq!(buffer.handle(event, events), expected, "{what}");
        };
    check(
        &mut buffer,
        &mut events,
        user_event(1, "deploy", b"v1"),
        true,
    );
    check(
        &mut buffer,
        &mut events,
        user_event(1, "deploy", b"v1"),
        false,
    );
    // Same time, different payload or name: a different event.
    check(
        &mut buffer,
        &mut events,
        user_event(1, "deploy", b"v2"),
        true,
    );
    check(
        &mut buffer,
        &mut events,
        user_event(1, "restart", b"v1"),
        true,
    );
    // Slot 513 % 512 = 1 is reused for a newer time.
    check(
        &mut buffer,
        &mut events,
        user_event(513, "deploy", b"v1"),
        true,
    );
    assert_eq!(buffer.clock.time(), LamportTime(514));
    // Older than clock - 512: dropped even though its slot is free.
    check(&mut buffer, &mut events, user_event(1, "late", b""), false);
    check(&mut buffer, &mut events, user_event(2, "ok", b""), true);
    // After "ignore old events": below the minimum is dropped.
    buffer.ignore_before(LamportTime(600));
    check(&mut buffer, &mut events, user_event(599, "old", b""), false);
    check(&mut buffer, &mut events, user_event(600, "new", b""), true);
    assert_eq!(
        kinds(&events),
        [
            "event deploy 1",
            "event deploy 1",
            "event restart 1",
            "event deploy 513",
            "event ok 2",
            "event new 600"
        ]
    );
}

#[test]
fn queries_are_seen_once_per_ltime_and_id() {
    let mut queries = Queries::new(512);
    assert!(queries.first_sighting(LamportTime(3), 7, "q"));
    assert!(!queries.first_sighting(LamportTime(3), 7, "q"));
    assert!(queries.first_sighting(LamportTime(3), 8, "q"));
    assert!(queries.first_sighting(LamportTime(515), 7, "q"));
    assert!(
        !queries.first_sighting(LamportTime(2), 1, "q"),
        "older than clock - 512"
    );
    assert_eq!(queries.clock.time(), LamportTime(516));
}

#[test]
fn query_filters() {
    let tags: BTreeMap<String, String> = [("role", "3306"), ("dc", "east")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let nodes = |names: &[&str]| Filter::Nodes(names.iter().map(|n| (*n).to_owned()).collect());
    let tag = |tag: &str, expr: &str| Filter::Tag {
        tag: tag.to_owned(),
        expr: expr.to_owned(),
    };
    let check = |filters: &[Filter], expected: bool| {
        assert_eq!(
            should_process(filters, "me", &tags),
            expected,
            "{filters:?}"
        );
    };
    check(&[], true);
    check(&[nodes(&["a", "me"])], true);
    check(&[nodes(&["a"])], false);
    check(&[tag("role", "3306")], true);
    check(&[tag("role", "^3306$")], true);
    check(&[tag("role", "30")], true); // unanchored, like Go's regexp.MatchString
    check(&[tag("role", "^30$")], false);
    check(&[tag("missing", "^$")], true);
    check(&[tag("missing", ".")], false);
    check(&[tag("role", "(")], false);
    check(&[nodes(&["me"]), tag("dc", "west")], false);
    check(&[nodes(&["me"]), tag("dc", "ea")], true);
}

#[test]
fn default_query_timeout_scales_with_log10_of_members() {
    let gossip = Duration::from_millis(200);
    let check = |n: usize, expected_ms: u64| {
        assert_eq!(
            default_query_timeout(gossip, 16, n),
            Duration::from_millis(expected_ms),
            "n = {n}"
        );
    };
    check(1, 3200);
    check(2, 3200);
    check(9, 3200);
    check(10, 6400);
    check(99, 6400);
    check(100, 9600);
}

#[test]
fn our_query_collects_each_ack_and_response_once_until_the_deadline() {
    let mut clock = Clock::new();
    let mut queries = Queries::new(512);
    let mut events = Vec::new();
    let handle = QueryHandle {
        ltime: LamportTime(4),
        id: 99,
    };
    queries.register(handle, true, clock.now() + Duration::from_secs(3));
    let now = clock.now();
    queries.handle_response(now, handle, "a", true, Vec::new(), &mut events);
    queries.handle_response(now, handle, "a", true, Vec::new(), &mut events);
    queries.handle_response(now, handle, "a", false, b"up 3d".to_vec(), &mut events);
    queries.handle_response(now, handle, "a", false, b"again".to_vec(), &mut events);
    let wrong_id = QueryHandle { id: 98, ..handle };
    queries.handle_response(now, wrong_id, "b", false, Vec::new(), &mut events);
    let unknown = QueryHandle {
        ltime: LamportTime(5),
        ..handle
    };
    queries.handle_response(now, unknown, "b", false, Vec::new(), &mut events);
    assert_eq!(queries.next_deadline(), Some(now + Duration::from_secs(3)));
    let now = clock.advance(Duration::from_secs(2));
    queries.expire(now, &mut events);
    queries.handle_response(now, handle, "b", false, Vec::new(), &mut events);
    let now = clock.advance(Duration::from_secs(1));
    queries.expire(now, &mut events);
    queries.handle_response(now, handle, "c", false, Vec::new(), &mut events);
    assert_eq!(
        kinds(&events),
        ["ack a", "response a", "response b", "done"]
    );
    assert_eq!(
        events[1],
        Event::QueryResponse {
            query: handle,
            from: "a".to_owned(),
            payload: b"up 3d".to_vec()
        }
    );
    assert_eq!(queries.next_deadline(), None);
}

fn state(name: &str) -> super::state::SerfState {
    let config = Config {
        node_name: name.to_owned(),
        ..Config::default()
    };
    super::state::SerfState::new(config, StdRng::seed_from_u64(5), 4, Instant::now())
}

#[test]
fn push_pull_state_carries_clocks_status_times_left_members_and_events() {
    use crate::wire::serf::{PushPull, SerfMessage};
    let mut local = state("me");
    let now = local.now;
    let mut events = Vec::new();
    local.members.handle_node_join(now, node("me"), &mut events);
    local
        .members
        .handle_node_join(now, node("gone"), &mut events);
    leave(&mut local.members, now, 4, "gone", &mut events);
    local.members.handle_node_leave(now, "gone", &mut events);
    local
        .user_events
        .handle(user_event(3, "deploy", b"v1"), &mut events);
    let encoded = local.encode_local_state(false);
    let Ok(SerfMessage::PushPull(decoded)) = SerfMessage::decode(&encoded) else {
        panic!("local state does not decode: {encoded:02x?}");
    };
    assert_eq!(decoded.ltime, 5);
    assert_eq!(
        decoded.status_ltimes,
        BTreeMap::from([("gone".to_owned(), 4), ("me".to_owned(), 0)])
    );
    assert_eq!(decoded.left_members, ["gone"]);
    assert_eq!(decoded.event_ltime, 4);
    assert_eq!(decoded.query_ltime, 1);
    assert_eq!(decoded.events.len(), 512, "the whole ring, as Go sends it");
    let slot = decoded.events[3].as_ref().expect("slot 3 holds the event");
    assert_eq!((slot.ltime, slot.events[0].name.as_str()), (3, "deploy"));

    // Merged by a newcomer that asked to ignore old events: clocks move past the remote
    // ones, "gone" is known to have left, the old event is not delivered.
    let mut newcomer = state("new");
    newcomer.ignore_old_events = true;
    newcomer.merge_state(&encoded, true);
    // Member clock: witness(5 - 1), then the leave intent for "gone" at 4 + 1 is witnessed.
    assert_eq!(
        newcomer.clocks(),
        (LamportTime(6), LamportTime(4), LamportTime(1))
    );
    assert!(newcomer.events.is_empty(), "{:?}", newcomer.events);
    let now = newcomer.now;
    newcomer
        .members
        .handle_node_join(now, node("gone"), &mut newcomer.events);
    assert_eq!(
        status(&newcomer.members, "gone"),
        Some(MemberStatus::Leaving)
    );
    // Without "ignore old", the recent event is replayed once.
    let mut replaying = state("replay");
    replaying.merge_state(&encoded, true);
    replaying.merge_state(&encoded, false);
    assert_eq!(kinds(&replaying.events), ["event deploy 3"]);
    // Garbage and other message types are dropped and counted.
    replaying.merge_state(&[0x02, 0xc1], false);
    replaying.merge_state(
        &SerfMessage::PushPull(PushPull::default()).encode()[..1],
        false,
    );
    assert_eq!(replaying.decode_errors, 2);
}

mod order {
    use proptest::prelude::*;

    use super::*;

    /// Distinct Lamport times, each a join (false) or leave (true) intent, in any order.
    fn intents() -> impl Strategy<Value = Vec<(u64, bool)>> {
        prop::collection::btree_map(1u64..1000, any::<bool>(), 1..12)
            .prop_map(|map| map.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
    }

    fn expected(intents: &[(u64, bool)]) -> (MemberStatus, LamportTime) {
        let (ltime, is_leave) = *intents.iter().max().expect("at least one intent");
        let status = if is_leave {
            MemberStatus::Leaving
        } else {
            MemberStatus::Alive
        };
        (status, LamportTime(ltime))
    }

    fn apply(members: &mut Members, now: Instant, intents: &[(u64, bool)]) {
        let mut events = Vec::new();
        for &(ltime, is_leave) in intents {
            if is_leave {
                leave(members, now, ltime, "b", &mut events);
            } else {
                members.handle_join_intent(now, LamportTime(ltime), "b");
            }
        }
    }

    proptest! {
        /// Whatever order intents arrive in, the newest one decides, for a known member and
        /// for one that memberlist introduces only afterwards.
        #[test]
        fn the_newest_intent_wins_in_any_order(intents in intents()) {
            let now = Instant::now();
            let mut known = Members::new("me");
            known.handle_node_join(now, node("b"), &mut Vec::new());
            apply(&mut known, now, &intents);
            let got = (status(&known, "b").expect("known"), known.status_ltime("b").expect("known"));
            prop_assert_eq!(got, expected(&intents));

            let mut later = Members::new("me");
            apply(&mut later, now, &intents);
            later.handle_node_join(now, node("b"), &mut Vec::new());
            let got = (status(&later, "b").expect("joined"), later.status_ltime("b").expect("joined"));
            prop_assert_eq!(got, expected(&intents));
            let max = intents.iter().map(|(ltime, _)| *ltime).max().expect("non-empty");
            prop_assert_eq!(later.clock.time(), LamportTime(max + 1));
        }
    }
}

mod duplicates {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Events gossiped several times, in any order, are delivered exactly once each
        /// (all within the 512-slot window).
        #[test]
        fn each_event_is_delivered_once(
            sends in prop::collection::vec((1u64..400, 0u8..3, 0u8..2), 1..60)
                .prop_flat_map(|sends| {
                    let doubled: Vec<_> = sends.iter().chain(sends.iter()).copied().collect();
                    Just(doubled).prop_shuffle()
                })
        ) {
            let mut buffer = UserEvents::new(512);
            let mut events = Vec::new();
            for (ltime, name, payload) in &sends {
                buffer.handle(user_event(*ltime, &format!("e{name}"), &[*payload]), &mut events);
            }
            let delivered: Vec<(u64, String, Vec<u8>)> = events
                .iter()
                .filter_map(|event| match event {
                    Event::UserEvent(e) => Some((e.ltime.0, e.name.clone(), e.payload.clone())),
                    _ => None,
                })
                .collect();
            let distinct: BTreeSet<_> = sends
                .iter()
                .map(|(ltime, name, payload)| (*ltime, format!("e{name}"), vec![*payload]))
                .collect();
            prop_assert_eq!(delivered.len(), distinct.len());
            prop_assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), distinct);
        }
    }
}

/// Asks our own member `operation` and returns its own answer (looped back by hand).
fn ask_self(serf: &mut Serf, now: Instant, operation: &KeyOperation) -> wire::KeyResponse {
    let handle = serf
        .query(
            now,
            operation.query_name(),
            &operation.payload(),
            &QueryParams::default(),
        )
        .expect("query accepted");
    let own = serf.memberlist().local_node().addr;
    let mut answer = None;
    for _ in 0..10 {
        while let Some(transmit) = serf.poll_transmit() {
            if let crate::memberlist::Transmit::Packet { to, bytes } = transmit {
                if to == own {
                    serf.handle_packet(now, own, &bytes)
                        .expect("our own packet");
                }
            }
        }
        while let Some(event) = serf.poll_event() {
            if let Event::QueryResponse { query, payload, .. } = event {
                if query == handle {
                    answer = Some(payload);
                }
            }
        }
    }
    let payload = answer.expect("we answer our own key query");
    let raw_len = payload.len();
    assert!(raw_len <= 1024, "answer of {raw_len} bytes");
    wire::KeyResponse::decode(&payload).expect("a key response")
}

#[test]
fn key_queries_change_the_shared_keyring_with_gos_answers() {
    use crate::wire::crypto::{Keyring, SharedKeyring};
    use base64::Engine as _;
    let b64 = |key: &[u8]| base64::engine::general_purpose::STANDARD.encode(key);
    let now = Instant::now();
    let config = Config {
        node_name: "a".to_owned(),
        ..Config::default()
    };
    let addr = SocketAddr::from(([10, 0, 0, 1], 7946));
    let mut serf = Serf::new(
        config,
        crate::memberlist::Config::lan(),
        addr,
        StdRng::seed_from_u64(3),
        now,
    )
    .expect("valid config");

    // No keyring: Go's texts.
    let answer = ask_self(&mut serf, now, &KeyOperation::Install(vec![1; 16]));
    assert_eq!(
        (answer.result, answer.message.as_str()),
        (false, "No keyring to modify (encryption not enabled)")
    );
    let answer = ask_self(&mut serf, now, &KeyOperation::List);
    assert_eq!(
        (answer.result, answer.message.as_str()),
        (false, "Keyring is empty (encryption not enabled)")
    );

    // 60 keys: the list is cut to fit the 1024-byte response, and says so.
    let keys: Vec<[u8; 16]> = (0..60u8).map(|i| [i; 16]).collect();
    let shared = SharedKeyring::new(Keyring::new(&keys).expect("valid keys"));
    serf.set_keyring(Some(shared.clone()));
    let answer = ask_self(&mut serf, now, &KeyOperation::List);
    let shown = answer.keys.as_ref().map_or(0, Vec::len);
    assert!(
        answer.result && shown > 20 && shown < 40,
        "{shown} keys shown"
    );
    assert_eq!(
        answer.message,
        format!("truncated key list response, showing first {shown} of 60 keys")
    );
    assert_eq!(answer.primary_key, b64(&[0; 16]));

    let new_key = [99u8; 32];
    let cases: &[(KeyOperation, bool, &str)] = &[
        (KeyOperation::Install(new_key.to_vec()), true, ""),
        (
            KeyOperation::Install(vec![1; 15]),
            false,
            "key size must be 16, 24 or 32 bytes, not 15",
        ),
        (
            KeyOperation::Use(vec![7; 24]),
            false,
            "Requested key is not in the keyring",
        ),
        (KeyOperation::Use(new_key.to_vec()), true, ""),
        (
            KeyOperation::Remove(new_key.to_vec()),
            false,
            "Removing the primary key is not allowed",
        ),
        (KeyOperation::Remove(vec![0; 16]), true, ""),
        (KeyOperation::Remove(vec![7; 24]), true, ""),
    ];
    for (operation, result, message) in cases {
        let answer = ask_self(&mut serf, now, operation);
        assert_eq!(
            (answer.result, answer.message.as_str()),
            (*result, *message),
            "{operation:?}"
        );
    }
    let ring = shared.read();
    assert_eq!(ring.primary(), new_key);
    assert_eq!(ring.keys().count(), 60);
    assert!(!ring.keys().any(|key| key == [0; 16]));
}

#[test]
fn the_event_ring_is_bounded_in_size_count_and_bytes() {
    use super::event::{MAX_RING_BYTES, MAX_SLOT_EVENTS};
    let mut buffer = UserEvents::new(512);
    let mut events = Vec::new();
    // Larger than Go lets anyone send: dropped.
    let huge = vec![0; crate::serf::config::USER_EVENT_SIZE_HARD_LIMIT];
    assert!(!buffer.handle(user_event(1, "x", &huge), &mut events));
    // Many distinct events forged at one time: the slot keeps MAX_SLOT_EVENTS.
    let kept = (0..1_000)
        .filter(|i| buffer.handle(user_event(2, &format!("e{i}"), b""), &mut events))
        .count();
    assert_eq!(kept, MAX_SLOT_EVENTS);
    // 8 KiB events at every time: the ring stops at MAX_RING_BYTES...
    let payload = vec![7; 8 * 1024];
    let delivered = (3..600)
        .filter(|t| buffer.handle(user_event(*t, "big", &payload), &mut events))
        .count();
    let held: usize = buffer
        .ring()
        .iter()
        .flatten()
        .flat_map(|slot| &slot.events)
        .map(|(name, payload)| name.len() + payload.len())
        .sum();
    assert!(held <= MAX_RING_BYTES, "{held}");
    assert!(delivered < 600 - 3 && delivered > 100, "{delivered}");
    // ... and so does the push-pull that carries it.
    let mut state = state("me");
    state.user_events = buffer;
    assert!(state.encode_local_state(false).len() < MAX_RING_BYTES + 64 * 1024);
}

#[test]
fn queries_from_others_are_clamped_and_capped() {
    use super::query::{MAX_INBOUND_QUERIES, MAX_QUERY_TIMEOUT};
    let mut serf = state("me");
    let query = |ltime: u64, timeout: Duration, source: &str| wire::Query {
        ltime,
        id: ltime as u32,
        addr: vec![127, 0, 0, 2],
        port: 7946,
        source_node: source.to_owned(),
        filters: Vec::new(),
        flags: 0,
        relay_factor: 0,
        timeout,
        name: "q".to_owned(),
        payload: Vec::new(),
    };
    // i64::MAX nanoseconds on the wire (292 years): open for MAX_QUERY_TIMEOUT at most.
    serf.apply_query(&query(1, Duration::from_nanos(i64::MAX as u64), "peer"));
    let Some(Event::Query(delivered)) = serf.events.pop() else {
        panic!("query not delivered: {:?}", serf.events);
    };
    assert_eq!(delivered.deadline, serf.now + MAX_QUERY_TIMEOUT);
    assert!(serf.queries.next_deadline() <= Some(serf.now + 2 * MAX_QUERY_TIMEOUT));
    // A source name no agent would have: dropped, not gossiped on.
    assert!(!serf.apply_query(&query(2, Duration::from_secs(1), &"n".repeat(100_000))));
    assert!(serf.events.is_empty());
    // Thousands of open queries: at most MAX_INBOUND_QUERIES are delivered and remembered.
    let delivered = (3..5_000)
        .filter(|ltime| {
            serf.apply_query(&query(*ltime, HOUR, "peer"));
            serf.events.pop().is_some()
        })
        .count();
    assert_eq!(delivered, MAX_INBOUND_QUERIES - 1);
}

#[test]
fn a_huge_push_pull_is_merged_in_part_and_intents_stay_bounded() {
    use super::member::MAX_RECENT_INTENTS;
    use super::push_pull::MAX_MERGED_NAMES;
    use crate::wire::serf::{PushPull, SerfMessage};
    let names = MAX_MERGED_NAMES + 1_000;
    let remote = PushPull {
        ltime: 10,
        status_ltimes: (0..names).map(|i| (format!("ghost-{i}"), 3)).collect(),
        left_members: (0..names)
            .step_by(2)
            .map(|i| format!("ghost-{i}"))
            .collect(),
        ..PushPull::default()
    };
    let encoded = SerfMessage::PushPull(remote).encode();
    let mut serf = state("me");
    serf.merge_state(&encoded, false);
    assert_eq!(serf.members.recent_intents(), MAX_RECENT_INTENTS);
    assert_eq!(serf.members.len(), 0);
}

#[test]
fn a_full_member_table_reaps_its_oldest_gone_members_first() {
    use super::member::MAX_MEMBERS;
    let mut clock = Clock::new();
    let mut members = Members::new("me");
    let mut events = Vec::new();
    for i in 0..MAX_MEMBERS {
        let now = clock.advance(Duration::from_millis(1));
        members.handle_node_join(now, node(&format!("n{i}")), &mut events);
        if i % 2 == 0 {
            members.handle_node_leave(now, &format!("n{i}"), &mut events);
        }
    }
    events.clear();
    let now = clock.advance(Duration::from_millis(1));
    members.handle_node_join(now, node("newcomer"), &mut events);
    assert_eq!(status(&members, "newcomer"), Some(MemberStatus::Alive));
    assert!(members.len() <= MAX_MEMBERS);
    // The first reaped are the ones failed longest ago; live members stay.
    assert_eq!(kinds(&events[..1]), ["reap n0"]);
    assert!(status(&members, "n0").is_none());
    assert_eq!(status(&members, "n1"), Some(MemberStatus::Alive));
    assert_eq!(
        status(&members, &format!("n{}", MAX_MEMBERS - 2)),
        Some(MemberStatus::Failed)
    );
}

#[test]
fn restored_clocks_are_witnessed_and_older_events_are_not_delivered_again() {
    let config = Config {
        node_name: "me".to_owned(),
        restored_clocks: Some(RestoredClocks {
            member: LamportTime(40),
            event: LamportTime(7),
            query: LamportTime(3),
        }),
        ..Config::default()
    };
    let mut restored =
        super::state::SerfState::new(config, StdRng::seed_from_u64(5), 4, Instant::now());
    assert_eq!(
        restored.clocks(),
        (LamportTime(41), LamportTime(8), LamportTime(4))
    );
    let mut events = Vec::new();
    assert!(!restored
        .user_events
        .handle(user_event(7, "old", b""), &mut events));
    assert!(restored
        .user_events
        .handle(user_event(8, "new", b""), &mut events));
    assert_eq!(kinds(&events), ["event new 8"]);
    // A fresh start (no snapshot) keeps Go's clocks at 1 and accepts every time.
    let fresh = state("me");
    assert_eq!(
        fresh.clocks(),
        (LamportTime(1), LamportTime(1), LamportTime(1))
    );
    assert_eq!(fresh.user_events.min_time, LamportTime(0));
}
