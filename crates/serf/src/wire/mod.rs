//! Go-compatible wire formats: msgpack as go-msgpack writes it ([`codec`]), memberlist's UDP
//! packets ([`memberlist`]) and TCP streams ([`stream`]), and Serf's messages ([`serf`]).
//!
//! Everything here is pure: bytes in, values out, and back. Every decoder treats its input as
//! untrusted: lengths are checked before anything is allocated, nesting is bounded, and a
//! malformed input is a [`DecodeError`], never a panic. The authority for every format is the Go
//! source named in each module (memberlist 0.2.2, serf 0.9.4, go-msgpack 0.5.5).

pub mod codec;
pub mod crypto;
pub mod lzw;
pub mod memberlist;
pub mod serf;
pub mod stream;

use std::net::IpAddr;

/// An IP address from Go's `net.IP` bytes (4 bytes, or 16 — IPv4-mapped ones become IPv4).
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

/// Go's `net.IP` bytes for an address: 4 bytes for IPv4, 16 for IPv6.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// Why bytes from the network could not be decoded. Decoding never changes any state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the message did.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A message type byte this implementation does not know, or one not allowed here.
    #[error("unexpected message type {0} {1}")]
    UnexpectedType(u8, &'static str),
    /// The msgpack body did not decode into the expected message.
    #[error("msgpack: {0}")]
    Msgpack(String),
    /// A CRC-wrapped packet whose checksum does not match.
    #[error("crc mismatch: packet says {expected:08x}, content is {actual:08x}")]
    Crc {
        /// The checksum in the packet.
        expected: u32,
        /// The checksum of the content.
        actual: u32,
    },
    /// Compressed content that is not LZW, or does not decompress.
    #[error("compression: {0}")]
    Compression(String),
    /// A length or count above what this implementation accepts.
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Messages nested deeper than allowed (compound in compress in compound …).
    #[error("messages nested deeper than {0}")]
    TooDeep(usize),
    /// An encrypted message arrived and this member has no keyring (or no key fits).
    #[error("encrypted message: {0}")]
    Encrypted(String),
}
