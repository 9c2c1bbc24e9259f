//! SIGHUP: what `serf agent` reloads, reloaded. `main` turns every SIGHUP into a [`request`];
//! a command that can reload [`subscribe`]s and re-reads its files (see `cmd/agent.rs`); the log
//! filter of the console output is swapped through [`set_log_filter`]. With no subscriber the
//! signal is only logged: it never ends the process.

use std::sync::OnceLock;

use tokio::sync::watch;
use tracing_subscriber::{reload, EnvFilter, Registry};

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
