//! The answerer against hand-made memberships: every record type and negative case.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serf::serf::{Member, MemberStatus};

use crate::{Config, Transport, Zone};

fn member(name: &str, addr: &str, status: MemberStatus, tags: &[(&str, &str)]) -> Member {
    Member {
        name: name.to_owned(),
        addr: addr.parse().unwrap(),
        port: 7946,
        tags: tags
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        status,
        versions: [1, 5, 5, 2, 5, 5],
    }
}

fn alive(name: &str, addr: &str, tags: &[(&str, &str)]) -> Member {
    member(name, addr, MemberStatus::Alive, tags)
}

fn zone_with_ttl(members: &[Member], ttl: u32) -> Zone {
    Zone::new(Config::new("serf", ttl).unwrap(), 7, members)
}

fn zone(members: &[Member]) -> Zone {
    zone_with_ttl(members, 0)
}

/// A cluster with every case: healthy, critical, failed, untagged health, a `service` tag, an
/// IPv6 member and another role.
fn cluster() -> Zone {
    zone(&[
        alive(
            "db-1",
            "10.0.0.1",
            &[("role", "3306"), ("health", "passing")],
        ),
        alive(
            "db-2",
            "10.0.0.2",
            &[("role", "3306"), ("health", "critical")],
        ),
        member(
            "db-3",
            "10.0.0.3",
            MemberStatus::Failed,
            &[("role", "3306"), ("health", "passing")],
        ),
        member(
            "db-4",
            "10.0.0.4",
            MemberStatus::Left,
            &[("role", "3306"), ("health", "passing")],
        ),
        alive("db-5", "10.0.0.5", &[("role", "3306")]),
        alive(
            "db-6",
            "10.0.0.6",
            &[
                ("role", "3306"),
                ("health", "passing"),
                ("service", "192.168.1.6:13306"),
            ],
        ),
        alive(
            "cache-1",
            "fd00::7",
            &[
                ("role", "redis"),
                ("health", "passing"),
                ("ports", "6379/tcp"),
            ],
        ),
        alive(
            "cache-2",
            "10.0.0.8",
            &[
                ("role", "redis"),
                ("health", "passing"),
                ("service", "cache.example.com:6380"),
            ],
        ),
        alive("plain", "10.0.0.9", &[]),
        alive(
            "named",
            "10.0.0.11",
            &[("role", "web"), ("health", "passing")],
        ),
        alive(
            "broken",
            "10.0.0.12",
            &[
                ("role", "web"),
                ("health", "passing"),
                ("service", "no-port"),
            ],
        ),
        alive(
            "down",
            "10.0.0.10",
            &[("role", "80"), ("health", "critical")],
        ),
    ])
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::new(4242, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    message.set_edns(edns);
    message
}

fn exchange(zone: &Zone, request: &Message, transport: Transport) -> (Message, usize) {
    let mut rng = StdRng::seed_from_u64(1);
    let bytes = zone
        .answer(&request.to_vec().unwrap(), transport, &mut rng)
        .expect("a query gets an answer");
    (Message::from_vec(&bytes).unwrap(), bytes.len())
}

fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Message {
    exchange(zone, &query(name, qtype), Transport::Udp).0
}

/// The A records' addresses, in the order they came.
fn addresses_in_order(response: &Message) -> Vec<IpAddr> {
    response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

fn ips(records: &[Record]) -> BTreeSet<IpAddr> {
    records
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|addr| addr.parse().unwrap()).collect()
}

/// (port, target) of each SRV answer.
fn services(response: &Message) -> BTreeSet<(u16, String)> {
    response
        .answers
        .iter()
        .map(|record| match &record.data {
            RData::SRV(srv) => (srv.port, srv.target.to_ascii()),
            other => panic!("not an SRV: {other:?}"),
        })
        .collect()
}

fn assert_nodata(response: &Message) {
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    assert!(response.answers.is_empty(), "{:?}", response.answers);
    assert_soa(response);
}

fn assert_soa(response: &Message) {
    let [soa] = response.authorities.as_slice() else {
        panic!("one SOA in the authority section: {response:?}");
    };
    let RData::SOA(data) = &soa.data else {
        panic!("not an SOA: {soa:?}");
    };
    assert_eq!(soa.name.to_ascii(), "serf.");
    assert_eq!(data.serial, 7);
    assert_eq!(data.minimum, soa.ttl);
}

#[test]
fn role_a_lists_every_alive_provider_not_critical() {
    let response = ask(&cluster(), "3306.role.serf.", RecordType::A);
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    assert!(!response.metadata.recursion_available);
    assert_eq!(response.metadata.id, 4242);
    assert!(response.metadata.recursion_desired);
    // db-6 through its `service` tag; db-2 is critical, db-3 failed, db-4 left.
    assert_eq!(
        ips(&response.answers),
        set(&["10.0.0.1", "10.0.0.5", "192.168.1.6"])
    );
    assert!(response
        .answers
        .iter()
        .all(|record| record.name.to_ascii() == "3306.role.serf." && record.ttl == 0));
    assert!(response.edns.is_some(), "EDNS0 query, EDNS0 answer");
}

#[test]
fn role_names_ignore_case_and_keep_the_question() {
    let response = ask(&cluster(), "3306.ROLE.Serf.", RecordType::A);
    assert_eq!(response.answers.len(), 3);
    assert_eq!(response.queries[0].name().to_ascii(), "3306.ROLE.Serf.");
}

#[test]
fn role_answers_come_in_random_order() {
    let zone = cluster();
    let request = query("3306.role.serf.", RecordType::A).to_vec().unwrap();
    let orders: BTreeSet<Vec<IpAddr>> = (0..50)
        .map(|seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let bytes = zone.answer(&request, Transport::Udp, &mut rng).unwrap();
            let response = Message::from_vec(&bytes).unwrap();
            addresses_in_order(&response)
        })
        .collect();
    assert!(orders.len() > 3, "{orders:?}");
}

