//! An in-memory [`Backend`]: a pretend cluster for tests and demos of the RPC server.
//!
//! It holds a member list with one local member, a keyring, coordinates and canned query
//! answers, and behaves like a Go agent where the RPC can see it: joins succeed only for
//! addresses registered with [`MemoryBackend::add_joinable`], events and tag changes reach
//! `stream` subscribers (the sender gets its own events, like Serf), queries are acked by every
//! live matching member and answered by those given [`MemoryBackend::answer_queries`] and by
//! RPC clients that `respond` to the local copy, and every operation logs a Go-style line for
//! `monitor`. The real member replaces it by implementing the same trait.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backend::{
    Backend, BackendError, Event, KeyOp, LogLevel, LogLine, MemberEventKind, QueryHandle,
    QueryParams, QueryReply, QueryResponder,
};
use super::filter::MemberFilter;
use super::messages::{Coordinate, KeyResponse, MemberRow, Stats};

/// Serf's default limit on a user event's name plus payload.
pub const USER_EVENT_SIZE_LIMIT: usize = 512;

/// A pretend Serf member and its cluster, all in memory.
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    logs: broadcast::Sender<LogLine>,
    /// The last [`LOG_BACKLOG`] lines, replayed to a new monitor (as Go's log writer does).
    backlog: Mutex<std::collections::VecDeque<LogLine>>,
    shutdown: CancellationToken,
}

/// Log lines kept for new monitors, like the Go agent's 512-line log writer.
pub const LOG_BACKLOG: usize = 512;

#[derive(Debug)]
struct State {
    local: String,
    members: BTreeMap<String, MemberRow>,
    joinable: HashMap<String, MemberRow>,
    answers: HashMap<(String, String), Vec<u8>>,
    coordinates: HashMap<String, Coordinate>,
    keyring: Option<Vec<String>>,
    event_ltime: u64,
    query_ltime: u64,
}

/// The member record Serf would report for a node of this version.
pub fn member(name: &str, addr: SocketAddr, tags: &[(&str, &str)]) -> MemberRow {
    MemberRow {
        name: name.to_owned(),
        addr: addr.ip(),
        port: addr.port(),
        tags: tags
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        status: "alive".to_owned(),
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 5,
    }
}

/// Go's `NewCoordinate` for the default config: the origin, error 1.5, height 10 µs.
pub fn origin() -> Coordinate {
    Coordinate {
        vec: vec![0.0; 8],
        error: 1.5,
        adjustment: 0.0,
        height: 1.0e-5,
    }
}

