//! RPC message structs with Go's exact field names (agent/ipc.go, client/const.go).
//!
//! Requests and responses are plain structs encoded as msgpack maps. Strings go out as str,
//! `[]byte` as bin; on the way in every int width is accepted and nil decodes as empty.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::codec::{bytes, nil_default};

/// Command names (agent/ipc.go).
pub mod command {
    /// `handshake`
    pub const HANDSHAKE: &str = "handshake";
    /// `auth`
    pub const AUTH: &str = "auth";
    /// `event`
    pub const EVENT: &str = "event";
    /// `force-leave`
    pub const FORCE_LEAVE: &str = "force-leave";
    /// `join`
    pub const JOIN: &str = "join";
    /// `members`
    pub const MEMBERS: &str = "members";
    /// `members-filtered`
    pub const MEMBERS_FILTERED: &str = "members-filtered";
    /// `stream`
    pub const STREAM: &str = "stream";
    /// `stop`
    pub const STOP: &str = "stop";
    /// `monitor`
    pub const MONITOR: &str = "monitor";
    /// `leave`
    pub const LEAVE: &str = "leave";
    /// `install-key`
    pub const INSTALL_KEY: &str = "install-key";
    /// `use-key`
    pub const USE_KEY: &str = "use-key";
    /// `remove-key`
    pub const REMOVE_KEY: &str = "remove-key";
    /// `list-keys`
    pub const LIST_KEYS: &str = "list-keys";
    /// `tags`
    pub const TAGS: &str = "tags";
    /// `query`
    pub const QUERY: &str = "query";
    /// `respond`
    pub const RESPOND: &str = "respond";
    /// `stats`
    pub const STATS: &str = "stats";
    /// `get-coordinate`
    pub const GET_COORDINATE: &str = "get-coordinate";
}

/// Serf's error strings, byte for byte (agent/ipc.go).
pub mod errors {
    /// Unknown command; the server closes the connection after sending it.
    pub const UNSUPPORTED_COMMAND: &str = "Unsupported command";
    /// Handshake version other than 1.
    pub const UNSUPPORTED_IPC_VERSION: &str = "Unsupported IPC version";
    /// A second handshake.
    pub const DUPLICATE_HANDSHAKE: &str = "Handshake already performed";
    /// A command before the handshake; the server closes the connection.
    pub const HANDSHAKE_REQUIRED: &str = "Handshake required";
    /// A second `monitor` on one connection.
    pub const MONITOR_EXISTS: &str = "Monitor already exists";
    /// A bad `stream` filter.
    pub const INVALID_FILTER: &str = "Invalid event filter";
    /// A `stream` reusing a live sequence number.
    pub const STREAM_EXISTS: &str = "Stream with given sequence exists";
    /// `respond` to an unknown or expired query.
    pub const INVALID_QUERY_ID: &str = "No pending queries matching ID";
    /// A command before a successful `auth` on an agent with an RPC key.
    pub const AUTH_REQUIRED: &str = "Authentication required";
    /// `auth` with the wrong key.
    pub const INVALID_AUTH_TOKEN: &str = "Invalid authentication token";
}

/// Query stream record types.
pub mod query_record {
    /// A node acknowledged the query.
    pub const ACK: &str = "ack";
    /// A node responded.
    pub const RESPONSE: &str = "response";
    /// The query deadline passed; no more records follow.
    pub const DONE: &str = "done";
}

/// `requestHeader`: sent before each request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestHeader {
    /// The command name.
    #[serde(deserialize_with = "nil_default")]
    pub command: String,
    /// Client-chosen sequence number, echoed in the response.
    pub seq: u64,
}

/// `responseHeader`: sent before each response and each stream record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ResponseHeader {
    /// The request's sequence number.
    pub seq: u64,
    /// Empty on success, else the agent's error text.
    #[serde(deserialize_with = "nil_default")]
    pub error: String,
}

/// `handshakeRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HandshakeRequest {
    /// IPC version; only 1 exists.
    pub version: i32,
}

/// `authRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AuthRequest {
    /// The shared RPC key.
    #[serde(deserialize_with = "nil_default")]
    pub auth_key: String,
}

/// `coordinateRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CoordinateRequest {
    /// Node name.
    #[serde(deserialize_with = "nil_default")]
    pub node: String,
}

