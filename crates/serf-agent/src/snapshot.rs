//! Go's Serf snapshot file (`serf agent -snapshot PATH`, serf/snapshot.go), byte-compatible
//! both ways: a snapshot written by Go's `serf` is read here and the other way round.
//!
//! The file is an append-only log of lines, compacted when it grows:
//!
//! ```text
//! alive: NAME ADDR:PORT     a member joined (the name may hold spaces: the address is the last word)
//! not-alive: NAME           it left or failed
//! clock: N                  the member clock minus one, when it moved
//! event-clock: N            the newest user event seen
//! query-clock: N            the newest query seen
//! leave                     we left; without `rejoin_after_leave` the lines before it are void
//! coordinate: JSON          written by old versions, ignored
//! # comment                 ignored
//! ```
//!
//! This module is pure: [`Snapshot::replay`] reads a file's text into the state a restart
//! needs (the previous alive members to rejoin, the three clocks to restore), [`Tracker`]
//! turns the member's events into [`Record`]s, and [`Snapshot::compacted`] renders the short
//! form. [`writer`] is the thread that appends the records to the file.

pub mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serf::serf::{Event, LamportTime, RestoredClocks};

/// Below this size the file is never compacted (Go's `snapshotSizeLimit`, 128 KiB).
pub const MIN_COMPACT_SIZE: u64 = 128 * 1024;
/// Estimated bytes per alive member; compaction happens beyond twice this per member (Go's
/// `snapshotBytesPerNode` × `snapshotCompactionThreshold`).
const BYTES_PER_NODE: u64 = 128;
const COMPACTION_THRESHOLD: u64 = 2;

/// Where to keep the snapshot, and what a `leave` in it means (`serf agent -snapshot`,
/// `-rejoin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The snapshot file; created when missing.
    pub path: PathBuf,
    /// Go's `RejoinAfterLeave`: a graceful leave keeps the alive members, so the next start
    /// rejoins them anyway.
    pub rejoin_after_leave: bool,
}

/// One line of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `alive: NAME ADDR`: the member joined (or came back) at `addr` (`IP:PORT`).
    Alive {
        /// Node name.
        name: String,
        /// Its gossip address as Go prints it (`1.2.3.4:7946`, `[::1]:7946`).
        addr: String,
    },
    /// `not-alive: NAME`: the member left or failed.
    NotAlive {
        /// Node name.
        name: String,
    },
    /// `clock: N`.
    Clock(LamportTime),
    /// `event-clock: N`.
    EventClock(LamportTime),
    /// `query-clock: N`.
    QueryClock(LamportTime),
    /// `leave`: this member left gracefully.
    Leave,
}

impl fmt::Display for Record {
    /// The line, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Alive { name, addr } => write!(f, "alive: {name} {addr}"),
            Self::NotAlive { name } => write!(f, "not-alive: {name}"),
            Self::Clock(time) => write!(f, "clock: {time}"),
            Self::EventClock(time) => write!(f, "event-clock: {time}"),
            Self::QueryClock(time) => write!(f, "query-clock: {time}"),
            Self::Leave => f.write_str("leave"),
        }
    }
}

/// A line [`parse_line`] could not use; replay skips it, as Go does (with a warning).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot line {line:?}: {reason}")]
pub struct LineError {
    /// The line.
    pub line: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Parses one line (without its newline). `Ok(None)` for lines that carry nothing: comments
/// and the `coordinate:` lines of old versions.
pub fn parse_line(line: &str) -> Result<Option<Record>, LineError> {
    let error = |reason| LineError {
        line: line.to_owned(),
        reason,
    };
    let time = |text: &str| {
        text.parse::<u64>()
            .map(LamportTime)
            .map_err(|_| error("not a clock value (an unsigned integer)"))
    };
    if let Some(info) = line.strip_prefix("alive: ") {
        let (name, addr) = info
            .rsplit_once(' ')
            .ok_or_else(|| error("no address after the name"))?;
        Ok(Some(Record::Alive {
            name: name.to_owned(),
            addr: addr.to_owned(),
        }))
    } else if let Some(name) = line.strip_prefix("not-alive: ") {
        Ok(Some(Record::NotAlive {
            name: name.to_owned(),
        }))
    } else if let Some(value) = line.strip_prefix("clock: ") {
        time(value).map(|t| Some(Record::Clock(t)))
    } else if let Some(value) = line.strip_prefix("event-clock: ") {
        time(value).map(|t| Some(Record::EventClock(t)))
    } else if let Some(value) = line.strip_prefix("query-clock: ") {
        time(value).map(|t| Some(Record::QueryClock(t)))
    } else if line == "leave" {
        Ok(Some(Record::Leave))
    } else if line.starts_with("coordinate: ") || line.starts_with('#') {
        Ok(None)
    } else {
        Err(error("unrecognized"))
    }
}

/// What a snapshot holds: the members alive at the end and the last clock values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Alive members by name, with their address as written.
    pub alive: BTreeMap<String, String>,
    /// Last member clock recorded.
    pub clock: LamportTime,
    /// Last user event time recorded.
    pub event_clock: LamportTime,
    /// Last query time recorded.
    pub query_clock: LamportTime,
}

