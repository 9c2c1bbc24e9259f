use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

/// Parses `pairs` with `forwards` and renders each spec as `port/proto -> target (origin)`.
fn check(pairs: &[(&str, &str)], forwards: &[&str], expected: &[&str]) {
    let options = Options {
        forwards: forwards.iter().map(|f| (*f).to_owned()).collect(),
        ..Options::default()
    };
    let specs = parse(env(pairs), &options).unwrap_or_else(|error| panic!("{error}"));
    let rendered: Vec<String> = specs
        .iter()
        .map(|spec| {
            format!(
                "{}/{} -> {} ({})",
                spec.listen_port, spec.protocol, spec.target, spec.origin
            )
        })
        .collect();
    assert_eq!(rendered, expected);
}

fn check_err(pairs: &[(&str, &str)], forwards: &[&str], expected: &str) {
    let options = Options {
        forwards: forwards.iter().map(|f| (*f).to_owned()).collect(),
        ..Options::default()
    };
    let error = parse(env(pairs), &options).expect_err("input is invalid");
    assert_eq!(error.to_string(), expected);
}

/// Everything Docker injects for `--link mysql:mysql` with a password in the backend's env.
const MYSQL_LINK: &[(&str, &str)] = &[
    ("MYSQL_PORT", "tcp://172.17.0.5:3306"),
    ("MYSQL_PORT_3306_TCP", "tcp://172.17.0.5:3306"),
    ("MYSQL_PORT_3306_TCP_ADDR", "172.17.0.5"),
    ("MYSQL_PORT_3306_TCP_PORT", "3306"),
    ("MYSQL_PORT_3306_TCP_PROTO", "tcp"),
    ("MYSQL_NAME", "/ambassador/mysql"),
    ("MYSQL_ENV_MYSQL_ROOT_PASSWORD", "hunter2"),
    ("MYSQL_ENV_GOSU_VERSION", "1.7"),
];

#[test]
fn docker_link_gives_one_forward() {
    check(
        MYSQL_LINK,
        &[],
        &["3306/tcp -> 172.17.0.5:3306 (link mysql)"],
    );
}

#[test]
fn no_links_no_forwards() {
    check(&[("PATH", "/usr/bin"), ("HOME", "/root")], &[], &[]);
}

#[test]
fn several_links_ports_and_protocols() {
    check(
        &[
            ("WEB_PORT_80_TCP", "tcp://172.17.0.7:80"),
            ("WEB_PORT_443_TCP", "tcp://172.17.0.7:443"),
            ("DNS_PORT_53_UDP", "udp://172.17.0.8:53"),
            ("DNS_PORT_53_TCP", "tcp://172.17.0.8:53"),
            ("DNS_PORT_53_UDP_ADDR", "172.17.0.8"),
        ],
        &[],
        &[
            "53/tcp -> 172.17.0.8:53 (link dns)",
            "53/udp -> 172.17.0.8:53 (link dns)",
            "80/tcp -> 172.17.0.7:80 (link web)",
            "443/tcp -> 172.17.0.7:443 (link web)",
        ],
    );
}

#[test]
fn ipv6_and_hostnames() {
    check(
        &[
            ("REDIS_PORT_6379_TCP", "tcp://[fd00::5]:6379"),
            ("CACHE_PORT_11211_TCP", "tcp://memcached.internal:11211"),
        ],
        &[],
        &[
            "6379/tcp -> [fd00::5]:6379 (link redis)",
            "11211/tcp -> memcached.internal:11211 (link cache)",
        ],
    );
}

#[test]
fn cross_host_form_may_map_the_port() {
    check(
        &[("REDIS_PORT_6379_TCP", "tcp://192.168.1.52:16379")],
        &[],
        &["6379/tcp -> 192.168.1.52:16379 (link redis)"],
    );
}

#[test]
fn serf_link_is_never_forwarded() {
    check(
        &[
            ("SERF_1_PORT_7946_TCP", "tcp://172.17.0.2:7946"),
            ("SERF_1_PORT_7946_UDP", "udp://172.17.0.2:7946"),
            ("SERF_1_PORT_7373_TCP", "tcp://172.17.0.2:7373"),
            ("MYSQL_PORT_3306_TCP", "tcp://172.17.0.5:3306"),
        ],
        &[],
        &["3306/tcp -> 172.17.0.5:3306 (link mysql)"],
    );
    let options = Options {
        serf_link: "my-serf".to_owned(),
        ..Options::default()
    };
    let specs = parse(
        env(&[("MY_SERF_PORT_7946_TCP", "tcp://10.0.0.1:7946")]),
        &options,
    )
    .expect("valid");
    assert_eq!(specs, []);
}

