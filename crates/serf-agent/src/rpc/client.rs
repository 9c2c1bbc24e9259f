//! The RPC client: talks to any Serf agent (Go or amb-serf) over its RPC port.
//!
//! One background task reads the connection and routes each response header by sequence number
//! to the waiting request or stream. The protocol has no length prefixes, so the client tracks
//! which sequence numbers carry a body: plain replies (by command), stream records (every
//! header after a stream's first), and records of stopped streams that are still in flight
//! (read and discarded). [`Client`] is cheap to clone; clones share the connection.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::backend::{MemberEventKind, QueryReply, StreamRecord};
use super::codec::{decode, encode_into, FrameBuffer};
use super::messages::{
    command, errors, query_record, AnyEventRecord, AuthRequest, Coordinate, CoordinateRequest,
    CoordinateResponse, EventRequest, ForceLeaveRequest, HandshakeRequest, JoinRequest,
    JoinResponse, KeyRequest, KeyResponse, LogRecord, MemberRow, MembersFilteredRequest,
    MembersResponse, MonitorRequest, QueryRecord, QueryRequest, RawStats, RequestHeader,
    RespondRequest, ResponseHeader, Stats, StopRequest, StreamRequest, TagsRequest,
};

/// How long connecting plus the handshake (and auth) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest single value accepted from an agent (a big cluster's member list fits easily).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Records buffered per stream before the client drops them (Go's client drops too).
const STREAM_BUFFER: usize = 4096;

/// Why an RPC call failed. Every variant names the agent address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Nothing accepted the connection (or it timed out).
    #[error("no Serf agent at {addr}: {reason}")]
    Connect {
        /// The RPC address dialled.
        addr: String,
        /// e.g. "connection refused".
        reason: String,
    },
    /// The agent needs an RPC auth key and none (or a wrong one) was given.
    #[error("Serf agent at {addr}: RPC auth failed: {message}")]
    Auth {
        /// The RPC address.
        addr: String,
        /// The agent's text, e.g. "Invalid authentication token".
        message: String,
    },
    /// The agent answered the command with an error.
    #[error("Serf agent at {addr}: {command}: {message}")]
    Agent {
        /// The RPC address.
        addr: String,
        /// The command that failed.
        command: String,
        /// The agent's error text.
        message: String,
    },
    /// The connection closed (the agent left, or the network failed).
    #[error("connection to the Serf agent at {addr} closed{detail}")]
    Closed {
        /// The RPC address.
        addr: String,
        /// Why, when known (": …").
        detail: String,
    },
    /// The agent sent something that is not Serf RPC.
    #[error("Serf agent at {addr} sent a bad reply: {reason}")]
    Protocol {
        /// The RPC address.
        addr: String,
        /// What was wrong.
        reason: String,
    },
}

/// A keyring operation for [`Client::key_command`] (keys in base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCommand {
    /// Install a key on every member.
    Install(String),
    /// Make a key primary on every member.
    Use(String),
    /// Remove a key from every member.
    Remove(String),
    /// List the keys across the cluster.
    List,
}

/// Identifies a running stream, monitor or query for [`Client::stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHandle(pub u64);

/// Member filters for [`Client::members_filtered`]: anchored regexes, empty = any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembersFilter {
    /// Tag name → regex over its value.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Regex over the status.
    pub status: String,
    /// Regex over the node name.
    pub name: String,
}

/// A query to start with [`Client::query`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Query name.
    pub name: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Only these nodes answer (empty = all).
    pub filter_nodes: Vec<String>,
    /// Tag name → anchored regex.
    pub filter_tags: std::collections::BTreeMap<String, String>,
    /// Ask for acks.
    pub request_ack: bool,
    /// Extra relays of each response.
    pub relay_factor: u8,
    /// `None` = the agent's default.
    pub timeout: Option<Duration>,
}

/// One record of an event stream; answer its queries with [`Client::respond`] and the
/// `responder` id.
pub type StreamEvent = StreamRecord<u64>;

