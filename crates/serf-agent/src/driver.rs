//! The tokio driver of a sans-IO [`Core`]: one UDP socket and one TCP listener on the same
//! `ip:port`, the core's timer, and one task per TCP stream. Everything protocol-wise happens in
//! the core; this module only moves bytes and time (read once per input and passed in).
//!
//! Two cores run on it: a whole Serf member ([`serf::serf::Serf`], what the agent runs, see
//! [`crate::member`]) and a bare memberlist with a [`Delegate`] ([`Gossip`], [`start`]).
//! [`spawn`] binds the sockets, spawns the loop and returns a [`Handle`] (commands) and an
//! event receiver. The loop owns the core; it handles a closed set of inputs: a command, a UDP
//! datagram, an accepted connection, a stream's bytes/EOF/failure, or the core's deadline.
//! Dropping every [`Handle`] (or [`Handle::shutdown`]) stops it without leaving: peers then see
//! this member fail. [`Handle::with`] runs a closure on the core inside the loop.
//!
//! Encryption lives here, at the edge, as memberlist's `GossipVerifyIncoming/Outgoing` (both
//! on): with a keyring ([`Options::keyring`]) every outgoing packet and stream message is
//! sealed with the primary key (nonces from the OS RNG), every incoming one is opened with
//! whichever installed key fits, and plaintext input is dropped; streams are deframed
//! (`0a | len | sealed`) in their task before the plaintext reaches the core. Without a
//! keyring, encrypted input fails to decode in the core and is dropped with a debug log. The
//! core only learns the 29-byte overhead ([`Config::packet_overhead`]) so that piggybacked
//! packets still fit the UDP budget once sealed.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, trace, warn, Instrument};

use serf::core::Core;
use serf::memberlist::{
    self, Config, Delegate, Event, Incarnation, JoinId, LocalNode, Memberlist, Node, StreamId,
    StreamInput, Transmit, Vsn,
};
use serf::wire::crypto::{SharedKeyring, NONCE_SIZE, PACKET_OVERHEAD};
use serf::wire::stream::MAX_STREAM_BYTES;
use serf::wire::DecodeError;

/// The largest UDP datagram read.
const UDP_RECEIVE_BUFFER: usize = 65_536;
/// Inbound streams handled at once (Go: 128 concurrent push-pulls); more are refused. A stream
/// counts until its task has ended, whatever the core did with it.
const MAX_INBOUND_STREAMS: usize = 128;
/// Bytes that all streams together may have read and not yet released (a stream's bytes are
/// released when its task ends). One stream may still read up to `MAX_STREAM_BYTES`; beyond
/// this budget a stream fails, so many large streams at once cannot pile up gigabytes.
const STREAM_BYTES_BUDGET: usize = 32 * 1024 * 1024;
/// How long the accept loop pauses after a failed accept (EMFILE, ENFILE, ENOBUFS), instead
/// of spinning on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of the driver. None of them leave a half-started driver behind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the gossip address failed.
    #[error("binding {protocol} {addr}: {source}")]
    Bind {
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The core refused the local node or a command.
    #[error(transparent)]
    Memberlist(#[from] memberlist::Error),
    /// No seed completed a push-pull.
    #[error("join failed: no seed could be contacted: {errors:?}")]
    JoinFailed {
        /// Each seed with its failure.
        errors: Vec<(SocketAddr, String)>,
    },
    /// The driver loop has stopped.
    #[error("the memberlist driver has stopped")]
    Stopped,
}

/// How to start a member.
#[derive(Debug, Clone)]
pub struct Options {
    /// Unique node name.
    pub name: String,
    /// UDP and TCP bind address; port 0 picks a free port for both.
    pub bind: SocketAddr,
    /// Advertised address, if not the bound one (needed when binding 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Initial node meta (≤ 512 bytes).
    pub meta: Vec<u8>,
    /// First incarnation (≥ 1).
    pub incarnation: Incarnation,
    /// Protocol versions advertised.
    pub vsn: Vsn,
    /// Protocol tunables.
    pub config: Config,
    /// RNG seed; `None` seeds from the OS. (Encryption nonces always come from the OS.)
    pub seed: Option<u64>,
    /// Gossip encryption keys (shared with the Serf layer, which changes them on key
    /// queries); `None` = plaintext gossip.
    pub keyring: Option<SharedKeyring>,
    /// Keep Go's snapshot file (`serf agent -snapshot`): restore the clocks and rejoin the
    /// previous members at start. Used by [`crate::member::start`] only.
    pub snapshot: Option<crate::snapshot::Options>,
}

impl Options {
    /// LAN defaults for `name` bound at `bind`.
    pub fn new(name: impl Into<String>, bind: SocketAddr) -> Self {
        Self {
            name: name.into(),
            bind,
            advertise: None,
            meta: Vec::new(),
            incarnation: Incarnation(1),
            vsn: Vsn::DEFAULT,
            config: Config::lan(),
            seed: None,
            keyring: None,
            snapshot: None,
        }
    }
}

type Job<C> = Box<dyn FnOnce(&mut C, Instant) + Send>;

enum Command<C> {
    Run(Job<C>),
    Shutdown,
}

/// Commands to a running core. Cheap to clone; the driver stops when every clone is
/// dropped.
pub struct Handle<C> {
    commands: mpsc::UnboundedSender<Command<C>>,
    local_addr: SocketAddr,
}

impl<C> Clone for Handle<C> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            local_addr: self.local_addr,
        }
    }
}

