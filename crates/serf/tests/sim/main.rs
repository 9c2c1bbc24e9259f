//! Deterministic simulations of the memberlist core: convergence, failure detection,
//! robustness to loss, refutation and partitions. Every assertion prints the seed; rerun one
//! with `SIM_SEED=<seed> cargo test -p serf --test sim <name>`.

use std::time::Duration;

use serf::memberlist::{suspicion_timeout, Config, Event, NodeState};
use serf::sim::{Net, Sim};
use serf::wire::memberlist::{Message, Suspect};

/// The seed of a test: `SIM_SEED` from the environment, else `default`.
fn seed(default: u64) -> u64 {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// No member emitted a `NodeFailed` (`when` ends the message).
fn assert_nobody_failed(sim: &Sim, when: &str) {
    for (i, node) in sim.nodes.iter().enumerate() {
        assert!(
            !node
                .events
                .iter()
                .any(|(_, event)| matches!(event, Event::NodeFailed(_))),
            "seed {}: node-{i} declared someone failed{when}",
            sim.seed
        );
    }
}

fn converge(n: usize, default_seed: u64, limit: Duration) -> Sim {
    let seed = seed(default_seed);
    let mut sim = Sim::new(seed, n, Config::lan(), Net::default());
    sim.join(1..n, 0);
    let took = sim.run_until(limit, Sim::converged);
    assert!(
        took.is_some(),
        "seed {seed}: {n} members did not converge within {limit:?}; {} (observer, member) pairs still not alive",
        sim.missing_pairs()
    );
    for (i, node) in sim.nodes.iter().enumerate().skip(1) {
        let joined = node.events.iter().any(|(_, event)| {
            matches!(event, Event::JoinCompleted { contacted: 1, errors, .. } if errors.is_empty())
        });
        assert!(
            joined,
            "seed {seed}: node-{i} has no successful JoinCompleted"
        );
    }
    sim
}

#[test]
fn three_members_converge() {
    converge(3, 3, secs(10));
}

#[test]
fn twenty_members_converge() {
    converge(20, 20, secs(20));
}

#[test]
fn two_hundred_members_converge() {
    converge(200, 200, secs(60));
}

#[test]
fn killed_member_is_detected_within_the_bound() {
    let n = 20;
    let mut sim = converge(n, 7, secs(20));
    let seed = sim.seed;
    let config = Config::lan();
    // memberlist's worst case: the victim is probed within a probe interval, the probe takes
    // one interval, the suspicion runs its maximum, then the dead message spreads.
    let min = suspicion_timeout(config.suspicion_mult, n, config.probe_interval);
    let bound =
        config.probe_interval * 2 + min * config.suspicion_max_timeout_mult as u32 + secs(2);
    let victim = 7;
    sim.kill(victim);
    let killed_at = sim.elapsed();
    let name = format!("node-{victim}");
    let took = sim.run_until(bound, |sim| {
        (0..n)
            .filter(|&i| i != victim)
            .all(|i| sim.view(i).get(&name) == Some(&NodeState::Dead))
    });
    assert!(
        took.is_some(),
        "seed {seed}: {name} not seen dead by everyone within {bound:?}"
    );
    for (i, node) in sim.nodes.iter().enumerate().filter(|(i, _)| *i != victim) {
        let failed = node.events.iter().any(|(at, event)| {
            *at >= killed_at && matches!(event, Event::NodeFailed(member) if member.name == name)
        });
        assert!(
            failed,
            "seed {seed}: node-{i} emitted no NodeFailed for {name}"
        );
    }
}

#[test]
fn no_false_death_at_five_percent_loss() {
    let n = 20;
    let seed = seed(5);
    let net = Net {
        loss: 0.05,
        ..Net::default()
    };
    let mut sim = Sim::new(seed, n, Config::lan(), net);
    sim.join(1..n, 0);
    assert!(
        sim.run_until(secs(30), Sim::converged).is_some(),
        "seed {seed}: no convergence at 5% loss"
    );
    sim.run_for(secs(120));
    for (i, node) in sim.nodes.iter().enumerate() {
        for (at, event) in &node.events {
            assert!(
                !matches!(event, Event::NodeFailed(_) | Event::NodeLeft(_)),
                "seed {seed}: node-{i} saw {event:?} at {at:?} with all members healthy"
            );
        }
    }
    assert!(sim.converged(), "seed {seed}: views diverged under loss");
}

#[test]
fn false_suspicion_is_refuted() {
    let n = 5;
    let mut sim = converge(n, 11, secs(10));
    let seed = sim.seed;
    let accused = 3;
    let name = format!("node-{accused}");
    let incarnation = sim.nodes[1]
        .core
        .memberlist
        .member(&name)
        .expect("converged")
        .incarnation;
    let suspect = Message::Suspect(Suspect {
        incarnation: incarnation.0,
        node: name.clone(),
        from: "node-1".into(),
    });
    let from = sim.nodes[2].addr;
    sim.inject(1, from, &suspect.to_bytes());
    assert_eq!(
        sim.view(1).get(&name),
        Some(&NodeState::Suspect),
        "seed {seed}: the injected suspicion did not take"
    );
    let took = sim.run_until(secs(10), |sim| {
        (0..n).all(|i| {
            sim.nodes[i]
                .core
                .memberlist
                .member(&name)
                .is_some_and(|node| {
                    node.state == NodeState::Alive && node.incarnation > incarnation
                })
        })
    });
    assert!(took.is_some(), "seed {seed}: {name} did not refute");
    sim.run_for(secs(30));
    assert!(
        sim.converged(),
        "seed {seed}: not converged after the refutation"
    );
    assert_nobody_failed(&sim, "");
    assert!(sim.nodes[accused].core.memberlist.stats().refutes >= 1);
}

#[test]
fn partition_heals() {
    let n = 10;
    let mut sim = converge(n, 13, secs(15));
    let seed = sim.seed;
    let groups: Vec<u8> = (0..n).map(|i| u8::from(i >= n / 2)).collect();
    sim.partition(&groups);
    let split = sim.run_until(secs(60), |sim| {
        (0..n).all(|i| {
            let view = sim.view(i);
            (0..n)
                .filter(|&j| groups[j] != groups[i])
                .all(|j| view.get(&format!("node-{j}")) == Some(&NodeState::Dead))
        })
    });
    assert!(
        split.is_some(),
        "seed {seed}: the two sides never saw each other dead"
    );
    sim.heal();
    // memberlist alone stops gossiping to the dead once its broadcasts are spent; Serf's
    // reconnect then joins a failed member again, which is what heals the views.
    sim.join([0], n - 1);
    let healed = sim.run_until(secs(30), Sim::converged);
    assert!(
        healed.is_some(),
        "seed {seed}: no convergence 30 s after healing; {} pairs missing",
        sim.missing_pairs()
    );
}

#[test]
fn short_partition_heals_without_deaths() {
    let n = 10;
    let mut sim = converge(n, 17, secs(15));
    let seed = sim.seed;
    let groups: Vec<u8> = (0..n).map(|i| u8::from(i >= n / 2)).collect();
    sim.partition(&groups);
    sim.run_for(secs(2));
    sim.heal();
    let healed = sim.run_until(secs(30), Sim::converged);
    assert!(
        healed.is_some(),
        "seed {seed}: no convergence after a 2 s partition; {} pairs missing",
        sim.missing_pairs()
    );
    assert_nobody_failed(&sim, " during a 2 s partition");
}

#[test]
fn user_broadcasts_and_user_state_pass_through_the_delegate() {
    let n = 20;
    let mut sim = converge(n, 19, secs(20));
    let seed = sim.seed;
    // Every joiner merged the seed's user state with the join flag, and the seed theirs.
    for i in 1..n {
        assert!(
            sim.nodes[i]
                .core
                .delegate
                .remote_states
                .contains(&(b"node-0".to_vec(), true)),
            "seed {seed}: node-{i} did not merge node-0's state on join"
        );
        let joiner = format!("node-{i}").into_bytes();
        assert!(
            sim.nodes[0]
                .core
                .delegate
                .remote_states
                .contains(&(joiner, true)),
            "seed {seed}: node-0 did not merge node-{i}'s state"
        );
    }
    let messages: Vec<Vec<u8>> = (0..3u8).map(|k| vec![0x03, k, k, k]).collect();
    for message in &messages {
        sim.broadcast_user(0, message);
    }
    let took = sim.run_until(secs(10), |sim| {
        sim.nodes.iter().all(|node| {
            messages
                .iter()
                .all(|m| node.core.delegate.messages.contains(m))
        })
    });
    assert!(
        took.is_some(),
        "seed {seed}: user broadcasts did not reach all {n} members within 10 s"
    );
}

/// Container churn: a member joins under a new name, leaves, and is replaced, 1,000 times. Left
/// members are dropped after `gossip_to_the_dead_time` (as memberlist does since it fixed
/// `moveDeadNodes`), so the seed's table stays the size of what churned in the last half
/// minute or so, not of everything that ever joined.
#[test]
fn left_members_are_reaped_so_churn_leaves_the_table_flat() {
    let seed = seed(1000);
    let config = Config::lan();
    let keep_left = config.gossip_to_the_dead_time;
    let mut sim = Sim::new(seed, 3, config, Net::default());
    sim.join([1], 0);
    let cycles = 1_000;
    let mut largest = 0;
    for cycle in 0..cycles {
        let name = format!("churn-{cycle}");
        sim.replace(2, &name);
        sim.join([2], 0);
        let joined = sim.run_until(secs(10), |sim| {
            sim.view(0).get(&name) == Some(&NodeState::Alive)
        });
        assert!(joined.is_some(), "seed {seed}: {name} never joined");
        sim.leave(2, secs(1));
        let left = sim.run_until(secs(10), |sim| {
            sim.view(0).get(&name) == Some(&NodeState::Left)
        });
        assert!(left.is_some(), "seed {seed}: {name} never left");
        // The container is gone a moment later.
        sim.run_for(secs(1));
        sim.kill(2);
        largest = largest.max(sim.view(0).len());
    }
    // Each cycle takes a few virtual seconds, so at most about keep_left / 2 s of left
    // members are waiting to be dropped at any time.
    let bound = 3 + (keep_left.as_secs() as usize) + 10;
    assert!(
        largest <= bound,
        "seed {seed}: the seed's table grew to {largest} members over {cycles} cycles (bound {bound})"
    );
    sim.run_for(keep_left + secs(10));
    let view = sim.view(0);
    assert!(
        view.len() <= 3,
        "seed {seed}: after the churn the seed still holds {} members: {:?}",
        view.len(),
        view.keys().take(10).collect::<Vec<_>>()
    );
}
