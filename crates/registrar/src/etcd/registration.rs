//! The JSON value an ambassador writes under `<prefix>/<role>/<node>`, and its key (pure).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one ambassador advertises in etcd, as JSON.
///
/// The first four fields are the ones the original `ctlc/amb-etcd` image wrote, so consumers of
/// that layout keep working; the rest are additions and may be absent in values written by
/// older producers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The ambassador's container ID (its hostname inside Docker).
    pub container_id: String,
    /// The ambassador's own IP address.
    pub local_ip: String,
    /// The advertised (role) port.
    pub port: u16,
    /// The amb-serf version that wrote the value.
    pub version: String,
    /// `HOST:PORT` consumers on other hosts should dial (`--service-addr`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_addr: Option<String>,
    /// Every forwarded port, as `PORT/PROTO` (e.g. `3306/tcp`), in the same form as the Serf
    /// `ports` tag.
    #[serde(default)]
    pub ports: Vec<String>,
    /// The same tags the Serf backend advertises (`role`, `ports`, extra `--tag k=v`, …).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl Registration {
    /// A registration with the four original fields and nothing else.
    pub fn new(container_id: &str, local_ip: &str, port: u16, version: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            local_ip: local_ip.to_owned(),
            port,
            version: version.to_owned(),
            service_addr: None,
            ports: Vec::new(),
            tags: BTreeMap::new(),
        }
    }

    /// The address a consumer should connect to: `service_addr` if set, else `local_ip:port`.
    pub fn dial_addr(&self) -> String {
        match &self.service_addr {
            Some(addr) => addr.clone(),
            None if self.local_ip.contains(':') => format!("[{}]:{}", self.local_ip, self.port),
            None => format!("{}:{}", self.local_ip, self.port),
        }
    }

    /// The JSON value stored in etcd.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Registration always serializes: plain strings and maps")
    }

    /// Reads a value found under the prefix. Values that are not ours (not JSON, or missing one
    /// of the four original fields) are an error for the caller to log and skip.
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, RegistrationError> {
        serde_json::from_slice(value).map_err(|error| RegistrationError {
            key: key.to_owned(),
            reason: error.to_string(),
            value: String::from_utf8_lossy(&value[..value.len().min(120)]).into_owned(),
        })
    }
}

/// A value under the registration prefix that is not a [`Registration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}={value:?}: not a registration: {reason}")]
pub struct RegistrationError {
    /// The etcd key.
    pub key: String,
    /// The start of the value, lossily as text.
    pub value: String,
    /// Why it does not parse.
    pub reason: String,
}

/// The key prefix registrations live under, `/services` by default (`--etcd-prefix`).
///
/// Normalized to one leading `/` and no trailing `/`, so `services/` and `/services` agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Default for Prefix {
    fn default() -> Self {
        Self("/services".to_owned())
    }
}

