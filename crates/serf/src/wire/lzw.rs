//! LZW as Go's `compress/lzw` with order LSB and literal width 8 (the GIF flavour), the only
//! algorithm memberlist uses (ml/util.go `compressPayload`, `decompressBuffer`).

use weezl::{decode::Decoder, encode::Encoder, BitOrder, LzwStatus};

use super::DecodeError;

const LITERAL_WIDTH: u8 = 8;

/// Compresses `data` exactly as Go's writer does (clear code first, EOF code last).
pub fn compress(data: &[u8]) -> Vec<u8> {
    Encoder::new(BitOrder::Lsb, LITERAL_WIDTH)
        .encode(data)
        .expect("LZW encoding into a Vec cannot fail")
}

/// Decompresses `data`, refusing to produce more than `limit` bytes (a decompression bomb
/// is an error, not an allocation).
pub fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut decoder = Decoder::new(BitOrder::Lsb, LITERAL_WIDTH);
    let mut out = Vec::with_capacity((data.len() * 3).min(limit));
    let mut chunk = [0u8; 4096];
    let mut input = data;
    loop {
        let result = decoder.decode_bytes(input, &mut chunk);
        input = &input[result.consumed_in..];
        if out.len() + result.consumed_out > limit {
            return Err(DecodeError::TooLarge {
                what: "decompressed message",
                len: (out.len() + result.consumed_out) as u64,
                limit: limit as u64,
            });
        }
        out.extend_from_slice(&chunk[..result.consumed_out]);
        match result.status {
            Ok(LzwStatus::Done) => return Ok(out),
            Ok(LzwStatus::Ok) => {}
            Ok(LzwStatus::NoProgress) => {
                return Err(DecodeError::Compression(
                    "LZW stream ends without its end code".into(),
                ))
            }
            Err(error) => return Err(DecodeError::Compression(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_limits() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let packed = compress(&data);
        assert_eq!(decompress(&packed, 1 << 20).unwrap(), data);
        assert!(matches!(
            decompress(&packed, 100),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(decompress(&packed[..packed.len() / 2], 1 << 20).is_err());
        assert!(decompress(&[], 1 << 20).is_err());
    }
}
