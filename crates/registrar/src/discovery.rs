//! Discovery: the members a registry shows, as a first snapshot and then changes, from Serf
//! ([`SerfDiscovery`]: the member's events) or etcd ([`crate::etcd::EtcdDiscovery`]: the watch
//! of a prefix). The consumer's pools and the DNS zone are built over a [`Discovery`], so they
//! do not know which registry feeds them.

use serf::serf::{Event, Member};
use tokio::sync::broadcast;
use tracing::warn;

pub use crate::advertise::BoxFuture;

/// One change of what a registry shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Every member now (the first item, and again after the events overflowed).
    Snapshot(Vec<Member>),
    /// A member joined or changed (tags, address).
    Update(Member),
    /// A member left or failed (its status says which); it may still be listed a while.
    Departed(Member),
    /// A member is gone for good.
    Reaped(String),
}

/// A source of member changes; each subscriber gets its own [`Changes`].
pub trait Discovery: Send + Sync {
    /// Starts following: a [`Change::Snapshot`] first, then changes as they happen.
    fn changes(&self) -> Box<dyn Changes>;

    /// Where members come from, for the log (`serf events`, `the etcd watch of /services/`).
    fn source(&self) -> String;
}

/// One subscriber's stream of [`Change`]s.
pub trait Changes: Send {
    /// The next change; `None` once the registry stopped (shutdown).
    fn next(&mut self) -> BoxFuture<'_, Option<Change>>;
}

/// The Serf side: the member's event fan-out, and its handle for the member list.
#[derive(Debug, Clone)]
pub struct SerfDiscovery {
    events: broadcast::Sender<Event>,
    handle: serf_agent::member::Handle,
}

impl SerfDiscovery {
    /// Follows the member whose events are sent on `events` (and whose list `handle` reads).
    pub fn new(events: broadcast::Sender<Event>, handle: serf_agent::member::Handle) -> Self {
        Self { events, handle }
    }
}

impl Discovery for SerfDiscovery {
    fn changes(&self) -> Box<dyn Changes> {
        Box::new(SerfChanges {
            events: self.events.subscribe(),
            handle: self.handle.clone(),
            resync: true,
        })
    }

    fn source(&self) -> String {
        "serf events".to_owned()
    }
}

struct SerfChanges {
    events: broadcast::Receiver<Event>,
    handle: serf_agent::member::Handle,
    /// The next item is a snapshot (first, or after the events overflowed).
    resync: bool,
}

impl SerfChanges {
    async fn next_change(&mut self) -> Option<Change> {
        loop {
            if std::mem::take(&mut self.resync) {
                match self.handle.members().await {
                    Ok(members) => return Some(Change::Snapshot(members)),
                    Err(error) => warn!(%error, "reading the member list"),
                }
            }
            match self.events.recv().await {
                Ok(Event::MemberJoin(member) | Event::MemberUpdate(member)) => {
                    return Some(Change::Update(member))
                }
                Ok(Event::MemberLeave(member) | Event::MemberFailed(member)) => {
                    return Some(Change::Departed(member))
                }
                Ok(Event::MemberReap(member)) => return Some(Change::Reaped(member.name)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "fell behind the member's events, reading the member list"
                    );
                    self.resync = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Changes for SerfChanges {
    fn next(&mut self) -> BoxFuture<'_, Option<Change>> {
        Box::pin(self.next_change())
    }
}
