//! `amb-serf monitor` (`serf monitor`): the agent's log at a level, and its events, until
//! interrupted (exit 0) or the agent goes away (exit 1, with Go's message). The level is the
//! global `--log-level` (`-log-level=debug`, as `serf monitor` takes it), INFO by default.

use std::fmt::Write as _;

use anyhow::Context as _;
use std::net::IpAddr;

use serf_agent::rpc::{MemberRow, StreamEvent};

use super::client::ClientArgs;
use super::{Reported, UsageError};

/// Flags of `amb-serf monitor`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,
}

/// The agent's name of our `--log-level` (one level: `debug` → `DEBUG`, `error` → `ERR`).
fn agent_level(level: Option<&str>) -> Result<String, UsageError> {
    let level = level.unwrap_or("info").trim().to_ascii_uppercase();
    match level.as_str() {
        "TRACE" | "DEBUG" | "INFO" | "WARN" => Ok(level),
        "ERROR" => Ok("ERR".to_owned()),
        _ => Err(UsageError(format!(
            "monitor --log-level {level:?}: one of trace, debug, info, warn, err"
        ))),
    }
}

pub(crate) async fn run(args: Args, level: Option<&str>) -> anyhow::Result<()> {
    let level = agent_level(level)?;
    let client = args.client.connect().await?;
    let mut events = client.stream("*").await.context("Error starting stream")?;
    let mut logs = client
        .monitor(&level)
        .await
        .context("Error starting monitor")?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            line = logs.recv() => match line {
                Some(Ok(line)) => println!("{line}"),
                Some(Err(error)) => return Err(error).context("reading the log stream"),
                None => break,
            },
            event = events.recv() => match event {
                Some(Ok(event)) => print!("{}", render_event(&event)),
                Some(Err(error)) => return Err(error).context("reading the event stream"),
                None => break,
            },
        }
    }
    println!("\nRemote side ended the monitor! This usually means that the\nremote side has exited or crashed.");
    Err(Reported.into())
}

/// An event as `serf monitor` shows it: `Event Info:` and one tab-indented field a line
/// (fields sorted; Go prints them in map order).
fn render_event(event: &StreamEvent) -> String {
    let mut fields: Vec<(&str, String)> = match event {
        StreamEvent::Member { kind, members } => vec![
            ("Event", format!("{:?}", kind.as_str())),
            ("Members", go_members(members)),
        ],
        StreamEvent::User {
            ltime,
            name,
            payload,
            coalesce,
        } => vec![
            ("Event", "\"user\"".to_owned()),
            ("LTime", ltime.to_string()),
            ("Name", format!("{name:?}")),
            ("Payload", go_bytes(payload)),
            ("Coalesce", coalesce.to_string()),
        ],
        StreamEvent::Query {
            responder: id,
            ltime,
            name,
            payload,
        } => vec![
            ("Event", "\"query\"".to_owned()),
            ("ID", id.to_string()),
            ("LTime", ltime.to_string()),
            ("Name", format!("{name:?}")),
            ("Payload", go_bytes(payload)),
        ],
    };
    fields.sort();
    let mut out = "Event Info:\n".to_owned();
    for (key, value) in fields {
        let _ = writeln!(out, "\t{key}: {value}");
    }
    out
}

/// Go's `%#v` of a payload: `[]byte{0x76, 0x32}`, or `<nil>` when empty (it arrives as nil).
fn go_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "<nil>".to_owned();
    }
    format!("[]byte{{{}}}", hex_list(bytes))
}

fn hex_list(bytes: &[u8]) -> String {
    let items: Vec<String> = bytes.iter().map(|byte| format!("0x{byte:x}")).collect();
    items.join(", ")
}

/// Go's `%#v` of the members of a decoded event record (maps with sorted keys).
fn go_members(members: &[MemberRow]) -> String {
    const MAP: &str = "map[interface {}]interface {}";
    let rendered: Vec<String> = members
        .iter()
        .map(|member| {
            let addr = match member.addr {
                IpAddr::V4(ip) => ip.octets().to_vec(),
                IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            let tags: Vec<String> = member
                .tags
                .iter()
                .map(|(key, value)| format!("{key:?}:{value:?}"))
                .collect();
            format!(
                "{MAP}{{\"Addr\":[]uint8{{{}}}, \"DelegateCur\":{}, \"DelegateMax\":{}, \
                 \"DelegateMin\":{}, \"Name\":{:?}, \"Port\":0x{:x}, \"ProtocolCur\":{}, \
                 \"ProtocolMax\":{}, \"ProtocolMin\":{}, \"Status\":{:?}, \"Tags\":{MAP}{{{}}}}}",
                hex_list(&addr),
                member.delegate_cur,
                member.delegate_max,
                member.delegate_min,
                member.name,
                member.port,
                member.protocol_cur,
                member.protocol_max,
                member.protocol_min,
                member.status,
                tags.join(", ")
            )
        })
        .collect();
    format!("[]interface {{}}{{{}}}", rendered.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_the_agent_names() {
        assert_eq!(agent_level(None).unwrap(), "INFO");
        assert_eq!(agent_level(Some("debug")).unwrap(), "DEBUG");
        assert_eq!(agent_level(Some("error")).unwrap(), "ERR");
        assert!(agent_level(Some("serf=debug")).is_err());
    }

    #[test]
    fn a_user_event_is_shown_field_by_field() {
        let event = StreamEvent::User {
            ltime: 3,
            name: "deploy".to_owned(),
            payload: b"v2".to_vec(),
            coalesce: true,
        };
        assert_eq!(
            render_event(&event),
            "Event Info:\n\tCoalesce: true\n\tEvent: \"user\"\n\tLTime: 3\n\tName: \"deploy\"\n\tPayload: []byte{0x76, 0x32}\n"
        );
    }
}
