//! The task that keeps one registration in etcd while the backend is healthy.
//!
//! [`Plan`] is the decision logic as a plain value (what to do next, given the lease, what we
//! know of the key, health and the time); [`Registrar::run`] is the thin tokio driver that
//! carries the actions out, retries with backoff and stops on cancellation.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use super::client::{Client, LeaseId};
use super::registration::Registration;
use super::Error;
use crate::backoff::Backoff;

/// Keeps `key` = a [`Registration`] in etcd, attached to a lease kept alive every ttl/3, while
/// the health input says the backend is healthy.
///
/// - healthy: the key is put under the lease; unhealthy: the key is deleted (the lease is kept
///   alive, so the key comes back at once);
/// - etcd unreachable (at start or later): retries with capped backoff and logs once per
///   doubling; when etcd is back, the lease is refreshed, or, if it expired meanwhile or etcd
///   lost its data, a new lease is granted and the key put again;
/// - cancelled: revokes the lease, so the key disappears at once rather than after the TTL.
#[derive(Debug)]
pub struct Registrar {
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
}

impl Registrar {
    /// A registrar for `key` (see [`super::Prefix::key`]) with a lease of `ttl` (whole seconds;
    /// etcd raises TTLs below its minimum, about 2 s).
    pub fn new(client: Client, key: String, registration: &Registration, ttl: Duration) -> Self {
        Self {
            client,
            key,
            value: registration.to_json(),
            ttl,
        }
    }

