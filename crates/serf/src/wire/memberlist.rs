//! memberlist's UDP messages (ml/net.go): one type byte, then one msgpack value; compound
//! (`07`), CRC (`0c`) and compression (`09`) wrappers nest around them.
//!
//! Struct fields keep Go's names on the wire, written in Go's sorted order, so that encoding a
//! message gives the bytes a Go agent would send.

use serde::Deserialize;

use super::codec::{self, Writer};
use super::{lzw, DecodeError};

/// memberlist message type bytes (ml/net.go `messageType`).
#[allow(missing_docs)]
pub mod kind {
    pub const PING: u8 = 0;
    pub const INDIRECT_PING: u8 = 1;
    pub const ACK: u8 = 2;
    pub const SUSPECT: u8 = 3;
    pub const ALIVE: u8 = 4;
    pub const DEAD: u8 = 5;
    pub const PUSH_PULL: u8 = 6;
    pub const COMPOUND: u8 = 7;
    pub const USER: u8 = 8;
    pub const COMPRESS: u8 = 9;
    pub const ENCRYPT: u8 = 10;
    pub const NACK: u8 = 11;
    pub const HAS_CRC: u8 = 12;
    pub const ERR: u8 = 13;
}

/// Bytes a compound header adds: the type byte and the part count.
pub const COMPOUND_HEADER_OVERHEAD: usize = 2;
/// Bytes a compound adds per part (its u16 length).
pub const COMPOUND_PART_OVERHEAD: usize = 2;
/// Bytes the CRC wrapper adds.
pub const CRC_OVERHEAD: usize = 5;
/// The most parts a compound can hold.
pub const MAX_COMPOUND_PARTS: usize = 255;
/// The most bytes one UDP packet may decompress to, all its compressed parts together (a
/// 64 KiB packet of compound parts, each a bomb, would otherwise expand once per part). A
/// sender compresses a message only to fit it in one datagram, and no Serf message comes near
/// this: it bounds the work a forged packet can cost.
pub const MAX_DECOMPRESSED_PACKET: usize = 128 * 1024;
/// How deeply wrappers may nest in one packet.
const MAX_NESTING: usize = 4;

/// `ping` (type 0): a probe. `Node` is the target's name (empty: not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Ping {
    /// `SeqNo`
    #[serde(rename = "SeqNo")]
    pub seq_no: u32,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `SourceAddr` (omitted when empty)
    #[serde(rename = "SourceAddr", deserialize_with = "codec::bytes")]
    pub source_addr: Vec<u8>,
    /// `SourcePort` (omitted when 0)
    #[serde(rename = "SourcePort")]
    pub source_port: u16,
    /// `SourceNode` (omitted when empty)
    #[serde(rename = "SourceNode", deserialize_with = "codec::string")]
    pub source_node: String,
}

/// `indirectPingReq` (type 1): ask a member to probe `Target:Port` for us.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct IndirectPingReq {
    /// `SeqNo`
    #[serde(rename = "SeqNo")]
    pub seq_no: u32,
    /// `Target` (IP bytes)
    #[serde(rename = "Target", deserialize_with = "codec::bytes")]
    pub target: Vec<u8>,
    /// `Port`
    #[serde(rename = "Port")]
    pub port: u16,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `Nack`: the requester wants a nack when the target does not answer.
    #[serde(rename = "Nack")]
    pub nack: bool,
    /// `SourceAddr` (omitted when empty)
    #[serde(rename = "SourceAddr", deserialize_with = "codec::bytes")]
    pub source_addr: Vec<u8>,
    /// `SourcePort` (omitted when 0)
    #[serde(rename = "SourcePort")]
    pub source_port: u16,
    /// `SourceNode` (omitted when empty)
    #[serde(rename = "SourceNode", deserialize_with = "codec::string")]
    pub source_node: String,
}

/// `ackResp` (type 2). Serf puts its coordinate in `Payload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AckResp {
    /// `SeqNo`
    #[serde(rename = "SeqNo")]
    pub seq_no: u32,
    /// `Payload` (nil when empty)
    #[serde(rename = "Payload", deserialize_with = "codec::bytes")]
    pub payload: Vec<u8>,
}

/// `nackResp` (type 11).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NackResp {
    /// `SeqNo`
    #[serde(rename = "SeqNo")]
    pub seq_no: u32,
}

/// `errResp` (type 13), sent on a stream when the peer could not handle it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ErrResp {
    /// `Error`
    #[serde(rename = "Error", deserialize_with = "codec::string")]
    pub error: String,
}

