//! `/healthz` and Prometheus `/metrics` for `amb-serf run`, on `--metrics-addr` (off unless
//! asked for). A minimal HTTP/1.1 server written by hand: one request per connection, `GET`
//! (or `HEAD`) only, request heads up to 8 KiB, read within 5 s.
//!
//! - `/healthz`: `200 ok` while the member runs and the backend passes its health check;
//!   `503` with a one-line reason otherwise (starting, backend critical, leaving).
//! - `/metrics`: text exposition format 0.0.4 — connections (total, active, rejected),
//!   upstream failures, bytes each way, upstream health, and cluster members by status.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use registrar::tags::Health;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use request::{head_complete, parse_request};

// Pure and free of this crate's items, so that the fuzz target can include it by path.
mod request;

/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Member statuses always exported (as 0 when nobody has them), so dashboards see every series.
const STATUSES: [&str; 4] = ["alive", "leaving", "left", "failed"];

/// Where the member is in its life, for `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Not serving yet (the member is starting).
    Starting,
    /// Serving: member started (joined or a cluster of one).
    Running,
    /// Shutting down: leaving the cluster, then draining.
    Leaving,
}

/// Member statuses (`alive`, `left`, …), one per known member, or `None` when the member cannot
/// answer.
pub(crate) type MembersFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<Vec<String>>> + Send>> + Send + Sync>;

/// The [`MembersFn`] of a Serf member's view (none without a member: etcd).
pub(crate) fn statuses_of(member: Option<crate::member::Member>) -> MembersFn {
    Arc::new(move || {
        let member = member.clone();
        Box::pin(async move {
            let members = member?.members().await.ok()?;
            Some(members.iter().map(|m| m.status.to_string()).collect())
        })
    })
}

/// What the endpoints report on.
pub(crate) struct Observed {
    /// The forwarders' counters.
    pub(crate) stats: Arc<proxy::Stats>,
    /// Backend health.
    pub(crate) health: watch::Receiver<Health>,
    /// Member lifecycle.
    pub(crate) lifecycle: watch::Receiver<Lifecycle>,
    /// Member statuses.
    pub(crate) members: MembersFn,
}

/// Binds the metrics address (a busy port fails at startup, before anything is advertised).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown`; each connection on its own task.
pub(crate) async fn serve(
    listener: TcpListener,
    observed: Arc<Observed>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz and /metrics");
    }
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let observed = Arc::clone(&observed);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &observed).await {
                        debug!(%peer, %error, "metrics request failed");
                    }
                });
            }
            Err(error) => {
                debug!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, observed: &Observed) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match parse_request(&head) {
        Err(status) => Response::text(status, format!("{}\n", reason(status))),
        Ok((method, path)) => {
            let mut response = route(path, observed).await;
            if method == "HEAD" {
                response.body_omitted = true;
            }
            response
        }
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head_complete(&head) {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    Ok(head)
}

async fn route(path: &str, observed: &Observed) -> Response {
    match path {
        // The process serves: for a liveness probe (a restart would not help otherwise).
        "/livez" => Response::text(200, "ok\n".to_owned()),
        // `/readyz` is `/healthz` under the name Kubernetes probes use.
        "/healthz" | "/readyz" => {
            let lifecycle = *observed.lifecycle.borrow();
            let health = *observed.health.borrow();
            // A member whose driver stopped (e.g. it lost a name conflict) cannot answer.
            let answers = lifecycle != Lifecycle::Running || (observed.members)().await.is_some();
            let (status, body) = if answers {
                healthz(lifecycle, health)
            } else {
                (503, "unhealthy: the serf member stopped\n".to_owned())
            };
            Response::text(status, body)
        }
        "/metrics" => {
            let members = (observed.members)().await;
            let body = render(
                &Snapshot::of(&observed.stats),
                *observed.health.borrow(),
                members.as_deref(),
            );
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: body.into_bytes(),
                body_omitted: false,
            }
        }
        _ => Response::text(
            404,
            "not found: try /livez, /readyz (or /healthz) or /metrics\n".to_owned(),
        ),
    }
}

/// The `/healthz` answer.
fn healthz(lifecycle: Lifecycle, health: Health) -> (u16, String) {
    match (lifecycle, health) {
        (Lifecycle::Running, Health::Passing) => (200, "ok\n".to_owned()),
        (Lifecycle::Running, Health::Critical) => (
            503,
            "unhealthy: backend critical (not accepting connections)\n".to_owned(),
        ),
        (Lifecycle::Starting, _) => (503, "unhealthy: starting\n".to_owned()),
        (Lifecycle::Leaving, _) => (503, "unhealthy: leaving the cluster\n".to_owned()),
    }
}

/// The forwarders' counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Snapshot {
    accepted: u64,
    active: u64,
    rejected: u64,
    upstream_failures: u64,
    bytes_to_upstream: u64,
    bytes_to_client: u64,
}

