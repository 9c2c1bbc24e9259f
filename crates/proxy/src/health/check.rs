//! Backend health for `amb-serf run`: the probe loop over the probes of [`super`].
//!
//! - [`run_checks`] probes the backend every interval with the check `--health-check` chose
//!   ([`Kind`]: `tcp` connects and closes, `proxy::health::mysql` logs in politely and quits,
//!   `proxy::health::redis` sends `PING`; `auto` picks by the backend's port) and publishes [`Health`] on a `watch`
//!   channel; transitions are logged (warn when it goes down, info when it comes back). A
//!   probe never outlives its timeout.
//! - `registrar::advertise::apply_tags` (driven by the Serf `Advertiser`) turns that channel
//!   into tags.
//!
//! The loop stops on its cancellation token; `run` stops them before leaving the cluster,
//! so no tag update races the leave.

use std::fmt;
use std::time::Duration;

use super::{mysql, redis, Health};
use crate::link_env::Target;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The `--health-check` flag: how to check the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `mysql` on port 3306, `redis` on 6379, `tcp` otherwise.
    Auto,
    /// Connect and close: the backend accepts connections.
    Tcp,
    /// Read the greeting, log in as --health-mysql-user (access denied is healthy), quit.
    Mysql,
    /// `PING`, expect `+PONG`, `QUIT`.
    Redis,
}

impl Kind {
    /// The check to run against a backend on `port`: `auto` picks by the well-known port.
    pub fn resolve(self, port: u16) -> Self {
        match (self, port) {
            (Self::Auto, 3306) => Self::Mysql,
            (Self::Auto, 6379) => Self::Redis,
            (Self::Auto, _) => Self::Tcp,
            (kind, _) => kind,
        }
    }
}

/// A `--health-check` value that is not `auto`, `tcp`, `mysql` or `redis`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a health check (auto, tcp, mysql, redis)")]
pub struct UnknownKind(String);

impl std::str::FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(match name {
            "auto" => Self::Auto,
            "tcp" => Self::Tcp,
            "mysql" => Self::Mysql,
            "redis" => Self::Redis,
            other => return Err(UnknownKind(other.to_owned())),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Mysql => "mysql",
            Self::Redis => "redis",
        })
    }
}

/// What to probe, how, how often, and how long a probe may take.
#[derive(Debug, Clone)]
pub struct Check {
    /// The backend to probe.
    pub target: Target,
    /// The check, resolved (never [`Kind::Auto`]).
    pub kind: Kind,
    /// The user the `mysql` check logs in as.
    pub mysql_user: String,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take, all of it: resolve, connect and the exchange.
    pub timeout: Duration,
}

impl Check {
    /// Probes once now: the health and, when critical, why.
    pub async fn probe(&self) -> (Health, Option<String>) {
        let start = Instant::now();
        let result = match self.kind {
            Kind::Tcp | Kind::Auto => super::probe(&self.target, self.timeout)
                .await
                .map(|_| "connected".to_owned())
                .map_err(|error| error.to_string()),
            Kind::Mysql | Kind::Redis => self.converse().await,
        };
        match result {
            Ok(note) => {
                let took = start.elapsed();
                debug!(backend = %self.target, check = %self.kind, %note, ?took, "backend passes");
                (Health::Passing, None)
            }
            Err(error) => (Health::Critical, Some(error)),
        }
    }

    /// Connects and runs the protocol exchange, all within the timeout; then waits (within
    /// what is left of it) for the server to close first, so it sees an orderly goodbye.
    async fn converse(&self) -> Result<String, String> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = crate::dial::connect(&self.target, self.timeout)
            .await
            .map_err(|error| error.to_string())?;
        let talk = async {
            match self.kind {
                Kind::Mysql => mysql::talk(&mut stream, &self.mysql_user).await,
                _ => redis::talk(&mut stream).await,
            }
        };
        let verdict = tokio::time::timeout_at(deadline, talk)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{} check: no answer within {:?}",
                    self.kind, self.timeout
                ))
            })?;
        let mut rest = [0u8; 256];
        let _ = tokio::time::timeout_at(deadline, async {
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        })
        .await;
        Ok(verdict)
    }
}

