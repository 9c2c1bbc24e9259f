//! Where a TCP forwarder sends each connection: one fixed target, or a [`Pool`] whose members
//! change while the forwarder runs (the consumer side, `amb-serf connect`).
//!
//! The forwarder asks the pool for a [`Candidate`] per connection attempt and tells it the
//! outcome: a candidate that could not be connected is reported [`Outcome::Failed`] (the pool
//! backs it off) and the next one is tried within the same client connection, up to
//! [`Policy::connect_retries`]; a connection that was made is reported [`Outcome::Finished`]
//! when it ends (the pool counts outstanding connections). With no candidate, the client waits
//! up to [`Policy::wait_for_target`] for the pool to change.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::dial::{connect, UpstreamError};
use crate::link_env::Target;

/// How often a waiting client looks again when the pool has not changed: a target backed off
/// after a refusal becomes usable again by time alone, with no change to announce.
const RECHECK: Duration = Duration::from_millis(250);

/// A target a [`Pool`] offers for one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The pool's name for it (a Serf node name): what the pool is told about.
    pub id: String,
    /// Where to connect.
    pub target: Target,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, self.target)
    }
}

/// What became of a [`Candidate`] the pool offered. Every pick gets exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connection could not be made (refused, timed out, unresolvable).
    Failed,
    /// A connection was made and has ended (or was never used).
    Finished,
}

/// A set of targets that changes while the forwarder runs. Implementations lock internally;
/// every method is quick and never blocks on I/O.
pub trait Pool: fmt::Debug + fmt::Display + Send + Sync + 'static {
    /// A target for one connection attempt, not one of `tried`, or `None` when no target is
    /// usable now. The pick counts as outstanding until [`Pool::report`].
    fn pick(&self, tried: &[Candidate]) -> Option<Candidate>;

    /// The outcome of an attempt to `candidate` (exactly once per pick).
    fn report(&self, candidate: &Candidate, outcome: Outcome);

    /// Whether `candidate` is still in the set (for [`Policy::drain_on_removal`]).
    fn contains(&self, candidate: &Candidate) -> bool;

    /// A receiver marked changed whenever the set changes.
    fn subscribe(&self) -> watch::Receiver<()>;

    /// The label naming the pool on its listeners' metrics, as (name, value): by default
    /// `("target", <the pool displayed>)`.
    fn label(&self) -> (&'static str, String) {
        ("target", self.to_string())
    }
}

/// How a forwarder uses a [`Pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Further targets tried within one client connection after the first attempt fails.
    pub connect_retries: usize,
    /// How long a client waits for a usable target before it is closed.
    pub wait_for_target: Duration,
    /// Close a connection when its target leaves the set (by default it runs to its end).
    pub drain_on_removal: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            connect_retries: 2,
            wait_for_target: Duration::from_secs(5),
            drain_on_removal: false,
        }
    }
}

/// Where the connections of one TCP forwarder go.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// Always one target (a link variable or `--forward`): one attempt, no waiting.
    Fixed(Target),
    /// Whatever the pool offers, per connection, under `policy`.
    Dynamic {
        /// The changing set of targets.
        pool: Arc<dyn Pool>,
        /// Retries, waiting and removal.
        policy: Policy,
    },
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(target) => write!(f, "{target}"),
            Self::Dynamic { pool, .. } => write!(f, "{pool}"),
        }
    }
}

impl Upstream {
    /// The label naming where connections go on the listener's metrics.
    pub(crate) fn label(&self) -> (&'static str, String) {
        match self {
            Self::Fixed(target) => ("target", target.to_string()),
            Self::Dynamic { pool, .. } => pool.label(),
        }
    }

