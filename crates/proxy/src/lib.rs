//! Docker link environment → TCP/UDP port forwarders.
//!
//! The ambassador half of amb-serf: it turns the link variables Docker injects (and
//! `--forward` flags) into [`ForwardSpec`]s, binds one listener per (port, protocol) and forwards
//! every connection or datagram to its target.
//!
//! - [`link_env::parse`] is pure: environment pairs and options in, sorted specs or a
//!   [`LinkEnvError`] naming the variable and value out. `<ALIAS>_ENV_*` copies of a linked
//!   container's environment (often secrets) are never read.
//! - [`Proxy::bind`] binds every listener up front (so a busy port fails before anything runs),
//!   and [`Proxy::spawn`] starts the accept loops on a [`TaskTracker`].
//! - TCP messages are copied through a stack buffer (two syscalls each); bulk bursts (a read that
//!   fills it) move with `splice(2)` through pooled pipes on Linux (copied elsewhere or where
//!   splice is refused); half-close, reset propagation, backpressure and `TCP_NODELAY` are kept
//!   end to end. Idle connections hold no pipe and no buffer.
//! - [`health::probe`]: "does the upstream accept a TCP connection now?".
//! - [`Upstream`]: a TCP forwarder sends to one fixed target, or to whatever a [`Pool`] offers
//!   per connection (the consumer side): failed targets are reported and the next is tried within
//!   the same client connection, a client waits a bounded time for a target to appear, and
//!   [`Proxy::bind_tcp`] adds such a listener beside the fixed forwards (same accept loop, copy
//!   engine, limits, stats and drain).
//!
//! - [`kernel`] (Linux): the kernel data path, the same forwards as nftables NAT rules in the
//!   process's network namespace (a pure ruleset builder and a small netlink encoder), so the
//!   bytes never enter the process; the listeners above stay bound for what it does not take.
//!
//! Left out on purpose: TLS, HTTP awareness, and the choice among a pool's targets (the
//! [`Pool`] implementation owns it).
//!
//! # Shutdown
//!
//! The caller owns one [`CancellationToken`] and one [`TaskTracker`]. Cancelling the token
//! stops every accept loop and closes the listeners (new clients are refused); connections
//! already accepted run on the tracker until they end by themselves, so the caller drains
//! with `tasks.close(); tasks.wait()` under its own deadline.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use proxy::{link_env, Config, Proxy};
//! use tokio_util::{sync::CancellationToken, task::TaskTracker};
//!
//! // The binary passes its whole environment; any `(name, value)` pairs will do.
//! let vars = [("MYSQL_PORT_3306_TCP".to_owned(), "tcp://172.17.0.5:3306".to_owned())];
//! let specs = link_env::parse(vars, &link_env::Options::default())?;
//! let proxy = Proxy::bind(&specs, &Config::default()).await?;
//! let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
//! proxy.spawn(&tasks, &shutdown);
//! tokio::signal::ctrl_c().await?;
//! shutdown.cancel();
//! tasks.close();
//! let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait()).await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

mod copy;
pub mod dial;
pub mod health;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod link_env;
#[cfg(target_os = "linux")]
mod rate_limit;
mod splice;
pub mod tcp;
pub mod udp;
pub mod upstream;

pub use copy::{CopyError, Side};
pub use dial::UpstreamError;
pub use link_env::{ForwardSpec, Host, LinkEnvError, Origin, Protocol, Target};
pub use tcp::{Liveness, TcpForwarder};
pub use udp::UdpForwarder;
pub use upstream::{Candidate, Outcome, Policy, Pool, Upstream};

/// The proxy crate's runtime error: binding a listener failed. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound (port in use, no permission, bad address).
    #[error("binding {protocol} {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// TCP or UDP.
        protocol: Protocol,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// What a failed bind of `protocol` on `addr` returns (in `map_err`).
    fn bind(addr: SocketAddr, protocol: Protocol) -> impl Fn(std::io::Error) -> Self + Copy {
        move |source| Self::Bind {
            addr,
            protocol,
            source,
        }
    }
}

