//! Pure: forwards + health → the nftables table one ambassador owns.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::link_env::{ForwardSpec, Host, Protocol};

/// The longest table name we make (the kernel allows 256 bytes; `nft` prints any).
const MAX_TABLE_NAME: usize = 64;

/// One forward the kernel carries: packets to `listen` (`None`: any local address) on `port`
/// are DNAT-ed to `target` and masqueraded on their way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A base chain of type `nat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// `prerouting`, `output` or `postrouting`.
    pub name: &'static str,
    /// The netfilter hook.
    pub hook: Hook,
    /// The chain's priority (`dstnat` −100, `srcnat` 100).
    pub priority: i32,
    /// Its rules, in order.
    pub rules: Vec<Vec<Expr>>,
}

/// The netfilter IPv4 hooks we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets arriving from another host or namespace.
    Prerouting,
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
    /// `ct status dnat`.
    CtStatusDnat,
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
        for rule in rules {
            let matches = [
                match rule.listen {
                    Some(ip) => Expr::Daddr(ip),
                    None => Expr::DaddrIsLocal,
                },
                Expr::L4proto(rule.protocol),
                Expr::Dport(rule.port),
            ];
            if options.passing {
                let dnat = [Expr::Counter, Expr::Dnat(rule.target)];
                prerouting.push([&matches[..], &dnat].concat());
                let local_guard = (!options.route_localnet && !rule.target.ip().is_loopback())
                    .then_some(Expr::SaddrNotLoopback);
                output.push(local_guard.into_iter().chain(matches).chain(dnat).collect());
            }
            // Kept while failing too: connections in flight keep their source NAT.
            let masquerade = vec![
                Expr::CtStatusDnat,
                Expr::Daddr(*rule.target.ip()),
                Expr::L4proto(rule.protocol),
                Expr::Dport(rule.target.port()),
                Expr::Masquerade,
            ];
            if !postrouting.contains(&masquerade) {
                postrouting.push(masquerade);
            }
        }
        Self {
            table: table.to_owned(),
            chains: vec![
                Chain {
                    name: "prerouting",
                    hook: Hook::Prerouting,
                    priority: -100,
                    rules: prerouting,
                },
                Chain {
                    name: "output",
                    hook: Hook::Output,
                    priority: -100,
                    rules: output,
                },
                Chain {
                    name: "postrouting",
                    hook: Hook::Postrouting,
                    priority: 100,
                    rules: postrouting,
                },
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
        chain.rules.clone()
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
        assert_eq!(ruleset.chains.len(), 3);
        assert!(chain_rules(&ruleset, "prerouting").is_empty());
        assert!(chain_rules(&ruleset, "output").is_empty());
        // Two forwards to one target share one masquerade rule.
        assert_eq!(chain_rules(&ruleset, "postrouting").len(), 2);
    }
}
