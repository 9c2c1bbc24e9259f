//! The nftables netlink messages we send (pure encoding) and the one socket exchange.
//!
//! A change is one batch (`NFNL_MSG_BATCH_BEGIN` … `END`), which the kernel applies
//! atomically: either the whole table is replaced or nothing changes. Constants are those of
//! `linux/netfilter/nf_tables.h` and `nfnetlink.h`.

use std::io::{self, Read as _};
use std::net::Ipv4Addr;
use std::time::Duration;

use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};

use super::ruleset::{Expr, Hook, Ruleset};
use crate::link_env::Protocol;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

const NF_ACCEPT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

/// How long the kernel may take to answer a batch.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A batch must fit in one `sendmsg` under the default socket send buffer (212,992 bytes less
/// overhead): about 50 forwards (~4 KiB each).
const MAX_BATCH: usize = 200 * 1024;

/// Attribute writer over one message buffer.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn bytes(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).expect("attributes are small");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        pad(self.0);
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.bytes(kind, &payload);
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.bytes(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, body: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        body(&mut Attrs(self.0));
        let len = u16::try_from(self.0.len() - start).expect("attributes are small");
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    /// `NFTA_*_DATA { NFTA_DATA_VALUE value }`.
    fn data(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |data| data.bytes(NFTA_DATA_VALUE, value));
    }

    /// One `NFTA_LIST_ELEM { NFTA_EXPR_NAME name, NFTA_EXPR_DATA {…} }`.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Attrs<'_>)) {
        self.nest(NFTA_LIST_ELEM, |elem| {
            elem.string(NFTA_EXPR_NAME, name);
            elem.nest(NFTA_EXPR_DATA, body);
        });
    }

    /// `cmp` of register 1 against `value` (`neq` when `equal` is false).
    fn cmp(&mut self, equal: bool, value: &[u8]) {
        self.expr("cmp", |cmp| {
            cmp.u32(1, NFT_REG_1); // NFTA_CMP_SREG
            cmp.u32(2, u32::from(!equal)); // NFTA_CMP_OP: NFT_CMP_EQ 0, NFT_CMP_NEQ 1
            cmp.data(3, value); // NFTA_CMP_DATA
        });
    }

    /// `payload load` of `len` bytes at `offset` of `base` (1 network, 2 transport) → reg 1.
    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |payload| {
            payload.u32(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
            payload.u32(2, base);
            payload.u32(3, offset);
            payload.u32(4, len);
        });
    }

    /// Register 1 &= `mask` (4 bytes).
    fn bitwise(&mut self, mask: [u8; 4]) {
        self.expr("bitwise", |bitwise| {
            bitwise.u32(1, NFT_REG_1); // NFTA_BITWISE_SREG
            bitwise.u32(2, NFT_REG_1); // NFTA_BITWISE_DREG
            bitwise.u32(3, 4); // NFTA_BITWISE_LEN
            bitwise.data(4, &mask); // NFTA_BITWISE_MASK
            bitwise.data(5, &[0; 4]); // NFTA_BITWISE_XOR
        });
    }

    /// Conntrack key `key` (of `direction`: 0 original, 1 reply) → register 1.
    fn ct(&mut self, key: u32, direction: Option<u8>) {
        self.expr("ct", |ct| {
            ct.u32(1, NFT_REG_1); // NFTA_CT_DREG
            ct.u32(2, key); // NFTA_CT_KEY
            if let Some(direction) = direction {
                ct.bytes(3, &[direction]); // NFTA_CT_DIRECTION
            }
        });
    }

    fn immediate(&mut self, register: u32, value: &[u8]) {
        self.expr("immediate", |immediate| {
            immediate.u32(1, register); // NFTA_IMMEDIATE_DREG
            immediate.data(2, value); // NFTA_IMMEDIATE_DATA
        });
    }

    fn encode(&mut self, expr: Expr) {
        match expr {
            Expr::DaddrIsLocal => {
                self.expr("fib", |fib| {
                    fib.u32(1, NFT_REG_1); // NFTA_FIB_DREG
                    fib.u32(2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                    fib.u32(3, 1 << 1); // NFTA_FIB_FLAGS: NFTA_FIB_F_DADDR
                });
                const RTN_LOCAL: u32 = 2;
                self.cmp(true, &RTN_LOCAL.to_ne_bytes());
            }
            Expr::Daddr(ip) => {
                self.payload(1, 16, 4);
                self.cmp(true, &ip.octets());
            }
            Expr::SaddrNotLoopback => {
                self.payload(1, 12, 4);
                self.bitwise([255, 0, 0, 0]);
                self.cmp(false, &Ipv4Addr::new(127, 0, 0, 0).octets());
            }
            Expr::L4proto(protocol) => {
                self.expr("meta", |meta| {
                    meta.u32(1, NFT_REG_1); // NFTA_META_DREG
                    meta.u32(2, 16); // NFTA_META_KEY: NFT_META_L4PROTO
                });
                let number = match protocol {
                    Protocol::Tcp => libc::IPPROTO_TCP,
                    Protocol::Udp => libc::IPPROTO_UDP,
                };
                self.cmp(true, &[number as u8]);
            }
            Expr::Dport(port) => {
                self.payload(2, 2, 2);
                self.cmp(true, &port.to_be_bytes());
            }
            Expr::OifNotLoopback => {
                self.expr("meta", |meta| {
                    meta.u32(1, NFT_REG_1); // NFTA_META_DREG
                    meta.u32(2, 5); // NFTA_META_KEY: NFT_META_OIF
                });
                const LOOPBACK_IFINDEX: u32 = 1; // in every network namespace
                self.cmp(false, &LOOPBACK_IFINDEX.to_ne_bytes());
            }
            Expr::CtStatusDnat => {
                self.ct(2, None); // NFT_CT_STATUS
                const IPS_DST_NAT: u32 = 1 << 5;
                self.bitwise(IPS_DST_NAT.to_ne_bytes());
                self.cmp(false, &[0; 4]);
            }
            Expr::CtOriginalDport(port) => {
                self.ct(12, Some(0)); // NFT_CT_PROTO_DST
                self.cmp(true, &port.to_be_bytes());
            }
            Expr::CtReplySaddr(ip) => {
                self.ct(19, Some(1)); // NFT_CT_SRC_IP
                self.cmp(true, &ip.octets());
            }
            Expr::CtReplySport(port) => {
                self.ct(11, Some(1)); // NFT_CT_PROTO_SRC
                self.cmp(true, &port.to_be_bytes());
            }
            Expr::CtDirectionOriginal(original) => {
                self.ct(1, None); // NFT_CT_DIRECTION
                self.cmp(true, &[u8::from(!original)]); // IP_CT_DIR_ORIGINAL 0, REPLY 1
            }
            Expr::Counter => self.expr("counter", |_| {}),
            Expr::Dnat(target) => {
                self.immediate(NFT_REG_1, &target.ip().octets());
                self.immediate(NFT_REG_2, &target.port().to_be_bytes());
                self.expr("nat", |nat| {
                    nat.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                    nat.u32(2, u32::from(NFPROTO_IPV4)); // NFTA_NAT_FAMILY
                    nat.u32(3, NFT_REG_1); // NFTA_NAT_REG_ADDR_MIN
                    nat.u32(5, NFT_REG_2); // NFTA_NAT_REG_PROTO_MIN
                });
            }
            Expr::Masquerade => self.expr("masq", |_| {}),
        }
    }
}