#[test]
fn aaaa_gives_ipv6_providers_and_no_data_otherwise() {
    let zone = cluster();
    let response = ask(&zone, "redis.role.serf.", RecordType::AAAA);
    assert_eq!(ips(&response.answers), set(&["fd00::7"]));
    assert_nodata(&ask(&zone, "3306.role.serf.", RecordType::AAAA));
    // cache-2's service is a host name: it has no address here.
    assert_nodata(&ask(&zone, "redis.role.serf.", RecordType::A));
}

#[test]
fn any_gives_addresses_and_services() {
    let response = ask(&cluster(), "redis.role.serf.", RecordType::ANY);
    assert_eq!(ips(&response.answers), set(&["fd00::7"]));
    assert_eq!(
        response
            .answers
            .iter()
            .filter(|record| record.record_type() == RecordType::SRV)
            .count(),
        2
    );
}

#[test]
fn srv_gives_ports_and_targets_that_resolve_here() {
    let zone = cluster();
    for name in ["_3306._tcp.serf.", "3306.role.serf."] {
        let response = ask(&zone, name, RecordType::SRV);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            services(&response),
            BTreeSet::from([
                (3306, "db-1.node.serf.".to_owned()),
                (3306, "db-5.node.serf.".to_owned()),
                (13306, "c0a80106.addr.serf.".to_owned()),
            ]),
            "{name}"
        );
        let additional: BTreeSet<(String, IpAddr)> = response
            .additionals
            .iter()
            .map(|record| {
                let ip = *ips(std::slice::from_ref(record)).first().unwrap();
                (record.name.to_ascii(), ip)
            })
            .collect();
        assert_eq!(
            additional,
            BTreeSet::from([
                ("db-1.node.serf.".to_owned(), "10.0.0.1".parse().unwrap()),
                ("db-5.node.serf.".to_owned(), "10.0.0.5".parse().unwrap()),
                (
                    "c0a80106.addr.serf.".to_owned(),
                    "192.168.1.6".parse().unwrap()
                ),
            ])
        );
    }
    // Each target resolves to what the additional section said.
    let target = ask(&zone, "c0a80106.addr.serf.", RecordType::A);
    assert_eq!(ips(&target.answers), set(&["192.168.1.6"]));
    let target = ask(&zone, "db-5.node.serf.", RecordType::A);
    assert_eq!(ips(&target.answers), set(&["10.0.0.5"]));
}

