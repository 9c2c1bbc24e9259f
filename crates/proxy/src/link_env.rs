//! Docker link environment and `--forward` specs → [`ForwardSpec`]s. Pure: no I/O, no globals.
//!
//! Docker's legacy `--link backend:alias` injects, for every port the backend exposes,
//! `<ALIAS>_PORT_<port>_<TCP|UDP>=<tcp|udp>://<addr>:<port>` plus derived variables (`_ADDR`,
//! `_PORT`, `_PROTO`, `<ALIAS>_PORT`, `<ALIAS>_NAME`) and a copy of the backend's whole
//! environment as `<ALIAS>_ENV_<NAME>`. Only the first form is read; the derived forms are
//! ignored, and the `_ENV_` copies (which often hold secrets) are never read, forwarded, logged or
//! echoed in an error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP: one upstream connection per accepted client connection.
    Tcp,
    /// UDP: one upstream socket per client address, expired when idle.
    Udp,
}

impl Protocol {
    /// `"tcp"` or `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a target lives: an IP address, or a hostname resolved on every new connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// A literal IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A DNS name (for example a container name on a user-defined Docker network).
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// The upstream end of a forward: a host and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// The host.
    pub host: Host,
    /// The port, never 0.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `HOST:PORT` with HOST an IPv4 address, a bracketed IPv6 address or a host name, as in a
/// `--forward` target; the error says what is wrong.
impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_target(text.trim())
    }
}

/// Where a [`ForwardSpec`] came from, for the startup summary and error messages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// A Docker link variable.
    Link {
        /// The link alias, lowercase (`mysql`).
        alias: String,
        /// The variable name (`MYSQL_PORT_3306_TCP`).
        var: String,
    },
    /// A `--forward` flag or an `AMB_FORWARD` entry, as given.
    Forward(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Link { alias, .. } => write!(f, "link {alias}"),
            Self::Forward(spec) => write!(f, "forward {spec}"),
        }
    }
}

/// One forward: listen on `listen_port`/`protocol`, send to `target`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForwardSpec {
    /// The local port (on `--listen-addr`), never 0.
    pub listen_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Where connections or datagrams go.
    pub target: Target,
    /// Which variable or flag asked for it.
    pub origin: Origin,
}

impl ForwardSpec {
    /// The `--forward` form of this spec: `LISTEN=HOST:PORT`, with `/udp` for UDP.
    pub fn to_forward_flag(&self) -> String {
        match self.protocol {
            Protocol::Tcp => format!("{}={}", self.listen_port, self.target),
            Protocol::Udp => format!("{}={}/udp", self.listen_port, self.target),
        }
    }
}

/// Options of [`parse`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The Serf link alias (`serf_1`): its link variables are never forwarded.
    pub serf_link: String,
    /// `--forward` / `AMB_FORWARD` entries (`LISTEN=HOST:PORT[/udp]`); they add to or override
    /// the link variables.
    pub forwards: Vec<String>,
    /// `--links` / `AMB_LINKS`: when set, the only aliases whose link variables are forwarded.
    /// When not, every alias but the Serf link's and [`KUBERNETES_ALIAS`] is.
    pub links: Option<Vec<String>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            serf_link: "serf_1".to_owned(),
            forwards: Vec::new(),
            links: None,
        }
    }
}

/// The alias of the variables the kubelet gives every pod for the cluster's API service
/// (`KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443`): never a backend of an ambassador, so it is
/// forwarded only when `--links` names it.
pub const KUBERNETES_ALIAS: &str = "kubernetes";

/// Bad link environment or `--forward` input. Nothing was started when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkEnvError {
    /// A link variable or forward spec that does not have the expected form.
    #[error("{var}={value:?}: {reason}")]
    Malformed {
        /// The variable (`MYSQL_PORT_3306_TCP`) or flag (`--forward`).
        var: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two different targets for the same listen port and protocol.
    #[error(
        "port {port}/{protocol} has two targets: {first} and {second}; \
         choose one with --forward {port}=HOST:PORT"
    )]
    Conflict {
        /// The listen port.
        port: u16,
        /// The protocol.
        protocol: Protocol,
        /// The first source and target, `VAR=value`.
        first: String,
        /// The second source and target, `VAR=value`.
        second: String,
    },
}

