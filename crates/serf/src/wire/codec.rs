//! msgpack exactly as go-msgpack 0.5.5 writes it with the zero-value `MsgpackHandle` that Serf
//! and memberlist use on the gossip port (codec/msgpack.go, codec/encode.go), and lenient
//! decoding of everything that handle (or a non-Go peer) may send.
//!
//! Go's gossip encoder never emits `str8` (`d9`) nor `bin`: strings *and* byte slices are written
//! as fixstr, `str16` or `str32`. Struct fields are written as maps with Go's field names sorted
//! by byte order; callers of [`Writer`] write them in that order. Decoding goes through serde
//! (`rmp_serde`) with the helpers [`bytes`] and [`string`], which accept `str`, `bin` and `nil`.

use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::DecodeError;

/// A msgpack writer producing go-msgpack's gossip encoding.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Appends to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    /// A map header for `len` entries.
    pub fn map(&mut self, len: usize) -> &mut Self {
        self.container(len, 0x80, 0xde, 0xdf)
    }

    /// An array header for `len` elements.
    pub fn array(&mut self, len: usize) -> &mut Self {
        self.container(len, 0x90, 0xdc, 0xdd)
    }

    fn container(&mut self, len: usize, fix: u8, m16: u8, m32: u8) -> &mut Self {
        if len < 16 {
            self.out.push(fix | len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(m16);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(m32);
            self.out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self
    }

    /// A string: fixstr below 32 bytes, else `str16`/`str32` (never `str8`, as Go).
    pub fn str(&mut self, value: &str) -> &mut Self {
        self.raw(value.as_bytes())
    }

    /// A byte slice, written as Go's gossip handle writes `[]byte`: in the str family.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.raw(value)
    }

    /// A byte slice that Go holds as a nil slice when empty (`c0`), else as [`Self::bytes`].
    pub fn bytes_or_nil(&mut self, value: &[u8]) -> &mut Self {
        if value.is_empty() {
            self.nil()
        } else {
            self.raw(value)
        }
    }

    fn raw(&mut self, value: &[u8]) -> &mut Self {
        let len = value.len();
        if len < 32 {
            self.out.push(0xa0 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            self.out.push(0xda);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0xdb);
            self.out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.out.extend_from_slice(value);
        self
    }

    /// An unsigned integer in the smallest encoding (posfixint, `cc`, `cd`, `ce`, `cf`).
    pub fn uint(&mut self, value: u64) -> &mut Self {
        if value < 128 {
            self.out.push(value as u8);
        } else if value <= u64::from(u8::MAX) {
            self.out.extend_from_slice(&[0xcc, value as u8]);
        } else if value <= u64::from(u16::MAX) {
            self.out.push(0xcd);
            self.out.extend_from_slice(&(value as u16).to_be_bytes());
        } else if value <= u64::from(u32::MAX) {
            self.out.push(0xce);
            self.out.extend_from_slice(&(value as u32).to_be_bytes());
        } else {
            self.out.push(0xcf);
            self.out.extend_from_slice(&value.to_be_bytes());
        }
        self
    }

    /// A signed integer: as [`Self::uint`] when non-negative (Go does), else negfixint/`d0`-`d3`.
    pub fn int(&mut self, value: i64) -> &mut Self {
        if let Ok(unsigned) = u64::try_from(value) {
            return self.uint(unsigned);
        }
        if value >= -32 {
            self.out.push(value as i8 as u8);
        } else if value >= i64::from(i8::MIN) {
            self.out.extend_from_slice(&[0xd0, value as i8 as u8]);
        } else if value >= i64::from(i16::MIN) {
            self.out.push(0xd1);
            self.out.extend_from_slice(&(value as i16).to_be_bytes());
        } else if value >= i64::from(i32::MIN) {
            self.out.push(0xd2);
            self.out.extend_from_slice(&(value as i32).to_be_bytes());
        } else {
            self.out.push(0xd3);
            self.out.extend_from_slice(&value.to_be_bytes());
        }
        self
    }

    /// A boolean.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.out.push(if value { 0xc3 } else { 0xc2 });
        self
    }

    /// A float64, always `cb` + 8 bytes.
    pub fn f64(&mut self, value: f64) -> &mut Self {
        self.out.push(0xcb);
        self.out.extend_from_slice(&value.to_bits().to_be_bytes());
        self
    }

    /// nil (`c0`).
    pub fn nil(&mut self) -> &mut Self {
        self.out.push(0xc0);
        self
    }

    /// Bytes that are already msgpack.
    pub fn raw_value(&mut self, encoded: &[u8]) -> &mut Self {
        self.out.extend_from_slice(encoded);
        self
    }
}

