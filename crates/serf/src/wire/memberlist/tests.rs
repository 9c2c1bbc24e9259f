//! The fact sheet's test vectors (captured from Debian's serf 0.9.4) and round trips.

use super::*;

pub(crate) fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("test vector is hex"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_all(packet: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    decode_packet(packet, &mut out).expect("vector decodes");
    out
}

const V1_PING: &str = "0085a44e6f6465a161a55365714e6f01aa536f7572636541646472a47f000002aa536f757263654e6f6465a162aa536f75726365506f7274cd1f0a";
const V2_CRC_USER: &str = "0c139aa55a080182a54c54696d6501a44e6f6465a162";
const V3_CRC_COMPOUND_ALIVES: &str = "0cf76d01500702004400400486a441646472a47f000001ab496e6361726e6174696f6e01a44d657461abff81a4726f6c65a3776562a44e6f6465a161a4506f7274cd1f0aa356736ea60105020205050486a441646472a47f000002ab496e6361726e6174696f6e01a44d657461a7ff81a26463a178a44e6f6465a162a4506f7274cd1f0aa356736ea6010502020505";
const V4_COMPOUND_PING_EVENT: &str = "0702003b00280085a44e6f6465a161a55365714e6f04aa536f7572636541646472a47f000002aa536f757263654e6f6465a162aa536f75726365506f7274cd1f0a080384a24343c3a54c54696d6501a44e616d65a66465706c6f79a75061796c6f6164a568656c6c6f";
const V5_ACK: &str = "0282a75061796c6f6164da00820184aa41646a7573746d656e74cb0000000000000000a54572726f72cb3ff8000000000000a6486569676874cb3ee4f8b588e368f1a356656398cb0000000000000000cb0000000000000000cb0000000000000000cb0000000000000000cb0000000000000000cb0000000000000000cb0000000000000000cb0000000000000000a55365714e6f4d";
const V6_COMPRESSED_ACK: &str = "0982a4416c676f00a3427566da00620005083a05254c1e366fc290d10640500042aa82905153670e9d3665dcd05906a0a3c78ea58ac891f346ceb21ff83e763485a44c9a336836fa2087af16a27168e28db252660c268e2a3b020d3a5465d18f473d26151a9469d35253cac471f2a64940";
const V10_DEAD_CRC: &str = "0cc887355e0583a446726f6da162ab496e6361726e6174696f6e01a44e6f6465a162";
const V10_SUSPECT_CRC: &str =
    "0cac7760c70383a446726f6da161ab496e6361726e6174696f6e02a44e6f6465a162";

fn ping_v1() -> Ping {
    Ping {
        seq_no: 1,
        node: "a".into(),
        source_addr: vec![127, 0, 0, 2],
        source_port: 7946,
        source_node: "b".into(),
    }
}

fn alive(node: &str, last_octet: u8, meta: &[u8]) -> Alive {
    Alive {
        incarnation: 1,
        node: node.into(),
        addr: vec![127, 0, 0, last_octet],
        port: 7946,
        meta: meta.to_vec(),
        vsn: vec![1, 5, 2, 2, 5, 5],
    }
}

#[test]
fn v1_ping_decodes_and_encodes_byte_for_byte() {
    let bytes = unhex(V1_PING);
    assert_eq!(decode_all(&bytes), vec![Message::Ping(ping_v1())]);
    assert_eq!(hex(&Message::Ping(ping_v1()).to_bytes()), V1_PING);
}

#[test]
fn v2_crc_wrapped_user_message() {
    let bytes = unhex(V2_CRC_USER);
    let user = unhex("080182a54c54696d6501a44e6f6465a162");
    assert_eq!(decode_all(&bytes), vec![Message::User(user[1..].to_vec())]);
    assert_eq!(hex(&with_crc(&user)), V2_CRC_USER);
}

#[test]
fn v3_crc_compound_of_alives() {
    let bytes = unhex(V3_CRC_COMPOUND_ALIVES);
    let a = alive("a", 1, &unhex("ff81a4726f6c65a3776562"));
    let b = alive("b", 2, &unhex("ff81a26463a178"));
    assert_eq!(
        decode_all(&bytes),
        vec![Message::Alive(a.clone()), Message::Alive(b.clone())]
    );
    let packet = with_crc(&compound(&[
        Message::Alive(a).to_bytes(),
        Message::Alive(b).to_bytes(),
    ]));
    assert_eq!(hex(&packet), V3_CRC_COMPOUND_ALIVES);
}

#[test]
fn v4_compound_ping_with_user_event() {
    let bytes = unhex(V4_COMPOUND_PING_EVENT);
    let messages = decode_all(&bytes);
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[0],
        Message::Ping(Ping {
            seq_no: 4,
            ..ping_v1()
        })
    );
    let Message::User(event) = &messages[1] else {
        panic!("second part is a user message: {messages:?}")
    };
    assert_eq!(event[0], 3, "serf user event type");
    assert_eq!(
        hex(&compound(&[messages[0].to_bytes(), messages[1].to_bytes()])),
        V4_COMPOUND_PING_EVENT
    );
}