#[test]
fn srv_port_comes_from_service_then_role_then_ports() {
    let response = ask(&cluster(), "_redis._tcp.serf.", RecordType::SRV);
    assert_eq!(
        services(&response),
        BTreeSet::from([
            (6379, "cache-1.node.serf.".to_owned()),
            (6380, "cache.example.com.".to_owned()),
        ])
    );
    // Only the in-zone target has an address here.
    assert_eq!(ips(&response.additionals), set(&["fd00::7"]));
}

#[test]
fn a_role_without_a_port_has_addresses_and_no_srv() {
    let zone = cluster();
    let response = ask(&zone, "web.role.serf.", RecordType::A);
    assert_eq!(ips(&response.answers), set(&["10.0.0.11"]));
    assert_nodata(&ask(&zone, "_web._tcp.serf.", RecordType::SRV));
}

#[test]
fn service_names_have_srv_only() {
    assert_nodata(&ask(&cluster(), "_3306._tcp.serf.", RecordType::A));
}

#[test]
fn nodes_resolve_while_alive() {
    let zone = cluster();
    let response = ask(&zone, "plain.node.serf.", RecordType::A);
    assert_eq!(ips(&response.answers), set(&["10.0.0.9"]));
    // A critical member still has its node name; a failed one does not.
    assert_eq!(
        ips(&ask(&zone, "db-2.node.serf.", RecordType::A).answers),
        set(&["10.0.0.2"])
    );
    let failed = ask(&zone, "db-3.node.serf.", RecordType::A);
    assert_eq!(failed.metadata.response_code, ResponseCode::NXDomain);
    assert_soa(&failed);
    assert_nodata(&ask(&zone, "plain.node.serf.", RecordType::AAAA));
    assert_eq!(
        ips(&ask(&zone, "cache-1.node.serf.", RecordType::AAAA).answers),
        set(&["fd00::7"])
    );
}

#[test]
fn names_that_cannot_exist_are_nxdomain() {
    let zone = cluster();
    for name in [
        "nobody.node.serf.",
        "www.serf.",
        "a.b.serf.",
        "3306._tcp.serf.",
        "x._3306._tcp.serf.",
        "zz.addr.serf.",
    ] {
        let response = ask(&zone, name, RecordType::A);
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(response.metadata.authoritative);
        assert!(response.answers.is_empty());
        assert_soa(&response);
    }
}

#[test]
fn a_role_without_a_healthy_member_is_no_data_with_the_soa() {
    let zone = zone_with_ttl(
        &[alive(
            "web",
            "10.0.0.1",
            &[("role", "80"), ("health", "critical")],
        )],
        30,
    );
    for name in ["80.role.serf.", "_80._tcp.serf.", "never.role.serf."] {
        for qtype in [RecordType::A, RecordType::SRV] {
            let response = ask(&zone, name, qtype);
            assert_nodata(&response);
            assert_eq!(response.authorities[0].ttl, 30);
        }
    }
    // Names with only names below them.
    for name in ["role.serf.", "node.serf.", "_tcp.serf.", "addr.serf."] {
        assert_nodata(&ask(&zone, name, RecordType::A));
    }
}

#[test]
fn the_apex_has_the_soa() {
    let zone = cluster();
    let response = ask(&zone, "serf.", RecordType::SOA);
    let [soa] = response.answers.as_slice() else {
        panic!("one SOA: {response:?}");
    };
    let RData::SOA(data) = &soa.data else {
        panic!("not an SOA")
    };
    assert_eq!(data.mname.to_ascii(), "ns.serf.");
    assert_eq!(data.rname.to_ascii(), "hostmaster.serf.");
    assert_nodata(&ask(&zone, "serf.", RecordType::NS));
}

