//! What the ambassador advertises, as a pure function of its configuration and the backend's
//! health: [`desired`]. The Serf backend applies the result with `set_tags`; nothing here
//! touches the network.
//!
//! The tag scheme (documented in the README):
//!
//! | tag | value | when |
//! |---|---|---|
//! | `role` | the service's role, by default its first forwarded port (`3306`) | backend healthy |
//! | `health` | `passing` or `critical` | always |
//! | `ports` | every forwarded port, `3306/tcp,33060/tcp` | always |
//! | `service` | `HOST:PORT` consumers on other hosts should dial | `--service-addr` given |
//! | anything from `--tag k=v` | as given | always |
//!
//! A critical backend withdraws `role`, so `serf members -tag role=3306` and every consumer
//! stop seeing it; `health=critical` says why.

use std::collections::BTreeMap;

/// Serf's limit on encoded node meta (memberlist `MetaMaxSize`).
pub const META_LIMIT: usize = 512;

/// The tag that carries the role.
pub const ROLE: &str = "role";
/// The tag that carries health.
pub const HEALTH: &str = "health";
/// The tag that lists the forwarded ports.
pub const PORTS: &str = "ports";
/// The tag that carries the address consumers should dial.
pub const SERVICE: &str = "service";

/// The backend's health, as its check ([`proxy::health::check`]) publishes it.
pub use proxy::health::Health;

/// What to advertise, from flags and links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// The role (`NAME`/`--role`, else the first link's first port). `None`: advertise no role.
    pub role: Option<String>,
    /// Forwarded ports as `port/proto`, in the order they are forwarded.
    pub ports: Vec<String>,
    /// `--service-addr`.
    pub service_addr: Option<String>,
    /// `--tag k=v`; these may not replace the tags above.
    pub extra: BTreeMap<String, String>,
}

/// A tag set that cannot be advertised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagsError {
    /// Encoded, the tags exceed Serf's meta limit.
    #[error("the tags encode to {len} bytes, over Serf's limit of {limit}: {tags:?}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        limit: usize,
        /// The tags.
        tags: BTreeMap<String, String>,
    },
    /// `--tag` tried to set a tag the ambassador manages.
    #[error(
        "--tag {key}={value}: `{key}` is set by amb-serf itself (use --role or --service-addr)"
    )]
    Reserved {
        /// The tag name.
        key: String,
        /// The value given.
        value: String,
    },
}

impl Advertisement {
    /// Checks the advertisement can be sent in both health states (startup fails otherwise).
    pub fn validate(&self) -> Result<(), TagsError> {
        for (key, value) in &self.extra {
            if [ROLE, HEALTH, PORTS, SERVICE].contains(&key.as_str()) {
                return Err(TagsError::Reserved {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        // Passing is the larger set (it has the role).
        check_size(&desired(self, Health::Passing))
    }
}

/// The tags to advertise for `health`.
pub fn desired(advertisement: &Advertisement, health: Health) -> BTreeMap<String, String> {
    let mut tags = advertisement.extra.clone();
    if let (Some(role), Health::Passing) = (&advertisement.role, health) {
        tags.insert(ROLE.to_owned(), role.clone());
    }
    tags.insert(HEALTH.to_owned(), health.as_str().to_owned());
    if !advertisement.ports.is_empty() {
        tags.insert(PORTS.to_owned(), advertisement.ports.join(","));
    }
    if let Some(service) = &advertisement.service_addr {
        tags.insert(SERVICE.to_owned(), service.clone());
    }
    tags
}

/// Errors when `tags` do not fit Serf's meta limit.
pub fn check_size(tags: &BTreeMap<String, String>) -> Result<(), TagsError> {
    let len = serf::wire::serf::encode_tags(tags).len();
    if len > META_LIMIT {
        return Err(TagsError::TooLarge {
            len,
            limit: META_LIMIT,
            tags: tags.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advertisement() -> Advertisement {
        Advertisement {
            role: Some("3306".into()),
            ports: vec!["3306/tcp".into(), "33060/tcp".into()],
            service_addr: None,
            extra: BTreeMap::from([("dc".into(), "east".into())]),
        }
    }

    fn check(advertisement: &Advertisement, health: Health, expected: &[(&str, &str)]) {
        let expected: BTreeMap<String, String> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(desired(advertisement, health), expected);
    }

    #[test]
    fn role_follows_health() {
        let ad = advertisement();
        check(
            &ad,
            Health::Passing,
            &[
                ("role", "3306"),
                ("health", "passing"),
                ("ports", "3306/tcp,33060/tcp"),
                ("dc", "east"),
            ],
        );
        check(
            &ad,
            Health::Critical,
            &[
                ("health", "critical"),
                ("ports", "3306/tcp,33060/tcp"),
                ("dc", "east"),
            ],
        );
        let with_service = Advertisement {
            service_addr: Some("10.1.2.3:49169".into()),
            extra: BTreeMap::new(),
            ..ad
        };
        check(
            &with_service,
            Health::Passing,
            &[
                ("role", "3306"),
                ("health", "passing"),
                ("ports", "3306/tcp,33060/tcp"),
                ("service", "10.1.2.3:49169"),
            ],
        );
        check(
            &Advertisement::default(),
            Health::Passing,
            &[("health", "passing")],
        );
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(advertisement().validate(), Ok(()));
        let mut reserved = advertisement();
        reserved.extra.insert("role".into(), "x".into());
        let error = reserved.validate().unwrap_err();
        assert!(error.to_string().contains("--tag role=x"), "{error}");
        let mut large = advertisement();
        large.extra.insert("blob".into(), "x".repeat(500));
        assert!(matches!(large.validate(), Err(TagsError::TooLarge { .. })));
    }
}
