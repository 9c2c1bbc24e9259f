//! The Vivaldi update rule (serf/coordinate/client.go).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rand::Rng;

use super::{Config, Coordinate, ZERO_THRESHOLD};

/// Longest round trip accepted as a sample (Go's `maxRTT`).
const MAX_RTT: Duration = Duration::from_secs(10);

/// Why [`Client::update`] refused a sample. The client's state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpdateError {
    /// The other coordinate has a different number of dimensions.
    #[error("coordinate from {node} has {got} dimensions, expected {expected}")]
    Dimensions {
        /// The node the coordinate came from.
        node: String,
        /// Its dimensionality.
        got: usize,
        /// Ours.
        expected: usize,
    },
    /// The other coordinate has a NaN or infinite component.
    #[error("coordinate from {node} is invalid (NaN or infinite component): {coordinate:?}")]
    Invalid {
        /// The node the coordinate came from.
        node: String,
        /// The coordinate as received.
        coordinate: Coordinate,
    },
    /// The round trip is longer than 10 s.
    #[error("round trip time {rtt:?} to {node} is not below 10s")]
    Rtt {
        /// The node measured.
        node: String,
        /// The measured round trip.
        rtt: Duration,
    },
}

/// This node's Vivaldi state: its coordinate, the per-node latency filters and the adjustment
/// window.
#[derive(Debug, Clone)]
pub struct Client {
    coordinate: Coordinate,
    origin: Coordinate,
    config: Config,
    adjustment_index: usize,
    adjustment_samples: Vec<f64>,
    latency_samples: HashMap<String, VecDeque<f64>>,
    resets: u64,
}

impl Client {
    /// A client at the origin. A zero dimensionality is raised to 1 (Go refuses it).
    pub fn new(mut config: Config) -> Self {
        config.dimensionality = config.dimensionality.max(1);
        Self {
            coordinate: Coordinate::new(&config),
            origin: Coordinate::new(&config),
            adjustment_index: 0,
            adjustment_samples: vec![0.0; config.adjustment_window_size],
            latency_samples: HashMap::new(),
            resets: 0,
            config,
        }
    }

    /// This node's current coordinate.
    pub fn coordinate(&self) -> &Coordinate {
        &self.coordinate
    }

    /// Replaces our coordinate (e.g. restored from disk); refused if incompatible or invalid.
    pub fn set_coordinate(&mut self, coordinate: Coordinate) -> Result<(), UpdateError> {
        if !self.coordinate.is_compatible_with(&coordinate) {
            return Err(UpdateError::Dimensions {
                node: "local".to_owned(),
                got: coordinate.vec.len(),
                expected: self.coordinate.vec.len(),
            });
        }
        if !coordinate.is_valid() {
            return Err(UpdateError::Invalid {
                node: "local".to_owned(),
                coordinate,
            });
        }
        self.coordinate = coordinate;
        Ok(())
    }

    /// How many times an update produced an invalid coordinate and the client started over.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Drops the latency samples of a node that left the cluster.
    pub fn forget_node(&mut self, node: &str) {
        self.latency_samples.remove(node);
    }

    /// Estimated round trip from us to `other` (`None` if dimensions differ).
    pub fn distance_to(&self, other: &Coordinate) -> Option<Duration> {
        self.coordinate.distance_to(other)
    }

    /// Feeds one measured round trip to `node`, whose coordinate is `other`, and returns our
    /// new coordinate.
    pub fn update<R: Rng + ?Sized>(
        &mut self,
        node: &str,
        other: &Coordinate,
        rtt: Duration,
        rng: &mut R,
    ) -> Result<&Coordinate, UpdateError> {
        if !self.coordinate.is_compatible_with(other) {
            return Err(UpdateError::Dimensions {
                node: node.to_owned(),
                got: other.vec.len(),
                expected: self.coordinate.vec.len(),
            });
        }
        if !other.is_valid() {
            return Err(UpdateError::Invalid {
                node: node.to_owned(),
                coordinate: other.clone(),
            });
        }
        if rtt > MAX_RTT {
            return Err(UpdateError::Rtt {
                node: node.to_owned(),
                rtt,
            });
        }
        let rtt_seconds = self.latency_filter(node, rtt.as_secs_f64());
        self.update_vivaldi(other, rtt_seconds, rng);
        self.update_adjustment(other, rtt_seconds);
        self.update_gravity(rng);
        if !self.coordinate.is_valid() {
            self.resets += 1;
            self.coordinate = Coordinate::new(&self.config);
        }
        Ok(&self.coordinate)
    }

    /// Median of the last `latency_filter_size` samples for `node`, including this one.
    pub(super) fn latency_filter(&mut self, node: &str, rtt_seconds: f64) -> f64 {
        let samples = self.latency_samples.entry(node.to_owned()).or_default();
        samples.push_back(rtt_seconds);
        if samples.len() > self.config.latency_filter_size {
            samples.pop_front();
        }
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn update_vivaldi<R: Rng + ?Sized>(
        &mut self,
        other: &Coordinate,
        rtt_seconds: f64,
        rng: &mut R,
    ) {
        let dist = self
            .coordinate
            .distance_to(other)
            .expect("dimensions were checked by update")
            .as_secs_f64();
        let rtt_seconds = rtt_seconds.max(ZERO_THRESHOLD);
        let wrongness = (dist - rtt_seconds).abs() / rtt_seconds;
        let total_error = (self.coordinate.error + other.error).max(ZERO_THRESHOLD);
        let weight = self.coordinate.error / total_error;
        let ce = self.config.vivaldi_ce;
        self.coordinate.error = (ce * weight * wrongness
            + self.coordinate.error * (1.0 - ce * weight))
            .min(self.config.vivaldi_error_max);
        let force = self.config.vivaldi_cc * weight * (rtt_seconds - dist);
        self.coordinate
            .apply_force(&self.config, force, other, |n| random_direction(n, rng));
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt_seconds: f64) {
        let window = self.config.adjustment_window_size;
        if window == 0 {
            return;
        }
        let dist = self.coordinate.raw_distance_to(other);
        self.adjustment_samples[self.adjustment_index] = rtt_seconds - dist;
        self.adjustment_index = (self.adjustment_index + 1) % window;
        let sum: f64 = self.adjustment_samples.iter().sum();
        self.coordinate.adjustment = sum / (2.0 * window as f64);
    }

    pub(super) fn update_gravity<R: Rng + ?Sized>(&mut self, rng: &mut R) {
        let dist = self
            .origin
            .distance_to(&self.coordinate)
            .expect("origin has our dimensionality")
            .as_secs_f64();
        let force = -(dist / self.config.gravity_rho).powi(2);
        let origin = self.origin.clone();
        self.coordinate
            .apply_force(&self.config, force, &origin, |n| random_direction(n, rng));
    }
}

fn random_direction<R: Rng + ?Sized>(n: usize, rng: &mut R) -> Vec<f64> {
    (0..n).map(|_| rng.random::<f64>() - 0.5).collect()
}
