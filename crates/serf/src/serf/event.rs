//! User events: the event clock and the de-duplication ring (serf/serf.go `UserEvent`,
//! `handleUserEvent`).

use super::lamport::{LamportClock, LamportTime};
use super::{Event, UserEvent};

/// One slot of the ring: the events seen at one Lamport time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventSlot {
    pub(crate) ltime: LamportTime,
    /// (name, payload) pairs, in arrival order.
    pub(crate) events: Vec<(String, Vec<u8>)>,
}

/// The event clock, the minimum time accepted, and the last `size` Lamport times of events.
#[derive(Debug)]
pub(crate) struct UserEvents {
    pub(crate) clock: LamportClock,
    /// Events below this are old (set by "ignore old events" on join).
    pub(crate) min_time: LamportTime,
    ring: Vec<Option<EventSlot>>,
}

impl UserEvents {
    pub(crate) fn new(size: usize) -> Self {
        let mut clock = LamportClock::new();
        clock.increment();
        Self {
            clock,
            min_time: LamportTime(0),
            ring: vec![None; size.max(1)],
        }
    }

    pub(crate) fn ring(&self) -> &[Option<EventSlot>] {
        &self.ring
    }

    /// Handles one event; returns true (deliver and re-gossip) when it is new.
    pub(crate) fn handle(&mut self, event: UserEvent, events: &mut Vec<Event>) -> bool {
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
        match slot {
            Some(seen) if seen.ltime == event.ltime => {
                if seen
                    .events
                    .iter()
                    .any(|(name, payload)| *name == event.name && *payload == event.payload)
                {
                    return false;
                }
                seen.events
                    .push((event.name.clone(), event.payload.clone()));
            }
            _ => {
                *slot = Some(EventSlot {
                    ltime: event.ltime,
                    events: vec![(event.name.clone(), event.payload.clone())],
                });
            }
        }
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