impl Snapshot {
    /// Replays a snapshot file's text as Go's `Snapshotter.replay` does: only whole lines
    /// (ending in a newline) count, bad lines are skipped and returned, and a `leave` voids
    /// everything before it unless `rejoin_after_leave`.
    pub fn replay(text: &str, rejoin_after_leave: bool) -> (Self, Vec<LineError>) {
        let mut snapshot = Self::default();
        let mut skipped = Vec::new();
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                break; // a line cut short by a crash
            };
            match parse_line(line) {
                Ok(Some(Record::Leave)) if rejoin_after_leave => {}
                Ok(Some(Record::Leave)) => snapshot = Self::default(),
                Ok(Some(record)) => snapshot.apply(&record, rejoin_after_leave),
                Ok(None) => {}
                Err(error) => skipped.push(error),
            }
        }
        (snapshot, skipped)
    }

    /// Applies a record as the live writer does: a `leave` forgets the alive members (unless
    /// `rejoin_after_leave`) and keeps the clocks.
    pub fn apply(&mut self, record: &Record, rejoin_after_leave: bool) {
        match record {
            Record::Alive { name, addr } => {
                self.alive.insert(name.clone(), addr.clone());
            }
            Record::NotAlive { name } => {
                self.alive.remove(name);
            }
            Record::Clock(time) => self.clock = *time,
            Record::EventClock(time) => self.event_clock = *time,
            Record::QueryClock(time) => self.query_clock = *time,
            Record::Leave if rejoin_after_leave => {}
            Record::Leave => self.alive.clear(),
        }
    }

    /// The clocks for [`serf::serf::Config::restored_clocks`].
    pub fn clocks(&self) -> RestoredClocks {
        RestoredClocks {
            member: self.clock,
            event: self.event_clock,
            query: self.query_clock,
        }
    }

    /// The members to rejoin: every alive one but `own_name`, with its address parsed;
    /// entries whose address does not parse are returned apart.
    pub fn previous_members(&self, own_name: &str) -> PreviousMembers {
        let mut members = Vec::new();
        let mut unparsed = Vec::new();
        for (name, addr) in self.alive.iter().filter(|(name, _)| *name != own_name) {
            match addr.parse() {
                Ok(socket) => members.push((name.clone(), socket)),
                Err(_) => unparsed.push((name.clone(), addr.clone())),
            }
        }
        PreviousMembers { members, unparsed }
    }

    /// The compacted file: the alive members, then the three clocks (Go's `compact`).
    pub fn compacted(&self) -> String {
        let mut text = String::new();
        let records = self
            .alive
            .iter()
            .map(|(name, addr)| Record::Alive {
                name: name.clone(),
                addr: addr.clone(),
            })
            .chain([
                Record::Clock(self.clock),
                Record::EventClock(self.event_clock),
                Record::QueryClock(self.query_clock),
            ]);
        for record in records {
            text.push_str(&record.to_string());
            text.push('\n');
        }
        text
    }

    /// The file size beyond which it is compacted: twice 128 bytes per alive member, at least
    /// `min_size` (Go's `snapshotMaxSize`).
    pub fn max_size(&self, min_size: u64) -> u64 {
        (self.alive.len() as u64 * BYTES_PER_NODE * COMPACTION_THRESHOLD).max(min_size)
    }
}

/// The alive members of a snapshot ([`Snapshot::previous_members`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreviousMembers {
    /// Name and gossip address of each.
    pub members: Vec<(String, SocketAddr)>,
    /// Name and address text of those whose address does not parse.
    pub unparsed: Vec<(String, String)>,
}

