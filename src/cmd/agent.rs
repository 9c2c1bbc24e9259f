//! `amb-serf agent`: a plain Serf-compatible agent on the shared member runtime
//! ([`crate::member`]), so a cluster can be seeded without Go (e.g. `serf_1` in the compose
//! file). SIGTERM/SIGINT or `serf leave` → graceful leave (peers see `left`), exit 0.

use std::time::Duration;

use crate::member::{self, MemberArgs};

/// How long a leave may take before we exit anyway (Serf's broadcast timeout plus the
/// propagation delay, with room to spare).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `amb-serf agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    member: MemberArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let tags = args.member.tags()?;
    let seeds = args.member.gossip.seeds(crate::environment::vars())?;
    let member = member::start(&args.member, tags, seeds, member::Extras::default()).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop_from_rpc = tokio::select! {
        _ = terminate.recv() => { tracing::info!("sigterm: leaving the cluster"); false }
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt: leaving the cluster"); false }
        () = member.stop_requested() => true,
    };
    // After `serf leave` the member has already left; leaving again returns at once.
    if !stop_from_rpc {
        if let Err(error) = member.leave(LEAVE_TIMEOUT).await {
            tracing::warn!(error = %format!("{error:#}"), "graceful leave failed");
        }
    }
    member.shutdown().await;
    tracing::info!("agent stopped");
    Ok(())
}