/// Settings shared by all forwarders.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every listener binds (`0.0.0.0` by default).
    pub listen_addr: IpAddr,
    /// Time allowed to resolve and connect to an upstream.
    pub connect_timeout: Duration,
    /// Concurrent TCP connections plus UDP sessions; past it new clients are closed at once.
    pub max_connections: usize,
    /// A UDP session with no datagram either way for this long is closed.
    pub udp_idle_timeout: Duration,
    /// How TCP connections notice a peer that went silent (keepalive, `TCP_USER_TIMEOUT`).
    pub liveness: Liveness,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connect_timeout: Duration::from_secs(5),
            max_connections: 100_000,
            udp_idle_timeout: Duration::from_secs(60),
            liveness: Liveness {
                keepalive: Some(Duration::from_secs(30)),
                user_timeout: None,
            },
        }
    }
}

/// Counters shared by every forwarder (the process's totals), the connection limit, and each
/// listener's [`ListenerStats`].
#[derive(Debug)]
pub struct Stats {
    max_connections: usize,
    /// Open TCP connections plus UDP sessions.
    pub active: AtomicUsize,
    /// Connections and sessions opened since start.
    pub accepted: AtomicU64,
    /// UDP sessions open or opening (part of `active`), under [`udp::session_limit`].
    pub udp_sessions: AtomicUsize,
    /// Clients closed at once because `max_connections` (or for UDP, the session limit) was
    /// reached.
    pub rejected: AtomicU64,
    /// Upstream connections that failed (refused, timed out, unresolvable).
    pub upstream_failures: AtomicU64,
    /// Bytes forwarded from clients to upstreams (TCP payload and UDP datagrams), counted as
    /// they move.
    pub bytes_to_upstream: AtomicU64,
    /// Bytes forwarded from upstreams back to clients, counted as they move.
    pub bytes_to_client: AtomicU64,
    /// Each listener's own counters.
    listeners: std::sync::Mutex<Vec<Arc<ListenerStats>>>,
}