/// Turns a running member's events and clocks into records, as Go's `Snapshotter.stream`
/// does: joins are `alive`, leaves and failures `not-alive`, newer user events and queries
/// move their clock, and the member clock is recorded (minus one) whenever it moved. After
/// [`leave`](Self::leave) member and event records stop; the member clock is still recorded.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    clock: LamportTime,
    event_clock: LamportTime,
    query_clock: LamportTime,
    leaving: bool,
}

impl Tracker {
    /// Starts from the clocks a replay restored.
    pub fn new(restored: RestoredClocks) -> Self {
        Self {
            clock: restored.member,
            event_clock: restored.event,
            query_clock: restored.query,
            leaving: false,
        }
    }

    /// The records `event` causes; `member_clock` is the member clock now.
    pub fn event(&mut self, event: &Event, member_clock: LamportTime, out: &mut Vec<Record>) {
        if self.leaving {
            return;
        }
        match event {
            Event::MemberJoin(member) => {
                out.push(Record::Alive {
                    name: member.name.clone(),
                    addr: member.socket_addr().to_string(),
                });
                self.clock(member_clock, out);
            }
            Event::MemberLeave(member) | Event::MemberFailed(member) => {
                out.push(Record::NotAlive {
                    name: member.name.clone(),
                });
                self.clock(member_clock, out);
            }
            Event::MemberUpdate(_) | Event::MemberReap(_) => self.clock(member_clock, out),
            Event::UserEvent(user) if user.ltime > self.event_clock => {
                self.event_clock = user.ltime;
                out.push(Record::EventClock(user.ltime));
            }
            Event::Query(query) if query.ltime > self.query_clock => {
                self.query_clock = query.ltime;
                out.push(Record::QueryClock(query.ltime));
            }
            _ => {}
        }
    }

    /// Records the member clock if it moved: Go writes the time last seen (`clock - 1`).
    pub fn clock(&mut self, member_clock: LamportTime, out: &mut Vec<Record>) {
        let last_seen = LamportTime(member_clock.0.saturating_sub(1));
        if last_seen > self.clock {
            self.clock = last_seen;
            out.push(Record::Clock(last_seen));
        }
    }

