//! The registry seam: where `run` advertises and where `members`, `resolve` and `connect` look.
//!
//! Every command that advertises or discovers flattens [`RegistryArgs`] and turns it into a
//! [`Registry`]: `Serf` (the default) or `Etcd` (registrations under a key prefix,
//! [`registrar::etcd`]). The commands do not match on it: [`Registry::start`] gives a
//! [`Presence`], a `Box<dyn Advertiser>` (the Serf member or an etcd `Lease`) and an
//! `Arc<dyn Discovery>` (the member's events or the etcd watch) the consumer and the DNS zone
//! follow. [`rpc_members`] renders an etcd [`Snapshot`] as the rows `members` and `resolve`
//! print.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use registrar::advertise::Advertiser;
use registrar::discovery::Discovery;
use registrar::etcd::{
    Client, Endpoints, EtcdDiscovery, Lease, Prefix, Registration, Snapshot, Watcher,
};
use registrar::tags::{Advertisement, Health};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cmd::UsageError;
use crate::member::{self, LocalMember};

/// How long a one-shot command (`members`, `resolve` without `--wait`) waits for etcd's first
/// answer before it gives up.
pub(crate) const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags choosing the registry, shared by `run`, `members`, `resolve` and `connect`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RegistryArgs {
    /// Where to advertise and discover: `serf` (the default) or
    /// `etcd://HOST:2379[,HOST:2379...]`. Without it, an ETCD_PORT_2379_TCP link selects that
    /// etcd.
    #[arg(long, env = "AMB_REGISTRY", value_name = "serf|etcd://HOST:PORT[,...]")]
    pub(crate) registry: Option<String>,

    /// etcd: key prefix of the registrations (`<prefix>/<role>/<node>`).
    #[arg(long, env = "AMB_ETCD_PREFIX", default_value = "/services")]
    pub(crate) etcd_prefix: String,

    /// etcd: lease TTL of the registration (kept alive every ttl/3; whole seconds).
    #[arg(long, env = "AMB_TTL", default_value = "15s", value_parser = crate::duration::parse)]
    pub(crate) ttl: Duration,
}

/// The registry a command uses.
#[derive(Debug, Clone)]
pub(crate) enum Registry {
    /// The Serf cluster (the command's own member, or an agent over RPC).
    Serf,
    /// etcd.
    Etcd(Etcd),
}

/// An etcd registry: where, under which prefix, with which lease TTL.
#[derive(Debug, Clone)]
pub(crate) struct Etcd {
    pub(crate) client: Client,
    pub(crate) prefix: Prefix,
    pub(crate) ttl: Duration,
    /// The endpoint came from the `ETCD_PORT_2379_TCP` link (so that link is not a forward).
    pub(crate) from_link: bool,
}

impl RegistryArgs {
    /// The registry: `--registry`/`AMB_REGISTRY`, else an etcd link among `vars`, else Serf.
    /// A bad value is a [`UsageError`] naming it.
    pub(crate) fn registry(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Registry, UsageError> {
        let usage = |error: registrar::etcd::EndpointError| UsageError(error.to_string());
        let (endpoints, from_link) = match self.registry.as_deref().map(str::trim) {
            Some("serf") => return Ok(Registry::Serf),
            Some(value) if value.starts_with("etcd://") => {
                (Endpoints::parse(value).map_err(usage)?, false)
            }
            Some(value) => {
                return Err(UsageError(format!(
                    "--registry {value:?}: expected `serf` or etcd://HOST:PORT[,HOST:PORT...]"
                )))
            }
            None => match Endpoints::from_link_env(vars).map_err(usage)? {
                Some(endpoints) => (endpoints, true),
                None => return Ok(Registry::Serf),
            },
        };
        if self.ttl < Duration::from_secs(1) {
            return Err(UsageError(format!(
                "--ttl {:?}: the etcd lease TTL must be at least 1s",
                self.ttl
            )));
        }
        Ok(Registry::Etcd(Etcd {
            client: Client::new(endpoints),
            prefix: Prefix::new(&self.etcd_prefix),
            ttl: Duration::from_secs(self.ttl.as_secs_f64().round() as u64),
            from_link,
        }))
    }
}

impl Etcd {
    /// Follows every registration under the prefix.
    pub(crate) fn discovery(&self, shutdown: CancellationToken) -> Watcher {
        Watcher::spawn(self.client.clone(), self.prefix.all(), shutdown)
    }

