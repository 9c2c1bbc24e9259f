//! The consumer side: local ports forwarded to the live providers of Serf roles.
//!
//! - [`parse_specs`]: `ROLE[=LISTEN_PORT]` entries (flags or `AMB_CONNECT`) → [`ConnectSpec`]s.
//! - [`RolePool`]: the providers of one role as a [`proxy::Pool`]: least outstanding
//!   connections, ties at random, refused providers backed off ([`crate::targets::Targets`]).
//! - [`Consumer`]: the pools of a process and the member table they are computed from; it binds
//!   one listener per spec into a [`Proxy`] and is fed a registry's changes
//!   ([`Consumer::handle_change`]), so a provider is used or dropped as soon as its change
//!   arrives, with no polling.
//!
//! A command that consumes (`connect`, and `run --connect`) flattens the binary's `ConsumeArgs`
//! (a [`Policy`]), builds a
//! [`Consumer`], binds it into its [`Proxy`] before spawning, and hands it the registry's
//! [`Discovery`] (Serf or etcd) with [`Consumer::follow`]:
//!
//! ```ignore
//! let specs = consumer::parse_specs(&args.connect)?;            // ROLE[=LISTEN_PORT]
//! let consumer = Consumer::new(member.name(), &specs);
//! consumer.bind(&mut proxy, &specs, args.consume.policy())?;     // before proxy.spawn
//! tokio::spawn(consumer.follow(presence.discovery.clone(), shutdown.clone()));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::discovery::{Change, Discovery};
use crate::tags::Health;
use crate::targets::{self, Dial, Targets};
use proxy::link_env::{Host, Target};
use proxy::{Candidate, Outcome, Policy, Proxy, Upstream};
use rand::{rngs::StdRng, SeedableRng};
use serf::serf::{Member, MemberStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A `ROLE[=LISTEN_PORT]` entry that is not valid, or two on one port; the message names the
/// entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// One `ROLE[=LISTEN_PORT]`: serve the providers of `role` on `listen_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    /// The `role` tag value providers advertise.
    pub role: String,
    /// The local port clients connect to.
    pub listen_port: u16,
}

impl fmt::Display for ConnectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.role, self.listen_port)
    }
}

/// Parses one entry: `ROLE` (a numeric role listens on that port), `ROLE=PORT`, or `PORT=ROLE`
/// (the port first, as in `--forward`); with two numbers the role comes first.
pub fn parse_spec(entry: &str) -> Result<ConnectSpec, SpecError> {
    let entry = entry.trim();
    let port = |text: &str| match text.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    };
    let is_number = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let (role, listen_port) = match entry.split_once('=') {
        None => {
            let listen_port = port(entry).ok_or_else(|| {
                SpecError(if is_number(entry) {
                    format!("connect {entry:?}: the role is not a valid port (1-65535)")
                } else {
                    format!(
                        "connect {entry:?}: role {entry:?} is not a port number, so give the \
                         listen port: {entry}=PORT"
                    )
                })
            })?;
            (entry, listen_port)
        }
        Some((left, right)) => {
            let (role, listen) = if is_number(right) || !is_number(left) {
                (left, right)
            } else {
                (right, left)
            };
            let listen_port = port(listen).ok_or_else(|| {
                SpecError(format!(
                    "connect {entry:?}: listen port {listen:?} is not a port number (1-65535)"
                ))
            })?;
            (role, listen_port)
        }
    };
    if role.is_empty() || role.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err(SpecError(format!(
            "connect {entry:?}: role {role:?} must be non-empty, without spaces or commas"
        )));
    }
    Ok(ConnectSpec {
        role: role.to_owned(),
        listen_port,
    })
}

