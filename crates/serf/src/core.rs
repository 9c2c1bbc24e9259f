//! [`Core`]: the sans-IO seam every driver runs. The tokio driver (`serf-agent`) and the
//! deterministic simulator (`serf::sim`, feature `sim`) feed a core the same inputs,
//! datagrams, streams and its deadline, with the time read once per input, and perform what
//! it polls out. [`crate::serf::Serf`], the whole member, is one.

use std::net::SocketAddr;
use std::time::Instant;

use crate::memberlist::{StreamId, StreamInput, Transmit};
use crate::wire::DecodeError;

/// A sans-IO state machine a driver runs.
pub trait Core {
    /// What the core tells the application.
    type Event;
    /// One datagram, already decrypted.
    fn handle_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &[u8],
    ) -> Result<(), DecodeError>;
    /// An accepted TCP connection.
    fn handle_accept(&mut self, now: Instant, from: SocketAddr) -> StreamId;
    /// Bytes, EOF or failure on a stream.
    fn handle_stream(&mut self, now: Instant, stream: StreamId, input: StreamInput<'_>);
    /// The deadline of [`poll_timeout`](Self::poll_timeout) passed.
    fn handle_timeout(&mut self, now: Instant);
    /// The next packet or stream operation to perform.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// The next event for the application.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When [`handle_timeout`](Self::handle_timeout) is due.
    fn poll_timeout(&self) -> Option<Instant>;
}
