//! What `amb-serf run` advertises and health-checks, from its forwards and flags (pure).
//!
//! - The *primary* forward is the first link's first port: among link forwards, the one with
//!   the smallest (alias, port, protocol); with no link, the first `--forward` as given.
//! - `role` is `NAME`/`--role`, else the primary forward's port (`3306`), as the original
//!   ambassador image advertised it; `ports` lists every forward as `port/proto`.
//! - The health target is `--health-target`, else the primary TCP forward's target.

use std::collections::BTreeMap;

use crate::tags::{self, Advertisement};
use proxy::{ForwardSpec, Origin, Protocol, Target};

/// The first link's first port (see the module docs), optionally TCP only.
fn primary<'a>(
    specs: &'a [ForwardSpec],
    forwards: &[String],
    tcp_only: bool,
) -> Option<&'a ForwardSpec> {
    let eligible = || {
        specs
            .iter()
            .filter(move |spec| !tcp_only || spec.protocol == Protocol::Tcp)
    };
    let from_link = eligible()
        .filter_map(|spec| match &spec.origin {
            Origin::Link { alias, .. } => Some((alias, spec)),
            Origin::Forward(_) => None,
        })
        .min_by_key(|(alias, spec)| (*alias, spec.listen_port, spec.protocol))
        .map(|(_, spec)| spec);
    from_link.or_else(|| {
        forwards.iter().find_map(|entry| {
            eligible().find(|spec| matches!(&spec.origin, Origin::Forward(e) if e == entry))
        })
    })
}

/// The advertisement for `specs` (in forwarding order) and the flags; `extra` are the
/// `--tag`/`--tags-file` tags. [`Advertisement::validate`] is the caller's next step.
pub fn build(
    specs: &[ForwardSpec],
    forwards: &[String],
    role: Option<String>,
    service_addr: Option<String>,
    extra: BTreeMap<String, String>,
) -> Advertisement {
    let role = role
        .filter(|role| !role.trim().is_empty())
        .or_else(|| primary(specs, forwards, false).map(|spec| spec.listen_port.to_string()));
    let ports = specs
        .iter()
        .map(|spec| format!("{}/{}", spec.listen_port, spec.protocol))
        .collect();
    Advertisement {
        role,
        ports,
        service_addr: service_addr.filter(|addr| !addr.trim().is_empty()),
        extra,
    }
}

/// The user's extra tags from `all` (`--tags-file` overlaid with `--tag`): the tags amb-serf
/// manages (`role`, `health`, `ports`, `service`) are dropped when they come only from the tags
/// file, which the member rewrites with what it advertises, so a restart does not read its own
/// tags back as the user's. Given with `--tag` (`flag_keys`), they stay, for
/// [`Advertisement::validate`] to reject.
pub fn user_tags(
    mut all: BTreeMap<String, String>,
    flag_keys: &[&str],
) -> BTreeMap<String, String> {
    all.retain(|key, _| !MANAGED.contains(&key.as_str()) || flag_keys.contains(&key.as_str()));
    all
}

/// The tags to send: the managed tags from `desired`, every other tag as the member has it now
/// (`current`), so a tag set or deleted over RPC (`serf tags -set/-delete`) is not undone by
/// the next health change.
pub fn with_current_extras(
    desired: BTreeMap<String, String>,
    current: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut tags = current;
    tags.retain(|key, _| !MANAGED.contains(&key.as_str()));
    tags.extend(
        desired
            .into_iter()
            .filter(|(key, _)| MANAGED.contains(&key.as_str())),
    );
    tags
}

/// The tags amb-serf sets itself.
const MANAGED: [&str; 4] = [tags::ROLE, tags::HEALTH, tags::PORTS, tags::SERVICE];

/// `--service-addr` must be `HOST:PORT` (what consumers on other hosts dial).
pub fn check_service_addr(addr: &str) -> Result<(), String> {
    addr.parse::<Target>()
        .map(|_| ())
        .map_err(|reason| format!("--service-addr {addr:?}: {reason}"))
}