    /// The first complete listing of the prefix, waiting up to `timeout` for etcd to answer.
    pub(crate) async fn list(
        &self,
        watcher: &mut Watcher,
        timeout: Duration,
    ) -> anyhow::Result<Snapshot> {
        tokio::time::timeout(timeout, watcher.wait_for(Snapshot::is_synced))
            .await
            .ok()
            .flatten()
            .with_context(|| {
                format!(
                    "etcd at {} did not answer within {timeout:?}",
                    self.client.endpoints()
                )
            })
    }
}

/// What a command advertises through and discovers from, whichever the registry.
pub(crate) struct Presence {
    /// Where we advertise (`None`: `connect` with etcd registers nothing).
    pub(crate) advertiser: Option<Box<dyn Advertiser>>,
    /// Where the members come from (the consumer's pools, the DNS zone).
    pub(crate) discovery: Arc<dyn Discovery>,
    /// The Serf member (RPC, DNS, `/metrics` member statuses), when the registry is Serf.
    pub(crate) member: Option<LocalMember>,
}

/// An etcd registration to keep while advertising: `(role, node, value)`.
pub(crate) struct EtcdRegistration<'a> {
    pub(crate) role: &'a str,
    pub(crate) node: &'a str,
    pub(crate) value: Registration,
}

impl Registry {
    /// Whether this is Serf (members, events, RPC) rather than etcd.
    pub(crate) fn is_serf(&self) -> bool {
        matches!(self, Self::Serf)
    }

    /// Whether the etcd endpoint came from the `ETCD_PORT_2379_TCP` link (so that link is not
    /// a forward).
    pub(crate) fn etcd_from_link(&self) -> bool {
        matches!(self, Self::Etcd(etcd) if etcd.from_link)
    }

    /// The seeds to join: Serf's (the link or `--join`); etcd has none.
    pub(crate) fn seeds(
        &self,
        gossip: &member::GossipArgs,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Vec<String>> {
        match self {
            Self::Serf => gossip.seeds(vars),
            Self::Etcd(_) => Ok(Vec::new()),
        }
    }

    /// Starts advertising and discovering: with Serf, the member `start_member` starts; with
    /// etcd, a lease for `registration` (if any) and the watch of the prefix.
    pub(crate) async fn start<F>(
        &self,
        start_member: F,
        registration: Option<EtcdRegistration<'_>>,
        health: watch::Receiver<Health>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Presence>
    where
        F: std::future::Future<Output = anyhow::Result<LocalMember>>,
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
pub(crate) fn registration(advertisement: &Advertisement, local_ip: IpAddr) -> Registration {
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
        &registrar::address::hostname(),
        &local_ip.to_string(),
        port,
        env!("CARGO_PKG_VERSION"),
    );
    registration.service_addr = advertisement.service_addr.clone();
    registration.ports = advertisement.ports.clone();
    registration.tags = registrar::tags::desired(advertisement, Health::Passing);
    registration
}

/// The registrations of `snapshot` as RPC member rows (what `members` and `resolve` render).
pub(crate) fn rpc_members(prefix: &Prefix, snapshot: &Snapshot) -> Vec<serf_agent::rpc::MemberRow> {
    registrar::etcd::members(prefix, snapshot)
        .into_iter()
        .map(|member| serf_agent::rpc::MemberRow {
            name: member.name,
            addr: member.addr,
            port: member.port,
            tags: member.tags,
            status: "alive".to_owned(),
            ..serf_agent::rpc::MemberRow::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn args(registry: Option<&str>) -> RegistryArgs {
        RegistryArgs {
            registry: registry.map(str::to_owned),
            etcd_prefix: "/services".to_owned(),
            ttl: Duration::from_secs(15),
        }
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
                error.0.contains(bad.trim_start_matches("etcd://")),
                "{bad}: {error}"
            );
        }
        let bad_link = vec![("ETCD_PORT_2379_TCP".to_owned(), "udp://x".to_owned())];
        assert!(args(None)
            .registry(bad_link)
            .unwrap_err()
            .0
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
        let serf = registrar::etcd::members(&prefix, &snapshot);
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
