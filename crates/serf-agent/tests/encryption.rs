//! Gossip encryption against Debian's real `serf agent -encrypt KEY`, on loopback: a mixed
//! encrypted cluster converges, members with no key or the wrong key are kept out (both
//! ways), and key rotation with the real `serf keys` works across real agents and native
//! members (which answer the `_serf_*-key` queries), as does rotation started natively.

mod support;

use std::net::SocketAddr;
use std::process::Output;

use base64::Engine as _;
use serf::serf::Config;
use serf::wire::crypto::{Keyring, SharedKeyring};
use support::Native;
use testkit::{eventually, free_port, loopback, SerfAgent, DEADLINE};

const KEY_1: [u8; 16] = *b"0123456789abcdef";
const KEY_2: [u8; 32] = *b"the second key, thirty-two bytes";
const WRONG: [u8; 16] = *b"not the real key";

fn base64(key: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn keyring(keys: &[&[u8]]) -> SharedKeyring {
    SharedKeyring::new(Keyring::new(keys).expect("valid test keys"))
}

/// A native member on 127.0.0.`ip`, encrypted when `keys` is not empty; returns the keyring
/// it shares with its driver.
fn native(name: &str, ip: u8, keys: &[&[u8]]) -> (Native, Option<SharedKeyring>) {
    let ip = loopback(ip);
    let addr = SocketAddr::from((ip, free_port(ip)));
    let config = Config {
        node_name: name.to_owned(),
        ..Config::default()
    };
    let shared = (!keys.is_empty()).then(|| keyring(keys));
    (Native::start_with(config, addr, shared.clone()), shared)
}

fn encrypted_agent(name: &str, ip: u8, key: &[u8]) -> SerfAgent {
    SerfAgent::start(name, loopback(ip), &[&format!("-encrypt={}", base64(key))])
}

/// Names the agent lists as alive.
fn agent_alive(agent: &SerfAgent) -> Vec<String> {
    let output = agent.cli(&["members", "-status=alive"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Names the native member sees alive.
fn native_alive(member: &Native) -> Vec<String> {
    member
        .members()
        .into_iter()
        .filter(|m| m.status == serf::serf::MemberStatus::Alive)
        .map(|m| m.name)
        .collect()
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    names.sort();
    names
}

fn wait_agent_sees(agent: &SerfAgent, names: &[&str]) {
    let want = sorted(names);
    eventually(
        DEADLINE,
        &format!("agent {} sees exactly {want:?} alive", agent.name),
        || {
            let mut seen = agent_alive(agent);
            seen.sort();
            (seen == want).then_some(())
        },
    );
}

fn wait_native_sees(member: &Native, who: &str, names: &[&str]) {
    let want = sorted(names);
    eventually(
        DEADLINE,
        &format!("{who} sees exactly {want:?} alive"),
        || {
            let mut seen = native_alive(member);
            seen.sort();
            (seen == want).then_some(())
        },
    );
}

fn succeeded(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn mixed_encrypted_cluster_of_agents_and_native_members_converges() {
    let agent_a = encrypted_agent("agent-a", 11, &KEY_1);
    let agent_b = encrypted_agent("agent-b", 12, &KEY_1);
    let (native_1, _) = native("native-1", 13, &[&KEY_1]);
    let (native_2, _) = native("native-2", 14, &[&KEY_1]);

    native_1
        .block_on(native_1.handle.join(&[agent_a.bind], true))
        .expect("a keyed native member joins an encrypted agent");
    succeeded(
        &agent_b.cli(&["join", &native_1.handle.local_addr().to_string()]),
        "an encrypted agent joining through a native member",
    );
    native_2
        .block_on(native_2.handle.join(&[agent_b.bind], true))
        .expect("second native member joins");

    let all = ["agent-a", "agent-b", "native-1", "native-2"];
    wait_agent_sees(&agent_a, &all);
    wait_agent_sees(&agent_b, &all);
    wait_native_sees(&native_1, "native-1", &all);
    wait_native_sees(&native_2, "native-2", &all);

    // Queries travel encrypted too, and our answer gets back to the agent.
    let output = agent_a.cli(&["reachability"]);
    let stdout = succeeded(&output, "serf reachability across the encrypted cluster");
    assert!(
        stdout.contains("Successfully contacted all live nodes"),
        "{stdout}"
    );
}

#[test]
fn members_without_the_key_are_not_let_in_and_learn_nothing() {
    let agent = encrypted_agent("agent-k", 21, &KEY_1);
    let (no_key, _) = native("no-key", 22, &[]);
    let (wrong_key, _) = native("wrong-key", 23, &[&WRONG]);

    for (member, name) in [(&no_key, "no-key"), (&wrong_key, "wrong-key")] {
        let joined = member.block_on(member.handle.join(&[agent.bind], true));
        assert!(joined.is_err(), "{name} must not join: {joined:?}");
    }

    // A keyed member then gets in: the agent is working, yet never admitted the others.
    let (keyed, _) = native("keyed", 24, &[&KEY_1]);
    keyed
        .block_on(keyed.handle.join(&[agent.bind], true))
        .expect("keyed member joins");
    wait_agent_sees(&agent, &["agent-k", "keyed"]);
    wait_native_sees(&keyed, "keyed", &["agent-k", "keyed"]);
    // What the outsiders learnt: nothing but themselves.
    assert_eq!(native_alive(&no_key), ["no-key"]);
    assert_eq!(native_alive(&wrong_key), ["wrong-key"]);
    let all = agent.cli(&["members"]);
    let listing = String::from_utf8_lossy(&all.stdout);
    assert!(
        !listing.contains("no-key") && !listing.contains("wrong-key"),
        "{listing}"
    );
}

#[test]
fn a_real_agent_without_the_key_cannot_join_an_encrypted_native_member() {
    let (member, _) = native("native-k", 31, &[&KEY_1]);
    let plain = SerfAgent::start("plain", loopback(32), &[]);
    let wrong = encrypted_agent("wrong", 33, &WRONG);
    let target = member.handle.local_addr().to_string();
    for agent in [&plain, &wrong] {
        let output = agent.cli(&["join", &target]);
        assert!(
            !output.status.success(),
            "{} joined an encrypted member: {}",
            agent.name,
            String::from_utf8_lossy(&output.stdout)
        );
    }

    let keyed = encrypted_agent("keyed-agent", 34, &KEY_1);
    succeeded(&keyed.cli(&["join", &target]), "keyed agent join");
    wait_native_sees(&member, "native-k", &["keyed-agent", "native-k"]);
    wait_agent_sees(&keyed, &["keyed-agent", "native-k"]);
    wait_agent_sees(&plain, &["plain"]);
    wait_agent_sees(&wrong, &["wrong"]);
}

/// `serf keys -list` at `agent`: (key, "[n/m]") rows.
fn listed_keys(agent: &SerfAgent) -> Vec<(String, String)> {
    let stdout = succeeded(&agent.cli(&["keys", "-list"]), "serf keys -list");
    let mut rows: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            match columns[..] {
                [key, count] if count.starts_with('[') => Some((key.to_owned(), count.to_owned())),
                _ => None,
            }
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn key_rotation_with_real_serf_keys_across_a_mixed_cluster() {
    let agent = encrypted_agent("agent-r", 41, &KEY_1);
    let (native_1, ring_1) = native("native-r1", 42, &[&KEY_1]);
    let (native_2, ring_2) = native("native-r2", 43, &[&KEY_1]);
    for member in [&native_1, &native_2] {
        member
            .block_on(member.handle.join(&[agent.bind], true))
            .expect("join");
    }
    let three = ["agent-r", "native-r1", "native-r2"];
    wait_agent_sees(&agent, &three);

    let (key_1, key_2) = (base64(&KEY_1), base64(&KEY_2));
    succeeded(
        &agent.cli(&["keys", &format!("-install={key_2}")]),
        "serf keys -install",
    );
    let mut both = vec![
        (key_1.clone(), "[3/3]".to_owned()),
        (key_2.clone(), "[3/3]".to_owned()),
    ];
    both.sort();
    assert_eq!(listed_keys(&agent), both);

    succeeded(
        &agent.cli(&["keys", &format!("-use={key_2}")]),
        "serf keys -use",
    );
    // After -use the old key is a secondary key everywhere, so it can go.
    succeeded(
        &agent.cli(&["keys", &format!("-remove={key_1}")]),
        "serf keys -remove",
    );
    assert_eq!(listed_keys(&agent), [(key_2.clone(), "[3/3]".to_owned())]);
    for ring in [&ring_1, &ring_2] {
        let ring = ring.as_ref().expect("keyed").read();
        assert_eq!(ring.keys().collect::<Vec<_>>(), [&KEY_2[..]]);
    }
    // Removing the primary is refused by every member, with Go's text.
    let refused = agent.cli(&["keys", &format!("-remove={key_2}")]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.contains("Removing the primary key is not allowed")
            && text.contains("3/3 nodes reported failure"),
        "{text}"
    );

    // Traffic now uses the new key: a member with only the new key gets in, one with only
    // the old key does not.
    let (old_only, _) = native("old-only", 44, &[&KEY_1]);
    assert!(old_only
        .block_on(old_only.handle.join(&[agent.bind], true))
        .is_err());
    let (new_only, _) = native("new-only", 45, &[&KEY_2]);
    new_only
        .block_on(new_only.handle.join(&[native_1.handle.local_addr()], true))
        .expect("a member with the new key joins");
    let four = ["agent-r", "native-r1", "native-r2", "new-only"];
    wait_agent_sees(&agent, &four);
    wait_native_sees(&native_2, "native-r2", &four);
    assert_eq!(native_alive(&old_only), ["old-only"]);
}

#[test]
fn key_rotation_started_by_a_native_member_reaches_real_agents() {
    let agent = encrypted_agent("agent-n", 51, &KEY_1);
    let (member, ring) = native("native-n", 52, &[&KEY_1]);
    member
        .block_on(member.handle.join(&[agent.bind], true))
        .expect("join");
    wait_agent_sees(&agent, &["agent-n", "native-n"]);

    let report = member
        .block_on(member.handle.install_key(&KEY_2))
        .expect("install runs");
    assert_eq!(
        (report.num_nodes, report.num_resp, report.error()),
        (2, 2, None)
    );
    let report = member.block_on(member.handle.list_keys()).expect("list");
    assert_eq!(report.keys.get(&base64(&KEY_1)), Some(&2));
    assert_eq!(report.keys.get(&base64(&KEY_2)), Some(&2));
    assert_eq!(report.primary_keys.get(&base64(&KEY_1)), Some(&2));

    let report = member
        .block_on(member.handle.remove_key(&KEY_1))
        .expect("remove runs");
    assert_eq!(
        report.error().as_deref(),
        Some("2/2 nodes reported failure")
    );
    assert_eq!(
        report.messages.get("agent-n").map(String::as_str),
        Some("Removing the primary key is not allowed")
    );

    let report = member.block_on(member.handle.use_key(&KEY_2)).expect("use");
    assert_eq!(report.error(), None);
    let report = member
        .block_on(member.handle.remove_key(&KEY_1))
        .expect("remove");
    assert_eq!(report.error(), None);
    assert_eq!(
        ring.expect("keyed").read().keys().collect::<Vec<_>>(),
        [&KEY_2[..]]
    );
    assert_eq!(listed_keys(&agent), [(base64(&KEY_2), "[2/2]".to_owned())]);
}