fn pad(buffer: &mut Vec<u8>) {
    buffer.resize(buffer.len().next_multiple_of(4), 0);
}

/// A batch under construction: the bytes and, per sequence number, what it does (for errors).
#[derive(Debug)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    steps: Vec<String>,
}

impl Batch {
    fn new() -> Self {
        let mut batch = Self {
            bytes: Vec::new(),
            steps: Vec::new(),
        };
        batch.message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            "begin".into(),
            |_| {},
        );
        batch
    }

    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        step: String,
        body: impl FnOnce(&mut Attrs<'_>),
    ) {
        let start = self.bytes.len();
        let seq = u32::try_from(self.steps.len()).expect("batches are small");
        self.bytes.extend_from_slice(&[0; 4]); // length, set below
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        self.bytes
            .extend_from_slice(&[family, 0, 0, NFNL_SUBSYS_NFTABLES as u8]);
        body(&mut Attrs(&mut self.bytes));
        let len = u32::try_from(self.bytes.len() - start).expect("messages are small");
        self.bytes[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.steps.push(step);
    }

    fn nft(&mut self, msg: u16, flags: u16, step: String, body: impl FnOnce(&mut Attrs<'_>)) {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        self.message(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_IPV4,
            step,
            body,
        );
    }

    fn finish(mut self) -> Self {
        self.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, "end".into(), |_| {});
        self
    }

    /// Creates or atomically replaces the table `ruleset.table` with `ruleset`.
    pub(super) fn replace(ruleset: &Ruleset) -> Self {
        let table = ruleset.table.as_str();
        let mut batch = Self::new();
        // Add (a no-op if it exists) then delete: the usual idiom for "whatever was there".
        batch.table(NFT_MSG_NEWTABLE, table);
        batch.table(NFT_MSG_DELTABLE, table);
        batch.table(NFT_MSG_NEWTABLE, table);
        for chain in &ruleset.chains {
            let hook = match chain.hook {
                Hook::Prerouting => 0,
                Hook::Input => 1,
                Hook::Forward => 2,
                Hook::Output => 3,
                Hook::Postrouting => 4,
            };
            let kind = if chain.nat { "nat" } else { "filter" };
            let step = format!("add chain ip {table} {} (type {kind})", chain.name);
            batch.nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, step, |a| {
                a.string(NFTA_CHAIN_TABLE, table);
                a.string(NFTA_CHAIN_NAME, chain.name);
                a.nest(NFTA_CHAIN_HOOK, |h| {
                    h.u32(NFTA_HOOK_HOOKNUM, hook);
                    h.u32(NFTA_HOOK_PRIORITY, chain.priority as u32);
                });
                a.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                a.string(NFTA_CHAIN_TYPE, kind);
            });
        }
        for chain in &ruleset.chains {
            for rule in &chain.rules {
                let rule = &rule.exprs;
                let step = format!("add rule ip {table} {} {rule:?}", chain.name);
                batch.nft(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, step, |a| {
                    a.string(NFTA_RULE_TABLE, table);
                    a.string(NFTA_RULE_CHAIN, chain.name);
                    a.nest(NFTA_RULE_EXPRESSIONS, |list| {
                        for expr in rule {
                            list.encode(*expr);
                        }
                    });
                });
            }
        }
        batch.finish()
    }

    /// Deletes the table `table`.
    pub(super) fn delete(table: &str) -> Self {
        let mut batch = Self::new();
        batch.table(NFT_MSG_DELTABLE, table);
        batch.finish()
    }

    /// `NFT_MSG_NEWTABLE` (create if missing) or `NFT_MSG_DELTABLE` of `table`.
    fn table(&mut self, msg: u16, table: &str) {
        let (flags, verb) = match msg {
            NFT_MSG_NEWTABLE => (NLM_F_CREATE, "add"),
            _ => (0, "delete"),
        };
        self.nft(msg, flags, format!("{verb} table ip {table}"), |a| {
            a.string(NFTA_TABLE_NAME, table);
        });
    }

    /// Sends the batch and waits for the kernel's answer to each message. On an error, the
    /// kernel applied nothing; the error names the step it refused.
    pub(super) fn send(&self) -> Result<(), super::Error> {
        if self.bytes.len() > MAX_BATCH {
            let reason = format!(
                "{} bytes, over the {MAX_BATCH} one netlink message may take: too many forwards \
                 for the kernel path",
                self.bytes.len()
            );
            return Err(failed(
                "sending the nftables batch",
                io::Error::other(reason),
            ));
        }
        let socket = open_and_send(&self.bytes, "sending the nftables batch")?;
        // The last message with an ack is the one before the batch end.
        let last = u32::try_from(self.steps.len() - 2).expect("batches are small");
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let len = (&socket)
                .read(&mut buffer)
                .map_err(|e| failed("waiting for the kernel's answer to the batch", e))?;
            for (seq, errno) in acks(&buffer[..len]) {
                if errno != 0 {
                    let step = self.steps.get(seq as usize).map_or("?", String::as_str);
                    return Err(failed(step, io::Error::from_raw_os_error(errno)));
                }
                if seq == last {
                    return Ok(());
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn failed(step: &str, source: io::Error) -> super::Error {
    super::Error {
        step: step.to_owned(),
        source,
    }
}

/// A new `NETLINK_NETFILTER` socket (with the reply timeout) that has sent `bytes`.
fn open_and_send(bytes: &[u8], step: &str) -> Result<Socket, super::Error> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(SocketProtocol::from(libc::NETLINK_NETFILTER)),
    )
    .map_err(|e| failed("opening a netfilter netlink socket", e))?;
    socket
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| failed("setting the netlink reply timeout", e))?;
    let sent = socket.send(bytes).map_err(|e| failed(step, e))?;
    if sent != bytes.len() {
        let short = io::Error::other(format!("{sent} of {} bytes", bytes.len()));
        return Err(failed(step, short));
    }
    Ok(socket)
}

