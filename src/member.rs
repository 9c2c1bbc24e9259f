//! The member runtime every command that runs a Serf member shares (`agent`, `run`, `connect`,
//! and `members`/`resolve` in join mode).
//!
//! [`MemberArgs`] are the flags (mirroring `serf agent` where they mean the same); [`start`]
//! starts the native member (Serf protocol 5, like the agent), the RPC server on it, the event
//! handlers, and the join loop; the returned [`LocalMember`] is the handle callers keep.
//!
//! Join loop: with no seed (no `--join`/`--retry-join`, no `<ALIAS>_PORT_7946_TCP`, no
//! `<ALIAS>_NAME` or `/etc/hosts` line of the Serf link's alias) the member is a cluster of one
//! and says so. Otherwise it joins every seed it can reach; while none answers
//! it retries with capped exponential backoff (250 ms doubling to 1 s: a seed that comes up is
//! joined within about a second, however long it was away), forever, logging the 1st, 2nd, 4th,
//! 8th… failure so a long outage costs a log line per doubling, not per attempt. Later, whenever every peer is lost (all others failed or left, e.g.
//! serf_1 restarted with an empty member list), it joins the seeds again by itself.
//!
//! A command that runs a member (`run`, `connect`) does, in short:
//!
//! ```text
//! #[derive(clap::Args)] struct Args { #[command(flatten)] member: MemberArgs, … }
//!
//! let mut tags = args.member.tags()?;                  // --tags-file, then --tag
//! tags.insert("role".into(), "3306".into());           // the caller's own tags: complete set
//! let seeds = args.member.gossip.seeds(environment::vars())?; // --join, --retry-join, the link
//! let extras = Extras { handler_env: vec![("AMB_BACKEND_HOST".into(), host)] };
//! let member = member::start(&args.member, tags, seeds, extras).await?;
//! let mut events = member.subscribe();                 // any number of consumers
//! member.set_tags(new_complete_tag_set).await?;        // e.g. on a health change
//! member.leave(Duration::from_secs(10)).await?;        // peers see `left`
//! member.shutdown().await;                             // RPC server, handlers, join loop, gossip
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use registrar::advertise::{Advertiser, BoxError, BoxFuture};
use registrar::tags::{Advertisement, Health};
use serf::serf::{Event, MemberStatus};
use serf_agent::member as driver;
use serf_agent::rpc::agent::{AgentInfo, MemberBackend};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cmd::UsageError;
use serf_agent::handlers::{self, Handler, HandlerEvent, SelfInfo};

/// Serf's gossip port.
pub(crate) const SERF_PORT: u16 = 7946;
/// First and longest pause between join attempts. One attempt is a TCP dial per seed, so a
/// short cap is cheap, and it bounds how late we join a seed that has just come up.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where to join the cluster (shared with `members`/`resolve`, which join only when no agent
/// answers at `--rpc-addr`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GossipArgs {
    /// Node name (default: the hostname, as `serf agent` does).
    #[arg(long, env = "AMB_NODE")]
    pub(crate) node: Option<String>,

    /// Gossip address, UDP and TCP (`serf agent -bind`); an IP alone means port 7946.
    #[arg(long, env = "AMB_BIND", default_value = "0.0.0.0:7946", value_parser = parse_bind)]
    pub(crate) bind: SocketAddr,

    /// Address other members reach us at, `IP` or `IP:PORT` (default: the bind address, or the
    /// first non-loopback IPv4 address of the host when bound to 0.0.0.0).
    #[arg(long, env = "AMB_ADVERTISE", value_parser = parse_advertise)]
    pub(crate) advertise: Option<SocketAddr>,

    /// Join through HOST[:PORT] (repeatable; retried until it answers, like --retry-join).
    #[arg(long = "join", env = "AMB_JOIN", value_delimiter = ',')]
    pub(crate) join: Vec<String>,

    /// Same as --join (`serf agent -retry-join`).
    #[arg(long = "retry-join", env = "AMB_RETRY_JOIN", value_delimiter = ',')]
    pub(crate) retry_join: Vec<String>,

    /// Docker link alias of the Serf agent: join `<ALIAS>_PORT_7946_TCP` when it is set.
    #[arg(long, env = "AMB_SERF_LINK", default_value = "serf_1")]
    pub(crate) serf_link: String,

    /// Replay past user events on join (`serf agent -replay`).
    #[arg(long, env = "AMB_REPLAY")]
    pub(crate) replay: bool,

    /// Gossip encryption key, base64 of 16, 24 or 32 bytes (`serf agent -encrypt`).
    #[arg(
        long,
        env = "AMB_ENCRYPT",
        hide_env_values = true,
        value_name = "BASE64KEY"
    )]
    pub(crate) encrypt: Option<Secret>,

    /// JSON array of base64 keys, the first the primary (`serf agent -keyring-file`); not
    /// together with --encrypt.
    #[arg(long, env = "AMB_KEYRING_FILE", value_name = "PATH")]
    pub(crate) keyring_file: Option<PathBuf>,

    /// Timing of failure detection and gossip, as `serf agent -profile`.
    #[arg(long, env = "AMB_PROFILE", value_enum, default_value_t = Profile::Lan)]
    pub(crate) profile: Profile,
}

