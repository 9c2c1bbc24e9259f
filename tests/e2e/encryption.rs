//! Gossip encryption through the binary: `amb-serf agent --encrypt`/`--keyring-file` in a
//! cluster with Debian's `serf agent -encrypt`, key rotation with the real `serf keys` against
//! amb-serf's RPC, bad keys rejected with exit 2 (never echoing the key), the warning for
//! an RPC address beyond loopback without `--rpc-auth`, and a wrong RPC auth key refused and
//! logged.

use std::net::SocketAddr;
use std::process::Output;

use testkit::SerfAgent;

use crate::support::{command, eventually, free_port, loopback, run_to_exit, DEADLINE};

// base64 of b"0123456789abcdef" and of b"the second key, thirty-two bytes".
const KEY_1: &str = "MDEyMzQ1Njc4OWFiY2RlZg==";
const KEY_2: &str = "dGhlIHNlY29uZCBrZXksIHRoaXJ0eS10d28gYnl0ZXM=";

/// A running `amb-serf agent`, killed with its process group on drop.
struct AmbAgent {
    child: testkit::Child,
    rpc: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl AmbAgent {
    fn start(name: &str, ip: u8, args: &[&str]) -> Self {
        let ip = loopback(ip);
        let bind = SocketAddr::from((ip, free_port(ip)));
        let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
        let log = tempfile::NamedTempFile::new().expect("log file");
        let (bind_arg, rpc_arg) = (bind.to_string(), rpc.to_string());
        let mut full = vec![
            "agent",
            "--node",
            name,
            "--bind",
            &bind_arg,
            "--rpc-addr",
            &rpc_arg,
        ];
        full.extend_from_slice(args);
        let child = testkit::Child::spawn(name, &mut command(&[], &full), Some(log.path()));
        let agent = Self { child, rpc, log };
        eventually(DEADLINE, &format!("{name} rpc up"), || {
            testkit::accepts_tcp(rpc).then_some(())
        });
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// `serf <subcommand> -rpc-addr=<amb-serf's RPC> <args>`.
    fn serf(&self, args: &[&str]) -> Output {
        let (subcommand, rest) = args.split_first().expect("a subcommand");
        let mut serf = std::process::Command::new(testkit::require("serf"));
        serf.arg(subcommand)
            .arg(format!("-rpc-addr={}", self.rpc))
            .args(rest);
        testkit::run_with_timeout(&mut serf, DEADLINE)
    }
}

impl Drop for AmbAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- amb-serf agent log ---\n{}", self.log());
        }
        self.child.kill();
    }
}

fn ok(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `serf keys -list` output as sorted "KEY [n/m]" rows.
fn key_rows(listing: &str) -> Vec<String> {
    let mut rows: Vec<String> = listing
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [key, count] if count.starts_with('[') => Some(format!("{key} {count}")),
                _ => None,
            },
        )
        .collect();
    rows.sort();
    rows
}

fn alive_at(agent: &SerfAgent) -> Vec<String> {
    let output = agent.cli(&["members", "-status=alive"]);
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn serf_keys_against_amb_serf_rotates_a_mixed_encrypted_cluster() {
    let agent = SerfAgent::start("go-enc", loopback(61), &[&format!("-encrypt={KEY_1}")]);
    let join = agent.bind.to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let keyring = dir.path().join("keyring.json");
    std::fs::write(&keyring, format!("[\"{KEY_1}\"]")).expect("writing the keyring file");
    let keyring_arg = keyring.to_str().expect("utf-8 path");
    let amb = AmbAgent::start(
        "amb-enc",
        62,
        &["--keyring-file", keyring_arg, "--join", &join],
    );
    eventually(DEADLINE, "agent sees amb-serf alive", || {
        (alive_at(&agent) == ["amb-enc", "go-enc"]).then_some(())
    });
    assert!(!amb.log().contains(KEY_1), "the key must never be logged");

    // The real `serf keys`, talking to amb-serf's RPC.
    ok(
        &amb.serf(&["keys", &format!("-install={KEY_2}")]),
        "serf keys -install via amb-serf",
    );
    let listed = ok(
        &amb.serf(&["keys", "-list"]),
        "serf keys -list via amb-serf",
    );
    assert_eq!(
        key_rows(&listed),
        [format!("{KEY_1} [2/2]"), format!("{KEY_2} [2/2]")]
    );
    ok(
        &amb.serf(&["keys", &format!("-use={KEY_2}")]),
        "serf keys -use via amb-serf",
    );
    ok(
        &amb.serf(&["keys", &format!("-remove={KEY_1}")]),
        "serf keys -remove via amb-serf",
    );
    // The Go agent agrees: only the new key, everywhere.
    let listed = ok(
        &agent.cli(&["keys", "-list"]),
        "serf keys -list at the agent",
    );
    assert_eq!(key_rows(&listed), [format!("{KEY_2} [2/2]")]);
    // Refusals come back with Go's texts and exit 1.
    let refused = amb.serf(&["keys", &format!("-remove={KEY_2}")]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stdout).into_owned()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains("Removing the primary key is not allowed")
            && text.contains("2/2 nodes reported failure"),
        "{text}"
    );

    // The keyring file follows every change, as `serf agent -keyring-file` does.
    let saved: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(&keyring).expect("keyring file"))
            .expect("a JSON array");
    assert_eq!(saved, [KEY_2]);

    // A newcomer with only the new key gets in.
    let _newcomer = AmbAgent::start("amb-new", 63, &["--encrypt", KEY_2, "--join", &join]);
    eventually(DEADLINE, "agent sees the newcomer", || {
        (alive_at(&agent) == ["amb-enc", "amb-new", "go-enc"]).then_some(())
    });
}