    /// Connects one client's upstream: the fixed target, or pool candidates in turn (waiting
    /// for one if there is none). Every failed attempt is counted in `failures`.
    pub(crate) async fn open(
        &self,
        timeout: Duration,
        mut failures: impl FnMut(),
    ) -> Result<(TcpStream, Lease), UpstreamError> {
        let (pool, policy) = match self {
            Self::Fixed(target) => {
                return match connect(target, timeout).await {
                    Ok(stream) => Ok((stream, Lease::fixed())),
                    Err(error) => {
                        failures();
                        Err(error)
                    }
                }
            }
            Self::Dynamic { pool, policy } => (pool, policy),
        };
        let start = Instant::now();
        let deadline = start + policy.wait_for_target;
        let mut changes = pool.subscribe();
        let mut tried: Vec<Candidate> = Vec::new();
        let mut last_error = None;
        loop {
            if let Some(candidate) = pool.pick(&tried) {
                match connect(&candidate.target, timeout).await {
                    Ok(stream) => {
                        return Ok((stream, Lease::dynamic(pool, *policy, candidate)));
                    }
                    Err(error) => {
                        failures();
                        pool.report(&candidate, Outcome::Failed);
                        debug!(target = %candidate, %error, "upstream failed, trying the next");
                        tried.push(candidate);
                        if tried.len() > policy.connect_retries {
                            return Err(error);
                        }
                        last_error = Some(error);
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(last_error.unwrap_or(UpstreamError::NoTarget {
                    pool: pool.to_string(),
                    waited: now - start,
                }));
            }
            let wake = deadline.min(now + RECHECK);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The pool's owner is gone: nothing will change, only time passes.
                        tokio::time::sleep_until(wake).await;
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// A made connection's hold on its candidate: reports [`Outcome::Finished`] when dropped. A
/// fixed target's lease is one word: it lives as long as the connection.
#[derive(Debug)]
pub(crate) struct Lease(Option<Box<Held>>);

#[derive(Debug)]
struct Held {
    pool: Arc<dyn Pool>,
    policy: Policy,
    candidate: Candidate,
}

/// Completes when a connection must close because its target left the pool.
pub(crate) type Removal = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Lease {
    fn fixed() -> Self {
        Self(None)
    }

    fn dynamic(pool: &Arc<dyn Pool>, policy: Policy, candidate: Candidate) -> Self {
        Self(Some(Box::new(Held {
            pool: Arc::clone(pool),
            policy,
            candidate,
        })))
    }

    /// A future that completes when the target leaves the pool, if that must close the
    /// connection ([`Policy::drain_on_removal`]); `None` when nothing ever will.
    pub(crate) fn removal(&self) -> Option<Removal> {
        let held = self
            .0
            .as_ref()
            .filter(|held| held.policy.drain_on_removal)?;
        let (pool, candidate) = (Arc::clone(&held.pool), held.candidate.clone());
        // Subscribed now, so a change before the first poll is not missed.
        let mut changes = pool.subscribe();
        Some(Box::pin(async move {
            while pool.contains(&candidate) {
                if changes.changed().await.is_err() {
                    // The pool's owner is gone: nothing will change.
                    return std::future::pending().await;
                }
            }
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(held) = &self.0 {
            held.pool.report(&held.candidate, Outcome::Finished);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_env::Host;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    /// Offers its candidates in order and records every report.
    #[derive(Debug)]
    struct FakePool {
        candidates: Mutex<Vec<Candidate>>,
        reports: Mutex<Vec<(String, Outcome)>>,
        changes: watch::Sender<()>,
    }

    impl FakePool {
        fn new(candidates: Vec<Candidate>) -> Arc<Self> {
            Arc::new(Self {
                candidates: Mutex::new(candidates),
                reports: Mutex::new(Vec::new()),
                changes: watch::Sender::new(()),
            })
        }

        fn set(&self, candidates: Vec<Candidate>) {
            *self.candidates.lock().unwrap() = candidates;
            self.changes.send_replace(());
        }

        fn reports(&self) -> Vec<(String, Outcome)> {
            self.reports.lock().unwrap().clone()
        }
    }

    impl fmt::Display for FakePool {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("fake")
        }
    }

    impl Pool for FakePool {
        fn pick(&self, tried: &[Candidate]) -> Option<Candidate> {
            let candidates = self.candidates.lock().unwrap();
            candidates
                .iter()
                .find(|candidate| !tried.contains(candidate))
                .cloned()
        }
        fn report(&self, candidate: &Candidate, outcome: Outcome) {
            self.reports
                .lock()
                .unwrap()
                .push((candidate.id.clone(), outcome));
        }
        fn contains(&self, candidate: &Candidate) -> bool {
            self.candidates.lock().unwrap().contains(candidate)
        }
        fn subscribe(&self) -> watch::Receiver<()> {
            self.changes.subscribe()
        }
    }

    fn candidate(id: &str, port: u16) -> Candidate {
        Candidate {
            id: id.to_owned(),
            target: Target {
                host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port,
            },
        }
    }

    /// A port that refuses connections (bound, then closed).
    async fn refusing_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    async fn listening() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    fn dynamic(pool: &Arc<FakePool>, policy: Policy) -> Upstream {
        Upstream::Dynamic {
            pool: Arc::clone(pool) as Arc<dyn Pool>,
            policy,
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_refused_target_is_reported_and_the_next_one_serves_the_same_client() {
        let (_listener, good) = listening().await;
        let pool = FakePool::new(vec![
            candidate("dead", refusing_port().await),
            candidate("live", good),
        ]);
        let mut failures = 0;
        let (_stream, lease) = dynamic(&pool, Policy::default())
            .open(TIMEOUT, || failures += 1)
            .await
            .expect("the second candidate serves");
        assert_eq!(failures, 1);
        assert_eq!(pool.reports(), [("dead".to_owned(), Outcome::Failed)]);
        drop(lease);
        assert_eq!(
            pool.reports(),
            [
                ("dead".to_owned(), Outcome::Failed),
                ("live".to_owned(), Outcome::Finished)
            ]
        );
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let mut candidates = Vec::new();
        for id in ["a", "b", "c"] {
            candidates.push(candidate(id, refusing_port().await));
        }
        let pool = FakePool::new(candidates);
        let policy = Policy {
            connect_retries: 1,
            ..Policy::default()
        };
        let error = dynamic(&pool, policy)
            .open(TIMEOUT, || {})
            .await
            .expect_err("every candidate refuses");
        assert!(matches!(error, UpstreamError::Connect { .. }), "{error:?}");
        assert_eq!(pool.reports().len(), 2, "one attempt plus one retry");
    }

    #[tokio::test]
    async fn a_client_waits_for_a_target_and_is_served_when_one_appears() {
        let pool = FakePool::new(Vec::new());
        let (_listener, good) = listening().await;
        let later = Arc::clone(&pool);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.set(vec![candidate("late", good)]);
        });
        let (_stream, _lease) = dynamic(&pool, Policy::default())
            .open(TIMEOUT, || {})
            .await
            .expect("served once the target appears");
    }

    #[tokio::test]
    async fn with_no_target_the_client_is_closed_after_the_wait() {
        let pool = FakePool::new(Vec::new());
        let policy = Policy {
            wait_for_target: Duration::from_millis(100),
            ..Policy::default()
        };
        let error = dynamic(&pool, policy)
            .open(TIMEOUT, || {})
            .await
            .expect_err("nothing to connect to");
        let UpstreamError::NoTarget { pool, waited } = error else {
            panic!("{error:?}");
        };
        assert_eq!(pool, "fake");
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
    }

    #[tokio::test]
    async fn removal_ends_a_connection_only_when_asked() {
        let (_listener, good) = listening().await;
        for drain_on_removal in [false, true] {
            let pool = FakePool::new(vec![candidate("a", good)]);
            let policy = Policy {
                drain_on_removal,
                ..Policy::default()
            };
            let (_stream, lease) = dynamic(&pool, policy).open(TIMEOUT, || {}).await.unwrap();
            pool.set(Vec::new());
            let removed = match lease.removal() {
                Some(removal) => tokio::time::timeout(Duration::from_millis(200), removal)
                    .await
                    .is_ok(),
                None => false,
            };
            assert_eq!(removed, drain_on_removal);
        }
    }
}