#[test]
fn v5_ack_with_str16_payload_and_v6_compressed() {
    let v5 = unhex(V5_ACK);
    let messages = decode_all(&v5);
    let Message::Ack(ack) = &messages[0] else {
        panic!("an ack: {messages:?}")
    };
    assert_eq!(ack.seq_no, 77);
    assert_eq!(ack.payload.len(), 130);
    assert_eq!(hex(&messages[0].to_bytes()), V5_ACK);
    // Go compressed V5 into V6; our compressor gives Go's bytes, and V6 decodes to V5.
    assert_eq!(hex(&compress(&v5)), V6_COMPRESSED_ACK);
    assert_eq!(decode_all(&unhex(V6_COMPRESSED_ACK)), messages);
}

#[test]
fn v10_dead_and_suspect() {
    let dead = Dead {
        incarnation: 1,
        node: "b".into(),
        from: "b".into(),
    };
    assert_eq!(
        decode_all(&unhex(V10_DEAD_CRC)),
        vec![Message::Dead(dead.clone())]
    );
    assert_eq!(
        hex(&with_crc(&Message::Dead(dead).to_bytes())),
        V10_DEAD_CRC
    );
    let suspect = Suspect {
        incarnation: 2,
        node: "b".into(),
        from: "a".into(),
    };
    assert_eq!(
        hex(&with_crc(&Message::Suspect(suspect.clone()).to_bytes())),
        V10_SUSPECT_CRC
    );
    assert_eq!(
        decode_all(&unhex(V10_SUSPECT_CRC)),
        vec![Message::Suspect(suspect)]
    );
}

#[test]
fn every_message_round_trips() {
    let messages = vec![
        Message::Ping(ping_v1()),
        Message::Ping(Ping {
            seq_no: 9,
            node: String::new(),
            ..Ping::default()
        }),
        Message::IndirectPing(IndirectPingReq {
            seq_no: 70_000,
            target: vec![10, 0, 0, 1],
            port: 7946,
            node: "x".into(),
            nack: true,
            source_addr: vec![127, 0, 0, 1],
            source_port: 7947,
            source_node: "me".into(),
        }),
        Message::Ack(AckResp {
            seq_no: u32::MAX,
            payload: vec![],
        }),
        Message::Nack(NackResp { seq_no: 3 }),
        Message::Alive(alive("n", 9, &[])),
        Message::User(vec![1, 2, 3]),
        Message::Err(ErrResp {
            error: "boom".into(),
        }),
    ];
    for message in messages {
        let bytes = message.to_bytes();
        assert_eq!(decode_all(&bytes), vec![message.clone()]);
        assert_eq!(decode_all(&with_crc(&compress(&bytes))), vec![message]);
    }
}