    /// We start leaving: a `leave` record, and no member or event records after it.
    pub fn leave(&mut self, out: &mut Vec<Record>) {
        if !self.leaving {
            self.leaving = true;
            out.push(Record::Leave);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's Go `serf agent -snapshot` (go-a, joined by go-b and go-c; a user
    /// event and a query; go-c left; go-a stopped with SIGTERM).
    const GO_KILLED: &str = include_str!("../tests/fixtures/go-killed.snap");
    /// The same, but go-a left gracefully (SIGINT): a `leave`, then its last clock.
    const GO_LEFT: &str = include_str!("../tests/fixtures/go-left.snap");

    fn alive(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(name, addr)| (name.to_string(), addr.to_string()))
            .collect()
    }

    #[test]
    fn replays_a_snapshot_written_by_go() {
        let (snapshot, skipped) = Snapshot::replay(GO_KILLED, false);
        assert_eq!(skipped, []);
        assert_eq!(
            snapshot.alive,
            alive(&[("go-a", "127.0.0.1:17001"), ("go-b", "127.0.0.1:17002")])
        );
        assert_eq!(
            snapshot.clocks(),
            RestoredClocks {
                member: LamportTime(3),
                event: LamportTime(1),
                query: LamportTime(1),
            }
        );
        let PreviousMembers { members, unparsed } = snapshot.previous_members("go-a");
        assert_eq!(
            members,
            [("go-b".to_owned(), "127.0.0.1:17002".parse().unwrap())]
        );
        assert_eq!(unparsed, []);
    }

    #[test]
    fn a_leave_voids_what_came_before_unless_rejoin_after_leave() {
        let (left, _) = Snapshot::replay(GO_LEFT, false);
        assert_eq!(left.alive, BTreeMap::new());
        // Go resets the clocks at `leave`, then reads the clock written at shutdown.
        assert_eq!(
            left.clocks(),
            RestoredClocks {
                member: LamportTime(2),
                ..RestoredClocks::default()
            }
        );
        let (rejoin, _) = Snapshot::replay(GO_LEFT, true);
        assert_eq!(
            rejoin.alive,
            alive(&[("go-a", "127.0.0.1:17001"), ("go-b", "127.0.0.1:17002")])
        );
        assert_eq!(rejoin.event_clock, LamportTime(1));
    }

    #[test]
    fn lines_parse_and_render_back() {
        for line in [
            "alive: web 1 10.0.0.5:7946",
            "alive: v6 [::1]:7946",
            "not-alive: web 1",
            "clock: 42",
            "event-clock: 0",
            "query-clock: 18446744073709551615",
            "leave",
        ] {
            let record = parse_line(line).unwrap().unwrap();
            assert_eq!(record.to_string(), line);
        }
        assert_eq!(
            parse_line("alive: web 1 10.0.0.5:7946").unwrap(),
            Some(Record::Alive {
                name: "web 1".into(),
                addr: "10.0.0.5:7946".into()
            })
        );
        assert_eq!(parse_line("# written by hand"), Ok(None));
        assert_eq!(parse_line(r#"coordinate: {"Vec":[0]}"#), Ok(None));
        for (line, reason) in [
            ("alive: lonely", "no address after the name"),
            ("clock: -1", "not a clock value (an unsigned integer)"),
            ("clocks: 1", "unrecognized"),
        ] {
            assert_eq!(parse_line(line).unwrap_err().reason, reason, "{line}");
        }
    }

    #[test]
    fn replay_skips_bad_lines_and_a_line_cut_short() {
        let text = "alive: a 10.0.0.1:7946\nbogus\nclock: x\nevent-clock: 9\nalive: b 10.0.0.2:79";
        let (snapshot, skipped) = Snapshot::replay(text, false);
        assert_eq!(snapshot.alive, alive(&[("a", "10.0.0.1:7946")]));
        assert_eq!(snapshot.event_clock, LamportTime(9));
        let lines: Vec<_> = skipped.iter().map(|error| error.line.as_str()).collect();
        assert_eq!(lines, ["bogus", "clock: x"]);
        let previous = Snapshot::replay("alive: c nowhere\n", false)
            .0
            .previous_members("me");
        assert_eq!(previous.unparsed, [("c".to_owned(), "nowhere".to_owned())]);
    }

    #[test]
    fn compaction_keeps_the_alive_members_and_clocks_only() {
        let mut log = String::new();
        for round in 0..50 {
            log.push_str(&format!(
                "alive: a 10.0.0.1:7946\nnot-alive: a\nalive: b 10.0.0.2:7946\nclock: {round}\n"
            ));
        }
        log.push_str("event-clock: 7\nquery-clock: 3\n");
        let (snapshot, _) = Snapshot::replay(&log, false);
        let compacted = snapshot.compacted();
        assert_eq!(
            compacted,
            "alive: b 10.0.0.2:7946\nclock: 49\nevent-clock: 7\nquery-clock: 3\n"
        );
        assert_eq!(Snapshot::replay(&compacted, false).0, snapshot);
        assert_eq!(snapshot.max_size(MIN_COMPACT_SIZE), MIN_COMPACT_SIZE);
        assert_eq!(snapshot.max_size(0), 256);
    }

    #[test]
    fn the_tracker_records_what_go_records() {
        use serf::serf::{Member, MemberStatus, UserEvent};
        let member = |name: &str| Member {
            name: name.to_owned(),
            addr: "10.0.0.7".parse().unwrap(),
            port: 7946,
            tags: BTreeMap::new(),
            status: MemberStatus::Alive,
            versions: [1, 5, 2, 2, 5, 5],
        };
        let user = |ltime| {
            Event::UserEvent(UserEvent {
                ltime: LamportTime(ltime),
                name: "deploy".into(),
                payload: Vec::new(),
                coalesce: true,
            })
        };
        let mut tracker = Tracker::new(RestoredClocks {
            member: LamportTime(4),
            event: LamportTime(2),
            query: LamportTime(0),
        });
        let mut out = Vec::new();
        tracker.event(&Event::MemberJoin(member("b")), LamportTime(5), &mut out);
        tracker.event(&user(2), LamportTime(5), &mut out);
        tracker.event(&user(3), LamportTime(5), &mut out);
        tracker.event(&Event::MemberFailed(member("b")), LamportTime(7), &mut out);
        tracker.clock(LamportTime(7), &mut out);
        tracker.leave(&mut out);
        tracker.event(&Event::MemberJoin(member("c")), LamportTime(9), &mut out);
        tracker.clock(LamportTime(9), &mut out);
        let lines: Vec<_> = out.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "alive: b 10.0.0.7:7946",
                "event-clock: 3",
                "not-alive: b",
                "clock: 6",
                "leave",
                "clock: 8"
            ]
        );
    }
}
