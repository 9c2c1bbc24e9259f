//! Memberlist configuration; `Config::lan()` mirrors memberlist's `DefaultLANConfig`
//! (ml/config.go).

use std::time::Duration;

/// Tunables of the memberlist layer. Build one with [`Config::lan`], [`Config::wan`] or
/// [`Config::local`] and change fields as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Deadline for a whole TCP stream exchange (dial, write, read).
    pub tcp_timeout: Duration,
    /// Number of members asked to ping a target indirectly when a direct ping fails.
    pub indirect_checks: usize,
    /// Broadcasts are retransmitted `retransmit_mult * ceil(log10(n + 1))` times.
    pub retransmit_mult: usize,
    /// Suspicion timeout multiplier (Lifeguard's minimum timeout, scaled by log10(n)).
    pub suspicion_mult: usize,
    /// Maximum suspicion timeout as a multiple of the minimum one.
    pub suspicion_max_timeout_mult: usize,
    /// Interval of the anti-entropy push-pull with one random member (0 disables it).
    pub push_pull_interval: Duration,
    /// How long to wait for a direct ack before trying indirect probes.
    pub probe_timeout: Duration,
    /// Interval between probes (scaled by the awareness score).
    pub probe_interval: Duration,
    /// Do not try a TCP ping when UDP probes fail.
    pub disable_tcp_pings: bool,
    /// Upper bound of the local health multiplier (Lifeguard).
    pub awareness_max_multiplier: usize,
    /// Number of random members gossiped to every `gossip_interval`.
    pub gossip_nodes: usize,
    /// Interval between gossip rounds (0 disables gossip rounds; piggybacking still happens).
    pub gossip_interval: Duration,
    /// How long dead members still receive gossip (and stay in the table).
    pub gossip_to_the_dead_time: Duration,
    /// LZW-compress UDP packets when that makes them smaller, and every stream message.
    pub enable_compression: bool,
    /// Add a CRC to packets for members whose protocol max is at least 5 (as Go does for
    /// gossip and for probes of suspects).
    pub enable_crc: bool,
    /// Budget of one UDP packet for piggybacking.
    pub udp_buffer_size: usize,
    /// Bytes the driver adds to every packet after the core built it (encryption: 29), taken
    /// off the piggyback budget as Go does when `GossipVerifyOutgoing` is on. The driver sets
    /// this when it has a keyring; the core never encrypts.
    pub packet_overhead: usize,
    /// A dead member may re-appear with a new address after this long (`None` = never).
    pub dead_node_reclaim_time: Option<Duration>,
}

impl Config {
    /// memberlist's `DefaultLANConfig`.
    pub fn lan() -> Self {
        Self {
            tcp_timeout: Duration::from_secs(10),
            indirect_checks: 3,
            retransmit_mult: 4,
            suspicion_mult: 4,
            suspicion_max_timeout_mult: 6,
            push_pull_interval: Duration::from_secs(30),
            probe_timeout: Duration::from_millis(500),
            probe_interval: Duration::from_secs(1),
            disable_tcp_pings: false,
            awareness_max_multiplier: 8,
            gossip_nodes: 3,
            gossip_interval: Duration::from_millis(200),
            gossip_to_the_dead_time: Duration::from_secs(30),
            enable_compression: true,
            enable_crc: true,
            udp_buffer_size: 1400,
            packet_overhead: 0,
            dead_node_reclaim_time: None,
        }
    }

    /// memberlist's `DefaultWANConfig`.
    pub fn wan() -> Self {
        Self {
            tcp_timeout: Duration::from_secs(30),
            suspicion_mult: 6,
            push_pull_interval: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_secs(5),
            gossip_nodes: 4,
            gossip_interval: Duration::from_millis(500),
            gossip_to_the_dead_time: Duration::from_secs(60),
            ..Self::lan()
        }
    }

    /// memberlist's `DefaultLocalConfig`.
    pub fn local() -> Self {
        Self {
            tcp_timeout: Duration::from_secs(1),
            indirect_checks: 1,
            retransmit_mult: 2,
            suspicion_mult: 3,
            push_pull_interval: Duration::from_secs(15),
            probe_timeout: Duration::from_millis(200),
            probe_interval: Duration::from_secs(1),
            gossip_interval: Duration::from_millis(100),
            gossip_to_the_dead_time: Duration::from_secs(15),
            ..Self::lan()
        }
    }
}

