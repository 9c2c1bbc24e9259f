//! The TCP forwarder: one listening socket per forward and forwarding thread, one small task
//! per accepted connection, on the thread that accepted it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::link_env::{Host, Target};
use crate::upstream::Upstream;
use crate::{copy, Error, Permit, Stats};

/// Listen backlog: large enough for connection storms (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 4096;

/// How a forwarded connection notices a peer that went silent (host down, network cut): without
/// these a connection to a vanished host stays open for the kernel's ~15 minutes of
/// retransmissions, or forever when idle. Applied to both the client and the upstream socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Liveness {
    /// TCP keepalive: the idle time before the first probe; probes then go every third of it
    /// (at least 1 s), and three unanswered probes close the connection. `None`: off.
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: data unacknowledged (or keepalive probes unanswered) this long closes
    /// the connection. `None`: the kernel default.
    pub user_timeout: Option<Duration>,
}

impl Liveness {
    /// Sets the options on `stream`. Errors name the option; the socket is otherwise unchanged.
    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(stream);
        if let Some(idle) = self.keepalive {
            // The kernel counts keepalive times in whole seconds, 1 at least.
            let idle = idle.max(Duration::from_secs(1));
            let interval = (idle / 3).max(Duration::from_secs(1));
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(KEEPALIVE_PROBES);
            socket.set_tcp_keepalive(&keepalive).map_err(|error| {
                std::io::Error::new(error.kind(), format!("setting TCP keepalive: {error}"))
            })?;
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(timeout) = self.user_timeout {
            socket
                .set_tcp_user_timeout(Some(timeout))
                .map_err(|error| {
                    std::io::Error::new(error.kind(), format!("setting TCP_USER_TIMEOUT: {error}"))
                })?;
        }
        Ok(())
    }
}

/// Unanswered keepalive probes before the kernel closes a connection.
const KEEPALIVE_PROBES: u32 = 3;

/// Why an upstream connection could not be made. Nothing was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The target's host name did not resolve.
    #[error("resolving {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to no address.
    #[error("{host} has no address")]
    NoAddress {
        /// The name.
        host: String,
    },
    /// The connection was refused or failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Resolution and connection together took longer than the connect timeout.
    #[error("connecting to {target}: timed out after {timeout:?}")]
    Timeout {
        /// The target.
        target: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// A dynamic upstream offered no usable target within the wait.
    #[error("no target for {pool} after waiting {waited:?}")]
    NoTarget {
        /// The pool (for example `role 6379`).
        pool: String,
        /// How long the client waited.
        waited: Duration,
    },
}

/// Connects to `target`, resolving a host name now (never cached: a container that comes back
/// with a new address is found), trying each address in turn, all within `timeout`.
pub async fn connect(target: &Target, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let attempt = async {
        match &target.host {
            Host::Ip(ip) => {
                let addr = SocketAddr::new(*ip, target.port);
                TcpStream::connect(addr)
                    .await
                    .map_err(|source| UpstreamError::Connect { addr, source })
            }
            Host::Name(name) => {
                let addrs = tokio::net::lookup_host((name.as_str(), target.port))
                    .await
                    .map_err(|source| UpstreamError::Resolve {
                        host: name.clone(),
                        source,
                    })?;
                let mut last = UpstreamError::NoAddress { host: name.clone() };
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => return Ok(stream),
                        Err(source) => last = UpstreamError::Connect { addr, source },
                    }
                }
                Err(last)
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            target: target.to_string(),
            timeout,
        }),
    }
}