impl<C> std::fmt::Debug for Handle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl<C: Core + Send + 'static> Handle<C> {
    /// The gossip address (UDP and TCP) actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs `job` on the core inside the driver loop and returns its result; transmits and
    /// events it causes are processed right after.
    pub async fn with<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut C, Instant) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::Run(Box::new(move |core, now| {
                let _ = reply.send(job(core, now));
            })))
            .map_err(|_| Error::Stopped)?;
        response.await.map_err(|_| Error::Stopped)
    }

    /// Stops the driver without leaving (peers will see this member fail).
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// A bare memberlist core and its delegate, as the driver runs them ([`start`]), with the
/// callers waiting for a join or a leave.
pub struct Gossip<D> {
    /// The core.
    pub memberlist: Memberlist,
    /// The layer above.
    pub delegate: D,
    joins: BTreeMap<JoinId, oneshot::Sender<Result<usize, Error>>>,
    leaves: Vec<oneshot::Sender<bool>>,
}

impl<D: Delegate + Send + 'static> Core for Gossip<D> {
    type Event = Event;

    fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), DecodeError> {
        self.memberlist
            .handle_packet(now, from, packet, &mut self.delegate)
    }

    fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.memberlist.handle_accept(now, from)
    }

    fn handle_stream(&mut self, now: Instant, stream: StreamId, input: StreamInput<'_>) {
        self.memberlist
            .handle_stream(now, stream, input, &mut self.delegate);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.memberlist.handle_timeout(now, &mut self.delegate);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.memberlist.poll_transmit()
    }

    fn poll_event(&mut self) -> Option<Event> {
        let event = self.memberlist.poll_event()?;
        match &event {
            Event::JoinCompleted {
                join,
                contacted,
                errors,
            } => {
                if let Some(reply) = self.joins.remove(join) {
                    let result = if *contacted > 0 {
                        Ok(*contacted)
                    } else {
                        Err(Error::JoinFailed {
                            errors: errors.clone(),
                        })
                    };
                    let _ = reply.send(result);
                }
            }
            Event::LeaveCompleted { broadcast_sent } => {
                for reply in self.leaves.drain(..) {
                    let _ = reply.send(*broadcast_sent);
                }
            }
            Event::NodeJoined(node) => {
                info!(node = %node.name, addr = %node.addr, "member joined")
            }
            Event::NodeLeft(node) => info!(node = %node.name, "member left"),
            Event::NodeFailed(node) => info!(node = %node.name, "member failed"),
            Event::Conflict { existing, other } => {
                warn!(node = %existing.name, mine = %existing.addr, theirs = %other.addr, "node name conflict")
            }
            Event::NodeUpdated(_) => {}
        }
        Some(event)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.memberlist.poll_timeout()
    }
}