/// Deepest nesting [`value_len`] follows; Serf's messages nest at most a few levels.
const MAX_DEPTH: usize = 32;

/// The length of the msgpack value at the start of `buf`, without allocating:
/// `Ok(None)` when `buf` holds only part of it (read more), an error when it is malformed.
pub fn value_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let mut pos = 0;
    // Values still to read, as a count per open container level.
    let mut pending: Vec<u64> = Vec::with_capacity(4);
    pending.push(1);
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let Some(&marker) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => match read_len(buf, &mut pos, 1)? {
                Some(len) => (len, 0),
                None => return Ok(None),
            },
            0xc5 | 0xda => match read_len(buf, &mut pos, 2)? {
                Some(len) => (len, 0),
                None => return Ok(None),
            },
            0xc6 | 0xdb => match read_len(buf, &mut pos, 4)? {
                Some(len) => (len, 0),
                None => return Ok(None),
            },
            0xc7..=0xc9 => {
                let width = 1 << (marker - 0xc7);
                match read_len(buf, &mut pos, width)? {
                    Some(len) => (len + 1, 0),
                    None => return Ok(None),
                }
            }
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => match read_len(buf, &mut pos, 2)? {
                Some(len) => (0, len),
                None => return Ok(None),
            },
            0xdd => match read_len(buf, &mut pos, 4)? {
                Some(len) => (0, len),
                None => return Ok(None),
            },
            0xde => match read_len(buf, &mut pos, 2)? {
                Some(len) => (0, 2 * len),
                None => return Ok(None),
            },
            0xdf => match read_len(buf, &mut pos, 4)? {
                Some(len) => (0, 2 * len),
                None => return Ok(None),
            },
            0xc1 => return Err(DecodeError::Msgpack("reserved marker c1".into())),
        };
        let end = pos as u64 + skip;
        if end > buf.len() as u64 {
            return Ok(None);
        }
        pos = end as usize;
        if children > 0 {
            if pending.len() >= MAX_DEPTH {
                return Err(DecodeError::Msgpack(format!(
                    "nesting deeper than {MAX_DEPTH}"
                )));
            }
            pending.push(children);
        }
    }
    Ok(Some(pos))
}

fn read_len(buf: &[u8], pos: &mut usize, width: usize) -> Result<Option<u64>, DecodeError> {
    let Some(bytes) = buf.get(*pos..*pos + width) else {
        return Ok(None);
    };
    *pos += width;
    Ok(Some(
        bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    ))
}

/// Decodes one msgpack value of type `T` that must fill `buf` exactly. The value's extent is
/// checked first ([`value_len`]), so no declared length is trusted before the bytes are there.
pub fn from_slice<'de, T: serde::Deserialize<'de>>(buf: &'de [u8]) -> Result<T, DecodeError> {
    match value_len(buf)? {
        None => {
            return Err(DecodeError::Truncated {
                what: "msgpack value",
                need: buf.len() + 1,
                have: buf.len(),
            })
        }
        Some(len) if len != buf.len() => {
            return Err(DecodeError::Msgpack(format!(
                "{} trailing bytes after the value",
                buf.len() - len
            )))
        }
        Some(_) => {}
    }
    rmp_serde::from_slice(buf).map_err(|error| DecodeError::Msgpack(error.to_string()))
}

/// serde helper for `[]byte` fields: accepts str (any bytes, not only UTF-8), bin, nil, or an
/// array of small integers, as Go's decoder does.
pub fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_any(BytesVisitor)
}

/// serde helper for `string` fields: accepts str, nil (→ empty), and bin holding UTF-8.
pub fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let bytes = deserializer.deserialize_any(BytesVisitor)?;
    String::from_utf8(bytes).map_err(|_| de::Error::custom("string is not valid UTF-8"))
}

/// serde helper for `[][]byte` fields (nil → empty).
pub fn bytes_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Vec<u8>>, D::Error> {
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of byte strings or nil")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element::<BytesField>()? {
                out.push(item.0);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(ListVisitor)
}

/// A `Vec<u8>` that deserializes with [`bytes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BytesField(pub Vec<u8>);

