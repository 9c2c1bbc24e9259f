//! The zone's encoded answers, by query: a plain query (one question, no other section but an
//! optional bare OPT record) is answered once through hickory, then from its cached bytes with
//! the query's ID patched in and a role's address records shuffled in place. A zone never
//! changes (the server builds a new one, with an empty cache, on each membership change), so
//! a cached answer stays the uncached path's answer for as long as the zone is served.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use rand::Rng;

use crate::transport::Transport;

/// Distinct queries remembered per zone and transport; the map is emptied when full (a client
/// asking for ever new names costs the uncached path, never unbounded memory).
const MAX_ENTRIES: usize = 4096;
/// Longer queries are never cached.
const MAX_QUERY: usize = 512;
/// The fixed header of every DNS message.
const HEADER_LEN: usize = 12;
/// Owner of an answer record compressed to the question's name (offset 12).
const POINTER_TO_QUESTION: [u8; 2] = [0xc0, 0x0c];
/// Record types whose records have no names inside, so they can be reordered freely.
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;

/// Encoded answers, keyed by the query's bytes after its ID (flags, question and OPT record:
/// everything the answer depends on besides the ID).
#[derive(Debug, Default)]
pub(crate) struct Cache {
    udp: Mutex<HashMap<Box<[u8]>, Entry>>,
    tcp: Mutex<HashMap<Box<[u8]>, Entry>>,
}

/// A clone starts empty: it is a cache, and its zone may be changed.
impl Clone for Cache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[derive(Debug)]
struct Entry {
    bytes: Vec<u8>,
    shuffle: Option<Run>,
}

/// Answer records of equal length, none containing a name, to shuffle per query.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: usize,
    record_len: usize,
    count: usize,
}

impl Cache {
    /// Answers cached, over both transports.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        [&self.udp, &self.tcp]
            .iter()
            .map(|map| map.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn map(&self, transport: Transport) -> &Mutex<HashMap<Box<[u8]>, Entry>> {
        match transport {
            Transport::Udp => &self.udp,
            Transport::Tcp => &self.tcp,
        }
    }

    /// The cached answer to `packet` written into `out` (its ID patched in, its address
    /// records shuffled); false when `packet` has none cached.
    pub(crate) fn answer(
        &self,
        packet: &[u8],
        transport: Transport,
        rng: &mut impl Rng,
        out: &mut Vec<u8>,
    ) -> bool {
        if !cacheable(packet) {
            return false;
        }
        let map = self
            .map(transport)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = map.get(&packet[2..]) else {
            return false;
        };
        out.clear();
        out.extend_from_slice(&entry.bytes);
        let shuffle = entry.shuffle;
        drop(map);
        out[..2].copy_from_slice(&packet[..2]);
        if let Some(run) = shuffle {
            run.shuffle(out, rng);
        }
        true
    }

    /// Remembers `response`, the uncached path's answer to `packet`, when `packet` is a plain
    /// query and its answer's order can be varied here (at most one answer record, or address
    /// records only).
    pub(crate) fn insert(&self, packet: &[u8], transport: Transport, response: &[u8]) {
        if !cacheable(packet) {
            return;
        }
        let Some(shuffle) = address_run(packet, response) else {
            return;
        };
        let mut map = self
            .map(transport)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(
            packet[2..].into(),
            Entry {
                bytes: response.to_vec(),
                shuffle,
            },
        );
    }
}

impl Run {
    /// Fisher–Yates over whole records.
    fn shuffle(self, response: &mut [u8], rng: &mut impl Rng) {
        let len = self.record_len;
        let records = &mut response[self.start..self.start + len * self.count];
        for i in (1..self.count).rev() {
            let j = rng.random_range(0..=i);
            if j != i {
                let (head, tail) = records.split_at_mut(i * len);
                head[j * len..(j + 1) * len].swap_with_slice(&mut tail[..len]);
            }
        }
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// The end of the question that starts at `HEADER_LEN`: its name spelled without compression.
fn question_end(packet: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let label = usize::from(*packet.get(at)?);
        at += 1;
        if label == 0 {
            break;
        }
        if label >= 0x40 || at - HEADER_LEN > 255 {
            return None;
        }
        at += label;
    }
    let end = at + 4;
    (end <= packet.len()).then_some(end)
}

/// A plain query: a standard query (QR, opcode and TC clear), one uncompressed question, no
/// answer or authority, and nothing after the question but an optional OPT record without
/// options. Anything else always takes the uncached path.
fn cacheable(packet: &[u8]) -> bool {
    if packet.len() > MAX_QUERY || packet.len() < HEADER_LEN || packet[2] & 0xfa != 0 {
        return false;
    }
    let counts = [4, 6, 8, 10].map(|at| u16_at(packet, at));
    if counts[..3] != [Some(1), Some(0), Some(0)] {
        return false;
    }
    let Some(end) = question_end(packet) else {
        return false;
    };
    match counts[3] {
        Some(0) => end == packet.len(),
        // Root name, type OPT, class = payload size, TTL = rcode/version/flags, no data.
        Some(1) => {
            packet.len() == end + 11
                && packet[end] == 0
                && u16_at(packet, end + 1) == Some(TYPE_OPT)
                && u16_at(packet, end + 9) == Some(0)
        }
        _ => false,
    }
}

/// How `response`'s answers may be reordered: `Some(None)` when they need not be (at most one
/// record), `Some(Some(run))` for address records at the question's name, `None` when they
/// cannot be here (such an answer is not cached).
fn address_run(packet: &[u8], response: &[u8]) -> Option<Option<Run>> {
    let count = usize::from(u16_at(response, 6)?);
    if count <= 1 {
        return Some(None);
    }
    if response[2] & 0x02 != 0 {
        // Truncated over TCP: the uncached path keeps a random part, not a fixed one.
        return None;
    }
    let start = question_end(response)?;
    if response.get(HEADER_LEN..start)? != packet.get(HEADER_LEN..start)? {
        return None;
    }
    let mut record_len = None;
    let mut at = start;
    for _ in 0..count {
        if response.get(at..at + 2)? != POINTER_TO_QUESTION {
            return None;
        }
        if !matches!(u16_at(response, at + 2)?, TYPE_A | TYPE_AAAA) {
            return None;
        }
        let len = 12 + usize::from(u16_at(response, at + 10)?);
        if *record_len.get_or_insert(len) != len || at + len > response.len() {
            return None;
        }
        at += len;
    }
    Some(Some(Run {
        start,
        record_len: record_len?,
        count,
    }))
}