impl<D: Delegate + Send + 'static> Handle<Gossip<D>> {
    /// Joins through `seeds`; returns how many completed a push-pull (an error if none did).
    pub async fn join(&self, seeds: &[SocketAddr]) -> Result<usize, Error> {
        let seeds = seeds.to_vec();
        let response = self
            .with(move |gossip, now| {
                let join = gossip.memberlist.join(now, &seeds, &mut gossip.delegate)?;
                let (reply, response) = oneshot::channel();
                gossip.joins.insert(join, reply);
                Ok::<_, Error>(response)
            })
            .await??;
        response.await.map_err(|_| Error::Stopped)?
    }

    /// Leaves gracefully; true if our dead message went out fully before `timeout`. The
    /// driver keeps answering pings until [`shutdown`](Self::shutdown) or drop.
    pub async fn leave(&self, timeout: Duration) -> Result<bool, Error> {
        let response = self
            .with(move |gossip, now| {
                let (reply, response) = oneshot::channel();
                gossip.leaves.push(reply);
                gossip.memberlist.leave(now, timeout);
                response
            })
            .await?;
        response.await.map_err(|_| Error::Stopped)
    }

    /// Publishes new meta (≤ 512 bytes).
    pub async fn update_meta(&self, meta: Vec<u8>) -> Result<(), Error> {
        self.with(move |gossip, now| gossip.memberlist.update_meta(now, meta))
            .await?
            .map_err(Error::from)
    }

    /// Sends a user message by UDP.
    pub async fn send_user(&self, to: SocketAddr, message: Vec<u8>) -> Result<(), Error> {
        self.with(move |gossip, now| gossip.memberlist.send_user(now, to, &message))
            .await
    }

    /// A snapshot of the member table.
    pub async fn members(&self) -> Result<Vec<Node>, Error> {
        self.with(|gossip, _| gossip.memberlist.members().collect())
            .await
    }
}

/// Binds `options.bind` (UDP and TCP), creates a memberlist core with `delegate` and spawns
/// the driver loop on the current tokio runtime.
pub async fn start<D: Delegate + Send + 'static>(
    options: Options,
    delegate: D,
) -> Result<(Handle<Gossip<D>>, mpsc::UnboundedReceiver<Event>), Error> {
    let (name, meta, vsn, incarnation) = (
        options.name.clone(),
        options.meta.clone(),
        options.vsn,
        options.incarnation,
    );
    spawn(options, move |config, addr, rng, now| {
        let local = LocalNode {
            name,
            addr,
            meta,
            vsn,
            incarnation,
        };
        Ok(Gossip {
            memberlist: Memberlist::new(config, local, rng, now)?,
            delegate,
            joins: BTreeMap::new(),
            leaves: Vec::new(),
        })
    })
    .await
}

/// Binds `options.bind` (UDP and TCP), builds the core with `make` (memberlist's config, the
/// advertised address, the RNG, the time) and spawns the driver loop on the current tokio
/// runtime. With a keyring, the config given to `make` counts the encryption overhead.
pub async fn spawn<C, E>(
    options: Options,
    make: impl FnOnce(Config, SocketAddr, StdRng, Instant) -> Result<C, E>,
) -> Result<(Handle<C>, mpsc::UnboundedReceiver<C::Event>), E>
where
    C: Core + Send + 'static,
    C::Event: Send,
    E: From<Error>,
{
    let (udp, listener) = bind(options.bind).await?;
    let bound = udp.local_addr().map_err(|source| Error::Bind {
        protocol: "udp",
        addr: options.bind,
        source,
    })?;
    // An advertised port of 0 means "the port actually bound" (binding port 0).
    let advertise = match options.advertise {
        Some(advertise) if advertise.port() == 0 => SocketAddr::new(advertise.ip(), bound.port()),
        Some(advertise) => advertise,
        None => bound,
    };
    let rng = match options.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let tcp_timeout = options.config.tcp_timeout;
    let mut config = options.config;
    if options.keyring.is_some() {
        config.packet_overhead = PACKET_OVERHEAD;
    }
    let core = make(config, advertise, rng, Instant::now())?;
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (stream_tx, stream_rx) = mpsc::unbounded_channel();
    let encrypted = options.keyring.is_some();
    info!(name = %options.name, %bound, %advertise, encrypted, "memberlist started");
    let driver = Driver {
        core,
        udp,
        listener,
        commands: command_rx,
        events: events_tx,
        stream_tx,
        stream_rx,
        streams: BTreeMap::new(),
        inbound: Arc::new(Semaphore::new(MAX_INBOUND_STREAMS)),
        stream_bytes: Arc::new(AtomicUsize::new(0)),
        accept_paused: None,
        tcp_timeout,
        keyring: options.keyring,
    };
    // `node`, not `name`: JSON logs already give the span's own name under `name`.
    let span = tracing::info_span!("memberlist", node = %options.name, addr = %advertise);
    tokio::spawn(driver.run().instrument(span));
    Ok((
        Handle {
            commands,
            local_addr: bound,
        },
        events,
    ))
}

