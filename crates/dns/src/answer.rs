//! A query's bytes → the response's bytes, from a [`Zone`]. Pure: the random order of the
//! answers comes from the caller's RNG.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::names::{self, Lookup};
use crate::transport::Transport;
use crate::zone::{Provider, Zone};

/// The largest UDP response we send, and the payload size our OPT record advertises (the
/// 2020 DNS flag day's value: no IP fragmentation on common paths).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// A UDP response without EDNS0 (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;
/// A TCP message's length field.
const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// The fixed header of every DNS message.
const HEADER_LEN: usize = 12;

impl Zone {
    /// The response to the DNS message `packet`, or `None` when it gets none: shorter than a
    /// header, or itself a response (so two servers never answer each other). A message that
    /// does not decode gets FORMERR.
    pub fn answer(
        &self,
        packet: &[u8],
        transport: Transport,
        rng: &mut impl Rng,
    ) -> Option<Vec<u8>> {
        let mut response = Vec::new();
        self.answer_into(packet, transport, rng, &mut response)
            .then_some(response)
    }

    /// [`Zone::answer`] into `response` (its buffer reused): false when `packet` gets no
    /// response. A plain query asked before of this zone is answered from the zone's cache of
    /// encoded answers (the same bytes but for the ID and the order of a role's addresses).
    pub fn answer_into(
        &self,
        packet: &[u8],
        transport: Transport,
        rng: &mut impl Rng,
        response: &mut Vec<u8>,
    ) -> bool {
        if packet.len() < HEADER_LEN || packet[2] & 0x80 != 0 {
            return false;
        }
        if self.cache.answer(packet, transport, rng, response) {
            return true;
        }
        let Some(bytes) = self.answer_uncached(packet, transport, rng) else {
            return false;
        };
        self.cache.insert(packet, transport, &bytes);
        response.clear();
        response.extend_from_slice(&bytes);
        true
    }

    /// [`Zone::answer`] through hickory, without the cache.
    pub(crate) fn answer_uncached(
        &self,
        packet: &[u8],
        transport: Transport,
        rng: &mut impl Rng,
    ) -> Option<Vec<u8>> {
        if packet.len() < HEADER_LEN || packet[2] & 0x80 != 0 {
            return None;
        }
        let response = match Message::from_vec(packet) {
            Ok(request) => {
                let limit = match transport {
                    Transport::Udp => usize::from(udp_limit(&request)),
                    Transport::Tcp => MAX_TCP_MESSAGE,
                };
                return Some(fit(self.respond(&request, rng), transport, limit));
            }
            Err(_) => format_error(packet),
        };
        Some(encode_or_fail(&response))
    }

