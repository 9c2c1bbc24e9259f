//! The memberlist core and its tokio driver against Debian's real `serf agent`, on 127.0.0.x.
//! A minimal Serf delegate (tags in meta, an empty Serf push-pull state) is enough for the
//! agent's `serf members` to list a native member.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serf::memberlist::{Delegate, Event, NodeState};
use serf::wire::serf::{encode_tags, PushPull, SerfMessage};
use serf_agent::driver::{self, Gossip, Handle, Options};
use testkit::{eventually, free_port, loopback, time_until, SerfAgent, DEADLINE};

/// Just enough Serf for an agent to list us: a push-pull user state with our status time.
struct MiniSerf {
    name: String,
}

impl Delegate for MiniSerf {
    fn local_state(&mut self, _join: bool) -> Vec<u8> {
        SerfMessage::PushPull(PushPull {
            ltime: 1,
            status_ltimes: BTreeMap::from([(self.name.clone(), 1)]),
            left_members: Vec::new(),
            event_ltime: 1,
            events: Vec::new(),
            query_ltime: 1,
        })
        .encode()
    }
}

/// A native member running on its own runtime; the test thread stays free to block.
struct Native {
    name: String,
    handle: Handle<Gossip<MiniSerf>>,
    events: Arc<Mutex<Vec<Event>>>,
    runtime: tokio::runtime::Runtime,
}

impl Native {
    fn start(name: &str, ip: Ipv4Addr, tags: &[(&str, &str)]) -> Self {
        Self::start_at(name, SocketAddr::from((ip, free_port(ip))), tags)
    }

