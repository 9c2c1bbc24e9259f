//! The names of the zone: what a query name asks for ([`Lookup`]), and the target names we
//! give out (`<node>.node.<domain>`, `<hex>.addr.<domain>`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// What a name inside the zone stands for. Labels are compared lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The domain itself (the SOA lives here).
    Apex,
    /// `<role>.role.<domain>`: A/AAAA and SRV of the role's providers.
    Role(String),
    /// `_<role>._tcp.<domain>`: SRV of the role's providers.
    Service(String),
    /// `<node>.node.<domain>`: the member's address.
    Node(String),
    /// `<hex>.addr.<domain>`: the address spelled in hex (SRV targets of a `service` tag).
    Addr(IpAddr),
    /// `role.`, `node.`, `_tcp.` and `addr.<domain>`: names with no records of their own but
    /// names below them (NOERROR, no data).
    Parent,
    /// Anything else in the zone: the name does not exist.
    Missing,
}

/// The label under the domain of each name kind.
const ROLE: &str = "role";
const NODE: &str = "node";
const ADDR: &str = "addr";
const TCP: &str = "_tcp";

/// What `name` asks for, or `None` when it is outside `domain`.
pub(crate) fn lookup(name: &Name, domain: &Name) -> Option<Lookup> {
    if !domain.zone_of(name) {
        return None;
    }
    // Counted, not `num_labels`, which leaves out a leading `*`.
    let depth = name.iter().count().saturating_sub(domain.iter().count());
    let labels: Vec<String> = name
        .iter()
        .take(depth)
        .map(|label| String::from_utf8_lossy(label).to_lowercase())
        .collect();
    let Some((kind, rest)) = labels.split_last() else {
        return Some(Lookup::Apex);
    };
    if rest.is_empty() {
        return Some(match kind.as_str() {
            ROLE | NODE | ADDR | TCP => Lookup::Parent,
            _ => Lookup::Missing,
        });
    }
    Some(match kind.as_str() {
        ROLE => Lookup::Role(rest.join(".")),
        NODE => Lookup::Node(rest.join(".")),
        ADDR => match rest {
            [hex] => parse_hex(hex).map_or(Lookup::Missing, Lookup::Addr),
            _ => Lookup::Missing,
        },
        TCP => match rest {
            [service] => match service.strip_prefix('_') {
                Some(role) if !role.is_empty() => Lookup::Service(role.to_owned()),
                _ => Lookup::Missing,
            },
            _ => Lookup::Missing,
        },
        _ => Lookup::Missing,
    })
}

/// `<node>.node.<domain>`, when the node name makes a valid DNS name.
pub(crate) fn node(node: &str, domain: &Name) -> Option<Name> {
    let labels = node.split('.').chain(std::iter::once(NODE));
    Name::from_labels(labels.map(str::as_bytes))
        .ok()?
        .append_domain(domain)
        .ok()
}

/// `<hex>.addr.<domain>`: 8 hex digits for IPv4, 32 for IPv6.
pub(crate) fn addr(ip: IpAddr, domain: &Name) -> Name {
    let octets = match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let hex: String = octets.iter().map(|byte| format!("{byte:02x}")).collect();
    Name::from_labels([hex.as_bytes(), ADDR.as_bytes()])
        .and_then(|name| name.append_domain(domain))
        .expect("a 32-character hex label, `addr` and a valid domain make a valid name")
}

fn parse_hex(hex: &str) -> Option<IpAddr> {
    if !hex.is_ascii() || (hex.len() != 8 && hex.len() != 32) {
        return None;
    }
    let octets: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).ok())
        .collect::<Option<_>>()?;
    Some(match <[u8; 4]>::try_from(octets.as_slice()) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(octets.as_slice()).ok()?,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    #[test]
    fn lookups() {
        let domain = name("serf.");
        let check = |query: &str, expected: Option<Lookup>| {
            assert_eq!(lookup(&name(query), &domain), expected, "{query}");
        };
        check("serf.", Some(Lookup::Apex));
        check("SERF.", Some(Lookup::Apex));
        check("3306.role.serf.", Some(Lookup::Role("3306".into())));
        check("MySQL.Role.serf.", Some(Lookup::Role("mysql".into())));
        check("a.b.role.serf.", Some(Lookup::Role("a.b".into())));
        check("_3306._tcp.serf.", Some(Lookup::Service("3306".into())));
        check("3306._tcp.serf.", Some(Lookup::Missing));
        check("_._tcp.serf.", Some(Lookup::Missing));
        check("x._3306._tcp.serf.", Some(Lookup::Missing));
        check("web-1.node.serf.", Some(Lookup::Node("web-1".into())));
        check(
            "web-1.example.node.serf.",
            Some(Lookup::Node("web-1.example".into())),
        );
        check(
            "7f000001.addr.serf.",
            Some(Lookup::Addr("127.0.0.1".parse().unwrap())),
        );
        check(
            "00000000000000000000000000000001.addr.serf.",
            Some(Lookup::Addr("::1".parse().unwrap())),
        );
        check("7f00001.addr.serf.", Some(Lookup::Missing));
        check("7f00000g.addr.serf.", Some(Lookup::Missing));
        check("role.serf.", Some(Lookup::Parent));
        check("_tcp.serf.", Some(Lookup::Parent));
        check("other.serf.", Some(Lookup::Missing));
        check("x.other.serf.", Some(Lookup::Missing));
        check("example.com.", None);
        check("serf.example.", None);
        check(".", None);
        check("*.serf.", Some(Lookup::Missing));
        check("*.role.serf.", Some(Lookup::Role("*".into())));
    }

    #[test]
    fn target_names_read_back() {
        let domain = name("cluster.example.");
        for ip in ["10.1.2.3", "fe80::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(lookup(&addr(ip, &domain), &domain), Some(Lookup::Addr(ip)));
        }
        let target = node("Web-1.dc", &domain).unwrap();
        assert_eq!(target.to_ascii(), "Web-1.dc.node.cluster.example.");
        assert_eq!(
            lookup(&target, &domain),
            Some(Lookup::Node("web-1.dc".into()))
        );
        assert_eq!(node("a..b", &domain), None);
        assert_eq!(node(&"x".repeat(64), &domain), None);
    }
}
