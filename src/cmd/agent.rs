//! `amb-serf agent`: a plain Serf-compatible agent on the shared member runtime
//! ([`crate::member`]), so a cluster can be seeded without Go (e.g. `serf_1` in the compose
//! file). SIGTERM/SIGINT or `serf leave` → graceful leave (peers see `left`), exit 0. SIGHUP
//! reloads what `serf agent` reloads: the log level, event handlers and tags of
//! `--config-file`, and the tags file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use registrar::tags::Health;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config_file::ConfigArgs;
use crate::member::{self, MemberArgs};
use crate::metrics;
use crate::nameserver;
use crate::reload::{Reloadable, TagsOwner};

/// How long a leave may take before we exit anyway (Serf's broadcast timeout plus the
/// propagation delay, with room to spare).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `amb-serf agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    member: MemberArgs,

    #[command(flatten)]
    config: ConfigArgs,

    /// Serve /livez, /readyz (and /healthz) and /metrics here (e.g. 0.0.0.0:9090), for the
    /// image's HEALTHCHECK and Kubernetes probes; off by default.
    #[arg(long, env = "AMB_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<SocketAddr>,

    #[command(flatten)]
    dns: nameserver::DnsArgs,
}

pub(crate) async fn run(args: Args, log_flag: Option<&str>) -> anyhow::Result<()> {
    let reloadable = Reloadable::new(&args.member, &args.config, log_flag, TagsOwner::Config);
    let start = reloadable.start()?;
    let seeds = args.member.gossip.seeds(crate::environment::vars())?;
    let metrics_listener = metrics::bind(args.metrics_addr).await?;
    let dns = args.dns.bind().await?;
    let member = member::start(&start.member, start.tags, seeds, member::Extras::default()).await?;
    reloadable.follow(member.clone());
    // An agent forwards nothing and has no backend: ready while it runs, until it leaves.
    let (lifecycle_tx, lifecycle) = watch::channel(metrics::Lifecycle::Running);
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        let observed = Arc::new(metrics::Observed {
            stats: Arc::new(proxy::Stats::new(0)),
            health: watch::channel(Health::Passing).1,
            lifecycle,
            members: metrics::statuses_of(Some(member.clone())),
            kernel: None,
        });
        tokio::spawn(metrics::serve(listener, observed, metrics_stop.clone()));
    }
    if let Some(dns) = dns {
        nameserver::spawn(dns, &member.discovery(), metrics_stop.clone());
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop_from_rpc = tokio::select! {
        _ = terminate.recv() => { tracing::info!("sigterm: leaving the cluster"); false }
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt: leaving the cluster"); false }
        () = member.stop_requested() => true,
    };
    lifecycle_tx.send_replace(metrics::Lifecycle::Leaving);
    // After `serf leave` the member has already left; leaving again returns at once.
    if !stop_from_rpc {
        if let Err(error) = member.leave(LEAVE_TIMEOUT).await {
            tracing::warn!(error = %format!("{error:#}"), "graceful leave failed");
        }
    }
    member.shutdown().await;
    metrics_stop.cancel();
    tracing::info!("agent stopped");
    Ok(())
}
