//! `--dns-addr`: the member's DNS interface, answered from live membership. The answers are
//! `dns::Zone::answer` (pure, in `crates/dns`); this is its thin tokio shell: one task follows
//! the registry's changes (`registrar::discovery`) and publishes a new zone on each membership change (no polling), one
//! UDP loop and one TCP accept loop answer from the latest zone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dns::{Config, Transport, Zone};
use rand::rngs::StdRng;
use rand::SeedableRng;
use registrar::discovery::{Change, Changes, Discovery};
use serf::serf::Member;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cmd::UsageError;

/// How long a TCP client may stay silent before we close its connection (RFC 7766 suggests
/// seconds).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP clients served at once; more wait in the accept queue.
const MAX_TCP_CLIENTS: usize = 256;

/// The DNS interface's flags (`run`, `agent`, `connect`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DnsArgs {
    /// Answer DNS queries about the cluster on this address, UDP and TCP (e.g.
    /// 127.0.0.1:8600); off by default.
    #[arg(long, env = "AMB_DNS_ADDR", value_name = "IP:PORT")]
    dns_addr: Option<SocketAddr>,

    /// The zone the DNS interface answers for: `<role>.role.<domain>`,
    /// `_<role>._tcp.<domain>`, `<node>.node.<domain>`; other names are refused.
    #[arg(
        long,
        env = "AMB_DNS_DOMAIN",
        default_value = "serf.",
        value_name = "DOMAIN"
    )]
    dns_domain: String,

    /// TTL of DNS answers, in seconds (0, as Consul's: clients follow membership changes).
    #[arg(long, env = "AMB_DNS_TTL", default_value_t = 0, value_name = "SECONDS")]
    dns_ttl: u32,
}

/// The bound sockets, before the member starts (a busy port fails at startup).
#[derive(Debug)]
pub(crate) struct Bound {
    config: Config,
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsArgs {
    /// Checks the flags and binds UDP and TCP on `--dns-addr` (the same port for both, also
    /// when port 0 is given); `None` without `--dns-addr`.
    pub(crate) async fn bind(&self) -> anyhow::Result<Option<Bound>> {
        let Some(addr) = self.dns_addr else {
            return Ok(None);
        };
        let config = Config::new(&self.dns_domain, self.dns_ttl)
            .map_err(|error| UsageError(error.to_string()))?;
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding --dns-addr {addr} (udp)"))?;
        let addr = udp
            .local_addr()
            .context("reading the DNS socket's address")?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --dns-addr {addr} (tcp)"))?;
        Ok(Some(Bound { config, udp, tcp }))
    }
}

/// Starts answering on `bound` from `discovery`'s membership until `shutdown`.
pub(crate) fn spawn(bound: Bound, discovery: &dyn Discovery, shutdown: CancellationToken) {
    let Bound { config, udp, tcp } = bound;
    if let Ok(addr) = udp.local_addr() {
        info!(%addr, domain = %config.domain, ttl = config.ttl, "dns: answering on udp and tcp");
    }
    let (zone_tx, zone) = watch::channel(Arc::new(Zone::new(config.clone(), 0, [])));
    tokio::spawn(follow(
        discovery.changes(),
        config,
        zone_tx,
        shutdown.clone(),
    ));
    tokio::spawn(serve_udp(udp, zone.clone(), shutdown.clone()));
    tokio::spawn(serve_tcp(tcp, zone, shutdown));
}

/// Keeps the zone equal to the registry's view: a snapshot first, then each change as it
/// arrives. A member that left or failed stays, with its status, until it is reaped.
async fn follow(
    mut changes: Box<dyn Changes>,
    config: Config,
    zone: watch::Sender<Arc<Zone>>,
    shutdown: CancellationToken,
) {
    let mut peers: BTreeMap<String, Member> = BTreeMap::new();
    let mut serial: u32 = 0;
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => break,
            change = changes.next() => change,
        };
        match change {
            Some(Change::Snapshot(members)) => {
                peers = members
                    .into_iter()
                    .map(|peer| (peer.name.clone(), peer))
                    .collect();
            }
            Some(Change::Update(peer) | Change::Departed(peer)) => {
                peers.insert(peer.name.clone(), peer);
            }
            Some(Change::Reaped(name)) => {
                peers.remove(&name);
            }
            None => break,
        }
        serial = serial.wrapping_add(1);
        zone.send_replace(Arc::new(Zone::new(config.clone(), serial, peers.values())));
    }
}

/// One receive loop: each query is answered at once from the latest zone (answering never
/// waits on anything), into buffers reused from query to query.
async fn serve_udp(
    socket: UdpSocket,
    zone: watch::Receiver<Arc<Zone>>,
    shutdown: CancellationToken,
) {
    let mut rng = StdRng::from_os_rng();
    let mut buffer = vec![0; usize::from(u16::MAX)];
    let mut response = Vec::with_capacity(usize::from(dns::MAX_UDP_PAYLOAD));
    loop {
        let (len, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(error) => {
                    // ICMP errors of earlier sends surface here; the socket still works.
                    debug!(%error, "dns: udp receive");
                    continue;
                }
            },
        };
        let current = Arc::clone(&zone.borrow());
        if !current.answer_into(&buffer[..len], Transport::Udp, &mut rng, &mut response) {
            debug!(peer = %from, len, "dns: dropping a datagram that is no query");
            continue;
        }
        if let Err(error) = socket.send_to(&response, from).await {
            debug!(peer = %from, %error, "dns: udp send");
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    zone: watch::Receiver<Arc<Zone>>,
    shutdown: CancellationToken,
) {
    let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&clients).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "dns: tcp accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let zone = zone.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                result = serve_connection(stream, zone) => if let Err(error) = result {
                    debug!(peer = %from, %error, "dns: tcp connection");
                },
            }
            drop(permit);
        });
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2) until the client closes or stays silent.
async fn serve_connection(
    mut stream: TcpStream,
    zone: watch::Receiver<Arc<Zone>>,
) -> std::io::Result<()> {
    let mut rng = StdRng::from_os_rng();
    let mut query = Vec::new();
    let mut response = Vec::new();
    let mut framed = Vec::new();
    loop {
        let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Ok(()),
        };
        query.resize(len, 0);
        tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "query not sent"))??;
        let current = Arc::clone(&zone.borrow());
        // Not a query: close, as there is no answer to send.
        if !current.answer_into(&query, Transport::Tcp, &mut rng, &mut response) {
            return Ok(());
        }
        let Ok(len) = u16::try_from(response.len()) else {
            return Ok(()); // never: TCP answers are fitted to 65,535 bytes
        };
        framed.clear();
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&response);
        stream.write_all(&framed).await?;
    }
}