/// Logs the check chosen for `target` (once, at startup).
pub fn log_choice(requested: Kind, check: &Check) {
    let why = if requested == Kind::Auto {
        "auto: by the backend's port"
    } else {
        "--health-check"
    };
    match check.kind {
        Kind::Mysql => info!(
            backend = %check.target,
            check = %check.kind,
            user = %check.mysql_user,
            interval = ?check.interval,
            "health check chosen ({why})"
        ),
        _ => info!(
            backend = %check.target,
            check = %check.kind,
            interval = ?check.interval,
            "health check chosen ({why})"
        ),
    }
}

/// Probes every `check.interval` and publishes the result on `health` until `shutdown`.
/// The channel's current value is the last known health (the caller probes once first).
pub async fn run_checks(check: Check, health: watch::Sender<Health>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate and the caller has just probed: skip it.
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (now, error) = tokio::select! {
            () = shutdown.cancelled() => return,
            result = check.probe() => result,
        };
        let before = *health.borrow();
        if before != now {
            log_transition(&check.target, now, error.as_deref());
            health.send_replace(now);
        }
    }
}

/// Logs a health change: a person may need to act when the backend goes down.
pub fn log_transition(target: &Target, now: Health, error: Option<&str>) {
    match now {
        Health::Critical => warn!(
            backend = %target,
            error = error.unwrap_or(""),
            "backend down: role withdrawn, health=critical"
        ),
        Health::Passing => info!(backend = %target, "backend up: role advertised, health=passing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    use crate::link_env::Host;

    #[tokio::test]
    async fn checks_see_the_backend_go_and_come_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let check = Check {
            target: Target {
                host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port: addr.port(),
            },
            kind: Kind::Tcp,
            mysql_user: String::new(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
        };
        assert_eq!(check.probe().await.0, Health::Passing);
        let (health_tx, mut health_rx) = watch::channel(Health::Passing);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_checks(check, health_tx, shutdown.clone()));
        drop(listener);
        let wait = Duration::from_secs(20);
        tokio::time::timeout(wait, health_rx.wait_for(|h| *h == Health::Critical))
            .await
            .expect("critical after the listener closed")
            .unwrap();
        let _listener = std::net::TcpListener::bind(addr).unwrap();
        tokio::time::timeout(wait, health_rx.wait_for(|h| *h == Health::Passing))
            .await
            .expect("passing once it listens again")
            .unwrap();
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn auto_picks_by_the_backend_port() {
        for (kind, port, expected) in [
            (Kind::Auto, 3306, Kind::Mysql),
            (Kind::Auto, 6379, Kind::Redis),
            (Kind::Auto, 5432, Kind::Tcp),
            (Kind::Auto, 33060, Kind::Tcp),
            (Kind::Tcp, 3306, Kind::Tcp),
            (Kind::Mysql, 13306, Kind::Mysql),
            (Kind::Redis, 16379, Kind::Redis),
        ] {
            assert_eq!(kind.resolve(port), expected, "{kind} on {port}");
        }
    }

    /// A backend that accepts and never says a word: the protocol checks give up within
    /// their timeout (never hang), and say so.
    #[tokio::test]
    async fn a_silent_backend_is_critical_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        for kind in [Kind::Mysql, Kind::Redis] {
            let check = Check {
                target: Target {
                    host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    port,
                },
                kind,
                mysql_user: "amb_serf_check".into(),
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(300),
            };
            let start = std::time::Instant::now();
            let (health, error) = check.probe().await;
            assert_eq!(health, Health::Critical, "{kind}");
            let error = error.unwrap_or_default();
            assert!(error.contains("no answer within 300ms"), "{kind}: {error}");
            assert!(start.elapsed() < Duration::from_secs(10), "{kind}");
        }
        held.abort();
    }
}
