//! The flags of every command that runs a Serf member (`agent`, `run`, `connect`, and
//! `members`/`resolve` in join mode), and their conversion to [`registrar::serf::Settings`].
//!
//! [`MemberArgs`] are the flags (mirroring `serf agent` where they mean the same); [`start`]
//! binds the RPC address and starts [`registrar::serf::start`] (the member, its RPC server,
//! event handlers and join loop); the returned [`LocalMember`] is the handle callers keep.
//! [`GossipArgs::find_seeds`] is pure ([`registrar::serf::seeds::find`]): env pairs and the
//! `/etc/hosts` text → the seeds, each with the rule that found it. With no seed the member is a cluster of one.
//!
//! ```text
//! let mut tags = args.member.tags()?;                  // --tags-file, then --tag
//! tags.insert("role".into(), "3306".into());           // the caller's own tags: complete set
//! let seeds = args.member.gossip.seeds(environment::vars())?; // --join, --retry-join, the link
//! let extras = Extras { handler_env: vec![("AMB_BACKEND_HOST".into(), host)] };
//! let member = member::start(&args.member, tags, seeds, extras).await?;
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use serf_agent::handlers::Handler;
use tracing::{info, warn};

use crate::cmd::UsageError;

pub(crate) use registrar::serf::seeds::{Seed, ETC_HOSTS};
pub(crate) use registrar::serf::LocalMember;

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

    /// Keep Go's snapshot file here (`serf agent -snapshot`): a restart continues the Lamport
    /// clocks (no replayed events) and rejoins the members alive in it, even without --join.
    #[arg(long, env = "AMB_SNAPSHOT", value_name = "PATH")]
    pub(crate) snapshot: Option<PathBuf>,

    /// Rejoin the snapshot's members even after a graceful leave (`serf agent -rejoin`);
    /// without --snapshot it does nothing (a warning, as Go's).
    #[arg(long, env = "AMB_REJOIN")]
    pub(crate) rejoin: bool,

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

    /// The member's settings from these flags, with no RPC server, tags file or handlers.
    fn settings(
        &self,
        tags: BTreeMap<String, String>,
        seeds: Vec<String>,
    ) -> Result<registrar::serf::Settings, UsageError> {
        Ok(registrar::serf::Settings {
            node_name: self.node_name(),
            bind: self.bind,
            advertise: self.advertise,
            memberlist: self.profile.config(),
            keyring: self.keyring()?.map(|keyring| self.shared_keyring(keyring)),
            replay: self.replay,
            tags,
            seeds,
            tags_file: None,
            rpc: None,
            handlers: Vec::new(),
            handler_specs: Vec::new(),
            handler_env: Vec::new(),
            snapshot: self.snapshot(),
        })
    }

    /// `--snapshot` and `--rejoin` (which does nothing alone, as Go's: a warning).
    fn snapshot(&self) -> Option<serf_agent::snapshot::Options> {
        if self.rejoin && self.snapshot.is_none() {
            tracing::warn!("--rejoin has no effect without --snapshot");
        }
        let path = self.snapshot.clone()?;
        Some(serf_agent::snapshot::Options {
            path,
            rejoin_after_leave: self.rejoin,
        })
    }

    /// The node name: `--node` or the hostname.
    pub(crate) fn node_name(&self) -> String {
        self.node
            .clone()
            .unwrap_or_else(registrar::address::hostname)
    }

    /// The seeds to join with `registry`: Serf's ([`GossipArgs::seeds`]); etcd has none.
    pub(crate) fn seeds_for(
        &self,
        registry: &crate::registry::Registry,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Vec<String>> {
        if registry.is_serf() {
            self.seeds(vars)
        } else {
            Ok(Vec::new())
        }
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

    /// The seeds to join ([`registrar::serf::seeds::find`] over these flags). Pure: the
    /// caller reads the environment and `/etc/hosts`. A malformed link variable is a usage
    /// error naming it.
    pub(crate) fn find_seeds(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
        etc_hosts: Option<&str>,
    ) -> Result<Vec<Seed>, UsageError> {
        let flags = registrar::serf::seeds::Flags {
            join: &self.join,
            retry_join: &self.retry_join,
            serf_link: &self.serf_link,
        };
        registrar::serf::seeds::find(&flags, vars, etc_hosts)
            .map_err(|error| UsageError(error.to_string()))
    }
}

/// What a caller adds to [`start`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Extras {
    /// Extra environment for event handlers (e.g. `AMB_BACKEND_HOST`/`AMB_BACKEND_PORT`).
    pub(crate) handler_env: Vec<(String, String)>,
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
    let rpc = if args.rpc_addr.is_empty() {
        None
    } else {
        Some(registrar::serf::Rpc {
            listener: tokio::net::TcpListener::bind(&args.rpc_addr)
                .await
                .with_context(|| format!("binding --rpc-addr {}", args.rpc_addr))?,
            auth: args.rpc_auth.clone(),
        })
    };
    let settings = registrar::serf::Settings {
        tags_file: args.tags_file.clone(),
        rpc,
        handlers,
        handler_specs: args.event_handlers.clone(),
        handler_env: extras.handler_env,
        ..args.gossip.settings(tags, seeds)?
    };
    started(registrar::serf::start(settings, crate::logs::ring()).await)
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
    let settings = registrar::serf::Settings {
        rpc: Some(registrar::serf::Rpc {
            listener,
            auth: None,
        }),
        ..gossip.settings(tags, seeds)?
    };
    started(registrar::serf::start(settings, crate::logs::ring()).await)
}

/// A configuration the Serf layer refused is a usage error (exit 2).
fn started(result: Result<LocalMember, registrar::serf::Error>) -> anyhow::Result<LocalMember> {
    result.map_err(|error| match error {
        registrar::serf::Error::Config(_) => UsageError(error.to_string()).into(),
        other => other.into(),
    })
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
}
