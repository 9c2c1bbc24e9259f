//! The [`Backend`] of a real member: [`MemberBackend`] answers RPC commands with a running
//! [`crate::member::Handle`], the way `serf agent` answers them with its `*serf.Serf`.
//!
//! The backend is passive: whoever owns the member's event receiver passes every
//! [`serf::serf::Event`] to [`MemberBackend::handle_event`], which turns it into `stream`
//! events and routes query acks and responses to the RPC query that asked. Log lines for
//! `monitor` come from a [`LogRing`] that the binary's tracing layer fills.
//!
//! Key commands run the key queries across the cluster through the Serf handle, as Go's
//! agent does with its `KeyManager`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::backend::{
    Backend, BackendError, Event, KeyOp, LogLine, MemberEventKind, QueryHandle, QueryParams,
    QueryReply, QueryResponder,
};
use super::messages::{Coordinate, KeyResponse, MemberRow, Stats};
use crate::member::Handle;
use serf::serf::{self as layer, default_query_timeout, KeyOperation, ResponderId};

/// Log lines kept for a new `monitor` (the Go agent keeps 512).
pub const LOG_BACKLOG: usize = 512;

/// The recent log lines of a process and a broadcast of new ones, for `monitor`.
#[derive(Debug)]
pub struct LogRing {
    backlog: Mutex<VecDeque<LogLine>>,
    lines: broadcast::Sender<LogLine>,
}

impl Default for LogRing {
    fn default() -> Self {
        Self {
            backlog: Mutex::new(VecDeque::with_capacity(LOG_BACKLOG)),
            lines: broadcast::channel(LOG_BACKLOG).0,
        }
    }
}

impl LogRing {
    /// Keeps `line` and sends it to current subscribers.
    pub fn push(&self, line: LogLine) {
        let mut backlog = lock(&self.backlog);
        if backlog.len() == LOG_BACKLOG {
            backlog.pop_front();
        }
        backlog.push_back(line.clone());
        // Sent under the lock so that `subscribe` sees each line exactly once.
        let _ = self.lines.send(line);
    }

    /// The backlog and a receiver of every later line, without gap or overlap.
    pub fn subscribe(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let backlog = lock(&self.backlog);
        (backlog.iter().cloned().collect(), self.lines.subscribe())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Static facts for `serf info`.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    /// This member's node name.
    pub node_name: String,
    /// The configured event handlers at start (`event_handlers` section, as the spec
    /// strings); replaced by [`MemberBackend::set_event_handlers`] on a reload.
    pub event_handlers: Vec<String>,
    /// Gossip interval, for the default query timeout.
    pub gossip_interval: std::time::Duration,
    /// Query timeout multiplier (Serf's `QueryTimeoutMult`).
    pub query_timeout_mult: u32,
}

/// RPC queries waiting for acks and responses.
#[derive(Debug, Default)]
struct Queries {
    waiting: HashMap<layer::QueryHandle, mpsc::Sender<QueryReply>>,
    /// Answers that arrived before the RPC side registered (the driver is faster than us).
    early: HashMap<layer::QueryHandle, Vec<QueryReply>>,
}

/// [`Backend`] over a running member.
#[derive(Debug)]
pub struct MemberBackend {
    handle: Handle,
    info: AgentInfo,
    /// The event handlers `serf info` shows: `info.event_handlers` until a reload.
    event_handlers: Mutex<Vec<String>>,
    events: broadcast::Sender<Event>,
    logs: Arc<LogRing>,
    queries: Mutex<Queries>,
    stopped: tokio_util::sync::CancellationToken,
}

impl MemberBackend {
    /// A backend for `handle`. `stopped` is cancelled when an RPC client asks the member to
    /// stop (`leave` then `shutdown`, as `serf leave` does).
    pub fn new(
        handle: Handle,
        info: AgentInfo,
        logs: Arc<LogRing>,
        stopped: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            handle,
            event_handlers: Mutex::new(info.event_handlers.clone()),
            info,
            events: broadcast::channel(1024).0,
            logs,
            queries: Mutex::new(Queries::default()),
            stopped,
        }
    }

    /// Replaces the event handlers `serf info` lists (the agent reloaded them).
    pub fn set_event_handlers(&self, event_handlers: Vec<String>) {
        *lock(&self.event_handlers) = event_handlers;
    }

