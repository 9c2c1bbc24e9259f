//! The registry choice: where `run` advertises and where `members`, `resolve` and `connect`
//! look.
//!
//! The binary parses its flags into a [`Registry`] ([`Registry::choose`]): `Serf` (the default)
//! or `Etcd` (registrations under a key prefix, [`crate::etcd`]). The commands do not match on
//! it: [`Registry::start`] gives a [`Presence`], a `Box<dyn Advertiser>` (the Serf member or an
//! etcd `Lease`) and an `Arc<dyn Discovery>` (the member's events or the etcd watch) the
//! consumer and the DNS zone follow. [`rpc_members`] renders an etcd [`Snapshot`] as the rows
//! `members` and `resolve` print.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serf::serf::Member;
use serf_agent::rpc::MemberRow;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::advertise::Advertiser;
use crate::discovery::{Change, Changes, Discovery};
use crate::etcd::{
    Client, EndpointError, Endpoints, EtcdDiscovery, Lease, Prefix, Registration, Snapshot,
};
use crate::serf::LocalMember;
use crate::tags::{Advertisement, Health};

/// How long a one-shot command (`members`, `resolve` without `--wait`) waits for etcd's first
/// answer before it gives up.
pub const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The registry a command uses.
#[derive(Debug, Clone)]
pub enum Registry {
    /// The Serf cluster (the command's own member, or an agent over RPC).
    Serf,
    /// etcd.
    Etcd(Etcd),
}

/// An etcd registry: where, under which prefix, with which lease TTL.
#[derive(Debug, Clone)]
pub struct Etcd {
    /// The etcd client (its endpoints).
    pub client: Client,
    /// Where the registrations are.
    pub prefix: Prefix,
    /// The lease TTL, whole seconds.
    pub ttl: Duration,
    /// The endpoint came from the `ETCD_PORT_2379_TCP` link (so that link is not a forward).
    pub from_link: bool,
}

/// A registry setting that is not valid; nothing was started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Neither `serf` nor `etcd://…`.
    #[error("--registry {0:?}: expected `serf` or etcd://HOST:PORT[,HOST:PORT...]")]
    Unknown(String),
    /// A malformed etcd endpoint (the flag's or the link's).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A lease TTL under a second.
    #[error("--ttl {0:?}: the etcd lease TTL must be at least 1s")]
    Ttl(Duration),
}

impl Registry {
    /// The registry: `registry` (`--registry`), else an etcd link among `vars`, else Serf;
    /// `prefix` and `ttl` (rounded to whole seconds) are etcd's.
    pub fn choose(
        registry: Option<&str>,
        prefix: &str,
        ttl: Duration,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, RegistryError> {
        let (endpoints, from_link) = match registry.map(str::trim) {
            Some("serf") => return Ok(Self::Serf),
            Some(value) if value.starts_with("etcd://") => (Endpoints::parse(value)?, false),
            Some(value) => return Err(RegistryError::Unknown(value.to_owned())),
            None => match Endpoints::from_link_env(vars)? {
                Some(endpoints) => (endpoints, true),
                None => return Ok(Self::Serf),
            },
        };
        if ttl < Duration::from_secs(1) {
            return Err(RegistryError::Ttl(ttl));
        }
        Ok(Self::Etcd(Etcd {
            client: Client::new(endpoints),
            prefix: Prefix::new(prefix),
            ttl: Duration::from_secs(ttl.as_secs_f64().round() as u64),
            from_link,
        }))
    }
}

/// etcd did not answer in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd at {endpoints} did not answer within {timeout:?}")]
pub struct ListTimeout {
    /// Where we asked.
    pub endpoints: String,
    /// How long we waited.
    pub timeout: Duration,
}

impl Etcd {
    /// Follows every registration under the prefix, as a [`Discovery`].
    pub fn discovery(&self, shutdown: CancellationToken) -> EtcdDiscovery {
        EtcdDiscovery::new(self.client.clone(), self.prefix.clone(), shutdown)
    }

    /// The first complete listing of `view`, waiting up to `timeout` for etcd to answer.
    pub async fn first(
        &self,
        view: &mut View,
        timeout: Duration,
    ) -> Result<Vec<Member>, ListTimeout> {
        tokio::time::timeout(timeout, view.next())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| ListTimeout {
                endpoints: self.client.endpoints().to_string(),
                timeout,
            })
    }
}

/// The members a [`Discovery`] shows, kept current from its changes.
pub struct View {
    changes: Box<dyn Changes>,
    members: BTreeMap<String, Member>,
}

