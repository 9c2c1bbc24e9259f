//! The tokio side of a native Serf member: everything that does I/O around the sans-IO
//! [`serf`] crate.
//!
//! - [`driver`]: the one driver of a sans-IO core ([`serf::core::Core`]) on one UDP socket and one
//!   TCP listener, with gossip encryption at its edge.
//! - [`member`]: a whole Serf member on it — the very [`serf::serf::Serf`] the simulation
//!   tests drive — with an async [`member::Handle`] and a channel of [`serf::serf::Event`]s.
//! - [`rpc`]: Serf's agent RPC, both sides (client, server, the member backend).
//! - [`snapshot`]: Go's snapshot file (`serf agent -snapshot`): the format, and the thread
//!   that keeps it while [`member`] runs.
//! - [`events`]: reading a member's event channel until a token stops the reader.
//! - [`handlers`]: event handlers as `serf agent -event-handler` runs them.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod driver;
pub mod events;
pub mod handlers;
pub mod member;
pub mod rpc;
pub mod snapshot;
