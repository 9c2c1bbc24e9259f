//! Any bytes on a gossip TCP stream, fed whole and in two pieces: framing must agree, and
//! nothing may panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serf::wire::crypto::Keyring;
use serf::wire::serf::SerfMessage;
use serf::wire::stream::{decode_stream, StreamMessage};

fuzz_target!(|data: &[u8]| {
    let keyring = Keyring::new(&[[7u8; 16]]).expect("a 16-byte key is valid");
    let _ = keyring.decrypt_stream(data);
    let whole = decode_stream(data);
    if let Ok(Some((message, used))) = &whole {
        assert!(*used <= data.len());
        // A prefix of a complete message is never complete.
        assert!(matches!(decode_stream(&data[..*used - 1]), Ok(None) | Err(_)));
        if let StreamMessage::PushPull(push_pull) = message {
            let _ = SerfMessage::decode(&push_pull.user_state);
        }
    }
});
