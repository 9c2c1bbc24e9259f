//! `amb-serf connect`: the consumer-side ambassador. Listens on one port per role and forwards
//! each new connection to a live provider of that role in the Serf cluster, following the
//! cluster's membership events (see [`crate::consumer`]).
//!
//! Order of events, as in `run`:
//! 1. parse the roles and flags (a mistake is a [`UsageError`], exit 2);
//! 2. bind every listener;
//! 3. start the Serf member (tagged `role=connect` unless `--tag role=…`), follow its events;
//! 4. serve until SIGTERM or SIGINT (or `serf leave` over RPC);
//! 5. leave the cluster;
//! 6. stop accepting, drain open connections; 5 and 6 within `--drain-timeout`, then exit 0.
//!    A second signal exits at once.

use std::sync::Arc;

use anyhow::Context as _;
use proxy::{CancellationToken, Proxy, TaskTracker};
use tokio::sync::watch;
use tracing::info;

use super::serve::{self, raise_open_file_limit, ConsumeArgs, ServeArgs, Signals};
use super::UsageError;
use crate::member::{self, MemberArgs};
use crate::metrics;
use crate::registry::RegistryArgs;
use registrar::consumer::{self, Consumer};

/// Flags of `amb-serf connect`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each ROLE is served on its LISTEN_PORT (default: the role itself when it is a number): every new
connection goes to a live member advertising role=ROLE that is not health=critical, at its
`service` tag address if it has one, else its gossip IP and the role port. Least outstanding
connections wins, ties at random. PORT=ROLE is accepted too (the port first, as in --forward).

Examples:
  docker run -d --link serf_1:serf_1 -p 3306:3306 amb-serf connect 3306
  amb-serf connect 6379 web=8080 --join 10.0.0.2:7946
  AMB_CONNECT=3306,80=web amb-serf connect")]
pub(crate) struct Args {
    /// Role to consume and the local port to serve it on (repeatable; AMB_CONNECT takes a
    /// comma-separated list).
    #[arg(
        value_name = "ROLE[=LISTEN_PORT]",
        env = "AMB_CONNECT",
        value_delimiter = ','
    )]
    roles: Vec<String>,

    #[command(flatten)]
    consume: ConsumeArgs,

    #[command(flatten)]
    member: MemberArgs,

    /// Serf (the default) or etcd.
    #[command(flatten)]
    registry: RegistryArgs,

    /// Listeners, limits, liveness, draining, /metrics and DNS (shared with `run`).
    #[command(flatten)]
    serve: ServeArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let specs = consumer::parse_specs(&args.roles).map_err(|error| UsageError(error.0))?;
    if specs.is_empty() {
        return Err(UsageError(
            "connect: no role given: name one or more ROLE[=LISTEN_PORT] (or set AMB_CONNECT)"
                .to_owned(),
        )
        .into());
    }
    let mut tags = args.member.tags()?;
    tags.entry(registrar::tags::ROLE.to_owned())
        .or_insert_with(|| "connect".to_owned());
    let registry = args.registry.registry(crate::environment::vars())?;
    let seeds = args
        .member
        .gossip
        .seeds_for(&registry, crate::environment::vars())?;
    raise_open_file_limit();
    let mut signals = Signals::new().context("installing signal handlers")?;

    let mut proxy = Proxy::bind(&[], &args.serve.proxy_config()).await?;
    // Our own node is never a provider to us in Serf; with etcd we register nothing, so a
    // provider on a host of the same name is still one.
    let local = match registry.is_serf() {
        true => args.member.gossip.node_name(),
        false => String::new(),
    };
    let consumer = Consumer::new(&local, &specs);
    let bound = consumer.bind(&mut proxy, &specs, args.consume.policy())?;
    let stats = proxy.stats();
    let metrics_listener = metrics::bind(args.serve.metrics_addr).await?;
    let dns = args.serve.dns.bind().await?;

    // With etcd there is no member and nothing registered: providers come from the watch of
    // the prefix.
    let shutdown = CancellationToken::new();
    let (_, health) = watch::channel(registrar::tags::Health::Passing);
    let presence = registry
        .start(
            member::start(&args.member, tags, seeds, member::Extras::default()),
            None,
            health,
            &shutdown,
        )
        .await?;
    let mut advertiser = presence.advertiser;
    let node = advertiser
        .as_ref()
        .map_or_else(|| args.member.gossip.node_name(), |a| a.name().to_owned());
    let (lifecycle_tx, lifecycle) = watch::channel(metrics::Lifecycle::Running);
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        let observed = Arc::new(metrics::Observed {
            stats: Arc::clone(&stats),
            health: consumer.health(),
            lifecycle,
            members: metrics::statuses_of(presence.member),
            kernel: None,
        });
        tokio::spawn(metrics::serve(listener, observed, metrics_stop.clone()));
    }
    let source = presence.discovery.source();
    if let Some(dns) = dns {
        crate::nameserver::spawn(dns, presence.discovery.as_ref(), shutdown.clone());
    }
    tokio::spawn(consumer.follow(presence.discovery, shutdown.clone()));
    let tasks = TaskTracker::new();
    proxy.spawn(&tasks, &shutdown);
    for (spec, addr) in &bound {
        println!(
            "connect {addr} -> role={} (providers from {source})",
            spec.role
        );
    }
    info!(roles = bound.len(), %node, "ready");

    let reason = serve::stop_reason(&mut signals, advertiser.as_deref()).await;
    // As `run`: leave, then stop accepting and drain, all within the drain timeout.
    let deadline = tokio::time::Instant::now() + args.serve.drain_timeout;
    info!(%reason, "shutting down: leaving the cluster, then draining");
    lifecycle_tx.send_replace(metrics::Lifecycle::Leaving);
    let second = serve::withdraw(advertiser.as_mut(), args.serve.drain_timeout, &mut signals).await;
    serve::drain(&shutdown, &tasks, &stats, deadline, &mut signals, second).await;
    metrics_stop.cancel();
    serve::release(advertiser, deadline).await;
    Ok(())
}