#[test]
fn the_serf_link_ports_are_found_on_request() {
    let vars = env(&[
        ("SERF_1_PORT_7946_TCP", "tcp://172.17.0.2:7946"),
        ("SERF_1_PORT_7946_UDP", "udp://172.17.0.2:7946"),
        ("SERF_1_ENV_SERF_PORT_1_TCP", "secret"),
        ("MYSQL_PORT_3306_TCP", "tcp://172.17.0.5:3306"),
    ]);
    let specs = link_ports(vars, "serf_1").expect("valid");
    let rendered: Vec<String> = specs.iter().map(ForwardSpec::to_forward_flag).collect();
    assert_eq!(
        rendered,
        ["7946=172.17.0.2:7946", "7946=172.17.0.2:7946/udp"]
    );
    let error =
        link_ports(env(&[("SERF_1_PORT_7946_TCP", "tcp://x")]), "serf_1").expect_err("malformed");
    assert!(
        error.to_string().starts_with("SERF_1_PORT_7946_TCP="),
        "{error}"
    );
}

#[test]
fn the_link_name_variable_says_a_portless_container_is_linked() {
    let check = |pairs: &[(&str, &str)], alias: &str, expected: Option<&str>| {
        assert_eq!(
            link_name_var(env(pairs), alias).as_deref(),
            expected,
            "{pairs:?} {alias}"
        );
    };
    // `--link serf_1:serf_1` to an image without EXPOSE: no port variable, only the name.
    check(
        &[("SERF_1_NAME", "/amb/serf_1")],
        "serf_1",
        Some("SERF_1_NAME"),
    );
    check(
        &[
            ("SEED_X_NAME", "/amb-serf_2/seed-x"),
            ("SERF_1_NAME", "/amb/serf_1"),
        ],
        "seed-x",
        Some("SEED_X_NAME"),
    );
    check(
        &[("SERF_1_NAME", "/amb/SERF_1")],
        "serf_1",
        Some("SERF_1_NAME"),
    );
    check(&[], "serf_1", None);
    check(&[("MYSQL_NAME", "/amb/mysql")], "serf_1", None);
    // Not Docker's form, or another alias's name: not a link to `serf_1`.
    check(&[("SERF_1_NAME", "serf_1")], "serf_1", None);
    check(&[("SERF_1_NAME", "/amb/mysql")], "serf_1", None);
    check(&[("SERF_1_NAME", "")], "serf_1", None);
    // A linked container's own environment is never a link of ours.
    check(&[("DB_ENV_SERF_1_NAME", "/amb/serf_1")], "serf_1", None);
}

#[test]
fn env_copies_are_never_links() {
    // The backend was itself linked to `db`: Docker copies its DB_PORT_* variables as ENV.
    check(
        &[
            ("APP_PORT_8080_TCP", "tcp://172.17.0.9:8080"),
            ("APP_ENV_DB_PORT_3306_TCP", "tcp://10.9.9.9:3306"),
            ("APP_ENV_DB_PORT_3306_TCP_ADDR", "10.9.9.9"),
            ("X_ENV_Y_PORT_3306_TCP", "not even a url: s3cret"),
            ("X_ENV_PORT_5432_TCP", "s3cret"),
        ],
        &[],
        &["8080/tcp -> 172.17.0.9:8080 (link app)"],
    );
}

#[test]
fn env_secrets_never_appear_in_errors() {
    let options = Options::default();
    let error = parse(
        env(&[
            ("MYSQL_ENV_MYSQL_ROOT_PASSWORD", "hunter2"),
            ("MYSQL_PORT_3306_TCP", "tcp://172.17.0.5:99999"),
        ]),
        &options,
    )
    .expect_err("port out of range");
    assert!(!error.to_string().contains("hunter2"), "{error}");
}

#[test]
fn forward_flags_add_and_override() {
    check(
        MYSQL_LINK,
        &[
            "3306=10.0.0.9:3307",
            "53=10.0.0.53:53/udp",
            "8080=web:80/tcp",
        ],
        &[
            "53/udp -> 10.0.0.53:53 (forward 53=10.0.0.53:53/udp)",
            "3306/tcp -> 10.0.0.9:3307 (forward 3306=10.0.0.9:3307)",
            "8080/tcp -> web:80 (forward 8080=web:80/tcp)",
        ],
    );
}

