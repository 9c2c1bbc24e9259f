//! A small client for etcd's v3 JSON gateway: leases, put, delete, range and watch by prefix,
//! with failover between endpoints.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tracing::{debug, info};

use super::endpoints::{Endpoint, Endpoints};
use super::Error;

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// How long one unary request may take, connection included, before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP connect to one endpoint may take before failing over to the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest watch message we buffer; etcd's own default request limit is 1.5 MiB.
const MAX_MESSAGE: usize = 8 << 20;

/// A lease ID as etcd assigns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// One key and its value, as read by [`Client::range_prefix`] or a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (lossily decoded as UTF-8).
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated.
    Put(KeyValue),
    /// The key was deleted or its lease expired.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

/// An etcd v3 client over the JSON gateway. Cheap to clone; clones share connections and the
/// endpoint in use.
///
/// Every call goes to the endpoint that last worked. When it cannot be reached (or answers
/// 5xx), the call moves on to the next endpoint, and the one that answers becomes current.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    endpoints: Endpoints,
    current: AtomicUsize,
}

impl Client {
    /// A client for `endpoints`. Connects lazily: nothing is sent until the first call.
    pub fn new(endpoints: Endpoints) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        // A watch is an idle connection that may stay silent for hours; TCP keep-alive is
        // what notices a peer that vanished without a reset (about 25 s), so it is re-listed.
        connector.set_keepalive(Some(Duration::from_secs(10)));
        connector.set_keepalive_interval(Some(Duration::from_secs(5)));
        connector.set_keepalive_retries(Some(3));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                http,
                endpoints,
                current: AtomicUsize::new(0),
            }),
        }
    }

    /// The endpoints this client fails over between.
    pub fn endpoints(&self) -> &Endpoints {
        &self.inner.endpoints
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Response {
            #[serde(rename = "ID", deserialize_with = "int")]
            id: i64,
            #[serde(rename = "TTL", deserialize_with = "int")]
            ttl: i64,
            error: String,
        }
        let body = json!({ "TTL": ttl_seconds(ttl) });
        let (endpoint, response): (_, Response) =
            self.call("lease grant", "/v3/lease/grant", body).await?;
        if !response.error.is_empty() || response.id == 0 {
            return Err(Error::Decode {
                endpoint,
                operation: "lease grant".to_owned(),
                reason: format!("no lease granted: {:?}", response.error),
            });
        }
        Ok((LeaseId(response.id), seconds(response.ttl)))
    }

    /// Refreshes `lease` once. Returns its new TTL, or `None` when etcd no longer knows the
    /// lease (it expired or etcd lost its data): then its keys are gone too.
    pub async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Response {
            #[serde(rename = "TTL", deserialize_with = "int")]
            ttl: i64,
        }
        let operation = format!("lease keep-alive {:x}", lease.0);
        // The gateway exposes the bidirectional stream as one request in, a stream of
        // `{"result": ...}` lines out; one request gets one line and the stream ends.
        let (endpoint, bytes) = self
            .call_raw(&operation, "/v3/lease/keepalive", json!({ "ID": lease.0 }))
            .await?;
        let line = bytes
            .split(|byte| *byte == b'\n')
            .find(|line| !line.iter().all(u8::is_ascii_whitespace))
            .unwrap_or_default();
        let response: Response = parse_stream_message(&endpoint, &operation, line)?;
        Ok((response.ttl > 0).then(|| seconds(response.ttl)))
    }

    /// Revokes `lease`, deleting every key attached to it at once. An unknown lease is not an
    /// error (it is already gone).
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), Error> {
        let operation = format!("lease revoke {:x}", lease.0);
        match self
            .call::<serde_json::Value>(&operation, "/v3/lease/revoke", json!({ "ID": lease.0 }))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.is_lease_not_found() => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Puts `value` at `key`, attached to `lease` if given. Returns the new revision.
    pub async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64, Error> {
        let mut body = json!({ "key": BASE64.encode(key), "value": BASE64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = json!(lease.0);
        }
        let response: HeaderOnly = self
            .call(&format!("put {key}"), "/v3/kv/put", body)
            .await?
            .1;
        Ok(response.header.revision)
    }

    /// Deletes `key`. Returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Response {
            #[serde(deserialize_with = "int")]
            deleted: i64,
        }
        let body = json!({ "key": BASE64.encode(key) });
        let response: Response = self
            .call(&format!("delete {key}"), "/v3/kv/deleterange", body)
            .await?
            .1;
        Ok(response.deleted)
    }

    /// Every key under `prefix` with its value, and the store revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Response {
            header: Header,
            kvs: Vec<RawKeyValue>,
        }
        let body = json!({
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix.as_bytes())),
        });
        let response: Response = self
            .call(&format!("range {prefix}"), "/v3/kv/range", body)
            .await?
            .1;
        let kvs = response.kvs.into_iter().map(KeyValue::from).collect();
        Ok((kvs, response.header.revision))
    }

    /// Watches every key under `prefix` from `start_revision` on (0: from now). Returns once
    /// etcd has confirmed the watch, so no later change can be missed.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch, Error> {
        let operation = format!("watch {prefix}");
        let body = json!({ "create_request": {
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix.as_bytes())),
            "start_revision": start_revision,
        }});
        let (endpoint, response) = self
            .failover(&operation, |endpoint| {
                let request = self.request(endpoint, &operation, "/v3/watch", &body);
                let operation = &operation;
                async move {
                    let response = tokio::time::timeout(REQUEST_TIMEOUT, request?)
                        .await
                        .map_err(|_| transport(endpoint, operation, "timed out"))?
                        .map_err(|error| transport(endpoint, operation, error))?;
                    let status = response.status();
                    if !status.is_success() {
                        let body = collect(endpoint, operation, response.into_body()).await?;
                        return Err(status_error(endpoint, operation, status.as_u16(), &body));
                    }
                    Ok(response.into_body())
                }
            })
            .await?;
        let mut watch = Watch {
            endpoint,
            operation,
            body: response,
            buffer: Vec::new(),
        };
        let created = tokio::time::timeout(REQUEST_TIMEOUT, watch.next_message())
            .await
            .map_err(|_| transport(&watch.endpoint, &watch.operation, "no confirmation"))??;
        match created {
            Some(message) if message.created && !message.canceled => Ok(watch),
            Some(message) => Err(watch.canceled(&message)),
            None => Err(transport(&watch.endpoint, &watch.operation, "stream ended")),
        }
    }

    /// POSTs `body` to `path` with failover and decodes the JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(String, T), Error> {
        let (endpoint, bytes) = self.call_raw(operation, path, body).await?;
        let value = serde_json::from_slice(&bytes).map_err(|error| Error::Decode {
            endpoint: endpoint.clone(),
            operation: operation.to_owned(),
            reason: error.to_string(),
        })?;
        Ok((endpoint, value))
    }

    async fn call_raw(
        &self,
        operation: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(String, Bytes), Error> {
        self.failover(operation, |endpoint| {
            let request = self.request(endpoint, operation, path, &body);
            async move {
                let exchange = async {
                    let response = request?
                        .await
                        .map_err(|error| transport(endpoint, operation, error))?;
                    let status = response.status();
                    let bytes = collect(endpoint, operation, response.into_body()).await?;
                    if !status.is_success() {
                        return Err(status_error(endpoint, operation, status.as_u16(), &bytes));
                    }
                    Ok(bytes)
                };
                tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                    .await
                    .map_err(|_| transport(endpoint, operation, "timed out"))?
            }
        })
        .await
    }

    /// Runs `attempt` against the current endpoint, then the following ones while the error
    /// says etcd is unavailable there. One extra round on the first endpoint tried gives a
    /// pooled connection that etcd closed (after a restart) a second chance.
    async fn failover<'a, T, F, Fut>(
        &'a self,
        operation: &str,
        attempt: F,
    ) -> Result<(String, T), Error>
    where
        F: Fn(&'a Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let endpoints = self.inner.endpoints.as_slice();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..=endpoints.len() {
            let index = (start + step) % endpoints.len();
            let endpoint = &endpoints[index];
            match attempt(endpoint).await {
                Ok(value) => {
                    if index != start {
                        self.inner.current.store(index, Ordering::Relaxed);
                        info!(%endpoint, "using etcd endpoint");
                    }
                    return Ok((endpoint.to_string(), value));
                }
                Err(error) if error.is_unavailable() => {
                    debug!(%endpoint, operation, %error, "etcd endpoint unavailable");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.expect("Endpoints is never empty, so the loop ran at least once"))
    }

    fn request(
        &self,
        endpoint: &Endpoint,
        operation: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<hyper_util::client::legacy::ResponseFuture, Error> {
        let uri = format!("{}{path}", endpoint.base_url());
        let request = hyper::Request::post(&uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            // etcd's "require leader" gRPC metadata, which the gateway forwards: a member cut
            // off from the leader fails requests and closes watches instead of serving stale
            // data or staying silent, so we fail over and re-list elsewhere.
            .header("grpc-metadata-hasleader", "true")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|error| {
                transport(
                    endpoint,
                    operation,
                    format!("bad request URI {uri:?}: {error}"),
                )
            })?;
        Ok(self.inner.http.request(request))
    }
}

/// A running watch on a prefix, from [`Client::watch_prefix`]. Dropping it closes the stream.
#[derive(Debug)]
pub struct Watch {
    endpoint: String,
    operation: String,
    body: Incoming,
    buffer: Vec<u8>,
}

impl Watch {
    /// The next batch of changes and the store revision after them. `Ok(None)` when etcd ended
    /// the stream; an error when the connection broke or etcd canceled the watch (for example
    /// because its start revision was compacted). Either way, re-list and watch again.
    pub async fn next(&mut self) -> Result<Option<(Vec<Event>, i64)>, Error> {
        loop {
            let Some(message) = self.next_message().await? else {
                return Ok(None);
            };
            if message.canceled {
                return Err(self.canceled(&message));
            }
            if let Some(batch) = batch(message) {
                return Ok(Some(batch));
            }
        }
    }

    /// The endpoint this watch runs on, `host:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn next_message(&mut self) -> Result<Option<WatchMessage>, Error> {
        loop {
            if let Some(newline) = self.buffer.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=newline).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_stream_message(&self.endpoint, &self.operation, &line).map(Some);
            }
            match self.body.frame().await {
                None if self.buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => {
                    let line = std::mem::take(&mut self.buffer);
                    return parse_stream_message(&self.endpoint, &self.operation, &line).map(Some);
                }
                Some(Err(error)) => return Err(transport(&self.endpoint, &self.operation, error)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                    if self.buffer.len() > MAX_MESSAGE {
                        return Err(Error::Decode {
                            endpoint: self.endpoint.clone(),
                            operation: self.operation.clone(),
                            reason: format!("message longer than {MAX_MESSAGE} bytes"),
                        });
                    }
                }
            }
        }
    }

    fn canceled(&self, message: &WatchMessage) -> Error {
        let reason = if message.compact_revision > 0 {
            format!(
                "canceled: compacted up to revision {}",
                message.compact_revision
            )
        } else {
            format!("canceled: {:?}", message.cancel_reason)
        };
        transport(&self.endpoint, &self.operation, reason)
    }
}

