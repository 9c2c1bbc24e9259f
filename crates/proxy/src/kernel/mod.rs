//! The kernel data path: forwards carried by nftables NAT in the namespace amb-serf runs in,
//! so forwarded bytes never enter the process.
//!
//! - [`plan`] (pure) splits bound forwards into kernel [`Rule`]s and the ones that stay in user
//!   space (IPv6, a name without an IPv4 address), each with its reason.
//! - [`Ruleset::build`] (pure) turns rules and [`Options`] (backend health, `route_localnet`)
//!   into one table of three `nat` chains: `prerouting` and `output` DNAT new connections to
//!   each forward's listen address and port (clients from other namespaces, and from this one),
//!   `postrouting` masquerades them, so replies come back through the ambassador.
//! - [`apply`] replaces the table atomically (one netlink batch: add, delete, add with
//!   everything), which also removes a stale table a crashed process left under the same
//!   name; [`remove`] deletes it. The netlink messages are encoded here (`netlink.rs`) and sent
//!   on a plain `NETLINK_NETFILTER` socket: no `nft` binary, no C library.
//! - [`Rights::check`]: `CAP_NET_ADMIN` and IPv4 forwarding, naming what is missing.
//!
//! The user-space listeners stay bound: a packet the rules do not take (a failing backend, a
//! forward left in user space, a loopback client without `route_localnet`) reaches them and is
//! served as in user-space mode. Connections in flight keep their conntrack NAT entries when
//! the rules change. Left out: IPv6, per-connection accounting (only nftables counters).

mod netlink;
mod ruleset;

use std::fmt;
use std::io;

pub use ruleset::{
    plan, table_name, Chain, Count, Entry, Expr, Hook, Options, Rule, Ruleset, Skipped,
};

/// An nftables change the kernel refused; it applied nothing of the batch.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct Error {
    /// What was attempted (`add rule ip amb-serf-x prerouting …`).
    pub step: String,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

/// Installs `ruleset`, replacing its table (and only it) atomically. Blocking (one netlink
/// round trip).
pub fn apply(ruleset: &Ruleset) -> Result<(), Error> {
    netlink::Batch::replace(ruleset).send()
}

/// Deletes `table`; a table that does not exist is not an error. Blocking.
pub fn remove(table: &str) -> Result<(), Error> {
    match netlink::Batch::delete(table).send() {
        Err(error) if error.source.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// One counter of an installed `ruleset`: the forward (index into its rules), what it
/// counts, packets and bytes (since the table was last replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Index of the forward in the rules the ruleset was built from.
    pub forward: usize,
    /// What it counts.
    pub count: Count,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Reads the counters of the installed `ruleset` (one netlink dump). Blocking.
pub fn counters(ruleset: &Ruleset) -> Result<Vec<Counter>, Error> {
    let dumped = netlink::dump_rules(&ruleset.table)?;
    Ok(match_counters(ruleset, &dumped))
}

/// Pairs the dumped rules of each chain, in order, with the ruleset's entries.
fn match_counters(ruleset: &Ruleset, dumped: &[netlink::Dumped]) -> Vec<Counter> {
    let mut counters = Vec::new();
    for chain in &ruleset.chains {
        let installed = dumped.iter().filter(|rule| rule.chain == chain.name);
        for (entry, rule) in chain.rules.iter().zip(installed) {
            if let (Some((forward, count)), Some((packets, bytes))) = (entry.counts, rule.counter) {
                counters.push(Counter {
                    forward,
                    count,
                    packets,
                    bytes,
                });
            }
        }
    }
    counters
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// What the kernel path needs and this process lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    /// The process has `CAP_NET_ADMIN` (in its network namespace's user namespace).
    pub net_admin: bool,
    /// The process runs as root (uid 0): Docker gives `--cap-add` capabilities to root only.
    pub root: bool,
    /// IPv4 forwarding is on (or this process turned it on).
    pub forwarding: bool,
}

impl Rights {
    /// Reads the effective capabilities and turns IPv4 forwarding on when it is off and the
    /// process may (only with `CAP_NET_ADMIN`).
    pub fn check() -> Self {
        let status = self_status();
        let net_admin = has_net_admin(&status);
        let forwarding = sysctl_on(IP_FORWARD)
            || (net_admin && std::fs::write(IP_FORWARD, "1\n").is_ok() && sysctl_on(IP_FORWARD));
        Self {
            net_admin,
            root: is_root(&status),
            forwarding,
        }
    }

    /// Whether the kernel path can run.
    pub fn sufficient(&self) -> bool {
        self.net_admin && self.forwarding
    }
}

impl fmt::Display for Rights {
    /// What is missing, in the flags that give it (`docker run …`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut missing = Vec::new();
        if !self.net_admin && self.root {
            missing.push("CAP_NET_ADMIN (docker run --cap-add NET_ADMIN)");
        } else if !self.net_admin {
            missing.push(
                "CAP_NET_ADMIN as root (docker run --user 0 --cap-add NET_ADMIN: Docker gives \
                 added capabilities to root only)",
            );
        }
        if !self.forwarding {
            missing.push("IPv4 forwarding (docker run --sysctl net.ipv4.ip_forward=1)");
        }
        if missing.is_empty() {
            f.write_str("nothing missing")
        } else {
            write!(f, "missing {}", missing.join(" and "))
        }
    }
}

/// Whether the process has `CAP_NET_ADMIN` now (no side effect, unlike [`Rights::check`]).
pub fn net_admin() -> bool {
    has_net_admin(&self_status())
}

fn self_status() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default()
}

