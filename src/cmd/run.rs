//! `amb-serf run`: forward linked ports and advertise them in Serf, health-gated.
//!
//! Order of events:
//! 1. parse the link environment and flags; a mistake (a malformed link variable, a bad
//!    `--tag`, a tag set over Serf's meta limit) is a [`UsageError`], exit 2;
//! 2. bind every listener (and `--metrics-addr`): a busy port fails here, before anything is
//!    advertised;
//! 3. probe the backend once, start the Serf member ([`crate::member`]) with the tags for that
//!    health, join through the Serf link or `--join` in the background (none: a cluster of one);
//! 4. serve: the health loop re-probes every `--health-interval` and the advertiser applies
//!    `registrar::tags::desired` on every change (`role` withdrawn while critical); event
//!    handlers run with `AMB_BACKEND_HOST`/`AMB_BACKEND_PORT`;
//! 5. on SIGTERM/SIGINT (or `serf leave` over RPC): stop the health loop, leave the cluster
//!    (peers show `left`, consumers stop routing here) while the forwarders still serve;
//! 6. stop accepting, drain open connections; steps 5 and 6 together take at most
//!    `--drain-timeout`, then exit 0. A second signal exits at once.
//!
//! With `--registry etcd://…` (or an `ETCD_PORT_2379_TCP` link) step 3 starts no Serf member but
//! an etcd registrar fed by the same health channel ([`registrar::registry`]), and step 5 revokes
//! its lease instead of leaving; the rest is identical.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use proxy::link_env::{self, ForwardSpec, Host};
use proxy::{CancellationToken, Proxy, TaskTracker};
use registrar::tags::Health;
use tokio::sync::watch;
use tracing::{info, warn};

use super::serve::{self, raise_open_file_limit, ConsumeArgs, ServeArgs, Signals};
use super::UsageError;
use crate::member::{self, MemberArgs};
use crate::registry::{Registry, RegistryArgs};
use proxy::health::check as health;

use crate::metrics;
use registrar::advertisement;
use registrar::consumer::{self, Consumer};

/// Flags of `amb-serf run`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Forwards come from Docker link variables (<ALIAS>_PORT_<port>_<TCP|UDP>=tcp://ADDR:PORT, set by
`--link backend:alias` or by hand for a remote host) and from --forward; the local port is the
linked port. <ALIAS>_ENV_* variables are never read.

The member joins the Serf cluster through the Serf link (SERF_1_PORT_7946_TCP) or --join, and
advertises role=<first link's first port> (NAME or --role overrides), ports=<port/proto,...>,
health=passing|critical (role withdrawn while the backend fails its --health-check) and, with
--service-addr, service=HOST:PORT. Event handlers also get AMB_BACKEND_HOST/AMB_BACKEND_PORT.

Examples:
  docker run -d --link mysql:mysql --link serf_1:serf_1 -p 3306:3306 amb-serf
  docker run -d -e REDIS_PORT_6379_TCP=tcp://192.168.1.52:6379 -p 6379:6379 amb-serf
  amb-serf run --forward 3306=mysql:3306 --join serf_1:7946 --metrics-addr 0.0.0.0:9090
  amb-serf run --event-handler 'user:create_db=mysql -h \"$AMB_BACKEND_HOST\" -e \"create database $(cat)\"'
  AMB_FORWARD=3306=mysql:3306,8080=web:80 amb-serf")]
