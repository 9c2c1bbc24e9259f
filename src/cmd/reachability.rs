//! `amb-serf reachability` (`serf reachability`): pings every member with the `_serf_ping`
//! query and reports the live members that did not acknowledge (or acks from non-live ones).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Instant;

use anyhow::Context as _;
use serf_agent::rpc::{Query, QueryReply};

use super::client::ClientArgs;
use super::Reported;

const TOO_MANY_ACKS: &str =
    "This could mean Serf is detecting false-failures due to a misconfiguration or network issue.";
const TOO_FEW_ACKS: &str =
    "This could mean Serf gossip packets are being lost due to a misconfiguration or network issue.";
const DUPLICATE_RESPONSES: &str =
    "Duplicate responses means there is a misconfiguration. Verify that node names are unique.";
const TROUBLESHOOTING: &str = "
Troubleshooting tips:
* Ensure that the bind addr:port is accessible by all other nodes
* If an advertise address is set, ensure it routes to the bind address
* Check that no nodes are behind a NAT
* If nodes are behind firewalls or iptables, check that Serf traffic is permitted (UDP and TCP)
* Verify networking equipment is functional";

/// Flags of `amb-serf reachability`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Print every ack and the query's timing.
    #[arg(long)]
    verbose: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let members = client.members().await.context("Error getting members")?;
    let live: BTreeSet<String> = members
        .iter()
        .filter(|member| member.status == "alive")
        .map(|member| member.name.clone())
        .collect();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Total members: {}, live members: {}",
        members.len(),
        live.len()
    )?;
    let query = Query {
        name: "_serf_ping".to_owned(),
        request_ack: true,
        ..Query::default()
    };
    let mut replies = client.query(&query).await.context("Error sending query")?;
    writeln!(out, "Starting reachability test...")?;
    out.flush()?;
    let start = Instant::now();
    let mut last = start;
    let (mut acks, mut acked, mut duplicates) = (0usize, BTreeSet::new(), false);
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let reply = tokio::select! {
            reply = replies.recv() => reply,
            _ = interrupt.recv() => {
                eprintln!("Test interrupted");
                return Err(Reported.into());
            }
        };
        let from = match reply.transpose().context("Error reading acks")? {
            None => break,
            Some(QueryReply::Ack(from)) => from,
            Some(QueryReply::Response { .. }) => continue,
        };
        if args.verbose {
            writeln!(out, "\tAck from '{from}'")?;
        }
        acks += 1;
        if !acked.insert(from.clone()) {
            duplicates = true;
            writeln!(out, "Duplicate response from '{from}'")?;
        }
        last = Instant::now();
        out.flush()?;
    }
    if args.verbose {
        writeln!(
            out,
            "Query time: {:.2} sec, time to last response: {:.2} sec",
            start.elapsed().as_secs_f64(),
            (last - start).as_secs_f64()
        )?;
    }
    let mut failed = false;
    if duplicates {
        writeln!(out, "{DUPLICATE_RESPONSES}")?;
        failed = true;
    }
    if acks == live.len() {
        writeln!(out, "Successfully contacted all live nodes")?;
    } else if acks > live.len() {
        writeln!(
            out,
            "Received more acks than live nodes! Acks from non-live nodes:"
        )?;
        for name in acked.difference(&live) {
            writeln!(out, "\t{name}")?;
        }
        writeln!(out, "{TOO_MANY_ACKS}\n{TROUBLESHOOTING}")?;
        failed = true;
    } else {
        writeln!(
            out,
            "Received less acks than live nodes! Missing acks from:"
        )?;
        for name in live.difference(&acked) {
            writeln!(out, "\t{name}")?;
        }
        writeln!(out, "{TOO_FEW_ACKS}\n{TROUBLESHOOTING}")?;
        failed = true;
    }
    if failed {
        return Err(Reported.into());
    }
    Ok(())
}
