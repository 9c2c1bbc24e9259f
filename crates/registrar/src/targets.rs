//! Where consumers send a connection: the live providers of a role, as advertised, and the
//! choice among them (least outstanding connections, ties at random, refused targets backed
//! off). Pure: membership and time come in as arguments.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::tags::{HEALTH, PORTS, ROLE, SERVICE};

/// How long a target that refused a connection is skipped.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(2);

/// Where to dial a provider: a socket address, or a `host:port` to resolve per connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dial {
    /// An address.
    Addr(SocketAddr),
    /// A host name and port (a `service` tag with a name in it).
    Host(String, u16),
}

impl std::fmt::Display for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// The address consumers should dial for a member advertising `tags` from gossip address
/// `member_ip`: its `service` tag if any, else its IP and the role (when numeric) or its first
/// advertised port. `None` when it advertises no usable port.
pub fn dial_address(member_ip: IpAddr, tags: &BTreeMap<String, String>) -> Option<Dial> {
    if let Some(service) = tags.get(SERVICE) {
        if let Ok(addr) = service.parse::<SocketAddr>() {
            return Some(Dial::Addr(addr));
        }
        let (host, port) = service.rsplit_once(':')?;
        return Some(Dial::Host(host.to_owned(), port.parse().ok()?));
    }
    let port = tags
        .get(ROLE)
        .and_then(|role| role.parse::<u16>().ok())
        .or_else(|| {
            let first = tags.get(PORTS)?.split(',').next()?;
            first.split('/').next()?.parse().ok()
        })?;
    Some(Dial::Addr(SocketAddr::new(member_ip, port)))
}

/// Whether a member with `tags` provides `role` now (advertises it and is not critical).
pub fn provides(tags: &BTreeMap<String, String>, role: &str) -> bool {
    tags.get(ROLE).is_some_and(|value| value == role)
        && tags.get(HEALTH).is_none_or(|health| health != "critical")
}

#[derive(Debug, Clone)]
struct Entry {
    dial: Dial,
    outstanding: usize,
    down_until: Option<Instant>,
}

/// The providers of one role and the connections each has now.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    entries: BTreeMap<String, Entry>,
}

impl Targets {
    /// Replaces the provider set (node name → address), keeping the counts and back-offs of
    /// providers that stay.
    pub fn replace(&mut self, providers: impl IntoIterator<Item = (String, Dial)>) {
        let mut next = BTreeMap::new();
        for (node, dial) in providers {
            let entry = match self.entries.remove(&node) {
                Some(mut entry) => {
                    if entry.dial != dial {
                        entry.down_until = None;
                    }
                    entry.dial = dial;
                    entry
                }
                None => Entry {
                    dial,
                    outstanding: 0,
                    down_until: None,
                },
            };
            next.insert(node, entry);
        }
        self.entries = next;
    }

    /// Whether there is no provider at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many providers there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Chooses a provider not in `tried` and not backed off: fewest outstanding connections,
    /// ties at random. Counts the connection as outstanding until [`Self::release`].
    pub fn pick(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        tried: &[String],
    ) -> Option<(String, Dial)> {
        let usable = |(node, entry): &(&String, &Entry)| {
            !tried.contains(node) && entry.down_until.is_none_or(|until| until <= now)
        };
        let least = self
            .entries
            .iter()
            .filter(usable)
            .map(|(_, entry)| entry.outstanding)
            .min()?;
        let tied: Vec<&String> = self
            .entries
            .iter()
            .filter(usable)
            .filter(|(_, entry)| entry.outstanding == least)
            .map(|(node, _)| node)
            .collect();
        let node = tied[rng.random_range(0..tied.len())].clone();
        let entry = self.entries.get_mut(&node).expect("picked from the map");
        entry.outstanding += 1;
        Some((node, entry.dial.clone()))
    }

    /// A connection to `node` ended (or never started).
    pub fn release(&mut self, node: &str) {
        if let Some(entry) = self.entries.get_mut(node) {
            entry.outstanding = entry.outstanding.saturating_sub(1);
        }
    }

    /// `node` refused a connection: skip it until `now + backoff`.
    pub fn mark_down(&mut self, node: &str, now: Instant, backoff: Duration) {
        if let Some(entry) = self.entries.get_mut(node) {
            entry.down_until = Some(now + backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn addr(s: &str) -> Dial {
        Dial::Addr(s.parse().unwrap())
    }

    #[test]
    fn dial_address_prefers_service_then_role_then_ports() {
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        let check = |pairs: &[(&str, &str)], expected: Option<Dial>| {
            assert_eq!(dial_address(ip, &tags(pairs)), expected, "{pairs:?}");
        };
        check(&[("role", "3306")], Some(addr("172.17.0.5:3306")));
        check(
            &[("role", "3306"), ("service", "10.0.0.1:49169")],
            Some(addr("10.0.0.1:49169")),
        );
        check(
            &[("service", "db.example:5432")],
            Some(Dial::Host("db.example".into(), 5432)),
        );
        check(
            &[("role", "web"), ("ports", "8080/tcp,9090/tcp")],
            Some(addr("172.17.0.5:8080")),
        );
        check(&[("role", "web")], None);
        check(&[("service", "nonsense")], None);
    }

    #[test]
    fn provides_needs_role_and_not_critical() {
        assert!(provides(&tags(&[("role", "3306")]), "3306"));
        assert!(provides(
            &tags(&[("role", "3306"), ("health", "passing")]),
            "3306"
        ));
        assert!(!provides(
            &tags(&[("role", "3306"), ("health", "critical")]),
            "3306"
        ));
        assert!(!provides(&tags(&[("role", "6379")]), "3306"));
    }

    #[test]
    fn picks_least_outstanding_and_skips_backed_off() {
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let mut targets = Targets::default();
        targets.replace([
            ("a".to_owned(), addr("127.0.0.1:1")),
            ("b".to_owned(), addr("127.0.0.1:2")),
        ]);
        let (first, _) = targets.pick(now, &mut rng, &[]).unwrap();
        let (second, _) = targets.pick(now, &mut rng, &[]).unwrap();
        assert_ne!(first, second, "the idle one is chosen");
        targets.release(&first);
        assert_eq!(targets.pick(now, &mut rng, &[]).unwrap().0, first);
        // A refused target is skipped within the back-off, even with fewer connections.
        targets.release(&first);
        targets.mark_down(&first, now, DEFAULT_BACKOFF);
        assert_eq!(targets.pick(now, &mut rng, &[]).unwrap().0, second);
        assert_eq!(
            targets
                .pick(now + DEFAULT_BACKOFF, &mut rng, &[])
                .unwrap()
                .0,
            first
        );
        // Retrying within one client connection skips what was tried.
        assert_eq!(
            targets.pick(now, &mut rng, std::slice::from_ref(&second)),
            None
        );
        // Membership changes keep counts of the providers that stay.
        targets.replace([(second.clone(), addr("127.0.0.1:2"))]);
        assert_eq!(targets.len(), 1);
    }

    #[test]
    fn ties_are_spread() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut targets = Targets::default();
        targets.replace((0..4).map(|i| (format!("n{i}"), addr(&format!("127.0.0.1:{}", i + 1)))));
        let mut counts = BTreeMap::new();
        for _ in 0..400 {
            let (node, _) = targets.pick(Instant::now(), &mut rng, &[]).unwrap();
            targets.release(&node);
            *counts.entry(node).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|&n| n > 50), "{counts:?}");
    }
}
