//! Both directions of one forwarded TCP connection, driven by one small future.
//!
//! Each direction is a [`Pump`]: read from one socket, write to the other, never reading more
//! until what was read has been written (backpressure, bounded memory). Small messages are read
//! into a buffer on the stack and written at once (a short read also tells that the socket is
//! drained, so a request costs two syscalls); a read that fills the buffer starts a bulk burst,
//! which on Linux moves with `splice(2)` through a pooled pipe until the source runs dry. Only
//! bytes the destination cannot take at once wait in a heap buffer, and a pipe is held only while
//! a burst moves: an idle connection owns two sockets and a few words of state, nothing else.
//!
//! End of stream on one side becomes a `shutdown(SHUT_WR)` on the other (half-close), and the
//! reverse direction keeps flowing until it ends too. An error on either side ends the
//! connection and resets both sockets, so a reset propagates.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use std::mem::MaybeUninit;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use crate::splice::{self, Pipe};
use crate::ListenerStats;

/// Size of the stack buffer that small reads go through; a read that fills it starts a splice.
const STACK_BUFFER: usize = 16 * 1024;

/// Which side of a forwarded connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client that connected to the proxy.
    Client,
    /// The upstream (the forward's target).
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
        })
    }
}

/// A forwarded connection ended with an I/O error (typically a reset) on `side`.
#[derive(Debug, thiserror::Error)]
#[error("{side}: {source}")]
pub struct CopyError {
    /// The side whose socket failed.
    pub side: Side,
    /// The error.
    #[source]
    pub source: io::Error,
}

/// Bytes moved by a connection that ended cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Client → upstream.
    pub(crate) client_to_upstream: u64,
    /// Upstream → client.
    pub(crate) upstream_to_client: u64,
}

/// Forwards `client` ⇄ `upstream` until both directions have ended, or one fails. Bytes are
/// added to `stats` as they move (not at the end), so `/metrics` sees long transfers progress.
/// The sockets stay open until the `Duplex` is dropped.
fn duplex(client: TcpStream, upstream: TcpStream, stats: Option<Arc<ListenerStats>>) -> Duplex {
    Duplex {
        client,
        upstream,
        to_upstream: Pump::new(),
        to_client: Pump::new(),
        stats,
        closes_after: false,
    }
}

/// Forwards until both directions end, for a caller that drops the sockets (the `Duplex`) as
/// soon as it completes; on an error, resets both sockets (`SO_LINGER` 0) so the peer of the
/// healthy side sees the reset too.
pub(crate) fn forward(client: TcpStream, upstream: TcpStream, stats: Arc<ListenerStats>) -> Duplex {
    Duplex {
        closes_after: true,
        ..duplex(client, upstream, Some(stats))
    }
}

/// Both directions of one connection: the future returned by [`duplex`] and [`forward`]. It
/// owns everything a connection needs while it forwards (two sockets, two pumps, a counter):
/// about 200 bytes, which is most of what an idle connection costs the proxy.
pub(crate) struct Duplex {
    client: TcpStream,
    upstream: TcpStream,
    to_upstream: Pump,
    to_client: Pump,
    stats: Option<Arc<ListenerStats>>,
    /// The sockets are closed as soon as this future completes (as [`forward`] does): the last
    /// direction to end skips its `shutdown`, since the close sends the same FIN (its socket was
    /// read to end of stream, so nothing unread turns the close into a reset).
    closes_after: bool,
}

impl Future for Duplex {
    type Output = Result<Totals, CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let before = (this.to_upstream.bytes, this.to_client.bytes);
        let result = this.poll_pumps(cx);
        if let Some(stats) = &this.stats {
            let moved_up = this.to_upstream.bytes - before.0;
            let moved_down = this.to_client.bytes - before.1;
            if moved_up > 0 {
                stats.to_upstream(moved_up);
            }
            if moved_down > 0 {
                stats.to_client(moved_down);
            }
        }
        if let Poll::Ready(Err(_)) = &result {
            let _ = this.client.set_zero_linger();
            let _ = this.upstream.set_zero_linger();
        }
        result
    }
}