#[test]
fn forward_by_container_name() {
    check(
        &[],
        &["3306=mysql:3306", "6379=[::1]:6379"],
        &[
            "3306/tcp -> mysql:3306 (forward 3306=mysql:3306)",
            "6379/tcp -> [::1]:6379 (forward 6379=[::1]:6379)",
        ],
    );
}

#[test]
fn identical_duplicates_are_one_forward() {
    check(
        &[],
        &["80=web:80", "80=web:80"],
        &["80/tcp -> web:80 (forward 80=web:80)"],
    );
}

#[test]
fn malformed_link_values() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "MYSQL_PORT_3306_TCP",
            "172.17.0.5:3306",
            "MYSQL_PORT_3306_TCP=\"172.17.0.5:3306\": expected tcp://ADDR:PORT",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "udp://172.17.0.5:3306",
            "MYSQL_PORT_3306_TCP=\"udp://172.17.0.5:3306\": scheme \"udp\" does not match the TCP in the name",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://172.17.0.5:70000",
            "MYSQL_PORT_3306_TCP=\"tcp://172.17.0.5:70000\": target port \"70000\" is out of range 1-65535",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://172.17.0.5:0",
            "MYSQL_PORT_3306_TCP=\"tcp://172.17.0.5:0\": target port \"0\" is out of range 1-65535",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://172.17.0.5",
            "MYSQL_PORT_3306_TCP=\"tcp://172.17.0.5\": \"172.17.0.5\": expected HOST:PORT",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://:3306",
            "MYSQL_PORT_3306_TCP=\"tcp://:3306\": the host is empty",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://fd00::5:3306",
            "MYSQL_PORT_3306_TCP=\"tcp://fd00::5:3306\": \"fd00::5\": an IPv6 address must be in brackets, [fd00::5]:3306",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://[fd00::zz]:3306",
            "MYSQL_PORT_3306_TCP=\"tcp://[fd00::zz]:3306\": \"fd00::zz\" is not an IPv6 address",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://300.1.2.3:3306",
            "MYSQL_PORT_3306_TCP=\"tcp://300.1.2.3:3306\": \"300.1.2.3\" is not an IP address or a host name",
        ),
        (
            "MYSQL_PORT_3306_TCP",
            "tcp://my host:3306",
            "MYSQL_PORT_3306_TCP=\"tcp://my host:3306\": \"my host\" is not an IP address or a host name",
        ),
        (
            "MYSQL_PORT_99999_TCP",
            "tcp://172.17.0.5:3306",
            "MYSQL_PORT_99999_TCP=\"tcp://172.17.0.5:3306\": port \"99999\" in the name is out of range 1-65535",
        ),
        (
            "MYSQL_PORT_0_TCP",
            "tcp://172.17.0.5:3306",
            "MYSQL_PORT_0_TCP=\"tcp://172.17.0.5:3306\": port \"0\" in the name is out of range 1-65535",
        ),
        (
            "MYSQL_PORT_HTTP_TCP",
            "tcp://172.17.0.5:80",
            "MYSQL_PORT_HTTP_TCP=\"tcp://172.17.0.5:80\": port \"HTTP\" in the name is not a port number",
        ),
    ];
    for (name, value, expected) in cases {
        check_err(&[(name, value)], &[], expected);
    }
}

#[test]
fn malformed_forward_flags() {
    let cases: &[(&str, &str)] = &[
        (
            "3306",
            "--forward=\"3306\": expected LISTEN=HOST:PORT[/udp]",
        ),
        (
            "x=mysql:3306",
            "--forward=\"x=mysql:3306\": listen port \"x\" is not a port number",
        ),
        (
            "65536=mysql:3306",
            "--forward=\"65536=mysql:3306\": listen port \"65536\" is out of range 1-65535",
        ),
        (
            "3306=mysql",
            "--forward=\"3306=mysql\": \"mysql\": expected HOST:PORT",
        ),
        (
            "3306=mysql:3306/sctp",
            "--forward=\"3306=mysql:3306/sctp\": unknown protocol \"sctp\" (expected /tcp or /udp)",
        ),
        (
            "3306=mysql:port",
            "--forward=\"3306=mysql:port\": target port \"port\" is not a port number",
        ),
    ];
    for (entry, expected) in cases {
        check_err(&[], &[entry], expected);
    }
}

