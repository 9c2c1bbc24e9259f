//! The RPC server: Serf's agent IPC protocol in front of any [`Backend`].
//!
//! One task per connection reads requests; one writer task per connection owns the socket's
//! write half and is fed through a bounded channel, so a client that does not read only fills
//! its own channel (its event stream then lags and loses records, like Go's 512-slot buffer)
//! and is dropped when one write makes no progress for [`Config::write_timeout`]. Streams
//! (`stream`, `monitor`, `query`) are tasks cancelled by `stop`, by the client's disconnect or
//! by the server's shutdown token.
//!
//! Differences from Go, all in the direction of robustness: a command refused with
//! "Authentication required" has its body consumed (Go leaves it to be misread as the next
//! header); a bad `members-filtered` regex gets an error reply with an empty member list
//! (Go closes the connection silently). The auth key is compared in constant time, and after
//! [`MAX_AUTH_FAILURES`] wrong keys the connection is closed (Go compares with `==` and
//! lets one connection guess forever); each failure is answered with Go's "Invalid
//! authentication token" and logged at warn with the peer's address, never the key, at most
//! [`AUTH_LOG_BURST`] lines a second per server.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::backend::{
    Backend, BackendError, Event, KeyOp, LogLevel, QueryParams, QueryReply, QueryResponder,
};
use super::codec::{decode, encode_into, DecodeError, FrameBuffer, FrameError};
use super::filter::{event_matches, parse_event_filter, MemberFilter};
use super::messages::{
    command, errors, query_record, AuthRequest, CoordinateRequest, CoordinateResponse,
    EventRequest, ForceLeaveRequest, HandshakeRequest, JoinRequest, JoinResponse, KeyRequest,
    LogRecord, MemberEventRecord, MembersFilteredRequest, MembersResponse, MonitorRequest,
    QueryEventRecord, QueryRecord, QueryRequest, RequestHeader, RespondRequest, ResponseHeader,
    StopRequest, StreamRequest, TagsRequest, UserEventRecord,
};

/// Names of Serf's internal queries start with this.
pub const INTERNAL_QUERY_PREFIX: &str = "_serf_";

/// Event streams one connection may hold open (Go has no limit; each costs a task).
pub const MAX_STREAMS: usize = 64;

/// Wrong auth keys one connection may send; the last is answered, then the connection closes.
pub const MAX_AUTH_FAILURES: u32 = 3;

/// Auth warnings (wrong keys, commands before auth) logged per second by one server; the
/// rest are counted and reported as `suppressed` on the next line logged.
pub const AUTH_LOG_BURST: u32 = 10;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `--rpc-auth` key; `None` = no authentication.
    pub auth_key: Option<String>,
    /// Largest single msgpack value accepted from a client; larger → disconnect.
    pub max_frame: usize,
    /// A client whose socket accepts no bytes of a reply for this long is disconnected.
    pub write_timeout: Duration,
    /// Replies and records queued per connection before stream records wait.
    pub queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            auth_key: None,
            max_frame: 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            queue: 256,
        }
    }
}

/// The RPC server for one member.
#[derive(Debug)]
pub struct Server<B> {
    backend: Arc<B>,
    config: Arc<Config>,
    auth_log: Arc<LogLimit>,
}

impl<B> Clone for Server<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            config: Arc::clone(&self.config),
            auth_log: Arc::clone(&self.auth_log),
        }
    }
}

impl<B: Backend> Server<B> {
    /// A server answering for `backend`.
    pub fn new(backend: Arc<B>, config: Config) -> Self {
        Self {
            backend,
            config: Arc::new(config),
            auth_log: Arc::new(LogLimit::new(AUTH_LOG_BURST)),
        }
    }

