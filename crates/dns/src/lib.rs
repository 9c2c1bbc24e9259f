//! The DNS interface of a member (`--dns-addr`), sans-IO: a [`Zone`] is a membership
//! snapshot indexed by name, and [`Zone::answer`] turns a query's bytes into the response's
//! bytes. The binary's thin tokio server rebuilds the zone on every membership event and
//! answers UDP and TCP from the latest one. The wire format is `hickory-proto`'s.
//!
//! The names (under `--dns-domain`, `serf.` by default):
//!
//! | name | records |
//! |---|---|
//! | `<role>.role.<domain>` | A/AAAA of each alive, not critical member with `role=<role>` (the `service` tag's address when it has one); SRV as below |
//! | `_<role>._tcp.<domain>` | SRV: the port dialled (`service`, else the role's port) and a target that resolves here |
//! | `<node>.node.<domain>` | A/AAAA of the alive member `<node>` (its gossip address) |
//! | `<hex>.addr.<domain>` | the address spelled in hex: SRV targets of a `service` address that is not the member's |
//! | `<domain>` | SOA (also in the authority section of every negative answer) |
//!
//! A role with no healthy member is NOERROR with no data (it may have one in a moment); any
//! other unknown name in the zone is NXDOMAIN; a name outside it is REFUSED.

mod answer;
mod cache;
mod names;
mod transport;
mod zone;

pub use answer::MAX_UDP_PAYLOAD;
pub use transport::Transport;
pub use zone::{Config, Zone};

/// A configuration error (nothing is running yet).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--dns-domain` is no usable domain.
    #[error("--dns-domain {domain:?}: {reason}")]
    Domain {
        /// As given.
        domain: String,
        /// Why it cannot be used.
        reason: String,
    },
}

#[cfg(test)]
mod tests;
