//! etcd behind the crate's traits: a [`Lease`] is an [`Advertiser`], an [`EtcdDiscovery`] a
//! [`Discovery`] whose registrations read as Serf members ([`as_member`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serf::serf::{Member, MemberStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Client, Prefix, Registrar, Registration, Snapshot, Watcher};
use crate::advertise::{Advertiser, BoxError, BoxFuture};
use crate::discovery::{Change, Changes, Discovery};
use crate::tags::{Advertisement, Health, ROLE, SERVICE};
use crate::targets::dial_address;

/// An etcd registration kept alive by a lease while the backend is not critical; withdrawing
/// revokes the lease (the key disappears at once).
#[derive(Debug)]
pub struct Lease {
    node: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Lease {
    /// Starts registering `registration` under `<prefix>/<role>/<node>` with a lease of `ttl`,
    /// following `health`.
    pub fn start(
        client: Client,
        key: String,
        node: &str,
        registration: &Registration,
        ttl: Duration,
        mut health: watch::Receiver<Health>,
    ) -> Self {
        let healthy = |health: Health| health != Health::Critical;
        let (healthy_tx, healthy_rx) = watch::channel(healthy(*health.borrow_and_update()));
        // The one health loop feeds every applier; this one only translates its values.
        tokio::spawn(async move {
            while health.changed().await.is_ok() {
                healthy_tx.send_replace(healthy(*health.borrow_and_update()));
            }
        });
        let stop = CancellationToken::new();
        info!(%key, endpoints = %client.endpoints(), ?ttl, "registering in etcd");
        let registrar = Registrar::new(client, key, registration, ttl);
        let task = tokio::spawn(registrar.run(healthy_rx, stop.clone()));
        Self {
            node: node.to_owned(),
            stop,
            task,
        }
    }
}

impl Advertiser for Lease {
    fn name(&self) -> &str {
        &self.node
    }

    fn follow_health(
        &self,
        _: Advertisement,
        _: Option<BTreeMap<String, String>>,
        _: watch::Receiver<Health>,
        _: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        // The registrar task follows health itself.
        Box::pin(std::future::ready(()))
    }

    fn withdraw(&mut self, timeout: Duration) -> BoxFuture<'_, Result<&'static str, BoxError>> {
        Box::pin(async move {
            self.stop.cancel();
            match tokio::time::timeout(timeout, &mut self.task).await {
                Err(_) => Err("revoking the etcd lease took too long".into()),
                Ok(Err(error)) => Err(format!("the etcd registrar failed: {error}").into()),
                Ok(Ok(())) => Ok("deregistered from etcd"),
            }
        })
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.stop.cancel();
        self.task.abort();
        Box::pin(std::future::ready(()))
    }
}

/// The registrations under a prefix, as members.
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    client: Client,
    prefix: Prefix,
    shutdown: CancellationToken,
}

impl EtcdDiscovery {
    /// Follows every registration under `prefix` until `shutdown`.
    pub fn new(client: Client, prefix: Prefix, shutdown: CancellationToken) -> Self {
        Self {
            client,
            prefix,
            shutdown,
        }
    }
}

impl Discovery for EtcdDiscovery {
    fn changes(&self) -> Box<dyn Changes> {
        let watcher = Watcher::spawn(
            self.client.clone(),
            self.prefix.all(),
            self.shutdown.clone(),
        );
        Box::new(EtcdChanges {
            watcher,
            prefix: self.prefix.clone(),
            synced: false,
            first: true,
        })
    }

    fn source(&self) -> String {
        format!("the etcd watch of {}", self.prefix.all())
    }
}

struct EtcdChanges {
    watcher: Watcher,
    prefix: Prefix,
    synced: bool,
    first: bool,
}

impl EtcdChanges {
    async fn next_change(&mut self) -> Option<Change> {
        loop {
            let snapshot = if std::mem::take(&mut self.first) {
                self.watcher.current()
            } else {
                let Some(snapshot) = self.watcher.changed().await else {
                    warn!("etcd discovery stopped");
                    return None;
                };
                snapshot
            };
            if snapshot.is_synced() {
                if !std::mem::replace(&mut self.synced, true) {
                    info!(registrations = snapshot.registrations.len(), "listed etcd");
                }
                return Some(Change::Snapshot(members(&self.prefix, &snapshot)));
            }
        }
    }
}

impl Changes for EtcdChanges {
    fn next(&mut self) -> BoxFuture<'_, Option<Change>> {
        Box::pin(self.next_change())
    }
}

/// The registrations of `snapshot` as members.
pub fn members(prefix: &Prefix, snapshot: &Snapshot) -> Vec<Member> {
    snapshot
        .registrations
        .iter()
        .map(|(key, registration)| as_member(prefix, key, registration))
        .collect()
}

/// One registration as a member: name = node, address = `local_ip` and `port`, status alive,
/// tags = the registration's (its role taken from the key when missing, a `service` tag when
/// its dial address needs one).
pub fn as_member(prefix: &Prefix, key: &str, registration: &Registration) -> Member {
    let (role, node) = prefix.split(key).unwrap_or(("", key));
    let mut tags = registration.tags.clone();
    if !role.is_empty() {
        tags.entry(ROLE.to_owned())
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
        tags.insert(SERVICE.to_owned(), dial);
    }
    Member {
        name: node.to_owned(),
        addr: ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        port: registration.port,
        tags,
        status: MemberStatus::Alive,
        versions: [0; 6],
    }
}
