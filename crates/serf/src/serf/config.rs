//! Serf's tunables (serf/config.go `DefaultConfig`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::lamport::LamportTime;

/// Largest user event (name + payload, and encoded) Serf accepts at all (Go's
/// `UserEventSizeLimit` constant, 9 KiB).
pub const USER_EVENT_SIZE_HARD_LIMIT: usize = 9 * 1024;

/// Lowest and highest Serf (delegate) protocol versions spoken.
pub const PROTOCOL_VERSION_MIN: u8 = 2;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u8 = 5;

/// Configuration of the Serf layer. [`Config::default`] is Go's `serf.DefaultConfig()` except
/// for `node_name` (Go uses the hostname; here it must be set).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Unique name of this member.
    pub node_name: String,
    /// Tags advertised in the node meta (encoded as `ff` + msgpack map, ≤ 512 bytes).
    pub tags: BTreeMap<String, String>,
    /// Serf protocol version spoken (2..=5; Go's library default 4, the agent uses 5).
    pub protocol_version: u8,
    /// How long a leave waits for its intent to be gossiped (5 s).
    pub broadcast_timeout: Duration,
    /// Pause after the memberlist leave so the dead message spreads (1 s).
    pub leave_propagate_delay: Duration,
    /// Slots in the user event de-duplication ring (512).
    pub event_buffer: usize,
    /// Slots in the query de-duplication ring (512).
    pub query_buffer: usize,
    /// How often failed and left members are checked for reaping (15 s).
    pub reap_interval: Duration,
    /// How long intents about unknown members are kept (5 min).
    pub recent_intent_timeout: Duration,
    /// How often a reconnect to a failed member is attempted (30 s).
    pub reconnect_interval: Duration,
    /// Failed members are reaped after this long (24 h).
    pub reconnect_timeout: Duration,
    /// Left members are reaped after this long (24 h).
    pub tombstone_timeout: Duration,
    /// A failed member that comes back within this time counts as a flap (60 s).
    pub flap_timeout: Duration,
    /// How often the broadcast queues are checked for depth (30 s).
    pub queue_check_interval: Duration,
    /// Queue depth that is logged as a warning (128).
    pub queue_depth_warning: usize,
    /// Queues deeper than this are pruned, oldest-most-sent first (4096).
    pub max_queue_depth: usize,
    /// If non-zero, the limit is 2 × members but at least this (0: use `max_queue_depth`).
    pub min_queue_depth: usize,
    /// Query timeout multiplier: timeout = gossip interval × this × ceil(log10(n+1)) (16).
    pub query_timeout_mult: u32,
    /// Largest encoded query response (1024).
    pub query_response_size_limit: usize,
    /// Largest encoded query (1024).
    pub query_size_limit: usize,
    /// Run `_serf_conflict` when another node claims our name (true).
    pub enable_name_conflict_resolution: bool,
    /// Do not compute or advertise Vivaldi coordinates (false).
    pub disable_coordinates: bool,
    /// Largest user event, name + payload and encoded (512; at most 9 KiB).
    pub user_event_size_limit: usize,
    /// The clocks of a previous run (Go's snapshot: `clock:`, `event-clock:`, `query-clock:`);
    /// `None` for a fresh start. See [`RestoredClocks`].
    pub restored_clocks: Option<RestoredClocks>,
}

/// The last Lamport times a previous run of this member saw, read from its snapshot by the
/// caller. As Go's `serf.Create` does with a snapshot: the three clocks witness them, and user
/// events and queries at or before the saved times are not delivered again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoredClocks {
    /// Member clock (`clock:`).
    pub member: LamportTime,
    /// User event clock (`event-clock:`).
    pub event: LamportTime,
    /// Query clock (`query-clock:`).
    pub query: LamportTime,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            tags: BTreeMap::new(),
            protocol_version: 4,
            broadcast_timeout: Duration::from_secs(5),
            leave_propagate_delay: Duration::from_secs(1),
            event_buffer: 512,
            query_buffer: 512,
            reap_interval: Duration::from_secs(15),
            recent_intent_timeout: Duration::from_secs(5 * 60),
            reconnect_interval: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(24 * 3600),
            tombstone_timeout: Duration::from_secs(24 * 3600),
            flap_timeout: Duration::from_secs(60),
            queue_check_interval: Duration::from_secs(30),
            queue_depth_warning: 128,
            max_queue_depth: 4096,
            min_queue_depth: 0,
            query_timeout_mult: 16,
            query_response_size_limit: 1024,
            query_size_limit: 1024,
            enable_name_conflict_resolution: true,
            disable_coordinates: false,
            user_event_size_limit: 512,
            restored_clocks: None,
        }
    }
}