/// One rule of a dumped table: its chain and, if it has a counter, (packets, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Dumped {
    pub(super) chain: String,
    pub(super) counter: Option<(u64, u64)>,
}

/// Every rule of `table`, in chain order (`NFT_MSG_GETRULE` dump).
pub(super) fn dump_rules(table: &str) -> Result<Vec<Dumped>, super::Error> {
    const NLM_F_DUMP: u16 = 0x300;
    const NFT_MSG_GETRULE: u16 = 7;
    const NLMSG_DONE: u16 = 3;
    let mut request = Batch {
        bytes: Vec::new(),
        steps: Vec::new(),
    };
    let step = format!("list rules of table ip {table}");
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE;
    request.message(
        kind,
        NLM_F_REQUEST | NLM_F_DUMP,
        NFPROTO_IPV4,
        step.clone(),
        |a| {
            a.string(NFTA_RULE_TABLE, table);
        },
    );
    let socket = open_and_send(&request.bytes, &step)?;
    let mut buffer = vec![0; 64 * 1024];
    let mut rules = Vec::new();
    loop {
        let len = (&socket).read(&mut buffer).map_err(|e| failed(&step, e))?;
        for (kind, _, payload) in messages(&buffer[..len]) {
            match kind {
                NLMSG_DONE => return Ok(rules),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4")));
                    if errno != 0 {
                        return Err(failed(&step, io::Error::from_raw_os_error(errno)));
                    }
                }
                _ => rules.extend(parse_rule(payload.get(4..).unwrap_or_default())),
            }
        }
    }
}

