//! What the RPC server needs from a Serf member: the [`Backend`] trait.
//!
//! The server owns the protocol (framing, handshake, auth, sequence numbers, streams, Serf's
//! error strings); the backend owns the cluster. Request/response commands are async methods.
//! Streams are channels: [`Backend::subscribe_events`] and [`Backend::subscribe_logs`] hand out
//! `tokio::sync::broadcast` receivers (a slow RPC client lags and loses records, it never
//! blocks the member), and [`Backend::query`] returns an `mpsc` receiver of acks and responses
//! plus the deadline at which the server sends `done`.
//!
//! Errors are [`BackendError`]s carrying the exact text a Go agent would send, because the
//! server forwards it verbatim in the response header.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::messages::{Coordinate, KeyResponse, MemberRow, Stats};

/// An error a backend reports; its text goes to the RPC client unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl BackendError {
    /// An error with the given text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

/// The kind of a membership event, named as Serf names it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberEventKind {
    /// `member-join`
    Join,
    /// `member-leave`
    Leave,
    /// `member-failed`
    Failed,
    /// `member-update`
    Update,
    /// `member-reap`
    Reap,
}

impl MemberEventKind {
    /// The wire name (`member-join`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "member-join",
            Self::Leave => "member-leave",
            Self::Failed => "member-failed",
            Self::Update => "member-update",
            Self::Reap => "member-reap",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "member-join" => Self::Join,
            "member-leave" => Self::Leave,
            "member-failed" => Self::Failed,
            "member-update" => Self::Update,
            "member-reap" => Self::Reap,
            _ => return None,
        })
    }
}

impl fmt::Display for MemberEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets an RPC client answer a query it received on an event stream (`respond`).
pub trait QueryResponder: Send + Sync + fmt::Debug {
    /// When the query stops accepting responses.
    fn deadline(&self) -> Instant;
    /// Sends `payload` as this member's response. Errors use Serf's texts, e.g. "response
    /// already sent" or "response is past the deadline".
    fn respond(&self, payload: Vec<u8>) -> Result<(), BackendError>;
}

/// An event as a `stream` carries it, on either side: `R` is how its query is answered, a
/// [`QueryResponder`] in the agent ([`Event`]) or the per-connection id that
/// [`Client::respond`](super::Client::respond) takes ([`StreamEvent`](super::StreamEvent)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRecord<R> {
    /// Members joined, left, failed, were updated or reaped.
    Member {
        /// Which kind.
        kind: MemberEventKind,
        /// The members concerned.
        members: Vec<MemberRow>,
    },
    /// A user event.
    User {
        /// Lamport time of the event.
        ltime: u64,
        /// Event name.
        name: String,
        /// Payload.
        payload: Vec<u8>,
        /// Whether it may be coalesced.
        coalesce: bool,
    },
    /// A query this member received.
    Query {
        /// How to answer it.
        responder: R,
        /// Lamport time of the query.
        ltime: u64,
        /// Query name.
        name: String,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// An event delivered to `stream` subscribers.
pub type Event = StreamRecord<Arc<dyn QueryResponder>>;

impl<R> StreamRecord<R> {
    /// The event type name a stream filter matches (`member-join`, `user`, `query`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Member { kind, .. } => kind.as_str(),
            Self::User { .. } => "user",
            Self::Query { .. } => "query",
        }
    }
}

/// Log levels of the `monitor` command, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// `TRACE`
    Trace,
    /// `DEBUG`
    Debug,
    /// `INFO`
    Info,
    /// `WARN`
    Warn,
    /// `ERR`
    Err,
}

impl LogLevel {
    /// Parses Serf's level names, case-insensitively.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_uppercase().as_str() {
            "TRACE" => Self::Trace,
            "DEBUG" => Self::Debug,
            "INFO" => Self::Info,
            "WARN" => Self::Warn,
            "ERR" => Self::Err,
            _ => return None,
        })
    }

    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "TRACE",
            Self::Debug => "DEBUG",
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Err => "ERR",
        }
    }
}

