//! The Serf registrar: a running Serf member ([`LocalMember`]) that joins, advertises through
//! its tags and discovers through its events.
//!
//! [`start`] starts the native member (Serf protocol 5, like the agent) from plain
//! [`Settings`] (the binary turns its flags into them), the RPC server on it (streaming the log
//! ring the caller passes), the event handlers ([`serf_agent::handlers`]) and the join loop
//! ([`join`]: with no seed the member is a cluster of one and says so; otherwise it retries
//! until a seed answers, and rejoins whenever every peer is gone). The returned
//! [`LocalMember`] is the handle callers keep; it is the Serf [`Advertiser`] (health-gated
//! tags, the leave on stop, `serf leave` over RPC as a stop request) and gives a
//! [`SerfDiscovery`].
//!
//! ```text
//! let member = registrar::serf::start(settings, logs).await?;
//! let mut events = member.subscribe();                 // any number of consumers
//! member.set_tags(new_complete_tag_set).await?;        // e.g. on a health change
//! member.leave(Duration::from_secs(10)).await?;        // peers see `left`
//! member.shutdown().await;                             // RPC server, handlers, join loop, gossip
//! ```

mod discovery;
mod join;
pub mod seeds;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serf::serf::Event;
use serf::wire::crypto::SharedKeyring;
use serf_agent::handlers::{self, Handler, HandlerEvent, SelfInfo};
use serf_agent::member as driver;
use serf_agent::rpc::agent::{AgentInfo, LogRing, MemberBackend};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::advertise::{Advertiser, BoxError, BoxFuture};
use crate::tags::{Advertisement, Health};

pub use discovery::SerfDiscovery;
pub use join::SERF_PORT;

/// How to run a member: what the binary's flags say, as plain values.
#[derive(Debug)]
pub struct Settings {
    /// Our node name.
    pub node_name: String,
    /// Gossip address, UDP and TCP.
    pub bind: SocketAddr,
    /// Address other members reach us at (port 0: the port bound); see [`advertise_for`].
    pub advertise: Option<SocketAddr>,
    /// memberlist's timing (`lan`, `wan`, `local`).
    pub memberlist: serf::memberlist::Config,
    /// The gossip keyring; `None`: plaintext gossip.
    pub keyring: Option<SharedKeyring>,
    /// Replay past user events on join.
    pub replay: bool,
    /// The complete initial tag set.
    pub tags: BTreeMap<String, String>,
    /// `HOST[:PORT]` seeds to join (none: a cluster of one).
    pub seeds: Vec<String>,
    /// A JSON file kept equal to our tags (`serf agent -tags-file`).
    pub tags_file: Option<PathBuf>,
    /// The RPC server, if it runs.
    pub rpc: Option<Rpc>,
    /// Event handlers (replaceable later, [`LocalMember::set_event_handlers`]).
    pub handlers: Vec<Handler>,
    /// The handler specifications, as the RPC `stats` reports them.
    pub handler_specs: Vec<String>,
    /// Extra environment for event handlers (e.g. `AMB_BACKEND_HOST`).
    pub handler_env: Vec<(String, String)>,
    /// Go's snapshot file (`serf agent -snapshot`, `-rejoin`): clocks restored, previous
    /// members rejoined.
    pub snapshot: Option<serf_agent::snapshot::Options>,
}

/// The RPC server on the member.
#[derive(Debug)]
pub struct Rpc {
    /// Where it listens (bound by the caller, so a busy port fails there).
    pub listener: tokio::net::TcpListener,
    /// The auth key clients must send.
    pub auth: Option<String>,
}