/// Lets one log line through per interval and counts the ones held back, so a storm of failing
/// connections logs a line a second instead of a line per connection.
#[derive(Debug)]
pub(crate) struct RateLimit {
    start: Instant,
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub(crate) fn per_second() -> Self {
        Self {
            start: Instant::now(),
            interval_ms: 1000,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number held back since the last line)` when a line may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// What every connection task of one forwarder shares, on every thread.
#[derive(Debug)]
struct Shared {
    local_addr: SocketAddr,
    upstream: Upstream,
    connect_timeout: Duration,
    liveness: Liveness,
    stats: Arc<Stats>,
    upstream_failures: RateLimit,
    accept_errors: RateLimit,
    rejections: RateLimit,
}

/// A TCP forward, bound: one listening socket per forwarding thread, all on one address, and
/// the upstream their connections go to.
#[derive(Debug)]
pub struct TcpForwarder {
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
}

impl TcpForwarder {
    /// Binds `listen` `threads` times (at least once), with `SO_REUSEADDR` so a restart does not
    /// wait for `TIME_WAIT`, and with more than one thread `SO_REUSEPORT`, so the kernel spreads
    /// new connections over the threads' sockets. Every forwarded connection gets `liveness` on
    /// both of its sockets.
    pub fn bind(
        listen: SocketAddr,
        threads: usize,
        upstream: Upstream,
        connect_timeout: Duration,
        liveness: Liveness,
        stats: Arc<Stats>,
    ) -> Result<Self, Error> {
        let bind_error = |source| Error::Bind {
            addr: listen,
            protocol: crate::Protocol::Tcp,
            source,
        };
        let threads = threads.max(1);
        let first = listen_socket(listen, threads > 1).map_err(bind_error)?;
        // Port 0 picks a port once; the other threads' sockets join it.
        let local_addr = first.local_addr().map_err(bind_error)?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(listen_socket(local_addr, true).map_err(bind_error)?);
        }
        Ok(Self {
            listeners,
            shared: Arc::new(Shared {
                local_addr,
                upstream,
                connect_timeout,
                liveness,
                stats,
                upstream_failures: RateLimit::per_second(),
                accept_errors: RateLimit::per_second(),
                rejections: RateLimit::per_second(),
            }),
        })
    }

    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// One accept loop per listening socket, to run on the thread of the same index: each
    /// accepts until `shutdown` is cancelled, then closes its socket (new clients are refused)
    /// and returns. Its connections run on `tasks`, spawned on the runtime that polls the loop,
    /// so a connection never leaves the thread that accepted it.
    pub(crate) fn accept_loops(
        self,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Vec<AcceptLoop> {
        self.listeners
            .into_iter()
            .map(|listener| AcceptLoop {
                listener,
                shared: Arc::clone(&self.shared),
                tasks: tasks.clone(),
                shutdown: shutdown.child_token(),
            })
            .collect()
    }
}

/// A non-blocking listening socket on `addr`.
fn listen_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// One listening socket of a [`TcpForwarder`], not yet registered with a runtime.
#[derive(Debug)]
pub(crate) struct AcceptLoop {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl AcceptLoop {
    /// Registers the socket with the current runtime and accepts until shutdown.
    pub(crate) async fn run(self) {
        let shared = self.shared;
        let span =
            tracing::info_span!("tcp", listen = %shared.local_addr, target = %shared.upstream);
        async move {
            let listener = match TcpListener::from_std(self.listener) {
                Ok(listener) => listener,
                Err(error) => {
                    error!(%error, "registering the listener failed, not accepting on this thread");
                    return;
                }
            };
            loop {
                let accepted = tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let (client, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Typically EMFILE: back off rather than spin on a full descriptor table.
                        if let Some(suppressed) = shared.accept_errors.allow() {
                            warn!(%error, suppressed, "accept failed");
                        }
                        tokio::select! {
                            () = self.shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        }
                    }
                };
                let Some(permit) = shared.stats.try_acquire() else {
                    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = shared.rejections.allow() {
                        warn!(%peer, suppressed, "max connections reached, closing new client");
                    }
                    drop(client);
                    continue;
                };
                let span = tracing::debug_span!("conn", %peer);
                self.tasks
                    .spawn(serve(client, Arc::clone(&shared), permit).instrument(span));
            }
            info!("stopped accepting");
        }
        .instrument(span)
        .await;
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>, permit: Permit) {
    let _ = client.set_nodelay(true);
    let opened = shared
        .upstream
        .open(shared.connect_timeout, || {
            shared
                .stats
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
        })
        .await;
    let (upstream, lease) = match opened {
        Ok(opened) => opened,
        // A pool with no target logs its own state changes, once each, not per client.
        Err(error @ UpstreamError::NoTarget { .. }) => {
            debug!(%error, "closing client");
            return;
        }
        Err(error) => {
            if let Some(suppressed) = shared.upstream_failures.allow() {
                warn!(%error, suppressed, "upstream unavailable, closing client");
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    for (side, stream) in [("client", &client), ("upstream", &upstream)] {
        if let Err(error) = shared.liveness.apply(stream) {
            debug!(side, %error, "socket option refused");
        }
    }
    tokio::select! {
        result = copy::forward(client, upstream, &shared.stats) => match result {
            Ok(totals) => debug!(
                sent = totals.client_to_upstream,
                received = totals.upstream_to_client,
                "connection closed"
            ),
            Err(error) => debug!(side = %error.side, error = %error.source, "connection reset"),
        },
        () = lease.removed() => debug!("target left the pool, closing connection"),
    }
    drop(lease);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_through_and_counts_the_rest() {
        let limit = RateLimit::per_second();
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // The next window reports what was held back.
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(5));
    }

    #[tokio::test]
    async fn liveness_sets_keepalive_and_user_timeout_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        let stream = TcpStream::connect(addr).await.expect("connect");
        let socket = socket2::SockRef::from(&stream);
        Liveness::default().apply(&stream).expect("nothing to set");
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"));

        let liveness = Liveness {
            keepalive: Some(Duration::from_secs(6)),
            user_timeout: Some(Duration::from_millis(2500)),
        };
        liveness.apply(&stream).expect("setting options");
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(6)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(2)
        );
        assert_eq!(
            socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
            KEEPALIVE_PROBES
        );
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_millis(2500))
        );

        // A short keepalive still probes at most once a second.
        let short = Liveness {
            keepalive: Some(Duration::from_secs(1)),
            user_timeout: None,
        };
        short.apply(&stream).expect("setting options");
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(1)
        );
    }
}
