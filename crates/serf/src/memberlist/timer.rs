//! The core's timers: one min-heap of deadlines. Entries are never removed early; a timer
//! that no longer applies is ignored when it fires (each handler re-checks its state).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::StreamId;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Start the next probe.
    Probe,
    /// Gossip to a few random members.
    Gossip,
    /// The random stagger before the first push-pull period has passed (Go waits it, then a
    /// whole period, before the first push-pull).
    PushPullStagger,
    /// Anti-entropy push-pull with a random member.
    PushPull,
    /// No direct ack within the probe timeout: go indirect.
    ProbeTimeout { seq_no: u32 },
    /// End of the (scaled) probe interval: decide.
    ProbeDeadline { seq_no: u32 },
    /// An ack handler for an indirect ping we relay expires (maybe sending a nack).
    RelayExpired { seq_no: u32 },
    /// A suspicion timer may have run out.
    Suspicion { node: String },
    /// A stream's whole exchange must be over.
    Stream { stream: StreamId },
    /// Try decoding a large stream whose reads paused.
    StreamDecode { stream: StreamId },
    /// Stop waiting for our leave broadcast.
    Leave,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    next_id: u64,
}

impl Timers {
    pub(crate) fn set(&mut self, at: Instant, timer: Timer) {
        self.next_id += 1;
        self.heap.push(Reverse((at, self.next_id, timer)));
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Pops the earliest timer due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.next_deadline()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, timer))| timer)
    }
}
