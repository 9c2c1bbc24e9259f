//! A Serf member on real sockets: the tokio driver ([`crate::driver`]) running the one sans-IO
//! [`Serf`] composition, the same the simulation tests drive. [`start`] binds the gossip
//! address and returns a [`Handle`] for commands and a receiver of [`Event`]s; the handle's
//! waits (join, leave, key operations) are oneshots resolved from the completion events the
//! core emits, by the ids it returned.
//!
//! ```no_run
//! # async fn demo() -> Result<(), serf_agent::member::Error> {
//! use serf::serf::{Config, Event, QueryParams};
//! use serf_agent::member as driver;
//!
//! let config = Config { node_name: "web-1".into(), ..Config::default() };
//! let options = serf_agent::driver::Options::new("web-1", "127.0.0.1:7946".parse().unwrap());
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

use tokio::sync::{mpsc, oneshot};

use crate::snapshot::writer::{self as snapshot_writer, Message};
use crate::snapshot::{Record, Tracker};
use serf::coordinate::Coordinate;
use serf::core::Core;
use serf::memberlist::{JoinId, StreamId, StreamInput, Transmit};
use serf::serf::Lifecycle;
use serf::serf::{Config, Event, Member, Serf};
use serf::serf::{KeyOperation, KeyReport};
use serf::serf::{QueryHandle, QueryParams, ResponderId};
use serf::wire::DecodeError;