enum Handler {
    Reply {
        body: bool,
        reply: oneshot::Sender<(ResponseHeader, Option<Vec<u8>>)>,
    },
    Stream {
        init: Option<oneshot::Sender<ResponseHeader>>,
        records: mpsc::Sender<Vec<u8>>,
        query: bool,
    },
}

#[derive(Default)]
struct Dispatch {
    handlers: HashMap<u64, Handler>,
    /// Streams stopped locally whose records may still arrive.
    stopped: HashSet<u64>,
    closed: Option<String>,
}

struct Inner {
    addr: String,
    seq: AtomicU64,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    dispatch: Mutex<Dispatch>,
}

/// Aborts the reader task when the last clone of the client (or of a stream) goes away.
struct ReaderGuard(JoinHandle<()>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection to a Serf agent's RPC port, after handshake (and auth).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<ReaderGuard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

fn io_reason(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        ErrorKind::ConnectionReset => "connection reset".to_owned(),
        ErrorKind::TimedOut => "timed out".to_owned(),
        _ => error.to_string(),
    }
}

impl Client {
    /// Connects to `addr` (`host:port`), performs the handshake and, with `auth_key`, the auth.
    pub async fn connect(addr: &str, auth_key: Option<&str>) -> Result<Self, Error> {
        let connect_error = |reason: String| Error::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(connect_error(io_reason(&error))),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let inner = Arc::new(Inner {
            addr: addr.to_owned(),
            seq: AtomicU64::new(0),
            writer: tokio::sync::Mutex::new(write),
            dispatch: Mutex::new(Dispatch::default()),
        });
        let reader = tokio::spawn(read_loop(Arc::clone(&inner), read));
        let client = Self {
            inner,
            _guard: Arc::new(ReaderGuard(reader)),
        };
        let setup = async {
            client
                .call::<_, ()>(
                    command::HANDSHAKE,
                    Some(&HandshakeRequest { version: 1 }),
                    false,
                )
                .await
                .map_err(|error| match error {
                    Error::Closed { .. } | Error::Protocol { .. } => {
                        connect_error(format!("it does not speak Serf RPC ({error})"))
                    }
                    other => other,
                })?;
            if let Some(key) = auth_key {
                client
                    .call::<_, ()>(
                        command::AUTH,
                        Some(&AuthRequest {
                            auth_key: key.to_owned(),
                        }),
                        false,
                    )
                    .await?;
            }
            Ok::<(), Error>(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(connect_error(format!(
                "no RPC handshake within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The address this client is connected to.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    fn dispatch(&self) -> MutexGuard<'_, Dispatch> {
        lock(&self.inner)
    }

    fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn closed_error(&self, detail: Option<String>) -> Error {
        Error::Closed {
            addr: self.inner.addr.clone(),
            detail: detail.map(|d| format!(": {d}")).unwrap_or_default(),
        }
    }

    async fn write<B: Serialize>(
        &self,
        name: &str,
        seq: u64,
        body: Option<&B>,
    ) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity(64);
        encode_into(
            &mut bytes,
            &RequestHeader {
                command: name.to_owned(),
                seq,
            },
        );
        if let Some(body) = body {
            encode_into(&mut bytes, body);
        }
        let mut writer = self.inner.writer.lock().await;
        writer
            .write_all(&bytes)
            .await
            .map_err(|error| self.closed_error(Some(io_reason(&error))))
    }

    fn agent_error(&self, name: &str, message: String) -> Error {
        if message == errors::AUTH_REQUIRED || message == errors::INVALID_AUTH_TOKEN {
            Error::Auth {
                addr: self.inner.addr.clone(),
                message: if message == errors::AUTH_REQUIRED {
                    format!("{message} (this agent needs an RPC auth key)")
                } else {
                    message
                },
            }
        } else {
            Error::Agent {
                addr: self.inner.addr.clone(),
                command: name.to_owned(),
                message,
            }
        }
    }

    /// Sends one request and waits for its reply; decodes the body when `expect_body`.
    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        name: &str,
        body: Option<&B>,
        expect_body: bool,
    ) -> Result<Option<R>, Error> {
        let (header, body) = self.call_raw(name, body, expect_body).await?;
        if !header.error.is_empty() {
            return Err(self.agent_error(name, header.error));
        }
        self.decode_body(body)
    }

    fn decode_body<R: DeserializeOwned>(&self, body: Option<Vec<u8>>) -> Result<Option<R>, Error> {
        body.map(|frame| {
            decode("response body", &frame).map_err(|error| Error::Protocol {
                addr: self.inner.addr.clone(),
                reason: error.to_string(),
            })
        })
        .transpose()
    }

    async fn call_raw<B: Serialize>(
        &self,
        name: &str,
        body: Option<&B>,
        expect_body: bool,
    ) -> Result<(ResponseHeader, Option<Vec<u8>>), Error> {
        let seq = self.next_seq();
        let (reply, reply_rx) = oneshot::channel();
        {
            let mut dispatch = self.dispatch();
            if let Some(reason) = &dispatch.closed {
                return Err(self.closed_error(Some(reason.clone())));
            }
            dispatch.handlers.insert(
                seq,
                Handler::Reply {
                    body: expect_body,
                    reply,
                },
            );
        }
        if let Err(error) = self.write(name, seq, body).await {
            self.dispatch().handlers.remove(&seq);
            return Err(error);
        }
        match reply_rx.await {
            Ok(reply) => Ok(reply),
            Err(_) => {
                let reason = self.dispatch().closed.clone();
                Err(self.closed_error(reason))
            }
        }
    }

    /// Starts a stream-like command and waits for its first header.
    async fn open_stream<B: Serialize>(
        &self,
        name: &str,
        body: &B,
        query: bool,
    ) -> Result<Records, Error> {
        let seq = self.next_seq();
        let (init, init_rx) = oneshot::channel();
        let (records, records_rx) = mpsc::channel(STREAM_BUFFER);
        {
            let mut dispatch = self.dispatch();
            if let Some(reason) = &dispatch.closed {
                return Err(self.closed_error(Some(reason.clone())));
            }
            dispatch.handlers.insert(
                seq,
                Handler::Stream {
                    init: Some(init),
                    records,
                    query,
                },
            );
        }
        if let Err(error) = self.write(name, seq, Some(body)).await {
            self.dispatch().handlers.remove(&seq);
            return Err(error);
        }
        match init_rx.await {
            Ok(header) if header.error.is_empty() => Ok(Records {
                handle: StreamHandle(seq),
                records: records_rx,
                client: self.clone(),
            }),
            Ok(header) => Err(self.agent_error(name, header.error)),
            Err(_) => {
                let reason = self.dispatch().closed.clone();
                Err(self.closed_error(reason))
            }
        }
    }

    /// All members the agent knows.
    pub async fn members(&self) -> Result<Vec<MemberRow>, Error> {
        let response: Option<MembersResponse> =
            self.call::<(), _>(command::MEMBERS, None, true).await?;
        Ok(response.unwrap_or_default().members)
    }

    /// Members matching `filter` (evaluated by the agent).
    pub async fn members_filtered(&self, filter: &MembersFilter) -> Result<Vec<MemberRow>, Error> {
        let request = MembersFilteredRequest {
            tags: filter.tags.clone(),
            status: filter.status.clone(),
            name: filter.name.clone(),
        };
        let response: Option<MembersResponse> = self
            .call(command::MEMBERS_FILTERED, Some(&request), true)
            .await?;
        Ok(response.unwrap_or_default().members)
    }

    /// Asks the agent to join `addrs`; returns how many nodes it contacted.
    pub async fn join(&self, addrs: &[String], replay: bool) -> Result<u32, Error> {
        let request = JoinRequest {
            existing: addrs.to_vec(),
            replay,
        };
        let (header, body) = self.call_raw(command::JOIN, Some(&request), true).await?;
        if !header.error.is_empty() {
            return Err(self.agent_error(command::JOIN, header.error));
        }
        let response: Option<JoinResponse> = self.decode_body(body)?;
        Ok(response.map_or(0, |response| u32::try_from(response.num).unwrap_or(0)))
    }

    /// Makes the agent leave the cluster gracefully and shut down.
    pub async fn leave(&self) -> Result<(), Error> {
        self.call::<(), ()>(command::LEAVE, None, false).await?;
        Ok(())
    }

    /// Forces a failed `node` into the `left` state (`prune`: forget it entirely).
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<(), Error> {
        let request = ForceLeaveRequest {
            node: node.to_owned(),
            prune,
        };
        self.call::<_, ()>(command::FORCE_LEAVE, Some(&request), false)
            .await?;
        Ok(())
    }

    /// Sends a user event.
    pub async fn user_event(
        &self,
        name: &str,
        payload: &[u8],
        coalesce: bool,
    ) -> Result<(), Error> {
        let request = EventRequest {
            name: name.to_owned(),
            payload: payload.to_vec(),
            coalesce,
        };
        self.call::<_, ()>(command::EVENT, Some(&request), false)
            .await?;
        Ok(())
    }

    /// Sets and deletes tags of the agent's own member.
    pub async fn update_tags(
        &self,
        set: &std::collections::BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), Error> {
        let request = TagsRequest {
            tags: set.clone(),
            delete_tags: delete.to_vec(),
        };
        self.call::<_, ()>(command::TAGS, Some(&request), false)
            .await?;
        Ok(())
    }

    /// Subscribes to events; `filter` is Serf's (`member-join,user:deploy`, `""` = all).
    pub async fn stream(&self, filter: &str) -> Result<EventStream, Error> {
        let request = StreamRequest {
            kind: filter.to_owned(),
        };
        let records = self.open_stream(command::STREAM, &request, false).await?;
        Ok(EventStream { records })
    }

    /// Subscribes to the agent's log at `level` (`TRACE`, `DEBUG`, `INFO`, `WARN`, `ERR`).
    pub async fn monitor(&self, level: &str) -> Result<LogStream, Error> {
        let request = MonitorRequest {
            log_level: level.to_owned(),
        };
        let records = self.open_stream(command::MONITOR, &request, false).await?;
        Ok(LogStream { records })
    }

    /// Stops a stream or monitor.
    pub async fn stop(&self, handle: StreamHandle) -> Result<(), Error> {
        {
            let mut dispatch = self.dispatch();
            dispatch.handlers.remove(&handle.0);
            dispatch.stopped.insert(handle.0);
        }
        let request = StopRequest { stop: handle.0 };
        self.call::<_, ()>(command::STOP, Some(&request), false)
            .await?;
        Ok(())
    }

    /// Starts a query; acks and responses arrive on the returned stream until the deadline.
    pub async fn query(&self, query: &Query) -> Result<QueryStream, Error> {
        let request = QueryRequest {
            filter_nodes: query.filter_nodes.clone(),
            filter_tags: query.filter_tags.clone(),
            request_ack: query.request_ack,
            relay_factor: query.relay_factor,
            timeout: query.timeout.map_or(0, |timeout| {
                i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX)
            }),
            name: query.name.clone(),
            payload: query.payload.clone(),
        };
        let records = self.open_stream(command::QUERY, &request, true).await?;
        Ok(QueryStream {
            records,
            done: false,
        })
    }

    /// Answers a query received on an event stream.
    pub async fn respond(&self, id: u64, payload: &[u8]) -> Result<(), Error> {
        let request = RespondRequest {
            id,
            payload: payload.to_vec(),
        };
        self.call::<_, ()>(command::RESPOND, Some(&request), false)
            .await?;
        Ok(())
    }

    /// The agent's debugging statistics.
    pub async fn stats(&self) -> Result<Stats, Error> {
        let raw: Option<RawStats> = self.call::<(), _>(command::STATS, None, true).await?;
        Ok(raw.map(Stats::from).unwrap_or_default())
    }

    /// The cached network coordinate of `node` (`None` if the agent has none).
    pub async fn get_coordinate(&self, node: &str) -> Result<Option<Coordinate>, Error> {
        let request = CoordinateRequest {
            node: node.to_owned(),
        };
        let response: Option<CoordinateResponse> = self
            .call(command::GET_COORDINATE, Some(&request), true)
            .await?;
        Ok(response
            .filter(|response| response.ok)
            .map(|response| response.coord))
    }

    async fn key_call(&self, name: &str, key: Option<&str>) -> Result<KeyResponse, Error> {
        let (response, error) = self.key_answer(name, key).await?;
        let Some(mut message) = error else {
            return Ok(response);
        };
        if !response.messages.is_empty() {
            let details: Vec<String> = response
                .messages
                .iter()
                .map(|(node, text)| format!("{node}: {text}"))
                .collect();
            message = format!("{message} ({})", details.join("; "));
        }
        Err(self.agent_error(name, message))
    }

    /// A key command's whole answer: the response, and the agent's error text if it reported
    /// one (the response then names each member that failed).
    async fn key_answer(
        &self,
        name: &str,
        key: Option<&str>,
    ) -> Result<(KeyResponse, Option<String>), Error> {
        let (header, body) = match key {
            Some(key) => {
                let request = KeyRequest {
                    key: key.to_owned(),
                };
                self.call_raw(name, Some(&request), true).await?
            }
            None => self.call_raw::<()>(name, None, true).await?,
        };
        let response: KeyResponse = self.decode_body(body)?.unwrap_or_default();
        if header.error.is_empty() {
            return Ok((response, None));
        }
        if body_less(&header.error) {
            return Err(self.agent_error(name, header.error));
        }
        Ok((response, Some(header.error)))
    }

    /// Runs a key command and returns the response together with the agent's error text,
    /// as `serf keys` needs them: on failure it prints every member's message.
    pub async fn key_command(
        &self,
        command: KeyCommand,
    ) -> Result<(KeyResponse, Option<String>), Error> {
        match command {
            KeyCommand::Install(key) => self.key_answer(command::INSTALL_KEY, Some(&key)).await,
            KeyCommand::Use(key) => self.key_answer(command::USE_KEY, Some(&key)).await,
            KeyCommand::Remove(key) => self.key_answer(command::REMOVE_KEY, Some(&key)).await,
            KeyCommand::List => self.key_answer(command::LIST_KEYS, None).await,
        }
    }

    /// Installs a new encryption key (base64) on every member.
    pub async fn install_key(&self, key: &str) -> Result<KeyResponse, Error> {
        self.key_call(command::INSTALL_KEY, Some(key)).await
    }

    /// Makes `key` the primary encryption key on every member.
    pub async fn use_key(&self, key: &str) -> Result<KeyResponse, Error> {
        self.key_call(command::USE_KEY, Some(key)).await
    }

    /// Removes `key` from every member's keyring.
    pub async fn remove_key(&self, key: &str) -> Result<KeyResponse, Error> {
        self.key_call(command::REMOVE_KEY, Some(key)).await
    }

    /// Lists the keys installed across the cluster (`keys`: key → number of members).
    pub async fn list_keys(&self) -> Result<KeyResponse, Error> {
        self.key_call(command::LIST_KEYS, None).await
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, Dispatch> {
    inner
        .dispatch
        .lock()
        .expect("client dispatch lock is never poisoned")
}

/// The records of one stream (events, log lines or query replies); stops the stream in the
/// background when dropped without [`Client::stop`].
#[derive(Debug)]
struct Records {
    handle: StreamHandle,
    records: mpsc::Receiver<Vec<u8>>,
    client: Client,
}

impl Records {
    /// The next record, decoded as `what`; `None` once the stream is stopped or the
    /// connection closes.
    async fn next<T: DeserializeOwned>(&mut self, what: &'static str) -> Option<Result<T, Error>> {
        let frame = self.records.recv().await?;
        Some(decode(what, &frame).map_err(|error| Error::Protocol {
            addr: self.client.inner.addr.clone(),
            reason: error.to_string(),
        }))
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        let handle = self.handle;
        let still_running = lock(&self.client.inner).handlers.contains_key(&handle.0);
        if !still_running {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.stop(handle).await;
            });
        }
    }
}

/// Events from [`Client::stream`].
#[derive(Debug)]
pub struct EventStream {
    records: Records,
}

impl EventStream {
    /// The handle for [`Client::stop`].
    pub fn handle(&self) -> StreamHandle {
        self.records.handle
    }

    /// The next event; `None` once the stream is stopped or the connection closes.
    pub async fn recv(&mut self) -> Option<Result<StreamEvent, Error>> {
        loop {
            let record: AnyEventRecord = match self.records.next("event record").await? {
                Ok(record) => record,
                Err(error) => return Some(Err(error)),
            };
            let event = match record.event.as_str() {
                "user" => StreamEvent::User {
                    ltime: record.ltime,
                    name: record.name,
                    payload: record.payload,
                    coalesce: record.coalesce,
                },
                "query" => StreamEvent::Query {
                    responder: record.id,
                    ltime: record.ltime,
                    name: record.name,
                    payload: record.payload,
                },
                other => match MemberEventKind::parse(other) {
                    Some(kind) => StreamEvent::Member {
                        kind,
                        members: record.members,
                    },
                    None => {
                        debug!(event = other, "skipping an unknown stream record");
                        continue;
                    }
                },
            };
            return Some(Ok(event));
        }
    }
}

/// Log lines from [`Client::monitor`].
#[derive(Debug)]
pub struct LogStream {
    records: Records,
}

impl LogStream {
    /// The handle for [`Client::stop`].
    pub fn handle(&self) -> StreamHandle {
        self.records.handle
    }

    /// The next log line; `None` once stopped or closed.
    pub async fn recv(&mut self) -> Option<Result<String, Error>> {
        let record = self.records.next::<LogRecord>("log record").await?;
        Some(record.map(|record| record.log))
    }
}

/// Acks and responses from [`Client::query`].
#[derive(Debug)]
pub struct QueryStream {
    records: Records,
    done: bool,
}

impl QueryStream {
    /// The handle (a query ends by itself at its deadline).
    pub fn handle(&self) -> StreamHandle {
        self.records.handle
    }

    /// The next ack or response; `None` when the query is done or the connection closed.
    pub async fn recv(&mut self) -> Option<Result<QueryReply, Error>> {
        loop {
            if self.done {
                return None;
            }
            let record: QueryRecord = match self.records.next("query record").await? {
                Ok(record) => record,
                Err(error) => return Some(Err(error)),
            };
            match record.kind.as_str() {
                // A Go agent may send acks from "" once the query's ack channel closed (a
                // race at its deadline); Go's client ends the query there, and so do we.
                query_record::ACK if record.from.is_empty() => {
                    self.done = true;
                    return None;
                }
                query_record::ACK => return Some(Ok(QueryReply::Ack(record.from))),
                query_record::RESPONSE => {
                    return Some(Ok(QueryReply::Response {
                        from: record.from,
                        payload: record.payload,
                    }))
                }
                query_record::DONE => {
                    self.done = true;
                    return None;
                }
                other => debug!(kind = other, "skipping an unknown query record"),
            }
        }
    }
}

/// What to do with the frame after a header.
enum Next {
    /// Nothing follows.
    Nothing,
    /// Read a body and hand it to the reply.
    Reply(
        oneshot::Sender<(ResponseHeader, Option<Vec<u8>>)>,
        ResponseHeader,
    ),
    /// Read a record and pass it to the stream.
    Record(mpsc::Sender<Vec<u8>>, u64),
    /// Read a body and drop it.
    Discard,
    /// Unknown sequence: look at the next value to tell a body from a header.
    Unknown,
}

async fn read_loop(inner: Arc<Inner>, read: OwnedReadHalf) {
    let mut frames = Frames {
        buffer: FrameBuffer::new(MAX_FRAME),
        chunk: vec![0u8; 16 * 1024],
        read,
    };
    let reason = match read_responses(&inner, &mut frames).await {
        Ok(never) => match never {},
        Err(reason) => reason,
    };
    debug!(addr = %inner.addr, %reason, "rpc connection closed");
    let mut dispatch = lock(&inner);
    dispatch.closed = Some(reason);
    // Dropping the handlers fails pending replies and ends every stream.
    dispatch.handlers.clear();
}

/// The frames the agent sends.
struct Frames {
    buffer: FrameBuffer,
    chunk: Vec<u8>,
    read: OwnedReadHalf,
}

impl Frames {
    /// The next whole frame, or why the connection is over.
    async fn next(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(frame) = self
                .buffer
                .next_frame()
                .map_err(|error| error.to_string())?
            {
                return Ok(frame);
            }
            match self.read.read(&mut self.chunk).await {
                Ok(0) => return Err("the agent closed the connection".to_owned()),
                Ok(n) => self.buffer.extend(&self.chunk[..n]),
                Err(error) => return Err(io_reason(&error)),
            }
        }
    }
}

/// Reads headers and what follows them, handing each to its handler, until the connection
/// fails; returns why.
async fn read_responses(inner: &Inner, frames: &mut Frames) -> Result<Infallible, String> {
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let frame = match pending.take() {
            Some(frame) => frame,
            None => frames.next().await?,
        };
        let header: ResponseHeader =
            decode("responseHeader", &frame).map_err(|error| error.to_string())?;
        match route(inner, header) {
            Next::Nothing => {}
            Next::Reply(reply, header) => {
                let body = frames.next().await?;
                let _ = reply.send((header, Some(body)));
            }
            Next::Record(sender, seq) => {
                let body = frames.next().await?;
                pass_record(inner, &sender, seq, body);
            }
            Next::Discard => {
                frames.next().await?;
            }
            Next::Unknown => {
                // A header for a sequence we no longer track: its body, if any, is not a header.
                let frame = frames.next().await?;
                if looks_like_header(&frame) {
                    pending = Some(frame);
                }
            }
        }
    }
}

