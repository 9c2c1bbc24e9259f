//! The seeds a member joins, in order: `--join`, `--retry-join`, then the Serf link. The link
//! gives its `<ALIAS>_PORT_7946_TCP` address; a link with no port variable (an image without
//! `EXPOSE`: Docker then sets only `<ALIAS>_NAME` and the `/etc/hosts` line) gives
//! `<alias>:7946`, when `<ALIAS>_NAME` is set or the hosts file names the alias. Pure: the
//! caller reads the environment and `/etc/hosts`.

use std::net::IpAddr;

use proxy::link_env::LinkEnvError;

use super::join::SERF_PORT;

/// Where the binary's flags say to join.
#[derive(Debug, Clone, Copy)]
pub struct Flags<'a> {
    /// `--join` entries (as split on commas; blanks and spaces are dropped here).
    pub join: &'a [String],
    /// `--retry-join` entries.
    pub retry_join: &'a [String],
    /// The Docker link alias of the Serf agent (`serf_1`).
    pub serf_link: &'a str,
}

/// A seed to join and the rule that found it (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// `HOST[:PORT]`.
    pub addr: String,
    /// Why: `--join`, `link variable SERF_1_PORT_7946_TCP`, ….
    pub rule: String,
}

/// Where Docker writes a link's alias (`172.17.0.2 serf_1 3f2a… amb-serf_1`).
pub const ETC_HOSTS: &str = "/etc/hosts";

/// The seeds of `flags`, `vars` (the environment) and `etc_hosts` (its text), each once, in
/// order. A malformed link variable is an error naming it.
pub fn find(
    flags: &Flags<'_>,
    vars: impl IntoIterator<Item = (String, String)>,
    etc_hosts: Option<&str>,
) -> Result<Vec<Seed>, LinkEnvError> {
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
    for addr in listed(flags.join) {
        add(addr, "--join".to_owned());
    }
    for addr in listed(flags.retry_join) {
        add(addr, "--retry-join".to_owned());
    }
    let link = proxy::link_env::link_ports(vars.iter().cloned(), flags.serf_link)?;
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
        let alias = flags.serf_link;
        let rule = match proxy::link_env::link_name_var(vars, alias) {
            Some(name) => Some(format!(
                "link {name} without a port variable (the linked image exposes no port)"
            )),
            None => etc_hosts
                .is_some_and(|hosts| hosts_names(hosts, alias))
                .then(|| format!("{ETC_HOSTS} names the link alias {alias} (no link variable)")),
        };
        if let Some(rule) = rule {
            add(format!("{alias}:{SERF_PORT}"), rule);
        }
    }
    Ok(seeds)
}

/// Whether a hosts file (`/etc/hosts` syntax) gives an address for `name`.
fn hosts_names(hosts: &str, name: &str) -> bool {
    hosts.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        fields.next().is_some_and(|ip| ip.parse::<IpAddr>().is_ok())
            && fields.any(|host| host.eq_ignore_ascii_case(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// `--join`, `--retry-join` (each split on commas, as clap does) and `--serf-link` from
    /// `flags`.
    fn flags(flags: &[&str]) -> (Vec<String>, Vec<String>, String) {
        let (mut join, mut retry_join, mut serf_link) =
            (Vec::new(), Vec::new(), "serf_1".to_owned());
        for pair in flags.chunks(2) {
            let values = pair[1].split(',').map(str::to_owned);
            match pair[0] {
                "--join" => join.extend(values),
                "--retry-join" => retry_join.extend(values),
                "--serf-link" => serf_link = pair[1].to_owned(),
                other => panic!("{other}"),
            }
        }
        (join, retry_join, serf_link)
    }

    fn find_in(
        flag_list: &[&str],
        env: &[(&str, &str)],
        hosts: Option<&str>,
    ) -> Result<Vec<Seed>, LinkEnvError> {
        let (join, retry_join, serf_link) = flags(flag_list);
        let flags = Flags {
            join: &join,
            retry_join: &retry_join,
            serf_link: &serf_link,
        };
        find(&flags, vars(env), hosts)
    }

    /// Seeds and their rules from `flags`, `env` and an `/etc/hosts` text.
    fn seeds(flags: &[&str], env: &[(&str, &str)], hosts: Option<&str>) -> Vec<(String, String)> {
        find_in(flags, env, hosts)
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
    fn a_malformed_link_variable_is_an_error_naming_it() {
        let error = find_in(&[], &[("SERF_1_PORT_7946_TCP", "tcp://nowhere")], None).unwrap_err();
        assert!(
            format!("{error:#}").contains("SERF_1_PORT_7946_TCP"),
            "{error:#}"
        );
    }
}