/// Why a command on a running member failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Serf layer refused the command (nothing changed).
    #[error(transparent)]
    Serf(#[from] serf::serf::Error),
    /// The memberlist driver failed to start, or has stopped.
    #[error(transparent)]
    Driver(#[from] crate::driver::Error),
    /// No seed completed a push-pull.
    #[error("join failed: no seed could be contacted: {errors:?}")]
    JoinFailed {
        /// Each seed with its failure.
        errors: Vec<(SocketAddr, String)>,
    },
    /// The snapshot file could not be opened or read at start (nothing started).
    #[error(transparent)]
    Snapshot(#[from] snapshot_writer::OpenError),
}

type JoinResult = (usize, Vec<(SocketAddr, String)>);

/// What the driver runs: the one sans-IO [`Serf`] (the composition the simulation tests
/// drive), plus the callers waiting for the completions it emits, keyed by the ids it
/// returned (join, key query) or, for the leave, by the one leave in progress.
pub(crate) struct Running {
    serf: Serf,
    joins: BTreeMap<JoinId, oneshot::Sender<JoinResult>>,
    leaves: Vec<oneshot::Sender<()>>,
    keys: BTreeMap<QueryHandle, oneshot::Sender<KeyReport>>,
    snapshot: Option<Recorder>,
}

/// Feeds the snapshot writer ([`crate::snapshot::writer`]) from the core's events and clock.
struct Recorder {
    tracker: Tracker,
    writer: mpsc::Sender<Message>,
    records: Vec<Record>,
    /// Records dropped since the queue was last found full (warned once per episode).
    dropped: u64,
}

impl Recorder {
    /// Queues the records; with the writer [`QUEUE`](snapshot_writer::QUEUE) behind, drops
    /// them (as Go's snapshotter does) rather than holding what peers make without bound.
    fn send(&mut self) {
        for record in self.records.drain(..) {
            match self.writer.try_send(Message::Record(record)) {
                Ok(()) if self.dropped > 0 => {
                    tracing::warn!(dropped = self.dropped, "snapshot queue drained again");
                    self.dropped = 0;
                }
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if self.dropped == 0 {
                        tracing::warn!(
                            "snapshot queue full: dropping records until the writer catches up"
                        );
                    }
                    self.dropped += 1;
                }
            }
        }
    }
}

impl Running {
    /// Records an event (or, with `None`, only the member clock) in the snapshot.
    fn record(&mut self, event: Option<&Event>) {
        let Some(recorder) = &mut self.snapshot else {
            return;
        };
        let clock = self.serf.clocks().0;
        match event {
            Some(event) => recorder.tracker.event(event, clock, &mut recorder.records),
            None => recorder.tracker.clock(clock, &mut recorder.records),
        }
        recorder.send();
    }
}

impl Core for Running {
    type Event = Event;

    fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), DecodeError> {
        self.serf.handle_packet(now, from, packet)
    }

    fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId {
        self.serf.handle_accept(now, from)
    }

    fn handle_stream(&mut self, now: Instant, stream: StreamId, input: StreamInput<'_>) {
        self.serf.handle_stream(now, stream, input);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.serf.handle_timeout(now);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.serf.poll_transmit()
    }

    fn poll_event(&mut self) -> Option<Event> {
        let Some(event) = self.serf.poll_event() else {
            self.record(None);
            return None;
        };
        self.record(Some(&event));
        match &event {
            Event::MemberJoin(member) => {
                tracing::info!(node = %member.name, addr = %member.socket_addr(), "member joined");
            }
            Event::MemberLeave(member) => tracing::info!(node = %member.name, "member left"),
            Event::MemberFailed(member) => tracing::info!(node = %member.name, "member failed"),
            Event::JoinCompleted {
                join,
                contacted,
                errors,
            } => {
                tracing::info!(contacted, failed = errors.len(), "join finished");
                if let Some(waiter) = self.joins.remove(join) {
                    let _ = waiter.send((*contacted, errors.clone()));
                }
            }
            Event::LeaveCompleted => {
                tracing::info!(node = %self.serf.config().node_name, "left the cluster");
                for waiter in self.leaves.drain(..) {
                    let _ = waiter.send(());
                }
            }
            Event::KeysCompleted { query, report } => {
                if let Some(waiter) = self.keys.remove(query) {
                    let _ = waiter.send(report.clone());
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
        Some(event)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.serf.poll_timeout()
    }
}

/// Commands to a running Serf member. Cheap to clone; the member stops (without leaving)
/// when every clone is dropped or on [`Handle::shutdown`].
#[derive(Debug, Clone)]
pub struct Handle {
    inner: crate::driver::Handle<Running>,
}

/// Starts a member: `config.node_name`, tags and protocol version make the local node
/// (`options.name`, `meta` and `vsn` are not used); `options.bind` is bound for UDP and TCP.
///
/// With `options.snapshot` (`serf agent -snapshot`), the file is read first: the member's
/// clocks continue from it, its events and clock are appended to it while it runs, and the
/// members alive in it are rejoined (one after the other, in random order, until one answers,
/// as Go's `handleRejoin`), unless it ends with our leave and `rejoin_after_leave` is off.
pub async fn start(
    mut config: Config,
    options: crate::driver::Options,
) -> Result<(Handle, mpsc::UnboundedReceiver<Event>), Error> {
    let keyring = options.keyring.clone();
    let mut previous = Vec::new();
    let snapshot = match &options.snapshot {
        Some(snapshot_options) => {
            let opened = snapshot_writer::open(snapshot_options)?;
            let restored = opened.snapshot.clocks();
            config.restored_clocks = Some(restored);
            let members = opened.snapshot.previous_members(&config.node_name);
            previous = members.members;
            for (node, addr) in members.unparsed {
                tracing::warn!(%node, %addr, "snapshot address does not parse, not rejoining it");
            }
            tracing::info!(path = %snapshot_options.path.display(), previous = previous.len(), clock = %restored.member, event_clock = %restored.event, query_clock = %restored.query, "snapshot replayed");
            Some(Recorder {
                tracker: Tracker::new(restored),
                writer: snapshot_writer::spawn(snapshot_options.clone(), opened),
                records: Vec::new(),
                dropped: 0,
            })
        }
        None => None,
    };
    let (inner, events) = crate::driver::spawn(options, move |memberlist, addr, rng, now| {
        let mut serf = Serf::new(config, memberlist, addr, rng, now)?;
        serf.set_keyring(keyring);
        Ok::<_, Error>(Running {
            serf,
            joins: BTreeMap::new(),
            leaves: Vec::new(),
            keys: BTreeMap::new(),
            snapshot,
        })
    })
    .await?;
    let handle = Handle { inner };
    if !previous.is_empty() {
        tokio::spawn(handle.clone().rejoin(previous));
    }
    Ok((handle, events))
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
            .run(move |running, now| {
                let join = running.serf.join(now, &seeds, ignore_old)?;
                let (tx, rx) = oneshot::channel();
                running.joins.insert(join, tx);
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

    /// Rejoins the members of a previous run (from the snapshot), in random order, until one
    /// answers.
    async fn rejoin(self, mut previous: Vec<(String, SocketAddr)>) {
        use rand::seq::SliceRandom;
        previous.shuffle(&mut rand::rng());
        for (node, addr) in previous {
            tracing::info!(%node, %addr, "rejoining a previously known member");
            match self.join(&[addr], false).await {
                Ok(_) => {
                    tracing::info!(%node, %addr, "rejoined a previously known member");
                    return;
                }
                Err(error) => tracing::debug!(%node, %addr, %error, "rejoin failed"),
            }
        }
        tracing::warn!("failed to rejoin any previously known member");
    }

    /// Leaves gracefully and waits until done: leave intent gossiped, memberlist leave,
    /// propagation delay. Peers then show this member `left`. The driver keeps running until
    /// [`shutdown`](Self::shutdown) or drop. With a snapshot, its `leave` line is on disk
    /// before this returns.
    pub async fn leave(&self) -> Result<(), Error> {
        let (waiter, mut snapshot) = self
            .run(|running, now| {
                if running.serf.lifecycle() == Lifecycle::Left {
                    return Ok((None, None));
                }
                running.serf.leave(now)?;
                // The `leave` line is never dropped: it is sent below, waiting for room.
                let snapshot = running.snapshot.as_mut().map(|recorder| {
                    let mut records = Vec::new();
                    recorder.tracker.leave(&mut records);
                    (recorder.writer.clone(), records)
                });
                let (tx, rx) = oneshot::channel();
                running.leaves.push(tx);
                Ok((Some(rx), snapshot))
            })
            .await?;
        if let Some((writer, records)) = &mut snapshot {
            for record in std::mem::take(records) {
                let _ = writer.send(Message::Record(record)).await;
            }
        }
        if let Some(waiter) = waiter {
            waiter.await.map_err(|_| crate::driver::Error::Stopped)?;
        }
        if let Some((writer, _)) = snapshot {
            let (tx, synced) = oneshot::channel();
            if writer.send(Message::Sync(tx)).await.is_ok() {
                let _ = synced.await;
            }
        }
        Ok(())
    }

    /// Replaces our tags (node meta ≤ 512 bytes encoded).
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), Error> {
        self.run(move |running, now| running.serf.set_tags(now, tags))
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
        self.run(move |running, now| running.serf.user_event(now, &name, &payload, coalesce))
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
        self.run(move |running, now| running.serf.query(now, &name, &payload, &params))
            .await
    }

    /// Answers a query delivered as [`Event::Query`].
    pub async fn respond(&self, id: ResponderId, payload: &[u8]) -> Result<(), Error> {
        let payload = payload.to_vec();
        self.run(move |running, now| running.serf.respond(now, id, &payload))
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

    /// Runs a key operation across the cluster ([`Serf::keys`]) and waits for its report.
    /// [`KeyReport::error`] gives Go's verdict ("2/3 nodes reported success").
    pub async fn keys(&self, operation: KeyOperation) -> Result<KeyReport, Error> {
        let waiter = self
            .run(move |running, now| {
                let query = running.serf.keys(now, &operation)?;
                let (tx, rx) = oneshot::channel();
                running.keys.insert(query, tx);
                Ok(rx)
            })
            .await?;
        Ok(waiter.await.map_err(|_| crate::driver::Error::Stopped)?)
    }

    /// Every member Serf knows, ourselves included.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        Ok(self
            .inner
            .with(|running, _| running.serf.members().cloned().collect())
            .await?)
    }

    /// Estimated round trip to `node` from the Vivaldi coordinates, if known.
    pub async fn estimated_rtt(&self, node: &str) -> Result<Option<Duration>, Error> {
        let node = node.to_owned();
        Ok(self
            .inner
            .with(move |running, _| running.serf.estimated_rtt(&node))
            .await?)
    }

    /// Go's `forceLeave` (`serf force-leave`): marks the failed member `node` as `left` and
    /// gossips that; with `prune`, the member is forgotten at once. Unknown names are no-ops.
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<(), Error> {
        let node = node.to_owned();
        self.run(move |running, now| {
            running.serf.force_leave(now, &node, prune);
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
            .with(move |running, _| {
                running.serf.coordinate()?;
                running.serf.cached_coordinate(&node).cloned()
            })
            .await?)
    }

    /// Go's `Serf.Stats()` ([`Serf::stats`]): the `serf` section of `serf info`.
    pub async fn stats(&self) -> Result<BTreeMap<String, String>, Error> {
        Ok(self.inner.with(|running, _| running.serf.stats()).await?)
    }

    /// memberlist's table (alive, suspect, dead and left nodes not yet dropped) and counters:
    /// what the member knows below the Serf layer, for diagnostics and tests.
    pub async fn memberlist_nodes(
        &self,
    ) -> Result<(Vec<serf::memberlist::Node>, serf::memberlist::Stats), Error> {
        Ok(self
            .inner
            .with(|running, _| {
                let memberlist = running.serf.memberlist();
                (memberlist.members().collect(), memberlist.stats().clone())
            })
            .await?)
    }

    /// Stops the member without leaving (peers will see it fail).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Runs a Serf command in the driver loop; its output is flushed right after.
    async fn run<T: Send + 'static>(
        &self,
        command: impl FnOnce(&mut Running, Instant) -> Result<T, serf::serf::Error> + Send + 'static,
    ) -> Result<T, Error> {
        Ok(self.inner.with(command).await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serf::serf::LamportTime;

    /// A writer that falls behind costs at most its queue: further records are dropped and
    /// counted, and the count ends once the queue takes a record again.
    #[test]
    fn a_full_snapshot_queue_drops_records() {
        let (writer, mut queue) = mpsc::channel(2);
        let mut recorder = Recorder {
            tracker: Tracker::default(),
            writer,
            records: (1..=5).map(|n| Record::Clock(LamportTime(n))).collect(),
            dropped: 0,
        };
        recorder.send();
        assert_eq!(recorder.dropped, 3);
        assert!(recorder.records.is_empty());
        assert!(matches!(
            queue.try_recv(),
            Ok(Message::Record(Record::Clock(LamportTime(1))))
        ));
        recorder.records.push(Record::Clock(LamportTime(6)));
        recorder.send();
        assert_eq!(recorder.dropped, 0);
    }
}
