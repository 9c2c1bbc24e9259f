//! What `run` and `connect` share: their serving flags ([`ServeArgs`]), the signals, and the
//! one shutdown path: [`stop_reason`] (a signal or `serf leave` over RPC) → [`withdraw`] (the
//! Serf leave or the etcd lease revoke, while the forwarders still serve) → [`drain`] (stop
//! accepting, wait for open connections) → [`release`] (the advertiser's sockets and tasks), all
//! within `--drain-timeout`; a second signal cuts it short.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use proxy::{CancellationToken, TaskTracker};
use registrar::advertise::Advertiser;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

/// Flags of every command that consumes roles (`connect`; `run --connect`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumeArgs {
    /// Further providers tried within one client connection when one refuses (it is then
    /// skipped for a short back-off).
    #[arg(long, env = "AMB_CONNECT_RETRIES", default_value_t = 2)]
    pub(crate) connect_retries: usize,

    /// With no provider, how long a new client waits for one before it is closed.
    #[arg(long, env = "AMB_WAIT_FOR_TARGET", default_value = "5s", value_parser = crate::duration::parse)]
    pub(crate) wait_for_target: Duration,

    /// Close open connections whose provider leaves, fails or turns critical (by default they
    /// run to their end).
    #[arg(long, env = "AMB_DRAIN_ON_REMOVAL")]
    pub(crate) drain_on_removal: bool,
}

impl ConsumeArgs {
    /// The forwarders' policy.
    pub(crate) fn policy(&self) -> proxy::Policy {
        proxy::Policy {
            connect_retries: self.connect_retries,
            wait_for_target: self.wait_for_target,
            drain_on_removal: self.drain_on_removal,
        }
    }
}

/// Flags of every command that serves forwards (`run`, `connect`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address every listener binds.
    #[arg(long, env = "AMB_LISTEN_ADDR", default_value = "0.0.0.0")]
    pub(crate) listen_addr: IpAddr,

    /// Time allowed to resolve and connect to an upstream or provider (e.g. 5s, 500ms).
    #[arg(long, env = "AMB_CONNECT_TIMEOUT", default_value = "5s", value_parser = crate::duration::parse)]
    pub(crate) connect_timeout: Duration,

    /// Concurrent connections (TCP connections plus UDP sessions); past it new clients are
    /// closed at once and counted.
    #[arg(long, env = "AMB_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub(crate) max_connections: usize,

    /// On SIGTERM/SIGINT, how long leaving (or deregistering) and then draining open
    /// connections may take.
    #[arg(long, env = "AMB_DRAIN_TIMEOUT", default_value = "10s", value_parser = crate::duration::parse)]
    pub(crate) drain_timeout: Duration,

    #[command(flatten)]
    pub(crate) liveness: LivenessArgs,

    /// Serve /healthz and Prometheus /metrics on this address (off unless given).
    #[arg(long, env = "AMB_METRICS_ADDR", value_name = "HOST:PORT")]
    pub(crate) metrics_addr: Option<SocketAddr>,

    /// The DNS interface, answered from the cluster's membership.
    #[command(flatten)]
    pub(crate) dns: crate::nameserver::DnsArgs,
}

impl ServeArgs {
    /// The forwarders' configuration (UDP settings at their defaults).
    pub(crate) fn proxy_config(&self) -> proxy::Config {
        proxy::Config {
            listen_addr: self.listen_addr,
            connect_timeout: self.connect_timeout,
            max_connections: self.max_connections,
            liveness: self.liveness.liveness(),
            ..proxy::Config::default()
        }
    }
}

/// Waits for SIGTERM/SIGINT or, from `advertiser`, a stop request (`serf leave` over RPC).
pub(crate) async fn stop_reason(
    signals: &mut Signals,
    advertiser: Option<&dyn Advertiser>,
) -> &'static str {
    let requested = async {
        match advertiser {
            Some(advertiser) => advertiser.stop_requested().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        signal = signals.recv() => signal,
        () = requested => "serf leave (RPC)",
    }
}

/// Stops advertising within `timeout` (peers show `left`, or the etcd key is gone) while the
/// forwarders still serve. Returns a second signal that arrived meanwhile.
pub(crate) async fn withdraw(
    advertiser: Option<&mut Box<dyn Advertiser>>,
    timeout: Duration,
    signals: &mut Signals,
) -> Option<&'static str> {
    let advertiser = advertiser?;
    tokio::select! {
        result = advertiser.withdraw(timeout) => {
            match result {
                Ok(done) => info!("{done}"),
                Err(error) => warn!(%error, "leaving failed, peers will see us fail"),
            }
            None
        }
        signal = signals.recv() => Some(signal),
    }
}