    /// Accepts clients on `listener` until `shutdown` is cancelled, then closes every
    /// connection and waits for their tasks.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        debug!(%peer, "rpc client connected");
                        let server = self.clone();
                        let token = shutdown.child_token();
                        tasks.spawn(
                            async move { server.handle(stream, peer, token).await }
                                .instrument(tracing::debug_span!("rpc", %peer)),
                        );
                    }
                    Err(error) => {
                        warn!(%error, "accepting an rpc client");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        tasks.close();
        tasks.wait().await;
        info!("rpc server stopped");
    }

    /// Serves one connection until it closes or `token` is cancelled.
    pub async fn handle(self, stream: TcpStream, peer: SocketAddr, token: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Outgoing>(self.config.queue);
        let write_timeout = self.config.write_timeout;
        let writer_token = token.clone();
        let writer = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = out_rx.recv() => message,
                    () = writer_token.cancelled() => None,
                };
                let Some(message) = message else { break };
                match tokio::time::timeout(write_timeout, write.write_all(&message.bytes)).await {
                    Ok(Ok(())) => {
                        if let Some(written) = message.written {
                            let _ = written.send(());
                        }
                    }
                    Ok(Err(error)) => {
                        debug!(%error, "rpc write failed");
                        break;
                    }
                    Err(_) => {
                        debug!(timeout = ?write_timeout, "rpc client not reading, disconnecting");
                        break;
                    }
                }
            }
            writer_token.cancel();
            let _ = write.shutdown().await;
        });
        let mut connection = Connection {
            backend: Arc::clone(&self.backend),
            config: Arc::clone(&self.config),
            reader: read,
            frames: FrameBuffer::new(self.config.max_frame),
            out,
            token: token.child_token(),
            peer,
            auth_log: Arc::clone(&self.auth_log),
            version: 0,
            // As Go: an empty key means no authentication.
            authed: self.config.auth_key.as_deref().is_none_or(str::is_empty),
            auth_failures: 0,
            streams: HashMap::new(),
            monitor: None,
            queries: Arc::new(Queries::default()),
        };
        let result = tokio::select! {
            result = connection.run() => result,
            () = token.cancelled() => Ok(()),
        };
        match result {
            Ok(()) => debug!(%peer, "rpc client disconnected"),
            Err(error) => debug!(%peer, %error, "closing rpc connection"),
        }
        // Stop the streams; the writer flushes what is queued (e.g. a final error reply) and
        // ends once every sender is gone.
        connection.token.cancel();
        drop(connection);
        let _ = writer.await;
    }
}

/// Why a connection is closed.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Protocol(String),
    #[error("writer closed")]
    WriterClosed,
}

/// Query responders this connection may `respond` to, by per-connection ID.
#[derive(Debug, Default)]
struct Queries {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<dyn QueryResponder>>>,
}

impl Queries {
    fn register(&self, responder: Arc<dyn QueryResponder>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = tokio::time::Instant::now();
        let mut pending = self
            .pending
            .lock()
            .expect("query table lock is never poisoned");
        pending.retain(|_, query| query.deadline() > now);
        if responder.deadline() > now {
            pending.insert(id, responder);
        }
        id
    }

    fn get(&self, id: u64) -> Option<Arc<dyn QueryResponder>> {
        let now = tokio::time::Instant::now();
        let pending = self
            .pending
            .lock()
            .expect("query table lock is never poisoned");
        pending
            .get(&id)
            .filter(|query| query.deadline() > now)
            .cloned()
    }
}

struct Connection<B> {
    backend: Arc<B>,
    config: Arc<Config>,
    reader: OwnedReadHalf,
    frames: FrameBuffer,
    out: mpsc::Sender<Outgoing>,
    /// Cancelled when the connection ends: stops every stream, monitor and query task.
    token: CancellationToken,
    peer: SocketAddr,
    auth_log: Arc<LogLimit>,
    version: i32,
    authed: bool,
    /// Wrong keys sent so far; at [`MAX_AUTH_FAILURES`] the connection is closed.
    auth_failures: u32,
    streams: HashMap<u64, CancellationToken>,
    monitor: Option<(u64, CancellationToken)>,
    queries: Arc<Queries>,
}

