//! Any bytes on the gossip UDP port: decrypt (with a fixed key), unwrap and decode every
//! memberlist message and every Serf message inside user messages. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serf::wire::crypto::Keyring;
use serf::wire::memberlist::{decode_packet, Message};
use serf::wire::serf::{decode_tags, Coordinate, Filter, SerfMessage};

fuzz_target!(|data: &[u8]| {
    let keyring = Keyring::new(&[[7u8; 16]]).expect("a 16-byte key is valid");
    let _ = keyring.decrypt_packet(data);
    let mut messages = Vec::new();
    let _ = decode_packet(data, &mut messages);
    for message in messages {
        match message {
            Message::User(payload) => {
                if let Ok(SerfMessage::Query(query)) = SerfMessage::decode(&payload) {
                    for filter in &query.filters {
                        let _ = Filter::decode(filter);
                    }
                }
            }
            Message::Alive(alive) => {
                let _ = decode_tags(&alive.meta);
            }
            Message::Ack(ack) => {
                let _ = Coordinate::from_ping_payload(&ack.payload);
            }
            _ => {}
        }
    }
});