/// Turns the process environment and `--forward` entries into forward specs, sorted by
/// (listen port, protocol).
///
/// Link variables give the forwards (of the aliases `options.links` names, or of every alias
/// but the Serf link's and Kubernetes' API service); `--forward` entries add to them and
/// override a link's target for the same listen port and protocol. Errors name the variable
/// and value.
pub fn parse(
    vars: impl IntoIterator<Item = (String, String)>,
    options: &Options,
) -> Result<Vec<ForwardSpec>, LinkEnvError> {
    let serf_alias = normalize_alias(&options.serf_link);
    let allowed: Option<Vec<String>> = options.links.as_ref().map(|links| {
        links
            .iter()
            .map(|alias| alias.trim())
            .filter(|alias| !alias.is_empty())
            .map(normalize_alias)
            .collect()
    });
    let wanted = |alias: &str| match &allowed {
        Some(allowed) => allowed.iter().any(|allowed| allowed == alias),
        None => alias != normalize_alias(KUBERNETES_ALIAS),
    };
    let mut from_links: BTreeMap<(u16, Protocol), (ForwardSpec, String)> = BTreeMap::new();
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    // Deterministic conflict messages whatever order the environment comes in.
    vars.sort();
    for (name, value) in vars {
        let Some(link) = link_var(&name) else {
            continue;
        };
        if link.alias == serf_alias || !wanted(link.alias) {
            continue;
        }
        let spec = parse_link_value(&name, &link, &value)?;
        insert(&mut from_links, spec, format!("{name}={value}"))?;
    }
    let mut from_flags: BTreeMap<(u16, Protocol), (ForwardSpec, String)> = BTreeMap::new();
    let entries = options.forwards.iter().map(|entry| entry.trim());
    for entry in entries.filter(|entry| !entry.is_empty()) {
        let spec = parse_forward(entry)?;
        insert(&mut from_flags, spec, format!("--forward {entry}"))?;
    }
    from_links.extend(from_flags);
    Ok(from_links.into_values().map(|(spec, _)| spec).collect())
}

/// The ports of one link alias (e.g. the Serf agent's `serf_1`, which [`parse`] skips), as
/// specs sorted by (port, protocol): where to join the Serf cluster. Errors as in [`parse`].
pub fn link_ports(
    vars: impl IntoIterator<Item = (String, String)>,
    alias: &str,
) -> Result<Vec<ForwardSpec>, LinkEnvError> {
    let wanted = normalize_alias(alias);
    let mut specs = Vec::new();
    for (name, value) in vars {
        if let Some(link) = link_var(&name).filter(|link| link.alias == wanted) {
            specs.push(parse_link_value(&name, &link, &value)?);
        }
    }
    specs.sort();
    Ok(specs)
}

/// The `<ALIAS>_NAME` variable by which Docker says the container is linked to `alias`, if it
/// is set: `SERF_1_NAME=/amb/serf_1` (`/<this container>/<alias>`). Docker sets it for every
/// link, also to a container that exposes no port and so gets no `<ALIAS>_PORT_*` variables;
/// then the alias itself (an `/etc/hosts` name Docker wrote) is the way to reach it. A value
/// of another form is not Docker's and is ignored.
pub fn link_name_var(
    vars: impl IntoIterator<Item = (String, String)>,
    alias: &str,
) -> Option<String> {
    let wanted = format!("{}_NAME", normalize_alias(alias));
    vars.into_iter().find_map(|(name, value)| {
        let (_, last) = value.rsplit_once('/')?;
        (name == wanted && value.starts_with('/') && last.eq_ignore_ascii_case(alias))
            .then_some(name)
    })
}

fn insert(
    specs: &mut BTreeMap<(u16, Protocol), (ForwardSpec, String)>,
    spec: ForwardSpec,
    source: String,
) -> Result<(), LinkEnvError> {
    let key = (spec.listen_port, spec.protocol);
    if let Some((existing, existing_source)) = specs.get(&key) {
        if existing.target == spec.target {
            return Ok(());
        }
        return Err(LinkEnvError::Conflict {
            port: spec.listen_port,
            protocol: spec.protocol,
            first: existing_source.clone(),
            second: source,
        });
    }
    specs.insert(key, (spec, source));
    Ok(())
}

/// The parts of a link variable name `<ALIAS>_PORT_<port>_<TCP|UDP>`, before validation.
#[derive(Debug, PartialEq, Eq)]
struct LinkVar<'a> {
    alias: &'a str,
    port: &'a str,
    protocol: Protocol,
}

