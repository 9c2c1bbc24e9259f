//! The snapshot's I/O: [`open`] reads the file at start, [`spawn`] starts the thread that
//! appends [`Record`]s to it (flushed after each batch, so a SIGKILL loses at most the batch
//! being written) and compacts it when it outgrows [`Snapshot::max_size`]: the short form
//! goes to `PATH.compact`, is synced, and is renamed over the file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Options, Record, Snapshot, MIN_COMPACT_SIZE};

/// Records waiting for the writer thread at most (as Go's snapshotter queue): beyond it, a
/// record is dropped with a warning rather than held, however fast peers make events.
pub const QUEUE: usize = 2048;

/// After a failed write, a compaction (which rewrites the file) is tried at most this often.
const ERROR_RECOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// Opening or reading the snapshot at start failed.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {}: {source}", path.display())]
pub struct OpenError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: io::Error,
}

/// What the writer thread is told.
#[derive(Debug)]
pub enum Message {
    /// Append this line.
    Record(Record),
    /// Flush and sync, then answer.
    Sync(oneshot::Sender<()>),
}

/// An open snapshot, replayed.
#[derive(Debug)]
pub struct Opened {
    /// What the file said (see [`Snapshot::replay`]).
    pub snapshot: Snapshot,
    file: File,
    len: u64,
}

/// Opens (creating it if needed) and replays the snapshot; lines that do not parse are
/// logged and skipped.
pub fn open(options: &Options) -> Result<Opened, OpenError> {
    let error = |source| OpenError {
        path: options.path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&options.path)
        .map_err(error)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(error)?;
    let (snapshot, skipped) =
        Snapshot::replay(&String::from_utf8_lossy(&bytes), options.rejoin_after_leave);
    for line in skipped {
        tracing::warn!(path = %options.path.display(), %line, "skipping a snapshot line");
    }
    Ok(Opened {
        snapshot,
        file,
        len: bytes.len() as u64,
    })
}

/// Starts the writer thread; it ends (after a last flush) when every sender is dropped.
pub fn spawn(options: Options, opened: Opened) -> mpsc::Sender<Message> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let writer = Writer {
        rejoin_after_leave: options.rejoin_after_leave,
        path: options.path,
        snapshot: opened.snapshot,
        file: BufWriter::new(opened.file),
        len: opened.len,
        last_recovery: None,
    };
    std::thread::Builder::new()
        .name("serf-snapshot".into())
        .spawn(move || writer.run(rx))
        .expect("spawning the snapshot thread");
    tx
}

struct Writer {
    path: PathBuf,
    rejoin_after_leave: bool,
    snapshot: Snapshot,
    file: BufWriter<File>,
    len: u64,
    last_recovery: Option<Instant>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        while let Some(message) = rx.blocking_recv() {
            let mut waiters = Vec::new();
            let mut next = Some(message);
            while let Some(message) = next {
                match message {
                    Message::Record(record) => self.append(&record),
                    Message::Sync(waiter) => waiters.push(waiter),
                }
                next = rx.try_recv().ok();
            }
            let synced = self.file.flush().and_then(|()| {
                if waiters.is_empty() {
                    Ok(())
                } else {
                    self.file.get_ref().sync_data()
                }
            });
            if let Err(error) = synced {
                self.failed(&error);
            }
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
        if let Err(error) = self.file.flush() {
            self.failed(&error);
        }
    }

    fn append(&mut self, record: &Record) {
        self.snapshot.apply(record, self.rejoin_after_leave);
        let line = format!("{record}\n");
        if let Err(error) = self.file.write_all(line.as_bytes()) {
            self.failed(&error);
            return;
        }
        self.len += line.len() as u64;
        if self.len > self.snapshot.max_size(MIN_COMPACT_SIZE) {
            if let Err(error) = self.compact() {
                tracing::warn!(path = %self.path.display(), %error, "compacting the snapshot");
            }
        }
    }

    /// Logs a failed write and, at most every 30 s, tries a compaction to recover (Go does
    /// the same).
    fn failed(&mut self, error: &io::Error) {
        tracing::warn!(path = %self.path.display(), %error, "writing the snapshot");
        let now = Instant::now();
        if self
            .last_recovery
            .is_some_and(|at| now.duration_since(at) < ERROR_RECOVERY_INTERVAL)
        {
            return;
        }
        self.last_recovery = Some(now);
        match self.compact() {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), "snapshot rewritten after an error")
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "compacting the snapshot")
            }
        }
    }

    fn compact(&mut self) -> io::Result<()> {
        let text = self.snapshot.compacted();
        let temporary = compact_path(&self.path);
        let mut file = File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, &self.path)?;
        let file = OpenOptions::new().append(true).open(&self.path)?;
        self.file = BufWriter::new(file);
        self.len = text.len() as u64;
        Ok(())
    }
}

/// `PATH.compact`, Go's temporary file.
fn compact_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".compact");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serf::serf::LamportTime;

    #[tokio::test]
    async fn appends_compacts_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            path: dir.path().join("serf.snapshot"),
            rejoin_after_leave: false,
        };
        std::fs::write(&options.path, "alive: old 10.0.0.9:7946\nclock: 3\n").unwrap();
        let opened = open(&options).unwrap();
        assert_eq!(opened.snapshot.clock, LamportTime(3));
        let tx = spawn(options.clone(), opened);
        // Enough flapping to pass 128 KiB: the file is compacted on the way.
        for round in 0..4000u64 {
            for record in [
                Record::Alive {
                    name: "flappy".into(),
                    addr: "10.0.0.8:7946".into(),
                },
                Record::NotAlive {
                    name: "flappy".into(),
                },
                Record::Clock(LamportTime(4 + round)),
            ] {
                tx.send(Message::Record(record)).await.unwrap();
            }
        }
        tx.send(Message::Record(Record::EventClock(LamportTime(9))))
            .await
            .unwrap();
        let (done, synced) = oneshot::channel();
        tx.send(Message::Sync(done)).await.unwrap();
        synced.await.unwrap();
        let text = std::fs::read_to_string(&options.path).unwrap();
        assert!(
            (text.len() as u64) < MIN_COMPACT_SIZE,
            "{} bytes: not compacted",
            text.len()
        );
        assert!(!compact_path(&options.path).exists());
        let (snapshot, skipped) = Snapshot::replay(&text, false);
        assert_eq!(skipped, []);
        assert_eq!(snapshot.clock, LamportTime(4003));
        assert_eq!(snapshot.event_clock, LamportTime(9));
        assert_eq!(
            snapshot.alive.keys().collect::<Vec<_>>(),
            ["old"],
            "flappy ended not-alive"
        );
        // A leave: the next start has no one to rejoin.
        tx.send(Message::Record(Record::Leave)).await.unwrap();
        let (done, synced) = oneshot::channel();
        tx.send(Message::Sync(done)).await.unwrap();
        synced.await.unwrap();
        drop(tx);
        let reopened = open(&options).unwrap();
        assert!(reopened.snapshot.alive.is_empty());
    }
}