/// Why a member could not start or do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Serf configuration was refused (e.g. tags over the meta limit); nothing started.
    #[error("{0}")]
    Config(serf::serf::Error),
    /// The member could not start (e.g. the gossip port is busy); nothing started.
    #[error("starting the serf member on {bind}")]
    Start {
        /// The gossip address.
        bind: SocketAddr,
        /// Why.
        #[source]
        source: driver::Error,
    },
    /// The RPC listener's address could not be read; nothing started.
    #[error("reading the rpc address")]
    RpcAddr(#[source] std::io::Error),
    /// The tags file could not be written (the tags themselves are set).
    #[error("writing --tags-file {path}")]
    TagsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting tags failed; our tags are unchanged.
    #[error("setting tags")]
    SetTags(#[source] driver::Error),
    /// The leave failed.
    #[error("leaving the cluster")]
    Leave(#[source] driver::Error),
    /// The leave did not complete in time.
    #[error("leaving the cluster took longer than {0:?}")]
    LeaveTimeout(Duration),
    /// The member refused a command or has stopped.
    #[error(transparent)]
    Member(#[from] driver::Error),
}

/// The advertised address for `bound`: `advertise` (its port 0 meaning `bound`'s), else the
/// bound address, or [`crate::address::advertised_ip`] when bound to every address.
pub fn advertise_for(advertise: Option<SocketAddr>, bound: SocketAddr) -> SocketAddr {
    let ip = match advertise {
        Some(advertise) if advertise.port() != 0 => return advertise,
        Some(advertise) => advertise.ip(),
        None if bound.ip().is_unspecified() => crate::address::advertised_ip(),
        None => bound.ip(),
    };
    SocketAddr::new(ip, bound.port())
}

/// A running member. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalMember {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handle: driver::Handle,
    name: String,
    rpc_addr: Option<SocketAddr>,
    events: broadcast::Sender<Event>,
    joined: watch::Receiver<bool>,
    tags: Mutex<BTreeMap<String, String>>,
    tags_file: Option<PathBuf>,
    /// The event handlers in force (replaced on SIGHUP, [`LocalMember::set_event_handlers`]).
    handlers: watch::Sender<Arc<Vec<Handler>>>,
    /// The RPC side, which lists the handlers in `serf info`.
    backend: Arc<MemberBackend>,
    shutdown: CancellationToken,
    stop_requested: CancellationToken,
    tasks: TaskTracker,
}

/// Starts the member; `logs` is the ring `serf monitor` streams over RPC.
pub async fn start(settings: Settings, logs: Arc<LogRing>) -> Result<LocalMember, Error> {
    let Settings {
        node_name: name,
        bind,
        advertise,
        memberlist,
        keyring,
        replay,
        tags,
        seeds,
        tags_file,
        rpc,
        handlers,
        handler_specs,
        handler_env,
        snapshot,
    } = settings;
    let encrypted = keyring.is_some();
    let config = serf::serf::Config {
        node_name: name.clone(),
        tags: tags.clone(),
        protocol_version: 5,
        ..serf::serf::Config::default()
    };
    let mut options = serf_agent::driver::Options::new(name.clone(), bind);
    options.advertise = Some(advertise_for(advertise, bind));
    options.config = memberlist;
    options.keyring = keyring;
    let has_snapshot = snapshot.is_some();
    options.snapshot = snapshot;
    let gossip_interval = options.config.gossip_interval;
    let query_timeout_mult = config.query_timeout_mult;
    let (handle, mut layer_events) =
        driver::start(config, options)
            .await
            .map_err(|error| match error {
                driver::Error::Serf(serf) => Error::Config(serf),
                other => Error::Start {
                    bind,
                    source: other,
                },
            })?;
    let bound = handle.local_addr();
    let advertised = advertise_for(advertise, bound);
    info!(node = %name, %bound, advertise = %advertised, encrypted, "serf member started");

    let shutdown = CancellationToken::new();
    let stop_requested = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (events, _) = broadcast::channel(1024);
    let (joined_tx, joined) = watch::channel(false);

    let backend = Arc::new(MemberBackend::new(
        handle.clone(),
        AgentInfo {
            node_name: name.clone(),
            event_handlers: handler_specs,
            gossip_interval,
            query_timeout_mult,
        },
        logs,
        stop_requested.clone(),
    ));
    let rpc_addr = match rpc {
        Some(Rpc { listener, auth }) => {
            let addr = listener.local_addr().map_err(Error::RpcAddr)?;
            if !addr.ip().is_loopback() && auth.as_deref().unwrap_or_default().is_empty() {
                warn!(%addr, "rpc is reachable beyond loopback without --rpc-auth: anyone who can connect can control this member");
            }
            let server = serf_agent::rpc::Server::new(
                Arc::clone(&backend),
                serf_agent::rpc::Config {
                    auth_key: auth,
                    ..serf_agent::rpc::Config::default()
                },
            );
            tasks.spawn(server.serve(listener, shutdown.child_token()));
            info!(%addr, "rpc server listening");
            Some(addr)
        }
        None => None,
    };

    let member = LocalMember {
        inner: Arc::new(Inner {
            handle,
            name,
            rpc_addr,
            events,
            joined,
            tags: Mutex::new(tags),
            tags_file,
            handlers: watch::channel(Arc::new(Vec::new())).0,
            backend: Arc::clone(&backend),
            shutdown,
            stop_requested,
            tasks,
        }),
    };
    // Fan-out of the member's events: the RPC backend and every subscriber. Our own tag
    // changes (also those made over RPC, `serf tags`) are recorded here.
    let fanout = member.clone();
    let token = member.inner.shutdown.clone();
    member.inner.tasks.spawn(async move {
        loop {
            let event = tokio::select! {
                () = token.cancelled() => break,
                event = layer_events.recv() => event,
            };
            let Some(event) = event else { break };
            backend.handle_event(&event);
            if let Event::MemberUpdate(updated) = &event {
                if updated.name == fanout.inner.name {
                    fanout.record_tags(updated.tags.clone());
                }
            }
            let _ = fanout.inner.events.send(event);
        }
    });
    member.spawn_join_loop(seeds, !replay, joined_tx, has_snapshot);
    member.write_tags_file()?;
    member.spawn_handlers(handlers, handler_env);
    Ok(member)
}

impl LocalMember {
    /// Our node name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where the RPC server listens, if it runs.
    pub fn rpc_addr(&self) -> Option<SocketAddr> {
        self.inner.rpc_addr
    }

    /// Replaces our tags with `tags` (the complete set).
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), Error> {
        self.inner
            .handle
            .set_tags(tags.clone())
            .await
            .map_err(Error::SetTags)?;
        *self.inner.tags.lock().expect("tags lock is never poisoned") = tags;
        self.write_tags_file()
    }

    /// Our current tags as last set through this handle.
    pub fn tags(&self) -> BTreeMap<String, String> {
        self.inner
            .tags
            .lock()
            .expect("tags lock is never poisoned")
            .clone()
    }

    /// Every event of the member from now on (membership, user events, queries, join and
    /// leave completion). A consumer that falls behind by 1024 events gets `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Every member we know, ourselves included.
    pub async fn members(&self) -> Result<Vec<serf::serf::Member>, Error> {
        Ok(self.inner.handle.members().await?)
    }

    /// Resolves when the first join completed (a push-pull with a seed merged its state).
    /// Never resolves for a cluster of one.
    pub async fn joined(&self) {
        let mut joined = self.inner.joined.clone();
        let _ = joined.wait_for(|joined| *joined).await;
    }

    /// Resolves when an RPC client asked the member to stop (`serf leave`).
    pub async fn stop_requested(&self) {
        self.inner.stop_requested.cancelled().await;
    }

    /// Leaves gracefully (peers see `left`), bounded by `timeout`.
    pub async fn leave(&self, timeout: Duration) -> Result<(), Error> {
        match tokio::time::timeout(timeout, self.inner.handle.leave()).await {
            Ok(result) => result.map_err(Error::Leave),
            Err(_) => Err(Error::LeaveTimeout(timeout)),
        }
    }

    /// Stops everything (RPC server, handlers, join loop, the member) and waits for the tasks.
    /// Call [`leave`](Self::leave) first so peers see `left` rather than `failed`.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
        self.inner.handle.shutdown();
    }

    fn record_tags(&self, tags: BTreeMap<String, String>) {
        *self.inner.tags.lock().expect("tags lock is never poisoned") = tags;
        if let Err(error) = self.write_tags_file() {
            warn!(error = %crate::advertise::chain(&error), "tags changed");
        }
    }

    /// Keeps the tags file equal to our tags, as `serf agent -tags-file` does.
    fn write_tags_file(&self) -> Result<(), Error> {
        let Some(path) = &self.inner.tags_file else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&self.tags()).expect("string maps encode");
        std::fs::write(path, text).map_err(|source| Error::TagsFile {
            path: path.display().to_string(),
            source,
        })
    }

    /// This member's view as a [`Discovery`](crate::discovery::Discovery): its member list,
    /// then its membership events.
    pub fn discovery(&self) -> SerfDiscovery {
        SerfDiscovery::new(self.inner.events.clone(), self.inner.handle.clone())
    }

    /// Replaces the event handlers (`serf agent` reloads them on SIGHUP); the next event
    /// runs the new ones, and `serf info` lists `specs`.
    pub fn set_event_handlers(&self, handlers: Vec<Handler>, specs: Vec<String>) {
        self.inner.handlers.send_replace(Arc::new(handlers));
        self.inner.backend.set_event_handlers(specs);
    }

    fn spawn_handlers(&self, handlers: Vec<Handler>, extra_env: Vec<(String, String)>) {
        self.inner.handlers.send_replace(Arc::new(handlers));
        let current = self.inner.handlers.subscribe();
        let mut events = self.subscribe();
        let member = self.clone();
        let token = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            while let Some(event) =
                serf_agent::events::next(&mut events, &token, "the event handlers").await
            {
                let handlers = Arc::clone(&current.borrow());
                if handlers.is_empty() {
                    continue;
                }
                let Some((handler_event, responder)) = HandlerEvent::from_event(&event) else {
                    continue;
                };
                let me = SelfInfo {
                    name: member.name().to_owned(),
                    tags: member.tags(),
                    extra_env: extra_env.clone(),
                };
                let output = handlers::dispatch(&handlers, &me, &handler_event).await;
                if let (Some(id), Some(output)) = (responder, output) {
                    if let Err(error) = member.inner.handle.respond(id, &output).await {
                        warn!(%error, "query response from the event handler refused");
                    }
                }
            }
        });
    }

    fn spawn_join_loop(
        &self,
        seeds: Vec<String>,
        ignore_old: bool,
        joined: watch::Sender<bool>,
        snapshot: bool,
    ) {
        if seeds.is_empty() {
            if snapshot {
                info!("no seed to join (no --join, no Serf link variable, link name or /etc/hosts entry): only the snapshot's members are rejoined");
            } else {
                info!(
                    "no seed to join (no --join, no Serf link variable, link name or /etc/hosts entry): running as a cluster of one"
                );
            }
            return;
        }
        let join = join::JoinLoop {
            handle: self.inner.handle.clone(),
            name: self.inner.name.clone(),
            seeds,
            ignore_old,
            events: self.subscribe(),
            joined,
        };
        self.inner
            .tasks
            .spawn(join.run(self.inner.shutdown.clone()));
    }
}