pub(crate) struct Args {
    /// Add or override a forward: LISTEN=HOST:PORT, with /udp for UDP; HOST may be a container
    /// name (resolved per connection). Repeatable; AMB_FORWARD takes a comma-separated list.
    #[arg(
        long = "forward",
        env = "AMB_FORWARD",
        value_name = "LISTEN=HOST:PORT[/udp]",
        value_delimiter = ','
    )]
    forwards: Vec<String>,

    /// Forward only these link aliases (comma-separated); they also give the default role.
    /// Unset: every link but the Serf agent's and Kubernetes' `kubernetes` API service.
    #[arg(long, env = "AMB_LINKS", value_name = "ALIAS,…", value_delimiter = ',')]
    links: Option<Vec<String>>,

    /// A UDP session idle this long (no datagram either way) is closed.
    #[arg(long, env = "AMB_UDP_IDLE_TIMEOUT", default_value = "60s", value_parser = crate::duration::parse)]
    udp_idle_timeout: Duration,

    /// The `role` tag's value (default: the first link's first port, e.g. 3306).
    #[arg(long, env = "NAME")]
    role: Option<String>,

    /// HOST:PORT consumers on other hosts should dial (the Docker host's IP and the published
    /// port); advertised as the `service` tag.
    #[arg(long, env = "AMB_SERVICE_ADDR", value_name = "HOST:PORT")]
    service_addr: Option<String>,

    /// How often to check the backend (see --health-check); 0 turns checking off (the backend
    /// is then always advertised as passing).
    #[arg(long, env = "AMB_HEALTH_INTERVAL", default_value = "2s", value_parser = crate::duration::parse)]
    health_interval: Duration,

    /// How to check the backend: tcp (it accepts a connection), mysql (greeting, a login
    /// attempt, quit: no connect errors on the server), redis (PING → +PONG), or auto: mysql
    /// when the backend's port is 3306, redis on 6379, tcp otherwise.
    #[arg(
        long,
        env = "AMB_HEALTH_CHECK",
        value_parser = health_check_parser(),
        default_value_t = health::Kind::Auto,
        value_name = "KIND"
    )]
    health_check: health::Kind,

    /// The user the mysql check logs in as, without a password; it need not exist (access
    /// denied counts as up). With an existing passwordless user the login succeeds.
    #[arg(long, env = "AMB_HEALTH_MYSQL_USER", default_value = "amb_serf_check")]
    health_mysql_user: String,

    /// The backend to health-check (default: the first link's first TCP target).
    #[arg(long, env = "AMB_HEALTH_TARGET", value_name = "HOST:PORT")]
    health_target: Option<proxy::Target>,

    /// Listeners, limits, liveness, draining, /metrics and DNS (shared with `connect`).
    #[command(flatten)]
    serve: ServeArgs,

    /// The Serf member: name, gossip address, where to join, tags, RPC, event handlers.
    #[command(flatten)]
    member: MemberArgs,

    /// Log level, event handlers and tags (all but the ones `run` manages) reloaded on SIGHUP
    /// (`reload::Reloadable`).
    #[command(flatten)]
    config: crate::config_file::ConfigArgs,

    /// Serf (the default) or etcd.
    #[command(flatten)]
    registry: RegistryArgs,

    /// Also consume ROLE[=LISTEN_PORT] from the cluster in this process, as `amb-serf connect`
    /// does (repeatable; an ambassador that serves one service and uses another).
    #[arg(
        long = "connect",
        env = "AMB_CONNECT",
        value_delimiter = ',',
        value_name = "ROLE[=PORT]"
    )]
    connect: Vec<String>,

    /// How `--connect` picks and retries providers.
    #[command(flatten)]
    consume: ConsumeArgs,

    /// User space or the kernel (nftables) carries the forwards.
    #[command(flatten)]
    dataplane: crate::dataplane::DataplaneArgs,
}