impl Duplex {
    fn poll_pumps(&mut self, cx: &mut Context<'_>) -> Poll<Result<Totals, CopyError>> {
        let this = self;
        this.to_upstream.last = this.closes_after && this.to_client.done;
        this.to_client.last = this.closes_after && this.to_upstream.done;
        if !this.to_upstream.done {
            if let Poll::Ready(Err(error)) = this.to_upstream.poll(
                cx,
                &mut this.client,
                &mut this.upstream,
                Side::Client,
                Side::Upstream,
            ) {
                return Poll::Ready(Err(error));
            }
        }
        if !this.to_client.done {
            if let Poll::Ready(Err(error)) = this.to_client.poll(
                cx,
                &mut this.upstream,
                &mut this.client,
                Side::Upstream,
                Side::Client,
            ) {
                return Poll::Ready(Err(error));
            }
        }
        if this.to_upstream.done && this.to_client.done {
            Poll::Ready(Ok(Totals {
                client_to_upstream: this.to_upstream.bytes,
                upstream_to_client: this.to_client.bytes,
            }))
        } else {
            Poll::Pending
        }
    }
}

/// Where the bytes of one direction are while in flight.
enum Stage {
    /// Reads go through a buffer on the stack and are written at once: two syscalls per message,
    /// and a short read tells the socket is drained without a third. Only bytes the destination
    /// could not take at once wait in a heap buffer, `[start..]` of it still to write, held
    /// until they are written.
    Copy {
        pending: Option<Box<[u8]>>,
        start: usize,
    },
    /// `splice(2)` through a pipe, for bulk: entered when a read fills the whole stack buffer,
    /// left (the empty pipe back to the pool) when the source has nothing more to read.
    #[cfg(target_os = "linux")]
    Splice { pipe: Option<Pipe>, len: usize },
}

/// One direction of a connection: read `src`, write `dst`, then shut `dst`'s write side.
struct Pump {
    stage: Stage,
    /// Whether bulk bursts may move with `splice(2)` (false once the kernel refused it).
    splice: bool,
    eof: bool,
    done: bool,
    bytes: u64,
    /// Of `bytes`, those that moved through a pipe.
    spliced: u64,
    /// The other direction has ended and the sockets close when this one ends: no `shutdown`.
    last: bool,
}

