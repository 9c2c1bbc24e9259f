//! What every `serf`-style RPC command shares: `--rpc-addr`/`--rpc-auth` (falling back to
//! `SERF_RPC_ADDR`/`SERF_RPC_AUTH`, as Go's `serf` reads them), the connection, Go's output
//! helpers (`columnize`, `encoding/json` escaping) and Go's boolean flag values.

use anyhow::Context as _;
use serf_agent::rpc::Client;

/// The agent address when neither a flag nor a variable names one.
const DEFAULT_RPC_ADDR: &str = "127.0.0.1:7373";

/// `SERF_RPC_ADDR` (as Go's `serf` reads it), else `127.0.0.1:7373`.
pub(crate) fn default_rpc_addr() -> String {
    crate::environment::var("SERF_RPC_ADDR")
        .filter(|addr| !addr.is_empty())
        .unwrap_or_else(|| DEFAULT_RPC_ADDR.to_owned())
}

/// How a `serf` subcommand reaches its agent.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ClientArgs {
    /// RPC address of the Serf agent [default: SERF_RPC_ADDR, else 127.0.0.1:7373].
    #[arg(long, env = "AMB_RPC_ADDR", value_name = "HOST:PORT")]
    rpc_addr: Option<String>,

    /// RPC auth token of the Serf agent [default: SERF_RPC_AUTH].
    #[arg(long, env = "AMB_RPC_AUTH", hide_env_values = true)]
    rpc_auth: Option<String>,
}

impl ClientArgs {
    /// The agent's RPC address: the flag (or `AMB_RPC_ADDR`), else `SERF_RPC_ADDR`.
    pub(crate) fn addr(&self) -> String {
        self.rpc_addr.clone().unwrap_or_else(default_rpc_addr)
    }

    /// Connects (handshake, and auth when a token is given).
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let auth = self
            .rpc_auth
            .clone()
            .or_else(|| crate::environment::var("SERF_RPC_AUTH"))
            .filter(|auth| !auth.is_empty());
        Client::connect(&self.addr(), auth.as_deref())
            .await
            .context("Error connecting to Serf agent")
    }
}

/// A boolean flag value as Go's `strconv.ParseBool` reads it (`-coalesce=false`).
pub(crate) fn parse_go_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
}

/// Go's `encoding/json` output: `MarshalIndent` with two spaces, and `<`, `>`, `&`, U+2028 and
/// U+2029 escaped as Go escapes them (these characters only occur inside JSON strings).
pub(crate) fn go_json<T: serde::Serialize>(value: &T) -> String {
    let text = serde_json::to_string_pretty(value).expect("plain maps and strings serialize");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Go's `columnize.SimpleFormat`: cells trimmed, columns padded to the widest cell and glued
/// by two spaces, the last column unpadded; one line per row, each ending in a newline.
pub(crate) fn columnize(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            let width = cell.trim().chars().count();
            match widths.get_mut(index) {
                Some(current) => *current = (*current).max(width),
                None => widths.push(width),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            let cell = cell.trim();
            out.push_str(cell);
            if index + 1 == row.len() {
                out.push('\n');
            } else {
                out.push_str(&" ".repeat(widths[index] - cell.chars().count()));
                out.push_str("  ");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_as_go() {
        let value = std::collections::BTreeMap::from([("a<b", "x&y>")]);
        assert_eq!(
            go_json(&value),
            "{\n  \"a\\u003cb\": \"x\\u0026y\\u003e\"\n}"
        );
    }

    #[test]
    fn columns_are_padded_and_glued() {
        let rows = vec![
            vec!["key".to_owned(), "[1/2]".to_owned()],
            vec!["longer-key".to_owned(), "[2/2]".to_owned()],
        ];
        assert_eq!(columnize(&rows), "key         [1/2]\nlonger-key  [2/2]\n");
    }

    #[test]
    fn booleans_read_as_go() {
        assert_eq!(parse_go_bool("false"), Ok(false));
        assert_eq!(parse_go_bool("T"), Ok(true));
        assert!(parse_go_bool("yes").is_err());
    }
}