pub(crate) async fn run(args: Args, log_flag: Option<&str>) -> anyhow::Result<()> {
    let reloadable = crate::reload::Reloadable::new(
        &args.member,
        &args.config,
        log_flag,
        crate::reload::TagsOwner::Advertiser,
    );
    let wanted = reloadable.start()?;
    let with_config = wanted.member;
    let Plan {
        registry,
        specs,
        consume_specs,
        seeds,
        advertisement,
        backend,
        health_check,
    } = plan(&args, wanted.tags)?;
    raise_open_file_limit();
    let mut signals = Signals::new().context("installing signal handlers")?;

    let config = proxy::Config {
        udp_idle_timeout: args.udp_idle_timeout,
        ..args.serve.proxy_config()
    };
    let mut proxy = Proxy::bind(&specs, &config).await?;
    // `--connect`: consumer listeners on the same forwarder (limits, counters, drain).
    let consumer = if consume_specs.is_empty() {
        None
    } else {
        // Our own node is never a provider to us in Serf; with etcd we register under our name.
        let consumer = Consumer::new(&args.member.gossip.node_name(), &consume_specs);
        let bound = consumer.bind(&mut proxy, &consume_specs, args.consume.policy())?;
        Some((consumer, bound))
    };
    let stats = proxy.stats();
    let metrics_listener = metrics::bind(args.serve.metrics_addr).await?;
    let dns = args.serve.dns.bind().await?;
    print_summary(&proxy, &specs);
    if let Some((_, bound)) = &consumer {
        for (spec, addr) in bound {
            println!(
                "connect {addr} -> role={} (providers from the cluster)",
                spec.role
            );
        }
    }

    let initial = initial_health(&args, health_check.as_ref()).await;
    let (health_tx, health_rx) = watch::channel(initial);
    let (lifecycle_tx, lifecycle_rx) = watch::channel(metrics::Lifecycle::Starting);
    let node_name = args.member.gossip.node_name();
    let mut kernel_path = crate::dataplane::start(
        args.dataplane.dataplane,
        &node_name,
        proxy.bound(),
        health_rx.clone(),
    )
    .await?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    proxy.spawn(&tasks, &shutdown);

    let handler_env = match &backend {
        Some(target) => vec![
            ("AMB_BACKEND_HOST".to_owned(), target.host.to_string()),
            ("AMB_BACKEND_PORT".to_owned(), target.port.to_string()),
        ],
        None => Vec::new(),
    };
    let initial_tags = registrar::tags::desired(&advertisement, initial);
    if !registry.is_serf() && !args.member.event_handlers.is_empty() {
        warn!("--event-handler needs Serf events; ignored with --registry etcd");
    }
    let local_ip = registrar::address::local_ip(
        args.member.gossip.advertise.map(|addr| addr.ip()),
        args.serve.listen_addr,
    );
    let role = advertisement.role.clone().unwrap_or_default();
    let presence = registry
        .start(
            member::start(
                &with_config,
                initial_tags.clone(),
                seeds,
                member::Extras { handler_env },
            ),
            Some(registrar::registry::EtcdRegistration {
                role: &role,
                node: &node_name,
                value: registrar::registry::registration(&advertisement, local_ip),
            }),
            health_rx.clone(),
            &shutdown,
        )
        .await?;
    let mut advertiser = presence
        .advertiser
        .expect("`run` always gives a registration");
    if let Some((consumer, _)) = consumer {
        tokio::spawn(consumer.follow(presence.discovery.clone(), shutdown.clone()));
    }
    if let Some(dns) = dns {
        crate::nameserver::spawn(dns, presence.discovery.as_ref(), shutdown.clone());
    }
    lifecycle_tx.send_replace(metrics::Lifecycle::Running);
    info!(
        node = advertiser.name(),
        forwards = specs.len(),
        role = advertisement.role.as_deref().unwrap_or(""),
        "ready"
    );

    // Health → what is advertised, until we withdraw.
    let advertising = CancellationToken::new();
    let background = TaskTracker::new();
    if let Some(check) = health_check {
        background.spawn(health::run_checks(check, health_tx, advertising.clone()));
    }
    if let Some(member) = presence.member.clone() {
        reloadable.follow(member);
    }
    background.spawn(advertiser.follow_health(
        advertisement,
        Some(initial_tags),
        health_rx.clone(),
        advertising.clone(),
    ));
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        let observed = Arc::new(metrics::Observed {
            stats: Arc::clone(&stats),
            health: health_rx,
            lifecycle: lifecycle_rx,
            members: metrics::statuses_of(presence.member),
            kernel: kernel_path.as_ref().map(|path| path.counters()),
        });
        tokio::spawn(metrics::serve(listener, observed, metrics_stop.clone()));
    }

    let reason = serve::stop_reason(&mut signals, Some(advertiser.as_ref())).await;
    // Everything from here must finish within the drain timeout.
    let deadline = tokio::time::Instant::now() + args.serve.drain_timeout;
    info!(%reason, "shutting down: leaving the cluster (or deregistering), then draining");
    lifecycle_tx.send_replace(metrics::Lifecycle::Leaving);
    advertising.cancel();
    background.close();
    background.wait().await;

    // Leave first: peers show `left` and consumers stop sending new clients while the
    // forwarders still serve; only then stop accepting and drain.
    let second = serve::withdraw(
        Some(&mut advertiser),
        args.serve.drain_timeout,
        &mut signals,
    )
    .await;
    if let Some(kernel_path) = &mut kernel_path {
        kernel_path.stop_new().await;
    }
    serve::drain(&shutdown, &tasks, &stats, deadline, &mut signals, second).await;
    if let Some(kernel_path) = kernel_path {
        kernel_path.remove().await;
    }
    metrics_stop.cancel();
    serve::release(Some(advertiser), deadline).await;
    Ok(())
}

/// What `run` serves, read from the flags and the environment; every mistake is a
/// [`UsageError`] found before anything binds.
struct Plan {
    registry: Registry,
    specs: Vec<ForwardSpec>,
    consume_specs: Vec<consumer::ConnectSpec>,
    seeds: Vec<String>,
    advertisement: registrar::tags::Advertisement,
    /// The backend handlers are told about.
    backend: Option<proxy::Target>,
    health_check: Option<health::Check>,
}