impl Pump {
    fn new() -> Self {
        Self {
            stage: Stage::COPY,
            splice: cfg!(target_os = "linux"),
            eof: false,
            done: false,
            bytes: 0,
            spliced: 0,
            last: false,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Poll<Result<(), CopyError>> {
        let mut ends = Ends {
            src,
            dst,
            src_side,
            dst_side,
        };
        // Each step moves bytes, changes stage, or finishes (`done`).
        while !self.done {
            let step = match self.stage {
                #[cfg(target_os = "linux")]
                Stage::Splice { .. } => self.splice_step(cx, &mut ends),
                Stage::Copy { .. } => self.copy_step(cx, &mut ends),
            };
            ready!(step)?;
        }
        Poll::Ready(Ok(()))
    }

    /// A step of a splice burst: empty the pipe into `dst`, refill it from `src`, or end.
    #[cfg(target_os = "linux")]
    fn splice_step(&mut self, cx: &mut Context<'_>, ends: &mut Ends<'_>) -> Step {
        let Stage::Splice { pipe, len } = &mut self.stage else {
            unreachable!("splice_step runs in the splice stage")
        };
        if *len > 0 {
            let n =
                ready!(drain_pipe(cx, pipe, *len, ends.dst)).map_err(|e| ends.write_error(e))?;
            *len -= n;
            self.bytes += n as u64;
            self.spliced += n as u64;
            return Poll::Ready(Ok(()));
        }
        if self.eof {
            // Empty: back to the pool for the next connection.
            give_back(pipe);
            return self.finish(cx, ends.dst).map_err(|e| ends.write_error(e));
        }
        let Poll::Ready(readiness) = ends.src.poll_read_ready(cx) else {
            // Idle: the (empty) pipe goes back to the pool, and the next burst starts with a
            // plain read (a small message is cheaper copied).
            give_back(pipe);
            self.stage = Stage::COPY;
            return Poll::Pending;
        };
        readiness.map_err(|e| ends.read_error(e))?;
        self.fill_pipe(ends.src).map_err(|e| ends.read_error(e))?;
        Poll::Ready(Ok(()))
    }

    /// Splices what `src` has into the pipe, taking one from the pool if none is held; back to
    /// copying when no pipe can be had or the kernel refuses.
    #[cfg(target_os = "linux")]
    fn fill_pipe(&mut self, src: &TcpStream) -> io::Result<()> {
        let Stage::Splice { pipe, len } = &mut self.stage else {
            unreachable!("fill_pipe runs in the splice stage")
        };
        let held = match pipe {
            Some(held) => held,
            None => match Pipe::take() {
                Ok(taken) => pipe.insert(taken),
                Err(error) => {
                    tracing::debug!(%error, "no pipe, copying through a buffer");
                    self.stage = Stage::COPY;
                    return Ok(());
                }
            },
        };
        match src.try_io(Interest::READABLE, || {
            held.fill_from(fd(src), splice::CHUNK)
        }) {
            Ok(0) => self.eof = true,
            Ok(n) => *len = n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if splice::unsupported(&error) => {
                tracing::debug!(%error, "splice refused, copying through a buffer");
                give_back(pipe);
                self.splice = false;
                self.stage = Stage::COPY;
            }
            Err(error) => return Err(error),
        }
        Ok(())
    }

    /// A step of copying: write what is pending, or read a message and write it at once.
    fn copy_step(&mut self, cx: &mut Context<'_>, ends: &mut Ends<'_>) -> Step {
        let Stage::Copy { pending, start } = &mut self.stage else {
            unreachable!("copy_step runs in the copy stage")
        };
        if let Some(held) = pending {
            let n = ready!(Pin::new(&mut *ends.dst).poll_write(cx, &held[*start..]))
                .map_err(|e| ends.write_error(e))?;
            if n == 0 {
                return Poll::Ready(Err(ends.write_error(io::ErrorKind::WriteZero.into())));
            }
            *start += n;
            self.bytes += n as u64;
            if *start == held.len() {
                self.stage = Stage::COPY;
            }
            return Poll::Ready(Ok(()));
        }
        if self.eof {
            return self.finish(cx, ends.dst).map_err(|e| ends.write_error(e));
        }
        self.copy_message(cx, ends)
    }

    /// Reads into a buffer on the stack and writes it at once; what `dst` cannot take waits on
    /// the heap, and a read that fills the buffer starts a splice burst.
    fn copy_message(&mut self, cx: &mut Context<'_>, ends: &mut Ends<'_>) -> Step {
        let mut stack = [MaybeUninit::<u8>::uninit(); STACK_BUFFER];
        let mut buf = ReadBuf::uninit(&mut stack);
        // A read shorter than the buffer marks the socket drained (tokio clears its readiness),
        // so an idle direction costs no extra EAGAIN read.
        ready!(Pin::new(&mut *ends.src).poll_read(cx, &mut buf)).map_err(|e| ends.read_error(e))?;
        let read = buf.filled();
        if read.is_empty() {
            self.eof = true;
            return Poll::Ready(Ok(()));
        }
        let written = write_now(cx, ends.dst, read).map_err(|e| ends.write_error(e))?;
        self.bytes += written as u64;
        if written < read.len() {
            // The destination is full: keep the rest (backpressure: nothing more is read until
            // it is written).
            self.stage = Stage::Copy {
                pending: Some(read[written..].into()),
                start: 0,
            };
            return Poll::Ready(Ok(()));
        }
        #[cfg(target_os = "linux")]
        if self.splice && read.len() == STACK_BUFFER {
            // A full buffer: a bulk burst, which splice moves without copying.
            self.stage = Stage::Splice { pipe: None, len: 0 };
        }
        Poll::Ready(Ok(()))
    }

    /// The source ended and everything was written: pass the FIN on.
    fn finish(&mut self, cx: &mut Context<'_>, dst: &mut TcpStream) -> Poll<io::Result<()>> {
        if self.last {
            self.done = true;
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(dst).poll_shutdown(cx)) {
            // The peer may already be gone entirely; the other direction will tell.
            Ok(()) | Err(_) => {}
        }
        self.done = true;
        Poll::Ready(Ok(()))
    }
}

impl Stage {
    const COPY: Self = Self::Copy {
        pending: None,
        start: 0,
    };
}

/// What a step of [`Pump::poll`] returns: ready when it moved bytes, changed stage or
/// finished (`done`), so the loop goes on.
type Step = Poll<Result<(), CopyError>>;

/// The two sockets of one direction, with the side each is (to name the one that failed).
struct Ends<'a> {
    src: &'a mut TcpStream,
    dst: &'a mut TcpStream,
    src_side: Side,
    dst_side: Side,
}

impl Ends<'_> {
    fn read_error(&self, source: io::Error) -> CopyError {
        CopyError {
            side: self.src_side,
            source,
        }
    }

