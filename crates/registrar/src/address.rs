//! Which local address a member advertises when it is bound to `0.0.0.0` and no `--advertise`
//! says: the rule of Go's memberlist (`sockaddr.GetPrivateIP`), for Serf and etcd alike.
//!
//! Every address of an interface that is up, that can be forwarded (not loopback, link-local,
//! multicast or a documentation or reserved block), and that is private in RFC 6890's sense
//! (10/8, 172.16/12, 192.168/16, 100.64/10, 198.18/15, fc00::/7 …); ordered the default
//! route's interface first, IPv4 before IPv6, the smaller network first. [`choose`] is that rule
//! over a list; [`local`] reads the list from the system, and [`advertised_ip`] logs the choice.
//!
//! Also the one reader of the hostname ([`hostname`]): the default node name of a Serf member
//! and the container ID of an etcd registration.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// The interface (`eth0`).
    pub interface: String,
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length (24 for a /24).
    pub prefix: u8,
    /// The interface is up.
    pub up: bool,
}

/// The address chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The address to advertise.
    pub ip: IpAddr,
    /// Its interface.
    pub interface: String,
    /// Whether that interface carries the default route.
    pub default_route: bool,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = if self.default_route {
            "the default route's interface"
        } else {
            "no private address on the default route's interface"
        };
        write!(
            f,
            "{} on {} (private address, {route}; as Go's memberlist)",
            self.ip, self.interface
        )
    }
}

/// Go's rule over `addrs`; `default_interfaces` carry a default route (IPv4 or IPv6).
pub fn choose(addrs: &[IfAddr], default_interfaces: &[String]) -> Option<Choice> {
    let is_default = |addr: &IfAddr| default_interfaces.contains(&addr.interface);
    let mut candidates: Vec<&IfAddr> = addrs
        .iter()
        .filter(|addr| addr.up && forwardable(addr.ip) && private(addr.ip))
        .collect();
    candidates.sort_by_key(|addr| (!is_default(addr), addr.ip.is_ipv6(), u8::MAX - addr.prefix));
    candidates.first().map(|addr| Choice {
        ip: addr.ip,
        interface: addr.interface.clone(),
        default_route: is_default(addr),
    })
}

/// The address to advertise on this host, if any qualifies.
pub fn local() -> Option<Choice> {
    choose(&interfaces(), &default_interfaces())
}

/// The address to advertise when bound to every address: [`local`], logged with the interface
/// and why; loopback when nothing qualifies.
pub fn advertised_ip() -> IpAddr {
    match local() {
        Some(choice) => {
            tracing::info!(address = %choice.ip, "advertising {choice}");
            choice.ip
        }
        None => {
            tracing::warn!("no private address on any interface that is up: advertising 127.0.0.1 (set --advertise)");
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }
    }
}

/// The IP consumers reach us at: `advertise`'s, else `listen` when it is a specific address,
/// else [`advertised_ip`] (what a Serf member bound to every address advertises).
pub fn local_ip(advertise: Option<IpAddr>, listen: IpAddr) -> IpAddr {
    if let Some(ip) = advertise.filter(|ip| !ip.is_unspecified()) {
        return ip;
    }
    if !listen.is_unspecified() {
        return listen;
    }
    advertised_ip()
}

/// The hostname, as Go's `os.Hostname` gives it to `serf agent` (inside Docker, the container
/// ID); `amb-serf` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "amb-serf".to_owned())
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// RFC 6890's special-purpose blocks that are private to a site or provider.
fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => [
            ([10, 0, 0, 0], 8),
            ([100, 64, 0, 0], 10),
            ([172, 16, 0, 0], 12),
            ([192, 168, 0, 0], 16),
            ([198, 18, 0, 0], 15),
        ]
        .iter()
        .any(|&(net, prefix)| in_v4(ip, net, prefix)),
        IpAddr::V6(ip) => in_v6(ip, [0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    }
}

/// Not an address a packet from another host can reach: loopback, unspecified, link-local,
/// multicast, broadcast, documentation, benchmarking-reserved … (RFC 6890 "Forwardable: False").
fn forwardable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_link_local()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.is_documentation()
                || in_v4(ip, [0, 0, 0, 0], 8)
                || in_v4(ip, [240, 0, 0, 0], 4))
        }
        IpAddr::V6(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || in_v6(ip, [0xfe80, 0, 0, 0, 0, 0, 0, 0], 10)
                || in_v6(ip, [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32))
        }
    }
}

