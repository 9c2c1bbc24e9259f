//! The Serf layer against Debian's real `serf agent`, on loopback: events both ways exactly
//! once, queries and filters, leave / kill / rejoin, tag changes, `serf rtt`, late joiners.
//! The native member runs on the tokio driver (`serf_agent::member`), see `support/`.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serf::serf::{Config, Event, QueryParams};
use support::Native;
use testkit::{eventually, free_port, loopback, time_until, SerfAgent, DEADLINE};

fn native(name: &str, ip: u8, tags: &[(&str, &str)]) -> Native {
    let ip = loopback(ip);
    let addr = SocketAddr::from((ip, free_port(ip)));
    native_at(name, addr, tags)
}

fn native_at(name: &str, addr: SocketAddr, tags: &[(&str, &str)]) -> Native {
    let config = Config {
        node_name: name.to_owned(),
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Config::default()
    };
    Native::start(config, addr)
}

fn join(member: &Native, agent: &SerfAgent) {
    member
        .block_on(member.handle.join(&[agent.bind], true))
        .expect("join succeeds");
    eventually(DEADLINE, "join completes", || {
        member
            .members()
            .iter()
            .any(|m| m.name == agent.name)
            .then_some(())
    });
}

/// (status, tags) of `name` in the agent's `serf members`.
fn agent_view(agent: &SerfAgent, name: &str) -> Option<(String, String)> {
    let output = agent.cli(&["members"]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines().find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        (columns.first() == Some(&name)).then(|| {
            (
                columns.get(2).copied().unwrap_or_default().to_owned(),
                columns.get(3).copied().unwrap_or_default().to_owned(),
            )
        })
    })
}

fn wait_status(agent: &SerfAgent, name: &str, status: &str) -> Duration {
    time_until(
        DEADLINE,
        &format!("agent {} shows {name} {status}", agent.name),
        || agent_view(agent, name).is_some_and(|(s, _)| s == status),
    )
}

