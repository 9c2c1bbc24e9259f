//! The registry seam: where `run` advertises and where `members`, `resolve` and `connect` look.
//!
//! Every command that advertises or discovers flattens [`RegistryArgs`] and turns it into a
//! [`Registry`]: `Serf` (the default; the commands use their Serf member or RPC as before) or
//! `Etcd` (registrations under a key prefix, [`registrar::etcd`]). The rest of this module keeps
//! the etcd side in the commands' own terms, so each command has one `match` on the registry:
//!
//! - [`Advertiser`]: what `run` holds while advertising (a Serf member, or an etcd
//!   [`registrar::etcd::Registrar`] task fed by the same health channel); `withdraw` is the Serf
//!   leave or the etcd lease revoke;
//! - [`rpc_members`] / [`serf_members`]: a [`Snapshot`] of registrations as the member rows the
//!   Serf code paths already render (`members`, `resolve`) or route to (`connect`): name = node,
//!   address = `local_ip` and `port`, status `alive`, tags = the registration's tags (its role
//!   taken from the key when missing, a `service` tag when its dial address needs one).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context as _;
use registrar::etcd::{Client, Discovery, Endpoints, Prefix, Registrar, Registration, Snapshot};
use registrar::tags::{Advertisement, Health};
use registrar::targets::dial_address;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cmd::UsageError;
use crate::member;

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
    pub(crate) fn discovery(&self, shutdown: CancellationToken) -> Discovery {
        Discovery::spawn(self.client.clone(), self.prefix.all(), shutdown)
    }

    /// The first complete listing of the prefix, waiting up to `timeout` for etcd to answer.
    pub(crate) async fn list(
        &self,
        discovery: &mut Discovery,
        timeout: Duration,
    ) -> anyhow::Result<Snapshot> {
        tokio::time::timeout(timeout, discovery.wait_for(Snapshot::is_synced))
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

    /// Starts registering `registration` under `<prefix>/<role>/<node>` while `health` is not
    /// critical; the returned advertiser revokes the lease when withdrawn.
    pub(crate) fn register(
        &self,
        role: &str,
        node: &str,
        registration: &Registration,
        mut health: watch::Receiver<Health>,
    ) -> Advertiser {
        let key = self.prefix.key(role, node);
        let healthy = |health: Health| health != Health::Critical;
        let (healthy_tx, healthy_rx) = watch::channel(healthy(*health.borrow_and_update()));
        // The one health loop feeds both appliers; this one only translates its values.
        tokio::spawn(async move {
            while health.changed().await.is_ok() {
                healthy_tx.send_replace(healthy(*health.borrow_and_update()));
            }
        });
        let stop = CancellationToken::new();
        let registrar = Registrar::new(self.client.clone(), key.clone(), registration, self.ttl);
        info!(%key, endpoints = %self.client.endpoints(), ttl = ?self.ttl, "registering in etcd");
        let task = tokio::spawn(registrar.run(healthy_rx, stop.clone()));
        Advertiser::Etcd {
            node: node.to_owned(),
            stop,
            task,
        }
    }
}

/// What `run` advertises through.
pub(crate) enum Advertiser {
    /// A Serf member (tags applied by [`crate::health::advertise`]).
    Serf(member::Member),
    /// The etcd registrar task.
    Etcd {
        /// Our node name (the key's last part).
        node: String,
        /// Cancelling it makes the registrar revoke its lease and return.
        stop: CancellationToken,
        /// The registrar task.
        task: JoinHandle<()>,
    },
}