    fn respond(&self, request: &Message, rng: &mut impl Rng) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.queries.clone_from(&request.queries);
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(MAX_UDP_PAYLOAD);
            response.set_edns(ours);
            if edns.version() > 0 {
                return with_code(response, ResponseCode::BADVERS);
            }
        }
        if request.metadata.op_code != OpCode::Query {
            return with_code(response, ResponseCode::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return with_code(response, ResponseCode::FormErr);
        };
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return with_code(response, ResponseCode::Refused);
        }
        let Some(lookup) = names::lookup(query.name(), &self.config.domain) else {
            // Not ours: no recursion, no open resolver.
            return with_code(response, ResponseCode::Refused);
        };
        response.metadata.authoritative = true;
        self.resolve(&lookup, query, &mut response, rng);
        if response.answers.is_empty() {
            response.add_authority(self.soa());
        }
        response
    }

    /// Fills the answer and additional sections, or sets NXDOMAIN.
    fn resolve(&self, lookup: &Lookup, query: &Query, response: &mut Message, rng: &mut impl Rng) {
        let qtype = query.query_type();
        let owner = query.name();
        let wants = |kind: RecordType| qtype == kind || qtype == RecordType::ANY;
        match lookup {
            Lookup::Apex => {
                if wants(RecordType::SOA) {
                    response.add_answer(self.soa());
                }
            }
            Lookup::Role(role) | Lookup::Service(role) => {
                let providers = self.roles.get(role).map_or(&[][..], Vec::as_slice);
                if matches!(lookup, Lookup::Role(_)) {
                    let ips: BTreeSet<IpAddr> = providers
                        .iter()
                        .filter_map(|provider| provider.ip)
                        .collect();
                    let mut records: Vec<Record> = ips
                        .into_iter()
                        .filter_map(|ip| self.address(owner, ip, qtype))
                        .collect();
                    records.shuffle(rng);
                    response.add_answers(records);
                }
                if wants(RecordType::SRV) {
                    self.services(owner, providers, response, rng);
                }
            }
            Lookup::Node(node) => match self.nodes.get(node) {
                Some(ip) => {
                    response.add_answers(self.address(owner, *ip, qtype));
                }
                None => response.metadata.response_code = ResponseCode::NXDomain,
            },
            Lookup::Addr(ip) => {
                response.add_answers(self.address(owner, *ip, qtype));
            }
            Lookup::Parent => {}
            Lookup::Missing => response.metadata.response_code = ResponseCode::NXDomain,
        }
    }

    /// SRV records of `providers` at `owner`, in random order, and the addresses of their
    /// targets in the additional section.
    fn services(
        &self,
        owner: &Name,
        providers: &[Provider],
        response: &mut Message,
        rng: &mut impl Rng,
    ) {
        let with_port = || providers.iter().filter(|provider| provider.port.is_some());
        let mut records: Vec<Record> = with_port()
            .filter_map(|provider| {
                let srv = SRV::new(1, 1, provider.port?, provider.target.clone());
                Some(Record::from_rdata(
                    owner.clone(),
                    self.config.ttl,
                    RData::SRV(srv),
                ))
            })
            .collect();
        records.shuffle(rng);
        response.add_answers(records);
        let mut seen = BTreeSet::new();
        for provider in with_port() {
            let Some(ip) = provider.ip else { continue };
            if seen.insert(&provider.target) {
                response.add_additionals(self.address(&provider.target, ip, RecordType::ANY));
            }
        }
    }

    /// The A or AAAA record of `ip` at `owner` when `qtype` asks for its family.
    fn address(&self, owner: &Name, ip: IpAddr, qtype: RecordType) -> Option<Record> {
        let rdata = match ip {
            IpAddr::V4(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => RData::A(A(ip)),
            IpAddr::V6(ip) if matches!(qtype, RecordType::AAAA | RecordType::ANY) => {
                RData::AAAA(AAAA(ip))
            }
            _ => return None,
        };
        Some(Record::from_rdata(owner.clone(), self.config.ttl, rdata))
    }

    /// The zone's SOA: its minimum (the negative-caching TTL) is `--dns-ttl`.
    fn soa(&self) -> Record {
        let domain = &self.config.domain;
        let under = |label: &str| {
            Name::from_labels([label.as_bytes()])
                .and_then(|name| name.append_domain(domain))
                .expect("a short label under a valid domain is a valid name")
        };
        let soa = SOA::new(
            under("ns"),
            under("hostmaster"),
            self.serial,
            3600,
            600,
            86400,
            self.config.ttl,
        );
        Record::from_rdata(domain.clone(), self.config.ttl, RData::SOA(soa))
    }
}

/// The UDP size limit the client asked for: 512 without EDNS0, else its payload size within
/// 512..=[`MAX_UDP_PAYLOAD`].
fn udp_limit(request: &Message) -> u16 {
    request.edns.as_ref().map_or(CLASSIC_UDP_PAYLOAD, |edns| {
        edns.max_payload()
            .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
    })
}

fn with_code(mut response: Message, code: ResponseCode) -> Message {
    response.metadata.response_code = code;
    response
}

/// FORMERR for bytes that do not decode, from what the header says.
fn format_error(packet: &[u8]) -> Message {
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op_code = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let mut response = Message::error_msg(id, op_code, ResponseCode::FormErr);
    response.metadata.recursion_desired = packet[2] & 0x01 != 0;
    response
}

/// `response` within `limit` bytes: first without the additional section (no TC needed), then
/// over UDP with TC and no records, over TCP with TC and as many answers as fit.
fn fit(mut response: Message, transport: Transport, limit: usize) -> Vec<u8> {
    let mut bytes = encode_or_fail(&response);
    if bytes.len() <= limit {
        return bytes;
    }
    response.additionals.clear();
    bytes = encode_or_fail(&response);
    if bytes.len() <= limit {
        return bytes;
    }
    if transport == Transport::Udp {
        return encode_or_fail(&response.truncate());
    }
    response.metadata.truncation = true;
    while bytes.len() > limit && !response.answers.is_empty() {
        let keep = response.answers.len() / 2;
        response.answers.truncate(keep);
        bytes = encode_or_fail(&response);
    }
    if bytes.len() > limit {
        // Only the question and authority left, and still too long: the header alone.
        let failure = Message::error_msg(
            response.metadata.id,
            response.metadata.op_code,
            ResponseCode::ServFail,
        );
        return encode_or_fail(&failure);
    }
    bytes
}

/// The wire bytes, or a bare SERVFAIL if the message does not encode (a name too long for the
/// wire, say): never a panic.
fn encode_or_fail(response: &Message) -> Vec<u8> {
    response.to_vec().unwrap_or_else(|_| {
        let failure = Message::error_msg(
            response.metadata.id,
            response.metadata.op_code,
            ResponseCode::ServFail,
        );
        failure
            .to_vec()
            .expect("a message of a header alone always encodes")
    })
}
