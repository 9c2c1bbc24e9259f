//! How a query came.

/// How the query came, which bounds the response's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A datagram: at most 512 bytes, or the EDNS0 payload size up to [`crate::MAX_UDP_PAYLOAD`];
    /// larger answers are sent empty with TC set, so the client retries over TCP.
    Udp,
    /// One length-prefixed message of a TCP stream: up to 65,535 bytes.
    Tcp,
}