impl MemoryBackend {
    /// A cluster of one: the local member `name` at `addr` with `tags`.
    pub fn new(name: &str, addr: SocketAddr, tags: &[(&str, &str)]) -> Arc<Self> {
        let local = member(name, addr, tags);
        let (events, _) = broadcast::channel(512);
        let (logs, _) = broadcast::channel(512);
        let mut coordinates = HashMap::new();
        coordinates.insert(name.to_owned(), origin());
        Arc::new(Self {
            state: Mutex::new(State {
                local: name.to_owned(),
                members: BTreeMap::from([(name.to_owned(), local)]),
                joinable: HashMap::new(),
                answers: HashMap::new(),
                coordinates,
                keyring: None,
                event_ltime: 1,
                query_ltime: 1,
            }),
            events,
            logs,
            backlog: Mutex::new(std::collections::VecDeque::new()),
            shutdown: CancellationToken::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("memory backend lock is never poisoned")
    }

    /// How many event and log subscriptions are open (each RPC stream or monitor holds one).
    pub fn subscribers(&self) -> usize {
        self.events.receiver_count() + self.logs.receiver_count()
    }

    /// Cancelled when an RPC `leave` shuts the member down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Adds (or replaces) a member and announces it as `member-join`.
    pub fn add_member(&self, member: MemberRow) {
        let name = member.name.clone();
        self.state()
            .coordinates
            .entry(name.clone())
            .or_insert_with(origin);
        self.state().members.insert(name.clone(), member.clone());
        self.log(
            LogLevel::Info,
            &format!("serf: EventMemberJoin: {name} {}", member.addr),
        );
        self.emit(Event::Member {
            kind: MemberEventKind::Join,
            members: vec![member],
        });
    }

    /// Sets a member's status (`failed`, `left`, `alive`) and announces the change.
    pub fn set_status(&self, name: &str, status: &str) {
        let changed = {
            let mut state = self.state();
            state.members.get_mut(name).map(|member| {
                member.status = status.to_owned();
                member.clone()
            })
        };
        if let Some(member) = changed {
            let kind = match status {
                "failed" => MemberEventKind::Failed,
                "left" | "leaving" => MemberEventKind::Leave,
                "alive" => MemberEventKind::Join,
                _ => MemberEventKind::Update,
            };
            self.log(LogLevel::Info, &format!("serf: {kind}: {name}"));
            self.emit(Event::Member {
                kind,
                members: vec![member],
            });
        }
    }

    /// Lets a `join` to `addr` (as given, e.g. `127.0.0.2:7946`) succeed, adding `member`.
    pub fn add_joinable(&self, addr: &str, member: MemberRow) {
        self.state().joinable.insert(addr.to_owned(), member);
    }

    /// Makes `node` answer every query named `name` with `payload`.
    pub fn answer_queries(&self, node: &str, name: &str, payload: &[u8]) {
        self.state()
            .answers
            .insert((node.to_owned(), name.to_owned()), payload.to_vec());
    }

    /// Sets the coordinate reported for `node`.
    pub fn set_coordinate(&self, node: &str, coordinate: Coordinate) {
        self.state().coordinates.insert(node.to_owned(), coordinate);
    }

    /// Turns encryption on with these base64 keys (the first is primary).
    pub fn set_keyring(&self, keys: &[&str]) {
        self.state().keyring = Some(keys.iter().map(|key| (*key).to_owned()).collect());
    }

    /// Emits a log line for `monitor` subscribers, formatted like Go's logger.
    pub fn log(&self, level: LogLevel, message: &str) {
        let line = LogLine {
            level,
            text: format!(
                "{} [{}] {message}",
                go_log_time(std::time::SystemTime::now()),
                level.as_str()
            ),
        };
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        if backlog.len() == LOG_BACKLOG {
            backlog.pop_front();
        }
        backlog.push_back(line.clone());
        let _ = self.logs.send(line);
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn local(&self) -> MemberRow {
        let state = self.state();
        state.members[&state.local].clone()
    }
}

/// `2006/01/02 15:04:05` in UTC, Go's `log.LstdFlags` layout (the monitor's lines here and
/// in the binary's log layer).
pub fn go_log_time(now: std::time::SystemTime) -> String {
    let seconds = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}/{month:02}/{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The local member's copy of a query, answerable once before its deadline.
#[derive(Debug)]
struct LocalQuery {
    from: String,
    deadline: Instant,
    replies: mpsc::Sender<QueryReply>,
    responded: Mutex<bool>,
}

impl QueryResponder for LocalQuery {
    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn respond(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        let mut responded = self
            .responded
            .lock()
            .expect("responder lock is never poisoned");
        if *responded {
            return Err(BackendError::new("response already sent"));
        }
        if Instant::now() > self.deadline {
            return Err(BackendError::new("response is past the deadline"));
        }
        if payload.len() > 1024 {
            return Err(BackendError::new(format!(
                "response exceeds limit of {} bytes",
                1024
            )));
        }
        *responded = true;
        let _ = self.replies.try_send(QueryReply::Response {
            from: self.from.clone(),
            payload,
        });
        Ok(())
    }
}

/// Go's default query timeout: gossip interval × 16 × ceil(log10(n + 1)).
fn default_query_timeout(n_members: usize) -> Duration {
    let scale = ((n_members as f64 + 1.0).log10().ceil()).max(1.0);
    Duration::from_millis(200 * 16).mul_f64(scale)
}

impl Backend for MemoryBackend {
    async fn members(&self) -> Vec<MemberRow> {
        self.state().members.values().cloned().collect()
    }

    async fn join(&self, addrs: Vec<String>, _replay: bool) -> (u32, Result<(), BackendError>) {
        self.log(LogLevel::Info, &format!("agent: joining: {addrs:?}"));
        let mut joined = Vec::new();
        let mut failures = Vec::new();
        for addr in &addrs {
            let found = self.state().joinable.get(addr).cloned();
            match found {
                Some(member) => joined.push(member),
                None => failures.push(format!(
                    "Failed to join {addr}: no Serf member answers there"
                )),
            }
        }
        let n = joined.len() as u32;
        for member in joined {
            let known = self.state().members.contains_key(&member.name);
            if !known {
                self.add_member(member);
            }
        }
        if n == 0 {
            let mut text = format!("{} error(s) occurred:\n", failures.len());
            for failure in failures {
                text.push_str(&format!("\t* {failure}\n"));
            }
            return (0, Err(BackendError(text)));
        }
        self.log(LogLevel::Info, &format!("agent: joined: {n} nodes"));
        (n, Ok(()))
    }

    async fn leave(&self) -> Result<(), BackendError> {
        let local = self.local().name;
        self.log(LogLevel::Info, "serf: gracefully leaving");
        self.set_status(&local, "left");
        Ok(())
    }

    async fn shutdown(&self) {
        self.log(LogLevel::Info, "agent: shutdown complete");
        self.shutdown.cancel();
    }

    async fn force_leave(&self, node: String, prune: bool) -> Result<(), BackendError> {
        self.log(
            LogLevel::Info,
            &format!("agent: Force leaving node: {node}"),
        );
        let status = self
            .state()
            .members
            .get(&node)
            .map(|member| member.status.clone());
        if status.as_deref() == Some("failed") || (prune && status.is_some()) {
            if prune {
                let removed = self.state().members.remove(&node);
                if let Some(member) = removed {
                    self.emit(Event::Member {
                        kind: MemberEventKind::Reap,
                        members: vec![member],
                    });
                }
            } else {
                self.set_status(&node, "left");
            }
        }
        Ok(())
    }

    async fn user_event(
        &self,
        name: String,
        payload: Vec<u8>,
        coalesce: bool,
    ) -> Result<(), BackendError> {
        if name.len() + payload.len() > USER_EVENT_SIZE_LIMIT {
            return Err(BackendError(format!(
                "user event exceeds configured limit of {USER_EVENT_SIZE_LIMIT} bytes before encoding"
            )));
        }
        let ltime = {
            let mut state = self.state();
            let ltime = state.event_ltime;
            state.event_ltime += 1;
            ltime
        };
        self.log(
            LogLevel::Debug,
            &format!(
                "agent: Requesting user event send: {name}. Coalesced: {coalesce}. Payload: {:?}",
                String::from_utf8_lossy(&payload)
            ),
        );
        self.log(
            LogLevel::Info,
            &format!("agent: Received event: user-event: {name}"),
        );
        self.emit(Event::User {
            ltime,
            name,
            payload,
            coalesce,
        });
        Ok(())
    }

    async fn tags(&self) -> BTreeMap<String, String> {
        self.local().tags
    }

    async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), BackendError> {
        let member = {
            let mut state = self.state();
            let local = state.local.clone();
            let member = state
                .members
                .get_mut(&local)
                .expect("the local member is always in the list");
            member.tags = tags;
            member.clone()
        };
        self.log(
            LogLevel::Info,
            &format!("serf: EventMemberUpdate: {}", member.name),
        );
        self.emit(Event::Member {
            kind: MemberEventKind::Update,
            members: vec![member],
        });
        Ok(())
    }

    async fn query(&self, params: QueryParams) -> Result<QueryHandle, BackendError> {
        let filter = MemberFilter::new(&params.filter_tags, "", "")
            .map_err(|error| BackendError(error.to_string()))?;
        let (members, local, answers, ltime) = {
            let mut state = self.state();
            let ltime = state.query_ltime;
            state.query_ltime += 1;
            (
                state.members.values().cloned().collect::<Vec<_>>(),
                state.local.clone(),
                state.answers.clone(),
                ltime,
            )
        };
        let timeout = params
            .timeout
            .unwrap_or_else(|| default_query_timeout(members.len()));
        let deadline = Instant::now() + timeout;
        let (replies, receiver) = mpsc::channel(members.len() * 2 + 16);
        self.log(
            LogLevel::Debug,
            &format!("agent: Requesting query send: {}", params.name),
        );
        let targets = members.iter().filter(|member| {
            member.status == "alive"
                && (params.filter_nodes.is_empty() || params.filter_nodes.contains(&member.name))
                && filter.matches(member)
        });
        let mut local_targeted = false;
        for member in targets {
            if params.request_ack {
                let _ = replies.try_send(QueryReply::Ack(member.name.clone()));
            }
            if member.name == local {
                local_targeted = true;
            }
            if let Some(payload) = answers.get(&(member.name.clone(), params.name.clone())) {
                let _ = replies.try_send(QueryReply::Response {
                    from: member.name.clone(),
                    payload: payload.clone(),
                });
            }
        }
        if local_targeted && !params.name.starts_with("_serf_") {
            self.emit(Event::Query {
                ltime,
                name: params.name,
                payload: params.payload,
                responder: Arc::new(LocalQuery {
                    from: local,
                    deadline,
                    replies,
                    responded: Mutex::new(false),
                }),
            });
        }
        Ok(QueryHandle {
            deadline,
            replies: receiver,
        })
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn subscribe_logs(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        // Holding the backlog lock while subscribing keeps the two free of gaps and overlaps.
        let backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        (backlog.iter().cloned().collect(), self.logs.subscribe())
    }

    async fn stats(&self) -> Stats {
        let state = self.state();
        let count = |status: &str| {
            state
                .members
                .values()
                .filter(|member| member.status == status)
                .count()
                .to_string()
        };
        let local = &state.members[&state.local];
        let section = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(key, value)| ((*key).to_owned(), value.clone()))
                .collect()
        };
        let cpus = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .to_string();
        BTreeMap::from([
            (
                "agent".to_owned(),
                section(&[("name", state.local.clone())]),
            ),
            (
                "runtime".to_owned(),
                section(&[
                    ("os", std::env::consts::OS.to_owned()),
                    ("arch", std::env::consts::ARCH.to_owned()),
                    ("version", "rust".to_owned()),
                    ("max_procs", cpus.clone()),
                    ("goroutines", "0".to_owned()),
                    ("cpu_count", cpus),
                ]),
            ),
            (
                "serf".to_owned(),
                section(&[
                    ("members", state.members.len().to_string()),
                    ("failed", count("failed")),
                    ("left", count("left")),
                    ("health_score", "0".to_owned()),
                    ("member_time", "1".to_owned()),
                    ("event_time", state.event_ltime.to_string()),
                    ("query_time", state.query_ltime.to_string()),
                    ("intent_queue", "0".to_owned()),
                    ("event_queue", "0".to_owned()),
                    ("query_queue", "0".to_owned()),
                    ("encrypted", state.keyring.is_some().to_string()),
                    ("coordinate_resets", "0".to_owned()),
                ]),
            ),
            ("tags".to_owned(), local.tags.clone()),
            ("event_handlers".to_owned(), BTreeMap::new()),
        ])
    }

    async fn coordinate(&self, node: String) -> Option<Coordinate> {
        self.state().coordinates.get(&node).cloned()
    }

    async fn keys(&self, op: KeyOp) -> (KeyResponse, Result<(), BackendError>) {
        let mut state = self.state();
        let alive: Vec<String> = state
            .members
            .values()
            .filter(|member| member.status == "alive")
            .map(|member| member.name.clone())
            .collect();
        let n = alive.len() as i64;
        let mut response = KeyResponse {
            num_nodes: n,
            ..KeyResponse::default()
        };
        let key = match &op {
            KeyOp::Install(key) | KeyOp::Use(key) | KeyOp::Remove(key) => Some(key.clone()),
            KeyOp::List => None,
        };
        if let Some(key) = &key {
            if let Err(error) = check_key(key) {
                return (response, Err(error));
            }
        }
        let outcome: Result<(), String> = match (&mut state.keyring, op) {
            (None, KeyOp::List) => Err("Keyring is empty (encryption not enabled)".to_owned()),
            (None, _) => Err("No keyring to modify (encryption not enabled)".to_owned()),
            (Some(keyring), KeyOp::Install(key)) => {
                if !keyring.contains(&key) {
                    keyring.push(key);
                }
                Ok(())
            }
            (Some(keyring), KeyOp::Use(key)) => match keyring.iter().position(|k| *k == key) {
                Some(index) => {
                    let key = keyring.remove(index);
                    keyring.insert(0, key);
                    Ok(())
                }
                None => Err("Requested key is not in the keyring".to_owned()),
            },
            (Some(keyring), KeyOp::Remove(key)) => {
                if keyring.first() == Some(&key) {
                    Err("Removing the primary key is not allowed".to_owned())
                } else {
                    keyring.retain(|k| *k != key);
                    Ok(())
                }
            }
            (Some(keyring), KeyOp::List) => {
                response.keys = keyring.iter().map(|key| (key.clone(), n)).collect();
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                response.num_resp = n;
                (response, Ok(()))
            }
            Err(message) => {
                response.num_resp = n;
                response.num_err = n;
                response.messages = alive
                    .into_iter()
                    .map(|name| (name, message.clone()))
                    .collect();
                (
                    response,
                    Err(BackendError(format!("{n}/{n} nodes reported failure"))),
                )
            }
        }
    }
}

/// A keyring key must be base64 of 16, 24 or 32 bytes.
fn check_key(key: &str) -> Result<(), BackendError> {
    let valid_chars = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if !valid_chars || key.len() % 4 != 0 {
        return Err(BackendError(format!("illegal base64 data in key {key:?}")));
    }
    let padding = key.bytes().rev().take_while(|b| *b == b'=').count();
    let decoded = key.len() / 4 * 3 - padding;
    if ![16, 24, 32].contains(&decoded) {
        return Err(BackendError(format!(
            "key size must be 16, 24 or 32 bytes, got {decoded}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_in_go_layout() {
        let check = |secs: u64, expected: &str| {
            assert_eq!(
                super::go_log_time(UNIX_EPOCH + Duration::from_secs(secs)),
                expected
            );
        };
        check(0, "1970/01/01 00:00:00");
        check(951_782_400, "2000/02/29 00:00:00");
        check(1_800_000_000 + 3_723, "2027/01/15 09:02:03");
    }
}