impl Stats {
    /// Counters with a limit of `max_connections`.
    pub fn new(max_connections: usize) -> Self {
        Self {
            max_connections,
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            udp_sessions: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            listeners: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A slot for one more connection, or `None` at the limit (the listener's counters are the
    /// caller's, see [`ListenerStats::try_acquire`]).
    fn try_acquire(&self) -> bool {
        let previous = self.active.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Registers the counters of one listener (`listen`, `protocol`, and where it sends:
    /// `upstream`, a label name and value); they also count into these totals.
    pub fn listener(
        self: &Arc<Self>,
        listen: SocketAddr,
        protocol: Protocol,
        upstream: (&'static str, String),
    ) -> Arc<ListenerStats> {
        let listener = Arc::new(ListenerStats {
            listen,
            protocol,
            upstream,
            counts: Counts::default(),
            total: Arc::clone(self),
        });
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&listener));
        listener
    }

    /// Every listener's counters, in the order they were bound.
    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One listener's counters (a labelled series each on `/metrics`); what they count is also
/// counted in the process's [`Stats`].
#[derive(Debug)]
pub struct ListenerStats {
    /// The bound address.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Where its connections go, as a label: `("target", "10.0.0.5:3306")` for a fixed target,
    /// the pool's [`Pool::label`] for a dynamic one.
    pub upstream: (&'static str, String),
    /// The counts.
    pub counts: Counts,
    total: Arc<Stats>,
}

/// What one listener counts (the same meaning as the [`Stats`] fields of the same names).
#[derive(Debug, Default)]
pub struct Counts {
    /// Open TCP connections plus UDP sessions.
    pub active: AtomicUsize,
    /// Connections and sessions opened since start.
    pub accepted: AtomicU64,
    /// Clients closed at once at a limit.
    pub rejected: AtomicU64,
    /// Upstream connections that failed.
    pub upstream_failures: AtomicU64,
    /// Bytes forwarded from clients to upstreams.
    pub bytes_to_upstream: AtomicU64,
    /// Bytes forwarded from upstreams back to clients.
    pub bytes_to_client: AtomicU64,
}

impl ListenerStats {
    /// The process's totals.
    pub(crate) fn total(&self) -> &Arc<Stats> {
        &self.total
    }

    /// A slot for one more connection under the process's limit, or `None` at it.
    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        if !self.total.try_acquire() {
            return None;
        }
        self.counts.active.fetch_add(1, Ordering::AcqRel);
        self.counts.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Permit(Arc::clone(self)))
    }

    /// A client closed at once at a limit.
    pub(crate) fn rejected(&self) {
        self.counts.rejected.fetch_add(1, Ordering::Relaxed);
        self.total.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream connection that failed.
    pub(crate) fn upstream_failed(&self) {
        self.counts
            .upstream_failures
            .fetch_add(1, Ordering::Relaxed);
        self.total.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes forwarded to the upstream.
    pub(crate) fn to_upstream(&self, n: u64) {
        self.counts
            .bytes_to_upstream
            .fetch_add(n, Ordering::Relaxed);
        self.total.bytes_to_upstream.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes forwarded back to the client.
    pub(crate) fn to_client(&self, n: u64) {
        self.counts.bytes_to_client.fetch_add(n, Ordering::Relaxed);
        self.total.bytes_to_client.fetch_add(n, Ordering::Relaxed);
    }
}

/// One connection's slot under the limit, released on drop.
#[derive(Debug)]
struct Permit(Arc<ListenerStats>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.counts.active.fetch_sub(1, Ordering::AcqRel);
        self.0.total.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound listener and the spec it serves.
#[derive(Debug)]
enum Listener {
    Tcp(TcpForwarder),
    Udp(UdpForwarder),
}

/// Every forwarder of a process, bound and ready to run.
#[derive(Debug)]
pub struct Proxy {
    listeners: Vec<(ForwardSpec, Listener)>,
    /// Listeners added with [`Proxy::bind_tcp`].
    extra: Vec<TcpForwarder>,
    config: Config,
    stats: Arc<Stats>,
}

impl Proxy {
    /// Binds one listener per spec on `config.listen_addr`. Fails on the first listener that
    /// cannot be bound; the ones bound before it are closed.
    pub async fn bind(specs: &[ForwardSpec], config: &Config) -> Result<Self, Error> {
        let stats = Arc::new(Stats::new(config.max_connections));
        let mut listeners = Vec::with_capacity(specs.len());
        for spec in specs {
            let listen = SocketAddr::new(config.listen_addr, spec.listen_port);
            let listener = match spec.protocol {
                Protocol::Tcp => Listener::Tcp(TcpForwarder::bind(
                    listen,
                    Upstream::Fixed(spec.target.clone()),
                    config.connect_timeout,
                    config.liveness,
                    Arc::clone(&stats),
                )?),
                Protocol::Udp => Listener::Udp(
                    UdpForwarder::bind(
                        listen,
                        spec.target.clone(),
                        config.udp_idle_timeout,
                        config.connect_timeout,
                        Arc::clone(&stats),
                    )
                    .await?,
                ),
            };
            listeners.push((spec.clone(), listener));
        }
        Ok(Self {
            listeners,
            extra: Vec::new(),
            config: config.clone(),
            stats,
        })
    }

    /// Binds one more TCP listener on `listen_port` (of `config.listen_addr`) whose connections
    /// go to `upstream`, under the same limit and counters; returns its bound address.
    pub fn bind_tcp(&mut self, listen_port: u16, upstream: Upstream) -> Result<SocketAddr, Error> {
        let listen = SocketAddr::new(self.config.listen_addr, listen_port);
        let forwarder = TcpForwarder::bind(
            listen,
            upstream,
            self.config.connect_timeout,
            self.config.liveness,
            Arc::clone(&self.stats),
        )?;
        let addr = forwarder.local_addr();
        self.extra.push(forwarder);
        Ok(addr)
    }

    /// Each spec with the address its listener is bound to.
    pub fn bound(&self) -> Vec<(ForwardSpec, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(spec, listener)| {
                let addr = match listener {
                    Listener::Tcp(tcp) => tcp.local_addr(),
                    Listener::Udp(udp) => udp.local_addr(),
                };
                (spec.clone(), addr)
            })
            .collect()
    }

    /// The shared counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Starts every accept loop on `tasks`; they stop when `shutdown` is cancelled.
    pub fn spawn(self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        for tcp in self.extra {
            tasks.spawn(tcp.run(tasks.clone(), shutdown.child_token()));
        }
        for (_, listener) in self.listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    tasks.spawn(tcp.run(tasks.clone(), shutdown.child_token()));
                }
                Listener::Udp(udp) => {
                    tasks.spawn(udp.run(tasks.clone(), shutdown.child_token()));
                }
            }
        }
    }
}