/// UDP and TCP on the same address; with port 0, retries until both get the same port.
async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), Error> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind {
                protocol: "tcp",
                addr,
                source,
            })?;
        let tcp_addr = listener.local_addr().map_err(|source| Error::Bind {
            protocol: "tcp",
            addr,
            source,
        })?;
        match UdpSocket::bind(tcp_addr).await {
            Ok(udp) => return Ok((udp, listener)),
            Err(source) if addr.port() != 0 || attempts >= 10 => {
                return Err(Error::Bind {
                    protocol: "udp",
                    addr: tcp_addr,
                    source,
                })
            }
            Err(_) => continue,
        }
    }
}

enum StreamCommand {
    Write(Vec<u8>),
    Close,
}

enum StreamEvent {
    Data(Vec<u8>),
    Closed,
    Failed(String),
}

struct Driver<C: Core> {
    core: C,
    udp: UdpSocket,
    listener: TcpListener,
    commands: mpsc::UnboundedReceiver<Command<C>>,
    events: mpsc::UnboundedSender<C::Event>,
    stream_tx: mpsc::UnboundedSender<(StreamId, StreamEvent)>,
    stream_rx: mpsc::UnboundedReceiver<(StreamId, StreamEvent)>,
    streams: BTreeMap<StreamId, mpsc::UnboundedSender<StreamCommand>>,
    /// One permit per inbound stream task, held until the task ends.
    inbound: Arc<Semaphore>,
    /// Bytes read by stream tasks that are still running ([`STREAM_BYTES_BUDGET`]).
    stream_bytes: Arc<AtomicUsize>,
    /// Set after a failed accept: accepting resumes then.
    accept_paused: Option<tokio::time::Instant>,
    tcp_timeout: Duration,
    keyring: Option<SharedKeyring>,
}