/// Releases what is left of `advertiser` (sockets, tasks) within what is left of `deadline`.
pub(crate) async fn release(
    advertiser: Option<Box<dyn Advertiser>>,
    deadline: tokio::time::Instant,
) {
    let Some(advertiser) = advertiser else { return };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if tokio::time::timeout(left.max(Duration::from_millis(100)), advertiser.shutdown())
        .await
        .is_err()
    {
        warn!("the member did not stop in time, exiting anyway");
    }
}

/// Stops accepting (every listener closes) and waits for open connections until `deadline`, or
/// until a second signal — one that already arrived while leaving (`second`) ends it at once.
pub(crate) async fn drain(
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    stats: &proxy::Stats,
    deadline: tokio::time::Instant,
    signals: &mut Signals,
    second: Option<&'static str>,
) {
    shutdown.cancel();
    tasks.close();
    if let Some(signal) = second {
        warn!(%signal, "second signal, exiting now");
        return;
    }
    let open = stats.active.load(Ordering::Relaxed);
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    info!(open, timeout = ?left, "stopped accepting, draining");
    tokio::select! {
        () = tasks.wait() => info!("drained"),
        () = tokio::time::sleep_until(deadline) => {
            let open = stats.active.load(Ordering::Relaxed);
            warn!(open, "drain timed out, closing open connections");
        }
        second = signals.recv() => warn!(signal = second, "second signal, exiting now"),
    }
}

/// SIGTERM and SIGINT as one stream.
pub(crate) struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// How forwarded TCP connections notice a peer that went silent (`run` and `connect`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LivenessArgs {
    /// TCP keepalive on both sides of every connection: idle time before the first probe
    /// (probes then every third of it, three unanswered close the connection); 0 turns it off.
    #[arg(long, env = "AMB_TCP_KEEPALIVE", default_value = "30s", value_parser = crate::duration::parse)]
    tcp_keepalive: Duration,

    /// TCP_USER_TIMEOUT on both sides: data unacknowledged this long closes the connection
    /// (the client sees a reset); 0 keeps the kernel default (~15 min of retransmissions).
    /// Off by default: the kernel also applies it to a peer that keeps its receive window
    /// closed (a client that stops reading), so set it above the longest such stall.
    #[arg(long, env = "AMB_TCP_USER_TIMEOUT", default_value = "0", value_parser = crate::duration::parse)]
    tcp_user_timeout: Duration,
}

impl LivenessArgs {
    /// The forwarders' setting (a zero duration is off).
    pub(crate) fn liveness(&self) -> proxy::Liveness {
        proxy::Liveness {
            keepalive: Some(self.tcp_keepalive).filter(|idle| !idle.is_zero()),
            user_timeout: Some(self.tcp_user_timeout).filter(|timeout| !timeout.is_zero()),
        }
    }
}

/// Raises the soft open-file limit to the hard limit: each forwarded connection takes two
/// descriptors, and the usual soft limit (1024) would cap the proxy at ~500 connections.
#[allow(unsafe_code)]
pub(crate) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard
        // limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            tracing::debug!(
                from = before,
                to = limit.rlim_max,
                "raised the open-file limit"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LivenessArgs;
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn liveness_defaults_to_keepalive_only_and_zero_turns_either_off() {
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            liveness: LivenessArgs,
        }
        let check = |flags: &[&str], keepalive: Option<u64>, user_timeout: Option<u64>| {
            let argv = std::iter::once("test").chain(flags.iter().copied());
            let liveness = Cli::try_parse_from(argv)
                .expect("valid flags")
                .liveness
                .liveness();
            assert_eq!(
                liveness.keepalive,
                keepalive.map(Duration::from_secs),
                "{flags:?}"
            );
            assert_eq!(
                liveness.user_timeout,
                user_timeout.map(Duration::from_secs),
                "{flags:?}"
            );
        };
        check(&[], Some(30), None);
        check(
            &["--tcp-user-timeout", "3s", "--tcp-keepalive", "2s"],
            Some(2),
            Some(3),
        );
        check(&["--tcp-keepalive", "0"], None, None);
    }
}
