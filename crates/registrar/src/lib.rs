//! Advertising a forwarded service in a registry, and discovering the services others advertise.
//!
//! Two backends sit behind this crate: Serf tags (the default) and etcd keys ([`etcd`]). The
//! policy is pure and shared: [`tags::desired`] turns configuration and backend health into the
//! tag set the Serf member advertises, and [`targets`] turns what members advertise into where
//! consumers connect. The etcd backend:
//!
//! - [`etcd::Client`]: a small client for etcd's v3 JSON gateway (`/v3/...`) with failover
//!   between endpoints parsed by [`etcd::Endpoints`] from `etcd://HOST:2379[,HOST:2379...]` or
//!   an `ETCD_PORT_2379_TCP` link variable.
//! - [`etcd::Registrar`]: keeps `/services/<role>/<node>` present, attached to a lease kept
//!   alive every ttl/3, while the backend is healthy; deletes it while it is not; revokes the
//!   lease on shutdown.
//! - [`etcd::Watcher`]: the current set of [`etcd::Registration`]s under a prefix, listed once
//!   and then followed with a watch (no polling), surviving etcd restarts.
//!
//! Both registries sit behind two traits: [`advertise::Advertiser`] (apply tags, withdraw,
//! shut down; the etcd [`etcd::Lease`], and the Serf [`serf::LocalMember`]) and
//! [`discovery::Discovery`] (a member snapshot, then changes; [`serf::SerfDiscovery`] over a
//! member's events, [`etcd::EtcdDiscovery`] over a watch).
//!
//! [`registry::Registry`] is the choice between them; [`registry::Registry::start`] gives a
//! command its [`registry::Presence`] (advertiser, discovery, the Serf member if any).
//!
//! Left out on purpose: TLS and authentication to etcd (the `etcd://` scheme is plain HTTP), and
//! the command-line flags, which belong to the binary.
//!
//! ```no_run
//! # async fn example() -> Result<(), registrar::etcd::Error> {
//! use std::time::Duration;
//! use registrar::etcd::{Client, Endpoints, Prefix, Registrar, Registration};
//! use tokio_util::sync::CancellationToken;
//!
//! let client = Client::new(Endpoints::parse("etcd://127.0.0.1:2379")?);
//! let registration = Registration::new("4f1c2a", "172.17.0.5", 3306, env!("CARGO_PKG_VERSION"));
//! let key = Prefix::default().key("3306", "4f1c2a");
//! let (_health_tx, health) = tokio::sync::watch::channel(true);
//! let shutdown = CancellationToken::new();
//! Registrar::new(client, key, &registration, Duration::from_secs(15))
//!     .run(health, shutdown)
//!     .await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// Only `address` (getifaddrs) may use unsafe code.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod address;
pub mod advertise;
pub mod advertisement;
mod backoff;
pub mod consumer;
pub mod discovery;
pub mod etcd;
pub mod registry;
pub mod serf;
pub mod tags;
pub mod targets;
