//! Serf's messages (serf/messages.go), carried as memberlist user payloads: one Serf type byte
//! and one msgpack value. Also the encodings Serf puts inside other fields: tags in node meta
//! (serf/serf.go `encodeTags`), query filters, internal-query payloads and the Vivaldi
//! coordinate in ping acks (serf/ping_delegate.go).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::codec::{self, Writer};
use super::DecodeError;
pub use super::{ip_from_bytes, ip_to_bytes};

/// Serf message type bytes (serf/messages.go `messageType`).
#[allow(missing_docs)]
pub mod kind {
    pub const LEAVE: u8 = 0;
    pub const JOIN: u8 = 1;
    pub const PUSH_PULL: u8 = 2;
    pub const USER_EVENT: u8 = 3;
    pub const QUERY: u8 = 4;
    pub const QUERY_RESPONSE: u8 = 5;
    pub const CONFLICT_RESPONSE: u8 = 6;
    pub const KEY_REQUEST: u8 = 7;
    pub const KEY_RESPONSE: u8 = 8;
    pub const RELAY: u8 = 9;
}

/// Query flag: the originator wants an ack.
pub const QUERY_FLAG_ACK: u32 = 1;
/// Query flag: do not re-broadcast.
pub const QUERY_FLAG_NO_BROADCAST: u32 = 2;
/// The magic first byte of tags encoded in node meta (serf protocol ≥ 3).
pub const TAG_MAGIC: u8 = 0xff;
/// The ping payload version byte that precedes a coordinate.
pub const PING_VERSION: u8 = 1;

/// `messageLeave`: a leave intent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Leave {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `Prune`: erase the member at once.
    #[serde(rename = "Prune")]
    pub prune: bool,
}

/// `messageJoin`: a join intent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Join {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
}

/// `userEvent`: one event inside a [`UserEvents`] slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct UserEventEntry {
    /// `Name`
    #[serde(rename = "Name", deserialize_with = "codec::string")]
    pub name: String,
    /// `Payload`
    #[serde(rename = "Payload", deserialize_with = "codec::bytes")]
    pub payload: Vec<u8>,
}

/// `userEvents`: the events seen at one Lamport time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct UserEvents {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `Events`
    #[serde(rename = "Events")]
    pub events: Vec<UserEventEntry>,
}

/// `messagePushPull`: Serf's state in a memberlist push-pull (after the `02` type byte).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PushPull {
    /// `LTime`: the member clock.
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `StatusLTimes`: every known member → its status Lamport time.
    #[serde(rename = "StatusLTimes")]
    pub status_ltimes: BTreeMap<String, u64>,
    /// `LeftMembers`
    #[serde(rename = "LeftMembers")]
    pub left_members: Vec<String>,
    /// `EventLTime`: the event clock.
    #[serde(rename = "EventLTime")]
    pub event_ltime: u64,
    /// `Events`: recent events; Go sends its whole ring with `nil` for empty slots.
    #[serde(rename = "Events")]
    pub events: Vec<Option<UserEvents>>,
    /// `QueryLTime`: the query clock.
    #[serde(rename = "QueryLTime")]
    pub query_ltime: u64,
}

/// `messageUserEvent`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct UserEvent {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `Name`
    #[serde(rename = "Name", deserialize_with = "codec::string")]
    pub name: String,
    /// `Payload`
    #[serde(rename = "Payload", deserialize_with = "codec::bytes")]
    pub payload: Vec<u8>,
    /// `CC`: may be coalesced.
    #[serde(rename = "CC")]
    pub cc: bool,
}

/// `messageQuery`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Query {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `ID`
    #[serde(rename = "ID")]
    pub id: u32,
    /// `Addr`: where responses go (IP bytes).
    #[serde(rename = "Addr", deserialize_with = "codec::bytes")]
    pub addr: Vec<u8>,
    /// `Port`
    #[serde(rename = "Port")]
    pub port: u16,
    /// `SourceNode`
    #[serde(rename = "SourceNode", deserialize_with = "codec::string")]
    pub source_node: String,
    /// `Filters`: each a [`Filter`] encoding.
    #[serde(rename = "Filters", deserialize_with = "codec::bytes_list")]
    pub filters: Vec<Vec<u8>>,
    /// `Flags`: [`QUERY_FLAG_ACK`], [`QUERY_FLAG_NO_BROADCAST`].
    #[serde(rename = "Flags")]
    pub flags: u32,
    /// `RelayFactor`
    #[serde(rename = "RelayFactor")]
    pub relay_factor: u8,
    /// `Timeout` (nanoseconds on the wire)
    #[serde(rename = "Timeout", deserialize_with = "duration_ns")]
    pub timeout: Duration,
    /// `Name`
    #[serde(rename = "Name", deserialize_with = "codec::string")]
    pub name: String,
    /// `Payload`
    #[serde(rename = "Payload", deserialize_with = "codec::bytes")]
    pub payload: Vec<u8>,
}

