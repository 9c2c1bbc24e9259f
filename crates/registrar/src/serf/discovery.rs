//! Discovery from a Serf member: its member list, then its membership events.

use serf::serf::Event;
use tokio::sync::broadcast;
use tracing::warn;

use crate::discovery::{BoxFuture, Change, Changes, Discovery};

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