#[test]
fn bad_parts_are_reported_and_good_parts_kept() {
    let good = Message::Ping(ping_v1()).to_bytes();
    let packet = compound(&[vec![0x63, 0x01], good.clone()]);
    let mut out = Vec::new();
    let error = decode_packet(&packet, &mut out).unwrap_err();
    assert_eq!(error, DecodeError::UnexpectedType(0x63, "in a UDP packet"));
    assert_eq!(out, vec![Message::Ping(ping_v1())]);

    let mut corrupted = with_crc(&good);
    *corrupted.last_mut().unwrap() ^= 1;
    assert!(matches!(
        decode_packet(&corrupted, &mut Vec::new()),
        Err(DecodeError::Crc { .. })
    ));

    // A compound whose second part is cut short keeps the first part.
    let mut truncated = compound(&[good.clone(), good.clone()]);
    truncated.truncate(truncated.len() - 3);
    let mut out = Vec::new();
    assert!(decode_packet(&truncated, &mut out).is_err());
    assert_eq!(out.len(), 1);

    for bad in [
        &[][..],
        &[0x07],
        &[0x07, 0x05, 0x00],
        &[0x0c, 1, 2],
        &[0x09, 0xc1],
    ] {
        assert!(decode_packet(bad, &mut Vec::new()).is_err(), "{bad:?}");
    }
}

#[test]
fn decompression_is_bounded_per_packet_not_per_part() {
    // A user message of 60% of the budget, in zeros, compresses to a few hundred bytes; two
    // of them in one packet would decompress past the packet's budget.
    let size = MAX_DECOMPRESSED_PACKET * 6 / 10;
    let bomb = compress(&Message::User(vec![0; size]).to_bytes());
    assert!(bomb.len() < size / 50, "{}", bomb.len());
    let mut out = Vec::new();
    assert_eq!(decode_packet(&bomb, &mut out), Ok(()));
    assert_eq!(out.len(), 1);

    let mut out = Vec::new();
    let error = decode_packet(&compound(&[bomb.clone(), bomb.clone()]), &mut out).unwrap_err();
    assert!(matches!(error, DecodeError::TooLarge { .. }), "{error:?}");
    assert_eq!(out.len(), 1, "the first part fits the budget and is kept");
    // Many bombs, each alone over the budget: after the first fails, nothing more of the
    // packet is decompressed, so the good part after them is not reached either.
    let over = compress(&Message::User(vec![0; MAX_DECOMPRESSED_PACKET]).to_bytes());
    let mut parts = vec![over; 34];
    parts.push(compress(&Message::Ping(ping_v1()).to_bytes()));
    let mut out = Vec::new();
    assert!(decode_packet(&compound(&parts), &mut out).is_err());
    assert!(out.is_empty(), "{}", out.len());
}

#[test]
fn nesting_is_bounded() {
    let mut packet = Message::Ping(ping_v1()).to_bytes();
    for _ in 0..10 {
        packet = compound(&[packet]);
    }
    assert_eq!(
        decode_packet(&packet, &mut Vec::new()),
        Err(DecodeError::TooDeep(MAX_NESTING))
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn arb_alive() -> impl Strategy<Value = Alive> {
        (
            any::<u32>(),
            "[a-z0-9-]{0,40}",
            prop::collection::vec(any::<u8>(), 4..=16),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(incarnation, node, addr, port, meta)| Alive {
                incarnation,
                node,
                addr,
                port,
                meta,
                vsn: vec![1, 5, 2, 2, 5, 5],
            })
    }

    proptest! {
        #[test]
        fn alive_round_trips_through_every_wrapper(alive in arb_alive()) {
            let bytes = Message::Alive(alive.clone()).to_bytes();
            let wrapped = with_crc(&compress(&compound(&[bytes.clone(), bytes])));
            prop_assert_eq!(decode_all(&wrapped), vec![Message::Alive(alive.clone()), Message::Alive(alive)]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_packet(&bytes, &mut Vec::new());
        }
    }
}
