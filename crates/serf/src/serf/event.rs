//! User events: the event clock and the de-duplication ring (serf/serf.go `UserEvent`,
//! `handleUserEvent`).

use super::config::USER_EVENT_SIZE_HARD_LIMIT;
use super::lamport::{LamportClock, LamportTime};
use super::{Event, UserEvent};

/// One slot of the ring: the events seen at one Lamport time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventSlot {
    pub(crate) ltime: LamportTime,
    /// (name, payload) pairs, in arrival order.
    pub(crate) events: Vec<(String, Vec<u8>)>,
}

/// The most bytes (names and payloads) the whole ring holds. The ring travels in every
/// push-pull, so it must stay far below what a peer accepts in one (20 MiB); a new event that
/// would pass this is dropped, undelivered, until older slots are overwritten.
pub(crate) const MAX_RING_BYTES: usize = 1024 * 1024;

/// The most distinct events kept at one Lamport time (several members sending at once share a
/// time; hundreds only come from a peer forging them).
pub(crate) const MAX_SLOT_EVENTS: usize = 64;

/// The event clock, the minimum time accepted, and the last `size` Lamport times of events.
#[derive(Debug)]
pub(crate) struct UserEvents {
    pub(crate) clock: LamportClock,
    /// Events below this are old (set by "ignore old events" on join).
    pub(crate) min_time: LamportTime,
    ring: Vec<Option<EventSlot>>,
    /// Name and payload bytes held in `ring`.
    bytes: usize,
}

impl EventSlot {
    fn bytes(&self) -> usize {
        self.events
            .iter()
            .map(|(name, payload)| name.len() + payload.len())
            .sum()
    }
}

impl UserEvents {
    pub(crate) fn new(size: usize) -> Self {
        let mut clock = LamportClock::new();
        clock.increment();
        Self {
            clock,
            min_time: LamportTime(0),
            ring: vec![None; size.max(1)],
            bytes: 0,
        }
    }

    pub(crate) fn ring(&self) -> &[Option<EventSlot>] {
        &self.ring
    }

    /// Handles one event; returns true (deliver and re-gossip) when it is new. An event larger
    /// than Go lets anyone send, or one the ring has no room for, is dropped.
    pub(crate) fn handle(&mut self, event: UserEvent, events: &mut Vec<Event>) -> bool {
        let size = event.name.len() + event.payload.len();
        if size > USER_EVENT_SIZE_HARD_LIMIT {
            tracing::debug!(size, "dropping a user event over the size limit");
            return false;
        }
        self.clock.witness(event.ltime);
        if event.ltime < self.min_time {
            return false;
        }
        let size = self.ring.len() as u64;
        let now = self.clock.time().0;
        if now > size && event.ltime.0 < now - size {
            tracing::debug!(name = %event.name, ltime = %event.ltime, current = now, "dropping old user event");
            return false;
        }
        let slot = &mut self.ring[(event.ltime.0 % size) as usize];
        let event_bytes = event.name.len() + event.payload.len();
        match slot {
            Some(seen) if seen.ltime == event.ltime => {
                if seen
                    .events
                    .iter()
                    .any(|(name, payload)| *name == event.name && *payload == event.payload)
                {
                    return false;
                }
                if seen.events.len() >= MAX_SLOT_EVENTS || self.bytes + event_bytes > MAX_RING_BYTES
                {
                    tracing::debug!(name = %event.name, ltime = %event.ltime, "event ring full, dropping user event");
                    return false;
                }
                seen.events
                    .push((event.name.clone(), event.payload.clone()));
            }
            _ => {
                let replaced = slot.as_ref().map_or(0, EventSlot::bytes);
                if self.bytes - replaced + event_bytes > MAX_RING_BYTES {
                    tracing::debug!(name = %event.name, ltime = %event.ltime, "event ring full, dropping user event");
                    return false;
                }
                self.bytes -= replaced;
                *slot = Some(EventSlot {
                    ltime: event.ltime,
                    events: vec![(event.name.clone(), event.payload.clone())],
                });
            }
        }
        self.bytes += event_bytes;
        tracing::debug!(name = %event.name, ltime = %event.ltime, "user event");
        events.push(Event::UserEvent(event));
        true
    }

    /// Raises the minimum accepted time (never lowers it).
    pub(crate) fn ignore_before(&mut self, ltime: LamportTime) {
        if ltime > self.min_time {
            self.min_time = ltime;
        }
    }
}