fn user_events(member: &mut Native) -> Vec<(String, String)> {
    member
        .events()
        .iter()
        .filter_map(|event| match event {
            Event::UserEvent(e) => Some((
                e.name.clone(),
                String::from_utf8_lossy(&e.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// Answers every query delivered so far with "`answer` <name>" (once each).
fn answer_queries(member: &mut Native, answered: &mut Vec<serf::serf::ResponderId>, answer: &str) {
    let queries: Vec<_> = member
        .events()
        .iter()
        .filter_map(|event| match event {
            Event::Query(q) => Some(q.id),
            _ => None,
        })
        .filter(|id| !answered.contains(id))
        .collect();
    for id in queries {
        answered.push(id);
        member
            .block_on(member.handle.respond(id, answer.as_bytes()))
            .expect("answer in time");
    }
}

#[test]
fn user_events_flow_both_ways_exactly_once() {
    let temp = tempfile::tempdir().expect("creating a temp dir");
    let dir = temp.path();
    let log = dir.join("events.log");
    let script = dir.join("handler.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$SERF_USER_EVENT $(cat)\" >> {}\n",
            log.display()
        ),
    )
    .expect("writing the handler");
    make_executable(&script);
    let handler = format!("-event-handler=user={}", script.display());
    let agent = SerfAgent::start("agent-ev", loopback(20), &[&handler]);
    let mut member = native("native-ev", 21, &[]);
    join(&member, &agent);
    wait_status(&agent, "native-ev", "alive");

    assert!(agent.cli(&["event", "deploy", "v1"]).status.success());
    eventually(DEADLINE, "the agent's event reaches us", || {
        (!user_events(&mut member).is_empty()).then_some(())
    });
    member
        .block_on(member.handle.user_event("ours", b"p1", false))
        .expect("small event");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(DEADLINE, "our event reaches the agent's handler", || {
        read_log().contains("ours p1").then_some(())
    });
    // Barriers both ways: once they arrive, any duplicate of the first events would have too.
    assert!(agent.cli(&["event", "barrier", "x"]).status.success());
    member
        .block_on(member.handle.user_event("barrier2", b"y", false))
        .expect("small event");
    eventually(DEADLINE, "barriers arrive", || {
        (read_log().contains("barrier2 y")
            && user_events(&mut member).iter().any(|(n, _)| n == "barrier"))
        .then_some(())
    });
    let ours: Vec<_> = user_events(&mut member)
        .into_iter()
        .filter(|(n, _)| n != "barrier2")
        .collect();
    assert_eq!(
        ours,
        [
            ("deploy".to_owned(), "v1".to_owned()),
            ("ours".to_owned(), "p1".to_owned()),
            ("barrier".to_owned(), "x".to_owned())
        ]
    );
    assert_eq!(read_log().matches("ours p1").count(), 1, "{}", read_log());
}

#[test]
fn queries_are_answered_filtered_and_acked() {
    let agent = SerfAgent::start("agent-q", loopback(22), &[]);
    let mut mysql = native("mysql", 23, &[("role", "3306")]);
    let mut web = native("web", 24, &[("role", "80")]);
    join(&mysql, &agent);
    join(&web, &agent);
    wait_status(&agent, "mysql", "alive");
    wait_status(&agent, "web", "alive");

    let run_query = |args: &'static [&'static str]| {
        let rpc = agent.rpc;
        std::thread::spawn(move || {
            let output = std::process::Command::new(testkit::require("serf"))
                .arg("query")
                .arg(format!("-rpc-addr={rpc}"))
                .args(args)
                .output()
                .expect("running serf query");
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    };
    let (mut mysql_answered, mut web_answered) = (Vec::new(), Vec::new());
    let query = run_query(&["-timeout=3s", "uptime"]);
    while !query.is_finished() {
        answer_queries(&mut mysql, &mut mysql_answered, "up mysql");
        answer_queries(&mut web, &mut web_answered, "up web");
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = query.join().expect("query thread");
    assert!(output.contains("Ack from 'mysql'"), "{output}");
    assert!(
        output.contains("Response from 'mysql': up mysql"),
        "{output}"
    );
    assert!(output.contains("Response from 'web': up web"), "{output}");

    let query = run_query(&["-timeout=3s", "-tag", "role=3306", "whoami"]);
    while !query.is_finished() {
        answer_queries(&mut mysql, &mut mysql_answered, "i am mysql");
        answer_queries(&mut web, &mut web_answered, "i am web");
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = query.join().expect("query thread");
    assert!(
        output.contains("Response from 'mysql': i am mysql"),
        "{output}"
    );
    assert!(!output.contains("web"), "{output}");
    let whoami_at_web = web
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Query(q) if q.name == "whoami"))
        .count();
    assert_eq!(whoami_at_web, 0);

    // With a relay factor, answers also travel through another member (a native one here:
    // agents relay only through members speaking memberlist protocol 5).
    let query = run_query(&["-timeout=3s", "-relay-factor=2", "relayed"]);
    while !query.is_finished() {
        answer_queries(&mut mysql, &mut mysql_answered, "relayed mysql");
        answer_queries(&mut web, &mut web_answered, "relayed web");
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = query.join().expect("query thread");
    assert!(
        output.contains("Response from 'mysql': relayed mysql"),
        "{output}"
    );
    assert!(
        output.contains("Response from 'web': relayed web"),
        "{output}"
    );
    assert_eq!(output.matches("Response from 'web'").count(), 1, "{output}");

    // A query we send gets the agent's ack (and our own).
    let params = QueryParams {
        request_ack: true,
        timeout: Some(Duration::from_secs(2)),
        ..QueryParams::default()
    };
    let handle = mysql
        .block_on(mysql.handle.query("ping-agent", b"", params))
        .expect("query fits");
    eventually(DEADLINE, "the agent acks our query", || {
        mysql
            .events()
            .iter()
            .any(|e| matches!(e, Event::QueryAck { query, from } if *query == handle && from == "agent-q"))
            .then_some(())
    });
    eventually(DEADLINE, "our query is done", || {
        mysql
            .events()
            .iter()
            .any(|e| matches!(e, Event::QueryDone { query } if *query == handle))
            .then_some(())
    });
    // Internal ping (what `serf reachability` uses) is acked without reaching the application.
    let output = agent.cli(&["reachability"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("Successfully contacted all live nodes"),
        "{text}"
    );
}

#[test]
fn leave_kill_and_rejoin_show_left_failed_alive() {
    let agent = SerfAgent::start("agent-lv", loopback(25), &[]);
    let ip = loopback(26);
    let addr = SocketAddr::from((ip, free_port(ip)));
    let member = native_at("native-lv", addr, &[]);
    join(&member, &agent);
    wait_status(&agent, "native-lv", "alive");

    let started = Instant::now();
    let handle = member.handle.clone();
    let leaving = member.spawn(async move { handle.leave().await });
    wait_status(&agent, "native-lv", "left");
    let elapsed = started.elapsed();
    assert!(elapsed <= Duration::from_secs(2), "left after {elapsed:?}");
    member
        .block_on(leaving)
        .expect("leave task")
        .expect("leave completes");
    drop(member);

    // Restarted with the same name: alive again.
    let member = native_at("native-lv", addr, &[]);
    join(&member, &agent);
    wait_status(&agent, "native-lv", "alive");

    // A crash: failed. Back again: alive.
    member.kill();
    wait_status(&agent, "native-lv", "failed");
    let member = native_at("native-lv", addr, &[]);
    join(&member, &agent);
    wait_status(&agent, "native-lv", "alive");
    // And the agent is alive in our view.
    eventually(DEADLINE, "we see the agent alive", || {
        member
            .members()
            .iter()
            .any(|m| m.name == "agent-lv" && m.status == serf::serf::MemberStatus::Alive)
            .then_some(())
    });
}

#[test]
fn tag_change_is_visible_at_the_agent_within_two_seconds() {
    let agent = SerfAgent::start("agent-tg", loopback(27), &[]);
    let member = native("native-tg", 28, &[("role", "80")]);
    join(&member, &agent);
    eventually(DEADLINE, "agent sees role=80", || {
        agent_view(&agent, "native-tg").filter(|(_, tags)| tags == "role=80")
    });
    let tags: BTreeMap<String, String> = [("role".to_owned(), "3306".to_owned())]
        .into_iter()
        .collect();
    let started = Instant::now();
    member
        .block_on(member.handle.set_tags(tags))
        .expect("small tags");
    eventually(DEADLINE, "agent sees role=3306", || {
        agent_view(&agent, "native-tg").filter(|(_, tags)| tags == "role=3306")
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed <= Duration::from_secs(2),
        "tags visible after {elapsed:?}"
    );
}

#[test]
fn serf_rtt_at_the_agent_estimates_our_node() {
    let agent = SerfAgent::start("agent-rtt", loopback(29), &[]);
    let member = native("native-rtt", 30, &[]);
    join(&member, &agent);
    let line = eventually(DEADLINE, "serf rtt native-rtt answers", || {
        let output = agent.cli(&["rtt", "native-rtt"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.success() && text.contains("rtt:")).then_some(text)
    });
    assert!(line.contains("native-rtt <-> agent-rtt"), "{line}");
    // Our side learns the agent's coordinate from our probes too.
    eventually(DEADLINE, "we estimate the rtt to the agent", || {
        member
            .block_on(member.handle.estimated_rtt("agent-rtt"))
            .expect("driver is running")
    });
}

#[test]
fn late_joiner_does_not_replay_an_old_event() {
    let agent = SerfAgent::start("agent-late", loopback(31), &[]);
    let mut early = native("early", 32, &[]);
    join(&early, &agent);
    assert!(agent.cli(&["event", "deploy", "v1"]).status.success());
    eventually(DEADLINE, "the early member gets the event", || {
        (!user_events(&mut early).is_empty()).then_some(())
    });
    let mut late = native("late", 33, &[]);
    join(&late, &agent);
    wait_status(&agent, "late", "alive");
    assert!(agent.cli(&["event", "deploy", "v2"]).status.success());
    eventually(DEADLINE, "the late member gets the new event", || {
        (!user_events(&mut late).is_empty()).then_some(())
    });
    eventually(DEADLINE, "the early member gets the new event", || {
        (user_events(&mut early).len() == 2).then_some(())
    });
    assert_eq!(
        user_events(&mut late),
        [("deploy".to_owned(), "v2".to_owned())]
    );
}

fn make_executable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path)
        .expect("script exists")
        .permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(path, permissions).expect("chmod");
}

#[test]
fn an_agent_joins_the_cluster_through_us() {
    let first = SerfAgent::start("agent-one", loopback(34), &[]);
    let mut member = native("native-seed", 35, &[]);
    join(&member, &first);
    let second = SerfAgent::start("agent-two", loopback(36), &[]);
    let target = member.block_on(member.handle.members()).expect("running");
    let our_addr = target
        .iter()
        .find(|m| m.name == "native-seed")
        .map(|m| m.socket_addr().to_string())
        .expect("we know ourselves");
    let output = second.cli(&["join", &our_addr]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_status(&second, "agent-one", "alive");
    wait_status(&second, "native-seed", "alive");
    wait_status(&first, "agent-two", "alive");
    eventually(DEADLINE, "we see agent-two alive", || {
        member
            .members()
            .iter()
            .any(|m| m.name == "agent-two" && m.status == serf::serf::MemberStatus::Alive)
            .then_some(())
    });
    let joins = member
        .events()
        .iter()
        .filter(|e| matches!(e, Event::MemberJoin(m) if m.name == "agent-two"))
        .count();
    assert_eq!(joins, 1);
}

#[test]
fn force_leave_stats_and_coordinates_on_the_handle() {
    let agent = SerfAgent::start("agent-fl", loopback(37), &[]);
    let member = native("native-fl", 38, &[]);
    join(&member, &agent);
    let victim = SerfAgent::start("victim-fl", loopback(39), &[]);
    let joined = victim.cli(&["join", &agent.bind.to_string()]);
    assert!(joined.status.success());
    eventually(DEADLINE, "we see three members", || {
        (member.members().len() == 3).then_some(())
    });

    // Coordinates: ours at once, the agent's after a few probes.
    let ours = member
        .block_on(member.handle.coordinate("native-fl"))
        .expect("driver is running");
    assert!(ours.is_some());
    eventually(DEADLINE, "a coordinate for the agent", || {
        member
            .block_on(member.handle.coordinate("agent-fl"))
            .expect("driver is running")
    });
    assert_eq!(
        member.block_on(member.handle.coordinate("nobody")).unwrap(),
        None
    );

    // The victim crashes; force-leave turns it `left` here and at the agent.
    let mut victim = victim;
    victim.child.kill();
    eventually(DEADLINE, "we see the victim failed", || {
        member
            .members()
            .iter()
            .any(|m| m.name == "victim-fl" && m.status == serf::serf::MemberStatus::Failed)
            .then_some(())
    });
    let stats = member
        .block_on(member.handle.stats())
        .expect("driver is running");
    assert_eq!(stats["members"], "3");
    assert_eq!(stats["failed"], "1");
    assert_eq!(stats["encrypted"], "false");
    for key in [
        "left",
        "health_score",
        "member_time",
        "event_time",
        "query_time",
    ] {
        assert!(stats[key].parse::<u64>().is_ok(), "{key}: {stats:?}");
    }
    member
        .block_on(member.handle.force_leave("victim-fl", false))
        .expect("force-leave");
    assert!(member
        .members()
        .iter()
        .any(|m| m.name == "victim-fl" && m.status == serf::serf::MemberStatus::Left));
    wait_status(&agent, "victim-fl", "left");
    let stats = member.block_on(member.handle.stats()).unwrap();
    assert_eq!(
        (stats["failed"].as_str(), stats["left"].as_str()),
        ("0", "1")
    );
    // Unknown names are a no-op.
    member
        .block_on(member.handle.force_leave("nobody", false))
        .expect("force-leave of an unknown node");
}

/// Left members are dropped from memberlist's table after `gossip_to_the_dead_time`, as
/// current memberlist does; Debian's agents (memberlist 0.2.2) keep them and still send them
/// as left in every push-pull. The dropped node must not come back as a member: memberlist
/// ignores news of the death of a node it does not know, and Serf keeps it `left` for its
/// tombstone time.
#[test]
fn a_reaped_left_member_stays_gone_while_real_agents_still_gossip_it() {
    let seed = SerfAgent::start("agent-reap-seed", loopback(40), &[]);
    let ip = loopback(41);
    let config = Config {
        node_name: "native-reap".to_owned(),
        ..Config::default()
    };
    let member = Native::start_tuned(
        config,
        SocketAddr::from((ip, free_port(ip))),
        None,
        |memberlist| {
            memberlist.gossip_to_the_dead_time = Duration::from_secs(2);
            memberlist.push_pull_interval = Duration::from_secs(2);
        },
    );
    join(&member, &seed);
    let leaver = SerfAgent::start(
        "agent-reap-leaver",
        loopback(42),
        &[&format!("-join={}", seed.bind)],
    );
    let serf_status = |name: &str| {
        member
            .members()
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| m.status.to_string())
    };
    eventually(DEADLINE, "the native member sees the leaver alive", || {
        (serf_status(&leaver.name).as_deref() == Some("alive")).then_some(())
    });
    let output = leaver.cli(&["leave"]);
    assert!(output.status.success(), "serf leave: {output:?}");
    eventually(DEADLINE, "the native member sees the leaver left", || {
        (serf_status(&leaver.name).as_deref() == Some("left")).then_some(())
    });
    let table = || {
        member
            .block_on(member.handle.memberlist_nodes())
            .expect("the driver runs")
    };
    let reaped_after = eventually(DEADLINE, "memberlist drops the left node", || {
        let (nodes, stats) = table();
        (!nodes.iter().any(|node| node.name == leaver.name)).then_some(stats.merges)
    });
    // The seed, a 0.2.2 agent, still has it (as left) in what it sends us.
    assert!(seed.members_json().contains(&leaver.name));
    // Two more push-pulls with the seed carry it; it stays out of memberlist and left in Serf.
    eventually(DEADLINE, "two more push-pulls with the seed", || {
        let (nodes, stats) = table();
        assert!(
            !nodes.iter().any(|node| node.name == leaver.name),
            "the reaped node came back: {nodes:?}"
        );
        (stats.merges >= reaped_after + 2).then_some(())
    });
    assert_eq!(serf_status(&leaver.name).as_deref(), Some("left"));
    assert_eq!(serf_status(&seed.name).as_deref(), Some("alive"));
}