/// One log line for `monitor` subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level (the monitor's filter compares against it).
    pub level: LogLevel,
    /// The whole line as the client should print it, e.g. `2024/01/02 03:04:05 [INFO] agent: …`.
    pub text: String,
}

/// Parameters of a query started over RPC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryParams {
    /// Query name.
    pub name: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Only these nodes (empty = all).
    pub filter_nodes: Vec<String>,
    /// Tag name → anchored regex.
    pub filter_tags: BTreeMap<String, String>,
    /// Ask for acks.
    pub request_ack: bool,
    /// Relay factor.
    pub relay_factor: u8,
    /// `None` = the member's default timeout.
    pub timeout: Option<std::time::Duration>,
}

/// One answer to a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryReply {
    /// `from` acknowledged.
    Ack(String),
    /// `from` responded with `payload`.
    Response {
        /// The node.
        from: String,
        /// Its payload.
        payload: Vec<u8>,
    },
}

/// A running query: answers arrive on `replies` until `deadline`.
#[derive(Debug)]
pub struct QueryHandle {
    /// When the server sends `done` and stops.
    pub deadline: Instant,
    /// Acks and responses.
    pub replies: mpsc::Receiver<QueryReply>,
}

/// A keyring operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOp {
    /// `install-key`
    Install(String),
    /// `use-key`
    Use(String),
    /// `remove-key`
    Remove(String),
    /// `list-keys`
    List,
}

/// The member behind an RPC server.
///
/// Methods return `impl Future + Send` so implementations can use `async fn`. The server calls
/// them from per-connection tasks; an implementation must be cheap to call concurrently.
pub trait Backend: Send + Sync + 'static {
    /// All known members, including this one.
    fn members(&self) -> impl Future<Output = Vec<MemberRow>> + Send;

    /// Joins the cluster through `addrs`; returns how many were contacted and the error, if any
    /// (a partial join reports both).
    fn join(
        &self,
        addrs: Vec<String>,
        replay: bool,
    ) -> impl Future<Output = (u32, Result<(), BackendError>)> + Send;

    /// Leaves the cluster gracefully. The server replies, then calls [`Backend::shutdown`].
    fn leave(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Stops the member after a `leave` (the agent exits in Go).
    fn shutdown(&self) -> impl Future<Output = ()> + Send;

    /// Forces a failed node into `left` (or removes it with `prune`).
    fn force_leave(
        &self,
        node: String,
        prune: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Sends a user event.
    fn user_event(
        &self,
        name: String,
        payload: Vec<u8>,
        coalesce: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// This member's current tags.
    fn tags(&self) -> impl Future<Output = BTreeMap<String, String>> + Send;

    /// Replaces this member's tags.
    fn set_tags(
        &self,
        tags: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Starts a query.
    fn query(
        &self,
        params: QueryParams,
    ) -> impl Future<Output = Result<QueryHandle, BackendError>> + Send;

    /// Subscribes to member, user and query events.
    fn subscribe_events(&self) -> broadcast::Receiver<Event>;

    /// Subscribes to log lines: returns the recent backlog (Go agents replay their last 512
    /// lines to a new monitor) and a receiver for every line after it, without gap or overlap.
    fn subscribe_logs(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>);

    /// The `stats` map (`agent`, `runtime`, `serf`, `tags`, `event_handlers`).
    fn stats(&self) -> impl Future<Output = Stats> + Send;

    /// The cached coordinate of `node`.
    fn coordinate(&self, node: String) -> impl Future<Output = Option<Coordinate>> + Send;

    /// A keyring operation across the cluster; the response is sent even with an error.
    fn keys(
        &self,
        op: KeyOp,
    ) -> impl Future<Output = (KeyResponse, Result<(), BackendError>)> + Send;
}
