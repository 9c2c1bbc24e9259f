//! memberlist's TCP stream messages (ml/net.go `sendLocalState`, `readRemoteState`,
//! `rawSendMsgStream`, `readStream`): push-pull state exchange, the TCP fallback ping and its
//! ack, stream user messages and error replies.
//!
//! A stream has no outer length (unless encrypted): msgpack values follow each other, and the
//! Serf user state follows the last node record as raw bytes. [`decode_stream`] therefore works
//! on a growing buffer and says how many bytes one whole message took, or that it needs more.

use serde::Deserialize;

use super::codec::{self, value_len, Writer};
use super::memberlist::{self, kind, AckResp, ErrResp, Ping, PushNodeState};
use super::DecodeError;

/// The largest stream message accepted (memberlist's `maxPushStateBytes`, 20 MiB).
pub const MAX_STREAM_BYTES: usize = 20 * 1024 * 1024;
/// The most node records a push-pull may announce.
pub const MAX_PUSH_NODES: usize = 1 << 16;

/// A push-pull exchange: every node the sender knows, and the delegate's (Serf's) state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushPull {
    /// Whether this exchange is a join (the responder echoes the flag).
    pub join: bool,
    /// Every node the sender knows, itself and dead/left ones included.
    pub nodes: Vec<PushNodeState>,
    /// The delegate's state (Serf: `02` + msgpack `messagePushPull`); may be empty.
    pub user_state: Vec<u8>,
}

/// One message on a TCP stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// type 6: state exchange.
    PushPull(PushPull),
    /// type 0: TCP fallback ping.
    Ping(Ping),
    /// type 2: the answer to a TCP ping.
    Ack(AckResp),
    /// type 8: a reliable user message.
    User(Vec<u8>),
    /// type 13: the peer could not handle what we sent.
    Err(ErrResp),
}