#[test]
fn bad_keys_exit_2_naming_the_flag_without_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a keyring file");
        path.to_str().expect("utf-8 path").to_owned()
    };
    let short = "c2hvcnQga2V5"; // 9 bytes
    let not_json = file("not-json", "secret-ish");
    let empty = file("empty", "[]");
    let bad_entry = file("bad-entry", &format!("[\"{KEY_1}\", \"{short}\"]"));
    let missing = dir.path().join("missing.json");
    let missing = missing.to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--encrypt", "%%%not-base64%%%"],
            "--encrypt: the key is not valid base64",
        ),
        (
            &["--encrypt", short],
            "--encrypt: the key is 9 bytes; it must be 16, 24 or 32",
        ),
        (
            &["--keyring-file", &not_json],
            "not a JSON array of base64 key strings",
        ),
        (
            &["--keyring-file", &empty],
            "the keyring file contains no keys",
        ),
        (
            &["--keyring-file", &bad_entry],
            "entry 1: the key is 9 bytes",
        ),
        (&["--keyring-file", missing], "missing.json"),
        (
            &["--encrypt", KEY_1, "--keyring-file", &empty],
            "--encrypt and --keyring-file cannot be used together",
        ),
    ];
    for (flags, expected) in cases {
        let bind = SocketAddr::from((loopback(64), free_port(loopback(64)))).to_string();
        let mut args = vec!["agent", "--node", "bad", "--bind", &bind, "--rpc-addr", ""];
        args.extend_from_slice(flags);
        let output = run_to_exit(&[], &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        for secret in [short, "%%%not-base64%%%", "secret-ish"] {
            assert!(
                !stderr.contains(secret),
                "{flags:?} printed key material: {stderr}"
            );
        }
    }
}

#[test]
fn rpc_beyond_loopback_without_auth_is_warned_about() {
    let port = free_port(loopback(1));
    let open = format!("0.0.0.0:{port}");
    let amb = AmbAgent::start_rpc("amb-open", 65, &open, &[]);
    eventually(DEADLINE, "warning logged", || {
        amb.log().contains("without --rpc-auth").then_some(())
    });
    drop(amb);
    // With auth, or on loopback, no warning.
    let port = free_port(loopback(1));
    let open = format!("0.0.0.0:{port}");
    let amb = AmbAgent::start_rpc("amb-auth", 66, &open, &["--rpc-auth", "s3cret"]);
    eventually(DEADLINE, "started", || {
        amb.log().contains("rpc server listening").then_some(())
    });
    assert!(!amb.log().contains("without --rpc-auth"), "{}", amb.log());
}

#[test]
fn wrong_rpc_auth_is_refused_and_logged_with_the_peer_not_the_key() {
    let amb = AmbAgent::start("amb-authlog", 68, &["--rpc-auth", "s3cret"]);
    let output = amb.serf(&["members", "-rpc-auth=n0pe-guess"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("Error connecting to Serf agent: Invalid authentication token"),
        "{output:?}"
    );
    let line = eventually(DEADLINE, "the failure is logged", || {
        amb.log()
            .lines()
            .find(|line| line.contains("wrong auth key"))
            .map(str::to_owned)
    });
    assert!(line.contains(r#""level":"WARN""#), "{line}");
    assert!(line.contains(r#""peer":"127.0.0.1:"#), "{line}");
    assert!(!amb.log().contains("n0pe-guess"), "{}", amb.log());
    let listing = ok(&amb.serf(&["members", "-rpc-auth=s3cret"]), "members");
    assert!(listing.contains("amb-authlog "), "{listing}");
}

impl AmbAgent {
    /// Like [`AmbAgent::start`] with an explicit `--rpc-addr` (readiness from the log).
    fn start_rpc(name: &str, ip: u8, rpc_addr: &str, args: &[&str]) -> Self {
        let ip = loopback(ip);
        let bind = SocketAddr::from((ip, free_port(ip))).to_string();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut full = vec![
            "agent",
            "--node",
            name,
            "--bind",
            &bind,
            "--rpc-addr",
            rpc_addr,
        ];
        full.extend_from_slice(args);
        let child = testkit::Child::spawn(name, &mut command(&[], &full), Some(log.path()));
        let rpc = rpc_addr.parse().expect("a socket address");
        Self { child, rpc, log }
    }
}

#[test]
fn members_in_join_mode_reads_an_encrypted_cluster_only_with_the_key() {
    let agent = SerfAgent::start("go-jm", loopback(67), &[&format!("-encrypt={KEY_1}")]);
    let seed = agent.bind.to_string();
    let members = |extra: &[&str]| {
        let dead_rpc = format!("127.0.0.1:{}", free_port(loopback(1)));
        let mut args = vec![
            "members",
            "--rpc-addr",
            &dead_rpc,
            "--bind",
            "127.0.0.1:0",
            "--join",
            &seed,
        ];
        args.extend_from_slice(extra);
        testkit::run_with_timeout(&mut command(&[], &args), DEADLINE * 2)
    };
    let keyed = members(&["--encrypt", KEY_1]);
    let listing = ok(&keyed, "members in join mode with the key");
    assert!(listing.contains("go-jm "), "{listing}");
    let wrong = members(&["--encrypt", KEY_2]);
    assert!(!wrong.status.success(), "joined with the wrong key");
    assert!(!String::from_utf8_lossy(&wrong.stdout).contains("go-jm "));
}