impl Snapshot {
    fn of(stats: &proxy::Stats) -> Self {
        Self {
            accepted: stats.accepted.load(Ordering::Relaxed),
            active: stats.active.load(Ordering::Relaxed) as u64,
            rejected: stats.rejected.load(Ordering::Relaxed),
            upstream_failures: stats.upstream_failures.load(Ordering::Relaxed),
            bytes_to_upstream: stats.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: stats.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

/// The Prometheus text exposition of `snapshot`, `health` and member `statuses`.
fn render(snapshot: &Snapshot, health: Health, statuses: Option<&[String]>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            if labels.is_empty() {
                out.push_str(&format!("{name} {value}\n"));
            } else {
                out.push_str(&format!("{name}{{{labels}}} {value}\n"));
            }
        }
    };
    metric(
        "amb_serf_connections_total",
        "counter",
        "TCP connections and UDP sessions accepted.",
        &[("", snapshot.accepted)],
    );
    metric(
        "amb_serf_connections_active",
        "gauge",
        "Open TCP connections and UDP sessions.",
        &[("", snapshot.active)],
    );
    metric(
        "amb_serf_connections_rejected_total",
        "counter",
        "Clients closed at once because --max-connections was reached.",
        &[("", snapshot.rejected)],
    );
    metric(
        "amb_serf_upstream_failures_total",
        "counter",
        "Upstream connections that failed (refused, timed out, unresolvable).",
        &[("", snapshot.upstream_failures)],
    );
    metric(
        "amb_serf_bytes_total",
        "counter",
        "Bytes forwarded, by direction.",
        &[
            ("direction=\"to_upstream\"", snapshot.bytes_to_upstream),
            ("direction=\"to_client\"", snapshot.bytes_to_client),
        ],
    );
    metric(
        "amb_serf_upstream_up",
        "gauge",
        "1 while the backend passes its health check (role advertised), else 0.",
        &[("", u64::from(health == Health::Passing))],
    );
    if let Some(statuses) = statuses {
        let mut counts: BTreeMap<&str, u64> = STATUSES.iter().map(|s| (*s, 0)).collect();
        for status in statuses {
            *counts.entry(status.as_str()).or_default() += 1;
        }
        let labels: Vec<(String, u64)> = counts
            .iter()
            .map(|(status, n)| (format!("status=\"{status}\""), *n))
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        metric(
            "amb_serf_members",
            "gauge",
            "Serf cluster members this member knows, by status (itself included).",
            &samples,
        );
    }
    out
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    body_omitted: bool,
}

impl Response {
    fn text(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into_bytes(),
            body_omitted: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.body_omitted {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::request::MAX_HEAD;
    use super::*;

    #[test]
    fn requests() {
        let check = |head: &str, expected: Result<(&str, &str), u16>| {
            assert_eq!(parse_request(head.as_bytes()), expected, "{head:?}");
        };
        check(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            Ok(("GET", "/healthz")),
        );
        check(
            "HEAD /metrics?x=1 HTTP/1.0\r\n\r\n",
            Ok(("HEAD", "/metrics")),
        );
        check("POST /healthz HTTP/1.1\r\n\r\n", Err(405));
        check("PING\r\n", Err(400));
        check("GET /healthz SPDY\r\n\r\n", Err(400));
        check("", Err(400));
        assert_eq!(parse_request(&vec![b'a'; MAX_HEAD + 1]), Err(431));
    }

    #[test]
    fn healthz_needs_a_running_member_and_a_passing_backend() {
        use Health::{Critical, Passing};
        use Lifecycle::{Leaving, Running, Starting};
        for (lifecycle, health, status, body) in [
            (Running, Passing, 200, "ok"),
            (Running, Critical, 503, "backend critical"),
            (Starting, Passing, 503, "starting"),
            (Leaving, Passing, 503, "leaving"),
        ] {
            let (got_status, got_body) = healthz(lifecycle, health);
            assert_eq!(got_status, status, "{lifecycle:?} {health:?}");
            assert!(got_body.contains(body), "{got_body:?}");
        }
    }

    #[test]
    fn metrics_text() {
        let snapshot = Snapshot {
            accepted: 7,
            active: 2,
            rejected: 1,
            upstream_failures: 3,
            bytes_to_upstream: 100,
            bytes_to_client: 2000,
        };
        let statuses = ["alive", "alive", "left"].map(String::from);
        let text = render(&snapshot, Health::Passing, Some(&statuses));
        for line in [
            "# TYPE amb_serf_connections_total counter",
            "amb_serf_connections_total 7",
            "amb_serf_connections_active 2",
            "amb_serf_connections_rejected_total 1",
            "amb_serf_upstream_failures_total 3",
            "amb_serf_bytes_total{direction=\"to_upstream\"} 100",
            "amb_serf_bytes_total{direction=\"to_client\"} 2000",
            "amb_serf_upstream_up 1",
            "amb_serf_members{status=\"alive\"} 2",
            "amb_serf_members{status=\"left\"} 1",
            "amb_serf_members{status=\"failed\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        let critical = render(&snapshot, Health::Critical, None);
        assert!(critical.contains("amb_serf_upstream_up 0"), "{critical}");
        assert!(!critical.contains("amb_serf_members"), "{critical}");
    }

    #[test]
    fn responses_carry_their_length() {
        let response = Response::text(503, "unhealthy: starting\n".into());
        let text = String::from_utf8(response.to_bytes()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 20\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nunhealthy: starting\n"), "{text}");
    }
}