impl StreamMessage {
    /// The message type's name, for logs (never the content: it is the peer's bytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PushPull(_) => "push-pull",
            Self::Ping(_) => "ping",
            Self::Ack(_) => "ack",
            Self::User(_) => "user",
            Self::Err(_) => "error",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PushPullHeader {
    #[serde(rename = "Join")]
    join: bool,
    #[serde(rename = "Nodes")]
    nodes: i64,
    #[serde(rename = "UserStateLen")]
    user_state_len: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UserMsgHeader {
    #[serde(rename = "UserMsgLen")]
    user_msg_len: i64,
}

/// Encodes a stream message; `compress` wraps it in a compress message as Go does for every
/// stream when compression is enabled (even when that is larger).
pub fn encode_stream(message: &StreamMessage, compress: bool) -> Vec<u8> {
    let mut out = Vec::new();
    match message {
        StreamMessage::PushPull(push_pull) => {
            out.push(kind::PUSH_PULL);
            Writer::new(&mut out)
                .map(3)
                .str("Join")
                .bool(push_pull.join)
                .str("Nodes")
                .uint(push_pull.nodes.len() as u64)
                .str("UserStateLen")
                .uint(push_pull.user_state.len() as u64);
            for node in &push_pull.nodes {
                Writer::new(&mut out)
                    .map(7)
                    .str("Addr")
                    .bytes(&node.addr)
                    .str("Incarnation")
                    .uint(node.incarnation.into())
                    .str("Meta")
                    .bytes_or_nil(&node.meta)
                    .str("Name")
                    .str(&node.name)
                    .str("Port")
                    .uint(node.port.into())
                    .str("State")
                    .uint(node.state.into())
                    .str("Vsn")
                    .bytes_or_nil(&node.vsn);
            }
            out.extend_from_slice(&push_pull.user_state);
        }
        StreamMessage::Ping(ping) => {
            out.push(kind::PING);
            memberlist::encode_ping(ping, &mut out);
        }
        StreamMessage::Ack(ack) => {
            out.push(kind::ACK);
            memberlist::encode_ack(ack, &mut out);
        }
        StreamMessage::User(payload) => {
            out.push(kind::USER);
            Writer::new(&mut out)
                .map(1)
                .str("UserMsgLen")
                .uint(payload.len() as u64);
            out.extend_from_slice(payload);
        }
        StreamMessage::Err(err) => {
            out.push(kind::ERR);
            memberlist::encode_err(err, &mut out);
        }
    }
    if compress {
        memberlist::compress(&out)
    } else {
        out
    }
}

/// Decodes the stream message at the start of `buf` (already decrypted).
///
/// `Ok(None)`: the message is not complete yet (read more, unless the peer closed).
/// `Ok(Some((message, n)))`: the message took the first `n` bytes.
pub fn decode_stream(buf: &[u8]) -> Result<Option<(StreamMessage, usize)>, DecodeError> {
    let result = decode_any(buf, 0);
    if let Ok(None) = result {
        if buf.len() > MAX_STREAM_BYTES {
            return Err(DecodeError::TooLarge {
                what: "stream message",
                len: buf.len() as u64,
                limit: MAX_STREAM_BYTES as u64,
            });
        }
    }
    result
}

fn decode_any(buf: &[u8], depth: usize) -> Result<Option<(StreamMessage, usize)>, DecodeError> {
    let Some((&kind, body)) = buf.split_first() else {
        return Ok(None);
    };
    match kind {
        kind::COMPRESS => {
            let Some(len) = value_len(body)? else {
                return Ok(None);
            };
            if depth > 0 {
                return Err(DecodeError::TooDeep(1));
            }
            let inner = memberlist::decompress_body(&body[..len], MAX_STREAM_BYTES)?;
            match decode_any(&inner, depth + 1)? {
                Some((message, _)) => Ok(Some((message, 1 + len))),
                None => Err(DecodeError::Truncated {
                    what: "compressed stream message",
                    need: inner.len() + 1,
                    have: inner.len(),
                }),
            }
        }
        kind::ENCRYPT => Err(DecodeError::Encrypted(
            "remote state is encrypted and encryption is not configured".into(),
        )),
        kind::PUSH_PULL => decode_push_pull(body),
        kind::PING => Ok(one_value(body)?.map(|(ping, n)| (StreamMessage::Ping(ping), n + 1))),
        kind::ACK => Ok(one_value(body)?.map(|(ack, n)| (StreamMessage::Ack(ack), n + 1))),
        kind::ERR => Ok(one_value(body)?.map(|(err, n)| (StreamMessage::Err(err), n + 1))),
        kind::USER => {
            let Some((header, header_len)) = one_value::<UserMsgHeader>(body)? else {
                return Ok(None);
            };
            let len = checked_len("user message", header.user_msg_len)?;
            let end = header_len + len;
            if body.len() < end {
                return Ok(None);
            }
            Ok(Some((
                StreamMessage::User(body[header_len..end].to_vec()),
                1 + end,
            )))
        }
        other => Err(DecodeError::UnexpectedType(other, "on a stream")),
    }
}

fn decode_push_pull(body: &[u8]) -> Result<Option<(StreamMessage, usize)>, DecodeError> {
    let Some((header, mut pos)) = one_value::<PushPullHeader>(body)? else {
        return Ok(None);
    };
    let n_nodes = checked_len("push-pull node count", header.nodes)?;
    if n_nodes > MAX_PUSH_NODES {
        return Err(DecodeError::TooLarge {
            what: "push-pull node count",
            len: n_nodes as u64,
            limit: MAX_PUSH_NODES as u64,
        });
    }
    let user_state_len = checked_len("push-pull user state", header.user_state_len)?;
    let mut nodes = Vec::with_capacity(n_nodes.min(1024));
    for _ in 0..n_nodes {
        let Some((node, len)) = one_value::<PushNodeState>(&body[pos..])? else {
            return Ok(None);
        };
        nodes.push(node);
        pos += len;
    }
    let end = pos + user_state_len;
    if body.len() < end {
        return Ok(None);
    }
    let push_pull = PushPull {
        join: header.join,
        nodes,
        user_state: body[pos..end].to_vec(),
    };
    Ok(Some((StreamMessage::PushPull(push_pull), 1 + end)))
}

fn checked_len(what: &'static str, len: i64) -> Result<usize, DecodeError> {
    match usize::try_from(len) {
        Ok(len) if len <= MAX_STREAM_BYTES => Ok(len),
        _ => Err(DecodeError::TooLarge {
            what,
            len: len as u64,
            limit: MAX_STREAM_BYTES as u64,
        }),
    }
}

fn one_value<'de, T: Deserialize<'de>>(buf: &'de [u8]) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(len) = value_len(buf)? else {
        return Ok(None);
    };
    Ok(Some((codec::from_slice(&buf[..len])?, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::memberlist::tests::unhex;

    const V9_PUSH_PULL_START: &str = "0683a44a6f696ec2a54e6f64657302ac5573657253746174654c656ecd027687a441646472a47f000002ab496e6361726e6174696f6e01a44d657461a7ff81a26463a178a44e616d65a162a4506f7274cd1f0aa5537461746500a356736ea6010502020505";

    fn node(name: &str, state: u8) -> PushNodeState {
        PushNodeState {
            name: name.into(),
            addr: vec![127, 0, 0, 2],
            port: 7946,
            meta: unhex("ff81a26463a178"),
            incarnation: 1,
            state,
            vsn: vec![1, 5, 2, 2, 5, 5],
        }
    }

    #[test]
    fn v9_push_pull_prefix_is_incomplete_and_encodes_like_go() {
        let prefix = unhex(V9_PUSH_PULL_START);
        // Two nodes and 630 bytes of user state announced; only the first node is here.
        assert_eq!(decode_stream(&prefix).unwrap(), None);
        let message = StreamMessage::PushPull(PushPull {
            join: false,
            nodes: vec![node("b", 0), node("c", 3)],
            user_state: vec![2; 630],
        });
        let encoded = encode_stream(&message, false);
        assert!(
            encoded.starts_with(&prefix),
            "header and first node as Go writes them"
        );
        assert_eq!(
            decode_stream(&encoded).unwrap(),
            Some((message.clone(), encoded.len()))
        );
    }

    #[test]
    fn every_message_round_trips_plain_and_compressed_and_in_pieces() {
        let messages = [
            StreamMessage::PushPull(PushPull {
                join: true,
                nodes: vec![node("a", 0)],
                user_state: vec![],
            }),
            StreamMessage::Ping(Ping {
                seq_no: 5,
                node: "a".into(),
                ..Ping::default()
            }),
            StreamMessage::Ack(AckResp {
                seq_no: 5,
                payload: vec![],
            }),
            StreamMessage::User(b"hello".to_vec()),
            StreamMessage::Err(ErrResp {
                error: "nope".into(),
            }),
        ];
        for message in messages {
            for compress in [false, true] {
                let mut encoded = encode_stream(&message, compress);
                for cut in 0..encoded.len() {
                    assert_eq!(
                        decode_stream(&encoded[..cut]).unwrap(),
                        None,
                        "{message:?} cut {cut}"
                    );
                }
                let len = encoded.len();
                encoded.extend_from_slice(b"trailing");
                assert_eq!(
                    decode_stream(&encoded).unwrap(),
                    Some((message.clone(), len))
                );
            }
        }
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        // Nodes: 2^31 announced.
        let mut huge = vec![kind::PUSH_PULL];
        Writer::new(&mut huge)
            .map(3)
            .str("Join")
            .bool(false)
            .str("Nodes")
            .uint(1 << 31)
            .str("UserStateLen")
            .uint(0);
        assert!(matches!(
            decode_stream(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut negative = vec![kind::USER];
        Writer::new(&mut negative).map(1).str("UserMsgLen").int(-1);
        assert!(matches!(
            decode_stream(&negative),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_stream(&[kind::ENCRYPT, 0, 0, 0, 1]),
            Err(DecodeError::Encrypted(_))
        ));
        assert!(matches!(
            decode_stream(&[kind::ALIVE]),
            Err(DecodeError::UnexpectedType(4, _))
        ));
    }
}