/// The backend the health loop probes: `explicit`, else the primary TCP forward's target.
pub fn health_target(
    specs: &[ForwardSpec],
    forwards: &[String],
    explicit: Option<Target>,
) -> Option<Target> {
    explicit.or_else(|| primary(specs, forwards, true).map(|spec| spec.target.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(vars: &[(&str, &str)], forwards: &[&str]) -> (Vec<ForwardSpec>, Vec<String>) {
        let forwards: Vec<String> = forwards.iter().map(|f| (*f).to_owned()).collect();
        let options = proxy::link_env::Options {
            forwards: forwards.clone(),
            ..proxy::link_env::Options::default()
        };
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        (proxy::link_env::parse(vars, &options).unwrap(), forwards)
    }

    #[track_caller]
    fn check(
        vars: &[(&str, &str)],
        forwards: &[&str],
        role: Option<&str>,
        expected_role: Option<&str>,
        expected_ports: &str,
        expected_health: Option<&str>,
    ) {
        let (specs, forwards) = specs(vars, forwards);
        let ad = build(
            &specs,
            &forwards,
            role.map(Into::into),
            None,
            BTreeMap::new(),
        );
        assert_eq!(ad.role.as_deref(), expected_role);
        assert_eq!(ad.ports.join(","), expected_ports);
        let target = health_target(&specs, &forwards, None).map(|t| t.to_string());
        assert_eq!(target.as_deref(), expected_health);
    }

    #[test]
    fn role_ports_and_health_target() {
        let mysql = ("MYSQL_PORT_3306_TCP", "tcp://10.0.0.5:3306");
        let mysqlx = ("MYSQL_PORT_33060_TCP", "tcp://10.0.0.5:33060");
        let serf = ("SERF_1_PORT_7946_TCP", "tcp://10.0.0.9:7946");
        check(
            &[mysqlx, mysql, serf],
            &[],
            None,
            Some("3306"),
            "3306/tcp,33060/tcp",
            Some("10.0.0.5:3306"),
        );
        // NAME / --role overrides the value only.
        check(
            &[mysql],
            &[],
            Some("mysql"),
            Some("mysql"),
            "3306/tcp",
            Some("10.0.0.5:3306"),
        );
        // The first link alphabetically, even when another link has a lower port.
        check(
            &[
                ("DNS_PORT_53_UDP", "udp://10.0.0.7:53"),
                ("WEB_PORT_80_TCP", "tcp://10.0.0.8:80"),
                ("API_PORT_8080_TCP", "tcp://10.0.0.6:8080"),
            ],
            &[],
            None,
            Some("8080"),
            "53/udp,80/tcp,8080/tcp",
            Some("10.0.0.6:8080"),
        );
        // A UDP-only first link: the role is its port, the health target the first TCP one.
        check(
            &[("DNS_PORT_53_UDP", "udp://10.0.0.7:53")],
            &["6379=redis:6379"],
            None,
            Some("53"),
            "53/udp,6379/tcp",
            Some("redis:6379"),
        );
        // No link: the first --forward as given.
        check(
            &[],
            &["6379=redis:6379", "3306=mysql:3306"],
            None,
            Some("6379"),
            "3306/tcp,6379/tcp",
            Some("redis:6379"),
        );
        check(&[], &[], None, None, "", None);
    }

    #[test]
    fn managed_tags_from_the_tags_file_are_ours_not_the_users() {
        let all: BTreeMap<String, String> = [
            ("role", "6379"),
            ("health", "critical"),
            ("ports", "6379/tcp"),
            ("service", "10.0.0.1:6379"),
            ("dc", "east"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let kept: Vec<String> = user_tags(all.clone(), &["dc"]).into_keys().collect();
        assert_eq!(kept, ["dc"]);
        let kept: Vec<String> = user_tags(all, &["role"]).into_keys().collect();
        assert_eq!(kept, ["dc", "role"], "--tag role=… stays, to be rejected");
    }

    #[test]
    fn tags_changed_over_rpc_survive_a_health_change() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let desired = map(&[
            ("health", "critical"),
            ("ports", "6379/tcp"),
            ("dc", "east"),
        ]);
        // Over RPC: dc deleted, owner added; role still there from before.
        let current = map(&[("role", "6379"), ("health", "passing"), ("owner", "ops")]);
        assert_eq!(
            with_current_extras(desired, current),
            map(&[
                ("health", "critical"),
                ("ports", "6379/tcp"),
                ("owner", "ops")
            ])
        );
    }

    #[test]
    fn tags_and_service_addr() {
        let (specs, forwards) = specs(&[("REDIS_PORT_6379_TCP", "tcp://127.0.0.1:6379")], &[]);
        let ad = build(
            &specs,
            &forwards,
            Some(String::new()),
            Some("192.168.1.52:49169".into()),
            BTreeMap::from([("dc".into(), "east".into())]),
        );
        assert_eq!(ad.role.as_deref(), Some("6379"), "an empty NAME is no role");
        assert_eq!(ad.service_addr.as_deref(), Some("192.168.1.52:49169"));
        assert_eq!(ad.extra["dc"], "east");
        assert_eq!(check_service_addr("10.1.2.3:49169"), Ok(()));
        let error = check_service_addr("10.1.2.3").unwrap_err();
        assert!(error.contains("--service-addr \"10.1.2.3\""), "{error}");
    }
}