/// memberlist's timing profiles (`serf agent -profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Profile {
    /// A local area network (the default).
    Lan,
    /// Across data centres: slower probes and gossip, more patience.
    Wan,
    /// One host: faster probes and gossip.
    Local,
}

impl Profile {
    fn config(self) -> serf::memberlist::Config {
        match self {
            Self::Lan => serf::memberlist::Config::lan(),
            Self::Wan => serf::memberlist::Config::wan(),
            Self::Local => serf::memberlist::Config::local(),
        }
    }
}

/// A flag value that must never be printed (an encryption key).
#[derive(Clone)]
pub(crate) struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Rewrites a keyring file (JSON array of base64 keys, primary first, mode 0600) by writing a
/// temporary file next to it and renaming it over the old one.
fn write_keyring_file(
    path: &std::path::Path,
    ring: &serf::wire::crypto::Keyring,
) -> Result<(), String> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let keys: Vec<String> = ring
        .keys()
        .map(|key| base64::engine::general_purpose::STANDARD.encode(key))
        .collect();
    let json = serde_json::to_string(&keys).map_err(|error| error.to_string())?;
    let temporary = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(json.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, path));
    match written {
        Ok(()) => {
            info!(path = %path.display(), keys = keys.len(), "keyring file updated");
            Ok(())
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "failed to write keyring file");
            Err(format!(
                "Failed to write keyring file {}: {error}",
                path.display()
            ))
        }
    }
}

/// One base64 key from `what` (a flag, or a file entry); errors never show the key.
fn decode_key(what: &str, key: &str) -> Result<Vec<u8>, UsageError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|_| UsageError(format!("{what}: the key is not valid base64")))?;
    match bytes.len() {
        16 | 24 | 32 => Ok(bytes),
        other => Err(UsageError(format!(
            "{what}: the key is {other} bytes; it must be 16, 24 or 32 (AES-128/192/256)"
        ))),
    }
}

/// Flags of every command that runs a long-lived member.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MemberArgs {
    #[command(flatten)]
    pub(crate) gossip: GossipArgs,

    /// Tag KEY=VALUE (repeatable; AMB_TAG takes one per line, since values may contain
    /// commas, e.g. `ports=3306/tcp,33060/tcp`).
    #[arg(
        long = "tag",
        env = "AMB_TAG",
        value_name = "KEY=VALUE",
        value_parser = parse_tag,
        value_delimiter = '\n'
    )]
    pub(crate) tags: Vec<Option<(String, String)>>,

    /// JSON file of tags (`serf agent -tags-file`); created and kept up to date.
    #[arg(long, env = "AMB_TAGS_FILE")]
    pub(crate) tags_file: Option<PathBuf>,

    /// RPC address for the `serf` command line; empty disables the RPC server.
    #[arg(long, env = "AMB_RPC_ADDR", default_value = "127.0.0.1:7373")]
    pub(crate) rpc_addr: String,

    /// RPC auth key clients must send.
    #[arg(long, env = "AMB_RPC_AUTH", hide_env_values = true)]
    pub(crate) rpc_auth: Option<String>,

    /// Event handler, `[type[:name][,…]=]command` as in `serf agent` (repeatable).
    #[arg(long = "event-handler", env = "AMB_EVENT_HANDLER")]
    pub(crate) event_handlers: Vec<String>,
}

/// `KEY=VALUE`; a blank line of `AMB_TAG` is no tag.
fn parse_tag(value: &str) -> Result<Option<(String, String)>, String> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    match value.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok(Some((key.trim().to_owned(), value.to_owned())))
        }
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}

/// `IP:PORT`, or an IP alone (`10.0.0.5`, `[::1]`, `::1`) on Serf's port 7946, as `serf agent
/// -bind` reads it.
fn parse_bind(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    match ip.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, 7946)),
        Err(_) => Err(format!("{value:?} is not IP or IP:PORT")),
    }
}

fn parse_advertise(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match value.parse::<IpAddr>() {
        // Port 0: the port actually bound.
        Ok(ip) => Ok(SocketAddr::new(ip, 0)),
        Err(_) => Err(format!("{value:?} is not IP or IP:PORT")),
    }
}

impl MemberArgs {
    /// The tags from `--tags-file` (if it exists) overlaid with `--tag`: the base of the
    /// complete tag set a caller passes to [`start`].
    pub(crate) fn tags(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut tags = BTreeMap::new();
        if let Some(path) = &self.tags_file {
            if path.exists() {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --tags-file {}", path.display()))?;
                let from_file: BTreeMap<String, String> =
                    serde_json::from_str(&text).map_err(|error| {
                        UsageError(format!(
                            "--tags-file {}: not a JSON object of strings: {error}",
                            path.display()
                        ))
                    })?;
                tags.extend(from_file);
            }
        }
        tags.extend(self.tags.iter().flatten().cloned());
        Ok(tags)
    }

