//! The UDP forwarder: one upstream socket per client address, expired after an idle time.
//!
//! The listening socket receives from every client; the first datagram from a new address
//! opens a session (an unbound socket connected to the target) whose task sends the replies
//! back from the listening socket, so the client sees them come from the address it used.
//! Datagrams are never queued: if a socket buffer is full the datagram is dropped, as UDP
//! would drop it anyway. A host-name target is resolved when a session opens; the receive loop
//! waits for that lookup, bounded by the connect timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::link_env::{Host, Target};
use crate::tcp::RateLimit;
use crate::{Error, Permit, Stats};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

thread_local! {
    /// Replies are read into the worker thread's buffer, never into one per session.
    static REPLY_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// A bound UDP socket and the target its datagrams go to.
#[derive(Debug)]
pub struct UdpForwarder {
    socket: Arc<UdpSocket>,
    local_addr: SocketAddr,
    target: Target,
    idle_timeout: Duration,
    resolve_timeout: Duration,
    stats: Arc<Stats>,
}

struct Session {
    upstream: UdpSocket,
    /// Milliseconds since the forwarder's epoch of the last datagram either way.
    last_active: AtomicU64,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

impl UdpForwarder {
    /// Binds `listen`. Sessions close after `idle_timeout` without traffic; resolving a host
    /// name for a new session may take up to `resolve_timeout`.
    pub async fn bind(
        listen: SocketAddr,
        target: Target,
        idle_timeout: Duration,
        resolve_timeout: Duration,
        stats: Arc<Stats>,
    ) -> Result<Self, Error> {
        let bind_error = |source| Error::Bind {
            addr: listen,
            protocol: crate::Protocol::Udp,
            source,
        };
        let socket = UdpSocket::bind(listen).await.map_err(bind_error)?;
        let local_addr = socket.local_addr().map_err(bind_error)?;
        Ok(Self {
            socket: Arc::new(socket),
            local_addr,
            target,
            idle_timeout,
            resolve_timeout,
            stats,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
            failures: RateLimit::per_second(),
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
            let Some(session) = self.session_for(client, &state).await else {
                continue;
            };
            // A new socket is not known to be writable until the reactor says so: wait for
            // that instead of dropping the first datagram of every session.
            match session.upstream.send(&buffer[..len]).await {
                Ok(sent) => {
                    self.stats
                        .bytes_to_upstream
                        .fetch_add(sent as u64, Ordering::Relaxed);
                }
                Err(error) => {
                    debug!(%listen, %target, %client, %error, "dropping datagram to upstream")
                }
            }
        }
        info!(%listen, %target, "stopped receiving");
    }

    /// The session of `client`, touched; or a new one; or `None` (limit reached, upstream
    /// unavailable) and the datagram is dropped.
    async fn session_for(&self, client: SocketAddr, state: &State) -> Option<Arc<Session>> {
        let now_ms = state.epoch.elapsed().as_millis() as u64;
        {
            let map = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(session) = map.get(&client) {
                // Touched under the lock, so expiry (also under the lock) sees it.
                session.last_active.store(now_ms, Ordering::Relaxed);
                return Some(Arc::clone(session));
            }
        }
        let Some(permit) = self.stats.try_acquire() else {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let upstream = match open_upstream(&self.target, self.resolve_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = state.failures.allow() {
                    warn!(
                        listen = %self.local_addr,
                        target = %self.target,
                        %error,
                        suppressed,
                        "upstream unavailable, dropping datagram"
                    );
                }
                return None;
            }
        };
        let session = Arc::new(Session {
            upstream,
            last_active: AtomicU64::new(now_ms),
        });
        state
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, Arc::clone(&session));
        debug!(listen = %self.local_addr, %client, "session opened");
        let replies = Replies {
            session: Arc::clone(&session),
            client,
            listener: Arc::clone(&self.socket),
            sessions: Arc::clone(&state.sessions),
            epoch: state.epoch,
            idle_timeout: self.idle_timeout,
            stats: Arc::clone(&self.stats),
        };
        state
            .tasks
            .spawn(replies.run(state.shutdown.clone(), permit));
        Some(session)
    }
}

/// What the receive loop keeps across datagrams.
struct State {
    epoch: Instant,
    sessions: Sessions,
    failures: RateLimit,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// An unbound socket of the target's family, connected to the target (resolved now).
async fn open_upstream(target: &Target, timeout: Duration) -> std::io::Result<UdpSocket> {
    let addr = match &target.host {
        Host::Ip(ip) => SocketAddr::new(*ip, target.port),
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            tokio::time::timeout(timeout, lookup)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "resolving timed out")
                })??
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{name} has no address"),
                    )
                })?
        }
    };
    let unspecified = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// One session's reply path: upstream → listening socket → client.
struct Replies {
    session: Arc<Session>,
    client: SocketAddr,
    listener: Arc<UdpSocket>,
    sessions: Sessions,
    epoch: Instant,
    idle_timeout: Duration,
    stats: Arc<Stats>,
}

impl Replies {
    /// Sends the upstream's replies to the client until the session is idle for the idle
    /// timeout or `shutdown` is cancelled.
    async fn run(self, shutdown: CancellationToken, permit: Permit) {
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
        drop(permit);
    }

    fn count_reply(&self, sent: usize) {
        self.stats
            .bytes_to_client
            .fetch_add(sent as u64, Ordering::Relaxed);
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
    map: &mut HashMap<SocketAddr, Arc<Session>>,
    client: SocketAddr,
    session: &Arc<Session>,
) {
    if map
        .get(&client)
        .is_some_and(|current| Arc::ptr_eq(current, session))
    {
        map.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_env::Host;

    #[tokio::test]
    async fn sessions_route_replies_and_expire_when_idle() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let target = Target {
            host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: upstream.local_addr().expect("addr").port(),
        };
        tokio::spawn(async move {
            let mut buffer = [0u8; 1500];
            while let Ok((n, from)) = upstream.recv_from(&mut buffer).await {
                let _ = upstream.send_to(&buffer[..n], from).await;
            }
        });
        let stats = Arc::new(Stats::new(10));
        let forwarder = UdpForwarder::bind(
            "127.0.0.1:0".parse().expect("addr"),
            target,
            Duration::from_millis(200),
            Duration::from_secs(5),
            Arc::clone(&stats),
        )
        .await
        .expect("bind");
        let listen = forwarder.local_addr();
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        tasks.spawn(forwarder.run(tasks.clone(), shutdown.clone()));

        let mut clients = Vec::new();
        for index in 0..2u8 {
            let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            client.connect(listen).await.expect("connect");
            client.send(&[index; 3]).await.expect("send");
            let mut buffer = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buffer))
                .await
                .expect("a reply")
                .expect("recv");
            assert_eq!(&buffer[..n], &[index; 3]);
            clients.push(client);
        }
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 2);
        assert_eq!(stats.bytes_to_upstream.load(Ordering::Relaxed), 6);
        assert_eq!(stats.bytes_to_client.load(Ordering::Relaxed), 6);
        // Both sessions expire after 200 ms without traffic.
        tokio::time::timeout(Duration::from_secs(10), async {
            while stats.active.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("idle sessions expire");
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
