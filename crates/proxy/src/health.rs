//! Backend health probes: does the upstream accept a TCP connection now ([`probe`])? And the
//! protocol checks, each a sans-IO core with a thin I/O shell: [`mysql`] (log in politely and
//! quit) and [`redis`] (`PING`); [`check`] is the loop that runs one every interval and
//! publishes the backend's [`Health`].

pub mod check;
pub mod mysql;
pub mod redis;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dial::{connect, UpstreamError};
use crate::link_env::Target;

/// Whether the backend passes its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It does: advertise the role.
    Passing,
    /// It does not: withdraw the role.
    Critical,
}

impl Health {
    /// `passing` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Critical => "critical",
        }
    }
}

/// Connects to `target` (resolving a name now) and closes the connection at once.
///
/// Returns how long the connection took, or why it failed, within `timeout`.
pub async fn probe(target: &Target, timeout: Duration) -> Result<Duration, UpstreamError> {
    let start = Instant::now();
    let stream = connect(target, timeout).await?;
    drop(stream);
    Ok(start.elapsed())
}

/// Bytes from the server as text fit for a log line: lossy UTF-8, no control characters, at
/// most `max` characters.
pub(crate) fn printable(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect()
}

/// Reads what the server sends next onto `buffer`; the server closing first is an error
/// that says when (`mid-handshake`).
pub(crate) async fn read_more(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    when: &str,
) -> Result<(), String> {
    let mut chunk = [0u8; 1024];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|error| format!("reading from the server: {error}"))?;
    if n == 0 {
        return Err(format!("the server closed the connection {when}"));
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Writes all of `bytes` to the server.
pub(crate) async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream
        .write_all(bytes)
        .await
        .map_err(|error| format!("writing to the server: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_env::Host;
    use std::net::{IpAddr, Ipv4Addr};

    fn target(port: u16) -> Target {
        Target {
            host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port,
        }
    }

    #[tokio::test]
    async fn up_when_listening_down_when_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        probe(&target(port), Duration::from_secs(5))
            .await
            .expect("listening upstream is up");
        drop(listener);
        let error = probe(&target(port), Duration::from_secs(5))
            .await
            .expect_err("closed port is down");
        assert!(matches!(error, UpstreamError::Connect { .. }), "{error}");
    }

    #[tokio::test]
    async fn an_unanswered_connect_times_out() {
        // A listener whose accept queue is full drops new SYNs: connecting hangs, as it does
        // to a host that is down.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut queued = Vec::new();
        for _ in 0..3 {
            let attempt = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(300), attempt).await
            {
                queued.push(stream);
            }
        }
        let error = probe(&target(port), Duration::from_millis(300))
            .await
            .expect_err("the accept queue is full");
        assert!(matches!(error, UpstreamError::Timeout { .. }), "{error}");
        drop(listener);
    }

    #[tokio::test]
    async fn names_resolve_per_probe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let by_name = Target {
            host: Host::Name("localhost".to_owned()),
            port,
        };
        probe(&by_name, Duration::from_secs(5))
            .await
            .expect("localhost resolves and accepts");
    }
}