/// Parses every entry; two entries on one listen port are an error.
pub fn parse_specs(entries: &[String]) -> Result<Vec<ConnectSpec>, SpecError> {
    let mut specs: Vec<ConnectSpec> = Vec::new();
    for entry in entries.iter().filter(|entry| !entry.trim().is_empty()) {
        let spec = parse_spec(entry)?;
        if let Some(other) = specs.iter().find(|s| s.listen_port == spec.listen_port) {
            if *other == spec {
                continue;
            }
            return Err(SpecError(format!(
                "connect {other} and {spec}: both listen on port {}",
                spec.listen_port
            )));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn dial_target(dial: &Dial) -> Target {
    match dial {
        Dial::Addr(addr) => Target {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        },
        Dial::Host(host, port) => Target {
            host: Host::Name(host.clone()),
            port: *port,
        },
    }
}

/// The providers of `role` among `members` (alive ones only), node name → where to dial.
fn providers(members: &BTreeMap<String, Member>, role: &str) -> BTreeMap<String, Dial> {
    members
        .values()
        .filter(|member| member.status == MemberStatus::Alive)
        .filter(|member| targets::provides(&member.tags, role))
        .filter_map(|member| {
            Some((
                member.name.clone(),
                targets::dial_address(member.addr, &member.tags)?,
            ))
        })
        .collect()
}

#[derive(Debug)]
struct PoolState {
    providers: BTreeMap<String, Dial>,
    targets: Targets,
    rng: StdRng,
}

/// The live providers of one role, as a [`proxy::Pool`].
#[derive(Debug)]
pub struct RolePool {
    role: String,
    backoff: Duration,
    state: Mutex<PoolState>,
    changes: watch::Sender<()>,
}

impl RolePool {
    fn new(role: &str) -> Self {
        Self {
            role: role.to_owned(),
            backoff: targets::DEFAULT_BACKOFF,
            state: Mutex::new(PoolState {
                providers: BTreeMap::new(),
                targets: Targets::default(),
                rng: StdRng::from_os_rng(),
            }),
            changes: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves counts that are at worst slightly off.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the providers; logs what changed. Returns whether anything did.
    fn update(&self, next: BTreeMap<String, Dial>) -> bool {
        let mut state = self.lock();
        if state.providers == next {
            return false;
        }
        for (node, dial) in &next {
            if state.providers.get(node) != Some(dial) {
                info!(role = %self.role, %node, addr = %dial, "provider added");
            }
        }
        for node in state
            .providers
            .keys()
            .filter(|node| !next.contains_key(*node))
        {
            info!(role = %self.role, %node, "provider removed");
        }
        match (state.providers.is_empty(), next.is_empty()) {
            (true, false) => info!(role = %self.role, providers = next.len(), "role available"),
            (false, true) => warn!(
                role = %self.role,
                "no provider left; new clients wait for one"
            ),
            _ => {}
        }
        state.targets.replace(next.clone());
        state.providers = next;
        drop(state);
        self.changes.send_replace(());
        true
    }

    /// How many providers there are now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().providers.len()
    }

    /// Whether there is no provider now.
    pub fn is_empty(&self) -> bool {
        self.lock().providers.is_empty()
    }
}

impl fmt::Display for RolePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "role {}", self.role)
    }
}

impl proxy::Pool for RolePool {
    fn label(&self) -> (&'static str, String) {
        ("role", self.role.clone())
    }

    fn pick(&self, tried: &[Candidate]) -> Option<Candidate> {
        let tried: Vec<String> = tried.iter().map(|candidate| candidate.id.clone()).collect();
        let mut state = self.lock();
        let PoolState { targets, rng, .. } = &mut *state;
        let (node, dial) = targets.pick(Instant::now(), rng, &tried)?;
        Some(Candidate {
            id: node,
            target: dial_target(&dial),
        })
    }

    fn report(&self, candidate: &Candidate, outcome: Outcome) {
        let mut state = self.lock();
        state.targets.release(&candidate.id);
        if outcome == Outcome::Failed {
            state
                .targets
                .mark_down(&candidate.id, Instant::now(), self.backoff);
        }
    }

    fn contains(&self, candidate: &Candidate) -> bool {
        self.lock()
            .providers
            .get(&candidate.id)
            .is_some_and(|dial| dial_target(dial) == candidate.target)
    }

    fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }
}

/// The role pools of a process and the member table they follow.
#[derive(Debug)]
pub struct Consumer {
    /// Our own node name: never a provider to ourselves (`run --connect` of our own role).
    local: String,
    members: BTreeMap<String, Member>,
    pools: BTreeMap<String, Arc<RolePool>>,
    /// `Passing` while every role has a provider (for `/healthz` and `/metrics`).
    health: watch::Sender<Health>,
}

