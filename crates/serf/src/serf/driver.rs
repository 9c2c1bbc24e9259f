//! A Serf member on real sockets: the tokio memberlist driver ([`crate::driver`]) with the
//! Serf layer as its delegate. [`start`] binds the gossip address and returns a [`Handle`]
//! for commands and a receiver of [`Event`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), serf::serf::driver::Error> {
//! use serf::serf::{driver, Config, Event, QueryParams};
//!
//! let config = Config { node_name: "web-1".into(), ..Config::default() };
//! let options = serf::driver::Options::new("web-1", "127.0.0.1:7946".parse().unwrap());
//! let (member, mut events) = driver::start(config, options).await?;
//! member.join(&["127.0.0.2:7946".parse().unwrap()], true).await?;
//! member.set_tags([("role".to_owned(), "3306".to_owned())].into()).await?;
//! member.user_event("deploy", b"v2", false).await?;
//! member.query("uptime", b"", QueryParams::default()).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Query(query) => member.respond(query.id, b"up 3 days").await?,
//!         Event::MemberJoin(m) => println!("{} joined", m.name),
//!         _ => {}
//!     }
//! #   break;
//! }
//! member.leave().await?; // peers now show us `left`
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot};

use super::keys::{KeyOperation, KeyReport};
use super::query::{QueryHandle, QueryParams, ResponderId};
use super::state::{Lifecycle, SerfState};
use super::{validate, Config, Event, Member, MemberStatus};
use crate::coordinate::Coordinate;
use crate::memberlist::{Delegate, JoinId, Memberlist, Node};

/// Why a command on a running member failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Serf layer refused the command (nothing changed).
    #[error(transparent)]
    Serf(#[from] super::Error),
    /// The memberlist driver failed to start, or has stopped.
    #[error(transparent)]
    Driver(#[from] crate::driver::Error),
    /// No seed completed a push-pull.
    #[error("join failed: no seed could be contacted: {errors:?}")]
    JoinFailed {
        /// Each seed with its failure.
        errors: Vec<(SocketAddr, String)>,
    },
}

type JoinResult = (usize, Vec<(SocketAddr, String)>);

/// The delegate the memberlist driver owns: the Serf state plus the way out to the
/// application. Delegate calls carry no time, so this (driver-side) wrapper reads the clock.
pub(crate) struct Layer {
    state: SerfState,
    events: mpsc::UnboundedSender<Event>,
    join_waiters: BTreeMap<JoinId, oneshot::Sender<JoinResult>>,
    leave_waiters: Vec<oneshot::Sender<()>>,
    /// Our key queries in progress: their answers are counted here, not published.
    key_queries: BTreeMap<QueryHandle, KeyQuery>,
}

/// A key query of ours: the report so far and who waits for it (until every live member
/// answered or the query timed out).
struct KeyQuery {
    report: KeyReport,
    waiter: Option<oneshot::Sender<KeyReport>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("node", &self.state.config.node_name)
            .finish()
    }
}

impl Layer {
    /// Flushes direct sends into memberlist and events to the application.
    fn after(&mut self, now: Instant, memberlist: &mut Memberlist) {
        self.state.flush(now, memberlist);
        self.publish();
    }

    fn publish(&mut self) {
        let events: Vec<Event> = self.state.events.drain(..).collect();
        for event in events {
            match &event {
                Event::QueryResponse {
                    query,
                    from,
                    payload,
                } if self.key_queries.contains_key(query) => {
                    let key_query = self
                        .key_queries
                        .get_mut(query)
                        .expect("checked by the match guard");
                    key_query.report.count(from, payload);
                    if key_query.report.complete() {
                        if let Some(waiter) = key_query.waiter.take() {
                            let _ = waiter.send(key_query.report.clone());
                        }
                    }
                    continue;
                }
                Event::QueryAck { query, .. } if self.key_queries.contains_key(query) => continue,
                Event::QueryDone { query } if self.key_queries.contains_key(query) => {
                    if let Some(KeyQuery {
                        report,
                        waiter: Some(waiter),
                    }) = self.key_queries.remove(query)
                    {
                        let _ = waiter.send(report);
                    }
                    continue;
                }
                Event::JoinCompleted {
                    join,
                    contacted,
                    errors,
                } => {
                    tracing::info!(contacted, failed = errors.len(), "join finished");
                    if let Some(waiter) = self.join_waiters.remove(join) {
                        let _ = waiter.send((*contacted, errors.clone()));
                    }
                }
                Event::LeaveCompleted => {
                    tracing::info!(node = %self.state.config.node_name, "left the cluster");
                    for waiter in self.leave_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                }
                Event::NameConflict {
                    name,
                    other,
                    responses,
                    matching,
                } => {
                    tracing::error!(%name, %other, responses, matching, "another member owns our node name; serf stopped, pick another name");
                }
                _ => {}
            }
            let _ = self.events.send(event);
        }
    }
}