impl<C> Driver<C>
where
    C: Core + Send + 'static,
    C::Event: Send,
{
    async fn run(mut self) {
        let mut buffer = vec![0u8; UDP_RECEIVE_BUFFER];
        loop {
            self.flush().await;
            let deadline = self.core.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            let accept_paused = self.accept_paused;
            let resume_accepting = async {
                match accept_paused {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(Command::Run(job)) => job(&mut self.core, Instant::now()),
                },
                received = self.udp.recv_from(&mut buffer) => match received {
                    Ok((len, from)) => self.packet(from, &buffer[..len]),
                    Err(error) => debug!(%error, "udp receive failed"),
                },
                accepted = self.listener.accept(), if accept_paused.is_none() => match accepted {
                    Ok((stream, from)) => self.accept(stream, from),
                    Err(error) => {
                        debug!(%error, "tcp accept failed, pausing accepts");
                        self.accept_paused = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    }
                },
                () = resume_accepting => self.accept_paused = None,
                Some((stream, event)) = self.stream_rx.recv() => {
                    let input = match &event {
                        StreamEvent::Data(bytes) => StreamInput::Data(bytes),
                        StreamEvent::Closed => StreamInput::Closed,
                        StreamEvent::Failed(reason) => StreamInput::Failed(reason),
                    };
                    self.core.handle_stream(Instant::now(), stream, input);
                }
                () = sleep => {
                    let now = Instant::now();
                    if self.core.poll_timeout().is_some_and(|at| at <= now) {
                        self.core.handle_timeout(now);
                    }
                }
            }
        }
        info!("memberlist stopped");
    }

    /// A datagram: opened with the keyring when there is one, then handed to the core.
    fn packet(&mut self, from: SocketAddr, packet: &[u8]) {
        trace!(peer = %from, len = packet.len(), "packet");
        let opened;
        let plaintext = match &self.keyring {
            Some(keyring) => match keyring.read().decrypt_packet(packet) {
                Ok(plaintext) => {
                    opened = plaintext;
                    &opened[..]
                }
                Err(error) => {
                    debug!(peer = %from, %error, "dropping packet that does not decrypt");
                    return;
                }
            },
            None => packet,
        };
        if let Err(error) = self.core.handle_packet(Instant::now(), from, plaintext) {
            debug!(peer = %from, %error, "dropping malformed packet content");
        }
    }

    /// Performs every transmit and hands out every event, until the core produced nothing
    /// new.
    async fn flush(&mut self) {
        loop {
            let mut idle = true;
            while let Some(transmit) = self.core.poll_transmit() {
                idle = false;
                self.transmit(transmit).await;
            }
            while let Some(event) = self.core.poll_event() {
                idle = false;
                let _ = self.events.send(event);
            }
            if idle {
                return;
            }
        }
    }

    async fn transmit(&mut self, transmit: Transmit) {
        match transmit {
            Transmit::Packet { to, bytes } => {
                let bytes = match &self.keyring {
                    Some(keyring) => keyring.read().encrypt_packet(nonce(), &bytes),
                    None => bytes,
                };
                if let Err(error) = self.udp.send_to(&bytes, to).await {
                    debug!(peer = %to, %error, "udp send failed");
                }
            }
            Transmit::StreamOpen { stream, to } => {
                let source = self.udp.local_addr().ok().map(|addr| addr.ip());
                let commands = self.spawn_stream(stream, Connection::Dial { to, source }, None);
                self.streams.insert(stream, commands);
            }
            Transmit::StreamWrite { stream, bytes } => {
                if let Some(commands) = self.streams.get(&stream) {
                    let _ = commands.send(StreamCommand::Write(bytes));
                }
            }
            Transmit::StreamClose { stream } => {
                if let Some(commands) = self.streams.remove(&stream) {
                    let _ = commands.send(StreamCommand::Close);
                }
            }
        }
    }

    fn accept(&mut self, stream: TcpStream, from: SocketAddr) {
        let Ok(permit) = Arc::clone(&self.inbound).try_acquire_owned() else {
            debug!(peer = %from, "too many inbound streams, refusing");
            return;
        };
        let id = self.core.handle_accept(Instant::now(), from);
        let commands = self.spawn_stream(id, Connection::Accepted(stream), Some(permit));
        self.streams.insert(id, commands);
    }

    fn spawn_stream(
        &self,
        id: StreamId,
        connection: Connection,
        permit: Option<OwnedSemaphorePermit>,
    ) -> mpsc::UnboundedSender<StreamCommand> {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let task = StreamTask {
            id,
            events: self.stream_tx.clone(),
            timeout: self.tcp_timeout,
            keyring: self.keyring.clone(),
            budget: ReadBudget {
                total: Arc::clone(&self.stream_bytes),
                mine: 0,
            },
            _permit: permit,
        };
        tokio::spawn(task.run(connection, command_rx).in_current_span());
        commands
    }
}

/// A fresh AES-GCM nonce from the OS RNG (the thread RNG, itself seeded from the OS, if the
/// OS source fails).
fn nonce() -> [u8; NONCE_SIZE] {
    use rand::{Rng, TryRngCore};
    let mut nonce = [0u8; NONCE_SIZE];
    if rand::rngs::OsRng.try_fill_bytes(&mut nonce).is_err() {
        rand::rng().fill(&mut nonce);
    }
    nonce
}

