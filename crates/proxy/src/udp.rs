//! The UDP forwarder: one upstream socket per client address, expired after an idle time.
//!
//! The listening socket receives from every client; the first datagram from a new address
//! opens a session (an unbound socket connected to the target) whose task sends the replies
//! back from the listening socket, so the client sees them come from the address it used.
//! Datagrams are never queued and the receive loop never waits on one client: if a socket
//! buffer is full the datagram is dropped, as UDP would drop it anyway.
//!
//! Opening a session never blocks the receive loop. For an IP target the socket is made and
//! the first datagram sent at once (a few syscalls that never wait). A host-name target is resolved for each new
//! session in a task of its own, bounded by the connect timeout, carrying only the client's
//! first datagram; what else that client sends before the name has resolved is dropped. At
//! most [`MAX_OPENING`] sessions per listener resolve at once.
//!
//! Sessions of every UDP listener of the process together stay below [`session_limit`]: half
//! the open-file limit read at bind time, less [`FD_RESERVE`], and never more than
//! [`MAX_SESSIONS`]. A new client past it (or past the shared connection limit) is dropped
//! and counted as rejected, logged at most once a second; the process never runs out of
//! descriptors because of UDP clients.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace, warn};

use crate::link_env::{Host, Target};
use crate::rate_limit::RateLimit;
use crate::{Error, ListenerStats, Permit, Stats};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// UDP sessions of the whole process at most, whatever the open-file limit: each is a socket,
/// a task and a map entry.
pub const MAX_SESSIONS: usize = 65_536;

/// Descriptors never given to UDP sessions: listeners, the member's sockets, stdio, files.
pub const FD_RESERVE: u64 = 64;

/// Sessions of one listener whose target name is being resolved. Each holds its client's
/// first datagram: at most 256 × 64 KiB = 16 MiB.
pub const MAX_OPENING: usize = 256;

thread_local! {
    /// Replies are read into the worker thread's buffer, never into one per session.
    static REPLY_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// UDP sessions allowed under a soft open-file limit of `open_files` (`None`: unlimited).
/// Half of what is left after [`FD_RESERVE`]: the other half is for TCP connections, which
/// take two descriptors each.
pub fn session_limit(open_files: Option<u64>) -> usize {
    match open_files {
        None => MAX_SESSIONS,
        Some(limit) => {
            let half = limit.saturating_sub(FD_RESERVE) / 2;
            usize::try_from(half).map_or(MAX_SESSIONS, |half| half.min(MAX_SESSIONS))
        }
    }
}

/// The soft open-file limit, from `/proc/self/limits` (no `unsafe` for `getrlimit`); `None`
/// if unlimited or unknown.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&limits)
}

/// The soft limit of the `Max open files` row of a `/proc/<pid>/limits` text.
fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let row = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    row.split_whitespace().next()?.parse().ok()
}

/// Turns a target host name and port into the address a new session sends to.
type ResolveFn = dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<SocketAddr>> + Send>>
    + Send
    + Sync;

/// The system resolver, or a test's.
#[derive(Clone)]
struct Resolver(Arc<ResolveFn>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    fn system() -> Self {
        Self(Arc::new(|name, port| Box::pin(resolve(name, port))))
    }
}

/// The first address of `name` (the system resolver: `/etc/hosts`, then DNS).
async fn resolve(name: String, port: u16) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host((name.as_str(), port))
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} has no address"),
            )
        })
}

/// A bound UDP socket and the target its datagrams go to.
#[derive(Debug)]
pub struct UdpForwarder {
    socket: Arc<UdpSocket>,
    local_addr: SocketAddr,
    target: Target,
    idle_timeout: Duration,
    resolve_timeout: Duration,
    /// Sessions of the process this listener may bring the count to ([`session_limit`]).
    session_limit: usize,
    resolver: Resolver,
    stats: Arc<ListenerStats>,
}

struct Session {
    upstream: UdpSocket,
    /// Milliseconds since the forwarder's epoch of the last datagram either way.
    last_active: AtomicU64,
}