impl Error {
    /// Whether etcd said the lease does not exist (expired, revoked, or etcd lost its data).
    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, message, .. } if message.contains("lease not found"))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Header {
    #[serde(deserialize_with = "int")]
    revision: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HeaderOnly {
    header: Header,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawKeyValue {
    #[serde(deserialize_with = "base64_bytes")]
    key: Vec<u8>,
    #[serde(deserialize_with = "base64_bytes")]
    value: Vec<u8>,
    #[serde(deserialize_with = "int")]
    mod_revision: i64,
    #[serde(deserialize_with = "int")]
    lease: i64,
}

impl From<RawKeyValue> for KeyValue {
    fn from(raw: RawKeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&raw.key).into_owned(),
            value: raw.value,
            mod_revision: raw.mod_revision,
            lease: raw.lease,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WatchMessage {
    header: Header,
    created: bool,
    canceled: bool,
    #[serde(deserialize_with = "int")]
    compact_revision: i64,
    cancel_reason: String,
    events: Vec<RawEvent>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEvent {
    /// `PUT` is the enum's zero value, so the gateway usually leaves it out.
    #[serde(rename = "type", deserialize_with = "enum_name")]
    kind: String,
    kv: RawKeyValue,
}

/// The events of one watch message and the revision after them; `None` when it has none (the
/// creation confirmation, progress notifications).
fn batch(message: WatchMessage) -> Option<(Vec<Event>, i64)> {
    if message.events.is_empty() {
        return None;
    }
    let events = message
        .events
        .into_iter()
        .map(|event| {
            let kv = KeyValue::from(event.kv);
            if event.kind == "DELETE" || event.kind == "1" {
                Event::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                }
            } else {
                Event::Put(kv)
            }
        })
        .collect();
    Some((events, message.header.revision))
}

/// Decodes one line of a watch stream as [`Watch::next`] does: `Ok(None)` for a message with
/// no events, an error for garbage, an `{"error": ...}` line or a canceled watch. Pure; it
/// exists for the fuzz target (`fuzz/fuzz_targets/etcd_values.rs`) and tests.
#[doc(hidden)]
pub fn decode_watch_line(line: &[u8]) -> Result<Option<(Vec<Event>, i64)>, Error> {
    let message: WatchMessage = parse_stream_message("-", "watch", line)?;
    if message.canceled {
        return Err(transport("-", "watch", "canceled"));
    }
    Ok(batch(message))
}

/// One line of a gateway stream: `{"result": {...}}` or `{"error": {...}}`.
fn parse_stream_message<T: DeserializeOwned + Default>(
    endpoint: &str,
    operation: &str,
    line: &[u8],
) -> Result<T, Error> {
    #[derive(Deserialize)]
    struct Line<T> {
        result: Option<T>,
        error: Option<serde_json::Value>,
    }
    let decode_error = |reason: String| Error::Decode {
        endpoint: endpoint.to_owned(),
        operation: operation.to_owned(),
        reason,
    };
    let parsed: Line<T> =
        serde_json::from_slice(line).map_err(|error| decode_error(error.to_string()))?;
    match (parsed.result, parsed.error) {
        (_, Some(error)) => {
            let status = error
                .get("http_code")
                .and_then(serde_json::Value::as_u64)
                .and_then(|code| u16::try_from(code).ok())
                .unwrap_or(500);
            Err(status_error(
                endpoint,
                operation,
                status,
                error.to_string().as_bytes(),
            ))
        }
        (Some(result), None) => Ok(result),
        (None, None) => Ok(T::default()),
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented; `\0` for "to the end of the keyspace").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn ttl_seconds(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

fn seconds(value: i64) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or(0))
}

async fn collect(endpoint: &Endpoint, operation: &str, body: Incoming) -> Result<Bytes, Error> {
    body.collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| transport(endpoint, operation, error))
}

fn transport(endpoint: impl ToString, operation: &str, error: impl Into<ErrorText>) -> Error {
    Error::Transport {
        endpoint: endpoint.to_string(),
        operation: operation.to_owned(),
        reason: error.into().0,
    }
}

fn status_error(endpoint: impl ToString, operation: &str, status: u16, body: &[u8]) -> Error {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Body {
        message: String,
        error: serde_json::Value,
    }
    let parsed: Body = serde_json::from_slice(body).unwrap_or_default();
    let message = if !parsed.message.is_empty() {
        parsed.message
    } else if let Some(text) = parsed.error.as_str() {
        text.to_owned()
    } else if let Some(text) = parsed.error.get("message").and_then(|m| m.as_str()) {
        text.to_owned()
    } else {
        String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
    };
    Error::Status {
        endpoint: endpoint.to_string(),
        operation: operation.to_owned(),
        status,
        message,
    }
}

/// An error's text with its sources (hyper's outer errors alone say little: "client error").
struct ErrorText(String);

impl From<&str> for ErrorText {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl From<String> for ErrorText {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl From<hyper::Error> for ErrorText {
    fn from(error: hyper::Error) -> Self {
        Self(crate::advertise::chain(&error))
    }
}

impl From<hyper_util::client::legacy::Error> for ErrorText {
    fn from(error: hyper_util::client::legacy::Error) -> Self {
        Self(crate::advertise::chain(&error))
    }
}

/// An int64 field: the gateway writes them as JSON strings, but accept numbers too.
fn int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Text(String),
    }
    match Int::deserialize(deserializer)? {
        Int::Number(number) => Ok(number),
        Int::Text(text) => text.parse().map_err(D::Error::custom),
    }
}

/// An enum field: its name as a string, or its number.
fn enum_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(name) => Ok(name),
        other => Ok(other.to_string()),
    }
}

