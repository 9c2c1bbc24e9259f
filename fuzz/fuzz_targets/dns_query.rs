//! Any bytes as a DNS query on `--dns-addr`, over UDP and over TCP, against a zone with
//! providers of every kind. Must never panic; an answer is a response to the query's ID that
//! decodes and fits the transport (512 bytes without EDNS0, the advertised payload with it, one
//! TCP message).
#![no_main]

use std::sync::OnceLock;

use dns::{Config, Transport, Zone, MAX_UDP_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serf::serf::{Member, MemberStatus};

fn member(name: &str, addr: &str, tags: &[(&str, &str)]) -> Member {
    Member {
        name: name.to_owned(),
        addr: addr.parse().expect("a literal address"),
        port: 7946,
        tags: tags
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        status: MemberStatus::Alive,
        versions: [1, 5, 5, 2, 5, 5],
    }
}

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let mut members = vec![
            member("db-1", "10.0.0.1", &[("role", "3306"), ("health", "passing")]),
            member("db-2", "fd00::2", &[("role", "3306")]),
            member(
                "db-3",
                "10.0.0.3",
                &[("role", "3306"), ("service", "192.168.0.3:13306")],
            ),
            member("cache", "10.0.0.4", &[("role", "redis"), ("service", "cache.example:6379")]),
            member("web", "10.0.0.5", &[("role", "web")]),
        ];
        // Enough providers of one role to need truncation.
        members.extend((0..100).map(|index| {
            member(
                &format!("many-{index}"),
                &format!("10.1.0.{index}"),
                &[("role", "many")],
            )
        }));
        Zone::new(Config::new("serf.", 0).expect("a valid domain"), 1, &members)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut rng = StdRng::seed_from_u64(0);
    for transport in [Transport::Udp, Transport::Tcp] {
        let Some(response) = zone().answer(data, transport, &mut rng) else {
            continue;
        };
        assert!(response.len() >= 12);
        assert_eq!(response[..2], data[..2], "the query's ID");
        assert!(response[2] & 0x80 != 0, "a response");
        let limit = match transport {
            Transport::Udp => usize::from(MAX_UDP_PAYLOAD),
            Transport::Tcp => usize::from(u16::MAX),
        };
        assert!(response.len() <= limit);
        hickory_proto::op::Message::from_vec(&response).expect("our responses decode");
    }
});