    /// Runs until `shutdown` is cancelled, then revokes the lease and returns.
    ///
    /// `health` carries the backend's health (`true`: healthy); if its sender is dropped the
    /// last value stays in force.
    #[instrument(name = "etcd_registrar", skip_all, fields(key = %self.key))]
    pub async fn run(self, mut health: watch::Receiver<bool>, shutdown: CancellationToken) {
        let retry_cap = (self.ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut backoff = Backoff::new(Duration::from_millis(100), retry_cap);
        let mut plan = Plan::new(self.ttl);
        let mut health_open = true;
        loop {
            let healthy = *health.borrow_and_update();
            let wake_at = match plan.next_action(healthy, Instant::now()) {
                Action::Wait(deadline) => deadline,
                action => {
                    let outcome = tokio::select! {
                        () = shutdown.cancelled() => break,
                        outcome = self.perform(action) => outcome,
                    };
                    match outcome {
                        Ok(outcome) => {
                            if backoff.failures() > 0 {
                                info!(failures = backoff.failures(), "etcd reachable again");
                            }
                            backoff.reset();
                            self.log(&outcome, healthy);
                            plan.handle(outcome, Instant::now());
                            continue;
                        }
                        Err(error) if error.is_lease_not_found() => {
                            warn!(%error, "lease gone; granting a new one");
                            plan.handle(Outcome::LeaseLost, Instant::now());
                            continue;
                        }
                        Err(error) => {
                            let delay = backoff.next_delay();
                            if backoff.should_log() {
                                warn!(
                                    %error,
                                    failures = backoff.failures(),
                                    retry_in = ?delay,
                                    "etcd unreachable, retrying"
                                );
                            } else {
                                debug!(%error, retry_in = ?delay, "etcd still unreachable");
                            }
                            Some(Instant::now() + delay)
                        }
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = health.changed(), if health_open => {
                    if changed.is_err() {
                        health_open = false;
                    }
                }
                () = sleep_until(wake_at) => {}
            }
        }
        self.revoke(plan.lease).await;
    }

    async fn perform(&self, action: Action) -> Result<Outcome, Error> {
        Ok(match action {
            Action::Grant => {
                let (lease, granted) = self.client.lease_grant(self.ttl).await?;
                Outcome::Granted(lease, granted)
            }
            Action::KeepAlive(lease) => match self.client.lease_keep_alive(lease).await? {
                Some(_) => Outcome::KeptAlive,
                None => Outcome::LeaseLost,
            },
            Action::Put(lease) => {
                self.client.put(&self.key, &self.value, Some(lease)).await?;
                Outcome::Put
            }
            Action::Delete => {
                self.client.delete(&self.key).await?;
                Outcome::Deleted
            }
            Action::Wait(_) => unreachable!("the driver waits itself"),
        })
    }

    fn log(&self, outcome: &Outcome, healthy: bool) {
        match outcome {
            Outcome::Granted(lease, ttl) => {
                debug!(lease = %format!("{:x}", lease.0), ?ttl, "lease granted")
            }
            Outcome::KeptAlive => debug!("lease kept alive"),
            Outcome::LeaseLost => warn!("lease expired in etcd; registering again"),
            Outcome::Put => info!(healthy, "registered in etcd"),
            Outcome::Deleted => info!(healthy, "deregistered from etcd"),
        }
    }

    async fn revoke(&self, lease: Option<LeaseId>) {
        let Some(lease) = lease else {
            return;
        };
        match self.client.lease_revoke(lease).await {
            Ok(()) => info!("lease revoked; deregistered from etcd"),
            Err(error) => {
                warn!(%error, ttl = ?self.ttl, "revoking the lease failed; the key expires after the ttl")
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What the registrar should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Grant,
    KeepAlive(LeaseId),
    Put(LeaseId),
    Delete,
    /// Nothing until this time (a keep-alive), a health change or shutdown.
    Wait(Option<Instant>),
}

/// The result of a successful [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Granted(LeaseId, Duration),
    KeptAlive,
    /// etcd does not know the lease (any more): its key is gone too.
    LeaseLost,
    Put,
    Deleted,
}

/// What we know about our key in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// At start: an earlier run with the same key may have left it behind.
    Unknown,
    Present,
    Absent,
}

/// The registrar's decisions, free of I/O and of the clock (`now` comes in).
#[derive(Debug)]
struct Plan {
    ttl: Duration,
    /// The keep-alive interval: a third of the TTL.
    refresh: Duration,
    lease: Option<LeaseId>,
    key: Key,
    keep_alive_at: Option<Instant>,
}

impl Plan {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            refresh: ttl / 3,
            lease: None,
            key: Key::Unknown,
            keep_alive_at: None,
        }
    }

    fn next_action(&self, healthy: bool, now: Instant) -> Action {
        match self.lease {
            None if healthy => return Action::Grant,
            Some(lease) if self.keep_alive_at.is_some_and(|at| at <= now) => {
                return Action::KeepAlive(lease)
            }
            _ => {}
        }
        match (healthy, self.key, self.lease) {
            (true, Key::Unknown | Key::Absent, Some(lease)) => Action::Put(lease),
            (false, Key::Unknown | Key::Present, _) => Action::Delete,
            _ => Action::Wait(self.keep_alive_at),
        }
    }

    fn handle(&mut self, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Granted(lease, granted) => {
                self.lease = Some(lease);
                // etcd raises a TTL below its minimum and we ask for whole seconds: refresh at a
                // third of the shorter of the two.
                let ttl = if granted.is_zero() {
                    self.ttl
                } else {
                    granted.min(self.ttl)
                };
                self.refresh = (ttl / 3).max(Duration::from_millis(100));
                self.keep_alive_at = Some(now + self.refresh);
            }
            Outcome::KeptAlive => self.keep_alive_at = Some(now + self.refresh),
            Outcome::LeaseLost => {
                self.lease = None;
                self.keep_alive_at = None;
                if self.key == Key::Present {
                    self.key = Key::Absent;
                }
            }
            Outcome::Put => self.key = Key::Present,
            Outcome::Deleted => self.key = Key::Absent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);
    const LEASE: LeaseId = LeaseId(7);

    /// Feeds `steps` of (health, outcome of the expected action) and checks each action.
    fn check(steps: &[(bool, Action, Option<Outcome>)]) {
        let start = Instant::now();
        let mut plan = Plan::new(TTL);
        for (index, (healthy, expected, outcome)) in steps.iter().enumerate() {
            let now = start + Duration::from_millis(100) * index as u32;
            let action = plan.next_action(*healthy, now);
            match (expected, action) {
                (Action::Wait(_), Action::Wait(_)) => {}
                _ => assert_eq!(action, *expected, "step {index}"),
            }
            if let Some(outcome) = outcome {
                plan.handle(*outcome, now);
            }
        }
    }

    #[test]
    fn healthy_start_grants_then_puts_then_waits() {
        check(&[
            (true, Action::Grant, Some(Outcome::Granted(LEASE, TTL))),
            (true, Action::Put(LEASE), Some(Outcome::Put)),
            (true, Action::Wait(None), None),
        ]);
    }

    #[test]
    fn unhealthy_start_deletes_a_leftover_key_without_a_lease() {
        check(&[
            (false, Action::Delete, Some(Outcome::Deleted)),
            (false, Action::Wait(None), None),
            (true, Action::Grant, Some(Outcome::Granted(LEASE, TTL))),
            (true, Action::Put(LEASE), Some(Outcome::Put)),
            (false, Action::Delete, Some(Outcome::Deleted)),
            (true, Action::Put(LEASE), Some(Outcome::Put)),
        ]);
    }

    #[test]
    fn keeps_alive_every_third_of_the_ttl_and_reregisters_when_the_lease_is_lost() {
        let start = Instant::now();
        let mut plan = Plan::new(TTL);
        plan.handle(Outcome::Granted(LEASE, TTL), start);
        plan.handle(Outcome::Put, start);
        assert_eq!(
            plan.next_action(true, start),
            Action::Wait(Some(start + Duration::from_secs(1)))
        );
        let due = start + Duration::from_secs(1);
        assert_eq!(plan.next_action(true, due), Action::KeepAlive(LEASE));
        plan.handle(Outcome::KeptAlive, due);
        assert_eq!(
            plan.next_action(true, due),
            Action::Wait(Some(due + Duration::from_secs(1)))
        );
        let later = due + Duration::from_secs(5);
        assert_eq!(plan.next_action(true, later), Action::KeepAlive(LEASE));
        plan.handle(Outcome::LeaseLost, later);
        assert_eq!(plan.next_action(true, later), Action::Grant);
        plan.handle(Outcome::Granted(LeaseId(8), TTL), later);
        assert_eq!(plan.next_action(true, later), Action::Put(LeaseId(8)));
    }

    #[test]
    fn a_truncated_ttl_shortens_the_refresh() {
        let start = Instant::now();
        let mut plan = Plan::new(Duration::from_millis(4500));
        plan.handle(Outcome::Granted(LEASE, Duration::from_secs(3)), start);
        assert_eq!(plan.keep_alive_at, Some(start + Duration::from_secs(1)));
        let mut plan = Plan::new(Duration::from_secs(3));
        plan.handle(Outcome::Granted(LEASE, Duration::from_secs(6)), start);
        assert_eq!(plan.keep_alive_at, Some(start + Duration::from_secs(1)));
    }
}