impl Delegate for Layer {
    fn notify_user_msg(&mut self, message: &[u8]) {
        self.state.now = Instant::now();
        self.state.notify_user_msg(message);
    }

    fn broadcasts(&mut self, overhead: usize, limit: usize) -> Vec<Vec<u8>> {
        self.state.broadcasts(overhead, limit)
    }

    fn local_state(&mut self, join: bool) -> Vec<u8> {
        self.state.local_state(join)
    }

    fn merge_remote_state(&mut self, state: &[u8], join: bool) {
        self.state.now = Instant::now();
        self.state.merge_remote_state(state, join);
    }

    fn ack_payload(&mut self) -> Vec<u8> {
        self.state.ack_payload()
    }

    fn notify_ping_complete(&mut self, node: &Node, rtt: Duration, payload: &[u8]) {
        self.state.notify_ping_complete(node, rtt, payload);
    }

    fn on_event(
        &mut self,
        now: Instant,
        event: &crate::memberlist::Event,
        memberlist: &mut Memberlist,
    ) {
        self.state.handle_memberlist_event(now, event, memberlist);
        self.publish();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // Output queued by a delegate call (query acks, delivered events) is flushed at once.
        if self.state.has_pending_output() {
            return Some(self.state.now);
        }
        self.state.own_timeout()
    }

    fn handle_timeout(&mut self, now: Instant, memberlist: &mut Memberlist) {
        self.state.handle_own_timeout(now, memberlist);
        self.after(now, memberlist);
    }
}

/// Commands to a running Serf member. Cheap to clone; the member stops (without leaving)
/// when every clone is dropped or on [`Handle::shutdown`].
#[derive(Debug, Clone)]
pub struct Handle {
    inner: crate::driver::Handle<Layer>,
}

/// Starts a member: `config.node_name`, tags and protocol version go into `options` (name,
/// meta, versions); `options.bind` is bound for UDP and TCP.
pub async fn start(
    config: Config,
    mut options: crate::driver::Options,
) -> Result<(Handle, mpsc::UnboundedReceiver<Event>), Error> {
    (options.meta, options.vsn) = validate(&config)?;
    options.name = config.node_name.clone();
    let rng = match options.seed {
        Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(1)),
        None => StdRng::from_os_rng(),
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut state = SerfState::new(config, rng, options.config.retransmit_mult, Instant::now());
    state.keyring = options.keyring.clone();
    let layer = Layer {
        state,
        events: events_tx,
        join_waiters: BTreeMap::new(),
        leave_waiters: Vec::new(),
        key_queries: BTreeMap::new(),
    };
    // memberlist's own events are mirrored into the Serf ones; its receiver is not needed.
    let (inner, _memberlist_events) = crate::driver::start(options, layer).await?;
    Ok((Handle { inner }, events))
}

impl Handle {
    /// The gossip address (UDP and TCP) actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    /// Joins through `seeds`; returns how many completed a push-pull. With `ignore_old`,
    /// user events from before the join are not delivered (the agent's default).
    pub async fn join(&self, seeds: &[SocketAddr], ignore_old: bool) -> Result<usize, Error> {
        let seeds = seeds.to_vec();
        let waiter = self
            .run(move |layer, memberlist, now| {
                let join = layer.state.join(now, memberlist, &seeds, ignore_old)?;
                let (tx, rx) = oneshot::channel();
                layer.join_waiters.insert(join, tx);
                Ok(rx)
            })
            .await?;
        let (contacted, errors) = waiter.await.map_err(|_| crate::driver::Error::Stopped)?;
        if contacted > 0 {
            Ok(contacted)
        } else {
            Err(Error::JoinFailed { errors })
        }
    }

