//! The join loop of a Serf member: join every seed it can reach; while none answers, retry
//! with capped exponential backoff (250 ms doubling to 1 s: a seed that comes up is joined
//! within about a second, however long it was away), forever, logging the 1st, 2nd, 4th, 8th…
//! failure. Later, whenever every peer is lost (all others failed or left, e.g. serf_1
//! restarted with an empty member list), it joins the seeds again by itself.

use std::net::SocketAddr;
use std::time::Duration;

use serf::serf::{Event, MemberStatus};
use serf_agent::member::Handle;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;

/// Serf's gossip port: the port of a seed given without one.
pub const SERF_PORT: u16 = 7946;
/// First and longest pause between join attempts. One attempt is a TCP dial per seed, so a
/// short cap is cheap, and it bounds how late we join a seed that has just come up.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the join loop works with.
pub(super) struct JoinLoop {
    pub(super) handle: Handle,
    /// Our node name (not a peer).
    pub(super) name: String,
    pub(super) seeds: Vec<String>,
    pub(super) ignore_old: bool,
    /// The member's events, to notice every peer is gone.
    pub(super) events: broadcast::Receiver<Event>,
    /// Set to `true` once the first join completed.
    pub(super) joined: watch::Sender<bool>,
}

impl JoinLoop {
    /// Joins, then rejoins whenever every peer is lost, until `token` is cancelled or the
    /// member left.
    pub(super) async fn run(mut self, token: CancellationToken) {
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = self.join_until_done() => {}
            }
            let _ = self.joined.send(true);
            // Wait until every peer is lost, then join again.
            loop {
                let event = tokio::select! {
                    () = token.cancelled() => return,
                    event = self.events.recv() => event,
                };
                let lost = match event {
                    Ok(Event::MemberFailed(_) | Event::MemberLeave(_) | Event::MemberReap(_)) => {
                        true
                    }
                    Ok(Event::LeaveCompleted) => return,
                    Ok(_) => false,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if lost && !self.has_alive_peers().await {
                    warn!("every peer is gone; joining the seeds again");
                    break;
                }
            }
        }
    }

    async fn has_alive_peers(&self) -> bool {
        match self.handle.members().await {
            Ok(members) => members
                .iter()
                .any(|m| m.name != self.name && m.status == MemberStatus::Alive),
            // A stopped member has nothing to rejoin with.
            Err(_) => true,
        }
    }

    /// Tries the seeds until one answers, backing off between rounds.
    async fn join_until_done(&self) {
        let seeds = &self.seeds;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            match self.join_once().await {
                Ok(contacted) => {
                    info!(contacted, seeds = ?seeds, "joined the cluster");
                    return;
                }
                Err(error) => {
                    let retry_in = backoff.next_delay();
                    if backoff.should_log() {
                        warn!(seeds = ?seeds, failures = backoff.failures(), ?retry_in, %error, "no seed reachable");
                    }
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    async fn join_once(&self) -> Result<usize, String> {
        let mut addrs = Vec::new();
        for seed in &self.seeds {
            match tokio::net::lookup_host(with_port(seed)).await {
                Ok(found) => addrs.extend(found.filter(SocketAddr::is_ipv4).take(1)),
                Err(error) => tracing::debug!(%seed, %error, "seed does not resolve"),
            }
        }
        if addrs.is_empty() {
            return Err("no seed resolves".to_owned());
        }
        self.handle
            .join(&addrs, self.ignore_old)
            .await
            .map_err(|error| crate::advertise::chain(&error))
    }
}

/// `seed` with Serf's port when it has none.
fn with_port(seed: &str) -> String {
    if seed
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        seed.to_owned()
    } else {
        format!("{seed}:{SERF_PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_without_port_is_on_7946() {
        assert_eq!(with_port("serf_1"), "serf_1:7946");
        assert_eq!(with_port("10.0.0.1:1"), "10.0.0.1:1");
    }
}
