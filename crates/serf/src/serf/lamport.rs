//! Lamport clocks (serf/lamport.go).

use std::fmt;

/// A point in one of Serf's logical clocks (member, event, query).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LamportTime(pub u64);

impl fmt::Display for LamportTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A Lamport clock. Serf increments each of its three clocks once at start, so they start at 1.
#[derive(Debug, Clone, Default)]
pub struct LamportClock {
    counter: u64,
}

impl LamportClock {
    /// A clock at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current time.
    pub fn time(&self) -> LamportTime {
        LamportTime(self.counter)
    }

    /// Advances the clock by one and returns the new time.
    pub fn increment(&mut self) -> LamportTime {
        self.counter = self.counter.saturating_add(1);
        self.time()
    }

    /// Records that `seen` happened: afterwards the clock is past it.
    pub fn witness(&mut self, seen: LamportTime) {
        if seen.0 >= self.counter {
            self.counter = seen.0.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witness_moves_past_what_was_seen() {
        let check = |start: u64, seen: u64, expected: u64| {
            let mut clock = LamportClock { counter: start };
            clock.witness(LamportTime(seen));
            assert_eq!(
                clock.time(),
                LamportTime(expected),
                "start {start}, seen {seen}"
            );
        };
        check(0, 0, 1);
        check(5, 3, 5);
        check(5, 4, 5);
        check(5, 5, 6);
        check(5, 41, 42);
        check(7, u64::MAX, u64::MAX);
    }

    #[test]
    fn increment_returns_the_new_time() {
        let mut clock = LamportClock::new();
        assert_eq!(clock.time(), LamportTime(0));
        assert_eq!(clock.increment(), LamportTime(1));
        assert_eq!(clock.increment(), LamportTime(2));
        assert_eq!(clock.time(), LamportTime(2));
    }
}