/// Whether `net.ipv4.conf.all.route_localnet` is on: only then may loopback clients be
/// DNAT-ed to another host. We never turn it on ourselves (it lets neighbours reach
/// 127.0.0.0/8 unless filtered).
pub fn route_localnet() -> bool {
    sysctl_on(ROUTE_LOCALNET)
}

fn sysctl_on(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "1")
}

/// The effective uid of a `/proc/<pid>/status` text is 0.
fn is_root(status: &str) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// `CapEff` of a `/proc/<pid>/status` text has bit 12 (`CAP_NET_ADMIN`).
fn has_net_admin(status: &str) -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_admin_is_bit_12_of_the_effective_set() {
        let check = |status: &str, expected: bool| {
            assert_eq!(has_net_admin(status), expected, "{status}");
        };
        check("Name:\tx\nCapEff:\t000001ffffffffff\n", true);
        check("CapEff:\t0000000000001000\n", true);
        check("CapEff:\t0000000000000fff\n", false);
        check(
            "CapPrm:\t0000000000001000\nCapEff:\t0000000000000000\n",
            false,
        );
        check("CapEff:\tnot hex\n", false);
        check("", false);
        assert!(is_root("Uid:\t1000\t0\t0\t0\n"));
        assert!(!is_root("Uid:\t0\t10001\t10001\t10001\n"));
        assert!(!is_root(""));
    }

    #[test]
    fn dumped_counters_pair_with_the_entries_of_their_chain_in_order() {
        let rules = [
            Rule {
                protocol: crate::Protocol::Tcp,
                listen: None,
                port: 80,
                target: "10.0.0.5:80".parse().unwrap(),
            },
            Rule {
                protocol: crate::Protocol::Udp,
                listen: None,
                port: 53,
                target: "10.0.0.6:53".parse().unwrap(),
            },
        ];
        let options = Options {
            passing: true,
            route_localnet: true,
        };
        let ruleset = Ruleset::build("t", &rules, options);
        let dumped = |chain: &str, counter| netlink::Dumped {
            chain: chain.to_owned(),
            counter,
        };
        let counters = match_counters(
            &ruleset,
            &[
                dumped("prerouting", Some((1, 60))),
                dumped("prerouting", Some((2, 120))),
                dumped("postrouting", None),
                dumped("postrouting", None),
                dumped("count_input", Some((7, 700))),
                dumped("count_input", Some((9, 900))),
            ],
        );
        let counter = |forward, count, packets, bytes| Counter {
            forward,
            count,
            packets,
            bytes,
        };
        assert_eq!(
            counters,
            [
                counter(0, Count::Connections, 1, 60),
                counter(1, Count::Connections, 2, 120),
                counter(0, Count::ToClient, 7, 700),
                counter(1, Count::ToClient, 9, 900),
            ]
        );
    }

    #[test]
    fn missing_rights_are_named_with_the_docker_flags_that_give_them() {
        let rights = |net_admin, forwarding| Rights {
            net_admin,
            root: true,
            forwarding,
        };
        assert_eq!(
            rights(false, true).to_string(),
            "missing CAP_NET_ADMIN (docker run --cap-add NET_ADMIN)"
        );
        assert_eq!(
            rights(false, false).to_string(),
            "missing CAP_NET_ADMIN (docker run --cap-add NET_ADMIN) and IPv4 forwarding \
             (docker run --sysctl net.ipv4.ip_forward=1)"
        );
        let docker_non_root = Rights {
            root: false,
            ..rights(false, true)
        };
        assert_eq!(
            docker_non_root.to_string(),
            "missing CAP_NET_ADMIN as root (docker run --user 0 --cap-add NET_ADMIN: Docker \
             gives added capabilities to root only)"
        );
        assert!(rights(true, true).sufficient());
        assert!(!rights(true, false).sufficient());
    }
}