/// A Vivaldi network coordinate (serf/coordinate/coordinate.go).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Coordinate {
    /// Euclidean part, 8 dimensions by default.
    #[serde(deserialize_with = "nil_default")]
    pub vec: Vec<f64>,
    /// Confidence in the estimate.
    pub error: f64,
    /// Adjustment term, in seconds.
    pub adjustment: f64,
    /// Height term, in seconds.
    pub height: f64,
}

impl Coordinate {
    /// Estimated round-trip time to `other`, as Go's `DistanceTo` computes it; `None` when the
    /// dimensions differ.
    pub fn distance_to(&self, other: &Self) -> Option<std::time::Duration> {
        if self.vec.len() != other.vec.len() {
            return None;
        }
        let euclid: f64 = self
            .vec
            .iter()
            .zip(&other.vec)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let raw = euclid + self.height + other.height;
        let adjusted = raw + self.adjustment + other.adjustment;
        let seconds = if adjusted > 0.0 { adjusted } else { raw };
        Some(std::time::Duration::from_secs_f64(seconds.max(0.0)))
    }
}

/// `coordinateResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CoordinateResponse {
    /// The coordinate (zero when `ok` is false).
    pub coord: Coordinate,
    /// Whether the node has a cached coordinate.
    pub ok: bool,
}

/// `eventRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EventRequest {
    /// Event name.
    #[serde(deserialize_with = "nil_default")]
    pub name: String,
    /// Opaque payload.
    #[serde(with = "bytes")]
    pub payload: Vec<u8>,
    /// Whether events of the same name may be coalesced.
    pub coalesce: bool,
}

/// `forceLeaveRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ForceLeaveRequest {
    /// Node name.
    #[serde(deserialize_with = "nil_default")]
    pub node: String,
    /// Remove the node from the member list entirely.
    pub prune: bool,
}

/// `joinRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinRequest {
    /// Addresses to contact (`host[:port]`).
    #[serde(deserialize_with = "nil_default")]
    pub existing: Vec<String>,
    /// Replay old user events.
    pub replay: bool,
}

/// `joinResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinResponse {
    /// Number of nodes contacted successfully.
    pub num: i32,
}

/// `membersFilteredRequest`: anchored regexes; empty means any.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MembersFilteredRequest {
    /// Tag name → regex over the tag's value.
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    /// Regex over the status (`alive`, `leaving`, `left`, `failed`).
    #[serde(deserialize_with = "nil_default")]
    pub status: String,
    /// Regex over the node name.
    #[serde(deserialize_with = "nil_default")]
    pub name: String,
}

/// `membersResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MembersResponse {
    /// The members.
    #[serde(deserialize_with = "nil_default")]
    pub members: Vec<MemberRow>,
}

/// `keyRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KeyRequest {
    /// Base64 key.
    #[serde(deserialize_with = "nil_default")]
    pub key: String,
}

/// `keyResponse`: the outcome of a key operation across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KeyResponse {
    /// Node name → error message, for nodes that failed.
    #[serde(deserialize_with = "nil_default")]
    pub messages: BTreeMap<String, String>,
    /// Base64 key → number of nodes holding it (`list-keys` only).
    #[serde(deserialize_with = "nil_default")]
    pub keys: BTreeMap<String, i64>,
    /// Members asked.
    pub num_nodes: i64,
    /// Members that reported an error.
    pub num_err: i64,
    /// Members that answered.
    pub num_resp: i64,
}

/// `monitorRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MonitorRequest {
    /// `TRACE`, `DEBUG`, `INFO`, `WARN` or `ERR` (case-insensitive).
    #[serde(deserialize_with = "nil_default")]
    pub log_level: String,
}

/// `streamRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StreamRequest {
    /// Comma-separated event filter; empty means `*`.
    #[serde(rename = "Type", deserialize_with = "nil_default")]
    pub kind: String,
}

/// `stopRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StopRequest {
    /// Sequence number of the stream or monitor to stop.
    pub stop: u64,
}

/// `tagsRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TagsRequest {
    /// Tags to set.
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    /// Tag names to remove.
    #[serde(deserialize_with = "nil_default")]
    pub delete_tags: Vec<String>,
}

/// `queryRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryRequest {
    /// Only these nodes answer (empty = all).
    #[serde(deserialize_with = "nil_default")]
    pub filter_nodes: Vec<String>,
    /// Only nodes whose tags match these anchored regexes answer.
    #[serde(deserialize_with = "nil_default")]
    pub filter_tags: BTreeMap<String, String>,
    /// Ask every node for an ack.
    pub request_ack: bool,
    /// Extra relays of each response.
    pub relay_factor: u8,
    /// Nanoseconds; 0 means the agent's default.
    pub timeout: i64,
    /// Query name.
    #[serde(deserialize_with = "nil_default")]
    pub name: String,
    /// Opaque payload.
    #[serde(with = "bytes")]
    pub payload: Vec<u8>,
}