    fn start_at(name: &str, bind: SocketAddr, tags: &[(&str, &str)]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        let tags: BTreeMap<String, String> = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut options = Options::new(name, bind);
        options.meta = encode_tags(&tags);
        let delegate = MiniSerf {
            name: name.to_owned(),
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let handle = runtime.block_on(async {
            let (handle, mut receiver) = driver::start(options, delegate)
                .await
                .expect("starting a native member");
            let sink = events.clone();
            tokio::spawn(async move {
                while let Some(event) = receiver.recv().await {
                    sink.lock().expect("events lock").push(event);
                }
            });
            handle
        });
        Self {
            name: name.to_owned(),
            handle,
            events,
            runtime,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    fn join(&self, seed: SocketAddr) -> usize {
        self.runtime
            .block_on(self.handle.join(&[seed]))
            .unwrap_or_else(|error| panic!("{} joining {seed}: {error}", self.name))
    }

    /// Names of the members this native member sees alive.
    fn alive(&self) -> Vec<String> {
        let members = self
            .runtime
            .block_on(self.handle.members())
            .expect("driver running");
        let mut names: Vec<String> = members
            .into_iter()
            .filter(|node| node.state == NodeState::Alive)
            .map(|node| node.name)
            .collect();
        names.sort();
        names
    }

    /// Every member this native member knows, with its state, sorted by name.
    fn states(&self) -> Vec<(String, NodeState)> {
        let members = self
            .runtime
            .block_on(self.handle.members())
            .expect("driver running");
        let mut states: Vec<(String, NodeState)> = members
            .into_iter()
            .map(|node| (node.name, node.state))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    fn saw_failed(&self, name: &str) -> bool {
        self.events
            .lock()
            .expect("events lock")
            .iter()
            .any(|event| matches!(event, Event::NodeFailed(node) if node.name == name))
    }

    /// Stops without leaving, like a SIGKILL: the sockets close, nothing more is sent.
    fn kill(self) {
        self.handle.shutdown();
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

/// One row of `serf members -format=json`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    addr: String,
    status: String,
    tags: BTreeMap<String, String>,
}

fn members(agent: &SerfAgent) -> BTreeMap<String, Row> {
    let json: serde_json::Value = match serde_json::from_str(&agent.members_json()) {
        Ok(json) => json,
        Err(_) => return BTreeMap::new(),
    };
    let mut rows = BTreeMap::new();
    for member in json["members"].as_array().into_iter().flatten() {
        let tags = member["tags"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        rows.insert(
            member["name"].as_str().unwrap_or_default().to_owned(),
            Row {
                addr: member["addr"].as_str().unwrap_or_default().to_owned(),
                status: member["status"].as_str().unwrap_or_default().to_owned(),
                tags,
            },
        );
    }
    rows
}

fn status(agent: &SerfAgent, name: &str) -> Option<String> {
    members(agent).get(name).map(|row| row.status.clone())
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    names.sort();
    names
}

#[test]
fn native_member_joins_agent_and_is_listed_with_address_and_tags() {
    let agent = SerfAgent::start("agent-j", loopback(31), &[]);
    let native = Native::start("native-j", loopback(32), &[("role", "web"), ("dc", "x")]);
    assert_eq!(native.join(agent.bind), 1);
    let expected = Row {
        addr: native.addr().to_string(),
        status: "alive".into(),
        tags: BTreeMap::from([("role".into(), "web".into()), ("dc".into(), "x".into())]),
    };
    let took = time_until(DEADLINE, "agent lists native-j alive with tags", || {
        members(&agent).get("native-j") == Some(&expected)
    });
    assert!(
        took <= Duration::from_secs(2),
        "agent listed native-j after {took:?}; log:\n{}",
        agent.log()
    );
    eventually(DEADLINE, "native-j sees agent-j alive", || {
        (native.alive() == sorted(&["agent-j", "native-j"])).then_some(())
    });
    // New meta goes out as an alive with incarnation + 1; the agent shows the new tags.
    let tags = BTreeMap::from([("role".to_owned(), "db".to_owned())]);
    native
        .runtime
        .block_on(native.handle.update_meta(encode_tags(&tags)))
        .expect("small meta");
    let took = time_until(DEADLINE, "agent lists native-j with role=db", || {
        members(&agent).get("native-j").map(|row| &row.tags) == Some(&tags)
    });
    assert!(took <= Duration::from_secs(2), "new tags took {took:?}");
}

#[test]
fn agent_joins_native_member() {
    let native = Native::start("native-k", loopback(34), &[("role", "db")]);
    let agent = SerfAgent::start("agent-k", loopback(33), &[]);
    // Flags must precede the address (Go's flag parsing stops at the first argument), so
    // this does not go through `SerfAgent::cli`, which appends `-rpc-addr`.
    let output = testkit::run_with_timeout(
        std::process::Command::new(testkit::require("serf"))
            .arg("join")
            .arg(format!("-rpc-addr={}", agent.rpc))
            .arg(native.addr().to_string()),
        DEADLINE,
    );
    assert!(
        output.status.success(),
        "serf join failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(DEADLINE, "agent-k lists native-k alive", || {
        (status(&agent, "native-k").as_deref() == Some("alive")).then_some(())
    });
    eventually(DEADLINE, "native-k sees agent-k alive", || {
        (native.alive() == sorted(&["agent-k", "native-k"])).then_some(())
    });
}

#[test]
fn killed_native_member_is_failed_at_the_agent() {
    let agent = SerfAgent::start("agent-f", loopback(35), &[]);
    let native = Native::start("native-f", loopback(36), &[]);
    native.join(agent.bind);
    eventually(DEADLINE, "agent-f lists native-f alive", || {
        (status(&agent, "native-f").as_deref() == Some("alive")).then_some(())
    });
    let addr = native.addr();
    native.kill();
    eventually(DEADLINE, "agent-f shows native-f failed", || {
        (status(&agent, "native-f").as_deref() == Some("failed")).then_some(())
    });
    // Restarted with the same name and address at incarnation 1: the agent's push-pull reply
    // says we are dead, we refute with a higher incarnation, and the agent takes us back.
    let native = Native::start_at("native-f", addr, &[]);
    native.join(agent.bind);
    eventually(
        DEADLINE,
        "agent-f shows the restarted native-f alive",
        || (status(&agent, "native-f").as_deref() == Some("alive")).then_some(()),
    );
}

#[test]
fn killed_agent_is_reported_failed_by_the_native_member() {
    let mut agent = SerfAgent::start("agent-d", loopback(37), &[]);
    let native = Native::start("native-d", loopback(38), &[]);
    native.join(agent.bind);
    eventually(DEADLINE, "native-d sees agent-d alive", || {
        (native.alive() == sorted(&["agent-d", "native-d"])).then_some(())
    });
    agent.child.kill();
    eventually(DEADLINE, "native-d reports agent-d failed", || {
        native.saw_failed("agent-d").then_some(())
    });
}

/// How long six members that join at once may take to agree. Gossip usually spreads a join in
/// well under a second, but it is probabilistic: each member retransmits a new member's alive
/// only `4 × ⌈log10(n + 1)⌉` times, to random peers, so when three members join at the same
/// moment one of them can miss another's alive entirely (CI saw it once in many runs). What
/// guarantees convergence is the periodic push-pull, whose first round comes after a random
/// stagger plus one 30 s period, as in Go's memberlist: so two periods and slack.
const CONVERGENCE: Duration = Duration::from_secs(75);

#[test]
fn three_agents_and_three_native_members_converge() {
    let first = SerfAgent::start("agent-c1", loopback(41), &[]);
    let join = format!("-join={}", first.bind);
    let agents = [
        first,
        SerfAgent::start("agent-c2", loopback(42), &[&join]),
        SerfAgent::start("agent-c3", loopback(43), &[&join]),
    ];
    let natives: Vec<Native> = (0..3)
        .map(|i| Native::start(&format!("native-c{}", i + 1), loopback(44 + i as u8), &[]))
        .collect();
    // Each native member joins a different agent.
    for (native, agent) in natives.iter().zip(&agents) {
        native.join(agent.bind);
    }
    let everyone = sorted(&[
        "agent-c1",
        "agent-c2",
        "agent-c3",
        "native-c1",
        "native-c2",
        "native-c3",
    ]);
    for agent in &agents {
        eventually(
            CONVERGENCE,
            &format!("{} lists all six alive", agent.name),
            || {
                let rows = members(agent);
                let alive: Vec<String> = rows
                    .iter()
                    .filter(|(_, row)| row.status == "alive")
                    .map(|(name, _)| name.clone())
                    .collect();
                (alive == everyone).then_some(())
            },
        );
    }
    for native in &natives {
        let mut seen = Vec::new();
        let converged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(
                CONVERGENCE,
                &format!("{} sees all six alive", native.name),
                || {
                    seen = native.states();
                    let alive: Vec<&String> = seen
                        .iter()
                        .filter(|(_, state)| *state == NodeState::Alive)
                        .map(|(name, _)| name)
                        .collect();
                    (alive == everyone.iter().collect::<Vec<_>>()).then_some(())
                },
            )
        }));
        if converged.is_err() {
            panic!(
                "{} never saw all six alive; last seen: {seen:?}",
                native.name
            );
        }
    }
}

#[test]
fn protocol_4_and_protocol_5_agents_interoperate() {
    let old = SerfAgent::start("agent-p4", loopback(51), &["-protocol=4"]);
    let join = format!("-join={}", old.bind);
    let new = SerfAgent::start("agent-p5", loopback(52), &[&join]);
    let native = Native::start("native-p", loopback(53), &[("role", "cache")]);
    native.join(old.bind);
    let everyone = sorted(&["agent-p4", "agent-p5", "native-p"]);
    for agent in [&old, &new] {
        eventually(
            DEADLINE,
            &format!("{} lists native-p alive", agent.name),
            || (status(agent, "native-p").as_deref() == Some("alive")).then_some(()),
        );
    }
    eventually(DEADLINE, "native-p sees both agents alive", || {
        (native.alive() == everyone).then_some(())
    });
    // A push-pull straight with the protocol-5 agent works as well.
    assert_eq!(native.join(new.bind), 1);
}