/// Bytes for the writer task, with an optional signal once they are written.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    written: Option<tokio::sync::oneshot::Sender<()>>,
}

impl From<Vec<u8>> for Outgoing {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            written: None,
        }
    }
}

/// The `Error` field of a reply: empty on success, else the backend's message.
fn error_text<T>(result: Result<T, BackendError>) -> String {
    result.err().map(|error| error.0).unwrap_or_default()
}

fn reply_bytes<T: Serialize>(seq: u64, error: &str, body: Option<&T>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    encode_into(
        &mut bytes,
        &ResponseHeader {
            seq,
            error: error.to_owned(),
        },
    );
    if let Some(body) = body {
        encode_into(&mut bytes, body);
    }
    bytes
}

/// Commands whose request carries a body (used to consume it when auth refuses the command).
fn has_body(name: &str) -> bool {
    !matches!(
        name,
        command::MEMBERS | command::LEAVE | command::LIST_KEYS | command::STATS
    )
}

impl<B: Backend> Connection<B> {
    async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ConnectionError> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(frame) = self.frames.next_frame()? {
                return Ok(Some(frame));
            }
            let n = self.reader.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.frames.extend(&chunk[..n]);
        }
    }

    async fn body<T: serde::de::DeserializeOwned>(
        &mut self,
        what: &'static str,
    ) -> Result<T, ConnectionError> {
        match self.next_frame().await? {
            Some(frame) => Ok(decode(what, &frame)?),
            None => Err(ConnectionError::Protocol(format!(
                "connection closed before the {what} body"
            ))),
        }
    }

    async fn send<T: Serialize>(
        &self,
        seq: u64,
        error: &str,
        body: Option<&T>,
    ) -> Result<(), ConnectionError> {
        self.out
            .send(reply_bytes(seq, error, body).into())
            .await
            .map_err(|_| ConnectionError::WriterClosed)
    }

    async fn ok(&self, seq: u64, result: Result<(), BackendError>) -> Result<(), ConnectionError> {
        let error = error_text(result);
        self.send::<()>(seq, &error, None).await
    }

    async fn run(&mut self) -> Result<(), ConnectionError> {
        while let Some(frame) = self.next_frame().await? {
            let header: RequestHeader = decode("requestHeader", &frame)?;
            self.dispatch(header).await?;
        }
        Ok(())
    }

    async fn dispatch(&mut self, header: RequestHeader) -> Result<(), ConnectionError> {
        let RequestHeader { command: name, seq } = header;
        debug!(command = %name, seq, "rpc request");
        if !self.admit(&name, seq).await? {
            return Ok(());
        }
        match name.as_str() {
            // The session: version, key, streams and their end.
            command::HANDSHAKE => self.handshake(seq).await,
            command::AUTH => self.auth(seq).await,
            command::STREAM => self.start_stream(seq).await,
            command::MONITOR => self.start_monitor(seq).await,
            command::STOP => self.stop(seq).await,
            // Membership.
            command::MEMBERS => self.members(seq).await,
            command::MEMBERS_FILTERED => self.members_filtered(seq).await,
            command::JOIN => self.join(seq).await,
            command::LEAVE => self.leave(seq).await,
            command::FORCE_LEAVE => self.force_leave(seq).await,
            command::TAGS => self.tags(seq).await,
            command::STATS => self.stats(seq).await,
            command::GET_COORDINATE => self.coordinate(seq).await,
            // Events and queries.
            command::EVENT => self.user_event(seq).await,
            command::QUERY => self.start_query(seq).await,
            command::RESPOND => self.respond(seq).await,
            // Keys.
            command::INSTALL_KEY => self.change_key(seq, KeyOp::Install).await,
            command::USE_KEY => self.change_key(seq, KeyOp::Use).await,
            command::REMOVE_KEY => self.change_key(seq, KeyOp::Remove).await,
            command::LIST_KEYS => self.list_keys(seq).await,
            _ => {
                self.send::<()>(seq, errors::UNSUPPORTED_COMMAND, None)
                    .await?;
                Err(ConnectionError::Protocol(format!(
                    "command {name:?} not recognized"
                )))
            }
        }
    }

    /// The handshake first, then the key (when one is set): false when `name` was answered
    /// with an error instead (an error ends the connection only before the handshake).
    async fn admit(&mut self, name: &str, seq: u64) -> Result<bool, ConnectionError> {
        if name != command::HANDSHAKE && self.version == 0 {
            self.send::<()>(seq, errors::HANDSHAKE_REQUIRED, None)
                .await?;
            return Err(ConnectionError::Protocol(format!(
                "command {name:?} before the handshake"
            )));
        }
        if !self.authed && name != command::AUTH && name != command::HANDSHAKE {
            if let Some(suppressed) = self.auth_log.allow() {
                warn!(peer = %self.peer, command = %name, suppressed, "rpc client sending commands before auth");
            }
            if is_known(name) && has_body(name) {
                let _: serde::de::IgnoredAny = self.body("request body").await?;
            }
            self.send::<()>(seq, errors::AUTH_REQUIRED, None).await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn handshake(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: HandshakeRequest = self.body("handshakeRequest").await?;
        let error = if request.version != 1 {
            errors::UNSUPPORTED_IPC_VERSION
        } else if self.version != 0 {
            errors::DUPLICATE_HANDSHAKE
        } else {
            self.version = request.version;
            ""
        };
        self.send::<()>(seq, error, None).await
    }

    /// Ends the monitor or the stream started by request `stop`.
    async fn stop(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: StopRequest = self.body("stopRequest").await?;
        if let Some((monitor_seq, token)) = self.monitor.take() {
            if monitor_seq == request.stop {
                token.cancel();
            } else {
                self.monitor = Some((monitor_seq, token));
            }
        }
        if let Some(token) = self.streams.remove(&request.stop) {
            token.cancel();
        }
        self.send::<()>(seq, "", None).await
    }

    async fn members(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let members = self.backend.members().await;
        self.send(seq, "", Some(&MembersResponse { members })).await
    }

    async fn members_filtered(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: MembersFilteredRequest = self.body("membersFilteredRequest").await?;
        match MemberFilter::new(&request.tags, &request.status, &request.name) {
            Ok(filter) => {
                let members = self
                    .backend
                    .members()
                    .await
                    .into_iter()
                    .filter(|member| filter.matches(member))
                    .collect();
                self.send(seq, "", Some(&MembersResponse { members })).await
            }
            Err(error) => {
                self.send(seq, &error.to_string(), Some(&MembersResponse::default()))
                    .await
            }
        }
    }

    async fn force_leave(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: ForceLeaveRequest = self.body("forceLeaveRequest").await?;
        let result = self.backend.force_leave(request.node, request.prune).await;
        self.ok(seq, result).await
    }

    async fn stats(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let stats = self.backend.stats().await;
        self.send(seq, "", Some(&stats)).await
    }

    async fn user_event(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: EventRequest = self.body("eventRequest").await?;
        let result = self
            .backend
            .user_event(request.name, request.payload, request.coalesce)
            .await;
        self.ok(seq, result).await
    }

    async fn list_keys(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let (response, result) = self.backend.keys(KeyOp::List).await;
        let error = error_text(result);
        self.send(seq, &error, Some(&response)).await
    }

    async fn join(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: JoinRequest = self.body("joinRequest").await?;
        let (num, result) = self.backend.join(request.existing, request.replay).await;
        let error = error_text(result);
        let response = JoinResponse {
            num: i32::try_from(num).unwrap_or(i32::MAX),
        };
        self.send(seq, &error, Some(&response)).await
    }

    async fn leave(&mut self, seq: u64) -> Result<(), ConnectionError> {
        info!("graceful leave triggered over rpc");
        let result = self.backend.leave().await;
        let error = error_text(result);
        // Let the reply reach the client before the member goes away.
        let (written, written_rx) = tokio::sync::oneshot::channel();
        self.out
            .send(Outgoing {
                bytes: reply_bytes::<()>(seq, &error, None),
                written: Some(written),
            })
            .await
            .map_err(|_| ConnectionError::WriterClosed)?;
        let _ = tokio::time::timeout(self.config.write_timeout, written_rx).await;
        self.backend.shutdown().await;
        Ok(())
    }

    /// Sets and deletes tags, keeping the others.
    async fn tags(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: TagsRequest = self.body("tagsRequest").await?;
        let mut tags = self.backend.tags().await;
        tags.retain(|key, _| !request.delete_tags.contains(key));
        tags.extend(request.tags);
        let result = self.backend.set_tags(tags).await;
        self.ok(seq, result).await
    }

    async fn coordinate(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: CoordinateRequest = self.body("coordinateRequest").await?;
        let coordinate = self.backend.coordinate(request.node).await;
        let response = CoordinateResponse {
            ok: coordinate.is_some(),
            coord: coordinate.unwrap_or_default(),
        };
        self.send(seq, "", Some(&response)).await
    }

    async fn respond(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: RespondRequest = self.body("respondRequest").await?;
        let result = match self.queries.get(request.id) {
            Some(query) => query.respond(request.payload),
            None => Err(BackendError::new(errors::INVALID_QUERY_ID)),
        };
        self.ok(seq, result).await
    }

    /// `install-key`, `use-key` or `remove-key` (`operation` of the request's key): the
    /// answer carries no key list.
    async fn change_key(
        &mut self,
        seq: u64,
        operation: fn(String) -> KeyOp,
    ) -> Result<(), ConnectionError> {
        let request: KeyRequest = self.body("keyRequest").await?;
        let (mut response, result) = self.backend.keys(operation(request.key)).await;
        response.keys = BTreeMap::new();
        let error = error_text(result);
        self.send(seq, &error, Some(&response)).await
    }

    /// Checks a key; a wrong one is answered as Go answers it, and the last allowed closes
    /// the connection once the answer is written.
    async fn auth(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: AuthRequest = self.body("authRequest").await?;
        let given = request.auth_key.as_str();
        let expected = self.config.auth_key.as_deref().unwrap_or_default();
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            self.authed = true;
            return self.send::<()>(seq, "", None).await;
        }
        self.auth_failures += 1;
        let failures = self.auth_failures;
        if let Some(suppressed) = self.auth_log.allow() {
            warn!(peer = %self.peer, failures, suppressed, "rpc client sent a wrong auth key");
        }
        self.send::<()>(seq, errors::INVALID_AUTH_TOKEN, None)
            .await?;
        if failures >= MAX_AUTH_FAILURES {
            return Err(ConnectionError::Protocol(format!(
                "{failures} wrong auth keys"
            )));
        }
        Ok(())
    }

    async fn start_stream(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: StreamRequest = self.body("streamRequest").await?;
        let Some(filters) = parse_event_filter(&request.kind) else {
            return self.send::<()>(seq, errors::INVALID_FILTER, None).await;
        };
        if self.streams.contains_key(&seq) {
            return self.send::<()>(seq, errors::STREAM_EXISTS, None).await;
        }
        self.streams.retain(|_, token| !token.is_cancelled());
        if self.streams.len() >= MAX_STREAMS {
            let error = format!("Too many streams on one connection (limit {MAX_STREAMS})");
            return self.send::<()>(seq, &error, None).await;
        }
        // Subscribe before replying so no event after the reply is missed.
        let mut events = self.backend.subscribe_events();
        self.send::<()>(seq, "", None).await?;
        let token = self.token.child_token();
        self.streams.insert(seq, token.clone());
        let out = self.out.clone();
        let queries = Arc::clone(&self.queries);
        tokio::spawn(
            async move {
                while let Some(event) =
                    crate::events::next(&mut events, &token, "a slow rpc client").await
                {
                    if !event_matches(&filters, &event) {
                        continue;
                    }
                    let bytes = match event {
                        Event::Member { kind, members } => reply_bytes(
                            seq,
                            "",
                            Some(&MemberEventRecord {
                                event: kind.as_str().to_owned(),
                                members,
                            }),
                        ),
                        Event::User {
                            ltime,
                            name,
                            payload,
                            coalesce,
                        } => reply_bytes(
                            seq,
                            "",
                            Some(&UserEventRecord {
                                event: "user".to_owned(),
                                ltime,
                                name,
                                payload,
                                coalesce,
                            }),
                        ),
                        Event::Query {
                            ltime,
                            name,
                            payload,
                            responder,
                        } => {
                            let id = queries.register(responder);
                            reply_bytes(
                                seq,
                                "",
                                Some(&QueryEventRecord {
                                    event: "query".to_owned(),
                                    id,
                                    ltime,
                                    name,
                                    payload,
                                }),
                            )
                        }
                    };
                    tokio::select! {
                        () = token.cancelled() => break,
                        sent = out.send(bytes.into()) => if sent.is_err() { break },
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    async fn start_monitor(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: MonitorRequest = self.body("monitorRequest").await?;
        let level = request.log_level.as_str();
        let Some(min_level) = LogLevel::parse(level) else {
            let error = format!("Unknown log level: {}", level.to_uppercase());
            return self.send::<()>(seq, &error, None).await;
        };
        if self.monitor.is_some() {
            return self.send::<()>(seq, errors::MONITOR_EXISTS, None).await;
        }
        let (backlog, mut logs) = self.backend.subscribe_logs();
        self.send::<()>(seq, "", None).await?;
        let token = self.token.child_token();
        self.monitor = Some((seq, token.clone()));
        let out = self.out.clone();
        tokio::spawn(
            async move {
                for line in backlog.into_iter().filter(|line| line.level >= min_level) {
                    let bytes = reply_bytes(seq, "", Some(&LogRecord { log: line.text }));
                    tokio::select! {
                        () = token.cancelled() => return,
                        sent = out.send(bytes.into()) => if sent.is_err() { return },
                    }
                }
                loop {
                    let line = tokio::select! {
                        () = token.cancelled() => break,
                        line = logs.recv() => line,
                    };
                    let line = match line {
                        Ok(line) => line,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    };
                    if line.level < min_level {
                        continue;
                    }
                    let bytes = reply_bytes(seq, "", Some(&LogRecord { log: line.text }));
                    tokio::select! {
                        () = token.cancelled() => break,
                        sent = out.send(bytes.into()) => if sent.is_err() { break },
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    async fn start_query(&mut self, seq: u64) -> Result<(), ConnectionError> {
        let request: QueryRequest = self.body("queryRequest").await?;
        // The agent reserves the internal prefix, except for the plain `_serf_ping`.
        if request.name.starts_with(INTERNAL_QUERY_PREFIX)
            && (request.name != "_serf_ping" || !request.payload.is_empty())
        {
            let error = format!("Queries cannot contain the '{INTERNAL_QUERY_PREFIX}' prefix");
            return self.send::<()>(seq, &error, None).await;
        }
        let params = QueryParams {
            name: request.name,
            payload: request.payload,
            filter_nodes: request.filter_nodes,
            filter_tags: request.filter_tags,
            request_ack: request.request_ack,
            relay_factor: request.relay_factor,
            timeout: u64::try_from(request.timeout)
                .ok()
                .filter(|nanos| *nanos > 0)
                .map(Duration::from_nanos),
        };
        let mut handle = match self.backend.query(params).await {
            Ok(handle) => handle,
            Err(error) => return self.send::<()>(seq, &error.0, None).await,
        };
        self.send::<()>(seq, "", None).await?;
        let out = self.out.clone();
        let token = self.token.child_token();
        tokio::spawn(
            async move {
                let deadline = tokio::time::sleep_until(handle.deadline);
                tokio::pin!(deadline);
                let mut replies_open = true;
                loop {
                    let record = tokio::select! {
                        () = token.cancelled() => return,
                        () = &mut deadline => QueryRecord {
                            kind: query_record::DONE.to_owned(),
                            ..QueryRecord::default()
                        },
                        reply = handle.replies.recv(), if replies_open => match reply {
                            Some(QueryReply::Ack(from)) => QueryRecord {
                                kind: query_record::ACK.to_owned(),
                                from,
                                payload: Vec::new(),
                            },
                            Some(QueryReply::Response { from, payload }) => QueryRecord {
                                kind: query_record::RESPONSE.to_owned(),
                                from,
                                payload,
                            },
                            None => {
                                replies_open = false;
                                continue;
                            }
                        },
                    };
                    let done = record.kind == query_record::DONE;
                    let bytes = reply_bytes(seq, "", Some(&record));
                    tokio::select! {
                        () = token.cancelled() => return,
                        sent = out.send(bytes.into()) => if sent.is_err() { return },
                    }
                    if done {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }
}

/// Whether `given` equals `expected`, in a time that depends only on `given.len()`: every byte
/// of `given` is compared (against `expected` repeated), and the lengths are compared in the
/// same fold, so neither where the first difference is nor `expected`'s length shows.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return given.is_empty();
    }
    let mut difference = u8::from(given.len() != expected.len());
    for (index, byte) in given.iter().enumerate() {
        difference |= byte ^ expected[index % expected.len()];
        // Keeps the compiler from ending the loop early once `difference` is non-zero.
        difference = std::hint::black_box(difference);
    }
    given.len() == expected.len() && difference == 0
}

/// At most `burst` lines a second, across every connection of one server.
#[derive(Debug)]
struct LogLimit {
    burst: u32,
    state: Mutex<LogWindow>,
}

#[derive(Debug)]
struct LogWindow {
    start: Option<tokio::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    fn new(burst: u32) -> Self {
        Self {
            burst,
            state: Mutex::new(LogWindow {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines suppressed since the last one logged)` if this line may be logged.
    fn allow(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut window = self.state.lock().expect("log limit lock is never poisoned");
        if window
            .start
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            window.start = Some(now);
            window.logged = 0;
        }
        if window.logged < self.burst {
            window.logged += 1;
            return Some(std::mem::take(&mut window.suppressed));
        }
        window.suppressed += 1;
        None
    }
}

fn is_known(name: &str) -> bool {
    matches!(
        name,
        command::HANDSHAKE
            | command::AUTH
            | command::EVENT
            | command::FORCE_LEAVE
            | command::JOIN
            | command::MEMBERS
            | command::MEMBERS_FILTERED
            | command::STREAM
            | command::STOP
            | command::MONITOR
            | command::LEAVE
            | command::INSTALL_KEY
            | command::USE_KEY
            | command::REMOVE_KEY
            | command::LIST_KEYS
            | command::TAGS
            | command::QUERY
            | command::RESPOND
            | command::STATS
            | command::GET_COORDINATE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(given: &str, expected: &str, equal: bool) {
        assert_eq!(
            constant_time_eq(given.as_bytes(), expected.as_bytes()),
            equal,
            "{given:?} vs {expected:?}"
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        check("k3y", "k3y", true);
        check("", "", true);
        check("k3y", "k3Y", false);
        check("x3y", "k3y", false);
        check("k3", "k3y", false);
        check("k3yk3y", "k3y", false); // `expected` repeated must not match
        check("k3y", "", false);
        check("", "k3y", false);
        check("\u{e9}", "\u{e9}", true);
    }

    #[test]
    fn auth_warnings_are_limited_per_second() {
        let limit = LogLimit::new(2);
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        let mut window = limit.state.lock().unwrap();
        window.start = window.start.map(|start| start - Duration::from_secs(1));
        drop(window);
        assert_eq!(
            limit.allow(),
            Some(2),
            "the next line counts the suppressed ones"
        );
    }
}