/// `respondRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RespondRequest {
    /// The query ID from a stream record.
    #[serde(rename = "ID")]
    pub id: u64,
    /// Response payload.
    #[serde(with = "bytes")]
    pub payload: Vec<u8>,
}

/// `queryRecord`: one record of a `query` stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryRecord {
    /// `ack`, `response` or `done`.
    #[serde(rename = "Type", deserialize_with = "nil_default")]
    pub kind: String,
    /// Answering node (empty for `done`).
    #[serde(deserialize_with = "nil_default")]
    pub from: String,
    /// Response payload (empty for acks).
    #[serde(with = "bytes")]
    pub payload: Vec<u8>,
}

/// `logRecord`: one line of a `monitor` stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LogRecord {
    /// The log line.
    #[serde(deserialize_with = "nil_default")]
    pub log: String,
}

/// `userEventRecord`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct UserEventRecord {
    pub(crate) event: String,
    #[serde(rename = "LTime")]
    pub(crate) ltime: u64,
    pub(crate) name: String,
    #[serde(with = "bytes")]
    pub(crate) payload: Vec<u8>,
    pub(crate) coalesce: bool,
}

/// `queryEventRecord`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct QueryEventRecord {
    pub(crate) event: String,
    #[serde(rename = "ID")]
    pub(crate) id: u64,
    #[serde(rename = "LTime")]
    pub(crate) ltime: u64,
    pub(crate) name: String,
    #[serde(with = "bytes")]
    pub(crate) payload: Vec<u8>,
}

/// `memberEventRecord`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct MemberEventRecord {
    pub(crate) event: String,
    pub(crate) members: Vec<MemberRow>,
}

/// Any record of an event stream, decoded loosely, then sorted by `Event`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct AnyEventRecord {
    #[serde(deserialize_with = "nil_default")]
    pub(crate) event: String,
    #[serde(deserialize_with = "nil_default")]
    pub(crate) members: Vec<MemberRow>,
    #[serde(rename = "ID")]
    pub(crate) id: u64,
    #[serde(rename = "LTime")]
    pub(crate) ltime: u64,
    #[serde(deserialize_with = "nil_default")]
    pub(crate) name: String,
    #[serde(with = "bytes")]
    pub(crate) payload: Vec<u8>,
    pub(crate) coalesce: bool,
}

/// A member as the RPC reports it (agent/ipc.go `Member`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MemberRow {
    /// Node name.
    #[serde(deserialize_with = "nil_default")]
    pub name: String,
    /// Gossip address (bin of 4 or 16 bytes on the wire).
    #[serde(with = "ip")]
    pub addr: IpAddr,
    /// Gossip port.
    pub port: u16,
    /// Tags.
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    /// `alive`, `leaving`, `left`, `failed` (or `none`).
    #[serde(deserialize_with = "nil_default")]
    pub status: String,
    /// Lowest memberlist protocol version spoken.
    pub protocol_min: u8,
    /// Highest memberlist protocol version spoken.
    pub protocol_max: u8,
    /// Memberlist protocol version in use.
    pub protocol_cur: u8,
    /// Lowest Serf protocol version spoken.
    pub delegate_min: u8,
    /// Highest Serf protocol version spoken.
    pub delegate_max: u8,
    /// Serf protocol version in use.
    pub delegate_cur: u8,
}

impl Default for MemberRow {
    fn default() -> Self {
        Self {
            name: String::new(),
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            tags: BTreeMap::new(),
            status: String::new(),
            protocol_min: 0,
            protocol_max: 0,
            protocol_cur: 0,
            delegate_min: 0,
            delegate_max: 0,
            delegate_cur: 0,
        }
    }
}

impl MemberRow {
    /// `ip:port` as Go's `net.TCPAddr` prints it (`[v6]:port` for IPv6).
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr, self.port)
    }
}