/// The Serf side of advertising: health-gated tags (`set_tags`, keeping the tags others set),
/// the leave on stop, `serf leave` over RPC as a stop request.
impl Advertiser for LocalMember {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn follow_health(
        &self,
        advertisement: Advertisement,
        applied: Option<BTreeMap<String, String>>,
        health: watch::Receiver<Health>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let member = self.clone();
        Box::pin(crate::advertise::apply_tags(
            advertisement,
            applied,
            health,
            move |tags| {
                let member = member.clone();
                let tags = crate::advertisement::with_current_extras(tags, member.tags());
                async move {
                    member
                        .set_tags(tags)
                        .await
                        .map_err(|e| crate::advertise::chain(&e))
                }
            },
            stop,
        ))
    }

    fn stop_requested(&self) -> BoxFuture<'_, ()> {
        Box::pin(Self::stop_requested(self))
    }

    fn withdraw(&mut self, timeout: Duration) -> BoxFuture<'_, Result<&'static str, BoxError>> {
        Box::pin(async move {
            self.leave(timeout)
                .await
                .map_err(|error| BoxError::from(crate::advertise::chain(&error)))?;
            Ok("left the cluster, peers show `left`")
        })
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { Self::shutdown(&self).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address() {
        let check = |advertise: Option<&str>, bound: &str, expected: &str| {
            let advertised = advertise_for(
                advertise.map(|addr| addr.parse().unwrap()),
                bound.parse().unwrap(),
            );
            assert_eq!(
                advertised,
                expected.parse().unwrap(),
                "{advertise:?} {bound}"
            );
        };
        check(None, "127.0.0.2:7946", "127.0.0.2:7946");
        // `--advertise 10.0.0.5` is parsed as port 0: the bound port.
        check(Some("10.0.0.5:0"), "0.0.0.0:7946", "10.0.0.5:7946");
        check(Some("10.0.0.5:9000"), "0.0.0.0:7946", "10.0.0.5:9000");
    }
}
