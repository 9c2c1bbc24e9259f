//! The `redis` health check: `PING`, expect `+PONG`, then `QUIT`.
//!
//! Both commands go out at once (inline commands, which every Redis version accepts); the
//! first reply line decides. `+PONG` is healthy, and so is `-NOAUTH` (a server with
//! `requirepass` is up; authenticating is its clients' business). Any other error
//! (`-LOADING` while the dataset loads, `-MASTERDOWN`, `-BUSY` …) or anything that is not a
//! reply is critical, with the server's line in the message.
//!
//! [`verdict`] is the pure part; [`talk`] is the I/O shell the health loop bounds with its
//! timeout.

use std::fmt;

use tokio::net::TcpStream;

/// What we send: `PING`, then `QUIT` so the server closes the connection itself.
pub const REQUEST: &[u8] = b"PING\r\nQUIT\r\n";

/// A first line longer than this is not an answer to `PING`.
const MAX_LINE: usize = 512;

/// Why the server is not healthy (or not Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An error reply, e.g. `LOADING Redis is loading the dataset in memory`.
    Server(String),
    /// Not a Redis reply.
    Protocol(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(line) => write!(f, "redis answered PING with -{line}"),
            Self::Protocol(what) => write!(f, "not a redis server as expected: {what}"),
        }
    }
}

/// The verdict on what the server sent so far: `None` until the first line is complete.
/// `Ok` carries a note for the debug log.
pub fn verdict(received: &[u8]) -> Option<Result<&'static str, Failure>> {
    let Some(end) = received.windows(2).position(|pair| pair == b"\r\n") else {
        return (received.len() > MAX_LINE).then(|| {
            Err(Failure::Protocol(format!(
                "no reply line in the first {} bytes",
                received.len()
            )))
        });
    };
    let line = super::printable(&received[..end], MAX_LINE);
    Some(match line.split_at_checked(1) {
        Some(("+", "PONG")) => Ok("PONG"),
        Some(("-", error)) if error.starts_with("NOAUTH") => Ok("up, needs AUTH (NOAUTH)"),
        Some(("-", error)) => Err(Failure::Server(error.to_owned())),
        _ => Err(Failure::Protocol(format!("{line:?} in reply to PING"))),
    })
}

/// Sends `PING` and `QUIT` and reads until the verdict. The caller bounds it with a timeout.
pub async fn talk(stream: &mut TcpStream) -> Result<String, String> {
    super::write(stream, REQUEST).await?;
    let mut received = Vec::with_capacity(64);
    loop {
        if let Some(verdict) = verdict(&received) {
            return verdict.map(str::to_owned).map_err(|f| f.to_string());
        }
        super::read_more(stream, &mut received, "without answering PING").await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(received: &[u8], expected: Option<Result<&str, Failure>>) {
        assert_eq!(verdict(received), expected, "{received:?}");
    }

    #[test]
    fn replies() {
        check(b"", None);
        check(b"+PO", None);
        check(b"+PONG\r", None);
        check(b"+PONG\r\n", Some(Ok("PONG")));
        check(b"+PONG\r\n+OK\r\n", Some(Ok("PONG")));
        check(
            b"-NOAUTH Authentication required.\r\n",
            Some(Ok("up, needs AUTH (NOAUTH)")),
        );
        check(
            b"-LOADING Redis is loading the dataset in memory\r\n",
            Some(Err(Failure::Server(
                "LOADING Redis is loading the dataset in memory".into(),
            ))),
        );
        check(
            b"-ERR unknown command\r\n",
            Some(Err(Failure::Server("ERR unknown command".into()))),
        );
        check(
            b"+OK\r\n",
            Some(Err(Failure::Protocol("\"+OK\" in reply to PING".into()))),
        );
        check(
            b"HTTP/1.1 400 Bad Request\r\n",
            Some(Err(Failure::Protocol(
                "\"HTTP/1.1 400 Bad Request\" in reply to PING".into(),
            ))),
        );
        // A MySQL greeting has no CRLF: a bound, not a hang or a huge buffer.
        check(&[b'x'; MAX_LINE], None);
        check(
            &[b'x'; MAX_LINE + 1],
            Some(Err(Failure::Protocol(
                "no reply line in the first 513 bytes".into(),
            ))),
        );
        // Control characters never reach a log line.
        check(
            b"-ERR a\x1b[31mb\r\n",
            Some(Err(Failure::Server("ERR a[31mb".into()))),
        );
    }

    #[test]
    fn messages_name_the_reply() {
        let failure = Failure::Server("LOADING Redis is loading".into());
        assert_eq!(
            failure.to_string(),
            "redis answered PING with -LOADING Redis is loading"
        );
    }
}