/// `suspect` (type 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Suspect {
    /// `Incarnation`
    #[serde(rename = "Incarnation")]
    pub incarnation: u32,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `From`
    #[serde(rename = "From", deserialize_with = "codec::string")]
    pub from: String,
}

/// `alive` (type 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Alive {
    /// `Incarnation`
    #[serde(rename = "Incarnation")]
    pub incarnation: u32,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `Addr` (4 or 16 IP bytes)
    #[serde(rename = "Addr", deserialize_with = "codec::bytes")]
    pub addr: Vec<u8>,
    /// `Port`
    #[serde(rename = "Port")]
    pub port: u16,
    /// `Meta` (Serf: `ff` + msgpack tags)
    #[serde(rename = "Meta", deserialize_with = "codec::bytes")]
    pub meta: Vec<u8>,
    /// `Vsn`: `[PMin, PMax, PCur, DMin, DMax, DCur]`; always 6 bytes from us.
    #[serde(rename = "Vsn", deserialize_with = "codec::bytes")]
    pub vsn: Vec<u8>,
}

/// `dead` (type 5). `From == Node` means a graceful leave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Dead {
    /// `Incarnation`
    #[serde(rename = "Incarnation")]
    pub incarnation: u32,
    /// `Node`
    #[serde(rename = "Node", deserialize_with = "codec::string")]
    pub node: String,
    /// `From`
    #[serde(rename = "From", deserialize_with = "codec::string")]
    pub from: String,
}

/// A node's state as memberlist's push-pull carries it (`State` of [`PushNodeState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStateKind {
    /// 0
    Alive,
    /// 1
    Suspect,
    /// 2
    Dead,
    /// 3
    Left,
}

impl NodeStateKind {
    /// The wire number.
    pub fn to_wire(self) -> u8 {
        match self {
            Self::Alive => 0,
            Self::Suspect => 1,
            Self::Dead => 2,
            Self::Left => 3,
        }
    }

    /// From the wire number; unknown numbers are `None`.
    pub fn from_wire(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Alive,
            1 => Self::Suspect,
            2 => Self::Dead,
            3 => Self::Left,
            _ => return None,
        })
    }
}

/// `pushNodeState`: one node in a push-pull exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PushNodeState {
    /// `Name`
    #[serde(rename = "Name", deserialize_with = "codec::string")]
    pub name: String,
    /// `Addr`
    #[serde(rename = "Addr", deserialize_with = "codec::bytes")]
    pub addr: Vec<u8>,
    /// `Port` (0 means "the receiver's own bind port")
    #[serde(rename = "Port")]
    pub port: u16,
    /// `Meta`
    #[serde(rename = "Meta", deserialize_with = "codec::bytes")]
    pub meta: Vec<u8>,
    /// `Incarnation`
    #[serde(rename = "Incarnation")]
    pub incarnation: u32,
    /// `State`: see [`NodeStateKind`].
    #[serde(rename = "State")]
    pub state: u8,
    /// `Vsn`
    #[serde(rename = "Vsn", deserialize_with = "codec::bytes")]
    pub vsn: Vec<u8>,
}

/// `compress` (type 9).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct Compress {
    #[serde(rename = "Algo")]
    pub(crate) algo: u8,
    #[serde(rename = "Buf", deserialize_with = "codec::bytes")]
    pub(crate) buf: Vec<u8>,
}

/// One memberlist message as it travels on UDP (after unwrapping compound, CRC, compression).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// type 0
    Ping(Ping),
    /// type 1
    IndirectPing(IndirectPingReq),
    /// type 2
    Ack(AckResp),
    /// type 11
    Nack(NackResp),
    /// type 3
    Suspect(Suspect),
    /// type 4
    Alive(Alive),
    /// type 5
    Dead(Dead),
    /// type 8: an opaque payload for the delegate (Serf: its type byte + msgpack).
    User(Vec<u8>),
    /// type 13
    Err(ErrResp),
}