impl Consumer {
    /// One pool per distinct role of `specs`, all empty.
    pub fn new(local: &str, specs: &[ConnectSpec]) -> Self {
        let pools = specs
            .iter()
            .map(|spec| (spec.role.clone(), Arc::new(RolePool::new(&spec.role))))
            .collect();
        Self {
            local: local.to_owned(),
            members: BTreeMap::new(),
            pools,
            health: watch::Sender::new(Health::Critical),
        }
    }

    /// Binds one listener per spec into `proxy` (connections go to the spec's role pool under
    /// `policy`); returns each spec with its bound address.
    pub fn bind(
        &self,
        proxy: &mut Proxy,
        specs: &[ConnectSpec],
        policy: Policy,
    ) -> Result<Vec<(ConnectSpec, SocketAddr)>, proxy::Error> {
        let mut bound = Vec::with_capacity(specs.len());
        for spec in specs {
            let pool = Arc::clone(&self.pools[&spec.role]);
            let upstream = Upstream::Dynamic { pool, policy };
            bound.push((spec.clone(), proxy.bind_tcp(spec.listen_port, upstream)?));
        }
        Ok(bound)
    }

    /// The pool of `role`, if consumed.
    #[cfg(test)]
    fn pool(&self, role: &str) -> Option<&Arc<RolePool>> {
        self.pools.get(role)
    }

    /// Replaces the member table with a snapshot (after a join).
    pub fn handle_members(&mut self, members: impl IntoIterator<Item = Member>) {
        self.members = members
            .into_iter()
            .filter(|member| member.name != self.local)
            .map(|member| (member.name.clone(), member))
            .collect();
        self.refresh();
    }

    /// Applies one change: a snapshot replaces the table, joins and updates add or change a
    /// member, leaves, failures and reaps drop it.
    pub fn handle_change(&mut self, change: Change) {
        match change {
            Change::Snapshot(members) => return self.handle_members(members),
            Change::Update(member) => {
                if member.name == self.local {
                    return;
                }
                self.members.insert(member.name.clone(), member);
            }
            Change::Departed(member) => {
                self.members.remove(&member.name);
            }
            Change::Reaped(name) => {
                self.members.remove(&name);
            }
        }
        self.refresh();
    }

