//! The byte stream of bulk transfers: byte `i` is `BASE[i % PERIOD]`, a period that is prime so
//! that no buffer or pipe size lines up with it (a misplaced chunk cannot match by accident).

use std::sync::OnceLock;

/// The pattern's period (2^17 − 1, prime).
const PERIOD: usize = 131_071;

/// Two periods back to back, so any window of up to `PERIOD` bytes is one contiguous slice.
fn doubled() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let base: Vec<u8> = (0..PERIOD as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut bytes = base.clone();
        bytes.extend_from_slice(&base);
        bytes
    })
}

/// The stream's bytes `[offset, offset + len)`, `len` capped at one period.
pub(crate) fn slice(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % PERIOD as u64) as usize;
    &doubled()[start..start + len.min(PERIOD)]
}

/// Whether `data` is the stream's bytes from `offset` on.
pub(crate) fn check(mut offset: u64, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let expected = slice(offset, data.len());
        if data[..expected.len()] != *expected {
            return false;
        }
        offset += expected.len() as u64;
        data = &data[expected.len()..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_match_the_stream_and_a_shifted_window_does_not() {
        let stream: Vec<u8> = (0..5 * PERIOD as u64 + 17)
            .map(|i| slice(i, 1)[0])
            .collect();
        for (offset, len) in [(0, 10), (PERIOD - 3, 400_000), (5, PERIOD), (1, 2 * PERIOD)] {
            assert!(
                check(offset as u64, &stream[offset..offset + len]),
                "{offset}+{len}"
            );
            assert!(
                !check(offset as u64 + 1, &stream[offset..offset + len]),
                "{offset}+{len}"
            );
        }
    }
}