    pub(crate) fn handlers(&self) -> anyhow::Result<Vec<Handler>> {
        self.event_handlers
            .iter()
            .map(|spec| {
                Handler::parse(spec)
                    .map_err(|error| UsageError(format!("--event-handler: {error}")).into())
            })
            .collect()
    }
}

impl GossipArgs {
    /// The gossip keyring from `--encrypt` or `--keyring-file` (`None`: plaintext gossip). Bad
    /// keys are usage errors naming the flag (and the file entry), never the key.
    pub(crate) fn keyring(&self) -> Result<Option<serf::wire::crypto::Keyring>, UsageError> {
        let keys = match (&self.encrypt, &self.keyring_file) {
            (Some(_), Some(_)) => {
                return Err(UsageError(
                    "--encrypt and --keyring-file cannot be used together (Encryption key not allowed while using a keyring)".to_owned(),
                ))
            }
            (None, None) => return Ok(None),
            (Some(Secret(key)), None) => vec![decode_key("--encrypt", key)?],
            (None, Some(path)) => {
                let what = format!("--keyring-file {}", path.display());
                let text = std::fs::read_to_string(path)
                    .map_err(|error| UsageError(format!("{what}: {error}")))?;
                let entries: Vec<String> = serde_json::from_str(&text).map_err(|_| {
                    UsageError(format!("{what}: not a JSON array of base64 key strings"))
                })?;
                if entries.is_empty() {
                    return Err(UsageError(format!("{what}: the keyring file contains no keys")));
                }
                entries
                    .iter()
                    .enumerate()
                    .map(|(index, key)| decode_key(&format!("{what} entry {index}"), key))
                    .collect::<Result<_, _>>()?
            }
        };
        serf::wire::crypto::Keyring::new(&keys)
            .map(Some)
            .map_err(|error| UsageError(format!("gossip keyring: {error}")))
    }

    /// The keyring shared with the member; with `--keyring-file`, every change a key query
    /// makes is written back to the file (as `serf agent` does).
    fn shared_keyring(
        &self,
        keyring: serf::wire::crypto::Keyring,
    ) -> serf::wire::crypto::SharedKeyring {
        let shared = serf::wire::crypto::SharedKeyring::new(keyring);
        match self.keyring_file.clone() {
            Some(path) => shared.with_on_change(move |ring| write_keyring_file(&path, ring)),
            None => shared,
        }
    }

    /// The node name: `--node` or the hostname.
    pub(crate) fn node_name(&self) -> String {
        self.node
            .clone()
            .unwrap_or_else(registrar::address::hostname)
    }

    /// The seeds to join (see [`GossipArgs::find_seeds`]), each logged with the rule that
    /// found it. Reads `/etc/hosts` (for a link with no port variable).
    pub(crate) fn seeds(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Vec<String>> {
        let etc_hosts = std::fs::read_to_string(ETC_HOSTS).ok();
        let seeds = self.find_seeds(vars, etc_hosts.as_deref())?;
        for seed in &seeds {
            info!(seed = %seed.addr, rule = %seed.rule, "seed to join");
        }
        Ok(seeds.into_iter().map(|seed| seed.addr).collect())
    }

    /// The seeds to join, in order: `--join`, `--retry-join`, then the Serf link. The link
    /// gives its `<ALIAS>_PORT_7946_TCP` address; a link with no port variable (an image
    /// without `EXPOSE`: Docker then sets only `<ALIAS>_NAME` and the `/etc/hosts` line) gives
    /// `<alias>:7946`, when `<ALIAS>_NAME` is set or `etc_hosts` names the alias. Pure: the
    /// caller reads the environment and `/etc/hosts`. A malformed link variable is a usage
    /// error naming it.
    pub(crate) fn find_seeds(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
        etc_hosts: Option<&str>,
    ) -> Result<Vec<Seed>, UsageError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut seeds: Vec<Seed> = Vec::new();
        let mut add = |addr: String, rule: String| {
            if !seeds.iter().any(|seed| seed.addr == addr) {
                seeds.push(Seed { addr, rule });
            }
        };
        // Comma-separated lists from the environment may carry spaces and stray commas.
        let listed = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|addr| addr.trim().to_owned())
                .filter(|addr| !addr.is_empty())
                .collect()
        };
        for addr in listed(&self.join) {
            add(addr, "--join".to_owned());
        }
        for addr in listed(&self.retry_join) {
            add(addr, "--retry-join".to_owned());
        }
        let link = proxy::link_env::link_ports(vars.iter().cloned(), &self.serf_link)
            .map_err(|error| UsageError(error.to_string()))?;
        let gossip_ports: Vec<_> = link
            .iter()
            .filter(|spec| {
                spec.listen_port == SERF_PORT && spec.protocol == proxy::link_env::Protocol::Tcp
            })
            .collect();
        for spec in &gossip_ports {
            let var = match &spec.origin {
                proxy::link_env::Origin::Link { var, .. } => var.as_str(),
                proxy::link_env::Origin::Forward(_) => "",
            };
            add(spec.target.to_string(), format!("link variable {var}"));
        }
        if gossip_ports.is_empty() {
            let alias = &self.serf_link;
            let rule = match proxy::link_env::link_name_var(vars, alias) {
                Some(name) => Some(format!(
                    "link {name} without a port variable (the linked image exposes no port)"
                )),
                None => etc_hosts
                    .is_some_and(|hosts| hosts_names(hosts, alias))
                    .then(|| {
                        format!("{ETC_HOSTS} names the link alias {alias} (no link variable)")
                    }),
            };
            if let Some(rule) = rule {
                add(format!("{alias}:{SERF_PORT}"), rule);
            }
        }
        Ok(seeds)
    }

    /// The advertised address for `bound`.
    fn advertise_for(&self, bound: SocketAddr) -> SocketAddr {
        let ip = match self.advertise {
            Some(advertise) if advertise.port() != 0 => return advertise,
            Some(advertise) => advertise.ip(),
            None if bound.ip().is_unspecified() => registrar::address::advertised_ip(),
            None => bound.ip(),
        };
        SocketAddr::new(ip, bound.port())
    }
}