    /// Feeds one member event: membership and user events and queries go to `stream`
    /// subscribers; acks and responses go to the RPC query that asked.
    pub fn handle_event(&self, event: &layer::Event) {
        let member_event = |kind, member: &layer::Member| Event::Member {
            kind,
            members: vec![to_rpc(member)],
        };
        let out = match event {
            layer::Event::MemberJoin(member) => member_event(MemberEventKind::Join, member),
            layer::Event::MemberLeave(member) => member_event(MemberEventKind::Leave, member),
            layer::Event::MemberFailed(member) => member_event(MemberEventKind::Failed, member),
            layer::Event::MemberUpdate(member) => member_event(MemberEventKind::Update, member),
            layer::Event::MemberReap(member) => member_event(MemberEventKind::Reap, member),
            layer::Event::UserEvent(user) => Event::User {
                ltime: user.ltime.0,
                name: user.name.clone(),
                payload: user.payload.clone(),
                coalesce: user.coalesce,
            },
            layer::Event::Query(query) => Event::Query {
                ltime: query.ltime.0,
                name: query.name.clone(),
                payload: query.payload.clone(),
                responder: Arc::new(Responder {
                    handle: self.handle.clone(),
                    id: query.id,
                    deadline: Instant::from_std(query.deadline),
                    sent: AtomicBool::new(false),
                }),
            },
            layer::Event::QueryAck { query, from } => {
                return self.reply(*query, QueryReply::Ack(from.clone()));
            }
            layer::Event::QueryResponse {
                query,
                from,
                payload,
            } => {
                let reply = QueryReply::Response {
                    from: from.clone(),
                    payload: payload.clone(),
                };
                return self.reply(*query, reply);
            }
            layer::Event::QueryDone { query } => {
                let mut queries = lock(&self.queries);
                queries.waiting.remove(query);
                queries.early.remove(query);
                return;
            }
            _ => return,
        };
        let _ = self.events.send(out);
    }

    fn reply(&self, query: layer::QueryHandle, reply: QueryReply) {
        let mut queries = lock(&self.queries);
        match queries.waiting.get(&query) {
            Some(waiting) => {
                let _ = waiting.try_send(reply);
            }
            None => queries.early.entry(query).or_default().push(reply),
        }
    }

    async fn local_tags(&self) -> BTreeMap<String, String> {
        self.handle
            .members()
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|member| member.name == self.info.node_name)
            .map(|member| member.tags)
            .unwrap_or_default()
    }
}

/// The `event_handlers` section as Go's agent fills it: one `event:name` key per filter of
/// each `[filter[,filter…]=]command` spec (`*:` with no filter).
fn handler_stats(specs: &[String]) -> BTreeMap<String, String> {
    let mut section = BTreeMap::new();
    for spec in specs {
        let (filters, command) = spec.split_once('=').unwrap_or(("*", spec));
        for filter in filters.split(',') {
            let key = match filter.split_once(':') {
                Some(_) => filter.to_owned(),
                None => format!("{filter}:"),
            };
            section.insert(key, command.to_owned());
        }
    }
    section
}

/// The RPC form of a member.
pub fn to_rpc(member: &layer::Member) -> MemberRow {
    let [protocol_min, protocol_max, protocol_cur, delegate_min, delegate_max, delegate_cur] =
        member.versions;
    MemberRow {
        name: member.name.clone(),
        addr: member.addr,
        port: member.port,
        tags: member.tags.clone(),
        status: member.status.to_string(),
        protocol_min,
        protocol_max,
        protocol_cur,
        delegate_min,
        delegate_max,
        delegate_cur,
    }
}

fn error(error: impl std::fmt::Display) -> BackendError {
    BackendError(error.to_string())
}

/// Answers a query from another member on behalf of an RPC client (`respond`).
#[derive(Debug)]
struct Responder {
    handle: Handle,
    id: ResponderId,
    deadline: Instant,
    sent: AtomicBool,
}

impl QueryResponder for Responder {
    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn respond(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        if Instant::now() > self.deadline {
            return Err(BackendError::new("response is past the deadline"));
        }
        if self.sent.swap(true, Ordering::SeqCst) {
            return Err(BackendError::new("response already sent"));
        }
        let (handle, id) = (self.handle.clone(), self.id);
        tokio::spawn(async move {
            if let Err(error) = handle.respond(id, &payload).await {
                tracing::debug!(%error, "query response refused");
            }
        });
        Ok(())
    }
}

impl Backend for MemberBackend {
    async fn members(&self) -> Vec<MemberRow> {
        let mut members: Vec<MemberRow> = self
            .handle
            .members()
            .await
            .unwrap_or_default()
            .iter()
            .map(to_rpc)
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        members
    }

    async fn join(&self, addrs: Vec<String>, replay: bool) -> (u32, Result<(), BackendError>) {
        let mut seeds = Vec::new();
        let mut failures = Vec::new();
        for addr in &addrs {
            // Serf's default port when none is given, as `serf join HOST` does.
            let with_port = match tokio::net::lookup_host(addr.clone()).await {
                Ok(found) => {
                    seeds.extend(found);
                    continue;
                }
                Err(_) => format!("{addr}:7946"),
            };
            match tokio::net::lookup_host(with_port).await {
                Ok(found) => seeds.extend(found),
                Err(lookup) => failures.push(format!("Failed to resolve {addr}: {lookup}")),
            }
        }
        let result = if seeds.is_empty() {
            Err(failures)
        } else {
            match self.handle.join(&seeds, !replay).await {
                Ok(n) => return (n as u32, Ok(())),
                Err(crate::member::Error::JoinFailed { errors }) => {
                    failures.extend(
                        errors
                            .into_iter()
                            .map(|(seed, why)| format!("Failed to join {seed}: {why}")),
                    );
                    Err(failures)
                }
                Err(other) => Err(vec![other.to_string()]),
            }
        };
        match result {
            Ok(()) => (0, Ok(())),
            Err(failures) => {
                let mut text = format!("{} error(s) occurred:\n", failures.len());
                for failure in failures {
                    text.push_str(&format!("\t* {failure}\n"));
                }
                (0, Err(BackendError(text)))
            }
        }
    }