impl View {
    /// Starts following `discovery`.
    pub fn new(discovery: &dyn Discovery) -> Self {
        Self {
            changes: discovery.changes(),
            members: BTreeMap::new(),
        }
    }

    /// Every member after the next change (the first is the whole list); `None` once the
    /// registry stopped.
    pub async fn next(&mut self) -> Option<Vec<Member>> {
        match self.changes.next().await? {
            Change::Snapshot(members) => {
                self.members = members
                    .into_iter()
                    .map(|member| (member.name.clone(), member))
                    .collect();
            }
            Change::Update(member) | Change::Departed(member) => {
                self.members.insert(member.name.clone(), member);
            }
            Change::Reaped(name) => {
                self.members.remove(&name);
            }
        }
        Some(self.members.values().cloned().collect())
    }
}

/// A member as an RPC member row (what `members` and `resolve` render).
pub fn member_row(member: Member) -> MemberRow {
    MemberRow {
        name: member.name,
        addr: member.addr,
        port: member.port,
        tags: member.tags,
        status: member.status.to_string(),
        ..MemberRow::default()
    }
}

/// What a command advertises through and discovers from, whichever the registry.
pub struct Presence {
    /// Where we advertise (`None`: `connect` with etcd registers nothing).
    pub advertiser: Option<Box<dyn Advertiser>>,
    /// Where the members come from (the consumer's pools, the DNS zone).
    pub discovery: Arc<dyn Discovery>,
    /// The Serf member (RPC, DNS, `/metrics` member statuses), when the registry is Serf.
    pub member: Option<LocalMember>,
}

/// An etcd registration to keep while advertising: `(role, node, value)`.
pub struct EtcdRegistration<'a> {
    /// The role (key part).
    pub role: &'a str,
    /// Our node name (key part).
    pub node: &'a str,
    /// The value to keep.
    pub value: Registration,
}

impl Registry {
    /// Whether this is Serf (members, events, RPC) rather than etcd.
    pub fn is_serf(&self) -> bool {
        matches!(self, Self::Serf)
    }

    /// Whether the etcd endpoint came from the `ETCD_PORT_2379_TCP` link (so that link is not
    /// a forward).
    pub fn etcd_from_link(&self) -> bool {
        matches!(self, Self::Etcd(etcd) if etcd.from_link)
    }

    /// Starts advertising and discovering: with Serf, the member `start_member` starts; with
    /// etcd, a lease for `registration` (if any) and the watch of the prefix.
    pub async fn start<F, E>(
        &self,
        start_member: F,
        registration: Option<EtcdRegistration<'_>>,
        health: watch::Receiver<Health>,
        shutdown: &CancellationToken,
    ) -> Result<Presence, E>
    where
        F: std::future::Future<Output = Result<LocalMember, E>>,
    {
        match self {
            Self::Serf => {
                let member = start_member.await?;
                Ok(Presence {
                    advertiser: Some(Box::new(member.clone())),
                    discovery: Arc::new(member.discovery()),
                    member: Some(member),
                })
            }
            Self::Etcd(etcd) => {
                let advertiser = registration.map(|registration| {
                    let key = etcd.prefix.key(registration.role, registration.node);
                    Box::new(Lease::start(
                        etcd.client.clone(),
                        key,
                        registration.node,
                        &registration.value,
                        etcd.ttl,
                        health,
                    )) as Box<dyn Advertiser>
                });
                let discovery =
                    EtcdDiscovery::new(etcd.client.clone(), etcd.prefix.clone(), shutdown.clone());
                Ok(Presence {
                    advertiser,
                    discovery: Arc::new(discovery),
                    member: None,
                })
            }
        }
    }
}

/// The registration `run` writes: the four fields of the original image, the service address,
/// every port and the tags Serf would advertise while passing.
pub fn registration(advertisement: &Advertisement, local_ip: IpAddr) -> Registration {
    let port = advertisement
        .role
        .as_deref()
        .and_then(|role| role.parse::<u16>().ok())
        .or_else(|| {
            let first = advertisement.ports.first()?;
            first.split('/').next()?.parse().ok()
        })
        .unwrap_or(0);
    let mut registration = Registration::new(
        &crate::address::hostname(),
        &local_ip.to_string(),
        port,
        env!("CARGO_PKG_VERSION"),
    );
    registration.service_addr = advertisement.service_addr.clone();
    registration.ports = advertisement.ports.clone();
    registration.tags = crate::tags::desired(advertisement, Health::Passing);
    registration
}

