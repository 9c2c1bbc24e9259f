//! Capped exponential backoff for reconnecting to a registry.

use std::time::Duration;

/// Delays that double from `initial` up to `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    /// Failures since the last reset, so callers can log on 1, 2, 4, 8, … only.
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Self {
            initial,
            max,
            next: initial,
            failures: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the following one, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Whether the failure just counted should be logged: the 1st, 2nd, 4th, 8th, …, so a long
    /// outage logs once per doubling rather than once per attempt.
    pub(crate) fn should_log(&self) -> bool {
        self.failures.is_power_of_two()
    }

    /// Failures since the last reset.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(100));
        assert!(backoff.should_log());
    }

    #[test]
    fn logs_once_per_doubling() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        let logged: Vec<u32> = (1..=20)
            .filter(|_| {
                backoff.next_delay();
                backoff.should_log()
            })
            .collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
