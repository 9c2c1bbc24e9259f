//! Dialing an upstream: resolve the target's name now, try each address, all within one
//! timeout; and the error that says why no connection was made. The TCP forwarder, the
//! dynamic upstreams and the health probe all dial through here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::link_env::{Host, Target};

/// Why an upstream connection could not be made. Nothing was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The target's host name did not resolve.
    #[error("resolving {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to no address.
    #[error("{host} has no address")]
    NoAddress {
        /// The name.
        host: String,
    },
    /// The connection was refused or failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Resolution and connection together took longer than the connect timeout.
    #[error("connecting to {target}: timed out after {timeout:?}")]
    Timeout {
        /// The target.
        target: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// A dynamic upstream offered no usable target within the wait.
    #[error("no target for {pool} after waiting {waited:?}")]
    NoTarget {
        /// The pool (for example `role 6379`).
        pool: String,
        /// How long the client waited.
        waited: Duration,
    },
}

/// Connects to `target`, resolving a host name now (never cached: a container that comes back
/// with a new address is found), trying each address in turn, all within `timeout`.
pub async fn connect(target: &Target, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let attempt = async {
        match &target.host {
            Host::Ip(ip) => {
                let addr = SocketAddr::new(*ip, target.port);
                TcpStream::connect(addr)
                    .await
                    .map_err(|source| UpstreamError::Connect { addr, source })
            }
            Host::Name(name) => {
                let addrs = tokio::net::lookup_host((name.as_str(), target.port))
                    .await
                    .map_err(|source| UpstreamError::Resolve {
                        host: name.clone(),
                        source,
                    })?;
                let mut last = UpstreamError::NoAddress { host: name.clone() };
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => return Ok(stream),
                        Err(source) => last = UpstreamError::Connect { addr, source },
                    }
                }
                Err(last)
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout {
            target: target.to_string(),
            timeout,
        }),
    }
}
