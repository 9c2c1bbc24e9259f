//! `amb-serf health`: a Docker `HEALTHCHECK` with no shell or curl in the image.
//!
//! Sends `GET /healthz` to the metrics address of a running `amb-serf` and exits 0 if it
//! answers `200`, else 1 with a message naming the address (and what it resolved to) and what
//! went wrong. An unspecified address (`0.0.0.0:PORT`, as the server binds it) is checked on
//! loopback, so the same `AMB_METRICS_ADDR` serves both the server and the check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Flags of `amb-serf health`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  amb-serf health                       # checks 127.0.0.1:9090, or AMB_METRICS_ADDR
  amb-serf health --addr 127.0.0.1:9100
  HEALTHCHECK CMD [\"amb-serf\", \"health\"]   # in a Dockerfile")]
pub(crate) struct Args {
    /// Metrics address of the amb-serf to check (HOST:PORT); 0.0.0.0 means loopback.
    #[arg(
        long,
        env = "AMB_METRICS_ADDR",
        default_value = "127.0.0.1:9090",
        value_name = "HOST:PORT"
    )]
    addr: String,

    /// Give up after this long (resolve, connect and answer), e.g. 3s or 500ms.
    #[arg(long, env = "AMB_HEALTH_TIMEOUT", default_value = "3s", value_parser = crate::duration::parse)]
    timeout: Duration,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let url = format!("http://{}/healthz", args.addr);
    let status = tokio::time::timeout(args.timeout, check(&args.addr))
        .await
        .map_err(|_| anyhow!("GET {url}: no answer within {:?}", args.timeout))?
        .with_context(|| format!("GET {url}"))?;
    println!("healthy: GET {url} answered {status}");
    Ok(())
}

/// Resolves `addr`, connects to the first address that accepts, and returns the status line
/// if it is `200`.
async fn check(addr: &str) -> anyhow::Result<String> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr:?}"))?
        .map(loopback_if_unspecified)
        .collect();
    let mut last_error = None;
    for target in &resolved {
        match TcpStream::connect(target).await {
            Ok(stream) => {
                return exchange(stream)
                    .await
                    .with_context(|| format!("{addr} resolved to {target}"));
            }
            Err(error) => last_error = Some(format!("connecting to {target}: {error}")),
        }
    }
    Err(anyhow!(last_error.unwrap_or_else(|| "no address".into())))
        .with_context(|| format!("{addr} resolved to {resolved:?}"))
}

async fn exchange(mut stream: TcpStream) -> anyhow::Result<String> {
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: amb-serf\r\nConnection: close\r\n\r\n")
        .await
        .context("sending the request")?;
    // The status line is all we need; read until it is complete or the peer closes.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.context("reading the answer")?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_line(&head)
}

/// `HTTP/1.x 200 ...` → the line; anything else is an error quoting what came back.
fn status_line(head: &[u8]) -> anyhow::Result<String> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line).trim_end().to_owned();
    let mut words = line.split_whitespace();
    let (Some(version), Some(code)) = (words.next(), words.next()) else {
        bail!("answered something that is not HTTP: {line:?}");
    };
    if !version.starts_with("HTTP/") {
        bail!("answered something that is not HTTP: {line:?}");
    }
    if code != "200" {
        bail!("unhealthy: answered {line:?}");
    }
    Ok(line)
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_status(head: &str, expected: Result<&str, &str>) {
        let actual = status_line(head.as_bytes()).map_err(|error| error.to_string());
        match (actual, expected) {
            (Ok(line), Ok(want)) => assert_eq!(line, want),
            (Err(error), Err(want)) => assert!(error.contains(want), "{error:?} lacks {want:?}"),
            (actual, expected) => panic!("{head:?}: got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn status_lines() {
        check_status("HTTP/1.1 200 OK\r\n\r\nok", Ok("HTTP/1.1 200 OK"));
        check_status("HTTP/1.0 200 OK\r\n", Ok("HTTP/1.0 200 OK"));
        check_status("HTTP/1.1 503 Service Unavailable\r\n", Err("unhealthy"));
        check_status("-ERR unknown command 'GET'\r\n", Err("not HTTP"));
        check_status("", Err("not HTTP"));
    }

    #[test]
    fn unspecified_means_loopback() {
        let check = |from: &str, to: &str| {
            assert_eq!(
                loopback_if_unspecified(from.parse().unwrap()),
                to.parse().unwrap()
            );
        };
        check("0.0.0.0:9090", "127.0.0.1:9090");
        check("[::]:9090", "[::1]:9090");
        check("10.0.0.2:9090", "10.0.0.2:9090");
    }
}