/// A seed to join and the rule that found it (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seed {
    /// `HOST[:PORT]`.
    pub(crate) addr: String,
    /// Why: `--join`, `link variable SERF_1_PORT_7946_TCP`, ….
    pub(crate) rule: String,
}

/// Where Docker writes a link's alias (`172.17.0.2 serf_1 3f2a… amb-serf_1`).
const ETC_HOSTS: &str = "/etc/hosts";

/// Whether a hosts file (`/etc/hosts` syntax) gives an address for `name`.
fn hosts_names(hosts: &str, name: &str) -> bool {
    hosts.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        fields.next().is_some_and(|ip| ip.parse::<IpAddr>().is_ok())
            && fields.any(|host| host.eq_ignore_ascii_case(name))
    })
}

/// What a caller adds to [`start`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Extras {
    /// Extra environment for event handlers (e.g. `AMB_BACKEND_HOST`/`AMB_BACKEND_PORT`).
    pub(crate) handler_env: Vec<(String, String)>,
}

/// A running member. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct LocalMember {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handle: driver::Handle,
    name: String,
    rpc_addr: Option<SocketAddr>,
    events: broadcast::Sender<Event>,
    joined: watch::Receiver<bool>,
    tags: Mutex<BTreeMap<String, String>>,
    tags_file: Option<PathBuf>,
    /// The event handlers in force (replaced on SIGHUP, [`LocalMember::set_event_handlers`]).
    handlers: watch::Sender<Arc<Vec<Handler>>>,
    shutdown: CancellationToken,
    stop_requested: CancellationToken,
    tasks: TaskTracker,
}

/// Starts the member with the complete initial `tags` (usually [`MemberArgs::tags`] plus the
/// caller's own) and `seeds` from [`GossipArgs::seeds`].
pub(crate) async fn start(
    args: &MemberArgs,
    tags: BTreeMap<String, String>,
    seeds: Vec<String>,
    extras: Extras,
) -> anyhow::Result<LocalMember> {
    let handlers = args.handlers()?;
    let rpc_addr = if args.rpc_addr.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.rpc_addr)
                .await
                .with_context(|| format!("binding --rpc-addr {}", args.rpc_addr))?,
        )
    };
    let settings = Settings {
        rpc_auth: args.rpc_auth.clone(),
        tags_file: args.tags_file.clone(),
        event_handlers: args.event_handlers.clone(),
    };
    let member = start_member(&args.gossip, tags, seeds, rpc_addr, settings).await?;
    member.write_tags_file()?;
    member.spawn_handlers(handlers, extras.handler_env);
    Ok(member)
}

/// Starts a member with no handlers, tags file or fixed RPC address: join mode of `members`
/// and `resolve`. The RPC server listens on an ephemeral loopback port ([`LocalMember::rpc_addr`]),
/// so those commands render the member's view with their usual RPC code.
pub(crate) async fn start_joiner(
    gossip: &GossipArgs,
    tags: BTreeMap<String, String>,
    seeds: Vec<String>,
) -> anyhow::Result<LocalMember> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding an rpc port on 127.0.0.1")?;
    start_member(gossip, tags, seeds, Some(listener), Settings::default()).await
}

/// What only long-lived members have.
#[derive(Debug, Default)]
struct Settings {
    rpc_auth: Option<String>,
    tags_file: Option<PathBuf>,
    event_handlers: Vec<String>,
}

