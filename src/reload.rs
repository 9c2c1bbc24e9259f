//! SIGHUP: what `serf agent` reloads, reloaded. `main` turns every SIGHUP into a [`request`];
//! `agent` and `run` hand their member to [`Reloadable::follow`], which re-reads the config
//! files and the tags file on each; the log filter of the console output is swapped through
//! [`set_log_filter`]. With no subscriber the signal is only logged: it never ends the process.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tokio::sync::watch;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config_file::ConfigArgs;
use crate::member::{LocalMember, MemberArgs};

fn requests() -> &'static watch::Sender<u64> {
    static REQUESTS: OnceLock<watch::Sender<u64>> = OnceLock::new();
    REQUESTS.get_or_init(|| watch::channel(0).0)
}

/// Every reload request from now on (a counter; `changed()` resolves on each).
pub(crate) fn subscribe() -> watch::Receiver<u64> {
    requests().subscribe()
}

/// Asks the subscribers to reload; `false` when nobody can.
pub(crate) fn request() -> bool {
    requests().send_modify(|count| *count += 1);
    requests().receiver_count() > 0
}

static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Wraps the console's log filter so [`set_log_filter`] can replace it.
pub(crate) fn log_filter(filter: EnvFilter) -> reload::Layer<EnvFilter, Registry> {
    let (layer, handle) = reload::Layer::new(filter);
    let _ = LOG_FILTER.set(handle);
    layer
}

/// Replaces the console's log filter (`serf agent` reloads `log_level`).
pub(crate) fn set_log_filter(filter: &str) -> anyhow::Result<()> {
    let handle = LOG_FILTER
        .get()
        .ok_or_else(|| anyhow::anyhow!("no reloadable log filter"))?;
    handle.reload(EnvFilter::new(filter))?;
    Ok(())
}

/// What a command reloads on SIGHUP, as `serf agent` does: the log level, the event handlers
/// and the tags, from its flags, `--config-file` and `--tags-file`.
#[derive(Debug, Clone)]
pub(crate) struct Reloadable {
    member: MemberArgs,
    config: ConfigArgs,
    log_flag: Option<String>,
    tags: TagsOwner,
}

/// Which tags a reload may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagsOwner {
    /// `agent`: every tag is the configuration's.
    Config,
    /// `run`: the tags it manages itself (`role`, `health`, `ports`, `service`) stay as its
    /// advertiser set them; every other tag is the configuration's.
    Advertiser,
}

/// What the flags and the config files ask for.
pub(crate) struct Wanted {
    /// The member flags with the config files' event handlers added.
    pub(crate) member: MemberArgs,
    /// The tags file, then the config files' `tags`, then `--tag`.
    pub(crate) tags: BTreeMap<String, String>,
    /// `--log-level`, else the config files' `log_level`.
    pub(crate) log_level: Option<String>,
}

impl Reloadable {
    pub(crate) fn new(
        member: &MemberArgs,
        config: &ConfigArgs,
        log_flag: Option<&str>,
        tags: TagsOwner,
    ) -> Self {
        Self {
            member: member.clone(),
            config: config.clone(),
            log_flag: log_flag.map(str::to_owned),
            tags,
        }
    }

    fn wanted(&self) -> anyhow::Result<Wanted> {
        let config = self.config.read()?;
        let mut member = self.member.clone();
        member.event_handlers.extend(config.event_handlers);
        let mut tags = self.member.tags()?;
        tags.extend(config.tags);
        tags.extend(self.member.tags.iter().flatten().cloned());
        Ok(Wanted {
            member,
            tags,
            log_level: self.log_flag.clone().or(config.log_level),
        })
    }

    /// At start: applies the log level and returns what to start the member with.
    pub(crate) fn start(&self) -> anyhow::Result<Wanted> {
        let wanted = self.wanted()?;
        if let Some(level) = &wanted.log_level {
            set_log_filter(level)?;
        }
        Ok(wanted)
    }

    /// Applies every SIGHUP to `member` from now on, until the process ends. A file that
    /// cannot be read or is not valid keeps the running configuration, as `serf agent` does.
    pub(crate) fn follow(self, member: LocalMember) {
        let mut requests = subscribe();
        tokio::spawn(async move {
            while requests.changed().await.is_ok() {
                tracing::info!(
                    "SIGHUP: reloading the config files, the tags file and the event handlers"
                );
                if let Err(error) = self.apply(&member).await {
                    tracing::error!(error = %format!("{error:#}"), "reload failed; the running configuration stays");
                }
            }
        });
    }

    async fn apply(&self, member: &LocalMember) -> anyhow::Result<()> {
        let wanted = self.wanted()?;
        let handlers = wanted.member.handlers()?;
        if let Some(level) = &wanted.log_level {
            set_log_filter(level)?;
        }
        let count = handlers.len();
        member.set_event_handlers(handlers, wanted.member.event_handlers.clone());
        let tags = match self.tags {
            TagsOwner::Config => wanted.tags.clone(),
            TagsOwner::Advertiser => {
                registrar::advertisement::with_current_extras(member.tags(), wanted.tags.clone())
            }
        };
        if tags != member.tags() {
            member.set_tags(tags).await?;
        }
        let tags: Vec<String> = member
            .tags()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tracing::info!(
            event_handlers = count,
            tags = %tags.join(","),
            log_level = wanted.log_level.as_deref().unwrap_or("(unchanged)"),
            "reloaded"
        );
        Ok(())
    }
}
