//! Lifeguard local health awareness (ml/awareness.go): a score that grows when our own probes
//! go unanswered and stretches our probe interval, so a slow member does not accuse others.

use std::time::Duration;

/// The local health score, `0..max`.
#[derive(Debug, Clone)]
pub(crate) struct Awareness {
    max: usize,
    score: usize,
}

impl Awareness {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            score: 0,
        }
    }

    /// Adds `delta`, clamped to `0..max`.
    pub(crate) fn apply_delta(&mut self, delta: i64) {
        let score = (self.score as i64 + delta).clamp(0, self.max as i64 - 1);
        self.score = score as usize;
    }

    pub(crate) fn score(&self) -> usize {
        self.score
    }

    /// `timeout * (score + 1)`.
    pub(crate) fn scale(&self, timeout: Duration) -> Duration {
        timeout * (self.score as u32 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_clamped_and_scales() {
        let mut awareness = Awareness::new(8);
        let second = Duration::from_secs(1);
        for (delta, score) in [(0, 0), (-1, 0), (1, 1), (2, 3), (10, 7), (-3, 4), (-10, 0)] {
            awareness.apply_delta(delta);
            assert_eq!(awareness.score(), score, "after {delta}");
            assert_eq!(awareness.scale(second), second * (score as u32 + 1));
        }
    }
}
