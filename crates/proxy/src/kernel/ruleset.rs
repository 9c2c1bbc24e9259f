//! Pure: forwards + health → the nftables table one ambassador owns.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::link_env::{ForwardSpec, Host, Protocol};

/// The longest table name we make (the kernel allows 256 bytes; `nft` prints any).
const MAX_TABLE_NAME: usize = 64;

/// One forward the kernel carries: packets to `listen` (`None`: any local address) on `port`
/// are DNAT-ed to `target` and masqueraded on their way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The listen address, or `None` for every address of the namespace (`0.0.0.0`).
    pub listen: Option<Ipv4Addr>,
    /// The listen port.
    pub port: u16,
    /// Where new connections go.
    pub target: SocketAddrV4,
}

/// A forward the kernel cannot carry, and why (it stays in user space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The forward, as `--forward` would spell it.
    pub forward: String,
    /// Why it stays in user space.
    pub reason: String,
}

/// Splits bound forwards into kernel [`Rule`]s and the ones that stay in user space.
/// `resolve` answers for a target given by name (the caller looked it up; `None`: no IPv4
/// address now).
pub fn plan(
    bound: &[(ForwardSpec, SocketAddr)],
    resolve: impl Fn(&str) -> Option<Ipv4Addr>,
) -> (Vec<Rule>, Vec<Skipped>) {
    let mut rules = Vec::new();
    let mut skipped = Vec::new();
    for (spec, addr) in bound {
        let skip = |reason: &str| Skipped {
            forward: spec.to_forward_flag(),
            reason: reason.to_owned(),
        };
        let listen = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => None,
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => {
                skipped.push(skip("IPv6 listen address (the kernel path is IPv4 only)"));
                continue;
            }
        };
        let target_ip = match &spec.target.host {
            Host::Ip(IpAddr::V4(ip)) => *ip,
            Host::Ip(IpAddr::V6(_)) => {
                skipped.push(skip("IPv6 target (the kernel path is IPv4 only)"));
                continue;
            }
            Host::Name(name) => match resolve(name) {
                Some(ip) => ip,
                None => {
                    skipped.push(skip("the target's name has no IPv4 address now"));
                    continue;
                }
            },
        };
        if target_ip.is_unspecified() {
            skipped.push(skip("target address 0.0.0.0"));
            continue;
        }
        rules.push(Rule {
            protocol: spec.protocol,
            listen,
            port: addr.port(),
            target: SocketAddrV4::new(target_ip, spec.target.port),
        });
    }
    (rules, skipped)
}

/// The table name of one ambassador instance (its node name), so two ambassadors in one
/// namespace own different tables and a restart under the same name replaces its stale one.
/// Only `[A-Za-z0-9_-]` are kept (others become `_`) and the name is cut to 64 bytes.
pub fn table_name(instance: &str) -> String {
    let mut name = String::from("amb-serf-");
    name.extend(instance.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    }));
    name.truncate(MAX_TABLE_NAME);
    name
}

/// The whole table, as one atomic replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The table (family `ip`).
    pub table: String,
    /// The chains and their rules (every chain exists even without rules, so the NAT hooks of
    /// connections in flight stay registered while health gating empties them).
    pub chains: Vec<Chain>,
}

/// A base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// `prerouting`, `output`, `postrouting` (type `nat`) or `count_*` (type `filter`).
    pub name: &'static str,
    /// The netfilter hook.
    pub hook: Hook,
    /// `nat` chains see the first packet of each connection; `filter` chains every packet.
    pub nat: bool,
    /// The chain's priority (`dstnat` −100, `srcnat` 100, `filter` 0).
    pub priority: i32,
    /// Its rules, in order.
    pub rules: Vec<Entry>,
}

/// One rule: its expressions, and what its counter counts (if it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The expressions, in order.
    pub exprs: Vec<Expr>,
    /// The forward (index into the rules given to [`Ruleset::build`]) and what its counter counts.
    pub counts: Option<(usize, Count)>,
}

/// What a rule's counter counts for its forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Count {
    /// New connections (UDP flows): the first packet of each, DNAT-ed.
    Connections,
    /// Packets and bytes from clients to the target.
    ToUpstream,
    /// Packets and bytes from the target back to clients.
    ToClient,
}

