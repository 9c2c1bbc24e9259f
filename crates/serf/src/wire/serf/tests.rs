//! The fact sheet's Serf vectors (captured from Debian's serf 0.9.4) and round trips.

use super::*;
use crate::wire::memberlist::tests::unhex;
use crate::wire::memberlist::{decode_packet, Message};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Serf message inside a (possibly CRC-wrapped) memberlist user packet.
fn user_payload(packet_hex: &str) -> Vec<u8> {
    let mut out = Vec::new();
    decode_packet(&unhex(packet_hex), &mut out).expect("vector decodes");
    match out.as_slice() {
        [Message::User(payload)] => payload.clone(),
        other => panic!("one user message expected: {other:?}"),
    }
}

fn check(packet_hex: &str, expected: SerfMessage) {
    let payload = user_payload(packet_hex);
    assert_eq!(SerfMessage::decode(&payload).unwrap(), expected);
    assert_eq!(hex(&expected.encode()), hex(&payload), "encodes like Go");
}

#[test]
fn v10_query_ack_response_leave_relay() {
    check(
        "0c6e165ed208048ba441646472a47f000001a746696c74657273c0a5466c61677301a24944ce000fe343a54c54696d6501a44e616d65a677686f616d69a75061796c6f6164a470696e67a4506f7274cd1f0aab52656c6179466163746f7200aa536f757263654e6f6465a161a754696d656f7574cebebc2000",
        SerfMessage::Query(Query {
            ltime: 1,
            id: 0x000f_e343,
            addr: vec![127, 0, 0, 1],
            port: 7946,
            source_node: "a".into(),
            filters: vec![],
            flags: QUERY_FLAG_ACK,
            relay_factor: 0,
            timeout: Duration::from_millis(3200),
            name: "whoami".into(),
            payload: b"ping".to_vec(),
        }),
    );
    check(
        "080585a5466c61677301a446726f6da162a24944ce000fe343a54c54696d6501a75061796c6f6164c0",
        SerfMessage::QueryResponse(QueryResponse {
            ltime: 1,
            id: 0x000f_e343,
            from: "b".into(),
            flags: QUERY_FLAG_ACK,
            payload: vec![],
        }),
    );
    check(
        "080585a5466c61677300a446726f6da162a24944ce000fe343a54c54696d6501a75061796c6f6164a7622d686572650a",
        SerfMessage::QueryResponse(QueryResponse {
            ltime: 1,
            id: 0x000f_e343,
            from: "b".into(),
            flags: 0,
            payload: b"b-here\n".to_vec(),
        }),
    );
    check(
        "0cfe63071c080083a54c54696d6502a44e6f6465a162a55072756e65c2",
        SerfMessage::Leave(Leave {
            ltime: 2,
            node: "b".into(),
            prune: false,
        }),
    );
    check(
        "0c139aa55a080182a54c54696d6501a44e6f6465a162",
        SerfMessage::Join(Join {
            ltime: 1,
            node: "b".into(),
        }),
    );
    let relay = user_payload("080982a8446573744164647283a24950a47f000001a4506f7274cd1f0aa45a6f6e65a0a8446573744e616d65a1610585a5466c61677301a446726f6da162a24944ce660601c1a54c54696d6505a75061796c6f6164c0");
    let SerfMessage::Relay(decoded) = SerfMessage::decode(&relay).unwrap() else {
        panic!("a relay")
    };
    assert_eq!(decoded.dest, "127.0.0.1:7946".parse().unwrap());
    assert_eq!(decoded.dest_name, "a");
    assert!(matches!(
        SerfMessage::decode(&decoded.inner).unwrap(),
        SerfMessage::QueryResponse(QueryResponse {
            ltime: 5,
            flags: 1,
            ..
        })
    ));
    assert_eq!(hex(&SerfMessage::Relay(decoded).encode()), hex(&relay));
}

#[test]
fn v4_user_event() {
    let packet = "0702003b00280085a44e6f6465a161a55365714e6f04aa536f7572636541646472a47f000002aa536f757263654e6f6465a162aa536f75726365506f7274cd1f0a080384a24343c3a54c54696d6501a44e616d65a66465706c6f79a75061796c6f6164a568656c6c6f";
    let mut out = Vec::new();
    decode_packet(&unhex(packet), &mut out).unwrap();
    let Message::User(payload) = &out[1] else {
        panic!("user message")
    };
    let event = SerfMessage::UserEvent(UserEvent {
        ltime: 1,
        name: "deploy".into(),
        payload: b"hello".to_vec(),
        cc: true,
    });
    assert_eq!(SerfMessage::decode(payload).unwrap(), event);
    assert_eq!(&event.encode(), payload);
}

