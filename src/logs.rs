//! Log lines for `serf monitor`: a tracing [`Layer`] that formats each event the way a Go agent
//! logs (`2006/01/02 15:04:05 [INFO] target: message key=value`) into the process-wide
//! [`LogRing`], which every member's RPC server streams from. `main` installs it next to the fmt
//! layer, with its own filter (DEBUG and above, so `serf monitor -log-level debug` has lines).

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use serf_agent::rpc::agent::LogRing;
use serf_agent::rpc::memory::go_log_time;
use serf_agent::rpc::{LogLevel, LogLine};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The process-wide ring.
pub(crate) fn ring() -> Arc<LogRing> {
    static RING: OnceLock<Arc<LogRing>> = OnceLock::new();
    Arc::clone(RING.get_or_init(Default::default))
}

/// Feeds [`ring`].
pub(crate) struct MonitorLayer {
    ring: Arc<LogRing>,
}

impl MonitorLayer {
    pub(crate) fn new() -> Self {
        Self { ring: ring() }
    }
}

impl<S: Subscriber> Layer<S> for MonitorLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = match *event.metadata().level() {
            Level::TRACE => LogLevel::Trace,
            Level::DEBUG => LogLevel::Debug,
            Level::INFO => LogLevel::Info,
            Level::WARN => LogLevel::Warn,
            Level::ERROR => LogLevel::Err,
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let target = event.metadata().target();
        let target = target.split("::").next().unwrap_or(target);
        let text = format!(
            "{} [{}] {target}: {}{}",
            go_log_time(std::time::SystemTime::now()),
            level.as_str(),
            fields.message,
            fields.rest
        );
        self.ring.push(LogLine { level, text });
    }
}

/// The most bytes of one field value a line keeps; a peer's bytes can reach a field (a node
/// name, an error naming what did not decode), so a longer value is cut with a length note.
const MAX_VALUE_BYTES: usize = 256;

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    /// Reused for each value; keeps at most [`MAX_VALUE_BYTES`] of it.
    value: Capped,
}

impl Fields {
    fn record(&mut self, field: &Field, value: impl std::fmt::Display) {
        self.value.clear();
        let _ = write!(self.value, "{value}");
        if field.name() == "message" {
            let _ = write!(self.message, "{}", self.value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), self.value);
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record(field, format_args!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value);
    }
}

/// The text format's field formatter: the default `key=value` layout, each value cut to
/// [`MAX_VALUE_BYTES`] as in the monitor's lines.
pub(crate) fn bounded_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let mut capped = Capped::default();
        let _ = write!(capped, "{value:?}");
        if field.name() == "message" {
            write!(writer, "{capped}")
        } else {
            write!(writer, "{field}={capped}")
        }
    })
    .delimited(" ")
}

/// A `fmt::Write` that keeps the first [`MAX_VALUE_BYTES`] (on a character boundary) and counts
/// the rest, so formatting a huge value allocates nothing for it.
#[derive(Default)]
struct Capped {
    kept: String,
    total: usize,
}

impl Capped {
    fn clear(&mut self) {
        self.kept.clear();
        self.total = 0;
    }
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.total += s.len();
        let room = MAX_VALUE_BYTES.saturating_sub(self.kept.len());
        if room > 0 {
            let mut end = room.min(s.len());
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.kept.push_str(&s[..end]);
        }
        Ok(())
    }
}

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kept)?;
        if self.total > self.kept.len() {
            write!(f, "… ({} bytes)", self.total)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_values_are_cut_with_their_length() {
        use std::fmt::Write as _;
        let mut capped = super::Capped::default();
        let _ = write!(capped, "short");
        assert_eq!(capped.to_string(), "short");
        capped.clear();
        let _ = write!(capped, "{:?}", vec![7u8; 100_000]);
        let cut = capped.to_string();
        assert!(cut.len() < 300, "{cut}");
        assert!(cut.starts_with("[7, 7, "), "{cut}");
        assert!(cut.ends_with("… (300000 bytes)"), "{cut}");
        capped.clear();
        let _ = write!(capped, "{}", "é".repeat(1_000));
        assert!(capped.to_string().ends_with("… (2000 bytes)"));
    }
}
