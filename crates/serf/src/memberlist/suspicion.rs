//! Lifeguard suspicion timers (ml/suspicion.go): a suspect is declared dead after a timeout
//! that starts at `max` and shrinks towards `min` with each independent confirmation.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// One suspected member's timer.
#[derive(Debug, Clone)]
pub(crate) struct Suspicion {
    /// Confirmations seen so far (not counting the first accuser).
    confirmations: u32,
    /// Confirmations expected before the timeout reaches `min`.
    expected: u32,
    min: Duration,
    max: Duration,
    start: Instant,
    /// Who has accused the member, including the first one.
    accusers: BTreeSet<String>,
    deadline: Instant,
}

impl Suspicion {
    /// Starts a timer accused by `from`; with `expected < 1` it runs for `min`, else `max`.
    pub(crate) fn new(
        from: &str,
        expected: u32,
        min: Duration,
        max: Duration,
        now: Instant,
    ) -> Self {
        let timeout = if expected < 1 { min } else { max };
        Self {
            confirmations: 0,
            expected,
            min,
            max,
            start: now,
            accusers: BTreeSet::from([from.to_owned()]),
            deadline: now + timeout,
        }
    }

    /// When the member is declared dead unless refuted.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(crate) fn confirmations(&self) -> u32 {
        self.confirmations
    }

    /// Records an accusation by `from`; returns true if it was new and counted (then the
    /// suspicion should be re-gossiped) and moves the deadline earlier.
    pub(crate) fn confirm(&mut self, from: &str) -> bool {
        if self.confirmations >= self.expected || self.accusers.contains(from) {
            return false;
        }
        self.accusers.insert(from.to_owned());
        self.confirmations += 1;
        let total = remaining_timeout(self.confirmations, self.expected, self.min, self.max);
        self.deadline = self.start + total;
        true
    }
}

/// The total suspicion timeout after `n` of `k` confirmations (ml/suspicion.go
/// `remainingSuspicionTime`, before subtracting the elapsed time): `max - log(n+1)/log(k+1) *
/// (max - min)`, floored to whole milliseconds and never below `min`.
pub(crate) fn remaining_timeout(n: u32, k: u32, min: Duration, max: Duration) -> Duration {
    let fraction = (f64::from(n) + 1.0).ln() / (f64::from(k) + 1.0).ln();
    let raw = max.as_secs_f64() - fraction * (max.as_secs_f64() - min.as_secs_f64());
    let millis = (1000.0 * raw).floor();
    let timeout = if millis > 0.0 {
        Duration::from_millis(millis as u64)
    } else {
        Duration::ZERO
    };
    timeout.max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: u32, k: u32, expected_ms: u64) {
        let min = Duration::from_secs(2);
        let max = Duration::from_secs(30);
        assert_eq!(
            remaining_timeout(n, k, min, max),
            Duration::from_millis(expected_ms),
            "n = {n}, k = {k}"
        );
    }

    #[test]
    fn remaining_timeout_matches_go_table() {
        // ml/suspicion_test.go TestSuspicion_remainingSuspicionTime, with its elapsed time
        // added back (Go's 14 s after 2 s elapsed is 16 s in total).
        check(0, 3, 30_000);
        check(1, 3, 16_000);
        check(2, 3, 7_810);
        check(3, 3, 2_000);
        check(4, 3, 2_000);
        check(5, 3, 2_000);
    }

    #[test]
    fn confirmations_shrink_the_deadline() {
        let now = Instant::now();
        let min = Duration::from_secs(2);
        let max = Duration::from_secs(30);
        let mut suspicion = Suspicion::new("a", 3, min, max, now);
        assert_eq!(suspicion.deadline(), now + max);
        assert!(
            !suspicion.confirm("a"),
            "the first accuser is not a confirmation"
        );
        assert!(suspicion.confirm("b"));
        assert_eq!(suspicion.deadline(), now + Duration::from_secs(16));
        assert!(!suspicion.confirm("b"), "duplicates do not count");
        assert!(suspicion.confirm("c"));
        assert!(suspicion.confirm("d"));
        assert_eq!(suspicion.deadline(), now + min);
        assert!(!suspicion.confirm("e"), "no more than k confirmations");
        assert_eq!(suspicion.confirmations(), 3);
    }

    #[test]
    fn without_expected_confirmations_the_timeout_is_min() {
        let now = Instant::now();
        let min = Duration::from_secs(4);
        let suspicion = Suspicion::new("a", 0, min, min * 6, now);
        assert_eq!(suspicion.deadline(), now + min);
    }
}
