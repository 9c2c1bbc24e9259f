//! `/healthz` and Prometheus `/metrics` for `amb-serf run`, on `--metrics-addr` (off unless
//! asked for). HTTP/1.1 on hyper: one request per connection, `GET` (or `HEAD`) only, request
//! heads up to 8 KiB, read within 5 s, the whole exchange within 10 s, at most 64 requests at a
//! time (more are closed at once: a scraper retries, a flood of connections cannot use the
//! process's descriptors and memory).
//!
//! - `/healthz`: `200 ok` while the member runs and the backend passes its health check;
//!   `503` with a one-line reason otherwise (starting, backend critical, leaving).
//! - `/metrics`: text exposition format 0.0.4 — connections (total, active, rejected),
//!   upstream failures, bytes each way, upstream health, and cluster members by status.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use registrar::tags::Health;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Largest request head accepted (a longer one is answered `431`).
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a whole exchange may take, the answer's write included (a client that never reads).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once.
const MAX_CONCURRENT: usize = 64;
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
pub(crate) fn statuses_of(member: Option<crate::member::LocalMember>) -> MembersFn {
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
    /// The kernel data path's nftables counters (`run --dataplane kernel`).
    pub(crate) kernel: Option<Arc<crate::dataplane::Counters>>,
}

/// Binds `--metrics-addr` when it is given (a busy port fails at startup, before anything is
/// advertised).
pub(crate) async fn bind(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| anyhow::anyhow!("binding --metrics-addr {addr}: {error}"))?;
    Ok(Some(listener))
}

/// Serves until `shutdown`; each connection on its own task, at most [`MAX_CONCURRENT`].
pub(crate) async fn serve(
    listener: TcpListener,
    observed: Arc<Observed>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz and /metrics");
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .keep_alive(false)
        // As before hyper: no `Date` (and no clock cache kept for it).
        .auto_date_header(false);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_CONCURRENT} requests in progress, closing");
            continue;
        };
        let observed = Arc::clone(&observed);
        let service = hyper::service::service_fn(move |request| {
            let observed = Arc::clone(&observed);
            async move { Ok::<_, Infallible>(answer(&request, &observed).await) }
        });
        let exchange = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%peer, %error, "metrics request failed"),
                Err(_) => debug!(%peer, "metrics request timed out"),
            }
            drop(permit);
        });
    }
}

async fn answer<B>(request: &Request<B>, observed: &Observed) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed\n".to_owned(),
        );
    }
    // hyper leaves the body out of a `HEAD` answer and keeps its length.
    match request.uri().path() {
        // The process serves: for a liveness probe (a restart would not help otherwise).
        "/livez" => text(StatusCode::OK, "ok\n".to_owned()),
        // `/readyz` is `/healthz` under the name Kubernetes probes use.
        "/healthz" | "/readyz" => {
            let lifecycle = *observed.lifecycle.borrow();
            let health = *observed.health.borrow();
            // A member whose driver stopped (e.g. it lost a name conflict) cannot answer.
            let answers = lifecycle != Lifecycle::Running || (observed.members)().await.is_some();
            let (status, body) = if answers {
                healthz(lifecycle, health)
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unhealthy: the serf member stopped\n".to_owned(),
                )
            };
            text(status, body)
        }
        "/metrics" => {
            let members = (observed.members)().await;
            let mut body = render(
                &Snapshot::of(&observed.stats),
                *observed.health.borrow(),
                members.as_deref(),
            );
            if let Some(kernel) = &observed.kernel {
                body.push_str(&Arc::clone(kernel).render().await);
            }
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /livez, /readyz (or /healthz) or /metrics\n".to_owned(),
        ),
    }
}

