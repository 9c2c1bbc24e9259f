//! Framing and field codecs for the RPC stream (sans-IO).
//!
//! The RPC port carries a plain sequence of msgpack values with no length prefix, so the only
//! way to find where one value ends is to walk its markers. [`FrameBuffer`] does that
//! incrementally: bytes are pushed in as they arrive, [`FrameBuffer::next_frame`] returns one
//! complete value at a time, and the walk resumes where it stopped (a slow sender costs no
//! rescans). Every declared length is checked against the limit before anything is buffered
//! for it, and nesting is bounded, so a hostile peer can make neither a huge allocation nor a
//! deep recursion in the decoder.
//!
//! Field codecs: `[]byte` fields go out as msgpack bin (what Go's RPC handle writes) and come in
//! as str, bin, an array of small ints, or nil; absent or nil maps, lists and strings decode
//! as empty, like Go's zero values.

use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The deepest nesting a frame may have. Go's RPC values nest at most four levels.
pub const MAX_DEPTH: usize = 32;

/// Why the byte stream cannot be framed; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A value (or a declared string/bin/ext length) is larger than the limit.
    #[error("msgpack value of at least {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The size known so far.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The byte is not a msgpack marker (0xc1 is reserved).
    #[error("invalid msgpack marker 0x{marker:02x} at offset {offset}")]
    InvalidMarker {
        /// The offending byte.
        marker: u8,
        /// Its offset within the frame.
        offset: usize,
    },
    /// Containers nest deeper than [`MAX_DEPTH`].
    #[error("msgpack value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Why a frame could not be decoded into the expected Go struct.
#[derive(Debug, thiserror::Error)]
#[error("decoding {what}: {source}")]
pub struct DecodeError {
    /// What was being decoded (a Go type name such as `requestHeader`).
    pub what: &'static str,
    /// The underlying msgpack error.
    #[source]
    pub source: rmp_serde::decode::Error,
}

/// Decodes one frame into `T`.
pub fn decode<T: DeserializeOwned>(what: &'static str, frame: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(frame).map_err(|source| DecodeError { what, source })
}

/// Encodes `value` as msgpack with structs as maps keyed by field name, appending to `out`.
pub fn encode_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and every type passed here is a plain struct, map or
    // sequence that rmp-serde can always represent.
    rmp_serde::encode::write_named(out, value).expect("msgpack encoding into a Vec is infallible");
}

/// Incremental splitter of a msgpack byte stream into complete values.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    limit: usize,
    /// Offset in `buf` where the current value starts (bytes before it were returned).
    start: usize,
    /// Offset in `buf` up to which the current value has been walked.
    pos: usize,
    /// Values still to read at each open nesting level (outermost first).
    pending: Vec<u64>,
}

