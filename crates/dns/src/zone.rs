//! The zone: a membership snapshot indexed for answering. Built once per membership change,
//! read by every query.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use hickory_proto::rr::Name;
use registrar::targets::{self, Dial};
use serf::serf::{Member, MemberStatus};

use crate::cache::Cache;
use crate::names;
use crate::Error;

/// `--dns-domain` and `--dns-ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The zone apex, absolute and lowercase (`serf.`).
    pub domain: Name,
    /// TTL of every record, and the negative-caching TTL in the SOA.
    pub ttl: u32,
}

impl Config {
    /// `domain` with or without its final dot; the root is refused (we would answer every name).
    pub fn new(domain: &str, ttl: u32) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Domain {
            domain: domain.to_owned(),
            reason,
        };
        let mut name = Name::from_ascii(domain).map_err(|error| invalid(error.to_string()))?;
        name.set_fqdn(true);
        if name.is_root() {
            return Err(invalid("the root cannot be the domain".to_owned()));
        }
        Ok(Self {
            domain: name.to_lowercase(),
            ttl,
        })
    }
}

/// One healthy provider of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Provider {
    /// The SRV target: `<node>.node.<domain>`, `<hex>.addr.<domain>` or the `service` tag's
    /// host name (outside the zone).
    pub(crate) target: Name,
    /// The address the target resolves to in this zone, when it does.
    pub(crate) ip: Option<IpAddr>,
    /// The port to dial (SRV), when the member advertises one.
    pub(crate) port: Option<u16>,
}

/// What the zone knows: healthy providers per role and the address of every alive member.
#[derive(Debug, Clone)]
pub struct Zone {
    pub(crate) config: Config,
    /// The SOA serial: bumped by the caller on each change, so secondaries could see it.
    pub(crate) serial: u32,
    /// Lowercase role → its providers, ordered by node name.
    pub(crate) roles: HashMap<String, Vec<Provider>>,
    /// Lowercase node name → its gossip address.
    pub(crate) nodes: HashMap<String, IpAddr>,
    /// Encoded answers of this zone, filled as queries come.
    pub(crate) cache: Cache,
}

impl Zone {
    /// The zone of `members` (a snapshot, ourselves included). A member counts when it is
    /// `alive`; it provides its `role` while its health is not critical (as `connect` does).
    pub fn new<'a>(
        config: Config,
        serial: u32,
        members: impl IntoIterator<Item = &'a Member>,
    ) -> Self {
        let alive: BTreeMap<&str, &Member> = members
            .into_iter()
            .filter(|member| member.status == MemberStatus::Alive)
            .map(|member| (member.name.as_str(), member))
            .collect();
        let mut nodes = HashMap::with_capacity(alive.len());
        let mut roles: HashMap<String, Vec<Provider>> = HashMap::new();
        for member in alive.values() {
            nodes
                .entry(member.name.to_lowercase())
                .or_insert(member.addr);
            let Some(role) = member.tags.get(registrar::tags::ROLE) else {
                continue;
            };
            if !targets::provides(&member.tags, role) {
                continue;
            }
            let Some(provider) = provider(&config.domain, member) else {
                continue;
            };
            roles.entry(role.to_lowercase()).or_default().push(provider);
        }
        Self {
            config,
            serial,
            roles,
            nodes,
            cache: Cache::default(),
        }
    }

    /// The configuration the zone was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Where `member` is dialled, as an SRV target whose address record is ours when we can give
/// one. `None` when its `service` tag is unusable (no port, or a host that is no DNS name).
fn provider(domain: &Name, member: &Member) -> Option<Provider> {
    let in_zone = |ip: IpAddr| {
        let by_node = (ip == member.addr)
            .then(|| names::node(&member.name, domain))
            .flatten();
        by_node.unwrap_or_else(|| names::addr(ip, domain))
    };
    match targets::dial_address(member.addr, &member.tags) {
        Some(Dial::Addr(addr)) => Some(Provider {
            target: in_zone(addr.ip()),
            ip: Some(addr.ip()),
            port: Some(addr.port()),
        }),
        Some(Dial::Host(host, port)) => {
            let mut target = Name::from_ascii(&host).ok()?;
            target.set_fqdn(true);
            Some(Provider {
                target,
                ip: None,
                port: Some(port),
            })
        }
        // A role that is no port and no `ports` tag: an address without a port.
        None if !member.tags.contains_key(registrar::tags::SERVICE) => Some(Provider {
            target: in_zone(member.addr),
            ip: Some(member.addr),
            port: None,
        }),
        None => None,
    }
}