#[test]
fn names_outside_the_domain_are_refused() {
    let zone = cluster();
    for name in [
        "example.com.",
        "serf.example.com.",
        ".",
        "3306.role.consul.",
    ] {
        let response = ask(&zone, name, RecordType::A);
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::Refused,
            "{name}"
        );
        assert!(!response.metadata.authoritative);
        assert!(response.answers.is_empty() && response.authorities.is_empty());
    }
}

#[test]
fn the_ttl_is_configurable() {
    let zone = zone_with_ttl(&[alive("db", "10.0.0.1", &[("role", "3306")])], 15);
    let response = ask(&zone, "3306.role.serf.", RecordType::A);
    assert_eq!(response.answers[0].ttl, 15);
    let response = ask(&zone, "_3306._tcp.serf.", RecordType::SRV);
    assert_eq!(response.answers[0].ttl, 15);
    assert_eq!(response.additionals[0].ttl, 15);
}

fn crowd(n_members: usize) -> Zone {
    let members: Vec<Member> = (0..n_members)
        .map(|index| {
            alive(
                &format!("member-{index:04}"),
                &format!("10.1.{}.{}", index / 250, index % 250 + 1),
                &[("role", "3306"), ("health", "passing")],
            )
        })
        .collect();
    zone(&members)
}

#[test]
fn large_udp_answers_are_truncated_and_complete_over_tcp() {
    let zone = crowd(200);
    let request = query("3306.role.serf.", RecordType::A);
    let (udp, size) = exchange(&zone, &request, Transport::Udp);
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    assert!(size <= 1232);
    assert_eq!(udp.queries.len(), 1);
    assert!(udp.edns.is_some());
    let (tcp, _) = exchange(&zone, &request, Transport::Tcp);
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
}

#[test]
fn without_edns_udp_answers_stop_at_512_bytes() {
    let zone = crowd(40);
    let mut request = query("3306.role.serf.", RecordType::A);
    request.edns = None;
    let (response, size) = exchange(&zone, &request, Transport::Udp);
    assert!(response.metadata.truncation && size <= 512);
    assert!(response.edns.is_none());
    let mut request = query("3306.role.serf.", RecordType::A);
    request.edns.as_mut().unwrap().set_max_payload(4096);
    let (response, size) = exchange(&zone, &request, Transport::Udp);
    assert!(!response.metadata.truncation && response.answers.len() == 40);
    assert!(size > 512);
}

#[test]
fn srv_over_udp_drops_the_additional_section_before_truncating() {
    let request = query("_3306._tcp.serf.", RecordType::SRV);
    let mut without_additionals = 0;
    for n_members in 10..40 {
        let (response, size) = exchange(&crowd(n_members), &request, Transport::Udp);
        assert!(size <= 1232);
        if response.metadata.truncation {
            assert!(response.answers.is_empty());
        } else {
            assert_eq!(response.answers.len(), n_members);
            if response.additionals.is_empty() {
                without_additionals += 1;
            }
        }
    }
    assert!(without_additionals > 0);
}

#[test]
fn tcp_answers_beyond_a_message_keep_what_fits() {
    let zone = crowd(3000);
    let (response, size) = exchange(
        &zone,
        &query("_3306._tcp.serf.", RecordType::SRV),
        Transport::Tcp,
    );
    assert!(response.metadata.truncation);
    assert!(!response.answers.is_empty());
    assert!(size <= usize::from(u16::MAX));
}

#[test]
fn edns_versions_above_zero_get_badvers() {
    let mut request = query("3306.role.serf.", RecordType::A);
    request.edns.as_mut().unwrap().set_version(1);
    let (response, _) = exchange(&cluster(), &request, Transport::Udp);
    // BADVERS shares its number (16) with BADSIG, the name the decoder picks.
    assert_eq!(u16::from(response.metadata.response_code), 16);
    assert_eq!(response.edns.as_ref().unwrap().version(), 0);
}