/// What a response header means to its handler: a reply is answered here when no body
/// follows, a stream's first header starts it (or ends it, with an error).
fn route(inner: &Inner, header: ResponseHeader) -> Next {
    let mut dispatch = lock(inner);
    let seq = header.seq;
    match dispatch.handlers.remove(&seq) {
        Some(Handler::Reply { body, reply }) => {
            if body && !body_less(&header.error) {
                Next::Reply(reply, header)
            } else {
                let _ = reply.send((header, None));
                Next::Nothing
            }
        }
        Some(Handler::Stream {
            init,
            records,
            query,
        }) => {
            let next = match init {
                // The stream's first header: it started, or failed and is over.
                Some(init) => {
                    let failed = !header.error.is_empty();
                    let _ = init.send(header);
                    if failed {
                        return Next::Nothing;
                    }
                    Next::Nothing
                }
                None => Next::Record(records.clone(), seq),
            };
            dispatch.handlers.insert(
                seq,
                Handler::Stream {
                    init: None,
                    records,
                    query,
                },
            );
            next
        }
        None if dispatch.stopped.contains(&seq) => Next::Discard,
        None => Next::Unknown,
    }
}

/// Hands a stream's record to its reader: dropped when the reader lags; a reader gone
/// stops the stream, a query's last record ends it.
fn pass_record(inner: &Inner, sender: &mpsc::Sender<Vec<u8>>, seq: u64, body: Vec<u8>) {
    let is_done = is_query_done(inner, seq, &body);
    match sender.try_send(body) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!(seq, "dropping a stream record, the reader is too slow");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            let mut dispatch = lock(inner);
            dispatch.handlers.remove(&seq);
            dispatch.stopped.insert(seq);
        }
    }
    if is_done {
        lock(inner).handlers.remove(&seq);
    }
}

/// Errors after which the agent sends no body, whatever the command.
fn body_less(error: &str) -> bool {
    error == errors::AUTH_REQUIRED
        || error == errors::HANDSHAKE_REQUIRED
        || error == errors::UNSUPPORTED_COMMAND
}

fn is_query_done(inner: &Inner, seq: u64, body: &[u8]) -> bool {
    let is_query = matches!(
        lock(inner).handlers.get(&seq),
        Some(Handler::Stream { query: true, .. })
    );
    is_query
        && decode::<QueryRecord>("query record", body)
            .map(|record| record.kind == query_record::DONE)
            .unwrap_or(false)
}

/// Whether a frame is a `responseHeader` (a map with only `Seq` and `Error` keys).
fn looks_like_header(frame: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(non_snake_case, dead_code)]
    struct Strict {
        Seq: u64,
        Error: String,
    }
    decode::<Strict>("responseHeader", frame).is_ok()
}