/// `messageQueryResponse` (an ack when `Flags` has [`QUERY_FLAG_ACK`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct QueryResponse {
    /// `LTime`
    #[serde(rename = "LTime")]
    pub ltime: u64,
    /// `ID`
    #[serde(rename = "ID")]
    pub id: u32,
    /// `From`
    #[serde(rename = "From", deserialize_with = "codec::string")]
    pub from: String,
    /// `Flags`
    #[serde(rename = "Flags")]
    pub flags: u32,
    /// `Payload`
    #[serde(rename = "Payload", deserialize_with = "codec::bytes")]
    pub payload: Vec<u8>,
}

/// A relayed query response: send `inner` (a full Serf message, `05 …`) to `dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Where the relaying member sends `inner`.
    pub dest: SocketAddr,
    /// The destination's node name.
    pub dest_name: String,
    /// The Serf message to deliver, type byte included.
    pub inner: Vec<u8>,
}

/// One Serf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerfMessage {
    /// type 0
    Leave(Leave),
    /// type 1
    Join(Join),
    /// type 2 (only in push-pull user state)
    PushPull(PushPull),
    /// type 3
    UserEvent(UserEvent),
    /// type 4
    Query(Query),
    /// type 5
    QueryResponse(QueryResponse),
    /// type 9
    Relay(Relay),
}

impl SerfMessage {
    /// The Serf type byte and msgpack body, as Go encodes them.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Self::Leave(leave) => {
                out.push(kind::LEAVE);
                Writer::new(&mut out)
                    .map(3)
                    .str("LTime")
                    .uint(leave.ltime)
                    .str("Node")
                    .str(&leave.node)
                    .str("Prune")
                    .bool(leave.prune);
            }
            Self::Join(join) => {
                out.push(kind::JOIN);
                Writer::new(&mut out)
                    .map(2)
                    .str("LTime")
                    .uint(join.ltime)
                    .str("Node")
                    .str(&join.node);
            }
            Self::PushPull(push_pull) => {
                out.push(kind::PUSH_PULL);
                encode_push_pull(push_pull, &mut out);
            }
            Self::UserEvent(event) => {
                out.push(kind::USER_EVENT);
                Writer::new(&mut out)
                    .map(4)
                    .str("CC")
                    .bool(event.cc)
                    .str("LTime")
                    .uint(event.ltime)
                    .str("Name")
                    .str(&event.name)
                    .str("Payload")
                    .bytes_or_nil(&event.payload);
            }
            Self::Query(query) => {
                out.push(kind::QUERY);
                let mut w = Writer::new(&mut out);
                w.map(11).str("Addr").bytes(&query.addr).str("Filters");
                if query.filters.is_empty() {
                    w.nil();
                } else {
                    w.array(query.filters.len());
                    for filter in &query.filters {
                        w.bytes(filter);
                    }
                }
                w.str("Flags")
                    .uint(query.flags.into())
                    .str("ID")
                    .uint(query.id.into())
                    .str("LTime")
                    .uint(query.ltime)
                    .str("Name")
                    .str(&query.name)
                    .str("Payload")
                    .bytes_or_nil(&query.payload)
                    .str("Port")
                    .uint(query.port.into())
                    .str("RelayFactor")
                    .uint(query.relay_factor.into())
                    .str("SourceNode")
                    .str(&query.source_node)
                    .str("Timeout")
                    .int(i64::try_from(query.timeout.as_nanos()).unwrap_or(i64::MAX));
            }
            Self::QueryResponse(response) => {
                out.push(kind::QUERY_RESPONSE);
                encode_query_response(response, &mut out);
            }
            Self::Relay(relay) => {
                out.push(kind::RELAY);
                let ip = ip_to_bytes(relay.dest.ip());
                Writer::new(&mut out)
                    .map(2)
                    .str("DestAddr")
                    .map(3)
                    .str("IP")
                    .bytes(&ip)
                    .str("Port")
                    .uint(relay.dest.port().into())
                    .str("Zone")
                    .str("")
                    .str("DestName")
                    .str(&relay.dest_name);
                out.extend_from_slice(&relay.inner);
            }
        }
        out
    }

    /// Decodes a Serf message (a memberlist user payload).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let Some((&kind, body)) = buf.split_first() else {
            return Err(DecodeError::Truncated {
                what: "serf message",
                need: 1,
                have: 0,
            });
        };
        Ok(match kind {
            kind::LEAVE => Self::Leave(codec::from_slice(body)?),
            kind::JOIN => Self::Join(codec::from_slice(body)?),
            kind::PUSH_PULL => Self::PushPull(codec::from_slice(body)?),
            kind::USER_EVENT => Self::UserEvent(codec::from_slice(body)?),
            kind::QUERY => Self::Query(codec::from_slice(body)?),
            kind::QUERY_RESPONSE => Self::QueryResponse(codec::from_slice(body)?),
            kind::RELAY => {
                let len = codec::value_len(body)?.ok_or(DecodeError::Truncated {
                    what: "relay header",
                    need: body.len() + 1,
                    have: body.len(),
                })?;
                let header: RelayHeader = codec::from_slice(&body[..len])?;
                let ip = ip_from_bytes(&header.dest_addr.ip).ok_or_else(|| {
                    DecodeError::Msgpack(format!(
                        "relay destination IP of {} bytes",
                        header.dest_addr.ip.len()
                    ))
                })?;
                let port = u16::try_from(header.dest_addr.port).map_err(|_| {
                    DecodeError::Msgpack(format!("relay port {}", header.dest_addr.port))
                })?;
                Self::Relay(Relay {
                    dest: SocketAddr::new(ip, port),
                    dest_name: header.dest_name,
                    inner: body[len..].to_vec(),
                })
            }
            other => return Err(DecodeError::UnexpectedType(other, "as a serf message")),
        })
    }
}

