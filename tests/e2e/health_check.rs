//! `--health-check` against real servers: MariaDB (Debian's `mariadb-server`) and Redis.
//!
//! The MariaDB tests run the server and the ambassador in one simulated host (a network
//! namespace, `testkit::netns`), so the ambassador reaches the server from an address MariaDB
//! counts connect errors for (never 127.0.0.1), with `max_connect_errors=3` so a few probes
//! decide. Tags are read over the ambassador's RPC with Debian's `serf members`.

use std::net::SocketAddr;
use std::process::Command;

use testkit::netns::{Host, Net};
use testkit::{Mariadb, Redis, APP_PASSWORD, APP_USER};

use crate::support::{eventually, free_port, loopback, run_to_exit, Ambassador, DEADLINE};

/// Low, so that the tcp check gets the host blocked within a second.
const MAX_CONNECT_ERRORS: u32 = 3;
/// Fast probes: a dozen within a few seconds.
const INTERVAL: &str = "200ms";
/// The mysql check's interval is also each probe's time limit, and a probe cut off
/// mid-handshake is a connect error like any other: generous for a busy machine.
const MYSQL_INTERVAL: &str = "500ms";

/// Inside the simulated host, where the ambassador serves and answers RPC.
const LISTEN: &str = "127.0.0.1";
const RPC: &str = "127.0.0.1:7373";

/// `serf members` at `rpc` (run in `host`, if any): the line of `node`, if listed.
fn member_line(host: Option<&Host>, rpc: &str, node: &str) -> Option<String> {
    let serf = testkit::require("serf");
    let mut command = match host {
        Some(host) => host.command(serf),
        None => Command::new(serf),
    };
    command.arg("members").arg(format!("-rpc-addr={rpc}"));
    let output = testkit::run_with_timeout(&mut command, DEADLINE);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.split_whitespace().next() == Some(node))
        .map(str::to_owned)
}

/// Whether `node` is listed with `role=<role>` and `health=passing`.
fn passing(host: Option<&Host>, rpc: &str, node: &str, role: &str) -> bool {
    member_line(host, rpc, node).is_some_and(|line| {
        line.contains(&format!("role={role}")) && line.contains("health=passing")
    })
}

/// Whether `node` is listed with `health=critical` and without a role.
fn critical(host: Option<&Host>, rpc: &str, node: &str) -> bool {
    member_line(host, rpc, node)
        .is_some_and(|line| line.contains("health=critical") && !line.contains("role="))
}