/// The netfilter IPv4 hooks we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets arriving from another host or namespace.
    Prerouting,
    /// Packets for this namespace's own processes.
    Input,
    /// Packets routed through this namespace.
    Forward,
    /// Packets sent by this namespace's own processes.
    Output,
    /// Packets leaving.
    Postrouting,
}

/// One nftables expression, in the terms `nft` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expr {
    /// `fib daddr type local`.
    DaddrIsLocal,
    /// `ip daddr ADDR`.
    Daddr(Ipv4Addr),
    /// `ip saddr != 127.0.0.0/8`.
    SaddrNotLoopback,
    /// `meta l4proto tcp|udp`.
    L4proto(Protocol),
    /// `th dport PORT`.
    Dport(u16),
    /// `oif != "lo"`: masquerading out of the loopback finds no source address (the packet is
    /// dropped), and a reply on it comes back here anyway.
    OifNotLoopback,
    /// `ct status dnat`.
    CtStatusDnat,
    /// `ct original proto-dst PORT`.
    CtOriginalDport(u16),
    /// `ct reply ip saddr ADDR`.
    CtReplySaddr(Ipv4Addr),
    /// `ct reply proto-src PORT`.
    CtReplySport(u16),
    /// `ct direction original` (`false`: `reply`).
    CtDirectionOriginal(bool),
    /// `counter`.
    Counter,
    /// `dnat to ADDR:PORT`.
    Dnat(SocketAddrV4),
    /// `masquerade`.
    Masquerade,
}

/// What the namespace allows, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Whether the backend passes its health check: while it fails, no new connection is
    /// DNAT-ed (they reach the user-space listener, which fails them as in user-space mode).
    pub passing: bool,
    /// Whether packets from 127.0.0.0/8 may leave by another interface after DNAT
    /// (`net.ipv4.conf.all.route_localnet=1`). Without it, loopback clients of a non-loopback
    /// target are left to the user-space listener.
    pub route_localnet: bool,
}