/// A plain-text answer (hyper adds its `Content-Length` and `Connection: close`).
fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The `/healthz` answer.
fn healthz(lifecycle: Lifecycle, health: Health) -> (StatusCode, String) {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    match (lifecycle, health) {
        (Lifecycle::Running, Health::Passing) => (StatusCode::OK, "ok\n".to_owned()),
        (Lifecycle::Running, Health::Critical) => (
            unavailable,
            "unhealthy: backend critical (not accepting connections)\n".to_owned(),
        ),
        (Lifecycle::Starting, _) => (unavailable, "unhealthy: starting\n".to_owned()),
        (Lifecycle::Leaving, _) => (unavailable, "unhealthy: leaving the cluster\n".to_owned()),
    }
}

/// One listener's counters at one moment, with its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Snapshot {
    /// `protocol="tcp",listen="0.0.0.0:3306",target="10.0.0.5:3306"` (`role="…"` instead of
    /// `target` for a `connect` listener).
    labels: String,
    accepted: u64,
    active: u64,
    rejected: u64,
    upstream_failures: u64,
    bytes_to_upstream: u64,
    bytes_to_client: u64,
}

impl Snapshot {
    /// Every listener of `stats`, in the order they were bound.
    fn of(stats: &proxy::Stats) -> Vec<Self> {
        stats
            .listeners()
            .iter()
            .map(|l| Self::of_listener(l))
            .collect()
    }