#[test]
fn v9_push_pull_state_prefix() {
    // Go's ring: 512 slots, slot 1 holds deploy/hello at LTime 1.
    let mut events = vec![None; 512];
    events[1] = Some(UserEvents {
        ltime: 1,
        events: vec![UserEventEntry {
            name: "deploy".into(),
            payload: b"hello".to_vec(),
        }],
    });
    let state = PushPull {
        ltime: 3,
        status_ltimes: BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
        left_members: vec![],
        event_ltime: 2,
        events,
        query_ltime: 1,
    };
    let encoded = SerfMessage::PushPull(state.clone()).encode();
    let go_prefix = "0286aa4576656e744c54696d6502a64576656e7473dc0200c082a64576656e74739182a44e616d65a66465706c6f79a75061796c6f6164a568656c6c6fa54c54696d6501c0c0";
    assert!(
        hex(&encoded).starts_with(go_prefix),
        "{}",
        &hex(&encoded)[..200]
    );
    assert_eq!(
        SerfMessage::decode(&encoded).unwrap(),
        SerfMessage::PushPull(state)
    );
}

#[test]
fn filters_tags_keys_coordinates() {
    assert_eq!(hex(&Filter::Nodes(vec!["b".into()]).encode()), "0091a162");
    let tag = Filter::Tag {
        tag: "role".into(),
        expr: ".*".into(),
    };
    assert_eq!(hex(&tag.encode()), "0182a445787072a22e2aa3546167a4726f6c65");
    assert_eq!(
        Filter::decode(&unhex("0182a445787072a22e2aa3546167a4726f6c65")).unwrap(),
        tag
    );
    assert!(Filter::decode(&[7, 0x90]).is_err());

    let tags = BTreeMap::from([("role".to_owned(), "web".to_owned())]);
    assert_eq!(hex(&encode_tags(&tags)), "ff81a4726f6c65a3776562");
    assert_eq!(decode_tags(&encode_tags(&tags)).unwrap(), tags);
    assert_eq!(hex(&encode_tags(&BTreeMap::new())), "ff80");
    assert_eq!(decode_tags(b"3306").unwrap()["role"], "3306");

    let key: Vec<u8> = (0x10..0x20).collect();
    assert_eq!(
        hex(&encode_key_request(&key)),
        "0781a34b6579b0101112131415161718191a1b1c1d1e1f"
    );
    assert_eq!(decode_key_request(&encode_key_request(&key)).unwrap(), key);
    let response = KeyResponse {
        result: true,
        message: String::new(),
        keys: Some(vec!["AAECAwQFBgcICQoLDA0ODw==".into()]),
        primary_key: "AAECAwQFBgcICQoLDA0ODw==".into(),
    };
    assert_eq!(KeyResponse::decode(&response.encode()).unwrap(), response);

    // V5's payload: version 1 + the fresh coordinate.
    let fresh = Coordinate {
        vec: vec![0.0; 8],
        error: 1.5,
        adjustment: 0.0,
        height: 1e-5,
    };
    let payload = fresh.to_ping_payload();
    assert_eq!(payload.len(), 130);
    assert!(
        hex(&payload).starts_with("0184aa41646a7573746d656e74cb0000000000000000a54572726f72cb3ff8")
    );
    assert_eq!(
        Coordinate::from_ping_payload(&payload).unwrap(),
        Some(fresh)
    );
    assert_eq!(Coordinate::from_ping_payload(&[]).unwrap(), None);
    assert!(Coordinate::from_ping_payload(&[2, 0x80]).is_err());

    let member = ConflictMember {
        name: "a".into(),
        addr: vec![127, 0, 0, 1],
        port: 7946,
        tags: Some(tags),
        status: 1,
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 5,
    };
    let encoded = ConflictMember::encode_response(Some(&member));
    assert_eq!(
        ConflictMember::decode_response(&encoded).unwrap(),
        Some(member)
    );
    assert_eq!(ConflictMember::decode_response(&[6, 0xc0]).unwrap(), None);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn user_events_and_queries_round_trip(
            ltime in any::<u64>(),
            name in "[a-z_:-]{0,40}",
            payload in prop::collection::vec(any::<u8>(), 0..300),
            cc in any::<bool>(),
            id in any::<u32>(),
            timeout_ms in 0u64..100_000,
        ) {
            let event = SerfMessage::UserEvent(UserEvent { ltime, name: name.clone(), payload: payload.clone(), cc });
            prop_assert_eq!(SerfMessage::decode(&event.encode()).unwrap(), event);
            let query = SerfMessage::Query(Query {
                ltime, id, addr: vec![127, 0, 0, 9], port: 7946, source_node: name.clone(),
                filters: vec![Filter::Nodes(vec![name.clone()]).encode()], flags: 1, relay_factor: 2,
                timeout: Duration::from_millis(timeout_ms), name, payload,
            });
            prop_assert_eq!(SerfMessage::decode(&query.encode()).unwrap(), query);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = SerfMessage::decode(&bytes);
            let _ = Filter::decode(&bytes);
            let _ = decode_tags(&bytes);
            let _ = Coordinate::from_ping_payload(&bytes);
        }
    }
}