/// A client's place in the session map.
enum Entry {
    /// The target's name is being resolved; the client's datagrams are dropped meanwhile.
    Opening,
    Open(Arc<Session>),
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Entry>>>;

/// What the receive loop does with one datagram.
enum Route {
    Send(Arc<Session>),
    Drop,
    New,
}

impl UdpForwarder {
    /// Binds `listen`. Sessions close after `idle_timeout` without traffic; resolving a host
    /// name for a new session may take up to `resolve_timeout`. The session limit is taken
    /// from the open-file limit now.
    pub async fn bind(
        listen: SocketAddr,
        target: Target,
        idle_timeout: Duration,
        resolve_timeout: Duration,
        stats: Arc<Stats>,
    ) -> Result<Self, Error> {
        let bind_error = Error::bind(listen, crate::Protocol::Udp);
        let socket = UdpSocket::bind(listen).await.map_err(bind_error)?;
        let local_addr = socket.local_addr().map_err(bind_error)?;
        let stats = stats.listener(
            local_addr,
            crate::Protocol::Udp,
            ("target", target.to_string()),
        );
        Ok(Self {
            socket: Arc::new(socket),
            local_addr,
            target,
            idle_timeout,
            resolve_timeout,
            session_limit: session_limit(open_files_limit()),
            resolver: Resolver::system(),
            stats,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The most UDP sessions (of every listener of the process) this one opens up to.
    pub fn session_limit(&self) -> usize {
        self.session_limit
    }

    /// Forwards datagrams until `shutdown` is cancelled; session tasks run on `tasks`.
    ///
    /// The loop enters no span (it would be entered and left for every datagram): its lines
    /// name the listener and target themselves.
    pub async fn run(self, tasks: TaskTracker, shutdown: CancellationToken) {
        let (listen, target) = (self.local_addr, &self.target);
        let state = State {
            epoch: Instant::now(),
            sessions: Arc::default(),
            opening: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(RateLimit::per_second()),
            rejections: RateLimit::per_second(),
            tasks,
            shutdown,
        };
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        // Made once: a fresh one per datagram would join and leave the token's waiter list.
        let mut cancelled = std::pin::pin!(state.shutdown.cancelled());
        loop {
            let received = tokio::select! {
                biased;
                () = &mut cancelled => break,
                // Polled, not `recv_from().await`: this loop is the socket's only reader, so
                // tokio's one reader slot serves, and no waiter joins a list per datagram.
                received = std::future::poll_fn(|cx| {
                    let mut filled = tokio::io::ReadBuf::new(&mut buffer);
                    self.socket
                        .poll_recv_from(cx, &mut filled)
                        .map_ok(|client| (filled.filled().len(), client))
                }) => received,
            };
            let (len, client) = match received {
                Ok(received) => received,
                Err(error) => {
                    debug!(%listen, %target, %error, "receive failed");
                    continue;
                }
            };
            let datagram = &buffer[..len];
            match route(client, &state) {
                Route::Send(session) => send_upstream(&session, datagram, client, &self.stats),
                Route::Drop => trace!(%listen, %client, "dropping datagram, session opening"),
                Route::New => self.open(client, datagram, &state),
            }
        }
        info!(%listen, %target, "stopped receiving");
    }

    /// Opens a session for `client` whose first datagram is `datagram`, without waiting: at
    /// once for an IP target, in a task for a host name. Drops the datagram past a limit.
    fn open(&self, client: SocketAddr, datagram: &[u8], state: &State) {
        let opening = match &self.target.host {
            Host::Ip(_) => None,
            Host::Name(_) => match OpeningSlot::acquire(&state.opening) {
                Some(slot) => Some(slot),
                None => {
                    self.reject(client, "too many sessions resolving the target", state);
                    return;
                }
            },
        };
        let Some(slot) = SessionSlot::acquire(&self.stats, self.session_limit) else {
            self.reject(client, "session limit reached", state);
            return;
        };
        let opener = Opener {
            client,
            listener: Arc::clone(&self.socket),
            listen: self.local_addr,
            target: self.target.clone(),
            sessions: Arc::clone(&state.sessions),
            epoch: state.epoch,
            idle_timeout: self.idle_timeout,
            failures: Arc::clone(&state.failures),
            stats: Arc::clone(&self.stats),
        };
        match &self.target.host {
            Host::Ip(ip) => {
                let addr = SocketAddr::new(*ip, self.target.port);
                if let Some(replies) = opener.connect(addr, datagram) {
                    state.tasks.spawn(replies.run(state.shutdown.clone(), slot));
                }
            }
            Host::Name(name) => {
                state
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(client, Entry::Opening);
                let resolving = (self.resolver.0)(name.clone(), self.target.port);
                let (timeout, shutdown) = (self.resolve_timeout, state.shutdown.clone());
                let datagram = datagram.to_vec();
                state.tasks.spawn(async move {
                    let resolved = tokio::select! {
                        () = shutdown.cancelled() => None,
                        resolved = tokio::time::timeout(timeout, resolving) => Some(resolved),
                    };
                    drop(opening);
                    let resolved = match resolved {
                        None => {
                            opener.forget();
                            return;
                        }
                        Some(Ok(resolved)) => resolved,
                        Some(Err(_)) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "resolving timed out",
                        )),
                    };
                    let replies = match resolved {
                        Ok(addr) => opener.connect(addr, &datagram),
                        Err(error) => {
                            opener.failed(&error);
                            None
                        }
                    };
                    drop(datagram);
                    if let Some(replies) = replies {
                        replies.run(shutdown, slot).await;
                    }
                });
            }
        }
    }

    fn reject(&self, client: SocketAddr, reason: &'static str, state: &State) {
        self.stats.rejected();
        if let Some(suppressed) = state.rejections.allow() {
            warn!(
                listen = %self.local_addr,
                target = %self.target,
                %client,
                reason,
                limit = self.session_limit,
                suppressed,
                "dropping a new udp client"
            );
        }
    }
}

/// The session of `client`, touched, if it has one.
fn route(client: SocketAddr, state: &State) -> Route {
    let map = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
    match map.get(&client) {
        Some(Entry::Open(session)) => {
            // Touched under the lock, so expiry (also under the lock) sees it.
            let now_ms = state.epoch.elapsed().as_millis() as u64;
            session.last_active.store(now_ms, Ordering::Relaxed);
            Route::Send(Arc::clone(session))
        }
        Some(Entry::Opening) => Route::Drop,
        None => Route::New,
    }
}

/// Sends one datagram on the session's socket, or drops it if the socket buffer is full.
fn send_upstream(session: &Session, datagram: &[u8], client: SocketAddr, stats: &ListenerStats) {
    // A direct syscall: tokio's `try_send` would refuse until the reactor has seen a new socket
    // writable, dropping the datagrams that follow a session's first.
    match socket2::SockRef::from(&session.upstream).send(datagram) {
        Ok(sent) => stats.to_upstream(sent as u64),
        Err(error) => debug!(%client, %error, "dropping datagram to upstream"),
    }
}

/// What the receive loop keeps across datagrams.
struct State {
    epoch: Instant,
    sessions: Sessions,
    /// Sessions of this listener resolving the target ([`MAX_OPENING`]).
    opening: Arc<AtomicUsize>,
    failures: Arc<RateLimit>,
    rejections: RateLimit,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// One session under the process's UDP session limit and the shared connection limit,
/// released on drop.
struct SessionSlot {
    _permit: Permit,
    stats: Arc<Stats>,
}

impl SessionSlot {
    fn acquire(listener: &Arc<ListenerStats>, limit: usize) -> Option<Self> {
        let stats = listener.total();
        if stats.udp_sessions.fetch_add(1, Ordering::AcqRel) >= limit {
            stats.udp_sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let Some(permit) = listener.try_acquire() else {
            stats.udp_sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        Some(Self {
            _permit: permit,
            stats: Arc::clone(stats),
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.stats.udp_sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One session resolving its target, under [`MAX_OPENING`], released on drop.
struct OpeningSlot(Arc<AtomicUsize>);

impl OpeningSlot {
    fn acquire(opening: &Arc<AtomicUsize>) -> Option<Self> {
        if opening.fetch_add(1, Ordering::AcqRel) >= MAX_OPENING {
            opening.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Arc::clone(opening)))
    }
}

impl Drop for OpeningSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Everything needed to open one client's session once the target's address is known.
struct Opener {
    client: SocketAddr,
    listener: Arc<UdpSocket>,
    listen: SocketAddr,
    target: Target,
    sessions: Sessions,
    epoch: Instant,
    idle_timeout: Duration,
    failures: Arc<RateLimit>,
    stats: Arc<ListenerStats>,
}

impl Opener {
    /// Makes the session's socket, sends the first datagram and enters the session in the
    /// map; the returned reply path must then run. `None` (logged) if no socket could be made.
    fn connect(self, addr: SocketAddr, first: &[u8]) -> Option<Replies> {
        let upstream = match connected_socket(addr) {
            Ok(upstream) => upstream,
            Err(error) => {
                self.failed(&error);
                return None;
            }
        };
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let session = Arc::new(Session {
            upstream,
            last_active: AtomicU64::new(now_ms),
        });
        send_upstream(&session, first, self.client, &self.stats);
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.client, Entry::Open(Arc::clone(&session)));
        debug!(listen = %self.listen, client = %self.client, "session opened");
        Some(Replies {
            session,
            client: self.client,
            listener: self.listener,
            sessions: self.sessions,
            epoch: self.epoch,
            idle_timeout: self.idle_timeout,
            stats: self.stats,
        })
    }

    /// Logs (rate-limited) and counts an upstream that could not be reached.
    fn failed(self, error: &std::io::Error) {
        self.stats.upstream_failed();
        if let Some(suppressed) = self.failures.allow() {
            warn!(
                listen = %self.listen,
                target = %self.target,
                %error,
                suppressed,
                "upstream unavailable, dropping datagram"
            );
        }
        self.forget();
    }

    /// Removes the client's `Opening` entry, so its next datagram tries again.
    fn forget(self) {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(map.get(&self.client), Some(Entry::Opening)) {
            map.remove(&self.client);
        }
    }
}

/// An unbound socket of `addr`'s family, connected to it (syscalls that never wait).
fn connected_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let unspecified = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// One session's reply path: upstream → listening socket → client.
struct Replies {
    session: Arc<Session>,
    client: SocketAddr,
    listener: Arc<UdpSocket>,
    sessions: Sessions,
    epoch: Instant,
    idle_timeout: Duration,
    stats: Arc<ListenerStats>,
}

impl Replies {
    /// Sends the upstream's replies to the client until the session is idle for the idle
    /// timeout or `shutdown` is cancelled.
    async fn run(self, shutdown: CancellationToken, slot: SessionSlot) {
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let deadline = || {
            let last = self.session.last_active.load(Ordering::Relaxed);
            self.epoch + Duration::from_millis(last + idle_ms)
        };
        // One timer for the session's life, re-armed only when it fires (traffic moves the
        // deadline, checked then), and one cancellation future: nothing per datagram.
        let mut idle = std::pin::pin!(tokio::time::sleep_until(deadline()));
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        loop {
            tokio::select! {
                () = &mut cancelled => break,
                () = &mut idle => {
                    if self.expire_if_idle(idle_ms) {
                        break;
                    }
                    idle.as_mut().reset(deadline());
                }
                // The session's socket has one reader, this task: polled like the listener.
                readable = std::future::poll_fn(|cx| self.session.upstream.poll_recv_ready(cx)) => {
                    if readable.is_err() {
                        continue;
                    }
                    if let Some(reply) = self.forward_ready_replies() {
                        match self.listener.send_to(&reply, self.client).await {
                            Ok(sent) => self.count_reply(sent),
                            Err(error) => debug!(client = %self.client, %error, "dropping reply"),
                        }
                    }
                }
            }
        }
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        remove_if_same(&mut map, self.client, &self.session);
        drop(slot);
    }

    fn count_reply(&self, sent: usize) {
        self.stats.to_client(sent as u64);
    }

    /// Removes the session if it is still idle (checked under the lock the receive loop
    /// touches it under).
    fn expire_if_idle(&self, idle_ms: u64) -> bool {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.session.last_active.load(Ordering::Relaxed) + idle_ms {
            return false;
        }
        remove_if_same(&mut map, self.client, &self.session);
        debug!(client = %self.client, "session expired");
        true
    }

    /// Sends every reply waiting on the upstream socket; returns one that could not be sent
    /// yet (the listening socket not known writable), for the caller to await.
    fn forward_ready_replies(&self) -> Option<Vec<u8>> {
        let client = self.client;
        REPLY_BUFFER.with_borrow_mut(|buffer| loop {
            match self.session.upstream.try_recv(buffer) {
                Ok(len) => {
                    let now_ms = self.epoch.elapsed().as_millis() as u64;
                    self.session.last_active.store(now_ms, Ordering::Relaxed);
                    match self.listener.try_send_to(&buffer[..len], client) {
                        Ok(sent) => self.count_reply(sent),
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            return Some(buffer[..len].to_vec());
                        }
                        Err(error) => debug!(%client, %error, "dropping reply"),
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return None,
                // e.g. ECONNREFUSED after an ICMP port unreachable: nothing to deliver.
                Err(error) => {
                    debug!(%client, %error, "upstream receive failed");
                    return None;
                }
            }
        })
    }
}

/// Removes `client`'s entry only if it is still `session` (a new one may have replaced it).
fn remove_if_same(
    map: &mut HashMap<SocketAddr, Entry>,
    client: SocketAddr,
    session: &Arc<Session>,
) {
    if matches!(map.get(&client), Some(Entry::Open(current)) if Arc::ptr_eq(current, session)) {
        map.remove(&client);
    }
}

#[cfg(test)]
mod tests;
