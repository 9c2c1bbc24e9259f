//! One module per subcommand (`client.rs`: what the `serf`-style RPC commands share).

pub(crate) mod agent;
pub(crate) mod client;
pub(crate) mod connect;
pub(crate) mod event;
pub(crate) mod health;
pub(crate) mod info;
pub(crate) mod keys;
pub(crate) mod members;
pub(crate) mod membership;
pub(crate) mod monitor;
pub(crate) mod query;
pub(crate) mod reachability;
pub(crate) mod resolve;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod tags;
pub(crate) mod version;

/// Bad usage or configuration: `main` exits with code 2 when a command fails with this.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A failure the command has already printed, as Go's `serf` prints it: `main` exits 1 and
/// adds nothing.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed (reported above)")
    }
}

impl std::error::Error for Reported {}
