//! The TCP forwarder: one listener per forward, one small task per accepted connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::dial::UpstreamError;
use crate::rate_limit::RateLimit;
use crate::upstream::{Lease, Removal, Upstream};
use crate::{copy, Error, ListenerStats, Permit, Stats};

/// Listen backlog: large enough for connection storms (the kernel caps it at `somaxconn`).
const BACKLOG: u32 = 4096;

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
    /// Sets the options on `socket` (a stream, or a listener whose accepted sockets inherit
    /// them). Errors name the option; the socket is otherwise unchanged.
    pub fn apply(&self, socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(socket);
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

/// Whether accepted sockets inherit `TCP_NODELAY`, keepalive and `TCP_USER_TIMEOUT` from their
/// listener, so that [`TcpForwarder::bind`] sets them once instead of on every client socket.
const INHERITS_OPTIONS: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Unanswered keepalive probes before the kernel closes a connection.
const KEEPALIVE_PROBES: u32 = 3;

/// What every connection task of one forwarder shares.
#[derive(Debug)]
struct Shared {
    upstream: Upstream,
    connect_timeout: Duration,
    liveness: Liveness,
    stats: Arc<ListenerStats>,
    upstream_failures: RateLimit,
}

/// A bound TCP listener and the upstream its connections go to.
#[derive(Debug)]
pub struct TcpForwarder {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_errors: RateLimit,
    rejections: RateLimit,
}

impl TcpForwarder {
    /// Binds `listen` (with `SO_REUSEADDR`, so a restart does not wait for `TIME_WAIT`).
    /// Every forwarded connection gets `liveness` on both of its sockets.
    pub fn bind(
        listen: SocketAddr,
        upstream: Upstream,
        connect_timeout: Duration,
        liveness: Liveness,
        stats: Arc<Stats>,
    ) -> Result<Self, Error> {
        let bind_error = Error::bind(listen, crate::Protocol::Tcp);
        let socket = if listen.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(bind_error)?;
        socket.set_reuseaddr(true).map_err(bind_error)?;
        // Accepted sockets inherit these from the listener (Linux copies the listener's socket
        // and TCP options into each connection it accepts): set once here, they cost a new
        // connection no system call.
        if INHERITS_OPTIONS {
            socket.set_nodelay(true).map_err(bind_error)?;
            liveness.apply(&socket).map_err(bind_error)?;
        }
        socket.bind(listen).map_err(bind_error)?;
        let listener = socket.listen(BACKLOG).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let stats = stats.listener(local_addr, crate::Protocol::Tcp, upstream.label());
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(Shared {
                upstream,
                connect_timeout,
                liveness,
                stats,
                upstream_failures: RateLimit::per_second(),
            }),
            accept_errors: RateLimit::per_second(),
            rejections: RateLimit::per_second(),
        })
    }

    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts until `shutdown` is cancelled, then closes the listener (new clients are refused)
    /// and returns. Each connection runs on `tasks`, which the caller drains.
    ///
    /// The loop enters no span (entering one on every poll cost each connection more than the
    /// rest of the loop): its few lines name the listener and target themselves.
    pub async fn run(self, tasks: TaskTracker, shutdown: CancellationToken) {
        let listen = self.local_addr;
        let target = &self.shared.upstream;
        {
            loop {
                let accepted = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    accepted = self.listener.accept() => accepted,
                };
                let (client, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Typically EMFILE: back off rather than spin on a full descriptor table.
                        if let Some(suppressed) = self.accept_errors.allow() {
                            warn!(%listen, %target, %error, suppressed, "accept failed");
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        }
                    }
                };
                let Some(permit) = self.shared.stats.try_acquire() else {
                    self.shared.stats.rejected();
                    if let Some(suppressed) = self.rejections.allow() {
                        warn!(
                            %listen,
                            %target,
                            %peer,
                            suppressed,
                            "max connections reached, closing new client"
                        );
                    }
                    drop(client);
                    continue;
                };
                let span = tracing::debug_span!("conn", %peer);
                tasks.spawn(Serve::new(client, Arc::clone(&self.shared), permit).instrument(span));
            }
            info!(%listen, %target, "stopped accepting");
        }
    }
}

/// One accepted connection's task: connect upstream, then forward until both sides end.
///
/// What an idle connection costs is mostly this task's size, so the two phases are kept apart:
/// connecting (resolution, timeouts, waiting on a pool: several hundred bytes of state) runs
/// boxed and is freed once connected, and the task then holds only its [`Connection`].
// The large variant is the one a connection spends its life in; boxing it would cost every
// connection a second allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Serve {
    Connecting(Pin<Box<dyn Future<Output = Option<Connection>> + Send>>),
    Forwarding(Connection),
}

impl Serve {
    fn new(client: TcpStream, shared: Arc<Shared>, permit: Permit) -> Self {
        Self::Connecting(Box::pin(open(client, shared, permit)))
    }
}

impl Future for Serve {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Self::Connecting(connecting) = this {
            match ready!(connecting.as_mut().poll(cx)) {
                Some(connection) => *this = Self::Forwarding(connection),
                None => return Poll::Ready(()),
            }
        }
        match this {
            Self::Forwarding(connection) => Pin::new(connection).poll(cx),
            Self::Connecting(_) => unreachable!("connected above"),
        }
    }
}