/// The registrations of `snapshot` as RPC member rows (what `members` and `resolve` render).
pub fn rpc_members(prefix: &Prefix, snapshot: &Snapshot) -> Vec<MemberRow> {
    crate::etcd::members(prefix, snapshot)
        .into_iter()
        .map(member_row)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Args(Option<&'static str>);

    impl Args {
        fn registry(&self, vars: Vec<(String, String)>) -> Result<Registry, RegistryError> {
            Registry::choose(self.0, "/services", Duration::from_secs(15), vars)
        }
    }

    fn args(registry: Option<&'static str>) -> Args {
        Args(registry)
    }

    #[test]
    fn choosing_the_registry() {
        let link = || {
            vec![(
                "ETCD_PORT_2379_TCP".to_owned(),
                "tcp://10.0.0.9:2379".to_owned(),
            )]
        };
        assert!(matches!(
            args(None).registry(Vec::new()),
            Ok(Registry::Serf)
        ));
        assert!(matches!(
            args(Some("serf")).registry(link()),
            Ok(Registry::Serf)
        ));
        match args(None).registry(link()) {
            Ok(Registry::Etcd(etcd)) => {
                assert!(etcd.from_link);
                assert_eq!(etcd.client.endpoints().to_string(), "etcd://10.0.0.9:2379");
            }
            other => panic!("{other:?}"),
        }
        match args(Some("etcd://a:1,b")).registry(link()) {
            Ok(Registry::Etcd(etcd)) => assert!(!etcd.from_link),
            other => panic!("{other:?}"),
        }
        for bad in ["consul://x", "etcd://", "etcd://a:notaport"] {
            let error = args(Some(bad)).registry(Vec::new()).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains(bad.trim_start_matches("etcd://")),
                "{bad}: {error}"
            );
        }
        let bad_link = vec![("ETCD_PORT_2379_TCP".to_owned(), "udp://x".to_owned())];
        assert!(args(None)
            .registry(bad_link)
            .unwrap_err()
            .to_string()
            .contains("ETCD_PORT_2379_TCP"));
    }

    #[test]
    fn registrations_as_members() {
        let prefix = Prefix::new("/services");
        let mut plain = Registration::new("c1", "10.0.0.5", 6379, "1");
        plain.tags = BTreeMap::from([("role".to_owned(), "6379".to_owned())]);
        let mut named = Registration::new("c2", "10.0.0.6", 80, "1");
        named.service_addr = Some("db.example:8080".to_owned());
        let foreign = Registration::new("c3", "not-an-ip", 3306, "0.1");
        let snapshot = Snapshot {
            revision: 3,
            registrations: std::sync::Arc::new(BTreeMap::from([
                ("/services/6379/a".to_owned(), plain),
                ("/services/web/b".to_owned(), named),
                ("/services/3306/c".to_owned(), foreign),
            ])),
        };
        let members = rpc_members(&prefix, &snapshot);
        let by_name: BTreeMap<_, _> = members.iter().map(|m| (m.name.as_str(), m)).collect();
        let a = by_name["a"];
        assert_eq!(
            (a.socket_addr().to_string(), a.status.as_str()),
            ("10.0.0.5:6379".into(), "alive")
        );
        assert_eq!(a.tags.get("service"), None);
        assert_eq!(by_name["b"].tags["role"], "web");
        assert_eq!(by_name["b"].tags["service"], "db.example:8080");
        assert_eq!(by_name["c"].tags["service"], "not-an-ip:3306");
        let serf = crate::etcd::members(&prefix, &snapshot);
        assert_eq!(serf.len(), 3);
        assert!(serf
            .iter()
            .all(|m| m.status == serf::serf::MemberStatus::Alive));
    }

    #[test]
    fn the_registration_run_writes() {
        let advertisement = Advertisement {
            role: Some("6379".to_owned()),
            ports: vec!["6379/tcp".to_owned(), "6380/tcp".to_owned()],
            service_addr: Some("192.0.2.1:16379".to_owned()),
            extra: BTreeMap::from([("dc".to_owned(), "east".to_owned())]),
        };
        let value = registration(&advertisement, "10.0.0.5".parse().unwrap());
        assert_eq!((value.local_ip.as_str(), value.port), ("10.0.0.5", 6379));
        assert_eq!(value.ports, ["6379/tcp", "6380/tcp"]);
        assert_eq!(value.service_addr.as_deref(), Some("192.0.2.1:16379"));
        assert_eq!(value.tags["dc"], "east");
        assert_eq!(value.tags["role"], "6379");
        assert_eq!(value.version, env!("CARGO_PKG_VERSION"));
    }
}
