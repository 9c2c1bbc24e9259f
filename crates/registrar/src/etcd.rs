//! The etcd backend: registration with a lease, discovery with a watch.
//!
//! Talks to etcd's v3 API through its JSON gateway (`POST /v3/kv/put`, `/v3/lease/grant`,
//! `/v3/watch`, …; keys and values base64) over plain HTTP/1.1. See ARCHITECTURE.md for why
//! not gRPC.
//!
//! Layout in etcd: one key per ambassador, `<prefix>/<role>/<node>` ([`Prefix::key`]), whose
//! value is a JSON [`Registration`] and which is attached to a lease of `ttl`.

mod client;
mod discovery;
mod endpoints;
mod members;
mod registrar;
mod registration;

#[doc(hidden)]
pub use client::decode_watch_line;
pub use client::{Client, Event, KeyValue, LeaseId, Watch};
pub use discovery::{Snapshot, Watcher};
pub use endpoints::{Endpoint, EndpointError, Endpoints, DEFAULT_PORT, LINK_VAR};
pub use members::{as_member, members, EtcdDiscovery, Lease};
pub use registrar::Registrar;
pub use registration::{Prefix, Registration, RegistrationError};

/// An etcd operation that failed. No variant changes local state; the caller decides whether to
/// retry (the [`Registrar`] and [`Watcher`] tasks do, with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint list could not be parsed.
    #[error(transparent)]
    Endpoints(#[from] EndpointError),
    /// No connection, a reset connection or a timeout talking to `endpoint`.
    #[error("etcd {operation} at {endpoint}: {reason}")]
    Transport {
        /// `host:port` of the etcd endpoint.
        endpoint: String,
        /// What we asked for, such as `lease grant` or `put /services/3306/a`.
        operation: String,
        /// The underlying error, as text.
        reason: String,
    },
    /// etcd answered with an error status (for example 503 while it has no leader).
    #[error("etcd {operation} at {endpoint}: HTTP {status}: {message}")]
    Status {
        /// `host:port` of the etcd endpoint.
        endpoint: String,
        /// What we asked for.
        operation: String,
        /// The HTTP status code.
        status: u16,
        /// etcd's error message (or the start of the body).
        message: String,
    },
    /// etcd answered with something that is not the JSON we expect.
    #[error("etcd {operation} at {endpoint}: unexpected response: {reason}")]
    Decode {
        /// `host:port` of the etcd endpoint.
        endpoint: String,
        /// What we asked for.
        operation: String,
        /// What was wrong with the response.
        reason: String,
    },
}

impl Error {
    /// Whether another endpoint might succeed where this one failed (no connection, or etcd
    /// unavailable there), as opposed to a request etcd rejected.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500,
            Self::Endpoints(_) | Self::Decode { .. } => false,
        }
    }
}