impl Config {
    /// Checks the values the core cannot run with; the error names the field and its value.
    pub fn validate(&self) -> Result<(), super::Error> {
        let invalid = |field: &'static str, value: String, reason: &'static str| {
            Err(super::Error::InvalidConfig {
                field,
                value,
                reason,
            })
        };
        if self.probe_interval.is_zero() {
            return invalid(
                "probe_interval",
                format!("{:?}", self.probe_interval),
                "must be above 0",
            );
        }
        if self.probe_timeout.is_zero() {
            return invalid(
                "probe_timeout",
                format!("{:?}", self.probe_timeout),
                "must be above 0",
            );
        }
        if self.tcp_timeout.is_zero() {
            return invalid(
                "tcp_timeout",
                format!("{:?}", self.tcp_timeout),
                "must be above 0",
            );
        }
        for (field, value) in [
            ("retransmit_mult", self.retransmit_mult),
            ("suspicion_mult", self.suspicion_mult),
            (
                "suspicion_max_timeout_mult",
                self.suspicion_max_timeout_mult,
            ),
            ("awareness_max_multiplier", self.awareness_max_multiplier),
        ] {
            if value == 0 {
                return invalid(field, value.to_string(), "must be at least 1");
            }
        }
        if self.udp_buffer_size < 128 {
            return invalid(
                "udp_buffer_size",
                self.udp_buffer_size.to_string(),
                "must be at least 128 bytes",
            );
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::lan()
    }
}

/// `RetransmitMult * ceil(log10(n + 1))` (ml/util.go `retransmitLimit`).
pub fn retransmit_limit(retransmit_mult: usize, n_nodes: usize) -> usize {
    let scale = ((n_nodes + 1) as f64).log10().ceil() as usize;
    retransmit_mult * scale
}

/// Lifeguard's minimum suspicion timeout: `mult * max(1, log10(max(1, n))) * interval`
/// (ml/util.go `suspicionTimeout`; the scale is truncated to milli-units as Go does).
pub fn suspicion_timeout(suspicion_mult: usize, n_nodes: usize, interval: Duration) -> Duration {
    let node_scale = (n_nodes.max(1) as f64).log10().max(1.0);
    let scale_millis = (node_scale * 1000.0) as u32;
    interval * (suspicion_mult as u32) * scale_millis / 1000
}

/// The push-pull interval scaled for large clusters (ml/util.go `pushPullScale`).
pub fn push_pull_scale(interval: Duration, n_nodes: usize) -> Duration {
    const THRESHOLD: usize = 32;
    if n_nodes <= THRESHOLD {
        return interval;
    }
    let multiplier = ((n_nodes as f64).log2() - (THRESHOLD as f64).log2()).ceil() + 1.0;
    interval * multiplier as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_bad_values_are_named() {
        for config in [Config::lan(), Config::wan(), Config::local()] {
            assert_eq!(config.validate(), Ok(()));
        }
        let zero_interval = Config {
            probe_interval: Duration::ZERO,
            ..Config::lan()
        };
        assert_eq!(
            zero_interval
                .validate()
                .expect_err("zero interval")
                .to_string(),
            "invalid config probe_interval = 0ns: must be above 0"
        );
        let tiny_buffer = Config {
            udp_buffer_size: 10,
            ..Config::lan()
        };
        assert_eq!(
            tiny_buffer.validate().expect_err("tiny buffer").to_string(),
            "invalid config udp_buffer_size = 10: must be at least 128 bytes"
        );
    }

    #[test]
    fn retransmit_limit_matches_go() {
        for (n, expected) in [(0, 0), (1, 4), (2, 4), (9, 4), (10, 8), (99, 8), (100, 12)] {
            assert_eq!(retransmit_limit(4, n), expected, "n = {n}");
        }
    }

    #[test]
    fn suspicion_timeout_matches_go() {
        let second = Duration::from_secs(1);
        for (n, expected_ms) in [(1, 4000), (2, 4000), (10, 4000), (100, 8000), (1000, 12000)] {
            assert_eq!(
                suspicion_timeout(4, n, second),
                Duration::from_millis(expected_ms),
                "n = {n}"
            );
        }
        // log10(20) = 1.301 -> 1301 milli-units.
        assert_eq!(
            suspicion_timeout(4, 20, second),
            Duration::from_millis(5204)
        );
    }

    #[test]
    fn push_pull_scale_matches_go() {
        let interval = Duration::from_secs(30);
        for (n, mult) in [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (200, 4)] {
            assert_eq!(push_pull_scale(interval, n), interval * mult, "n = {n}");
        }
    }
}
