//! Serf's RPC protocol (the agent's TCP port 7373): client, server and codec.
//!
//! Both sides speak the protocol of `serf/cmd/serf/command/agent/ipc.go` and
//! `serf/client/rpc_client.go`: a TCP byte stream of msgpack values with no length prefix,
//! `requestHeader{Command, Seq}` (+ body) from the client and `responseHeader{Seq, Error}`
//! (+ body) from the server, streams keyed by the request's `Seq`.
//!
//! - [`Client`]: tokio client for any Serf agent, used by the command-line tools.
//! - [`Server`]: serves the protocol for any [`Backend`] (the real `serf` command line works
//!   against it); [`MemoryBackend`] is a pretend cluster for tests.
//! - [`codec`]: incremental framing ([`codec::FrameBuffer`]) and Go-compatible field codecs;
//!   [`messages`]: the structs with Go's field names; [`filter`]: anchored member filters and
//!   stream filters.
//!
//! Left out: the IPC versions other than 1 (none exist), and the agent itself: the member
//! runtime that wires RPC, event handlers ([`crate::handlers`]) and the join loop together is
//! `registrar::serf`; snapshots are [`crate::snapshot`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), serf_agent::rpc::Error> {
//! let client = serf_agent::rpc::Client::connect("127.0.0.1:7373", None).await?;
//! for member in client.members().await? {
//!     println!("{} {} {}", member.name, member.socket_addr(), member.status);
//! }
//! # Ok(()) }
//! ```

pub mod agent;
pub mod backend;
pub mod client;
pub mod codec;
pub mod filter;
pub mod memory;
pub mod messages;
pub mod server;

pub use backend::{
    Backend, BackendError, Event, LogLevel, LogLine, MemberEventKind, QueryReply, StreamRecord,
};
pub use client::{
    Client, Error, EventStream, KeyCommand, LogStream, MembersFilter, Query, QueryStream,
    StreamEvent, StreamHandle,
};
pub use memory::MemoryBackend;
pub use messages::{Coordinate, KeyResponse, MemberRow, Stats};
pub use server::{Config, Server};