    fn write_error(&self, source: io::Error) -> CopyError {
        CopyError {
            side: self.dst_side,
            source,
        }
    }
}

/// Writes as much of `bytes` as `dst` takes without waiting: how many it took.
fn write_now(cx: &mut Context<'_>, dst: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match Pin::new(&mut *dst).poll_write(cx, &bytes[written..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

/// Splices up to `len` bytes from the pipe into `dst`: how many moved (0 if it was not
/// writable after all).
#[cfg(target_os = "linux")]
fn drain_pipe(
    cx: &mut Context<'_>,
    pipe: &Option<Pipe>,
    len: usize,
    dst: &TcpStream,
) -> Poll<io::Result<usize>> {
    ready!(dst.poll_write_ready(cx))?;
    let held = pipe.as_ref().expect("bytes in flight imply a pipe");
    match dst.try_io(Interest::WRITABLE, || held.drain_to(fd(dst), len)) {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(0)),
        moved => Poll::Ready(moved),
    }
}

/// An empty pipe back to the pool, for the next burst or connection.
#[cfg(target_os = "linux")]
fn give_back(pipe: &mut Option<Pipe>) {
    if let Some(pipe) = pipe.take() {
        pipe.give_back();
    }
}

#[cfg(target_os = "linux")]
fn fd(stream: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    stream.as_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// One listener's counters (and so its process's totals).
    fn listener_stats() -> Arc<ListenerStats> {
        let listen = "127.0.0.1:1".parse().expect("address");
        let target = ("target", "127.0.0.1:2".to_owned());
        Arc::new(crate::Stats::new(1)).listener(listen, crate::Protocol::Tcp, target)
    }

    /// Two connected sockets: (the outside end, the proxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let outside = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (inside, _) = listener.accept().await.expect("accept");
        (outside, inside)
    }

    impl Pump {
        fn buffered() -> Self {
            Self {
                splice: false,
                ..Self::new()
            }
        }

        fn holds_nothing(&self) -> bool {
            match &self.stage {
                #[cfg(target_os = "linux")]
                Stage::Splice { pipe, .. } => pipe.is_none(),
                Stage::Copy { pending, .. } => pending.is_none(),
            }
        }
    }

    /// Sends `request` from the client, half-closes, and has the upstream answer with `reply`
    /// after the FIN; checks both arrive whole. Returns the bytes spliced each way.
    async fn exchange(buffered: bool) -> (u64, u64) {
        let (mut client, client_inside) = pair().await;
        let (upstream_inside, mut upstream) = pair().await;
        let stats = listener_stats();
        let mut duplex = duplex(client_inside, upstream_inside, Some(Arc::clone(&stats)));
        if buffered {
            duplex.to_upstream = Pump::buffered();
            duplex.to_client = Pump::buffered();
        }
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let reply: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let (expected_request, expected_reply) = (request.clone(), reply.clone());
        let client_side = async move {
            client.write_all(&request).await.expect("client write");
            client.shutdown().await.expect("client half-close");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("client read");
            got
        };
        let upstream_side = async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.expect("upstream read");
            upstream.write_all(&reply).await.expect("upstream write");
            upstream.shutdown().await.expect("upstream close");
            got
        };
        let (totals, got_reply, got_request) =
            tokio::join!(&mut duplex, client_side, upstream_side);
        let totals = totals.expect("clean end");
        assert_eq!(got_request.len(), expected_request.len());
        assert!(got_request == expected_request);
        assert!(got_reply == expected_reply);
        assert_eq!(totals.client_to_upstream, expected_request.len() as u64);
        assert_eq!(totals.upstream_to_client, expected_reply.len() as u64);
        let spliced = (duplex.to_upstream.spliced, duplex.to_client.spliced);
        drop(duplex);
        assert_eq!(
            stats.counts.bytes_to_upstream.load(Ordering::Relaxed),
            totals.client_to_upstream
        );
        assert_eq!(
            stats.counts.bytes_to_client.load(Ordering::Relaxed),
            totals.upstream_to_client
        );
        spliced
    }

    #[tokio::test]
    async fn spliced_exchange_with_half_close() {
        let (up, down) = exchange(false).await;
        // Bulk bursts move through pipes (on Linux); only each burst's first read is copied.
        if cfg!(target_os = "linux") {
            assert!(
                up > 1_000_000 && down > 1_000_000,
                "spliced {up} and {down}"
            );
        }
    }

    #[tokio::test]
    async fn buffered_exchange_with_half_close() {
        assert_eq!(exchange(true).await, (0, 0));
    }

    #[tokio::test]
    async fn forward_ends_both_sides_cleanly_when_the_last_direction_skips_shutdown() {
        let (mut client, client_inside) = pair().await;
        let (upstream_inside, mut upstream) = pair().await;
        let stats = listener_stats();
        let counted = Arc::clone(&stats);
        let forwarding = tokio::spawn(forward(client_inside, upstream_inside, counted));
        client.write_all(b"request").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut request = Vec::new();
        upstream.read_to_end(&mut request).await.expect("read");
        assert_eq!(request, b"request");
        upstream.write_all(b"reply").await.expect("write");
        upstream.shutdown().await.expect("close");
        // The reply, then a clean end of stream (a FIN from the close, not a reset).
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("clean end");
        assert_eq!(reply, b"reply");
        let totals = forwarding.await.expect("task").expect("clean end");
        assert_eq!(
            (totals.client_to_upstream, totals.upstream_to_client),
            (7, 5)
        );
        assert_eq!(stats.counts.bytes_to_upstream.load(Ordering::Relaxed), 7);
        assert_eq!(stats.total().bytes_to_upstream.load(Ordering::Relaxed), 7);
    }

    #[tokio::test]
    async fn small_messages_are_copied_not_spliced() {
        let (mut client, client_inside) = pair().await;
        let (upstream_inside, mut upstream) = pair().await;
        let mut duplex = duplex(client_inside, upstream_inside, None);
        for round in 0..20u8 {
            let request = [round; 64];
            client.write_all(&request).await.expect("write");
            let mut got = [0u8; 64];
            tokio::select! {
                result = &mut duplex => panic!("ended early: {:?}", result.err()),
                read = upstream.read_exact(&mut got) => { read.expect("read"); }
            }
            assert_eq!(got, request);
        }
        assert_eq!(duplex.to_upstream.bytes, 20 * 64);
        assert_eq!(duplex.to_upstream.spliced, 0);
        assert!(duplex.to_upstream.holds_nothing());
    }

    #[tokio::test]
    async fn idle_directions_hold_no_pipe_or_buffer() {
        for buffered in [false, true] {
            let (mut client, client_inside) = pair().await;
            let (upstream_inside, mut upstream) = pair().await;
            let mut duplex = duplex(client_inside, upstream_inside, None);
            if buffered {
                duplex.to_upstream = Pump::buffered();
                duplex.to_client = Pump::buffered();
            }
            client.write_all(b"hello").await.expect("write");
            let mut hello = [0u8; 5];
            tokio::select! {
                result = &mut duplex => panic!("ended early: {:?}", result.err()),
                read = upstream.read_exact(&mut hello) => { read.expect("read"); }
            }
            assert_eq!(&hello, b"hello");
            assert!(duplex.to_upstream.holds_nothing(), "buffered: {buffered}");
            assert!(duplex.to_client.holds_nothing(), "buffered: {buffered}");
        }
    }

    #[tokio::test]
    async fn finished_directions_return_their_pipe() {
        let (mut client, client_inside) = pair().await;
        let (upstream_inside, mut upstream) = pair().await;
        let mut duplex = duplex(client_inside, upstream_inside, None);
        client.write_all(b"request").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut request = Vec::new();
        tokio::select! {
            result = &mut duplex => panic!("ended early: {:?}", result.err()),
            read = upstream.read_to_end(&mut request) => { read.expect("read"); }
        }
        assert_eq!(request, b"request");
        assert!(duplex.to_upstream.done);
        assert!(duplex.to_upstream.holds_nothing());
    }

    #[tokio::test]
    async fn a_reset_ends_the_connection_naming_the_side() {
        let (client, client_inside) = pair().await;
        let (upstream_inside, upstream) = pair().await;
        upstream.set_zero_linger().expect("linger");
        drop(upstream);
        let error = duplex(client_inside, upstream_inside, None)
            .await
            .expect_err("the upstream reset");
        assert_eq!(error.side, Side::Upstream, "{error}");
        drop(client);
    }
}