    /// Leaves gracefully and waits until done: leave intent gossiped, memberlist leave,
    /// propagation delay. Peers then show this member `left`. The driver keeps running until
    /// [`shutdown`](Self::shutdown) or drop.
    pub async fn leave(&self) -> Result<(), Error> {
        let waiter = self
            .run(|layer, memberlist, now| {
                if layer.state.lifecycle == Lifecycle::Left {
                    return Ok(None);
                }
                layer.state.leave(now, memberlist)?;
                let (tx, rx) = oneshot::channel();
                layer.leave_waiters.push(tx);
                Ok(Some(rx))
            })
            .await?;
        if let Some(waiter) = waiter {
            waiter.await.map_err(|_| crate::driver::Error::Stopped)?;
        }
        Ok(())
    }

    /// Replaces our tags (node meta ≤ 512 bytes encoded).
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), Error> {
        self.run(move |layer, memberlist, now| layer.state.set_tags(now, memberlist, tags))
            .await
    }

    /// Sends a user event (also delivered to our own event stream, as Go does).
    pub async fn user_event(
        &self,
        name: &str,
        payload: &[u8],
        coalesce: bool,
    ) -> Result<(), Error> {
        let (name, payload) = (name.to_owned(), payload.to_vec());
        self.run(move |layer, _, now| layer.state.user_event(now, &name, &payload, coalesce))
            .await
    }

    /// Sends a query; answers come as [`Event::QueryAck`] / [`Event::QueryResponse`] with the
    /// returned handle, then [`Event::QueryDone`].
    pub async fn query(
        &self,
        name: &str,
        payload: &[u8],
        params: QueryParams,
    ) -> Result<QueryHandle, Error> {
        let (name, payload) = (name.to_owned(), payload.to_vec());
        self.run(move |layer, memberlist, now| {
            layer
                .state
                .start_query(now, memberlist, &name, &payload, &params)
        })
        .await
    }

    /// Answers a query delivered as [`Event::Query`].
    pub async fn respond(&self, id: ResponderId, payload: &[u8]) -> Result<(), Error> {
        let payload = payload.to_vec();
        self.run(move |layer, memberlist, now| {
            layer.state.enter(now, memberlist);
            layer.state.respond(id, payload)
        })
        .await
    }

    /// Installs `key` on every member's keyring (`serf keys -install`).
    pub async fn install_key(&self, key: &[u8]) -> Result<KeyReport, Error> {
        self.keys(KeyOperation::Install(key.to_vec())).await
    }

    /// Makes `key` the primary everywhere (`serf keys -use`).
    pub async fn use_key(&self, key: &[u8]) -> Result<KeyReport, Error> {
        self.keys(KeyOperation::Use(key.to_vec())).await
    }

    /// Removes `key` everywhere (`serf keys -remove`).
    pub async fn remove_key(&self, key: &[u8]) -> Result<KeyReport, Error> {
        self.keys(KeyOperation::Remove(key.to_vec())).await
    }

    /// Lists every member's keys (`serf keys -list`).
    pub async fn list_keys(&self) -> Result<KeyReport, Error> {
        self.keys(KeyOperation::List).await
    }

    /// Runs a key operation across the cluster (serf/keymanager.go `handleKeyRequest`): the
    /// internal query goes to every member (we answer our own), answers are counted until
    /// every live member answered or the query times out. [`KeyReport::error`] gives Go's
    /// verdict ("2/3 nodes reported success").
    pub async fn keys(&self, operation: KeyOperation) -> Result<KeyReport, Error> {
        let waiter = self
            .run(move |layer, memberlist, now| {
                let report = KeyReport {
                    num_nodes: memberlist.num_alive(),
                    ..KeyReport::default()
                };
                let handle = layer.state.start_query(
                    now,
                    memberlist,
                    operation.query_name(),
                    &operation.payload(),
                    &QueryParams::default(),
                )?;
                let (tx, rx) = oneshot::channel();
                layer.key_queries.insert(
                    handle,
                    KeyQuery {
                        report,
                        waiter: Some(tx),
                    },
                );
                Ok(rx)
            })
            .await?;
        Ok(waiter.await.map_err(|_| crate::driver::Error::Stopped)?)
    }

    /// Every member Serf knows, ourselves included.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        Ok(self
            .inner
            .with(|_, layer, _| layer.state.members.iter().cloned().collect())
            .await?)
    }

    /// Estimated round trip to `node` from the Vivaldi coordinates, if known.
    pub async fn estimated_rtt(&self, node: &str) -> Result<Option<Duration>, Error> {
        let node = node.to_owned();
        Ok(self
            .inner
            .with(move |_, layer, _| layer.state.estimated_rtt(&node))
            .await?)
    }

    /// Go's `forceLeave` (`serf force-leave`): marks the failed member `node` as `left` and
    /// gossips that; with `prune`, the member is forgotten at once. Unknown names are no-ops.
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<(), Error> {
        let node = node.to_owned();
        self.run(move |layer, memberlist, now| {
            layer.state.enter(now, memberlist);
            layer.state.force_leave(&node, prune);
            Ok(())
        })
        .await
    }

    /// The last Vivaldi coordinate seen for `node` (ours included; `None` when unknown or
    /// coordinates are disabled).
    pub async fn coordinate(&self, node: &str) -> Result<Option<Coordinate>, Error> {
        let node = node.to_owned();
        Ok(self
            .inner
            .with(move |_, layer, _| {
                layer.state.coordinates.as_ref()?;
                layer.state.coordinate_cache.get(&node).cloned()
            })
            .await?)
    }

    /// Go's `Serf.Stats()`: the `serf` section of `serf info`, with Go's keys (`members`,
    /// `failed`, `left`, `health_score`, `member_time`, `event_time`, `query_time`,
    /// `intent_queue`, `event_queue`, `query_queue`, `encrypted`, `coordinate_resets`).
    pub async fn stats(&self) -> Result<BTreeMap<String, String>, Error> {
        Ok(self
            .inner
            .with(|memberlist, layer, _| {
                let state = &layer.state;
                let count =
                    |status: MemberStatus| state.members.with_status(status).count().to_string();
                let mut stats: BTreeMap<String, String> = [
                    ("members", state.members.len().to_string()),
                    ("failed", count(MemberStatus::Failed)),
                    ("left", count(MemberStatus::Left)),
                    ("health_score", memberlist.health_score().to_string()),
                    ("member_time", state.members.clock.time().0.to_string()),
                    ("event_time", state.user_events.clock.time().0.to_string()),
                    ("query_time", state.queries.clock.time().0.to_string()),
                    ("intent_queue", state.intent_queue.len().to_string()),
                    ("event_queue", state.event_queue.len().to_string()),
                    ("query_queue", state.query_queue.len().to_string()),
                    ("encrypted", state.keyring.is_some().to_string()),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect();
                if let Some(client) = &state.coordinates {
                    stats.insert("coordinate_resets".to_owned(), client.resets().to_string());
                }
                stats
            })
            .await?)
    }

    /// memberlist's table (alive, suspect, dead and left nodes not yet dropped) and counters:
    /// what the member knows below the Serf layer, for diagnostics and tests.
    pub async fn memberlist_nodes(
        &self,
    ) -> Result<(Vec<crate::memberlist::Node>, crate::memberlist::Stats), Error> {
        Ok(self
            .inner
            .with(|memberlist, _, _| (memberlist.members().collect(), memberlist.stats().clone()))
            .await?)
    }

    /// Stops the member without leaving (peers will see it fail).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Runs a Serf command in the driver loop, then flushes its output.
    async fn run<T: Send + 'static>(
        &self,
        command: impl FnOnce(&mut Layer, &mut Memberlist, Instant) -> Result<T, super::Error>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let result = self
            .inner
            .with(move |memberlist, layer, now| {
                let result = command(layer, memberlist, now);
                layer.after(now, memberlist);
                result
            })
            .await?;
        Ok(result?)
    }
}