/// `tags`: the tags file, the config files' `tags` and `--tag` ([`crate::reload::Wanted`]).
fn plan(args: &Args, tags: BTreeMap<String, String>) -> anyhow::Result<Plan> {
    let serf_link = args.member.gossip.serf_link.clone();
    let options = link_env::Options {
        serf_link: serf_link.clone(),
        forwards: args.forwards.clone(),
        links: args.links.clone(),
    };
    let vars = crate::environment::vars();
    let registry = args.registry.registry(vars.iter().cloned())?;
    // The etcd link names the registry, not a backend to forward.
    let vars = match registry.etcd_from_link() {
        true => vars
            .into_iter()
            .filter(|(name, _)| !is_etcd_link_var(name))
            .collect(),
        false => vars,
    };
    let specs = link_env::parse(vars.iter().cloned(), &options)
        .map_err(|error| UsageError(error.to_string()))?;
    let consume_specs =
        consumer::parse_specs(&args.connect).map_err(|error| UsageError(error.0))?;
    let seeds = args.member.gossip.seeds_for(&registry, vars)?;
    let advertisement = advertisement::build(
        &specs,
        &args.forwards,
        args.role.clone(),
        args.service_addr.clone(),
        advertisement::user_tags(
            tags,
            &args
                .member
                .tags
                .iter()
                .flatten()
                .map(|(key, _)| key.as_str())
                .collect::<Vec<_>>(),
        ),
    );
    if let Some(addr) = &advertisement.service_addr {
        advertisement::check_service_addr(addr).map_err(UsageError)?;
    }
    advertisement
        .validate()
        .map_err(|error| UsageError(error.to_string()))?;
    if !registry.is_serf() && advertisement.role.is_none() {
        return Err(UsageError(
            "--registry etcd: nothing to register: no link, no --forward and no --role/NAME"
                .to_owned(),
        )
        .into());
    }
    // The backend handlers are told about, and (unless --health-target) the one health-checked.
    let backend = advertisement::health_target(&specs, &args.forwards, None);
    let health_check = args
        .health_target
        .clone()
        .or_else(|| backend.clone())
        .filter(|_| !args.health_interval.is_zero())
        .map(|target| health::Check {
            kind: args.health_check.resolve(target.port),
            target,
            mysql_user: args.health_mysql_user.clone(),
            interval: args.health_interval,
            timeout: args.health_interval.min(args.serve.connect_timeout),
        });
    Ok(Plan {
        registry,
        specs,
        consume_specs,
        seeds,
        advertisement,
        backend,
        health_check,
    })
}

/// The backend's health before the first advertisement, so the first tags are right.
/// `--health-check`'s values, each with its help line.
fn health_check_parser() -> impl clap::builder::TypedValueParser<Value = health::Kind> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new([
        PossibleValue::new("auto").help("`mysql` on port 3306, `redis` on 6379, `tcp` otherwise"),
        PossibleValue::new("tcp").help("Connect and close: the backend accepts connections"),
        PossibleValue::new("mysql").help(
            "Read the greeting, log in as --health-mysql-user (access denied is healthy), quit",
        ),
        PossibleValue::new("redis").help("`PING`, expect `+PONG`, `QUIT`"),
    ])
    .try_map(|name| name.parse::<health::Kind>())
}

async fn initial_health(args: &Args, health_check: Option<&health::Check>) -> Health {
    match health_check {
        Some(check) => {
            health::log_choice(args.health_check, check);
            let (initial, error) = check.probe().await;
            health::log_transition(&check.target, initial, error.as_deref());
            initial
        }
        None if args.health_interval.is_zero() => {
            info!("health checks off (--health-interval 0): health=passing");
            Health::Passing
        }
        None => {
            info!("no TCP forward to health-check (--health-target sets one): health=passing");
            Health::Passing
        }
    }
}

/// A Docker link variable of the `etcd` alias (`ETCD_PORT…`, `ETCD_NAME`, `ETCD_ENV_…`).
fn is_etcd_link_var(name: &str) -> bool {
    name == "ETCD_NAME" || name.starts_with("ETCD_PORT") || name.starts_with("ETCD_ENV_")
}

/// The one-screen summary on stdout: one line per forward, or why there is none.
fn print_summary(proxy: &Proxy, specs: &[ForwardSpec]) {
    if specs.is_empty() {
        println!(
            "nothing to forward: no link variables (<ALIAS>_PORT_<port>_TCP) and no --forward; \
             serving until signalled"
        );
        return;
    }
    for (spec, addr) in proxy.bound() {
        let resolved = match spec.target.host {
            Host::Name(_) => ", resolved per connection",
            Host::Ip(_) => "",
        };
        println!(
            "forward {} {addr} -> {} ({}{resolved})",
            spec.protocol, spec.target, spec.origin
        );
    }
}
