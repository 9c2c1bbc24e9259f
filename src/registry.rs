//! The registry flags, shared by `run`, `members`, `resolve` and `connect`; they give a
//! [`registrar::registry::Registry`], which the commands use without matching on it.

use std::time::Duration;

pub(crate) use registrar::registry::{Registry, FIRST_LIST_TIMEOUT};

use crate::cmd::UsageError;

/// Flags choosing the registry, shared by `run`, `members`, `resolve` and `connect`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RegistryArgs {
    /// Where to advertise and discover: `serf` (the default) or
    /// `etcd://HOST:2379[,HOST:2379...]`. Without it, an ETCD_PORT_2379_TCP link selects that
    /// etcd.
    #[arg(long, env = "AMB_REGISTRY", value_name = "serf|etcd://HOST:PORT[,...]")]
    pub(crate) registry: Option<String>,

    /// etcd: key prefix of the registrations (`<prefix>/<role>/<node>`).
    #[arg(long, env = "AMB_ETCD_PREFIX", default_value = "/services")]
    pub(crate) etcd_prefix: String,

    /// etcd: lease TTL of the registration (kept alive every ttl/3; whole seconds).
    #[arg(long, env = "AMB_TTL", default_value = "15s", value_parser = crate::duration::parse)]
    pub(crate) ttl: Duration,
}

impl RegistryArgs {
    /// The registry: `--registry`/`AMB_REGISTRY`, else an etcd link among `vars`, else Serf.
    /// A bad value is a [`UsageError`] naming it.
    pub(crate) fn registry(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Registry, UsageError> {
        Registry::choose(self.registry.as_deref(), &self.etcd_prefix, self.ttl, vars)
            .map_err(|error| UsageError(error.to_string()))
    }
}