/// Recognizes `<ALIAS>_PORT_<port>_<TCP|UDP>`; `None` for every other name, including the
/// `<ALIAS>_ENV_*` copies of a linked container's environment.
fn link_var(name: &str) -> Option<LinkVar<'_>> {
    let (rest, protocol) = if let Some(rest) = name.strip_suffix("_TCP") {
        (rest, Protocol::Tcp)
    } else if let Some(rest) = name.strip_suffix("_UDP") {
        (rest, Protocol::Udp)
    } else {
        return None;
    };
    let (alias, port) = rest.rsplit_once("_PORT_")?;
    if alias.is_empty() || port.is_empty() || port.contains('_') {
        return None;
    }
    // `X_ENV_Y_PORT_3306_TCP` is backend X's own variable `Y_PORT_3306_TCP` (X was itself
    // linked to Y), copied by Docker: it is never a link of ours, and it may hold secrets.
    if alias.contains("_ENV_") || alias.ends_with("_ENV") {
        return None;
    }
    Some(LinkVar {
        alias,
        port,
        protocol,
    })
}

/// Docker's form of an alias in variable names: uppercase, anything but letters and digits
/// replaced with `_`.
fn normalize_alias(alias: &str) -> String {
    alias
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn parse_link_value(
    name: &str,
    link: &LinkVar<'_>,
    value: &str,
) -> Result<ForwardSpec, LinkEnvError> {
    let malformed = |reason: String| LinkEnvError::Malformed {
        var: name.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let listen_port = parse_port(link.port)
        .map_err(|reason| malformed(format!("port {:?} in the name {reason}", link.port)))?;
    let (scheme, address) = value
        .split_once("://")
        .ok_or_else(|| malformed(format!("expected {}://ADDR:PORT", link.protocol.as_str())))?;
    if !scheme.eq_ignore_ascii_case(link.protocol.as_str()) {
        return Err(malformed(format!(
            "scheme {scheme:?} does not match the {} in the name",
            link.protocol.as_str().to_uppercase()
        )));
    }
    let target = parse_target(address).map_err(malformed)?;
    Ok(ForwardSpec {
        listen_port,
        protocol: link.protocol,
        target,
        origin: Origin::Link {
            alias: link.alias.to_ascii_lowercase(),
            var: name.to_owned(),
        },
    })
}

/// Parses one `--forward` entry: `LISTEN=HOST:PORT`, `LISTEN=HOST:PORT/tcp` or
/// `LISTEN=HOST:PORT/udp`, where HOST is an IPv4 address, a bracketed IPv6 address or a name.
pub fn parse_forward(entry: &str) -> Result<ForwardSpec, LinkEnvError> {
    let malformed = |reason: String| LinkEnvError::Malformed {
        var: "--forward".to_owned(),
        value: entry.to_owned(),
        reason,
    };
    let (listen, rest) = entry
        .split_once('=')
        .ok_or_else(|| malformed("expected LISTEN=HOST:PORT[/udp]".to_owned()))?;
    let listen_port = parse_port(listen.trim())
        .map_err(|reason| malformed(format!("listen port {listen:?} {reason}")))?;
    let (address, protocol) = match rest.rsplit_once('/') {
        Some((address, "tcp")) => (address, Protocol::Tcp),
        Some((address, "udp")) => (address, Protocol::Udp),
        Some((_, other)) => {
            return Err(malformed(format!(
                "unknown protocol {other:?} (expected /tcp or /udp)"
            )))
        }
        None => (rest, Protocol::Tcp),
    };
    let target = parse_target(address.trim()).map_err(malformed)?;
    Ok(ForwardSpec {
        listen_port,
        protocol,
        target,
        origin: Origin::Forward(entry.to_owned()),
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a port number".to_owned());
    }
    match text.parse::<u32>() {
        Ok(port) if (1..=65535).contains(&port) => Ok(port as u16),
        _ => Err("is out of range 1-65535".to_owned()),
    }
}

/// `HOST:PORT` with HOST an IPv4 address, `[IPv6]` or a DNS name.
fn parse_target(address: &str) -> Result<Target, String> {
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        let (ip, port) = bracketed
            .split_once("]:")
            .ok_or_else(|| format!("{address:?}: expected [IPV6]:PORT"))?;
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("{address:?}: expected HOST:PORT"))?;
        if host.contains(':') {
            return Err(format!(
                "{host:?}: an IPv6 address must be in brackets, [{host}]:{port}"
            ));
        }
        (parse_host(host)?, port)
    };
    let port = parse_port(port).map_err(|reason| format!("target port {port:?} {reason}"))?;
    Ok(Target { host, port })
}

fn parse_host(host: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let looks_like_ipv4 = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let valid_name = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if looks_like_ipv4 || !valid_name {
        return Err(format!("{host:?} is not an IP address or a host name"));
    }
    Ok(Host::Name(host.to_owned()))
}

#[cfg(test)]
mod tests;
