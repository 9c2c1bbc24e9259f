//! Queries: the query clock and de-duplication ring, filters, default timeout, our own
//! queries collecting acks and responses, and queries from others waiting for our answer
//! (serf/serf.go `Query`, `handleQuery`, `handleQueryResponse`, serf/query.go, serf/event.go).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::lamport::{LamportClock, LamportTime};
use super::Event;

pub use crate::wire::serf::Filter;

/// The longest a query from another member stays open here, whatever its wire timeout says
/// (the wire carries nanoseconds up to `i64::MAX`).
pub(crate) const MAX_QUERY_TIMEOUT: Duration = Duration::from_secs(600);
/// The most queries from other members open here at once; more are not delivered (they are
/// still de-duplicated and gossiped on).
pub(crate) const MAX_INBOUND_QUERIES: usize = 1024;

/// Parameters of a query we send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryParams {
    /// Only these nodes process it (empty = all).
    pub filter_nodes: Vec<String>,
    /// Tag name → unanchored regex; all must match.
    pub filter_tags: BTreeMap<String, String>,
    /// Ask every processing member for an ack.
    pub request_ack: bool,
    /// Also route answers through this many other members.
    pub relay_factor: u8,
    /// How long to collect answers; `None` = Serf's default for the cluster size.
    pub timeout: Option<Duration>,
}

impl QueryParams {
    /// The filters in Go's order: node list first, then one per tag.
    pub fn filters(&self) -> Vec<Filter> {
        let mut filters = Vec::new();
        if !self.filter_nodes.is_empty() {
            filters.push(Filter::Nodes(self.filter_nodes.clone()));
        }
        for (tag, expr) in &self.filter_tags {
            filters.push(Filter::Tag {
                tag: tag.clone(),
                expr: expr.clone(),
            });
        }
        filters
    }
}

/// Identifies one of our own queries in [`Event::QueryAck`], [`Event::QueryResponse`] and
/// [`Event::QueryDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryHandle {
    /// The query's Lamport time.
    pub ltime: LamportTime,
    /// The query's random ID.
    pub id: u32,
}

/// Identifies a query from another member that we may answer with `respond`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResponderId(pub u64);

/// Serf's default query timeout: gossip interval × `mult` × ceil(log10(n + 1)).
pub fn default_query_timeout(gossip_interval: Duration, mult: u32, n_members: usize) -> Duration {
    let scale = ((n_members as f64) + 1.0).log10().ceil() as u32;
    gossip_interval * mult * scale
}

/// Whether a member named `local_name` with `tags` processes a query with these filters.
/// Go's rules: all filters must pass; a node filter must list us; a tag regex is unanchored
/// and a missing tag is ""; a regex that does not compile fails the query.
pub fn should_process(
    filters: &[Filter],
    local_name: &str,
    tags: &BTreeMap<String, String>,
) -> bool {
    filters.iter().all(|filter| match filter {
        Filter::Nodes(nodes) => nodes.iter().any(|node| node == local_name),
        Filter::Tag { tag, expr } => match regex::Regex::new(expr) {
            Ok(re) => re.is_match(tags.get(tag).map_or("", String::as_str)),
            Err(error) => {
                tracing::debug!(%expr, %error, "query filter regex does not compile");
                false
            }
        },
    })
}

/// A query of ours that is still collecting answers.
#[derive(Debug)]
struct Pending {
    id: u32,
    deadline: Instant,
    acks: Option<HashSet<String>>,
    responses: HashSet<String>,
}

/// A query from someone else that the application may answer.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    pub(crate) ltime: LamportTime,
    pub(crate) id: u32,
    pub(crate) reply_to: SocketAddr,
    pub(crate) source_node: String,
    pub(crate) relay_factor: u8,
    pub(crate) deadline: Instant,
    /// When we forget it: a while after the deadline, so a late `respond` gets a precise
    /// "past the deadline" error rather than "unknown".
    pub(crate) forget_at: Instant,
    pub(crate) responded: bool,
}

/// The query clock, the ring of seen (LTime, ID)s, our pending queries and inbound queries.
#[derive(Debug)]
pub(crate) struct Queries {
    pub(crate) clock: LamportClock,
    pub(crate) min_time: LamportTime,
    ring: Vec<Option<(LamportTime, Vec<u32>)>>,
    pending: BTreeMap<LamportTime, Pending>,
    inbound: HashMap<ResponderId, Inbound>,
    next_responder: u64,
}