    async fn leave(&self) -> Result<(), BackendError> {
        self.handle.leave().await.map_err(error)
    }

    async fn shutdown(&self) {
        self.stopped.cancel();
    }

    async fn force_leave(&self, node: String, prune: bool) -> Result<(), BackendError> {
        self.handle.force_leave(&node, prune).await.map_err(error)
    }

    async fn user_event(
        &self,
        name: String,
        payload: Vec<u8>,
        coalesce: bool,
    ) -> Result<(), BackendError> {
        self.handle
            .user_event(&name, &payload, coalesce)
            .await
            .map_err(error)
    }

    async fn tags(&self) -> BTreeMap<String, String> {
        self.local_tags().await
    }

    async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), BackendError> {
        self.handle.set_tags(tags).await.map_err(error)
    }

    async fn query(&self, params: QueryParams) -> Result<QueryHandle, BackendError> {
        let n_members = self.handle.members().await.map(|m| m.len()).unwrap_or(1);
        let timeout = params.timeout.unwrap_or_else(|| {
            default_query_timeout(
                self.info.gossip_interval,
                self.info.query_timeout_mult,
                n_members,
            )
        });
        let layer_params = layer::QueryParams {
            filter_nodes: params.filter_nodes,
            filter_tags: params.filter_tags,
            request_ack: params.request_ack,
            relay_factor: params.relay_factor,
            timeout: Some(timeout),
        };
        let deadline = Instant::now() + timeout;
        let query = self
            .handle
            .query(&params.name, &params.payload, layer_params)
            .await
            .map_err(error)?;
        let (replies, receiver) = mpsc::channel(n_members * 2 + 16);
        let mut queries = lock(&self.queries);
        for early in queries.early.remove(&query).unwrap_or_default() {
            let _ = replies.try_send(early);
        }
        queries.waiting.insert(query, replies);
        Ok(QueryHandle {
            deadline,
            replies: receiver,
        })
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn subscribe_logs(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        self.logs.subscribe()
    }

    async fn stats(&self) -> Stats {
        let section = |pairs: Vec<(&str, String)>| -> BTreeMap<String, String> {
            pairs
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect()
        };
        let cpus = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .to_string();
        let handlers = handler_stats(&lock(&self.event_handlers));
        BTreeMap::from([
            (
                "agent".to_owned(),
                section(vec![("name", self.info.node_name.clone())]),
            ),
            (
                "runtime".to_owned(),
                section(vec![
                    ("os", std::env::consts::OS.to_owned()),
                    ("arch", std::env::consts::ARCH.to_owned()),
                    ("version", format!("amb-serf {}", env!("CARGO_PKG_VERSION"))),
                    ("max_procs", cpus.clone()),
                    ("goroutines", "0".to_owned()),
                    ("cpu_count", cpus),
                ]),
            ),
            (
                "serf".to_owned(),
                self.handle.stats().await.unwrap_or_default(),
            ),
            ("tags".to_owned(), self.local_tags().await),
            ("event_handlers".to_owned(), handlers),
        ])
    }

    async fn coordinate(&self, node: String) -> Option<Coordinate> {
        let coordinate = self.handle.coordinate(&node).await.ok()??;
        Some(Coordinate {
            vec: coordinate.vec,
            error: coordinate.error,
            adjustment: coordinate.adjustment,
            height: coordinate.height,
        })
    }

    /// As Go's `KeyManager`: a `_serf_<op>` query to every member, their answers counted. A
    /// member without encryption answers that it has no keyring, so without encryption this
    /// reports every node's failure, exactly as a Go agent does.
    async fn keys(&self, op: KeyOp) -> (KeyResponse, Result<(), BackendError>) {
        let decode = |key: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_err(|error| BackendError::new(error.to_string()))
        };
        let operation = match op {
            KeyOp::Install(key) => decode(&key).map(KeyOperation::Install),
            KeyOp::Use(key) => decode(&key).map(KeyOperation::Use),
            KeyOp::Remove(key) => decode(&key).map(KeyOperation::Remove),
            KeyOp::List => Ok(KeyOperation::List),
        };
        let operation = match operation {
            Ok(operation) => operation,
            Err(error) => return (KeyResponse::default(), Err(error)),
        };
        let report = match self.handle.keys(operation).await {
            Ok(report) => report,
            Err(error) => {
                return (
                    KeyResponse::default(),
                    Err(BackendError::new(error.to_string())),
                )
            }
        };
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let response = KeyResponse {
            messages: report.messages.clone(),
            keys: report
                .keys
                .iter()
                .map(|(key, n)| (key.clone(), count(*n)))
                .collect(),
            num_nodes: count(report.num_nodes),
            num_err: count(report.num_err),
            num_resp: count(report.num_resp),
        };
        let result = match report.error() {
            Some(error) => Err(BackendError::new(error)),
            None => Ok(()),
        };
        (response, result)
    }
}