#[test]
fn conflicts_name_both_sources() {
    check_err(
        &[
            ("WEB_PORT_80_TCP", "tcp://172.17.0.7:80"),
            ("API_PORT_80_TCP", "tcp://172.17.0.8:80"),
        ],
        &[],
        "port 80/tcp has two targets: API_PORT_80_TCP=tcp://172.17.0.8:80 and \
         WEB_PORT_80_TCP=tcp://172.17.0.7:80; choose one with --forward 80=HOST:PORT",
    );
    check_err(
        &[],
        &["80=a:80", "80=b:80"],
        "port 80/tcp has two targets: --forward 80=a:80 and --forward 80=b:80; \
         choose one with --forward 80=HOST:PORT",
    );
    // The same port over TCP and UDP is two forwards, not a conflict.
    check(
        &[],
        &["53=a:53", "53=b:53/udp"],
        &[
            "53/tcp -> a:53 (forward 53=a:53)",
            "53/udp -> b:53 (forward 53=b:53/udp)",
        ],
    );
}

#[test]
fn link_var_recognition() {
    assert_eq!(
        link_var("A_PORT_B_PORT_80_TCP"),
        Some(LinkVar {
            alias: "A_PORT_B",
            port: "80",
            protocol: Protocol::Tcp
        })
    );
    for name in [
        "MYSQL_PORT",
        "MYSQL_PORT_3306_TCP_ADDR",
        "MYSQL_PORT_3306_TCP_PORT",
        "MYSQL_PORT_3306_TCP_PROTO",
        "MYSQL_NAME",
        "MYSQL_ENV_X_PORT_1_TCP",
        "_PORT_80_TCP",
        "PORT_80_TCP",
        "MYSQL_PORT__TCP",
    ] {
        assert_eq!(link_var(name), None, "{name}");
    }
}

// Property tests: generated link sets rendered the way Docker renders them parse back to the
// same forwards, whatever the order and whatever the ENV copies hold.

#[derive(Debug, Clone)]
struct Link {
    alias: String,
    target_host: Host,
    ports: Vec<(u16, Protocol)>,
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Host::Ip(IpAddr::V4(Ipv4Addr::from(o)))),
        any::<[u16; 8]>().prop_map(|s| Host::Ip(IpAddr::V6(Ipv6Addr::from(s)))),
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9]{0,5}){0,2}".prop_map(Host::Name),
    ]
}

fn link() -> impl Strategy<Value = Link> {
    (
        "[a-z][a-z0-9]{0,6}(_[a-z0-9]{1,3})?",
        host(),
        proptest::collection::vec(
            (
                1u16..=65535,
                prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
            ),
            1..4,
        ),
    )
        .prop_map(|(alias, target_host, ports)| Link {
            alias,
            target_host,
            ports,
        })
}

fn docker_env(links: &[Link], secret: &str) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for link in links {
        let alias = normalize_alias(&link.alias);
        vars.push((format!("{alias}_NAME"), format!("/amb/{}", link.alias)));
        vars.push((format!("{alias}_ENV_PASSWORD"), secret.to_owned()));
        vars.push((
            format!("{alias}_ENV_OTHER_PORT_5432_TCP"),
            format!("tcp://{secret}:5432"),
        ));
        for (index, (port, protocol)) in link.ports.iter().enumerate() {
            let proto = protocol.as_str();
            let url = format!("{proto}://{}:{port}", link.target_host);
            let prefix = format!("{alias}_PORT_{port}_{}", proto.to_uppercase());
            if index == 0 {
                vars.push((format!("{alias}_PORT"), url.clone()));
            }
            vars.push((prefix.clone(), url));
            vars.push((format!("{prefix}_ADDR"), link.target_host.to_string()));
            vars.push((format!("{prefix}_PORT"), port.to_string()));
            vars.push((format!("{prefix}_PROTO"), proto.to_owned()));
        }
    }
    vars
}

