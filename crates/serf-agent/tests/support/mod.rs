//! A native member on the real tokio driver (`serf_agent::member`), driven from synchronous
//! test code: its own runtime, a command handle, and the events seen so far.
// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::net::SocketAddr;

use serf::serf::{Config, Event, Member};
use serf_agent::member::{self as driver, Handle};
use tokio::sync::mpsc::UnboundedReceiver;

/// A native member running on its own tokio runtime.
pub(crate) struct Native {
    runtime: tokio::runtime::Runtime,
    pub(crate) handle: Handle,
    events: UnboundedReceiver<Event>,
    seen: Vec<Event>,
}

impl Native {
    /// Binds `addr` (UDP and TCP) and starts the member.
    pub(crate) fn start(config: Config, addr: SocketAddr) -> Self {
        Self::start_with(config, addr, None)
    }

    /// [`Native::start`] with gossip encryption when `keyring` is given.
    pub(crate) fn start_with(
        config: Config,
        addr: SocketAddr,
        keyring: Option<serf::wire::crypto::SharedKeyring>,
    ) -> Self {
        Self::start_tuned(config, addr, keyring, |_| {})
    }

    /// [`Native::start_with`], with memberlist's tunables changed by `tune`.
    pub(crate) fn start_tuned(
        config: Config,
        addr: SocketAddr,
        keyring: Option<serf::wire::crypto::SharedKeyring>,
        tune: impl FnOnce(&mut serf::memberlist::Config),
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        let mut options = serf_agent::driver::Options::new(config.node_name.clone(), addr);
        options.seed = Some(u64::from(addr.port()));
        options.keyring = keyring;
        tune(&mut options.config);
        let (handle, events) = runtime
            .block_on(driver::start(config, options))
            .expect("starting the member");
        Self {
            runtime,
            handle,
            events,
            seen: Vec::new(),
        }
    }

    /// Runs a future (a command on [`Native::handle`]) to completion.
    pub(crate) fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// Starts a future on the member's runtime without waiting for it.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.runtime.spawn(future)
    }

    /// All events so far.
    pub(crate) fn events(&mut self) -> &[Event] {
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event);
        }
        &self.seen
    }

    /// The member table now.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.block_on(self.handle.members())
            .expect("driver is running")
    }

    /// Stops without leaving: to the cluster this looks like a crash.
    pub(crate) fn kill(self) {
        self.handle.shutdown();
        self.runtime.shutdown_background();
    }
}