fn encode_push_pull(push_pull: &PushPull, out: &mut Vec<u8>) {
    let mut w = Writer::new(out);
    w.map(6).str("EventLTime").uint(push_pull.event_ltime);
    w.str("Events").array(push_pull.events.len());
    for slot in &push_pull.events {
        match slot {
            None => {
                w.nil();
            }
            Some(slot) => {
                w.map(2).str("Events").array(slot.events.len());
                for event in &slot.events {
                    w.map(2)
                        .str("Name")
                        .str(&event.name)
                        .str("Payload")
                        .bytes_or_nil(&event.payload);
                }
                w.str("LTime").uint(slot.ltime);
            }
        }
    }
    w.str("LTime").uint(push_pull.ltime);
    w.str("LeftMembers").array(push_pull.left_members.len());
    for name in &push_pull.left_members {
        w.str(name);
    }
    w.str("QueryLTime").uint(push_pull.query_ltime);
    w.str("StatusLTimes").map(push_pull.status_ltimes.len());
    for (name, ltime) in &push_pull.status_ltimes {
        w.str(name).uint(*ltime);
    }
}

fn encode_query_response(response: &QueryResponse, out: &mut Vec<u8>) {
    Writer::new(out)
        .map(5)
        .str("Flags")
        .uint(response.flags.into())
        .str("From")
        .str(&response.from)
        .str("ID")
        .uint(response.id.into())
        .str("LTime")
        .uint(response.ltime)
        .str("Payload")
        .bytes_or_nil(&response.payload);
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UdpAddr {
    #[serde(rename = "IP", deserialize_with = "codec::bytes")]
    ip: Vec<u8>,
    #[serde(rename = "Port")]
    port: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RelayHeader {
    #[serde(rename = "DestAddr")]
    dest_addr: UdpAddr,
    #[serde(rename = "DestName", deserialize_with = "codec::string")]
    dest_name: String,
}

fn duration_ns<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let nanos = i64::deserialize(deserializer)?;
    Ok(Duration::from_nanos(u64::try_from(nanos).unwrap_or(0)))
}

/// Tags as Serf puts them in node meta: `ff` + msgpack map (keys sorted here; Go's order is
/// random, so only decoded maps may be compared).
pub fn encode_tags(tags: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = vec![TAG_MAGIC];
    let mut w = Writer::new(&mut out);
    w.map(tags.len());
    for (key, value) in tags {
        w.str(key).str(value);
    }
    out
}

/// Tags from node meta: `ff` + map, or (old protocol, or no magic byte) the meta as `role`.
pub fn decode_tags(meta: &[u8]) -> Result<BTreeMap<String, String>, DecodeError> {
    match meta.split_first() {
        Some((&TAG_MAGIC, body)) => codec::from_slice(body),
        _ => Ok(BTreeMap::from([(
            "role".to_owned(),
            String::from_utf8_lossy(meta).into_owned(),
        )])),
    }
}

/// A query filter (serf/messages.go `filterNode`, `filterTag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// type 0: only these nodes.
    Nodes(Vec<String>),
    /// type 1: only members whose tag `tag` matches the unanchored regex `expr`.
    Tag {
        /// The tag name.
        tag: String,
        /// A Go regular expression, unanchored.
        expr: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FilterTag {
    #[serde(rename = "Tag", deserialize_with = "codec::string")]
    tag: String,
    #[serde(rename = "Expr", deserialize_with = "codec::string")]
    expr: String,
}

impl Filter {
    /// The filter's bytes as they go into [`Query::filters`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Nodes(nodes) => {
                out.push(0);
                let mut w = Writer::new(&mut out);
                w.array(nodes.len());
                for node in nodes {
                    w.str(node);
                }
            }
            Self::Tag { tag, expr } => {
                out.push(1);
                Writer::new(&mut out)
                    .map(2)
                    .str("Expr")
                    .str(expr)
                    .str("Tag")
                    .str(tag);
            }
        }
        out
    }

    /// Decodes one filter; an unknown filter type is an error (Go then skips the query).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        match buf.split_first() {
            Some((0, body)) => Ok(Self::Nodes(codec::from_slice(body)?)),
            Some((1, body)) => {
                let filter: FilterTag = codec::from_slice(body)?;
                Ok(Self::Tag {
                    tag: filter.tag,
                    expr: filter.expr,
                })
            }
            Some((&other, _)) => Err(DecodeError::UnexpectedType(other, "as a query filter")),
            None => Err(DecodeError::Truncated {
                what: "query filter",
                need: 1,
                have: 0,
            }),
        }
    }
}