    fn of_listener(listener: &proxy::ListenerStats) -> Self {
        let counts = &listener.counts;
        let (name, value) = &listener.upstream;
        Self {
            labels: format!(
                "protocol=\"{}\",listen=\"{}\",{name}=\"{}\"",
                listener.protocol,
                listener.listen,
                escape(value)
            ),
            accepted: counts.accepted.load(Ordering::Relaxed),
            active: counts.active.load(Ordering::Relaxed) as u64,
            rejected: counts.rejected.load(Ordering::Relaxed),
            upstream_failures: counts.upstream_failures.load(Ordering::Relaxed),
            bytes_to_upstream: counts.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: counts.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

/// A label value in the text format: backslash, double quote and line feed escaped.
fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The Prometheus text exposition of each listener's counters, `health` and member `statuses`.
fn render(listeners: &[Snapshot], health: Health, statuses: Option<&[String]>) -> String {
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
    let per_listener = |value: fn(&Snapshot) -> u64| -> Vec<(&str, u64)> {
        listeners
            .iter()
            .map(|l| (l.labels.as_str(), value(l)))
            .collect()
    };
    metric(
        "amb_serf_connections_total",
        "counter",
        "TCP connections and UDP sessions accepted, per listener.",
        &per_listener(|l| l.accepted),
    );
    metric(
        "amb_serf_connections_active",
        "gauge",
        "Open TCP connections and UDP sessions, per listener.",
        &per_listener(|l| l.active),
    );
    metric(
        "amb_serf_connections_rejected_total",
        "counter",
        "Clients closed at once because --max-connections or the UDP session limit was reached, \
         per listener.",
        &per_listener(|l| l.rejected),
    );
    metric(
        "amb_serf_upstream_failures_total",
        "counter",
        "Upstream connections that failed (refused, timed out, unresolvable), per listener.",
        &per_listener(|l| l.upstream_failures),
    );
    let directions: Vec<(String, u64)> = listeners
        .iter()
        .flat_map(|l| {
            [
                (
                    format!("{},direction=\"to_upstream\"", l.labels),
                    l.bytes_to_upstream,
                ),
                (
                    format!("{},direction=\"to_client\"", l.labels),
                    l.bytes_to_client,
                ),
            ]
        })
        .collect();
    let directions: Vec<(&str, u64)> = directions.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        "amb_serf_bytes_total",
        "counter",
        "Bytes forwarded, per listener and direction.",
        &directions,
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
    metric(
        "amb_serf_build_info",
        "gauge",
        "Always 1; the version of this amb-serf in a label.",
        &[(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")), 1)],
    );
    if let Some(process) = Process::of_self() {
        process.render(&mut out);
    }
    out
}

/// What `/proc/self/stat` is counted in: the boot time (seconds since the epoch), clock ticks
/// a second and the page size.
#[derive(Debug, Clone, Copy)]
struct System {
    boot_time: u64,
    hz: u64,
    page: u64,
}

/// The standard `process_*` metrics of this process, from `/proc`.
#[derive(Debug, Clone, PartialEq)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
    start_time_seconds: f64,
}

impl Process {
    fn of_self() -> Option<Self> {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let boot_time = read("/proc/stat")?
            .lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
        // SAFETY: sysconf has no preconditions.
        let (hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let system = System {
            boot_time,
            hz: hz.max(1) as u64,
            page: page.max(1) as u64,
        };
        Self::parse(
            &read("/proc/self/stat")?,
            &read("/proc/self/limits").unwrap_or_default(),
            system,
            open_fds,
        )
    }

    /// From `/proc/self/stat` and `/proc/self/limits`.
    fn parse(stat: &str, limits: &str, system: System, open_fds: u64) -> Option<Self> {
        let System {
            boot_time,
            hz,
            page,
        } = system;
        // Fields after the command name (which may hold spaces) start after its ')'.
        let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
        // stat(5) numbers fields from 1 with the pid; here field n is index n - 3.
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let max_fds = limits.lines().find_map(|line| {
            line.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / hz as f64,
            resident_bytes: field(24)? * page,
            virtual_bytes: field(23)?,
            open_fds,
            max_fds,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / hz as f64,
        })
    }

    fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.to_string(),
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes.to_string(),
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_bytes.to_string(),
        );
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.to_string(),
        );
        if let Some(max) = self.max_fds {
            metric(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                max.to_string(),
            );
        }
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn process_metrics_from_proc() {
        let stat = "4242 (amb serf) S 1 4242 4242 0 -1 4194560 1227 0 0 0 250 50 0 0 20 0 \
                    5 0 123456 33554432 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 \
                    17 1 0 0 0 0 0";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        let system = super::System {
            boot_time: 1_700_000_000,
            hz: 100,
            page: 4096,
        };
        let process = super::Process::parse(stat, limits, system, 12).expect("parses");
        assert_eq!(process.cpu_seconds, 3.0);
        assert_eq!(process.resident_bytes, 2048 * 4096);
        assert_eq!(process.virtual_bytes, 33_554_432);
        assert_eq!(process.max_fds, Some(1_048_576));
        assert_eq!(process.start_time_seconds, 1_700_001_234.56);
        assert!(super::Process::of_self().is_some());
        let mut text = String::new();
        process.render(&mut text);
        assert!(text.contains("process_cpu_seconds_total 3\n"), "{text}");
        assert!(
            text.contains("# TYPE process_open_fds gauge\nprocess_open_fds 12\n"),
            "{text}"
        );
    }

    #[test]
    fn metrics_text() {
        let stats = Arc::new(proxy::Stats::new(10));
        let listen = "0.0.0.0:3306".parse().unwrap();
        let tcp = stats.listener(listen, proxy::Protocol::Tcp, ("target", "db:3306".into()));
        let udp = "127.0.0.1:53".parse().unwrap();
        stats.listener(udp, proxy::Protocol::Udp, ("role", "dns \"x\"".into()));
        tcp.counts.accepted.store(7, Ordering::Relaxed);
        tcp.counts.active.store(2, Ordering::Relaxed);
        tcp.counts.rejected.store(1, Ordering::Relaxed);
        tcp.counts.upstream_failures.store(3, Ordering::Relaxed);
        tcp.counts.bytes_to_upstream.store(100, Ordering::Relaxed);
        tcp.counts.bytes_to_client.store(2000, Ordering::Relaxed);
        let snapshot = Snapshot::of(&stats);
        let statuses = ["alive", "alive", "left"].map(String::from);
        let text = render(&snapshot, Health::Passing, Some(&statuses));
        let tcp = "protocol=\"tcp\",listen=\"0.0.0.0:3306\",target=\"db:3306\"";
        let udp = "protocol=\"udp\",listen=\"127.0.0.1:53\",role=\"dns \\\"x\\\"\"";
        for line in [
            "# TYPE amb_serf_connections_total counter",
            &format!("amb_serf_connections_total{{{tcp}}} 7"),
            &format!("amb_serf_connections_total{{{udp}}} 0"),
            &format!("amb_serf_connections_active{{{tcp}}} 2"),
            &format!("amb_serf_connections_rejected_total{{{tcp}}} 1"),
            &format!("amb_serf_upstream_failures_total{{{tcp}}} 3"),
            &format!("amb_serf_bytes_total{{{tcp},direction=\"to_upstream\"}} 100"),
            &format!("amb_serf_bytes_total{{{tcp},direction=\"to_client\"}} 2000"),
            "amb_serf_upstream_up 1",
            "amb_serf_members{status=\"alive\"} 2",
            "amb_serf_members{status=\"left\"} 1",
            "amb_serf_members{status=\"failed\"} 0",
        ] {
            let line: &str = line;
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        let critical = render(&snapshot, Health::Critical, None);
        assert!(critical.contains("amb_serf_upstream_up 0"), "{critical}");
        assert!(!critical.contains("amb_serf_members"), "{critical}");
    }

    /// Raw requests through [`serve`], each on its own connection: the answer's head and body.
    #[tokio::test]
    async fn exchanges() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("bound");
        let (_health, health) = watch::channel(Health::Passing);
        let (_lifecycle, lifecycle) = watch::channel(Lifecycle::Starting);
        let observed = Arc::new(Observed {
            stats: Arc::new(proxy::Stats::new(10)),
            health,
            lifecycle,
            members: Arc::new(|| Box::pin(async { Some(vec!["alive".to_owned()]) })),
            kernel: None,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, observed, shutdown.clone()));
        let exchange = |request: String| async move {
            let mut stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connecting");
            stream.write_all(request.as_bytes()).await.expect("sending");
            // Until the server closes (a reset after a refused request ends it too).
            let mut answer = Vec::new();
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                answer.extend_from_slice(&buffer[..n]);
            }
            String::from_utf8(answer).expect("text").to_lowercase()
        };
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        for (request, status, has) in [
            (get("/livez"), "200 ok", "content-length: 3\r\n"),
            (get("/livez"), "200 ok", "\r\n\r\nok\n"),
            (
                get("/readyz"),
                "503 service unavailable",
                "content-length: 20\r\n",
            ),
            (
                get("/healthz"),
                "503 service unavailable",
                "\r\n\r\nunhealthy: starting\n",
            ),
            (get("/metrics?x=1"), "200 ok", "version=0.0.4"),
            (get("/metrics"), "200 ok", "\namb_serf_upstream_up 1\n"),
            (get("/metrics"), "200 ok", "connection: close\r\n"),
            (get("/nope"), "404 not found", "try /livez"),
            (
                "POST /healthz HTTP/1.1\r\n\r\n".into(),
                "405 method not allowed",
                "",
            ),
            ("PING\r\n\r\n".into(), "400 bad request", ""),
            ("GET /healthz SPDY\r\n\r\n".into(), "400 bad request", ""),
            (big, "431 request header fields too large", ""),
        ] {
            let answer = exchange(request.clone()).await;
            assert!(
                answer.starts_with(&format!("http/1.1 {status}\r\n")),
                "{request:?}: {answer}"
            );
            assert!(answer.contains(has), "{request:?}: {answer}");
        }
        // `HEAD`: the head of a `GET`, without the body.
        let head = exchange("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n".into()).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(
            head.contains("version=0.0.4") && head.contains("content-length: "),
            "{head}"
        );
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        shutdown.cancel();
    }
}
