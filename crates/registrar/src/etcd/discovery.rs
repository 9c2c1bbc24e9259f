//! The registrations under a prefix, listed once and then followed with a watch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use super::client::{Client, Event, KeyValue};
use super::registration::Registration;
use crate::backoff::Backoff;

/// The registrations under a prefix at one etcd revision, keyed by etcd key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision this reflects; 0 until the prefix has been listed once.
    pub revision: i64,
    /// Our registrations; values that are not ours are left out.
    pub registrations: Arc<BTreeMap<String, Registration>>,
}

impl Snapshot {
    /// Whether the prefix has been listed at least once (an empty set means "none" only then).
    pub fn is_synced(&self) -> bool {
        self.revision > 0
    }
}

/// The current set of registrations under a prefix, kept up to date by a background task.
///
/// The task lists the prefix, then watches it from the next revision (etcd pushes changes; no
/// polling). When the watch breaks (etcd restarted, the connection dropped, the revision was
/// compacted) it lists again and watches from the new revision, retrying with backoff while
/// etcd is unreachable. Values that are not [`Registration`]s are skipped with a warning.
#[derive(Debug, Clone)]
pub struct Watcher {
    snapshots: watch::Receiver<Snapshot>,
}

impl Watcher {
    /// Starts following `prefix` (e.g. [`super::Prefix::role`]) on the current tokio runtime,
    /// until `shutdown` is cancelled.
    pub fn spawn(client: Client, prefix: String, shutdown: CancellationToken) -> Self {
        let (sender, snapshots) = watch::channel(Snapshot::default());
        tokio::spawn(follow(client, prefix, sender, shutdown));
        Self { snapshots }
    }

    /// The latest snapshot.
    pub fn current(&self) -> Snapshot {
        self.snapshots.borrow().clone()
    }

    /// Waits for the next change and returns the snapshot after it; `None` once the task has
    /// stopped (shutdown).
    pub async fn changed(&mut self) -> Option<Snapshot> {
        self.snapshots.changed().await.ok()?;
        Some(self.snapshots.borrow_and_update().clone())
    }

    /// Waits until `condition` holds for a snapshot (checking the current one first) and
    /// returns that snapshot; `None` if the task stopped first.
    pub async fn wait_for(
        &mut self,
        mut condition: impl FnMut(&Snapshot) -> bool,
    ) -> Option<Snapshot> {
        self.snapshots
            .wait_for(|snapshot| condition(snapshot))
            .await
            .ok()
            .map(|snapshot| snapshot.clone())
    }
}

#[instrument(name = "etcd_discovery", skip_all, fields(%prefix))]
async fn follow(
    client: Client,
    prefix: String,
    sender: watch::Sender<Snapshot>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let attempt = async {
            let (kvs, revision) = client.range_prefix(&prefix).await?;
            let registrations: BTreeMap<_, _> = kvs.into_iter().filter_map(decode).collect();
            let watch = client.watch_prefix(&prefix, revision + 1).await?;
            Ok::<_, super::Error>((registrations, revision, watch))
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = attempt => result,
        };
        let (mut registrations, revision, mut watch) = match result {
            Ok(listed) => listed,
            Err(error) => {
                let delay = backoff.next_delay();
                if backoff.should_log() {
                    warn!(%error, failures = backoff.failures(), retry_in = ?delay, "etcd unreachable, retrying");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if backoff.failures() > 0 {
            info!(failures = backoff.failures(), "etcd reachable again");
        }
        backoff.reset();
        debug!(
            revision,
            n_registrations = registrations.len(),
            endpoint = watch.endpoint(),
            "listed; watching"
        );
        publish(&sender, revision, &registrations);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = watch.next() => next,
            };
            match next {
                Ok(Some((events, revision))) => {
                    for event in events {
                        apply(&mut registrations, event);
                    }
                    publish(&sender, revision, &registrations);
                }
                Ok(None) => {
                    info!("etcd ended the watch; listing again");
                    break;
                }
                Err(error) => {
                    warn!(%error, "watch broken; listing again");
                    break;
                }
            }
        }
    }
}

fn decode(kv: KeyValue) -> Option<(String, Registration)> {
    match Registration::from_json(&kv.key, &kv.value) {
        Ok(registration) => Some((kv.key, registration)),
        Err(error) => {
            warn!(%error, "skipping a value that is not a registration");
            None
        }
    }
}

fn apply(registrations: &mut BTreeMap<String, Registration>, event: Event) {
    match event {
        Event::Put(kv) => {
            let key = kv.key.clone();
            match decode(kv) {
                Some((key, registration)) => {
                    registrations.insert(key, registration);
                }
                None => {
                    registrations.remove(&key);
                }
            }
        }
        Event::Delete { key, .. } => {
            registrations.remove(&key);
        }
    }
}

/// Publishes a new snapshot when the set changed (or on the first listing), so waiters wake
/// only for real changes.
fn publish(
    sender: &watch::Sender<Snapshot>,
    revision: i64,
    registrations: &BTreeMap<String, Registration>,
) {
    sender.send_if_modified(|snapshot| {
        let changed = !snapshot.is_synced() || *snapshot.registrations != *registrations;
        snapshot.revision = revision;
        if changed {
            snapshot.registrations = Arc::new(registrations.clone());
        }
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Event {
        Event::Put(KeyValue {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        })
    }

    const OURS: &str = r#"{"container_id":"a","local_ip":"10.0.0.2","port":6379,"version":"1"}"#;

    #[test]
    fn events_update_the_set_and_foreign_values_are_skipped() {
        let mut registrations = BTreeMap::new();
        apply(&mut registrations, put("/s/6379/a", OURS));
        apply(&mut registrations, put("/s/6379/b", "not json"));
        assert_eq!(registrations.keys().collect::<Vec<_>>(), ["/s/6379/a"]);
        apply(&mut registrations, put("/s/6379/a", "{}"));
        assert!(
            registrations.is_empty(),
            "a key overwritten with a foreign value is dropped"
        );
        apply(&mut registrations, put("/s/6379/a", OURS));
        apply(
            &mut registrations,
            Event::Delete {
                key: "/s/6379/a".to_owned(),
                mod_revision: 3,
            },
        );
        assert!(registrations.is_empty());
    }

    #[test]
    fn publishes_only_changes_after_the_first_listing() {
        let (sender, mut receiver) = watch::channel(Snapshot::default());
        let mut registrations = BTreeMap::new();
        publish(&sender, 5, &registrations);
        assert!(receiver.has_changed().expect("open"));
        assert!(receiver.borrow_and_update().is_synced());
        publish(&sender, 6, &registrations);
        assert!(!receiver.has_changed().expect("open"), "nothing changed");
        apply(&mut registrations, put("/s/6379/a", OURS));
        publish(&sender, 7, &registrations);
        assert!(receiver.has_changed().expect("open"));
        assert_eq!(receiver.borrow().registrations.len(), 1);
    }
}