/// Connects to `to`, bound to `source` if it is a specific address of the same family.
async fn dial(to: SocketAddr, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = source.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

enum Connection {
    /// Dial `to`, from `source` when it is a specific address of the same family (so peers
    /// see streams come from the member's own IP, as its UDP packets do).
    Dial {
        to: SocketAddr,
        source: Option<std::net::IpAddr>,
    },
    Accepted(TcpStream),
}

/// Bytes read by one stream task, counted in the drivers' shared total until the task ends.
struct ReadBudget {
    total: Arc<AtomicUsize>,
    mine: usize,
}

impl ReadBudget {
    /// Counts `len` more bytes; false when this stream or all streams together are over budget.
    fn take(&mut self, len: usize) -> Result<(), String> {
        self.mine += len;
        let total = self.total.fetch_add(len, Ordering::Relaxed) + len;
        if self.mine > MAX_STREAM_BYTES {
            Err(format!("stream exceeded {MAX_STREAM_BYTES} bytes"))
        } else if total > STREAM_BYTES_BUDGET {
            Err(format!(
                "streams together exceeded {STREAM_BYTES_BUDGET} bytes"
            ))
        } else {
            Ok(())
        }
    }
}

impl Drop for ReadBudget {
    fn drop(&mut self) {
        self.total.fetch_sub(self.mine, Ordering::Relaxed);
    }
}

/// One TCP stream: dial if needed, then forward reads to the loop and writes from it, until
/// the core closes it, the peer fails, a read budget or the deadline is hit. The deadline
/// bounds everything the task awaits (dial, reads, writes, shutdown), so a peer that never
/// reads cannot hold the task, its socket or its permit. With a keyring, each write is sealed
/// into one `0a` frame and reads are deframed and opened; only whole plaintext messages go to
/// the loop, and anything not encrypted fails the stream.
struct StreamTask {
    id: StreamId,
    events: mpsc::UnboundedSender<(StreamId, StreamEvent)>,
    timeout: Duration,
    keyring: Option<SharedKeyring>,
    budget: ReadBudget,
    /// An inbound stream's place among [`MAX_INBOUND_STREAMS`], freed when the task ends.
    _permit: Option<OwnedSemaphorePermit>,
}

impl StreamTask {
    async fn run(
        mut self,
        connection: Connection,
        commands: mpsc::UnboundedReceiver<StreamCommand>,
    ) {
        // The core times the stream out at `timeout`; the task gives it a second more to say so.
        let deadline = tokio::time::Instant::now() + self.timeout + Duration::from_secs(1);
        let outcome =
            match tokio::time::timeout_at(deadline, self.serve(connection, commands)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {:?}", self.timeout)),
            };
        if let Err(reason) = outcome {
            let _ = self.events.send((self.id, StreamEvent::Failed(reason)));
        }
    }

    /// Ok when the core closed the stream (or the loop is gone), Err with the reason otherwise.
    async fn serve(
        &mut self,
        connection: Connection,
        mut commands: mpsc::UnboundedReceiver<StreamCommand>,
    ) -> Result<(), String> {
        let stream = match connection {
            Connection::Accepted(stream) => stream,
            Connection::Dial { to, source } => {
                match tokio::time::timeout(self.timeout, dial(to, source)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return Err(format!("dialing {to}: {error}")),
                    Err(_) => {
                        return Err(format!("dialing {to}: timed out after {:?}", self.timeout))
                    }
                }
            }
        };
        let (mut reader, mut writer) = stream.into_split();
        let mut buffer = vec![0u8; 16 * 1024];
        let mut eof = false;
        // Encrypted bytes not yet forming a whole frame.
        let mut sealed = Vec::new();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(StreamCommand::Write(bytes)) => {
                        let bytes = match &self.keyring {
                            Some(keyring) => keyring.read().encrypt_stream(nonce(), &bytes),
                            None => bytes,
                        };
                        writer.write_all(&bytes).await.map_err(|error| format!("write: {error}"))?;
                    }
                    Some(StreamCommand::Close) | None => {
                        let _ = writer.shutdown().await;
                        return Ok(());
                    }
                },
                read = reader.read(&mut buffer), if !eof => match read {
                    Ok(0) => {
                        eof = true;
                        self.send(StreamEvent::Closed)?;
                    }
                    Ok(len) => {
                        self.budget.take(len)?;
                        let Some(keyring) = &self.keyring else {
                            self.send(StreamEvent::Data(buffer[..len].to_vec()))?;
                            continue;
                        };
                        sealed.extend_from_slice(&buffer[..len]);
                        loop {
                            let opened = keyring.read().decrypt_stream(&sealed);
                            match opened.map_err(|error| error.to_string())? {
                                Some((plaintext, used)) => {
                                    sealed.drain(..used);
                                    self.send(StreamEvent::Data(plaintext))?;
                                }
                                None => break,
                            }
                        }
                    }
                    Err(error) => return Err(format!("read: {error}")),
                },
            }
        }
    }

    /// Hands an event to the loop; an error (ending the task) when the loop is gone.
    fn send(&self, event: StreamEvent) -> Result<(), String> {
        self.events
            .send((self.id, event))
            .map_err(|_| "the driver has stopped".to_owned())
    }
}
