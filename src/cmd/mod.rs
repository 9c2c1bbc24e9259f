//! One module per subcommand.

pub(crate) mod agent;
pub(crate) mod connect;
pub(crate) mod health;
pub(crate) mod members;
pub(crate) mod resolve;
pub(crate) mod run;

/// Bad usage or configuration: `main` exits with code 2 when a command fails with this.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
