//! Discovery: the members a registry shows, as a first snapshot and then changes, from Serf
//! ([`crate::serf::SerfDiscovery`]: the member's events) or etcd ([`crate::etcd::EtcdDiscovery`]: the watch
//! of a prefix). The consumer's pools and the DNS zone are built over a [`Discovery`], so they
//! do not know which registry feeds them.

use serf::serf::Member;

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