/// The `(type, sequence number, payload)` of each netlink message in `bytes`.
fn messages(mut bytes: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= NLMSG_HDRLEN {
        let field = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4"));
        let len = field(0) as usize;
        if len < NLMSG_HDRLEN || len > bytes.len() {
            break;
        }
        out.push((
            u16::from_ne_bytes([bytes[4], bytes[5]]),
            field(8),
            &bytes[NLMSG_HDRLEN..len],
        ));
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    out
}

/// The `(type, payload)` of each attribute in `bytes` (flags masked off).
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push((
            u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff,
            &bytes[4..len],
        ));
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    out
}

/// A rule message's attributes → its chain and counter.
fn parse_rule(attrs: &[u8]) -> Option<Dumped> {
    let mut chain = None;
    let mut counter = None;
    for (kind, payload) in attributes(attrs) {
        match kind {
            NFTA_RULE_CHAIN => {
                let name = payload.split(|b| *b == 0).next().unwrap_or_default();
                chain = Some(String::from_utf8_lossy(name).into_owned());
            }
            NFTA_RULE_EXPRESSIONS => {
                for (_, elem) in attributes(payload) {
                    let parts = attributes(elem);
                    let name = parts.iter().find(|(k, _)| *k == NFTA_EXPR_NAME);
                    if name.is_some_and(|(_, n)| n.starts_with(b"counter\0")) {
                        let data = parts.iter().find(|(k, _)| *k == NFTA_EXPR_DATA);
                        let values = data.map(|(_, d)| attributes(d)).unwrap_or_default();
                        let value = |kind: u16| {
                            values.iter().find(|(k, _)| *k == kind).and_then(|(_, v)| {
                                Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
                            })
                        };
                        // NFTA_COUNTER_PACKETS 2, NFTA_COUNTER_BYTES 1
                        counter = Some((value(2).unwrap_or(0), value(1).unwrap_or(0)));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Dumped {
        chain: chain?,
        counter,
    })
}

/// The `(sequence number, errno)` of each `NLMSG_ERROR` (an ack when errno is 0) in `bytes`.
fn acks(bytes: &[u8]) -> Vec<(u32, i32)> {
    messages(bytes)
        .into_iter()
        .filter(|(kind, _, payload)| *kind == NLMSG_ERROR && payload.len() >= 4)
        .map(|(_, seq, payload)| {
            let error = i32::from_ne_bytes(payload[..4].try_into().expect("4"));
            (seq, -error)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ruleset::{Options, Rule};
    use std::net::SocketAddrV4;

    /// Walks the netlink messages of a batch: (type, flags, seq) each.
    fn headers(mut bytes: &[u8]) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0, "messages are padded");
            let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
            let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
            let seq = u32::from_ne_bytes(bytes[8..12].try_into().unwrap());
            out.push((kind, flags, seq));
            bytes = &bytes[len..];
        }
        out
    }

    #[test]
    fn replace_is_one_batch_add_delete_add_chains_then_rules() {
        let rules = [Rule {
            protocol: Protocol::Tcp,
            listen: None,
            port: 80,
            target: "10.0.0.5:8080".parse().unwrap(),
        }];
        let options = Options {
            passing: true,
            route_localnet: true,
        };
        let batch = Batch::replace(&Ruleset::build("amb-serf-x", &rules, options));
        let kinds: Vec<u16> = headers(batch.bytes()).iter().map(|h| h.0).collect();
        let nft = |msg: u16| (10 << 8) | msg;
        let mut expected = vec![16, nft(0), nft(2), nft(0)];
        expected.extend([nft(3); 6]); // prerouting, output, postrouting, count_*
        expected.extend([nft(6); 7]); // DNAT ×2, masquerade, counts: forward ×2, output, input
        expected.push(17);
        assert_eq!(kinds, expected);
        let seqs: Vec<u32> = headers(batch.bytes()).iter().map(|h| h.2).collect();
        assert_eq!(seqs, (0..18).collect::<Vec<_>>());
        assert_eq!(batch.steps[1], "add table ip amb-serf-x");
    }

    #[test]
    fn a_batch_over_one_socket_buffer_is_refused_before_anything_is_sent() {
        let rules: Vec<Rule> = (0..60)
            .map(|i| Rule {
                protocol: Protocol::Tcp,
                listen: None,
                port: 1000 + i,
                target: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 2000 + i),
            })
            .collect();
        let options = Options {
            passing: true,
            route_localnet: false,
        };
        let batch = Batch::replace(&Ruleset::build("amb-serf-x", &rules, options));
        let error = batch.send().expect_err("too large");
        assert_eq!(error.step, "sending the nftables batch");
        assert!(
            error.source.to_string().contains("too many forwards"),
            "{error}"
        );
    }

    #[test]
    fn acks_reads_errors_and_acks_and_stops_at_garbage() {
        let message = |seq: u32, errno: i32| {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&36u32.to_ne_bytes());
            bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            bytes.extend_from_slice(&0u16.to_ne_bytes());
            bytes.extend_from_slice(&seq.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&(-errno).to_ne_bytes());
            bytes.extend_from_slice(&[0; 16]);
            bytes
        };
        let mut bytes = [message(3, 0), message(4, libc::ENOENT)].concat();
        assert_eq!(acks(&bytes), [(3, 0), (4, libc::ENOENT)]);
        bytes.extend_from_slice(&[0xff; 20]);
        assert_eq!(acks(&bytes).len(), 2);
        assert!(acks(&[1, 2, 3]).is_empty());
    }
}