impl<'de> serde::Deserialize<'de> for BytesField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        bytes(deserializer).map(Self)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a msgpack str, bin or nil")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.as_bytes().to_vec())
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.to_vec())
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into_bytes())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(write: impl FnOnce(&mut Writer<'_>), expected_hex: &str) {
        let mut out = Vec::new();
        write(&mut Writer::new(&mut out));
        assert_eq!(hex(&out), expected_hex);
        assert_eq!(
            value_len(&out).unwrap(),
            Some(out.len()),
            "value_len of {expected_hex}"
        );
    }

    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn writes_like_go() {
        check(
            |w| {
                w.str("a");
            },
            "a161",
        );
        check(
            |w| {
                w.str(&"x".repeat(32));
            },
            &format!("da0020{}", "78".repeat(32)),
        );
        check(
            |w| {
                w.bytes(&[0x7f, 0, 0, 1]);
            },
            "a47f000001",
        );
        check(
            |w| {
                w.uint(7946);
            },
            "cd1f0a",
        );
        check(
            |w| {
                w.uint(200);
            },
            "ccc8",
        );
        check(
            |w| {
                w.uint(3_200_000_000);
            },
            "cebebc2000",
        );
        check(
            |w| {
                w.uint(u64::MAX);
            },
            "cfffffffffffffffff",
        );
        check(
            |w| {
                w.int(-1);
            },
            "ff",
        );
        check(
            |w| {
                w.int(-33);
            },
            "d0df",
        );
        check(
            |w| {
                w.int(-40_000);
            },
            "d2ffff63c0",
        );
        check(
            |w| {
                w.f64(1.5);
            },
            "cb3ff8000000000000",
        );
        check(
            |w| {
                w.bool(true);
            },
            "c3",
        );
        check(
            |w| {
                w.bool(false);
            },
            "c2",
        );
        check(
            |w| {
                w.map(1).str("a").nil();
            },
            "81a161c0",
        );
        let mut out = Vec::new();
        Writer::new(&mut out).array(16);
        assert_eq!(hex(&out), "dc0010");
    }

    #[test]
    fn value_len_reports_partial_values() {
        let full = [
            0x82, 0xa1, 0x61, 0x01, 0xa1, 0x62, 0xda, 0x00, 0x02, 0x78, 0x79,
        ];
        assert_eq!(value_len(&full).unwrap(), Some(full.len()));
        for cut in 0..full.len() {
            assert_eq!(value_len(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(value_len(&[0xc1]).is_err());
        // A huge declared length does not allocate; it just asks for more bytes.
        assert_eq!(value_len(&[0xdb, 0xff, 0xff, 0xff, 0xff]).unwrap(), None);
        assert_eq!(value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff]).unwrap(), None);
        let deep = vec![0x91; 100];
        assert!(value_len(&deep).is_err());
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Sample {
        #[serde(rename = "Name", default, deserialize_with = "string")]
        name: String,
        #[serde(rename = "Addr", default, deserialize_with = "bytes")]
        addr: Vec<u8>,
        #[serde(rename = "Port", default)]
        port: u16,
    }

    #[test]
    fn decodes_str_bin_nil_and_any_int_width() {
        // {Name: "a", Addr: str "\x7f\0\0\x01", Port: u32 7946}
        let go = [
            0x83, 0xa4, b'N', b'a', b'm', b'e', 0xa1, b'a', 0xa4, b'A', b'd', b'd', b'r', 0xa4,
            0x7f, 0, 0, 1, 0xa4, b'P', b'o', b'r', b't', 0xce, 0, 0, 0x1f, 0x0a,
        ];
        let sample: Sample = from_slice(&go).unwrap();
        assert_eq!(sample.addr, vec![0x7f, 0, 0, 1]);
        assert_eq!(sample.port, 7946);
        // Addr as bin8, Name as nil, Port missing.
        let other = [
            0x82, 0xa4, b'N', b'a', b'm', b'e', 0xc0, 0xa4, b'A', b'd', b'd', b'r', 0xc4, 2, 0xff,
            0xfe,
        ];
        let sample: Sample = from_slice(&other).unwrap();
        assert_eq!(
            sample,
            Sample {
                name: String::new(),
                addr: vec![0xff, 0xfe],
                port: 0
            }
        );
        // Non-UTF-8 bytes inside a str are fine for a []byte field.
        let raw = [0x81, 0xa4, b'A', b'd', b'd', b'r', 0xa2, 0xff, 0x80];
        assert_eq!(from_slice::<Sample>(&raw).unwrap().addr, vec![0xff, 0x80]);
        // Trailing bytes are an error.
        assert!(from_slice::<Sample>(&[0x80, 0x00]).is_err());
    }
}
