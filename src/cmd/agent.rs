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
use crate::member::{self, LocalMember, MemberArgs};
use crate::metrics;
use crate::nameserver;

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

/// What the flags and the config files ask for; computed at start and on every SIGHUP.
struct Wanted {
    member: MemberArgs,
    tags: std::collections::BTreeMap<String, String>,
    log_level: Option<String>,
}

/// The tags file, then the config files' `tags`, then `--tag`; the handlers of `--event-handler`
/// then of the config files; `--log-level` over the config files' `log_level`.
fn wanted(args: &Args, log_flag: Option<&str>) -> anyhow::Result<Wanted> {
    let config = args.config.read()?;
    let mut member = args.member.clone();
    member.event_handlers.extend(config.event_handlers);
    let mut tags = args.member.tags()?;
    tags.extend(config.tags);
    tags.extend(args.member.tags.iter().flatten().cloned());
    Ok(Wanted {
        member,
        tags,
        log_level: log_flag.map(str::to_owned).or(config.log_level),
    })
}

pub(crate) async fn run(args: Args, log_flag: Option<&str>) -> anyhow::Result<()> {
    let start = wanted(&args, log_flag)?;
    if let Some(level) = &start.log_level {
        crate::reload::set_log_filter(level)?;
    }
    let seeds = args.member.gossip.seeds(crate::environment::vars())?;
    let metrics_listener = metrics::bind(args.metrics_addr).await?;
    let mut reloads = crate::reload::subscribe();
    let dns = args.dns.bind().await?;
    let member = member::start(&start.member, start.tags, seeds, member::Extras::default()).await?;
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
    let stop_from_rpc = loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("sigterm: leaving the cluster"); break false }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt: leaving the cluster"); break false }
            () = member.stop_requested() => break true,
            Ok(()) = reloads.changed() => reload(&args, log_flag, &member).await,
        }
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

/// SIGHUP: applies the config files, the tags file and the flags again. A file that cannot be
/// read or is not valid keeps the running configuration, as `serf agent` does.
async fn reload(args: &Args, log_flag: Option<&str>, member: &LocalMember) {
    tracing::info!("SIGHUP: reloading the config files, the tags file and the event handlers");
    let result = async {
        let wanted = wanted(args, log_flag)?;
        let handlers = wanted.member.handlers()?;
        if let Some(level) = &wanted.log_level {
            crate::reload::set_log_filter(level)?;
        }
        let count = handlers.len();
        member.set_event_handlers(handlers);
        if wanted.tags != member.tags() {
            member.set_tags(wanted.tags.clone()).await?;
        }
        tracing::info!(
            event_handlers = count,
            tags = %crate::cmd::members::tag_list(&wanted.tags),
            log_level = wanted.log_level.as_deref().unwrap_or("(unchanged)"),
            "reloaded"
        );
        anyhow::Ok(())
    };
    if let Err(error) = result.await {
        tracing::error!(error = %format!("{error:#}"), "reload failed; the running configuration stays");
    }
}