impl Message {
    /// Appends the type byte and the msgpack body, as Go encodes them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Ping(ping) => {
                out.push(kind::PING);
                encode_ping(ping, out);
            }
            Self::IndirectPing(req) => {
                out.push(kind::INDIRECT_PING);
                let source = Source {
                    addr: &req.source_addr,
                    port: req.source_port,
                    node: &req.source_node,
                };
                let mut w = Writer::new(out);
                w.map(5 + source.len());
                w.str("Nack").bool(req.nack);
                w.str("Node").str(&req.node);
                w.str("Port").uint(req.port.into());
                w.str("SeqNo").uint(req.seq_no.into());
                source.encode(&mut w);
                w.str("Target").bytes(&req.target);
            }
            Self::Ack(ack) => {
                out.push(kind::ACK);
                encode_ack(ack, out);
            }
            Self::Nack(nack) => {
                out.push(kind::NACK);
                Writer::new(out)
                    .map(1)
                    .str("SeqNo")
                    .uint(nack.seq_no.into());
            }
            Self::Suspect(suspect) => {
                out.push(kind::SUSPECT);
                encode_incarnation_from(suspect.incarnation, &suspect.node, &suspect.from, out);
            }
            Self::Alive(alive) => {
                out.push(kind::ALIVE);
                Writer::new(out)
                    .map(6)
                    .str("Addr")
                    .bytes(&alive.addr)
                    .str("Incarnation")
                    .uint(alive.incarnation.into())
                    .str("Meta")
                    .bytes_or_nil(&alive.meta)
                    .str("Node")
                    .str(&alive.node)
                    .str("Port")
                    .uint(alive.port.into())
                    .str("Vsn")
                    .bytes_or_nil(&alive.vsn);
            }
            Self::Dead(dead) => {
                out.push(kind::DEAD);
                encode_incarnation_from(dead.incarnation, &dead.node, &dead.from, out);
            }
            Self::User(payload) => {
                out.push(kind::USER);
                out.extend_from_slice(payload);
            }
            Self::Err(err) => {
                out.push(kind::ERR);
                encode_err(err, out);
            }
        }
    }

    /// The encoded bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

pub(crate) fn encode_ping(ping: &Ping, out: &mut Vec<u8>) {
    let source = Source {
        addr: &ping.source_addr,
        port: ping.source_port,
        node: &ping.source_node,
    };
    let mut w = Writer::new(out);
    w.map(2 + source.len());
    w.str("Node").str(&ping.node);
    w.str("SeqNo").uint(ping.seq_no.into());
    source.encode(&mut w);
}

/// The sender fields of a ping and an indirect ping, each omitted when empty (Go's
/// `omitempty`).
struct Source<'a> {
    addr: &'a [u8],
    port: u16,
    node: &'a str,
}

impl Source<'_> {
    /// How many of the fields are written.
    fn len(&self) -> usize {
        usize::from(!self.addr.is_empty())
            + usize::from(self.port != 0)
            + usize::from(!self.node.is_empty())
    }

    /// Writes them in Go's key order.
    fn encode(&self, w: &mut Writer<'_>) {
        if !self.addr.is_empty() {
            w.str("SourceAddr").bytes(self.addr);
        }
        if !self.node.is_empty() {
            w.str("SourceNode").str(self.node);
        }
        if self.port != 0 {
            w.str("SourcePort").uint(self.port.into());
        }
    }
}

pub(crate) fn encode_ack(ack: &AckResp, out: &mut Vec<u8>) {
    Writer::new(out)
        .map(2)
        .str("Payload")
        .bytes_or_nil(&ack.payload)
        .str("SeqNo")
        .uint(ack.seq_no.into());
}

pub(crate) fn encode_err(err: &ErrResp, out: &mut Vec<u8>) {
    Writer::new(out).map(1).str("Error").str(&err.error);
}

fn encode_incarnation_from(incarnation: u32, node: &str, from: &str, out: &mut Vec<u8>) {
    Writer::new(out)
        .map(3)
        .str("From")
        .str(from)
        .str("Incarnation")
        .uint(incarnation.into())
        .str("Node")
        .str(node);
}