fn base64_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    BASE64.decode(text).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/services/"), b"/services0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    fn message(line: &str) -> Result<WatchMessage, Error> {
        parse_stream_message("h:1", "watch /p/", line.as_bytes())
    }

    #[test]
    fn parses_gateway_watch_lines() {
        let created = message(r#"{"result":{"header":{"revision":"7"},"created":true}}"#)
            .expect("a created line parses");
        assert!(created.created);
        assert_eq!(created.header.revision, 7);

        let line = r#"{"result":{"header":{"revision":"9"},"events":[
            {"kv":{"key":"L3AvYQ==","value":"eA==","mod_revision":"8","lease":"42"}},
            {"type":"DELETE","kv":{"key":"L3AvYg==","mod_revision":"9"}}]}}"#
            .replace('\n', "");
        let parsed = message(&line).expect("an events line parses");
        assert_eq!(parsed.header.revision, 9);
        let kinds: Vec<_> = parsed.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["", "DELETE"], "PUT is the default, left out");
        let kvs: Vec<_> = parsed
            .events
            .into_iter()
            .map(|e| KeyValue::from(e.kv))
            .collect();
        assert_eq!(
            kvs[0],
            KeyValue {
                key: "/p/a".to_owned(),
                value: b"x".to_vec(),
                mod_revision: 8,
                lease: 42
            }
        );
        assert_eq!((kvs[1].key.as_str(), kvs[1].mod_revision), ("/p/b", 9));

        let canceled = message(r#"{"result":{"canceled":true,"compact_revision":"5"}}"#)
            .expect("a canceled line parses");
        assert!(canceled.canceled);
        assert_eq!(canceled.compact_revision, 5);
    }

    #[test]
    fn stream_errors_and_garbage_are_errors_naming_the_endpoint() {
        let error = message(r#"{"error":{"grpc_code":14,"http_code":503,"message":"no leader"}}"#)
            .map(|_| ())
            .expect_err("an error line");
        assert!(error.is_unavailable());
        assert!(
            error.to_string().contains("watch /p/ at h:1: HTTP 503"),
            "{error}"
        );
        let error = message("not json").map(|_| ()).expect_err("garbage");
        assert!(
            error
                .to_string()
                .starts_with("etcd watch /p/ at h:1: unexpected response"),
            "{error}"
        );
    }

    #[test]
    fn status_errors_carry_etcds_message() {
        let body = br#"{"error":"etcdserver: requested lease not found","code":5,"message":"etcdserver: requested lease not found"}"#;
        let error = status_error("h:1", "put /k", 404, body);
        assert!(error.is_lease_not_found());
        assert!(!error.is_unavailable());
        assert_eq!(
            error.to_string(),
            "etcd put /k at h:1: HTTP 404: etcdserver: requested lease not found"
        );
    }
}
