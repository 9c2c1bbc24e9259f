//! Advertising: the [`Advertiser`] trait both registries implement, and [`apply_tags`], the
//! health → tags loop of the Serf side.
//!
//! A command holds one `Box<dyn Advertiser>` while it advertises: the Serf member (tags
//! gated by health, a leave on stop; implemented by the binary's member handle) or an etcd
//! lease ([`crate::etcd::Lease`]). Both withdraw before the forwarders drain, so consumers stop
//! sending new clients while the open ones are served.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::tags::{desired, Advertisement, Health};

/// A boxed, sendable future (the trait's methods return these so it stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The error of withdrawing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long to wait before retrying a tag update that failed.
pub const RETRY_TAGS: Duration = Duration::from_secs(1);

/// Where a process advertises its service.
pub trait Advertiser: Send + Sync {
    /// Our node name.
    fn name(&self) -> &str;

    /// Keeps what is advertised equal to `advertisement` at the current `health` until `stop`
    /// (`applied`: the tags already advertised). An etcd lease follows health by itself, so
    /// its future ends at once.
    fn follow_health(
        &self,
        advertisement: Advertisement,
        applied: Option<BTreeMap<String, String>>,
        health: watch::Receiver<Health>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()>;

    /// Resolves when something other than a signal asks us to stop (`serf leave` over RPC);
    /// never, by default.
    fn stop_requested(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }

    /// Stops advertising within `timeout` (the Serf leave, or the etcd lease revoke) and says
    /// what was done.
    fn withdraw(&mut self, timeout: Duration) -> BoxFuture<'_, Result<&'static str, BoxError>>;

    /// Releases what is left (sockets, tasks).
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Applies the tags for the current health through `set_tags`, and again on every change,
/// until `shutdown`. Only a changed tag set is sent: `applied` is what the member already
/// advertises (the tags it started with), so startup causes no redundant update.
pub async fn apply_tags<F, Fut, E>(
    advertisement: Advertisement,
    applied: Option<BTreeMap<String, String>>,
    mut health: watch::Receiver<Health>,
    mut set_tags: F,
    shutdown: CancellationToken,
) where
    F: FnMut(BTreeMap<String, String>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut applied = applied;
    loop {
        let wanted = desired(&advertisement, *health.borrow_and_update());
        if applied.as_ref() != Some(&wanted) {
            match set_tags(wanted.clone()).await {
                Ok(()) => {
                    tracing::debug!(tags = ?wanted, "tags advertised");
                    applied = Some(wanted);
                }
                Err(error) => {
                    warn!(%error, tags = ?wanted, "updating tags failed, retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = health.changed() => {}
                        () = tokio::time::sleep(RETRY_TAGS) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = health.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// `error` and its sources, `: `-separated (as anyhow's `{:#}` prints them).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn advertisement() -> Advertisement {
        Advertisement {
            role: Some("6379".into()),
            ports: vec!["6379/tcp".into()],
            service_addr: None,
            extra: BTreeMap::new(),
        }
    }

    type Tags = BTreeMap<String, String>;
    type Sent = Arc<Mutex<Vec<Tags>>>;

    /// A tag sink that records what it is sent and fails the first `failures` calls.
    fn sink(
        failures: usize,
    ) -> (
        Sent,
        impl FnMut(Tags) -> std::future::Ready<Result<(), String>>,
    ) {
        let sent: Sent = Arc::default();
        let record = Arc::clone(&sent);
        let mut calls = 0;
        let sink = move |tags| {
            calls += 1;
            if calls <= failures {
                return std::future::ready(Err("member busy".to_owned()));
            }
            record.lock().unwrap().push(tags);
            std::future::ready(Ok(()))
        };
        (sent, sink)
    }

    /// Waits (generously, polling) until `sent` holds `n` tag sets.
    async fn sent_reaches(sent: &Sent, n: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while sent.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} tag updates, got {:?}", sent.lock().unwrap()));
    }

    /// Starts [`apply_tags`] at `initial` health into a sink failing `failures` times.
    fn start(
        initial: Health,
        applied: Option<Tags>,
        failures: usize,
    ) -> (
        watch::Sender<Health>,
        Sent,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (health_tx, health_rx) = watch::channel(initial);
        let (sent, sink) = sink(failures);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(apply_tags(
            advertisement(),
            applied,
            health_rx,
            sink,
            shutdown.clone(),
        ));
        (health_tx, sent, shutdown, task)
    }

    #[tokio::test]
    async fn tags_follow_health_and_repeat_nothing() {
        let (health_tx, sent, shutdown, task) = start(Health::Passing, None, 0);
        sent_reaches(&sent, 1).await;
        health_tx.send_replace(Health::Critical);
        sent_reaches(&sent, 2).await;
        // The same value again changes nothing on the wire.
        health_tx.send_replace(Health::Critical);
        health_tx.send_replace(Health::Passing);
        sent_reaches(&sent, 3).await;
        shutdown.cancel();
        task.await.unwrap();
        let roles: Vec<(Option<String>, String)> = sent
            .lock()
            .unwrap()
            .iter()
            .map(|tags| (tags.get("role").cloned(), tags["health"].clone()))
            .collect();
        assert_eq!(
            roles,
            vec![
                (Some("6379".into()), "passing".into()),
                (None, "critical".into()),
                (Some("6379".into()), "passing".into()),
            ]
        );
    }

    #[tokio::test]
    async fn what_the_member_already_advertises_is_not_sent_again() {
        let started_with = desired(&advertisement(), Health::Passing);
        let (health_tx, sent, shutdown, task) = start(Health::Passing, Some(started_with), 0);
        health_tx.send_replace(Health::Critical);
        sent_reaches(&sent, 1).await;
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(sent.lock().unwrap()[0]["health"], "critical");
        assert_eq!(sent.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_failed_update_is_retried() {
        let (_health_tx, sent, shutdown, task) = start(Health::Critical, None, 2);
        sent_reaches(&sent, 1).await;
        assert_eq!(sent.lock().unwrap()[0]["health"], "critical");
        shutdown.cancel();
        task.await.unwrap();
    }
}