impl Ruleset {
    /// The table for `rules` under `options`.
    pub fn build(table: &str, rules: &[Rule], options: Options) -> Self {
        let mut prerouting = Vec::new();
        let mut output = Vec::new();
        let mut postrouting = Vec::new();
        let (mut count_forward, mut count_output, mut count_input) =
            (Vec::new(), Vec::new(), Vec::new());
        for (index, rule) in rules.iter().enumerate() {
            let matches = [
                match rule.listen {
                    Some(ip) => Expr::Daddr(ip),
                    None => Expr::DaddrIsLocal,
                },
                Expr::L4proto(rule.protocol),
                Expr::Dport(rule.port),
            ];
            let counted = |count, exprs: Vec<Expr>| Entry {
                exprs,
                counts: Some((index, count)),
            };
            if options.passing {
                let dnat = [Expr::Counter, Expr::Dnat(rule.target)];
                prerouting.push(counted(Count::Connections, [&matches[..], &dnat].concat()));
                let local_guard = (!options.route_localnet && !rule.target.ip().is_loopback())
                    .then_some(Expr::SaddrNotLoopback);
                let exprs = local_guard.into_iter().chain(matches).chain(dnat);
                output.push(counted(Count::Connections, exprs.collect()));
            }
            // Kept while failing too: connections in flight keep their source NAT.
            let masquerade = Entry {
                exprs: vec![
                    Expr::OifNotLoopback,
                    Expr::CtStatusDnat,
                    Expr::Daddr(*rule.target.ip()),
                    Expr::L4proto(rule.protocol),
                    Expr::Dport(rule.target.port()),
                    Expr::Masquerade,
                ],
                counts: None,
            };
            if !postrouting.contains(&masquerade) {
                postrouting.push(masquerade);
            }
            // Every packet of the forward's connections: routed through (both directions),
            // or from and to a client of this namespace (sent original, received reply).
            let connection = [
                Expr::L4proto(rule.protocol),
                Expr::CtStatusDnat,
                Expr::CtOriginalDport(rule.port),
                Expr::CtReplySaddr(*rule.target.ip()),
                Expr::CtReplySport(rule.target.port()),
            ];
            let direction = |original: bool| {
                let tail = [Expr::CtDirectionOriginal(original), Expr::Counter];
                [&connection[..], &tail].concat()
            };
            count_forward.push(counted(Count::ToUpstream, direction(true)));
            count_forward.push(counted(Count::ToClient, direction(false)));
            count_output.push(counted(Count::ToUpstream, direction(true)));
            count_input.push(counted(Count::ToClient, direction(false)));
        }
        let chain = |name, hook, nat, priority, rules| Chain {
            name,
            hook,
            nat,
            priority,
            rules,
        };
        Self {
            table: table.to_owned(),
            chains: vec![
                chain("prerouting", Hook::Prerouting, true, -100, prerouting),
                chain("output", Hook::Output, true, -100, output),
                chain("postrouting", Hook::Postrouting, true, 100, postrouting),
                chain("count_forward", Hook::Forward, false, 0, count_forward),
                chain("count_output", Hook::Output, false, 0, count_output),
                chain("count_input", Hook::Input, false, 0, count_input),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_env::{Origin, Target};

    fn spec(protocol: Protocol, listen_port: u16, host: Host, port: u16) -> ForwardSpec {
        ForwardSpec {
            listen_port,
            protocol,
            target: Target { host, port },
            origin: Origin::Forward(String::new()),
        }
    }

    fn ip(text: &str) -> Host {
        Host::Ip(text.parse().expect("test address"))
    }

    #[test]
    fn plan_keeps_ipv4_forwards_and_says_why_others_stay_in_user_space() {
        let any: SocketAddr = "0.0.0.0:3306".parse().unwrap();
        let bound = [
            (spec(Protocol::Tcp, 3306, ip("10.0.0.5"), 3306), any),
            (
                spec(Protocol::Udp, 53, Host::Name("dns".into()), 5353),
                "127.0.0.2:53".parse().unwrap(),
            ),
            (
                spec(Protocol::Tcp, 80, Host::Name("gone".into()), 80),
                "0.0.0.0:80".parse().unwrap(),
            ),
            (
                spec(Protocol::Tcp, 81, ip("::1"), 80),
                "0.0.0.0:81".parse().unwrap(),
            ),
            (
                spec(Protocol::Tcp, 82, ip("10.0.0.5"), 80),
                "[::]:82".parse().unwrap(),
            ),
        ];
        let (rules, skipped) = plan(&bound, |name| {
            (name == "dns").then(|| Ipv4Addr::new(10, 0, 0, 53))
        });
        assert_eq!(
            rules,
            [
                Rule {
                    protocol: Protocol::Tcp,
                    listen: None,
                    port: 3306,
                    target: "10.0.0.5:3306".parse().unwrap(),
                },
                Rule {
                    protocol: Protocol::Udp,
                    listen: Some(Ipv4Addr::new(127, 0, 0, 2)),
                    port: 53,
                    target: "10.0.0.53:5353".parse().unwrap(),
                },
            ]
        );
        let reasons: Vec<_> = skipped
            .iter()
            .map(|s| (s.forward.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("80=gone:80", "the target's name has no IPv4 address now"),
                ("81=[::1]:80", "IPv6 target (the kernel path is IPv4 only)"),
                (
                    "82=10.0.0.5:80",
                    "IPv6 listen address (the kernel path is IPv4 only)"
                ),
            ]
        );
    }

    #[test]
    fn table_names_are_per_instance_and_safe() {
        assert_eq!(table_name("amb-1"), "amb-serf-amb-1");
        assert_eq!(table_name("host.example com"), "amb-serf-host_example_com");
        assert_eq!(table_name(&"x".repeat(300)).len(), MAX_TABLE_NAME);
    }

    fn rule(protocol: Protocol, listen: Option<Ipv4Addr>, port: u16, target: &str) -> Rule {
        Rule {
            protocol,
            listen,
            port,
            target: target.parse().unwrap(),
        }
    }

    fn chain_rules(ruleset: &Ruleset, name: &str) -> Vec<Vec<Expr>> {
        let chain = ruleset.chains.iter().find(|c| c.name == name).unwrap();
        chain
            .rules
            .iter()
            .map(|entry| entry.exprs.clone())
            .collect()
    }

    #[test]
    fn passing_backend_is_dnat_ed_from_outside_and_from_inside() {
        let rules = [rule(Protocol::Tcp, None, 3306, "10.0.0.5:3306")];
        let options = Options {
            passing: true,
            route_localnet: true,
        };
        let ruleset = Ruleset::build("amb-serf-a", &rules, options);
        let dnat = vec![
            Expr::DaddrIsLocal,
            Expr::L4proto(Protocol::Tcp),
            Expr::Dport(3306),
            Expr::Counter,
            Expr::Dnat("10.0.0.5:3306".parse().unwrap()),
        ];
        assert_eq!(
            chain_rules(&ruleset, "prerouting"),
            std::slice::from_ref(&dnat)
        );
        assert_eq!(chain_rules(&ruleset, "output"), [dnat]);
        assert_eq!(
            chain_rules(&ruleset, "postrouting"),
            [vec![
                Expr::OifNotLoopback,
                Expr::CtStatusDnat,
                Expr::Daddr(Ipv4Addr::new(10, 0, 0, 5)),
                Expr::L4proto(Protocol::Tcp),
                Expr::Dport(3306),
                Expr::Masquerade,
            ]]
        );
    }

    #[test]
    fn without_route_localnet_loopback_clients_of_a_remote_target_stay_in_user_space() {
        let rules = [
            rule(Protocol::Udp, Some(Ipv4Addr::LOCALHOST), 53, "10.0.0.5:53"),
            rule(
                Protocol::Tcp,
                Some(Ipv4Addr::new(127, 0, 0, 2)),
                80,
                "127.0.0.1:80",
            ),
        ];
        let options = Options {
            passing: true,
            route_localnet: false,
        };
        let output = chain_rules(&Ruleset::build("t", &rules, options), "output");
        assert_eq!(output[0][0], Expr::SaddrNotLoopback);
        assert_eq!(output[1][0], Expr::Daddr(Ipv4Addr::new(127, 0, 0, 2)));
    }

    #[test]
    fn failing_backend_gets_no_dnat_but_keeps_chains_and_source_nat() {
        let rules = [
            rule(Protocol::Tcp, None, 3306, "10.0.0.5:3306"),
            rule(Protocol::Tcp, None, 3307, "10.0.0.6:3306"),
            rule(Protocol::Tcp, None, 3308, "10.0.0.5:3306"),
        ];
        let options = Options {
            passing: false,
            route_localnet: true,
        };
        let ruleset = Ruleset::build("t", &rules, options);
        assert_eq!(ruleset.chains.len(), 6);
        assert!(chain_rules(&ruleset, "prerouting").is_empty());
        assert!(chain_rules(&ruleset, "output").is_empty());
        // Two forwards to one target share one masquerade rule.
        assert_eq!(chain_rules(&ruleset, "postrouting").len(), 2);
        // Connections in flight are still counted.
        assert_eq!(chain_rules(&ruleset, "count_forward").len(), 6);
    }

    #[test]
    fn every_packet_is_counted_once_per_direction_whatever_the_path() {
        let rules = [rule(Protocol::Udp, None, 53, "10.0.0.5:5353")];
        let options = Options {
            passing: true,
            route_localnet: true,
        };
        let ruleset = Ruleset::build("t", &rules, options);
        let counts = |name: &str| -> Vec<_> {
            let chain = ruleset.chains.iter().find(|c| c.name == name).unwrap();
            chain.rules.iter().map(|entry| entry.counts).collect()
        };
        assert_eq!(counts("prerouting"), [Some((0, Count::Connections))]);
        assert_eq!(counts("output"), [Some((0, Count::Connections))]);
        assert_eq!(counts("postrouting"), [None]);
        assert_eq!(
            counts("count_forward"),
            [Some((0, Count::ToUpstream)), Some((0, Count::ToClient))]
        );
        assert_eq!(counts("count_output"), [Some((0, Count::ToUpstream))]);
        assert_eq!(counts("count_input"), [Some((0, Count::ToClient))]);
        assert_eq!(
            chain_rules(&ruleset, "count_input"),
            [vec![
                Expr::L4proto(Protocol::Udp),
                Expr::CtStatusDnat,
                Expr::CtOriginalDport(53),
                Expr::CtReplySaddr(Ipv4Addr::new(10, 0, 0, 5)),
                Expr::CtReplySport(5353),
                Expr::CtDirectionOriginal(false),
                Expr::Counter,
            ]]
        );
    }
}