/// `SELECT 40+2` as the app user through the ambassador (from inside `host`): the result, or
/// the client's error.
fn query_through(host: &Host, port: u16) -> Result<String, String> {
    let mut command = host.command(testkit::require("mariadb"));
    command
        .args([
            "--no-defaults",
            "--protocol=tcp",
            "--connect-timeout=5",
            "-N",
            "-B",
        ])
        .args(["-h", LISTEN, "-P", &port.to_string()])
        .arg(format!("--user={APP_USER}"))
        .arg(format!("--password={APP_PASSWORD}"))
        .args(["-e", "SELECT 40+2"]);
    let output = testkit::run_with_timeout(&mut command, DEADLINE);
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// A simulated host with MariaDB on `<host ip>:3306` and an ambassador forwarding
/// 127.0.0.1:3306 there with `extra` flags; `None` when namespaces are unavailable.
fn mariadb_behind_ambassador(extra: &[&str]) -> Option<(Net, Mariadb, Ambassador)> {
    let net = Net::for_test(1)?;
    let host = net.host(0).clone();
    let mariadb = Mariadb::start_in(&host, 3306, MAX_CONNECT_ERRORS);
    let forward = format!("3306={}", mariadb.addr);
    let mut args = vec![
        "run",
        "--listen-addr",
        LISTEN,
        "--bind",
        "127.0.0.1:7946",
        "--rpc-addr",
        RPC,
        "--node",
        "amb-db",
        "--forward",
        &forward,
    ];
    args.extend_from_slice(extra);
    let ambassador = Ambassador::start_command_in(&host, &[], &args);
    Some((net, mariadb, ambassador))
}

/// The bug this check exists for: connect-and-close probes get the ambassador's host blocked
/// by MariaDB, and the tcp check does not even notice.
#[test]
fn tcp_probes_get_the_host_blocked() {
    let Some((net, mariadb, ambassador)) =
        mariadb_behind_ambassador(&["--health-check", "tcp", "--health-interval", INTERVAL])
    else {
        return;
    };
    let host = net.host(0);
    assert!(
        ambassador.log().contains("\"check\":\"tcp\""),
        "{}",
        ambassador.log()
    );
    // Polling with logins would reset the host's count each time one succeeds: wait for the
    // server to count enough probes that gave up before authenticating, then log in once.
    let blocking = u64::from(MAX_CONNECT_ERRORS) + 1;
    eventually(DEADLINE, "probes aborted before authentication", || {
        (mariadb.status("Aborted_connects_preauth")? >= blocking).then_some(())
    });
    let error = query_through(host, 3306).expect_err("the host is blocked");
    assert!(
        error.contains("is blocked because of many connection errors"),
        "{error}\n{}",
        mariadb.log()
    );
    assert!(
        passing(Some(host), RPC, "amb-db", "3306"),
        "tcp sees nothing wrong: {:?}",
        member_line(Some(host), RPC, "amb-db")
    );

    // The mysql check reads the server's ERR in place of the greeting: critical, and why.
    let forward = format!("3307={}", mariadb.addr);
    let rpc = "127.0.0.1:7374";
    let mysql = Ambassador::start_command_in(
        host,
        &[],
        &[
            "run",
            "--listen-addr",
            LISTEN,
            "--bind",
            "127.0.0.1:7947",
            "--rpc-addr",
            rpc,
            "--node",
            "amb-db-2",
            "--forward",
            &forward,
            "--health-check",
            "mysql",
        ],
    );
    eventually(DEADLINE, "health=critical without a role", || {
        critical(Some(host), rpc, "amb-db-2").then_some(())
    });
    assert!(
        mysql.log().contains("mysql error 1129: Host '")
            && mysql
                .log()
                .contains("is blocked because of many connection errors"),
        "{}",
        mysql.log()
    );
}

/// `auto` on port 3306 is the mysql check: many probes later (four times what blocks the host
/// with tcp) a real client still gets through, tags stay passing; the server stopping
/// withdraws the role and its return restores it.
#[test]
fn the_mysql_check_never_gets_the_host_blocked() {
    let Some((net, mut mariadb, ambassador)) =
        mariadb_behind_ambassador(&["--health-interval", MYSQL_INTERVAL])
    else {
        return;
    };
    let host = net.host(0);
    assert!(
        ambassador.log().contains("\"check\":\"mysql\"")
            && ambassador.log().contains("auto: by the backend's port"),
        "auto picks mysql on 3306:\n{}",
        ambassador.log()
    );
    let probes = 4 * u64::from(MAX_CONNECT_ERRORS);
    eventually(3 * DEADLINE, "many mysql probes", || {
        let preauth = mariadb.status("Aborted_connects_preauth")?;
        assert_eq!(
            preauth,
            0,
            "a probe ended before authenticating:\n{}",
            ambassador.log()
        );
        (mariadb.status("Access_denied_errors")? >= probes).then_some(())
    });
    assert_eq!(
        query_through(host, 3306),
        Ok("42".to_owned()),
        "{}",
        mariadb.log()
    );
    assert!(
        passing(Some(host), RPC, "amb-db", "3306"),
        "{:?}",
        member_line(Some(host), RPC, "amb-db")
    );
    // The refusals were logins, not handshake errors: none aborted before authentication.
    assert_eq!(mariadb.status("Aborted_connects_preauth"), Some(0));

    mariadb.stop();
    eventually(DEADLINE, "role withdrawn, health=critical", || {
        critical(Some(host), RPC, "amb-db").then_some(())
    });
    assert!(
        ambassador.log().contains("backend down"),
        "{}",
        ambassador.log()
    );
    mariadb.restart();
    eventually(DEADLINE, "role back, health=passing", || {
        passing(Some(host), RPC, "amb-db", "3306").then_some(())
    });
    assert_eq!(query_through(host, 3306), Ok("42".to_owned()));
}

/// With an existing passwordless check user the probe logs in and quits: the server counts
/// neither an aborted connect nor an aborted client, and logs nothing.
#[test]
fn a_check_user_that_exists_logs_in_and_quits_without_a_trace() {
    let mariadb = Mariadb::start(loopback(1), MAX_CONNECT_ERRORS);
    let created = mariadb.sql("CREATE USER 'monitor'@'%'");
    assert!(created.status.success(), "{created:?}");
    const COUNTERS: [&str; 3] = [
        "Aborted_connects",
        "Aborted_clients",
        "Access_denied_errors",
    ];
    let counters = || COUNTERS.map(|counter| (counter, mariadb.status(counter)));
    let before = counters();
    // Every status query is a connection too (over the socket): count them out.
    let mut queries = 0;
    let connections = mariadb.status("Connections").expect("Connections");
    let listen = free_port(loopback(1));
    let forward = format!("{listen}={}", mariadb.addr);
    let ambassador = Ambassador::start(
        &[],
        &[
            "--forward",
            &forward,
            "--health-check",
            "mysql",
            "--health-mysql-user",
            "monitor",
            "--health-interval",
            MYSQL_INTERVAL,
        ],
    );
    eventually(3 * DEADLINE, "a dozen probes", || {
        queries += 1;
        (mariadb.status("Connections")? >= connections + queries + 12).then_some(())
    });
    assert_eq!(
        counters(),
        before,
        "{}\n{}",
        ambassador.log(),
        mariadb.log()
    );
    let log = mariadb.log();
    assert!(
        !log.contains("Aborted connection") && !log.contains("Access denied"),
        "{log}"
    );
    assert!(
        !ambassador.log().contains("backend down"),
        "{}",
        ambassador.log()
    );
}

#[test]
fn the_redis_check_pings_and_follows_the_server() {
    let mut redis = Redis::start(loopback(1));
    let rpc = SocketAddr::from((loopback(1), free_port(loopback(1)))).to_string();
    let listen = free_port(loopback(1));
    let forward = format!("{listen}={}", redis.addr);
    let ambassador = Ambassador::start(
        &[],
        &[
            "--node",
            "amb-redis",
            "--rpc-addr",
            &rpc,
            "--forward",
            &forward,
            "--health-check",
            "redis",
            "--health-interval",
            INTERVAL,
        ],
    );
    assert!(
        ambassador.log().contains("\"check\":\"redis\""),
        "{}",
        ambassador.log()
    );
    let role = listen.to_string();
    eventually(DEADLINE, "health=passing", || {
        passing(None, &rpc, "amb-redis", &role).then_some(())
    });
    redis.stop();
    eventually(DEADLINE, "role withdrawn, health=critical", || {
        critical(None, &rpc, "amb-redis").then_some(())
    });
    redis.restart();
    eventually(DEADLINE, "role back, health=passing", || {
        passing(None, &rpc, "amb-redis", &role).then_some(())
    });
}

#[test]
fn a_bad_health_check_exits_2_naming_the_flag_and_the_choices() {
    for (vars, args) in [
        (vec![], vec!["run", "--health-check", "http"]),
        (vec![("AMB_HEALTH_CHECK", "http")], vec!["run"]),
    ] {
        let output = run_to_exit(&vars, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        for expected in ["--health-check", "'http'", "auto", "tcp", "mysql", "redis"] {
            assert!(stderr.contains(expected), "{expected} in: {stderr}");
        }
    }
}
