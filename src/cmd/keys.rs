//! `amb-serf keys` and `amb-serf keygen` (`serf keys`, `serf keygen`): the cluster's gossip
//! keyring, changed and listed over RPC, and a new random key.

use base64::Engine as _;
use rand::RngCore as _;
use serf_agent::rpc::{KeyCommand, KeyResponse};

use super::client::{columnize, ClientArgs};
use super::{Reported, UsageError};

/// Flags of `amb-serf keys` (exactly one operation).
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("operation").required(true).multiple(false))]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Install a key on every member (for decryption, until it is made primary).
    #[arg(long, value_name = "KEY", group = "operation")]
    install: Option<String>,

    /// Make a key, installed everywhere, the primary key.
    #[arg(long = "use", value_name = "KEY", group = "operation")]
    use_key: Option<String>,

    /// Remove a key (not the primary) from every member.
    #[arg(long, value_name = "KEY", group = "operation")]
    remove: Option<String>,

    /// List the keys in the cluster and how many members hold each.
    #[arg(long, group = "operation")]
    list: bool,
}

/// Flags of `amb-serf keygen` (none).
#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {}

/// What Go's `serf keys` says for each operation: before, on success, on failure.
struct Wording {
    before: &'static str,
    after: &'static str,
    failed: &'static str,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let (command, wording) = match (args.install, args.use_key, args.remove) {
        (Some(key), _, _) => (
            KeyCommand::Install(key),
            Wording {
                before: "Installing key on all members...",
                after: "Successfully installed key!",
                failed: "Error installing key",
            },
        ),
        (_, Some(key), _) => (
            KeyCommand::Use(key),
            Wording {
                before: "Changing primary key on all members...",
                after: "Successfully changed primary key!",
                failed: "Error changing primary key",
            },
        ),
        (_, _, Some(key)) => (
            KeyCommand::Remove(key),
            Wording {
                before: "Removing key on all members...",
                after: "Successfully removed key!",
                failed: "Error removing key",
            },
        ),
        _ if args.list => (
            KeyCommand::List,
            Wording {
                before: "Asking all members for installed keys...",
                after: "Keys gathered, listing cluster keys...",
                failed: "Failed to gather member keys",
            },
        ),
        _ => return Err(UsageError("one of --install, --use, --remove or --list".into()).into()),
    };
    let client = args.client.connect().await?;
    println!("==> {}", wording.before);
    let listing = command == KeyCommand::List;
    let (response, error) = client.key_command(command).await?;
    if let Some(error) = error {
        // Go's `serf` writes its errors to stdout too.
        print_failures(&response);
        println!("\n{}: {error}", wording.failed);
        return Err(Reported.into());
    }
    println!("==> {}", wording.after);
    if listing {
        let rows: Vec<Vec<String>> = response
            .keys
            .iter()
            .map(|(key, count)| vec![key.clone(), format!("[{count}/{}]", response.num_nodes)])
            .collect();
        println!("\n{}", columnize(&rows).trim());
    }
    Ok(())
}

/// Each member's failure, as `serf keys` prints them.
fn print_failures(response: &KeyResponse) {
    if response.messages.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = response
        .messages
        .iter()
        .map(|(node, message)| vec!["failed:".to_owned(), node.clone(), message.clone()])
        .collect();
    println!("{}", columnize(&rows).trim());
}

pub(crate) fn keygen(_args: KeygenArgs) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    // ThreadRng is a CSPRNG seeded from the OS.
    rand::rng().fill_bytes(&mut key);
    println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
    Ok(())
}