impl Queries {
    pub(crate) fn new(size: usize) -> Self {
        let mut clock = LamportClock::new();
        clock.increment();
        Self {
            clock,
            min_time: LamportTime(0),
            ring: vec![None; size.max(1)],
            pending: BTreeMap::new(),
            inbound: HashMap::new(),
            next_responder: 1,
        }
    }

    /// Witnesses the query time and records (ltime, id); true when this query is new.
    pub(crate) fn first_sighting(&mut self, ltime: LamportTime, id: u32, name: &str) -> bool {
        self.clock.witness(ltime);
        if ltime < self.min_time {
            return false;
        }
        let size = self.ring.len() as u64;
        let now = self.clock.time().0;
        if now > size && ltime.0 < now - size {
            tracing::debug!(%name, %ltime, current = now, "dropping old query");
            return false;
        }
        let slot = &mut self.ring[(ltime.0 % size) as usize];
        match slot {
            Some((seen, ids)) if *seen == ltime => {
                if ids.contains(&id) {
                    return false;
                }
                ids.push(id);
            }
            _ => *slot = Some((ltime, vec![id])),
        }
        true
    }

    /// Starts collecting answers to our own query.
    pub(crate) fn register(&mut self, handle: QueryHandle, ack: bool, deadline: Instant) {
        self.pending.insert(
            handle.ltime,
            Pending {
                id: handle.id,
                deadline,
                acks: ack.then(HashSet::new),
                responses: HashSet::new(),
            },
        );
    }

    /// An ack or response to one of our queries arrived.
    pub(crate) fn handle_response(
        &mut self,
        now: Instant,
        handle: QueryHandle,
        from: &str,
        is_ack: bool,
        payload: Vec<u8>,
        events: &mut Vec<Event>,
    ) {
        let Some(pending) = self.pending.get_mut(&handle.ltime) else {
            tracing::debug!(ltime = %handle.ltime, id = handle.id, from, "reply for non-running query");
            return;
        };
        if pending.id != handle.id {
            tracing::debug!(
                local = pending.id,
                remote = handle.id,
                "query reply id mismatch"
            );
            return;
        }
        if now > pending.deadline {
            return;
        }
        if is_ack {
            // Go drops acks to queries that did not ask for them (no ack channel).
            if let Some(acks) = &mut pending.acks {
                if acks.insert(from.to_owned()) {
                    events.push(Event::QueryAck {
                        query: handle,
                        from: from.to_owned(),
                    });
                }
            }
        } else if pending.responses.insert(from.to_owned()) {
            events.push(Event::QueryResponse {
                query: handle,
                from: from.to_owned(),
                payload,
            });
        }
    }

    /// Remembers a query from someone else so the application can answer it; `None` when
    /// [`MAX_INBOUND_QUERIES`] are open already.
    pub(crate) fn add_inbound(&mut self, inbound: Inbound) -> Option<ResponderId> {
        if self.inbound.len() >= MAX_INBOUND_QUERIES {
            return None;
        }
        let id = ResponderId(self.next_responder);
        self.next_responder += 1;
        self.inbound.insert(id, inbound);
        Some(id)
    }

    pub(crate) fn inbound(&self, id: ResponderId) -> Option<&Inbound> {
        self.inbound.get(&id)
    }

    pub(crate) fn inbound_mut(&mut self, id: ResponderId) -> Option<&mut Inbound> {
        self.inbound.get_mut(&id)
    }

    /// Closes our queries whose deadline passed and forgets expired inbound ones.
    pub(crate) fn expire(&mut self, now: Instant, events: &mut Vec<Event>) {
        let done: Vec<LamportTime> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.deadline <= now)
            .map(|(ltime, _)| *ltime)
            .collect();
        for ltime in done {
            if let Some(pending) = self.pending.remove(&ltime) {
                events.push(Event::QueryDone {
                    query: QueryHandle {
                        ltime,
                        id: pending.id,
                    },
                });
            }
        }
        self.inbound.retain(|_, inbound| inbound.forget_at > now);
    }

    /// When the next of our queries closes or an inbound one expires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|pending| pending.deadline);
        let inbound = self.inbound.values().map(|inbound| inbound.forget_at);
        pending.chain(inbound).min()
    }
}