/// A Vivaldi network coordinate (serf/coordinate `Coordinate`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Coordinate {
    /// `Vec`: the Euclidean part (8 dimensions in Serf).
    #[serde(rename = "Vec")]
    pub vec: Vec<f64>,
    /// `Error`
    #[serde(rename = "Error")]
    pub error: f64,
    /// `Adjustment`
    #[serde(rename = "Adjustment")]
    pub adjustment: f64,
    /// `Height`
    #[serde(rename = "Height")]
    pub height: f64,
}

impl Coordinate {
    /// The msgpack encoding (no version byte).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        w.map(4)
            .str("Adjustment")
            .f64(self.adjustment)
            .str("Error")
            .f64(self.error)
            .str("Height")
            .f64(self.height)
            .str("Vec")
            .array(self.vec.len());
        for component in &self.vec {
            w.f64(*component);
        }
    }

    /// A ping ack payload: [`PING_VERSION`] + the coordinate.
    pub fn to_ping_payload(&self) -> Vec<u8> {
        let mut out = vec![PING_VERSION];
        self.encode(&mut out);
        out
    }

    /// The coordinate in a ping ack payload; `Ok(None)` for an empty payload.
    pub fn from_ping_payload(payload: &[u8]) -> Result<Option<Self>, DecodeError> {
        match payload.split_first() {
            None => Ok(None),
            Some((&PING_VERSION, body)) => Ok(Some(codec::from_slice(body)?)),
            Some((&other, _)) => Err(DecodeError::UnexpectedType(other, "as a ping version")),
        }
    }
}

/// `keyRequest` payload of the key-management queries: `07` + `{Key}`.
pub fn encode_key_request(key: &[u8]) -> Vec<u8> {
    let mut out = vec![kind::KEY_REQUEST];
    Writer::new(&mut out).map(1).str("Key").bytes(key);
    out
}

/// The key in a `keyRequest` payload.
pub fn decode_key_request(buf: &[u8]) -> Result<Vec<u8>, DecodeError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct KeyRequest {
        #[serde(rename = "Key", deserialize_with = "codec::bytes")]
        key: Vec<u8>,
    }
    match buf.split_first() {
        Some((&kind::KEY_REQUEST, body)) => Ok(codec::from_slice::<KeyRequest>(body)?.key),
        _ => Err(DecodeError::UnexpectedType(
            buf.first().copied().unwrap_or(0),
            "as a key request",
        )),
    }
}

