//! Forwarding threads: one single-threaded tokio runtime per thread, each with its own listening
//! socket of every TCP forward (`SO_REUSEPORT`: the kernel spreads new connections over them).
//! A connection lives on the thread that accepted it: its wake-ups never cross to another CPU
//! and no task is handed between threads, the event-loop-per-thread model of HAProxy and nginx.

use std::sync::mpsc;

use tokio_util::task::TaskTracker;

use crate::tcp::AcceptLoop;
use crate::Error;

/// The number of forwarding threads `0` stands for: one per CPU this process may use.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Starts one thread per element of `per_thread`, each running its accept loops (and the
/// connections they accept) until every loop has stopped and `tasks` is closed and empty.
/// Returns once every thread's runtime is running, or the first thread that could not start.
pub(crate) fn start(per_thread: Vec<Vec<AcceptLoop>>, tasks: &TaskTracker) -> Result<(), Error> {
    let (started_tx, started_rx) = mpsc::channel();
    let count = per_thread.len();
    for (index, loops) in per_thread.into_iter().enumerate() {
        let started = started_tx.clone();
        let tasks = tasks.clone();
        std::thread::Builder::new()
            .name(format!("forward-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(source) => {
                        let _ = started.send(Err(Error::Thread { index, source }));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                runtime.block_on(async move {
                    for accept in loops {
                        tasks.spawn(accept.run());
                    }
                    tasks.wait().await;
                });
            })
            .map_err(|source| Error::Thread { index, source })?;
    }
    // Building a runtime takes microseconds; waiting here keeps a failure the caller's error.
    for _ in 0..count {
        started_rx.recv().expect("every thread reports once")?;
    }
    Ok(())
}
