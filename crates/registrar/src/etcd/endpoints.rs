//! etcd endpoints from `etcd://HOST:PORT[,HOST:PORT...]` or a Docker link variable (pure).

use std::fmt;

/// The client port etcd listens on by default, used when an endpoint gives no port.
pub const DEFAULT_PORT: u16 = 2379;

/// The Docker link variable for a container linked as `etcd` exposing 2379/tcp.
pub const LINK_VAR: &str = "ETCD_PORT_2379_TCP";

/// One etcd client endpoint, `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// The base URL of its JSON gateway, `http://host:port`.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{self}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A non-empty list of etcd endpoints, tried in order with failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(Vec<Endpoint>);

/// A registry or link value that does not name etcd endpoints. Parsing has no side effects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}={value:?}: {reason}")]
pub struct EndpointError {
    /// Where the value came from: `--registry` or the link variable's name.
    pub source_name: String,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Endpoints {
    /// Parses `etcd://HOST[:PORT][,HOST[:PORT]...]` (port 2379 when omitted; IPv6 hosts in
    /// brackets), as given to `--registry`.
    pub fn parse(value: &str) -> Result<Self, EndpointError> {
        let error = |reason: String| EndpointError {
            source_name: "--registry".to_owned(),
            value: value.to_owned(),
            reason,
        };
        let list = value
            .strip_prefix("etcd://")
            .ok_or_else(|| error("expected etcd://HOST:PORT[,HOST:PORT...]".to_owned()))?;
        let endpoints = list
            .split(',')
            .map(|item| parse_host_port(item.trim()).map_err(&error))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(endpoints))
    }

    /// The endpoint from an `ETCD_PORT_2379_TCP=tcp://IP:PORT` link variable among `vars`, if
    /// present. Pass the process environment in the binary and a slice in tests.
    pub fn from_link_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<Self>, EndpointError> {
        let Some((name, value)) = vars.into_iter().find(|(name, _)| name == LINK_VAR) else {
            return Ok(None);
        };
        let error = |reason: String| EndpointError {
            source_name: name.clone(),
            value: value.clone(),
            reason,
        };
        let address = value
            .strip_prefix("tcp://")
            .ok_or_else(|| error("expected tcp://IP:PORT".to_owned()))?;
        let endpoint = parse_host_port(address).map_err(error)?;
        Ok(Some(Self(vec![endpoint])))
    }

    /// The endpoints in the order given.
    pub fn as_slice(&self) -> &[Endpoint] {
        &self.0
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("etcd://")?;
        for (index, endpoint) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{endpoint}")?;
        }
        Ok(())
    }
}

fn parse_host_port(item: &str) -> Result<Endpoint, String> {
    if item.is_empty() {
        return Err("empty endpoint".to_owned());
    }
    if item.contains('/') || item.contains('@') {
        return Err(format!(
            "endpoint {item:?} must be HOST:PORT, without a path or user"
        ));
    }
    if item.matches(':').count() > 1 && !item.starts_with('[') {
        return Err(format!("endpoint {item:?}: put an IPv6 host in brackets"));
    }
    let (host, port) = if let Some(rest) = item.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("endpoint {item:?}: unclosed [ in IPv6 host"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("endpoint {item:?}: expected :PORT after ]"))?,
            ),
        };
        (host, port)
    } else {
        match item.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (item, None),
        }
    };
    if host.is_empty() {
        return Err(format!("endpoint {item:?} has no host"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if let Some(bad) = host.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "endpoint {item:?}: {bad:?} is not allowed in a host name"
        ));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("endpoint {item:?}: bad port {port:?}")),
            Ok(port) => port,
        },
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, expected: Result<&str, &str>) {
        let actual = Endpoints::parse(value)
            .map(|endpoints| endpoints.to_string())
            .map_err(|error| error.to_string());
        match expected {
            Ok(display) => assert_eq!(actual, Ok(display.to_owned()), "{value}"),
            Err(fragment) => {
                let message = actual.expect_err(value);
                assert!(message.contains(fragment), "{value}: {message}");
                assert!(message.contains(value), "names the value: {message}");
            }
        }
    }

    #[test]
    fn parses_registry_values() {
        check("etcd://127.0.0.1:2379", Ok("etcd://127.0.0.1:2379"));
        check("etcd://a:1,b:2", Ok("etcd://a:1,b:2"));
        check("etcd://a, b:3", Ok("etcd://a:2379,b:3"));
        check(
            "etcd://[::1]:4001,[fe80::1]",
            Ok("etcd://[::1]:4001,[fe80::1]:2379"),
        );
        check("etcd://etcd", Ok("etcd://etcd:2379"));
    }

    #[test]
    fn rejects_bad_registry_values() {
        check("serf", Err("expected etcd://"));
        check("http://a:2379", Err("expected etcd://"));
        check("etcd://", Err("empty endpoint"));
        check("etcd://a:2379,", Err("empty endpoint"));
        check("etcd://:2379", Err("no host"));
        check("etcd://a:port", Err("bad port \"port\""));
        check("etcd://a:0", Err("bad port"));
        check("etcd://a:70000", Err("bad port"));
        check("etcd://a:1/v3", Err("without a path"));
        check("etcd://::1", Err("brackets"));
        check("etcd://[::1", Err("unclosed"));
        check("etcd://a b:2379", Err("' ' is not allowed"));
        check("etcd://[a?]:1", Err("'?' is not allowed"));
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn reads_the_link_variable() {
        let found = Endpoints::from_link_env(vars(&[
            ("HOME", "/root"),
            ("ETCD_PORT_2379_TCP", "tcp://172.17.0.3:2379"),
        ]));
        assert_eq!(
            found.map(|endpoints| endpoints.map(|e| e.to_string())),
            Ok(Some("etcd://172.17.0.3:2379".to_owned()))
        );
        assert_eq!(Endpoints::from_link_env(vars(&[("HOME", "/")])), Ok(None));
        let error = Endpoints::from_link_env(vars(&[("ETCD_PORT_2379_TCP", "udp://1.2.3.4:2379")]))
            .expect_err("udp is not a client link");
        assert_eq!(
            error.to_string(),
            "ETCD_PORT_2379_TCP=\"udp://1.2.3.4:2379\": expected tcp://IP:PORT"
        );
    }

    proptest::proptest! {
        #[test]
        fn display_parses_back(
            hosts in proptest::collection::vec(("[a-z][a-z0-9.-]{0,20}", 1u16..), 1..4)
        ) {
            let value = hosts
                .iter()
                .map(|(host, port)| format!("{host}:{port}"))
                .collect::<Vec<_>>()
                .join(",");
            let parsed = Endpoints::parse(&format!("etcd://{value}")).expect("valid endpoints");
            proptest::prop_assert_eq!(parsed.as_slice().len(), hosts.len());
            proptest::prop_assert_eq!(Endpoints::parse(&parsed.to_string()), Ok(parsed));
        }
    }
}