async fn start_member(
    gossip: &GossipArgs,
    tags: BTreeMap<String, String>,
    seeds: Vec<String>,
    rpc: Option<tokio::net::TcpListener>,
    settings: Settings,
) -> anyhow::Result<LocalMember> {
    let keyring = gossip.keyring()?;
    let encrypted = keyring.is_some();
    let name = gossip.node_name();
    let config = serf::serf::Config {
        node_name: name.clone(),
        tags: tags.clone(),
        protocol_version: 5,
        ..serf::serf::Config::default()
    };
    let mut options = serf_agent::driver::Options::new(name.clone(), gossip.bind);
    options.advertise = Some(gossip.advertise_for(gossip.bind));
    options.config = gossip.profile.config();
    options.keyring = keyring.map(|keyring| gossip.shared_keyring(keyring));
    let gossip_interval = options.config.gossip_interval;
    let query_timeout_mult = config.query_timeout_mult;
    let (handle, mut layer_events) =
        driver::start(config, options)
            .await
            .map_err(|error| match error {
                driver::Error::Serf(serf) => anyhow::Error::new(UsageError(serf.to_string())),
                other => anyhow::Error::new(other)
                    .context(format!("starting the serf member on {}", gossip.bind)),
            })?;
    let bound = handle.local_addr();
    let advertise = gossip.advertise_for(bound);
    info!(node = %name, %bound, %advertise, encrypted, "serf member started");

    let shutdown = CancellationToken::new();
    let stop_requested = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (events, _) = broadcast::channel(1024);
    let (joined_tx, joined) = watch::channel(false);

    let backend = Arc::new(MemberBackend::new(
        handle.clone(),
        AgentInfo {
            node_name: name.clone(),
            event_handlers: settings.event_handlers,
            gossip_interval,
            query_timeout_mult,
        },
        crate::logs::ring(),
        stop_requested.clone(),
    ));
    let rpc_addr = match rpc {
        Some(listener) => {
            let addr = listener.local_addr().context("reading the rpc address")?;
            if !addr.ip().is_loopback()
                && settings.rpc_auth.as_deref().unwrap_or_default().is_empty()
            {
                warn!(%addr, "rpc is reachable beyond loopback without --rpc-auth: anyone who can connect can control this member");
            }
            let server = serf_agent::rpc::Server::new(
                Arc::clone(&backend),
                serf_agent::rpc::Config {
                    auth_key: settings.rpc_auth,
                    ..serf_agent::rpc::Config::default()
                },
            );
            tasks.spawn(server.serve(listener, shutdown.child_token()));
            info!(%addr, "rpc server listening");
            Some(addr)
        }
        None => None,
    };

    let member = LocalMember {
        inner: Arc::new(Inner {
            handle,
            name,
            rpc_addr,
            events,
            joined,
            tags: Mutex::new(tags),
            tags_file: settings.tags_file,
            handlers: watch::channel(Arc::new(Vec::new())).0,
            shutdown,
            stop_requested,
            tasks,
        }),
    };
    // Fan-out of the member's events: the RPC backend and every subscriber. Our own tag
    // changes (also those made over RPC, `serf tags`) are recorded here.
    let fanout = member.clone();
    let token = member.inner.shutdown.clone();
    member.inner.tasks.spawn(async move {
        loop {
            let event = tokio::select! {
                () = token.cancelled() => break,
                event = layer_events.recv() => event,
            };
            let Some(event) = event else { break };
            backend.handle_event(&event);
            if let Event::MemberUpdate(updated) = &event {
                if updated.name == fanout.inner.name {
                    fanout.record_tags(updated.tags.clone());
                }
            }
            let _ = fanout.inner.events.send(event);
        }
    });
    member.spawn_join_loop(seeds, !gossip.replay, joined_tx);
    Ok(member)
}

impl LocalMember {
    /// Our node name.
    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where the RPC server listens, if it runs.
    pub(crate) fn rpc_addr(&self) -> Option<SocketAddr> {
        self.inner.rpc_addr
    }

    /// Replaces our tags with `tags` (the complete set).
    pub(crate) async fn set_tags(&self, tags: BTreeMap<String, String>) -> anyhow::Result<()> {
        self.inner
            .handle
            .set_tags(tags.clone())
            .await
            .context("setting tags")?;
        *self.inner.tags.lock().expect("tags lock is never poisoned") = tags;
        self.write_tags_file()
    }

    /// Our current tags as last set through this handle.
    pub(crate) fn tags(&self) -> BTreeMap<String, String> {
        self.inner
            .tags
            .lock()
            .expect("tags lock is never poisoned")
            .clone()
    }

    /// Every event of the member from now on (membership, user events, queries, join and
    /// leave completion). A consumer that falls behind by 1024 events gets `Lagged`.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Every member we know, ourselves included.
    pub(crate) async fn members(&self) -> anyhow::Result<Vec<serf::serf::Member>> {
        Ok(self.inner.handle.members().await?)
    }

    /// Resolves when the first join completed (a push-pull with a seed merged its state).
    /// Never resolves for a cluster of one.
    pub(crate) async fn joined(&self) {
        let mut joined = self.inner.joined.clone();
        let _ = joined.wait_for(|joined| *joined).await;
    }

    /// Resolves when an RPC client asked the member to stop (`serf leave`).
    pub(crate) async fn stop_requested(&self) {
        self.inner.stop_requested.cancelled().await;
    }

    /// Leaves gracefully (peers see `left`), bounded by `timeout`.
    pub(crate) async fn leave(&self, timeout: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(timeout, self.inner.handle.leave()).await {
            Ok(result) => result.context("leaving the cluster"),
            Err(_) => anyhow::bail!("leaving the cluster took longer than {timeout:?}"),
        }
    }

