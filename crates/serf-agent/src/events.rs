//! Reading a member's event channel from a task that stops on a token.

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The next value from `events`, or `None` once `stop` is cancelled or the sender is gone. A
/// reader that fell behind skips what it missed and logs a warning naming `reader`.
pub async fn next<T: Clone>(
    events: &mut broadcast::Receiver<T>,
    stop: &CancellationToken,
    reader: &str,
) -> Option<T> {
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return None,
            received = events.recv() => received,
        };
        match received {
            Ok(value) => return Some(value),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "{reader} fell behind; events skipped");
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}