impl Prefix {
    /// A prefix from a flag value; `""` and `"/"` mean the root.
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_matches('/');
        if trimmed.is_empty() {
            Self(String::new())
        } else {
            Self(format!("/{trimmed}"))
        }
    }

    /// The key of one ambassador: `<prefix>/<role>/<node>`.
    pub fn key(&self, role: &str, node: &str) -> String {
        format!("{}/{role}/{node}", self.0)
    }

    /// The key prefix of every registration for `role`: `<prefix>/<role>/`.
    pub fn role(&self, role: &str) -> String {
        format!("{}/{role}/", self.0)
    }

    /// The key prefix of every registration: `<prefix>/`.
    pub fn all(&self) -> String {
        format!("{}/", self.0)
    }

    /// `(role, node)` from a key written by [`Prefix::key`]; `None` for any other key.
    pub fn split<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.0)?.strip_prefix('/')?;
        let (role, node) = rest.split_once('/')?;
        let valid = |part: &str| !part.is_empty() && !part.contains('/');
        (valid(role) && valid(node)).then_some((role, node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_original_fields_and_the_additions() {
        let mut registration = Registration::new("4f1c2a", "172.17.0.5", 3306, "0.1.0");
        registration.service_addr = Some("10.0.0.7:3306".to_owned());
        registration.ports = vec!["3306/tcp".to_owned(), "33060/tcp".to_owned()];
        registration
            .tags
            .insert("role".to_owned(), "3306".to_owned());
        let json: serde_json::Value =
            serde_json::from_slice(&registration.to_json()).expect("valid JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "container_id": "4f1c2a", "local_ip": "172.17.0.5", "port": 3306,
                "version": "0.1.0", "service_addr": "10.0.0.7:3306",
                "ports": ["3306/tcp", "33060/tcp"], "tags": {"role": "3306"},
            })
        );
        assert_eq!(
            Registration::from_json("k", &registration.to_json()),
            Ok(registration)
        );
    }

    fn check_read(value: &str, expected: Result<&str, &str>) {
        let actual = Registration::from_json("/services/3306/a", value.as_bytes());
        match expected {
            Ok(dial) => assert_eq!(actual.map(|r| r.dial_addr()), Ok(dial.to_owned())),
            Err(fragment) => {
                let message = actual.expect_err(value).to_string();
                assert!(message.contains(fragment), "{value}: {message}");
                assert!(message.starts_with("/services/3306/a="), "{message}");
            }
        }
    }

    #[test]
    fn reads_values_from_older_producers_and_rejects_foreign_ones() {
        let original = r#"{"container_id":"a","local_ip":"10.0.0.2","port":3306,"version":"1"}"#;
        check_read(original, Ok("10.0.0.2:3306"));
        let v6 = r#"{"container_id":"a","local_ip":"fd00::2","port":80,"version":"1"}"#;
        check_read(v6, Ok("[fd00::2]:80"));
        let with_addr = r#"{"container_id":"a","local_ip":"10.0.0.2","port":3306,"version":"1",
            "service_addr":"192.168.1.9:13306","future_field":true}"#;
        check_read(with_addr, Ok("192.168.1.9:13306"));
        check_read("hello", Err("expected value"));
        check_read("{}", Err("missing field `container_id`"));
        check_read(
            r#"{"container_id":"a","local_ip":"x","version":"1"}"#,
            Err("`port`"),
        );
        check_read(
            r#"{"container_id":"a","local_ip":"x","port":"80","version":"1"}"#,
            Err("invalid type"),
        );
    }

    #[test]
    fn prefixes_are_normalized() {
        for (flag, key) in [
            ("/services", "/services/3306/n1"),
            ("services/", "/services/3306/n1"),
            ("/a/b/", "/a/b/3306/n1"),
            ("", "/3306/n1"),
            ("/", "/3306/n1"),
        ] {
            assert_eq!(Prefix::new(flag).key("3306", "n1"), key, "{flag:?}");
        }
        assert_eq!(Prefix::default().role("3306"), "/services/3306/");
        assert_eq!(Prefix::default().all(), "/services/");
        assert_eq!(Prefix::new("/").all(), "/");
    }

    #[test]
    fn keys_split_into_role_and_node() {
        let prefix = Prefix::default();
        for (key, expected) in [
            ("/services/3306/n1", Some(("3306", "n1"))),
            ("/services/3306/", None),
            ("/services//n1", None),
            ("/services/3306/n1/extra", None),
            ("/servicesX/3306/n1", None),
            ("/other/3306/n1", None),
        ] {
            assert_eq!(prefix.split(key), expected, "{key}");
        }
        assert_eq!(Prefix::new("/").split("/80/n"), Some(("80", "n")));
    }

    proptest::proptest! {
        #[test]
        fn json_round_trips(
            container_id in ".{0,16}", local_ip in ".{0,16}", port: u16, version in ".{0,8}",
            service_addr in proptest::option::of(".{0,24}"),
            ports in proptest::collection::vec("[0-9]{1,5}/(tcp|udp)", 0..4),
            tags in proptest::collection::btree_map(".{1,8}", ".{0,8}", 0..4),
        ) {
            let registration = Registration {
                container_id, local_ip, port, version, service_addr, ports, tags,
            };
            proptest::prop_assert_eq!(
                Registration::from_json("k", &registration.to_json()),
                Ok(registration)
            );
        }
    }
}