impl FrameBuffer {
    /// A buffer that rejects any single value larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            start: 0,
            pos: 0,
            pending: Vec::new(),
        }
    }

    /// Appends bytes received from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        // Returned frames are dropped lazily, so a burst of small values costs no memmoves.
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.pos = 0;
        } else if self.start > 64 * 1024 && self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Returns the next complete value, `Ok(None)` if more bytes are needed, or an error if the
    /// stream can never be framed (the caller must drop the connection).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.pending.is_empty() {
            if self.pos == self.buf.len() {
                return Ok(None);
            }
            self.pending.push(1);
        }
        while let Some(&top) = self.pending.last() {
            if top == 0 {
                self.pending.pop();
                continue;
            }
            let Some(step) = self.step()? else {
                if self.buf.len() - self.start > self.limit {
                    return Err(FrameError::TooLarge {
                        size: (self.buf.len() - self.start) as u64,
                        limit: self.limit,
                    });
                }
                return Ok(None);
            };
            if let Some(top) = self.pending.last_mut() {
                *top -= 1;
            }
            self.pos += step.size;
            if step.children > 0 {
                if self.pending.len() >= MAX_DEPTH {
                    return Err(FrameError::TooDeep);
                }
                self.pending.push(step.children);
            }
            if self.pos - self.start > self.limit {
                return Err(FrameError::TooLarge {
                    size: (self.pos - self.start) as u64,
                    limit: self.limit,
                });
            }
        }
        let frame = self.buf[self.start..self.pos].to_vec();
        self.start = self.pos;
        Ok(Some(frame))
    }

    /// Walks one marker at `pos`; `None` if its bytes have not all arrived yet.
    fn step(&self) -> Result<Option<Step>, FrameError> {
        let rest = &self.buf[self.pos..];
        let Some(&marker) = rest.first() else {
            return Ok(None);
        };
        let be = |n: usize| -> Option<u64> {
            rest.get(1..1 + n)
                .map(|bytes| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        let (size, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0),
            0x80..=0x8f => (1, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (1, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (1 + u64::from(marker & 0x1f), 0),
            0xc1 => {
                return Err(FrameError::InvalidMarker {
                    marker,
                    offset: self.pos - self.start,
                })
            }
            0xc4 | 0xd9 => match be(1) {
                Some(n) => (2 + n, 0),
                None => return Ok(None),
            },
            0xc5 | 0xda => match be(2) {
                Some(n) => (3 + n, 0),
                None => return Ok(None),
            },
            0xc6 | 0xdb => match be(4) {
                Some(n) => (5 + n, 0),
                None => return Ok(None),
            },
            0xc7 => match be(1) {
                Some(n) => (3 + n, 0),
                None => return Ok(None),
            },
            0xc8 => match be(2) {
                Some(n) => (4 + n, 0),
                None => return Ok(None),
            },
            0xc9 => match be(4) {
                Some(n) => (6 + n, 0),
                None => return Ok(None),
            },
            0xca | 0xce | 0xd2 => (5, 0),
            0xcb | 0xcf | 0xd3 => (9, 0),
            0xcc | 0xd0 => (2, 0),
            0xcd | 0xd1 => (3, 0),
            0xd4 => (3, 0),
            0xd5 => (4, 0),
            0xd6 => (6, 0),
            0xd7 => (10, 0),
            0xd8 => (18, 0),
            0xdc => match be(2) {
                Some(n) => (3, n),
                None => return Ok(None),
            },
            0xdd => match be(4) {
                Some(n) => (5, n),
                None => return Ok(None),
            },
            0xde => match be(2) {
                Some(n) => (3, 2 * n),
                None => return Ok(None),
            },
            0xdf => match be(4) {
                Some(n) => (5, 2 * n),
                None => return Ok(None),
            },
        };
        let end = self.pos as u64 + size;
        let value_size = end - self.start as u64;
        if value_size > self.limit as u64 {
            return Err(FrameError::TooLarge {
                size: value_size,
                limit: self.limit,
            });
        }
        if end > self.buf.len() as u64 {
            return Ok(None);
        }
        Ok(Some(Step {
            size: size as usize,
            children,
        }))
    }
}

struct Step {
    size: usize,
    children: u64,
}

/// `#[serde(with = "bytes")]` for Go `[]byte` fields: bin out; str, bin, int array or nil in.
pub mod bytes {
    use super::*;

    /// Writes msgpack bin.
    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    /// Reads str, bin, an array of small ints, or nil (as empty).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_any(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes as msgpack bin, str, an array of small ints, or nil")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.as_bytes().to_vec())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(byte) = seq.next_element::<u8>()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// `deserialize_with` for fields where Go may send nil: nil decodes as the default value.
pub fn nil_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Feeds `input` one byte at a time and returns the frames found (as hex) or the error.
    fn frames(input: &[u8], limit: usize) -> Result<Vec<String>, FrameError> {
        let mut buffer = FrameBuffer::new(limit);
        let mut out = Vec::new();
        for byte in input {
            buffer.extend(&[*byte]);
            while let Some(frame) = buffer.next_frame()? {
                out.push(frame.iter().map(|b| format!("{b:02x}")).collect());
            }
        }
        Ok(out)
    }

    #[test]
    fn splits_values() {
        let cases: &[(&str, &[&str])] = &[
            ("01", &["01"]),
            ("0102", &["01", "02"]),
            ("c0c3", &["c0", "c3"]),
            ("81a161c40101", &["81a161c40101"]),
            ("92a16190", &["92a16190"]),
            ("d903616263ff", &["d903616263", "ff"]),
            ("dc0002c0c0", &["dc0002c0c0"]),
            (
                "de0001a161cf0000000000000001",
                &["de0001a161cf0000000000000001"],
            ),
            (
                "d40102cb3ff0000000000000",
                &["d40102", "cb3ff0000000000000"],
            ),
            ("c70301aabbcc", &["c70301aabbcc"]),
            ("80", &["80"]),
            ("81a16180", &["81a16180"]),
        ];
        for (input, expected) in cases {
            assert_eq!(
                frames(&hex(input), 1024).unwrap(),
                expected.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "input {input}"
            );
        }
    }

    #[test]
    fn many_small_values_across_compactions() {
        let mut buffer = FrameBuffer::new(16);
        let mut n_frames = 0;
        // A value split across chunk boundaries too: `cd 01 02` straddles every other chunk.
        let stream: Vec<u8> = std::iter::repeat_n([0x01u8, 0xcd, 0x01, 0x02], 50_000)
            .flatten()
            .collect();
        for chunk in stream.chunks(70_001) {
            buffer.extend(chunk);
            while let Some(frame) = buffer.next_frame().unwrap() {
                assert!(frame == [0x01] || frame == [0xcd, 0x01, 0x02], "{frame:?}");
                n_frames += 1;
            }
        }
        assert_eq!(n_frames, 100_000);
        assert_eq!(buffer.buffered(), 0);
    }

    #[test]
    fn v11_handshake_and_members_filtered() {
        let input = hex("82a7436f6d6d616e64a968616e647368616b65a35365710181a756657273696f6e0182a7436f6d6d616e64b06d656d626572732d66696c7465726564a35365710283a44e616d65a0a6537461747573a0a45461677380");
        assert_eq!(frames(&input, 1024).unwrap().len(), 4);
    }

    #[test]
    fn rejects_hostile_input() {
        let cases: &[(&str, FrameError)] = &[
            (
                "c1",
                FrameError::InvalidMarker {
                    marker: 0xc1,
                    offset: 0,
                },
            ),
            (
                "c6ffffffff",
                FrameError::TooLarge {
                    size: 5 + 0xffff_ffff,
                    limit: 64,
                },
            ),
            (
                "dbffffffff",
                FrameError::TooLarge {
                    size: 5 + 0xffff_ffff,
                    limit: 64,
                },
            ),
            (&"91".repeat(40), FrameError::TooDeep),
        ];
        for (input, expected) in cases {
            assert_eq!(frames(&hex(input), 64), Err(expected.clone()), "{input}");
        }
        // A huge array count needs no allocation: it fails once the bytes pass the limit.
        let mut input = hex("ddffffffff");
        input.extend(std::iter::repeat_n(0u8, 100));
        assert!(matches!(
            frames(&input, 64),
            Err(FrameError::TooLarge { limit: 64, .. })
        ));
    }

    proptest::proptest! {
        /// Any sequence of values, cut into any chunks, comes back as the same values.
        #[test]
        fn frames_survive_any_chunking(
            values in proptest::collection::vec(
                (".{0,40}", proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                 proptest::num::u64::ANY, proptest::option::of(proptest::bool::ANY),
                 proptest::collection::btree_map("[a-z]{0,5}", proptest::num::i64::ANY, 0..20)),
                1..8),
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let encoded: Vec<Vec<u8>> = values
                .iter()
                .map(|(text, bytes, number, flag, map)| {
                    let mut out = Vec::new();
                    encode_into(&mut out, &(text, serde_bytes_like(bytes), number, flag, map));
                    out
                })
                .collect();
            let stream: Vec<u8> = encoded.concat();
            let mut buffer = FrameBuffer::new(1 << 20);
            let mut found = Vec::new();
            let mut offset = 0;
            let mut cut = cuts.iter().cycle();
            while offset < stream.len() {
                let end = (offset + cut.next().copied().unwrap_or(1)).min(stream.len());
                buffer.extend(&stream[offset..end]);
                offset = end;
                while let Some(frame) = buffer.next_frame().unwrap() {
                    found.push(frame);
                }
            }
            proptest::prop_assert_eq!(found, encoded);
            proptest::prop_assert_eq!(buffer.buffered(), 0);
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the framer or any decoder the server and client use.
        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            use crate::rpc::messages::*;
            let mut buffer = FrameBuffer::new(4096);
            buffer.extend(&input);
            while let Ok(Some(frame)) = buffer.next_frame() {
                let _ = decode::<RequestHeader>("requestHeader", &frame);
                let _ = decode::<ResponseHeader>("responseHeader", &frame);
                let _ = decode::<MembersResponse>("membersResponse", &frame);
                let _ = decode::<QueryRequest>("queryRequest", &frame);
                let _ = decode::<QueryRecord>("queryRecord", &frame);
                let _ = decode::<EventRequest>("eventRequest", &frame);
                let _ = decode::<TagsRequest>("tagsRequest", &frame);
                let _ = decode::<KeyResponse>("keyResponse", &frame);
                let _ = decode::<CoordinateResponse>("coordinateResponse", &frame);
                let _ = decode::<RawStats>("stats", &frame);
                let _ = decode::<AnyEventRecord>("event record", &frame);
            }
        }
    }

    /// Bytes serialized as msgpack bin.
    fn serde_bytes_like(bytes: &[u8]) -> impl Serialize + '_ {
        struct Bin<'a>(&'a [u8]);
        impl Serialize for Bin<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_bytes(self.0)
            }
        }
        Bin(bytes)
    }

    #[test]
    fn bytes_accept_every_go_form() {
        #[derive(Deserialize)]
        struct Payload {
            #[serde(with = "bytes", rename = "P", default)]
            p: Vec<u8>,
        }
        for input in [
            "81a150c403616263",
            "81a150a3616263",
            "81a150d903616263",
            "81a15093616263",
        ] {
            let value: Payload = decode("payload", &hex(input)).unwrap();
            assert_eq!(value.p, b"abc", "{input}");
        }
        for input in ["81a150c0", "80"] {
            let value: Payload = decode("payload", &hex(input)).unwrap();
            assert!(value.p.is_empty(), "{input}");
        }
    }
}