#[test]
fn other_opcodes_classes_and_question_counts() {
    let zone = cluster();
    let mut request = query("3306.role.serf.", RecordType::A);
    request.metadata.op_code = OpCode::Status;
    assert_eq!(
        exchange(&zone, &request, Transport::Udp)
            .0
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    let mut request = query("3306.role.serf.", RecordType::A);
    request.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        exchange(&zone, &request, Transport::Udp)
            .0
            .metadata
            .response_code,
        ResponseCode::Refused
    );
    let mut request = query("3306.role.serf.", RecordType::A);
    request.add_query(Query::query(
        Name::from_ascii("x.role.serf.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        exchange(&zone, &request, Transport::Udp)
            .0
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let mut request = query("3306.role.serf.", RecordType::A);
    request.queries.clear();
    assert_eq!(
        exchange(&zone, &request, Transport::Udp)
            .0
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
}

#[test]
fn garbage_gets_formerr_or_nothing() {
    let zone = cluster();
    let mut rng = StdRng::seed_from_u64(3);
    // Too short for a header, or a response: nothing.
    assert_eq!(zone.answer(b"", Transport::Udp, &mut rng), None);
    assert_eq!(zone.answer(&[0; 11], Transport::Udp, &mut rng), None);
    let mut response = query("3306.role.serf.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(
        zone.answer(&response.to_vec().unwrap(), Transport::Udp, &mut rng),
        None
    );
    // A question whose name points at itself (a compression loop).
    let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let bytes = zone.answer(&looped, Transport::Udp, &mut rng).unwrap();
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(reply.metadata.id, 0x1234);
    assert!(reply.metadata.recursion_desired);
    // A question count the message does not hold.
    let mut short = vec![0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0];
    short.extend_from_slice(&[4, b's', b'e', b'r', b'f']);
    let reply = Message::from_vec(&zone.answer(&short, Transport::Tcp, &mut rng).unwrap()).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
}

#[test]
fn random_bytes_never_panic() {
    use rand::Rng;
    let zone = cluster();
    let mut rng = StdRng::seed_from_u64(9);
    let valid = query("_3306._tcp.serf.", RecordType::SRV).to_vec().unwrap();
    for round in 0..20_000 {
        let mut packet = if round % 2 == 0 {
            valid.clone()
        } else {
            let len = rng.random_range(0..64);
            (0..len).map(|_| rng.random()).collect()
        };
        for _ in 0..rng.random_range(0..4) {
            if !packet.is_empty() {
                let at = rng.random_range(0..packet.len());
                packet[at] = rng.random();
            }
        }
        if let Some(flags) = packet.get_mut(2) {
            *flags &= 0x7f;
        }
        for transport in [Transport::Udp, Transport::Tcp] {
            if let Some(bytes) = zone.answer(&packet, transport, &mut rng) {
                assert!(Message::from_vec(&bytes).is_ok());
                assert_eq!(bytes[..2], packet[..2]);
            }
        }
    }
}

#[test]
fn domains() {
    assert_eq!(Config::new("serf", 0).unwrap().domain.to_ascii(), "serf.");
    assert_eq!(
        Config::new("Cluster.Example.", 0)
            .unwrap()
            .domain
            .to_ascii(),
        "cluster.example."
    );
    for bad in [".", "", "a..b", &"x".repeat(64)] {
        let error = Config::new(bad, 0).unwrap_err().to_string();
        assert!(error.starts_with("--dns-domain"), "{bad:?}: {error}");
    }
}

/// `bytes` decoded with its answer and additional sections sorted, to compare answers whose
/// records come in random order.
fn sorted(bytes: &[u8]) -> Message {
    let mut message = Message::from_vec(bytes).unwrap();
    message.answers.sort_by_key(ToString::to_string);
    message.additionals.sort_by_key(ToString::to_string);
    message
}

/// Every kind of question, in several spellings, with and without EDNS0.
fn many_queries() -> Vec<Message> {
    let names = [
        "3306.role.serf.",
        "3306.ROLE.Serf.",
        "80.role.serf.",
        "_3306._tcp.serf.",
        "db-1.node.serf.",
        "DB-1.node.serf.",
        "member-0007.node.serf.",
        "nobody.node.serf.",
        "7.role.serf.",
        "serf.",
        "role.serf.",
        "example.com.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::ANY,
        RecordType::SOA,
        RecordType::TXT,
    ];
    let mut queries = Vec::new();
    for name in names {
        for qtype in types {
            let with_edns = query(name, qtype);
            let mut without = with_edns.clone();
            without.edns = None;
            without.metadata.recursion_desired = false;
            let mut small = with_edns.clone();
            small.edns.as_mut().unwrap().set_max_payload(600);
            queries.extend([with_edns, without, small]);
        }
    }
    queries
}

#[test]
fn cached_answers_are_the_uncached_answers_with_the_query_id() {
    let mut members: Vec<Member> = (0..40)
        .map(|index| {
            alive(
                &format!("member-{index:04}"),
                &format!("10.1.0.{}", index + 1),
                &[("role", "3306"), ("health", "passing")],
            )
        })
        .collect();
    members.push(alive("db-1", "10.0.0.1", &[("role", "80")]));
    members.push(alive("db-6", "fd00::6", &[("role", "80")]));
    let zone = zone(&members);
    let mut rng = StdRng::seed_from_u64(3);
    for transport in [Transport::Udp, Transport::Tcp] {
        for (index, mut request) in many_queries().into_iter().enumerate() {
            for round in 0..3u16 {
                let id = u16::try_from(index).unwrap() * 3 + round;
                request.metadata.id = id;
                let packet = request.to_vec().unwrap();
                let uncached = zone.answer_uncached(&packet, transport, &mut rng).unwrap();
                let answered = zone.answer(&packet, transport, &mut rng).unwrap();
                assert_eq!(answered[..2], id.to_be_bytes(), "{request:?}");
                assert_eq!(
                    sorted(&answered),
                    sorted(&uncached),
                    "{transport:?} {request:?}"
                );
                if sorted(&uncached).answers.len() <= 1 {
                    // Nothing to reorder: the very bytes.
                    assert_eq!(answered, uncached, "{transport:?} {request:?}");
                }
            }
        }
    }
    assert!(
        zone.cache.len() > 100,
        "{} answers cached",
        zone.cache.len()
    );
}

#[test]
fn cached_role_answers_still_come_in_random_order() {
    let zone = crowd(10);
    let request = query("3306.role.serf.", RecordType::A).to_vec().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let orders: BTreeSet<Vec<IpAddr>> = (0..50)
        .map(|_| {
            let bytes = zone.answer(&request, Transport::Udp, &mut rng).unwrap();
            let response = Message::from_vec(&bytes).unwrap();
            assert_eq!(ips(&response.answers).len(), 10);
            addresses_in_order(&response)
        })
        .collect();
    assert_eq!(zone.cache.len(), 1);
    assert!(orders.len() > 40, "{} orders", orders.len());
}

#[test]
fn unusual_queries_are_not_cached() {
    let zone = cluster();
    let mut rng = StdRng::seed_from_u64(9);
    // An EDNS option (a client cookie, as dig sends), two questions, a compressed question.
    let mut cookie = query("3306.role.serf.", RecordType::A);
    cookie.edns.as_mut().unwrap().options_mut().insert(
        hickory_proto::rr::rdata::opt::EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]),
    );
    let mut two = query("3306.role.serf.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("db-1.node.serf.").unwrap(),
        RecordType::A,
    ));
    // SRV records carry names, so their order cannot be varied in the cached bytes.
    let srv = query("_3306._tcp.serf.", RecordType::SRV);
    for request in [cookie, two, srv] {
        let packet = request.to_vec().unwrap();
        let first = zone.answer(&packet, Transport::Udp, &mut rng).unwrap();
        let again = zone.answer(&packet, Transport::Udp, &mut rng).unwrap();
        assert_eq!(sorted(&first), sorted(&again));
    }
    assert_eq!(zone.cache.len(), 0);
    let plain = query("3306.role.serf.", RecordType::A).to_vec().unwrap();
    zone.answer(&plain, Transport::Udp, &mut rng).unwrap();
    assert_eq!(zone.cache.len(), 1);
}