impl Advertiser {
    /// Our node name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Serf(member) => member.name(),
            Self::Etcd { node, .. } => node,
        }
    }

    /// Resolves when something other than a signal asks us to stop (`serf leave` over RPC).
    pub(crate) async fn stop_requested(&self) {
        match self {
            Self::Serf(member) => member.stop_requested().await,
            Self::Etcd { .. } => std::future::pending().await,
        }
    }

    /// Stops advertising, within `timeout`: the Serf leave (peers show `left`), or the etcd
    /// lease revoke (the key disappears at once).
    pub(crate) async fn withdraw(&mut self, timeout: Duration) -> anyhow::Result<&'static str> {
        match self {
            Self::Serf(member) => {
                member.leave(timeout).await?;
                Ok("left the cluster, peers show `left`")
            }
            Self::Etcd { stop, task, .. } => {
                stop.cancel();
                tokio::time::timeout(timeout, task)
                    .await
                    .context("revoking the etcd lease took too long")?
                    .context("the etcd registrar failed")?;
                Ok("deregistered from etcd")
            }
        }
    }

    /// Releases what is left (the Serf member's sockets and tasks).
    pub(crate) async fn shutdown(self) {
        match self {
            Self::Serf(member) => member.shutdown().await,
            Self::Etcd { stop, task, .. } => {
                stop.cancel();
                task.abort();
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
        &container_id(),
        &local_ip.to_string(),
        port,
        env!("CARGO_PKG_VERSION"),
    );
    registration.service_addr = advertisement.service_addr.clone();
    registration.ports = advertisement.ports.clone();
    registration.tags = registrar::tags::desired(advertisement, Health::Passing);
    registration
}

/// Inside Docker the hostname is the container ID.
fn container_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// The IP consumers reach us at: `--advertise`'s, else the listen address when it is a specific
/// one, else the address a Serf member would advertise ([`crate::member::advertised_ip`]).
pub(crate) fn local_ip(advertise: Option<IpAddr>, listen: IpAddr) -> IpAddr {
    if let Some(ip) = advertise.filter(|ip| !ip.is_unspecified()) {
        return ip;
    }
    if !listen.is_unspecified() {
        return listen;
    }
    crate::member::advertised_ip()
}

/// One registration in the terms of a member: `(node, ip, port, tags)`.
fn as_member(
    prefix: &Prefix,
    key: &str,
    registration: &Registration,
) -> (String, IpAddr, u16, BTreeMap<String, String>) {
    let (role, node) = prefix.split(key).unwrap_or(("", key));
    let mut tags = registration.tags.clone();
    if !role.is_empty() {
        tags.entry(registrar::tags::ROLE.to_owned())
            .or_insert_with(|| role.to_owned());
    }
    let ip = registration.local_ip.parse::<IpAddr>().ok();
    // Make the shared dial rule (`service` tag, else IP and role port) give this registration's
    // own dial address.
    let dial = registration.dial_addr();
    let shared = ip
        .and_then(|ip| dial_address(ip, &tags))
        .map(|d| d.to_string());
    if shared.as_deref() != Some(dial.as_str()) {
        tags.insert(registrar::tags::SERVICE.to_owned(), dial);
    }
    (
        node.to_owned(),
        ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        registration.port,
        tags,
    )
}

/// The registrations of `snapshot` as RPC member rows (what `members` and `resolve` render).
pub(crate) fn rpc_members(prefix: &Prefix, snapshot: &Snapshot) -> Vec<serf_agent::rpc::Member> {
    snapshot
        .registrations
        .iter()
        .map(|(key, registration)| {
            let (name, addr, port, tags) = as_member(prefix, key, registration);
            serf_agent::rpc::Member {
                name,
                addr,
                port,
                tags,
                status: "alive".to_owned(),
                ..serf_agent::rpc::Member::default()
            }
        })
        .collect()
}

/// The registrations of `snapshot` as Serf members (what `connect` routes to).
pub(crate) fn serf_members(prefix: &Prefix, snapshot: &Snapshot) -> Vec<serf::serf::Member> {
    snapshot
        .registrations
        .iter()
        .map(|(key, registration)| {
            let (name, addr, port, tags) = as_member(prefix, key, registration);
            serf::serf::Member {
                name,
                addr,
                port,
                tags,
                status: serf::serf::MemberStatus::Alive,
                versions: [0; 6],
            }
        })
        .collect()
}

/// Feeds `consumer` every change of the registrations until `shutdown` (etcd's watch, no
/// polling).
pub(crate) async fn follow(
    mut consumer: crate::consumer::Consumer,
    etcd: Etcd,
    shutdown: CancellationToken,
) {
    let mut discovery = etcd.discovery(shutdown.clone());
    let mut synced = false;
    loop {
        let snapshot = discovery.current();
        if snapshot.is_synced() {
            if !synced {
                info!(registrations = snapshot.registrations.len(), "listed etcd");
                synced = true;
            }
            consumer.handle_members(serf_members(&etcd.prefix, &snapshot));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = discovery.changed() => if changed.is_none() {
                warn!("etcd discovery stopped");
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let serf = serf_members(&prefix, &snapshot);
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