/// Go `net.IP` as bin: 4 bytes for IPv4, 16 for IPv6; v4-mapped v6 reads as IPv4.
mod ip {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &IpAddr,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            IpAddr::V4(v4) => serializer.serialize_bytes(&v4.octets()),
            IpAddr::V6(v6) => serializer.serialize_bytes(&v6.octets()),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<IpAddr, D::Error> {
        let raw = bytes::deserialize(deserializer)?;
        match raw.len() {
            0 => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            4 => Ok(IpAddr::from(
                <[u8; 4]>::try_from(raw.as_slice()).expect("length checked"),
            )),
            16 => Ok(
                IpAddr::from(<[u8; 16]>::try_from(raw.as_slice()).expect("length checked"))
                    .to_canonical(),
            ),
            n => Err(serde::de::Error::custom(format!(
                "an IP address must be 4 or 16 bytes, got {n}"
            ))),
        }
    }
}

/// The stats map: section → key → value (nil sections read as empty).
pub type Stats = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct RawStats(pub(crate) BTreeMap<String, Option<BTreeMap<String, String>>>);

impl From<RawStats> for Stats {
    fn from(raw: RawStats) -> Self {
        raw.0
            .into_iter()
            .map(|(section, values)| (section, values.unwrap_or_default()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::codec::{decode, encode_into};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn to_hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn encodes_like_go() {
        let mut out = Vec::new();
        encode_into(
            &mut out,
            &RequestHeader {
                command: "handshake".into(),
                seq: 1,
            },
        );
        assert_eq!(
            to_hex(&out),
            "82a7436f6d6d616e64a968616e647368616b65a353657101"
        );
        let mut out = Vec::new();
        encode_into(
            &mut out,
            &EventRequest {
                name: "deploy".into(),
                payload: b"hello".to_vec(),
                coalesce: true,
            },
        );
        // Go sorts the keys (Coalesce first); the values and markers are identical.
        assert_eq!(
            to_hex(&out),
            "83a44e616d65a66465706c6f79a75061796c6f6164c40568656c6c6fa8436f616c65736365c3"
        );
        let mut out = Vec::new();
        encode_into(
            &mut out,
            &RespondRequest {
                id: 1,
                payload: b"via-rpc".to_vec(),
            },
        );
        assert_eq!(to_hex(&out), "82a2494401a75061796c6f6164c4077669612d727063");
    }

    #[test]
    fn decodes_go_member() {
        // A member record as a Go agent sends it (keys sorted, Addr as bin).
        let mut go = String::from("8ba441646472c4047f000001");
        for (key, value) in [
            ("DelegateCur", "05"),
            ("DelegateMax", "05"),
            ("DelegateMin", "02"),
        ] {
            go.push_str(&format!(
                "{:02x}{}{}",
                0xa0 + key.len(),
                to_hex(key.as_bytes()),
                value
            ));
        }
        go.push_str("a44e616d65a161a4506f7274cd1f0a");
        for (key, value) in [
            ("ProtocolCur", "02"),
            ("ProtocolMax", "05"),
            ("ProtocolMin", "01"),
        ] {
            go.push_str(&format!(
                "{:02x}{}{}",
                0xa0 + key.len(),
                to_hex(key.as_bytes()),
                value
            ));
        }
        go.push_str("a6537461747573a5616c697665a45461677381a4726f6c65a3776562");
        let member: MemberRow = decode("Member", &hex(&go)).unwrap();
        assert_eq!(member.name, "a");
        assert_eq!(member.addr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(member.port, 7946);
        assert_eq!(member.status, "alive");
        assert_eq!(member.tags["role"], "web");
        assert_eq!(
            (
                member.protocol_min,
                member.protocol_max,
                member.protocol_cur
            ),
            (1, 5, 2)
        );
        assert_eq!(
            (
                member.delegate_min,
                member.delegate_max,
                member.delegate_cur
            ),
            (2, 5, 5)
        );
        let mut out = Vec::new();
        encode_into(&mut out, &member);
        let again: MemberRow = decode("Member", &out).unwrap();
        assert_eq!(again, member);
    }

    #[test]
    fn nil_and_missing_fields_are_zero() {
        // {Keys: nil, Messages: nil, NumNodes: u64 1} plus an unknown key.
        let frame =
            hex("84a44b657973c0a84d65737361676573c0a84e756d4e6f646573cf0000000000000001a3587878a0");
        let response: KeyResponse = decode("keyResponse", &frame).unwrap();
        assert_eq!(
            response,
            KeyResponse {
                num_nodes: 1,
                ..KeyResponse::default()
            }
        );
        let stats: RawStats = decode("stats", &hex("81a474616773c0")).unwrap();
        assert_eq!(Stats::from(stats)["tags"].len(), 0);
    }
}