/// Connects the upstream for `client`; `None` (logged) when there is none.
async fn open(client: TcpStream, shared: Arc<Shared>, permit: Permit) -> Option<Connection> {
    if !INHERITS_OPTIONS {
        let _ = client.set_nodelay(true);
        if let Err(error) = shared.liveness.apply(&client) {
            debug!(side = "client", %error, "socket option refused");
        }
    }
    let opened = shared
        .upstream
        .open(shared.connect_timeout, || shared.stats.upstream_failed())
        .await;
    let (upstream, lease) = match opened {
        Ok(opened) => opened,
        // A pool with no target logs its own state changes, once each, not per client.
        Err(error @ UpstreamError::NoTarget { .. }) => {
            debug!(%error, "closing client");
            return None;
        }
        Err(error) => {
            if let Some(suppressed) = shared.upstream_failures.allow() {
                warn!(%error, suppressed, "upstream unavailable, closing client");
            }
            return None;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(error) = shared.liveness.apply(&upstream) {
        debug!(side = "upstream", %error, "socket option refused");
    }
    Some(Connection {
        removal: lease.removal(),
        duplex: copy::forward(client, upstream, Arc::clone(&shared.stats)),
        _lease: lease,
        _permit: permit,
    })
}

/// A connected client: forwards until both directions end, or one fails, or (with
/// `--drain-on-removal`) its target leaves the pool. Dropped in field order: the sockets close,
/// then the pool hears the connection finished, then the slot under `max_connections` frees.
struct Connection {
    duplex: copy::Duplex,
    removal: Option<Removal>,
    _lease: Lease,
    _permit: Permit,
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Poll::Ready(result) = Pin::new(&mut self.duplex).poll(cx) {
            match result {
                Ok(totals) => debug!(
                    sent = totals.client_to_upstream,
                    received = totals.upstream_to_client,
                    "connection closed"
                ),
                Err(error) => debug!(side = %error.side, error = %error.source, "connection reset"),
            }
            return Poll::Ready(());
        }
        if let Some(removal) = &mut self.removal {
            if removal.as_mut().poll(cx).is_ready() {
                debug!("target left the pool, closing connection");
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_env::{Host, Target};

    #[test]
    fn an_idle_connection_holds_only_what_forwarding_needs() {
        // The task of every open connection holds a `Serve`; connecting's state is boxed apart.
        // (tokio rounds a task to 128 bytes: at 224 it takes 384, where it took 1,024 before
        // the phases were split.)
        let size = std::mem::size_of::<Serve>();
        assert!(size <= 256, "a connection's task grew to {size} bytes");
    }

    #[tokio::test]
    async fn accepted_clients_get_nodelay_and_liveness_from_the_listener() {
        let liveness = Liveness {
            keepalive: Some(Duration::from_secs(9)),
            user_timeout: Some(Duration::from_millis(4000)),
        };
        let forwarder = TcpForwarder::bind(
            "127.0.0.1:0".parse().expect("address"),
            Upstream::Fixed(Target {
                host: Host::Ip("127.0.0.1".parse().expect("address")),
                port: 9,
            }),
            Duration::from_secs(1),
            liveness,
            Arc::new(Stats::new(10)),
        )
        .expect("bind");
        let _client = TcpStream::connect(forwarder.local_addr())
            .await
            .expect("connect");
        let (accepted, _) = forwarder.listener.accept().await.expect("accept");
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().expect("TCP_NODELAY"));
        assert_liveness(&socket, 9, 3, 4000);
    }

    /// Asserts keepalive after `idle` s, probing every `interval` s, and the user timeout.
    fn assert_liveness(
        socket: &socket2::SockRef<'_>,
        idle: u64,
        interval: u64,
        user_timeout_ms: u64,
    ) {
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(idle)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(interval)
        );
        assert_eq!(
            socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
            KEEPALIVE_PROBES
        );
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_millis(user_timeout_ms))
        );
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
        assert_liveness(&socket, 6, 2, 2500);

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

    #[tokio::test]
    async fn each_listener_counts_its_own_connections_and_the_totals_all() {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = Target {
            host: Host::Ip("127.0.0.1".parse().expect("address")),
            port: upstream.local_addr().expect("bound").port(),
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = upstream.accept().await {
                let _ = stream.write_all(b"hi").await;
            }
        });
        let stats = Arc::new(Stats::new(10));
        let bind = || {
            TcpForwarder::bind(
                "127.0.0.1:0".parse().expect("address"),
                Upstream::Fixed(target.clone()),
                Duration::from_secs(1),
                Liveness::default(),
                Arc::clone(&stats),
            )
            .expect("bind")
        };
        let (used, idle) = (bind(), bind());
        let used_addr = used.local_addr();
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        tasks.spawn(used.run(tasks.clone(), shutdown.clone()));
        tasks.spawn(idle.run(tasks.clone(), shutdown.clone()));
        let mut client = TcpStream::connect(used_addr).await.expect("connect");
        let mut reply = [0u8; 2];
        client.read_exact(&mut reply).await.expect("reply");
        drop(client);
        let listeners = stats.listeners();
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[0].listen, used_addr);
        assert_eq!(listeners[0].protocol, crate::Protocol::Tcp);
        assert_eq!(listeners[0].upstream, ("target", target.to_string()));
        assert_eq!(listeners[0].counts.accepted.load(Relaxed), 1);
        assert_eq!(listeners[0].counts.bytes_to_client.load(Relaxed), 2);
        assert_eq!(listeners[1].counts.accepted.load(Relaxed), 0);
        assert_eq!(stats.accepted.load(Relaxed), 1);
        assert_eq!(stats.bytes_to_client.load(Relaxed), 2);
        shutdown.cancel();
    }
}
