//! A log-line rate limit for hot paths.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lets one log line through per interval and counts the ones held back, so a storm of failing
/// connections logs a line a second instead of a line per connection.
#[derive(Debug)]
pub(crate) struct RateLimit {
    start: Instant,
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub(crate) fn per_second() -> Self {
        Self {
            start: Instant::now(),
            interval_ms: 1000,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number held back since the last line)` when a line may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_through_and_counts_the_rest() {
        let limit = RateLimit::per_second();
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // The next window reports what was held back.
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(5));
    }
}
