//! Vivaldi network coordinates, as Serf computes them (serf/coordinate/*.go).
//!
//! A [`Client`] keeps this node's [`Coordinate`] and updates it from round-trip times measured
//! by memberlist's probes against the coordinates other nodes put in their ack payloads. The
//! maths follows Go exactly (same constants, same order of updates, same truncation of
//! distances to whole nanoseconds), so `serf rtt` at a Go agent agrees with our estimates.
//! The only randomness (a random direction when two nodes sit on the same spot) comes from an
//! RNG the caller passes in.

mod client;

pub use client::{Client, UpdateError};

use std::time::Duration;

/// Below this magnitude a vector counts as zero (Go's `zeroThreshold`).
const ZERO_THRESHOLD: f64 = 1.0e-6;

/// Vivaldi tuning, [`Config::default`] = Go's `coordinate.DefaultConfig()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Number of Euclidean dimensions (8).
    pub dimensionality: usize,
    /// Largest error a coordinate may report (1.5).
    pub vivaldi_error_max: f64,
    /// Weight of a new error sample (0.25).
    pub vivaldi_ce: f64,
    /// Step size of the spring force (0.25).
    pub vivaldi_cc: f64,
    /// Samples kept for the adjustment term; 0 turns the adjustment off (20).
    pub adjustment_window_size: usize,
    /// Smallest height (10 µs, as seconds: 1e-5).
    pub height_min: f64,
    /// RTT samples per node in the median filter (3).
    pub latency_filter_size: usize,
    /// Strength of the pull back towards the origin, in seconds (150).
    pub gravity_rho: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dimensionality: 8,
            vivaldi_error_max: 1.5,
            vivaldi_ce: 0.25,
            vivaldi_cc: 0.25,
            adjustment_window_size: 20,
            height_min: 10.0e-6,
            latency_filter_size: 3,
            gravity_rho: 150.0,
        }
    }
}

/// A point in Vivaldi space plus height and adjustment; all in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Coordinate {
    /// Euclidean part.
    pub vec: Vec<f64>,
    /// Confidence: lower is better, at most `vivaldi_error_max`.
    pub error: f64,
    /// Mean error of the distance estimates, added to every distance.
    pub adjustment: f64,
    /// Distance from the node to the Euclidean core (its access link).
    pub height: f64,
}

impl Coordinate {
    /// A node's starting coordinate: the origin, maximal error, minimal height.
    pub fn new(config: &Config) -> Self {
        Self {
            vec: vec![0.0; config.dimensionality],
            error: config.vivaldi_error_max,
            adjustment: 0.0,
            height: config.height_min,
        }
    }

    /// True when no component is NaN or infinite.
    pub fn is_valid(&self) -> bool {
        self.vec.iter().all(|c| c.is_finite())
            && self.error.is_finite()
            && self.adjustment.is_finite()
            && self.height.is_finite()
    }

    /// True when both have the same dimensionality.
    pub fn is_compatible_with(&self, other: &Self) -> bool {
        self.vec.len() == other.vec.len()
    }

    /// Estimated round-trip time to `other`, truncated to whole nanoseconds like Go's
    /// `time.Duration(seconds * 1e9)`. Coordinates of different dimensionality give `None`.
    pub fn distance_to(&self, other: &Self) -> Option<Duration> {
        if !self.is_compatible_with(other) {
            return None;
        }
        let raw = self.raw_distance_to(other);
        let adjusted = raw + self.adjustment + other.adjustment;
        let seconds = if adjusted > 0.0 { adjusted } else { raw };
        Some(seconds_to_duration(seconds))
    }

    /// Distance without the adjustment terms.
    fn raw_distance_to(&self, other: &Self) -> f64 {
        magnitude(self.vec.iter().zip(&other.vec).map(|(a, b)| a - b)) + self.height + other.height
    }

    /// Moves this coordinate by `force` seconds along the line from `other` (away when
    /// positive); `direction` is the unit vector to use when the two coincide.
    fn apply_force(
        &mut self,
        config: &Config,
        force: f64,
        other: &Self,
        direction: impl FnOnce(usize) -> Vec<f64>,
    ) {
        let (unit, mag) = unit_vector_at(&self.vec, &other.vec, direction);
        for (component, u) in self.vec.iter_mut().zip(&unit) {
            *component += u * force;
        }
        if mag > ZERO_THRESHOLD {
            self.height =
                ((self.height + other.height) * force / mag + self.height).max(config.height_min);
        }
    }
}

/// Go's `time.Duration(float64)`: truncation towards zero, negative values clamp to zero here
/// (only reachable with a negative raw distance, which heights ≥ `height_min` rule out).
fn seconds_to_duration(seconds: f64) -> Duration {
    let nanos = seconds * 1.0e9;
    if nanos.is_nan() || nanos <= 0.0 {
        Duration::ZERO
    } else if nanos >= u64::MAX as f64 {
        Duration::from_nanos(u64::MAX)
    } else {
        Duration::from_nanos(nanos as u64)
    }
}

fn magnitude(components: impl Iterator<Item = f64>) -> f64 {
    components.map(|c| c * c).sum::<f64>().sqrt()
}

/// Unit vector from `b` towards `a` and the distance between them. When they coincide, a
/// direction from `direction` (Go: uniformly random components in [-0.5, 0.5)) is normalised
/// and the returned magnitude is 0.
fn unit_vector_at(
    a: &[f64],
    b: &[f64],
    direction: impl FnOnce(usize) -> Vec<f64>,
) -> (Vec<f64>, f64) {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mag = magnitude(diff.iter().copied());
    if mag > ZERO_THRESHOLD {
        return (diff.iter().map(|c| c / mag).collect(), mag);
    }
    let random = direction(a.len());
    let random_mag = magnitude(random.iter().copied());
    if random_mag > ZERO_THRESHOLD {
        return (random.iter().map(|c| c / random_mag).collect(), 0.0);
    }
    let mut unit = vec![0.0; a.len()];
    if let Some(first) = unit.first_mut() {
        *first = 1.0;
    }
    (unit, 0.0)
}

#[cfg(test)]
mod tests;
