//! Any bytes on the RPC port, fed whole and in pieces: framing must agree whatever the piece
//! size, every frame is a prefix-free msgpack value within the limit, and decoding a frame as
//! any request, response or record the RPC reads must not panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serf_agent::rpc::codec::{decode, FrameBuffer, FrameError};
use serf_agent::rpc::messages::{
    AuthRequest, CoordinateResponse, EventRequest, HandshakeRequest, JoinRequest, JoinResponse,
    KeyRequest, KeyResponse, LogRecord, Member, MembersFilteredRequest, MembersResponse,
    QueryRecord, QueryRequest, RequestHeader, ResponseHeader, StreamRequest, TagsRequest,
};

const LIMIT: usize = 4096;

/// Every frame and the error that ended the walk, if any.
fn split(data: &[u8], piece: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut frames = FrameBuffer::new(LIMIT);
    let mut out = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        frames.extend(chunk);
        loop {
            match frames.next_frame() {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => break,
                Err(error) => return (out, Some(error)),
            }
        }
    }
    (out, None)
}

fn decode_all(frame: &[u8]) {
    let _ = decode::<RequestHeader>("requestHeader", frame);
    let _ = decode::<ResponseHeader>("responseHeader", frame);
    let _ = decode::<HandshakeRequest>("handshakeRequest", frame);
    let _ = decode::<AuthRequest>("authRequest", frame);
    let _ = decode::<EventRequest>("eventRequest", frame);
    let _ = decode::<JoinRequest>("joinRequest", frame);
    let _ = decode::<JoinResponse>("joinResponse", frame);
    let _ = decode::<MembersFilteredRequest>("membersFilteredRequest", frame);
    let _ = decode::<MembersResponse>("membersResponse", frame);
    let _ = decode::<KeyRequest>("keyRequest", frame);
    let _ = decode::<KeyResponse>("keyResponse", frame);
    let _ = decode::<StreamRequest>("streamRequest", frame);
    let _ = decode::<TagsRequest>("tagsRequest", frame);
    let _ = decode::<QueryRequest>("queryRequest", frame);
    let _ = decode::<QueryRecord>("queryRecord", frame);
    let _ = decode::<LogRecord>("logRecord", frame);
    let _ = decode::<CoordinateResponse>("coordinateResponse", frame);
    let _ = decode::<Member>("member", frame);
}

fuzz_target!(|input: &[u8]| {
    let Some((&piece, data)) = input.split_first() else {
        return;
    };
    let (whole, whole_error) = split(data, data.len());
    let (pieces, pieces_error) = split(data, usize::from(piece % 16) + 1);
    // Fed in pieces, the walk may stop at the same bad byte or see a value outgrow the limit
    // a little earlier; the frames before that must be the same ones.
    if whole_error.is_none() && pieces_error.is_none() {
        assert_eq!(whole, pieces, "framing depends on how the bytes arrive");
    } else {
        let n = whole.len().min(pieces.len());
        assert_eq!(whole[..n], pieces[..n], "framing depends on how the bytes arrive");
    }
    let mut offset = 0;
    for frame in &whole {
        assert!(!frame.is_empty() && frame.len() <= LIMIT, "frame of {} bytes", frame.len());
        assert_eq!(&data[offset..offset + frame.len()], &frame[..], "frames are the input in order");
        offset += frame.len();
        decode_all(frame);
    }
});