/// Interfaces with a default route: `/proc/net/route` (IPv4) and `/proc/net/ipv6_route`.
fn default_interfaces() -> Vec<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    parse_default_interfaces(&v4, &v6)
}

fn parse_default_interfaces(v4: &str, v6: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in v4.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask …
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            found.push(fields[0].to_owned());
        }
    }
    for line in v6.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // destination, its prefix length, … the interface last.
        if fields.len() == 10 && fields[0].bytes().all(|b| b == b'0') && fields[1] == "00" {
            found.push(fields[9].to_owned());
        }
    }
    found.retain(|name| name != "lo");
    found.dedup();
    found
}

/// Every address of every interface (`getifaddrs`).
fn interfaces() -> Vec<IfAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut next = list;
    while !next.is_null() {
        // SAFETY: `next` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*next };
        next = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let interface = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let up = entry.ifa_flags & libc::IFF_UP as u32 != 0;
        // SAFETY: ifa_addr (and ifa_netmask, when set) point to a sockaddr of the family in
        // sa_family, owned by the list.
        let (ip, prefix) = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let addr = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    let mask = entry.ifa_netmask.cast::<libc::sockaddr_in>().as_ref();
                    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
                    let prefix = mask.map_or(32, |mask| mask.sin_addr.s_addr.count_ones() as u8);
                    (IpAddr::V4(ip), prefix)
                }
                libc::AF_INET6 => {
                    let addr = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    let mask = entry.ifa_netmask.cast::<libc::sockaddr_in6>().as_ref();
                    let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
                    let prefix = mask.map_or(128, |mask| {
                        mask.sin6_addr
                            .s6_addr
                            .iter()
                            .map(|b| b.count_ones())
                            .sum::<u32>() as u8
                    });
                    (IpAddr::V6(ip), prefix)
                }
                _ => continue,
            }
        };
        found.push(IfAddr {
            interface,
            ip,
            prefix,
            up,
        });
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, ip: &str, prefix: u8) -> IfAddr {
        IfAddr {
            interface: interface.to_owned(),
            ip: ip.parse().expect("an address"),
            prefix,
            up: true,
        }
    }

    #[test]
    fn the_default_routes_private_address_wins_over_docker0() {
        let host = [
            addr("lo", "127.0.0.1", 8),
            addr("docker0", "172.17.0.1", 16),
            addr("eth0", "10.1.2.3", 8),
            addr("eth0", "fe80::1", 64),
        ];
        let chosen = choose(&host, &["eth0".to_owned()]).expect("an address");
        assert_eq!(chosen.ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert!(chosen.default_route);
        assert!(chosen.to_string().contains("eth0"), "{chosen}");
        // Without a private address on the default route's interface, Go takes the next
        // private one (a documentation or public address is never advertised by this rule).
        let host = [
            addr("docker0", "172.17.0.1", 16),
            addr("eth0", "192.0.2.2", 24),
            addr("eth0", "203.0.114.9", 24),
        ];
        let chosen = choose(&host, &["eth0".to_owned()]).expect("an address");
        assert_eq!(chosen.ip, "172.17.0.1".parse::<IpAddr>().unwrap());
        assert!(!chosen.default_route);
    }

    #[test]
    fn ipv4_first_then_the_smaller_network_and_only_interfaces_that_are_up() {
        let mut down = addr("eth1", "10.9.9.9", 30);
        down.up = false;
        let host = [
            addr("eth0", "fd00::2", 64),
            addr("eth0", "10.0.0.5", 8),
            addr("eth0", "192.168.7.5", 24),
            down,
        ];
        let chosen = choose(&host, &["eth0".to_owned()]).expect("an address");
        assert_eq!(chosen.ip, "192.168.7.5".parse::<IpAddr>().unwrap());
        let only_v6 = [addr("eth0", "fd00::2", 64), addr("eth0", "2001:db8::1", 64)];
        let chosen = choose(&only_v6, &[]).expect("an address");
        assert_eq!(chosen.ip, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(choose(&[addr("lo", "127.0.0.1", 8)], &[]), None);
    }

    #[test]
    fn default_routes_from_proc() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        assert_eq!(parse_default_interfaces(v4, v6), ["eth0", "eth1"]);
        assert!(parse_default_interfaces("", "").is_empty());
    }

    #[test]
    fn this_hosts_interfaces_can_be_read() {
        assert!(interfaces()
            .iter()
            .any(|addr| addr.ip == IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