    /// Stops everything (RPC server, handlers, join loop, the member) and waits for the tasks.
    /// Call [`leave`](Self::leave) first so peers see `left` rather than `failed`.
    pub(crate) async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
        self.inner.handle.shutdown();
    }

    fn record_tags(&self, tags: BTreeMap<String, String>) {
        *self.inner.tags.lock().expect("tags lock is never poisoned") = tags;
        if let Err(error) = self.write_tags_file() {
            warn!(error = %format!("{error:#}"), "tags changed");
        }
    }

    /// Keeps `--tags-file` equal to our tags, as `serf agent -tags-file` does.
    fn write_tags_file(&self) -> anyhow::Result<()> {
        let Some(path) = &self.inner.tags_file else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&self.tags()).expect("string maps encode");
        std::fs::write(path, text)
            .with_context(|| format!("writing --tags-file {}", path.display()))
    }

    /// This member's view as a [`Discovery`](registrar::discovery::Discovery): its member list,
    /// then its membership events.
    pub(crate) fn discovery(&self) -> registrar::discovery::SerfDiscovery {
        registrar::discovery::SerfDiscovery::new(
            self.inner.events.clone(),
            self.inner.handle.clone(),
        )
    }

    /// Replaces the event handlers (`serf agent` reloads them on SIGHUP); the next event
    /// runs the new ones.
    pub(crate) fn set_event_handlers(&self, handlers: Vec<Handler>) {
        self.inner.handlers.send_replace(Arc::new(handlers));
    }

    fn spawn_handlers(&self, handlers: Vec<Handler>, extra_env: Vec<(String, String)>) {
        self.set_event_handlers(handlers);
        let current = self.inner.handlers.subscribe();
        let mut events = self.subscribe();
        let member = self.clone();
        let token = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    () = token.cancelled() => break,
                    event = events.recv() => event,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(skipped = n, "event handlers fell behind; events skipped");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let handlers = Arc::clone(&current.borrow());
                if handlers.is_empty() {
                    continue;
                }
                let Some((handler_event, responder)) = HandlerEvent::from_event(&event) else {
                    continue;
                };
                let me = SelfInfo {
                    name: member.name().to_owned(),
                    tags: member.tags(),
                    extra_env: extra_env.clone(),
                };
                let output = handlers::dispatch(&handlers, &me, &handler_event).await;
                if let (Some(id), Some(output)) = (responder, output) {
                    if let Err(error) = member.inner.handle.respond(id, &output).await {
                        warn!(%error, "query response from the event handler refused");
                    }
                }
            }
        });
    }

    fn spawn_join_loop(&self, seeds: Vec<String>, ignore_old: bool, joined: watch::Sender<bool>) {
        if seeds.is_empty() {
            info!(
                "no seed to join (no --join, no Serf link variable, link name or /etc/hosts entry): running as a cluster of one"
            );
            return;
        }
        let member = self.clone();
        let token = self.inner.shutdown.clone();
        let mut events = self.subscribe();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = member.join_until_done(&seeds, ignore_old) => {}
                }
                let _ = joined.send(true);
                // Wait until every peer is lost, then join again.
                loop {
                    let event = tokio::select! {
                        () = token.cancelled() => return,
                        event = events.recv() => event,
                    };
                    let lost = match event {
                        Ok(
                            Event::MemberFailed(_) | Event::MemberLeave(_) | Event::MemberReap(_),
                        ) => true,
                        Ok(Event::LeaveCompleted) => return,
                        Ok(_) => false,
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if lost && !member.has_alive_peers().await {
                        warn!("every peer is gone; joining the seeds again");
                        break;
                    }
                }
            }
        });
    }

    async fn has_alive_peers(&self) -> bool {
        match self.inner.handle.members().await {
            Ok(members) => members
                .iter()
                .any(|m| m.name != self.inner.name && m.status == MemberStatus::Alive),
            // A stopped member has nothing to rejoin with.
            Err(_) => true,
        }
    }

    /// Tries the seeds until one answers, backing off between rounds.
    async fn join_until_done(&self, seeds: &[String], ignore_old: bool) {
        let mut backoff = BACKOFF_MIN;
        let mut failures: u32 = 0;
        loop {
            match self.join_once(seeds, ignore_old).await {
                Ok(contacted) => {
                    info!(contacted, seeds = ?seeds, "joined the cluster");
                    return;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if failures.is_power_of_two() {
                        warn!(seeds = ?seeds, failures, retry_in = ?backoff, error = %format!("{error:#}"), "no seed reachable");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn join_once(&self, seeds: &[String], ignore_old: bool) -> anyhow::Result<usize> {
        let mut addrs = Vec::new();
        for seed in seeds {
            let with_port = if seed
                .rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            {
                seed.clone()
            } else {
                format!("{seed}:{SERF_PORT}")
            };
            match tokio::net::lookup_host(with_port).await {
                Ok(found) => addrs.extend(found.filter(SocketAddr::is_ipv4).take(1)),
                Err(error) => tracing::debug!(%seed, %error, "seed does not resolve"),
            }
        }
        anyhow::ensure!(!addrs.is_empty(), "no seed resolves");
        Ok(self.inner.handle.join(&addrs, ignore_old).await?)
    }
}

/// The Serf side of advertising: health-gated tags (`set_tags`, keeping the tags others set),
/// the leave on stop, `serf leave` over RPC as a stop request.
impl Advertiser for LocalMember {
    fn name(&self) -> &str {
        Self::name(self)
    }

    fn follow_health(
        &self,
        advertisement: Advertisement,
        applied: Option<BTreeMap<String, String>>,
        health: watch::Receiver<Health>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let member = self.clone();
        Box::pin(registrar::advertise::apply_tags(
            advertisement,
            applied,
            health,
            move |tags| {
                let member = member.clone();
                let tags = registrar::advertisement::with_current_extras(tags, member.tags());
                async move { member.set_tags(tags).await.map_err(|e| format!("{e:#}")) }
            },
            stop,
        ))
    }

    fn stop_requested(&self) -> BoxFuture<'_, ()> {
        Box::pin(Self::stop_requested(self))
    }

    fn withdraw(&mut self, timeout: Duration) -> BoxFuture<'_, Result<&'static str, BoxError>> {
        Box::pin(async move {
            self.leave(timeout)
                .await
                .map_err(|error| BoxError::from(format!("{error:#}")))?;
            Ok("left the cluster, peers show `left`")
        })
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { Self::shutdown(&self).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        member: MemberArgs,
    }

    fn args(flags: &[&str]) -> MemberArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("valid flags").member
    }

    #[test]
    fn a_profile_picks_memberlist_timing() {
        assert_eq!(
            args(&[]).gossip.profile.config(),
            serf::memberlist::Config::lan()
        );
        let wan = args(&["--profile", "wan"]).gossip.profile.config();
        assert_eq!(wan, serf::memberlist::Config::wan());
    }

    #[test]
    fn a_bind_address_without_port_is_on_7946() {
        assert_eq!(
            args(&["--bind", "10.0.0.5"]).gossip.bind.to_string(),
            "10.0.0.5:7946"
        );
        assert_eq!(
            args(&["--bind", "[::1]"]).gossip.bind.to_string(),
            "[::1]:7946"
        );
        assert_eq!(
            args(&["--bind", "127.0.0.1:1"]).gossip.bind.to_string(),
            "127.0.0.1:1"
        );
        assert!(parse_bind("host").is_err());
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// Seeds and their rules from `flags`, `env` and an `/etc/hosts` text.
    fn seeds(flags: &[&str], env: &[(&str, &str)], hosts: Option<&str>) -> Vec<(String, String)> {
        args(flags)
            .gossip
            .find_seeds(vars(env), hosts)
            .expect("valid seeds")
            .into_iter()
            .map(|seed| (seed.addr, seed.rule))
            .collect()
    }

    #[test]
    fn seeds_come_from_flags_then_the_serf_link() {
        let check = |flags: &[&str], env: &[(&str, &str)], expected: &[&str]| {
            let found: Vec<String> = seeds(flags, env, None)
                .into_iter()
                .map(|(addr, _)| addr)
                .collect();
            assert_eq!(found, expected, "{flags:?} {env:?}");
        };
        check(&[], &[], &[]);
        // AMB_JOIN='127.0.0.1:1, 127.0.0.1:27964,' as clap splits it.
        check(
            &["--join", "127.0.0.1:1, 127.0.0.1:27964,"],
            &[],
            &["127.0.0.1:1", "127.0.0.1:27964"],
        );
        check(
            &[],
            &[("SERF_1_PORT_7946_TCP", "tcp://172.17.0.2:7946")],
            &["172.17.0.2:7946"],
        );
        // Only the 7946/tcp port of the link is a gossip address.
        check(
            &[],
            &[
                ("SERF_1_PORT_7373_TCP", "tcp://172.17.0.2:7373"),
                ("SERF_1_PORT_7946_UDP", "udp://172.17.0.2:7946"),
            ],
            &[],
        );
        check(
            &[
                "--serf-link",
                "seed",
                "--join",
                "a:1",
                "--retry-join",
                "b:2",
            ],
            &[
                ("SEED_PORT_7946_TCP", "tcp://10.0.0.9:7946"),
                ("SERF_1_PORT_7946_TCP", "tcp://172.17.0.2:7946"),
            ],
            &["a:1", "b:2", "10.0.0.9:7946"],
        );
        // The same seed twice is joined once, wherever it came from.
        check(
            &["--join", "a:1", "--retry-join", "a:1", "--join", "b:2"],
            &[],
            &["a:1", "b:2"],
        );
    }

    /// `--link serf_1:serf_1` to an image with no `EXPOSE` (issue #26): Docker sets no port
    /// variable, only `SERF_1_NAME` and the alias's `/etc/hosts` line. The alias is the seed.
    #[test]
    fn a_serf_link_without_a_port_variable_joins_its_alias() {
        const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n\
                             172.17.0.2\tserf_1 3f2a9c1d77e0 amb-serf_1\n\
                             172.17.0.3\tamb # serf_1 in a comment\n";
        let check = |flags: &[&str],
                     env: &[(&str, &str)],
                     hosts: Option<&str>,
                     expected: &[(&str, &str)]| {
            let found = seeds(flags, env, hosts);
            let expected: Vec<(String, String)> = expected
                .iter()
                .map(|(addr, rule)| ((*addr).to_owned(), (*rule).to_owned()))
                .collect();
            assert_eq!(found, expected, "{flags:?} {env:?} {hosts:?}");
        };
        let by_name = "link SERF_1_NAME without a port variable (the linked image exposes no port)";
        let by_hosts = "/etc/hosts names the link alias serf_1 (no link variable)";
        check(
            &[],
            &[("SERF_1_NAME", "/amb/serf_1")],
            None,
            &[("serf_1:7946", by_name)],
        );
        check(
            &[],
            &[("SERF_1_NAME", "/amb/serf_1")],
            Some(HOSTS),
            &[("serf_1:7946", by_name)],
        );
        check(&[], &[], Some(HOSTS), &[("serf_1:7946", by_hosts)]);
        // With the port variable, it alone is the link's seed.
        check(
            &[],
            &[
                ("SERF_1_NAME", "/amb/serf_1"),
                ("SERF_1_PORT_7946_TCP", "tcp://172.17.0.2:7946"),
            ],
            Some(HOSTS),
            &[("172.17.0.2:7946", "link variable SERF_1_PORT_7946_TCP")],
        );
        // A link exposing only other ports still names the alias.
        check(
            &[],
            &[
                ("SERF_1_NAME", "/amb/serf_1"),
                ("SERF_1_PORT_7373_TCP", "tcp://172.17.0.2:7373"),
            ],
            None,
            &[("serf_1:7946", by_name)],
        );
        // Added to --join, as the port variable is.
        check(
            &["--join", "10.0.0.1"],
            &[("SERF_1_NAME", "/amb/serf_1")],
            None,
            &[("10.0.0.1", "--join"), ("serf_1:7946", by_name)],
        );
        check(
            &["--join", "serf_1:7946"],
            &[],
            Some(HOSTS),
            &[("serf_1:7946", "--join")],
        );
        // Another alias, case-insensitive in /etc/hosts as name lookups are.
        check(
            &["--serf-link", "seed"],
            &[],
            Some("10.0.0.7 SEED\n"),
            &[(
                "seed:7946",
                "/etc/hosts names the link alias seed (no link variable)",
            )],
        );
        // Nothing names the alias: a cluster of one.
        check(
            &[],
            &[("MYSQL_NAME", "/amb/mysql")],
            Some("127.0.0.1 localhost\n"),
            &[],
        );
        check(&[], &[], Some("172.17.0.3 amb # serf_1\nserf_1\n"), &[]);
        check(&[], &[("SERF_1_NAME", "not-docker")], None, &[]);
    }

    #[test]
    fn a_malformed_link_variable_is_a_usage_error_naming_it() {
        let error = args(&[])
            .gossip
            .find_seeds(vars(&[("SERF_1_PORT_7946_TCP", "tcp://nowhere")]), None)
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("SERF_1_PORT_7946_TCP"),
            "{error:#}"
        );
    }

    #[test]
    fn tags_and_advertise_flags() {
        assert_eq!(
            parse_tag("role=3306"),
            Ok(Some(("role".into(), "3306".into())))
        );
        assert_eq!(parse_tag("k=a=b"), Ok(Some(("k".into(), "a=b".into()))));
        assert_eq!(parse_tag(" k=a,b"), Ok(Some(("k".into(), "a,b".into()))));
        assert_eq!(parse_tag("  "), Ok(None), "a blank line of AMB_TAG");
        assert!(parse_tag("=x").is_err());
        assert!(parse_tag("novalue").is_err());
        assert_eq!(
            parse_advertise("10.0.0.5"),
            Ok("10.0.0.5:0".parse().unwrap())
        );
        assert_eq!(
            parse_advertise("10.0.0.5:8000"),
            Ok("10.0.0.5:8000".parse().unwrap())
        );
        assert!(parse_advertise("host:1")
            .unwrap_err()
            .contains("\"host:1\""));
        let tags = args(&["--tag", "ports=3306/tcp,33060/tcp"]).tags().unwrap();
        assert_eq!(tags["ports"], "3306/tcp,33060/tcp");
        let tags = args(&["--tag", "a=1", "--tag", "b=2"]).tags().unwrap();
        assert_eq!(
            tags,
            BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())])
        );
    }

    #[test]
    fn the_advertised_address() {
        let check = |flags: &[&str], bound: &str, expected: &str| {
            let advertised = args(flags).gossip.advertise_for(bound.parse().unwrap());
            assert_eq!(advertised, expected.parse().unwrap(), "{flags:?} {bound}");
        };
        check(&[], "127.0.0.2:7946", "127.0.0.2:7946");
        check(
            &["--advertise", "10.0.0.5"],
            "0.0.0.0:7946",
            "10.0.0.5:7946",
        );
        check(
            &["--advertise", "10.0.0.5:9000"],
            "0.0.0.0:7946",
            "10.0.0.5:9000",
        );
    }
}