/// `nodeKeyResponse`: a member's answer to a key-management query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KeyResponse {
    /// `Result`
    #[serde(rename = "Result")]
    pub result: bool,
    /// `Message`
    #[serde(rename = "Message", deserialize_with = "codec::string")]
    pub message: String,
    /// `Keys` (base64), for list-keys
    #[serde(rename = "Keys")]
    pub keys: Option<Vec<String>>,
    /// `PrimaryKey` (base64), for list-keys
    #[serde(rename = "PrimaryKey", deserialize_with = "codec::string")]
    pub primary_key: String,
}

impl KeyResponse {
    /// `08` + the response.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![kind::KEY_RESPONSE];
        let mut w = Writer::new(&mut out);
        w.map(4).str("Keys");
        match &self.keys {
            None => {
                w.nil();
            }
            Some(keys) => {
                w.array(keys.len());
                for key in keys {
                    w.str(key);
                }
            }
        }
        w.str("Message")
            .str(&self.message)
            .str("PrimaryKey")
            .str(&self.primary_key)
            .str("Result")
            .bool(self.result);
        out
    }

    /// Decodes `08` + response.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        match buf.split_first() {
            Some((&kind::KEY_RESPONSE, body)) => codec::from_slice(body),
            _ => Err(DecodeError::UnexpectedType(
                buf.first().copied().unwrap_or(0),
                "as a key response",
            )),
        }
    }
}

/// `serf.Member` as the `_serf_conflict` response carries it (after the `06` byte).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ConflictMember {
    /// `Name`
    #[serde(rename = "Name", deserialize_with = "codec::string")]
    pub name: String,
    /// `Addr`
    #[serde(rename = "Addr", deserialize_with = "codec::bytes")]
    pub addr: Vec<u8>,
    /// `Port`
    #[serde(rename = "Port")]
    pub port: u16,
    /// `Tags`
    #[serde(rename = "Tags")]
    pub tags: Option<BTreeMap<String, String>>,
    /// `Status` (serf `MemberStatus` number)
    #[serde(rename = "Status")]
    pub status: i64,
    /// `ProtocolMin`, `ProtocolMax`, `ProtocolCur`, `DelegateMin`, `DelegateMax`, `DelegateCur`
    #[serde(rename = "ProtocolMin")]
    pub protocol_min: u8,
    /// see `protocol_min`
    #[serde(rename = "ProtocolMax")]
    pub protocol_max: u8,
    /// see `protocol_min`
    #[serde(rename = "ProtocolCur")]
    pub protocol_cur: u8,
    /// see `protocol_min`
    #[serde(rename = "DelegateMin")]
    pub delegate_min: u8,
    /// see `protocol_min`
    #[serde(rename = "DelegateMax")]
    pub delegate_max: u8,
    /// see `protocol_min`
    #[serde(rename = "DelegateCur")]
    pub delegate_cur: u8,
}

impl ConflictMember {
    /// `06` + the member, or `06 c0` for `None`.
    pub fn encode_response(member: Option<&Self>) -> Vec<u8> {
        let mut out = vec![kind::CONFLICT_RESPONSE];
        let mut w = Writer::new(&mut out);
        let Some(member) = member else {
            w.nil();
            return out;
        };
        w.map(11)
            .str("Addr")
            .bytes(&member.addr)
            .str("DelegateCur")
            .uint(member.delegate_cur.into())
            .str("DelegateMax")
            .uint(member.delegate_max.into())
            .str("DelegateMin")
            .uint(member.delegate_min.into())
            .str("Name")
            .str(&member.name)
            .str("Port")
            .uint(member.port.into())
            .str("ProtocolCur")
            .uint(member.protocol_cur.into())
            .str("ProtocolMax")
            .uint(member.protocol_max.into())
            .str("ProtocolMin")
            .uint(member.protocol_min.into())
            .str("Status")
            .int(member.status)
            .str("Tags");
        match &member.tags {
            None => {
                w.nil();
            }
            Some(tags) => {
                w.map(tags.len());
                for (key, value) in tags {
                    w.str(key).str(value);
                }
            }
        }
        out
    }

    /// Decodes `06` + member (`None` for `06 c0`).
    pub fn decode_response(buf: &[u8]) -> Result<Option<Self>, DecodeError> {
        match buf.split_first() {
            Some((&kind::CONFLICT_RESPONSE, body)) => codec::from_slice(body),
            _ => Err(DecodeError::UnexpectedType(
                buf.first().copied().unwrap_or(0),
                "as a conflict response",
            )),
        }
    }
}

#[cfg(test)]
mod tests;