/// Packs encoded messages into one compound message (at most [`MAX_COMPOUND_PARTS`] parts,
/// each under 64 KiB; the caller splits larger sets).
pub fn compound(parts: &[Vec<u8>]) -> Vec<u8> {
    assert!(
        parts.len() <= MAX_COMPOUND_PARTS,
        "a compound holds at most 255 parts; callers split larger sets"
    );
    let body: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(COMPOUND_HEADER_OVERHEAD + 2 * parts.len() + body);
    out.push(kind::COMPOUND);
    out.push(parts.len() as u8);
    for part in parts {
        let len = u16::try_from(part.len()).expect("a compound part fits a UDP packet");
        out.extend_from_slice(&len.to_be_bytes());
    }
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// Wraps a message in the CRC wrapper (`0c` + CRC-32/IEEE big-endian + message).
pub fn with_crc(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CRC_OVERHEAD + message.len());
    out.push(kind::HAS_CRC);
    out.extend_from_slice(&crc32fast::hash(message).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Wraps a message in a compress message (`09` + `{Algo: 0, Buf: lzw(message)}`).
pub fn compress(message: &[u8]) -> Vec<u8> {
    let buf = lzw::compress(message);
    let mut out = Vec::with_capacity(buf.len() + 16);
    out.push(kind::COMPRESS);
    Writer::new(&mut out)
        .map(2)
        .str("Algo")
        .uint(0)
        .str("Buf")
        .bytes(&buf);
    out
}

/// Decodes one UDP packet (already decrypted), unwrapping CRC, compression and compound
/// messages recursively. Every part that decodes is pushed to `out`; the first error met is
/// returned after all parts were tried (a bad part does not hide the good ones, as in Go).
pub fn decode_packet(packet: &[u8], out: &mut Vec<Message>) -> Result<(), DecodeError> {
    let mut first_error = None;
    let mut budget = MAX_DECOMPRESSED_PACKET;
    decode_nested(packet, out, 0, &mut budget, &mut first_error);
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// `budget`: the decompressed bytes the rest of the packet may still produce.
fn decode_nested(
    buf: &[u8],
    out: &mut Vec<Message>,
    depth: usize,
    budget: &mut usize,
    first_error: &mut Option<DecodeError>,
) {
    if depth > MAX_NESTING {
        record(first_error, DecodeError::TooDeep(MAX_NESTING));
        return;
    }
    let Some((&kind, body)) = buf.split_first() else {
        record(
            first_error,
            DecodeError::Truncated {
                what: "message",
                need: 1,
                have: 0,
            },
        );
        return;
    };
    match kind {
        kind::HAS_CRC => {
            if body.len() < 4 {
                record(
                    first_error,
                    DecodeError::Truncated {
                        what: "crc header",
                        need: 4,
                        have: body.len(),
                    },
                );
                return;
            }
            let expected = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let actual = crc32fast::hash(&body[4..]);
            if expected != actual {
                record(first_error, DecodeError::Crc { expected, actual });
                return;
            }
            decode_nested(&body[4..], out, depth + 1, budget, first_error);
        }
        kind::COMPRESS => match decompress_body(body, *budget) {
            Ok(inner) => {
                *budget -= inner.len();
                decode_nested(&inner, out, depth + 1, budget, first_error);
            }
            Err(error) => {
                // What it decoded before failing cost as much: nothing more of this packet
                // is decompressed.
                *budget = 0;
                record(first_error, error);
            }
        },
        kind::COMPOUND => {
            let Some((&count, rest)) = body.split_first() else {
                record(
                    first_error,
                    DecodeError::Truncated {
                        what: "compound header",
                        need: 1,
                        have: 0,
                    },
                );
                return;
            };
            let count = usize::from(count);
            if rest.len() < 2 * count {
                record(
                    first_error,
                    DecodeError::Truncated {
                        what: "compound lengths",
                        need: 2 * count,
                        have: rest.len(),
                    },
                );
                return;
            }
            let (lengths, mut parts) = rest.split_at(2 * count);
            for length in lengths.chunks_exact(2) {
                let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
                if parts.len() < length {
                    record(
                        first_error,
                        DecodeError::Truncated {
                            what: "compound part",
                            need: length,
                            have: parts.len(),
                        },
                    );
                    return;
                }
                let (part, tail) = parts.split_at(length);
                decode_nested(part, out, depth + 1, budget, first_error);
                parts = tail;
            }
        }
        _ => match decode_message(kind, body) {
            Ok(message) => out.push(message),
            Err(error) => record(first_error, error),
        },
    }
}

fn record(first_error: &mut Option<DecodeError>, error: DecodeError) {
    first_error.get_or_insert(error);
}

/// Decodes the body of a compress message and decompresses it (at most `limit` bytes).
pub(crate) fn decompress_body(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let compress: Compress = codec::from_slice(body)?;
    if compress.algo != 0 {
        return Err(DecodeError::Compression(format!(
            "unknown compression algorithm {}",
            compress.algo
        )));
    }
    lzw::decompress(&compress.buf, limit)
}

fn decode_message(kind: u8, body: &[u8]) -> Result<Message, DecodeError> {
    Ok(match kind {
        kind::PING => Message::Ping(codec::from_slice(body)?),
        kind::INDIRECT_PING => Message::IndirectPing(codec::from_slice(body)?),
        kind::ACK => Message::Ack(codec::from_slice(body)?),
        kind::NACK => Message::Nack(codec::from_slice(body)?),
        kind::SUSPECT => Message::Suspect(codec::from_slice(body)?),
        kind::ALIVE => Message::Alive(codec::from_slice(body)?),
        kind::DEAD => Message::Dead(codec::from_slice(body)?),
        kind::USER => Message::User(body.to_vec()),
        kind::ERR => Message::Err(codec::from_slice(body)?),
        other => return Err(DecodeError::UnexpectedType(other, "in a UDP packet")),
    })
}

#[cfg(test)]
pub(crate) mod tests;
