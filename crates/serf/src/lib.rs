//! A native HashiCorp Serf member, wire-compatible with Go Serf agents.
//!
//! The crate is layered like Go's implementation, and every layer is sans-IO (no sockets, no
//! clock, no global RNG: `now` and a seeded RNG come in as arguments):
//!
//! - [`wire`]: Go-flavoured msgpack and every memberlist and Serf message, byte for byte.
//! - [`memberlist`]: SWIM gossip and failure detection with Lifeguard.
//! - [`serf`]: the Serf layer on top: tags, Lamport clocks, join/leave intents and the member
//!   status model (alive / leaving / left / failed), reaping and reconnecting, user events,
//!   queries (with filters, acks, relays and the internal `_serf_ping` / `_serf_conflict`),
//!   push-pull user state. [`serf::Serf`] is the whole member.
//! - [`coordinate`]: Vivaldi network coordinates carried in ping acks (`serf rtt`).
//! - [`core::Core`]: the sans-IO seam (`handle_*` in, `poll_*` out) that drivers run;
//!   [`serf::Serf`] implements it.
//!
//! No I/O here, and no tokio: the `serf-agent` crate holds the one tokio driver (which runs
//! the very [`serf::Serf`] the simulation tests drive, with gossip encryption at its edge), the
//! agent RPC and the member handle.
//!
//! # Features
//!
//! - `sim` (off by default): `serf::sim`, a deterministic simulator of N [`core::Core`]s
//!   (virtual clock, seeded RNG, a network with delay, loss and partitions) for tests and
//!   benchmarks. The crate's own tests enable it through a dev-dependency on itself.
//!
//! Left out on purpose: snapshots and the agent's event coalescing.
//!
//! # Example
//!
//! The application (or a driver) drives a [`serf::Serf`]: it passes in packets, stream bytes and timeouts,
//! and sends out whatever [`core::Core::poll_transmit`] returns.
//!
//! ```
//! use std::time::Instant;
//! use rand::{rngs::StdRng, SeedableRng};
//! use serf::core::Core;
//! use serf::memberlist::Transmit;
//! use serf::serf::{Config, Event, QueryParams, Serf};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let now = Instant::now();
//! let config = Config { node_name: "web-1".into(), ..Config::default() };
//! let lan = serf::memberlist::Config::lan();
//! let mut member = Serf::new(config, lan, "127.0.0.1:7946".parse()?, StdRng::seed_from_u64(7), now)?;
//!
//! member.join(now, &["127.0.0.2:7946".parse()?], true)?; // push-pull with a seed
//! member.set_tags(now, [("role".to_owned(), "3306".to_owned())].into())?;
//! member.user_event(now, "deploy", b"v2", false)?;
//! let uptime = member.query(now, "uptime", b"", &QueryParams::default())?;
//!
//! while let Some(transmit) = member.poll_transmit() {
//!     match transmit {
//!         Transmit::Packet { to, bytes } => { /* udp.send_to(&bytes, to) */ }
//!         _ => { /* open, write or close a TCP stream; report back with handle_stream */ }
//!     }
//! }
//! while let Some(event) = member.poll_event() {
//!     match event {
//!         Event::Query(query) => member.respond(now, query.id, b"up 3 days")?,
//!         Event::QueryResponse { query, from, payload } if query == uptime => { /* … */ }
//!         Event::UserEvent(event) => println!("{} {:?}", event.name, event.payload),
//!         _ => {}
//!     }
//! }
//! for peer in member.members() {
//!     println!("{} {} {}", peer.name, peer.socket_addr(), peer.status);
//! }
//! // Call handle_timeout at poll_timeout(), keep driving until Event::LeaveCompleted.
//! member.leave(now)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod coordinate;
pub mod core;
pub mod memberlist;
pub mod serf;
#[cfg(feature = "sim")]
pub mod sim;
pub mod wire;