    /// `Passing` while every consumed role has at least one provider, else `Critical`.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Follows `discovery` until `shutdown` or the registry stops: a snapshot first, then
    /// every change as it arrives.
    pub async fn follow(mut self, discovery: Arc<dyn Discovery>, shutdown: CancellationToken) {
        let mut changes = discovery.changes();
        let mut first = true;
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => break,
                change = changes.next() => change,
            };
            let Some(change) = change else { break };
            self.handle_change(change);
            if std::mem::take(&mut first) {
                for (role, pool) in &self.pools {
                    if pool.is_empty() {
                        info!(%role, "no provider yet; new clients wait for one");
                    }
                }
            }
        }
    }

    fn refresh(&self) {
        for (role, pool) in &self.pools {
            pool.update(providers(&self.members, role));
        }
        let health = if self.pools.values().all(|pool| !pool.is_empty()) {
            Health::Passing
        } else {
            Health::Critical
        };
        self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy::Pool as _;

    #[test]
    fn specs() {
        let check = |entry: &str, expected: Result<(&str, u16), &str>| {
            let got = parse_spec(entry);
            match expected {
                Ok((role, port)) => assert_eq!(
                    got,
                    Ok(ConnectSpec {
                        role: role.to_owned(),
                        listen_port: port
                    }),
                    "{entry}"
                ),
                Err(needle) => {
                    let error = got.expect_err(entry);
                    assert!(error.0.contains(needle), "{entry}: {error}");
                }
            }
        };
        check("3306", Ok(("3306", 3306)));
        check("6379=16379", Ok(("6379", 16379)));
        check("web=80", Ok(("web", 80)));
        check("80=web", Ok(("web", 80)));
        check(" 5432 ", Ok(("5432", 5432)));
        check(
            "web",
            Err("role \"web\" is not a port number, so give the listen port"),
        );
        check("70000", Err("not a valid port"));
        check("0", Err("not a valid port"));
        check("web=0", Err("listen port \"0\""));
        check("web=http", Err("listen port \"http\""));
        check("=80", Err("must be non-empty"));
    }

    #[test]
    fn spec_lists() {
        let entries = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let specs = parse_specs(&entries(&["3306", "web=80", "3306", ""])).unwrap();
        assert_eq!(specs.len(), 2);
        let error = parse_specs(&entries(&["3306", "db=3306"])).unwrap_err();
        assert!(error.0.contains("both listen on port 3306"), "{error}");
    }

    fn member(name: &str, ip: &str, status: MemberStatus, tags: &[(&str, &str)]) -> Member {
        Member {
            name: name.to_owned(),
            addr: ip.parse().unwrap(),
            port: 7946,
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            status,
            versions: [1, 5, 5, 2, 5, 5],
        }
    }

    fn ids(consumer: &Consumer, role: &str) -> Vec<String> {
        consumer
            .pool(role)
            .unwrap()
            .lock()
            .providers
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn events_add_and_drop_providers() {
        let specs = [parse_spec("6379").unwrap()];
        let mut consumer = Consumer::new("me", &specs);
        let alive = MemberStatus::Alive;
        let a = member("a", "127.0.0.2", alive, &[("role", "6379")]);
        let b = member(
            "b",
            "127.0.0.3",
            alive,
            &[("role", "6379"), ("service", "10.0.0.1:1")],
        );
        let me = member("me", "127.0.0.1", alive, &[("role", "6379")]);
        let other = member("c", "127.0.0.4", alive, &[("role", "3306")]);
        let health = consumer.health();
        assert_eq!(*health.borrow(), Health::Critical, "no provider yet");
        consumer.handle_members([a.clone(), me, other]);
        assert_eq!(
            ids(&consumer, "6379"),
            ["a"],
            "never ourselves, never another role"
        );
        assert_eq!(*health.borrow(), Health::Passing);

        let mut changes = consumer.pool("6379").unwrap().subscribe();
        consumer.handle_change(Change::Update(b.clone()));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(ids(&consumer, "6379"), ["a", "b"]);
        let picked = consumer.pool("6379").unwrap().pick(&[]).unwrap();
        assert!(["a", "b"].contains(&picked.id.as_str()));

        // Critical, leaving, left, failed: dropped at once.
        let critical = member(
            "b",
            "127.0.0.3",
            alive,
            &[("role", "6379"), ("health", "critical")],
        );
        consumer.handle_change(Change::Update(critical));
        assert_eq!(ids(&consumer, "6379"), ["a"]);
        consumer.handle_change(Change::Update(b.clone()));
        assert_eq!(ids(&consumer, "6379"), ["a", "b"]);
        let leaving = member("b", "127.0.0.3", MemberStatus::Leaving, &[("role", "6379")]);
        consumer.handle_change(Change::Update(leaving));
        assert_eq!(ids(&consumer, "6379"), ["a"]);
        consumer.handle_change(Change::Departed(a.clone()));
        assert!(ids(&consumer, "6379").is_empty());
        assert_eq!(*health.borrow(), Health::Critical);
        assert_eq!(consumer.pool("6379").unwrap().pick(&[]), None);

        // An event that changes nothing does not wake waiting clients.
        changes.mark_unchanged();
        consumer.handle_change(Change::Departed(a));
        assert!(!changes.has_changed().unwrap());
    }

    #[test]
    fn the_pool_counts_and_backs_off() {
        let pool = RolePool::new("6379");
        let dial = |port| Dial::Addr(SocketAddr::from(([127, 0, 0, 1], port)));
        pool.update([("a".to_owned(), dial(1)), ("b".to_owned(), dial(2))].into());
        let first = pool.pick(&[]).unwrap();
        let second = pool.pick(&[]).unwrap();
        assert_ne!(first.id, second.id, "least outstanding");
        pool.report(&first, Outcome::Finished);
        pool.report(&second, Outcome::Failed);
        for _ in 0..10 {
            let candidate = pool.pick(&[]).unwrap();
            assert_eq!(candidate.id, first.id, "the failed one is backed off");
            pool.report(&candidate, Outcome::Finished);
        }
        assert!(pool.contains(&first));
        pool.update([("a".to_owned(), dial(9))].into());
        assert_eq!(pool.len(), 1);
        assert!(!pool.contains(&Candidate {
            id: "a".into(),
            target: dial_target(&dial(1))
        }));
    }
}