proptest! {
    #[test]
    fn docker_link_sets_round_trip(
        links in proptest::collection::vec(link(), 0..5),
        secret in "[ -~]{0,20}",
        seed in any::<u64>(),
    ) {
        // Keep aliases and (port, protocol) pairs unique, as Docker would: otherwise a conflict.
        let mut seen_alias = std::collections::HashSet::new();
        let mut seen_port = std::collections::HashSet::new();
        let links: Vec<Link> = links
            .into_iter()
            .filter(|l| {
                let alias = normalize_alias(&l.alias);
                // `X_ENV` aliases are documented as unsupported (they read as ENV copies).
                alias != "SERF_1" && !alias.ends_with("_ENV") && seen_alias.insert(alias)
            })
            .map(|mut l| {
                l.ports.retain(|p| seen_port.insert(*p));
                l
            })
            .filter(|l| !l.ports.is_empty())
            .collect();
        let mut vars = docker_env(&links, &secret);
        // Any order.
        let n = vars.len();
        if n > 1 {
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 1).rotate_left(17) % n as u64) as usize;
                vars.swap(i, j);
            }
        }
        let specs = parse(vars, &Options::default()).expect("generated links are valid");
        let mut expected: Vec<ForwardSpec> = links
            .iter()
            .flat_map(|link| {
                link.ports.iter().map(move |(port, protocol)| ForwardSpec {
                    listen_port: *port,
                    protocol: *protocol,
                    target: Target { host: link.target_host.clone(), port: *port },
                    origin: Origin::Link {
                        alias: normalize_alias(&link.alias).to_ascii_lowercase(),
                        var: format!(
                            "{}_PORT_{port}_{}",
                            normalize_alias(&link.alias),
                            protocol.as_str().to_uppercase()
                        ),
                    },
                })
            })
            .collect();
        expected.sort();
        prop_assert_eq!(specs, expected);
    }

    #[test]
    fn forward_flags_round_trip(
        listen_port in 1u16..=65535,
        target_host in host(),
        port in 1u16..=65535,
        udp in any::<bool>(),
    ) {
        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
        let spec = ForwardSpec {
            listen_port,
            protocol,
            target: Target { host: target_host, port },
            origin: Origin::Forward(String::new()),
        };
        let flag = spec.to_forward_flag();
        let parsed = parse_forward(&flag).expect("rendered flag parses");
        prop_assert_eq!(parsed, ForwardSpec { origin: Origin::Forward(flag), ..spec });
    }

    #[test]
    fn parse_never_panics(name in "[A-Z_0-9]{0,30}", value in ".{0,40}") {
        let _ = parse(vec![(name, value)], &Options::default());
    }
}

#[test]
fn targets_parse_from_host_port() {
    for (text, expected) in [
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        ("[fd00::5]:6379", "[fd00::5]:6379"),
        ("redis:6379", "redis:6379"),
        (" db.internal:5432 ", "db.internal:5432"),
    ] {
        let target: Target = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(target.to_string(), expected);
    }
    for (text, reason) in [
        ("redis", "expected HOST:PORT"),
        ("redis:0", "out of range"),
        ("fd00::5:6379", "in brackets"),
        (":6379", "empty"),
    ] {
        let error = text.parse::<Target>().unwrap_err();
        assert!(error.contains(reason), "{text}: {error}");
    }
}

/// Every pod gets `KUBERNETES_PORT_443_TCP` for the API service (and variables of the same form
/// for every Service): the `kubernetes` alias is never forwarded unless `--links` names it, and
/// `--links` makes the named aliases the only ones.
#[test]
fn kubernetes_service_links_and_the_allow_list() {
    let pod = [
        ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("MYSQL_PORT_3306_TCP", "tcp://10.96.4.7:3306"),
        ("CACHE_PORT_6379_TCP", "tcp://10.96.9.2:6379"),
        ("WEB_PORT_80_TCP", "tcp://10.96.3.3:80"),
    ];
    check(
        &pod,
        &[],
        &[
            "80/tcp -> 10.96.3.3:80 (link web)",
            "3306/tcp -> 10.96.4.7:3306 (link mysql)",
            "6379/tcp -> 10.96.9.2:6379 (link cache)",
        ],
    );
    let render = |links: &[&str], forwards: &[&str]| -> Vec<String> {
        let options = Options {
            links: Some(links.iter().map(|link| (*link).to_owned()).collect()),
            forwards: forwards.iter().map(|f| (*f).to_owned()).collect(),
            ..Options::default()
        };
        parse(env(&pod), &options)
            .unwrap_or_else(|error| panic!("{error}"))
            .iter()
            .map(|spec| format!("{}/{} ({})", spec.listen_port, spec.protocol, spec.origin))
            .collect()
    };
    assert_eq!(
        render(&["mysql", " cache "], &[]),
        ["3306/tcp (link mysql)", "6379/tcp (link cache)"]
    );
    assert_eq!(render(&["kubernetes"], &[]), ["443/tcp (link kubernetes)"]);
    // An empty list forwards no link; --forward still adds.
    assert_eq!(
        render(&[], &["8080=web:80"]),
        ["8080/tcp (forward 8080=web:80)"]
    );
    // Spaces and stray commas in AMB_FORWARD are tolerated.
    assert_eq!(
        render(&[""], &[" 8080=web:80", "", "9090=web:90 "]).len(),
        2
    );
}
