//! The sizes and durations of the cluster metrics, and the push-pull period they follow.

use std::time::Duration;

use serf::memberlist::{push_pull_scale, Config};

/// Sizes and durations of the cluster metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClusterPlan {
    pub(crate) reps: usize,
    /// Metric 8: how long the idle member is watched.
    pub(crate) idle_window: Duration,
    /// Metric 9: amb-serf agents beside the real agents.
    pub(crate) gossip_amb: usize,
    /// Metric 9: real `serf agent`s.
    pub(crate) gossip_serf: usize,
    /// Metric 9: how long the cluster runs after convergence before traffic is counted
    /// ([`gossip_settle`] in the full run).
    pub(crate) gossip_settle: Duration,
    /// Metric 9: how long traffic is counted (a whole number of [`push_pull_period`]s in the
    /// full run).
    pub(crate) gossip_window: Duration,
    /// Metric 9: simulated cluster sizes.
    pub(crate) sim_sizes: &'static [usize],
}

/// memberlist's push-pull period in a cluster of `n_members`: the LAN default (30 s) scaled as
/// Go's `pushPullScale` does (60 s from 33 to 64 members). Every member opens one push-pull
/// (a TCP exchange of the full member list, both ways) per period.
pub(crate) fn push_pull_period(n_members: usize) -> Duration {
    push_pull_scale(Config::lan().push_pull_interval, n_members)
}

/// How long after convergence the gossip window starts: one unscaled push-pull interval and
/// 5 s to spare. Every member's first push-pull timer fires at a random stagger below that
/// interval after it starts, and only from then on does it push-pull once per period. Both Go's
/// member and amb-serf's push-pull one period after their stagger (amb-serf pushed at the
/// stagger until issue 20), so a window that starts earlier counts start-up push-pulls. After
/// the settle, a window of k periods holds exactly k push-pulls per member whatever their
/// phases.
pub(crate) fn gossip_settle() -> Duration {
    Config::lan().push_pull_interval + Duration::from_secs(5)
}
