//! Thin helpers over testkit: start the `amb-serf` binary with a given environment, wait for it,
//! signal it, read its output.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub(crate) use testkit::{eventually, free_port, loopback, DEADLINE};

/// The `amb-serf` binary under test.
pub(crate) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_amb-serf")
}

/// A command for the binary with a clean environment: only `vars` (plus `PATH`), so nothing
/// from the test runner's environment is read as a link.
pub(crate) fn command(vars: &[(&str, &str)], args: &[&str]) -> Command {
    configure(Command::new(binary()), vars, args)
}

/// `command` for a command line that ends in the binary (e.g. `ip netns exec NS amb-serf`).
fn configure(mut command: Command, vars: &[(&str, &str)], args: &[&str]) -> Command {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        // Run as root, `auto` would program the namespace's nftables; kernel.rs asks for it.
        .env("AMB_DATAPLANE", "userspace")
        .args(["--log-format", "json"])
        .args(args);
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

/// Runs the binary to completion (it must exit by itself) and returns its output.
pub(crate) fn run_to_exit(vars: &[(&str, &str)], args: &[&str]) -> Output {
    testkit::run_with_timeout(&mut command(vars, args), DEADLINE)
}

/// A running `amb-serf`, killed (its process group) on drop; stdout and stderr go to a log file.
pub(crate) struct Ambassador {
    child: testkit::Child,
    log: PathBuf,
}

impl Ambassador {
    /// Starts `amb-serf run` with `vars` as its whole environment and waits until it is ready.
    /// Health checks are off: the forwarding tests' upstreams often accept exactly one
    /// connection, which a health probe would take.
    pub(crate) fn start(vars: &[(&str, &str)], args: &[&str]) -> Self {
        let mut args = args.to_vec();
        if !args.contains(&"--health-interval") {
            args.extend(["--health-interval", "0"]);
        }
        Self::start_on(loopback(1), vars, &args)
    }

    /// Like [`Ambassador::start`], with the forwarders listening on `listen` (a loopback
    /// address of the test's own, so it can forward the well-known port, e.g. 6379).
    pub(crate) fn start_on(listen: Ipv4Addr, vars: &[(&str, &str)], args: &[&str]) -> Self {
        let listen = listen.to_string();
        let mut full_args = vec!["run", "--listen-addr", &listen];
        // `run` is a Serf member too: tests run in parallel, so unless a test chooses, gossip
        // and RPC go to ports of their own instead of 0.0.0.0:7946 and 127.0.0.1:7373.
        if !args.contains(&"--bind") {
            full_args.extend(["--bind", "127.0.0.1:0"]);
        }
        if !args.contains(&"--rpc-addr") {
            full_args.extend(["--rpc-addr", "127.0.0.1:0"]);
        }
        full_args.extend_from_slice(args);
        Self::start_command(vars, &full_args)
    }

    /// A provider of `role` on loopback, named `node`: `amb-serf run` forwarding a free port to
    /// `backend` and advertising that port as its `service` address (the cross-host form, so
    /// parallel tests never compete for a well-known port), gossiping on a free port, with
    /// `extra` flags (how to join, …).
    pub(crate) fn start_provider(
        role: &str,
        node: &str,
        backend: std::net::SocketAddr,
        vars: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        let port = free_port(loopback(1));
        let forward = format!("{port}={backend}");
        let service = format!("{}:{port}", loopback(1));
        let gossip = format!("{}:{}", loopback(1), free_port(loopback(1)));
        let mut args = vec![
            "--forward",
            &forward,
            "--role",
            role,
            "--service-addr",
            &service,
            "--node",
            node,
            "--bind",
            &gossip,
        ];
        args.extend_from_slice(extra);
        Self::start_on(loopback(1), vars, &args)
    }

    /// Starts `amb-serf ARGS` (a subcommand and its flags, e.g. `connect …`) with `vars` as its
    /// whole environment and waits until it logs that it is ready.
    pub(crate) fn start_command(vars: &[(&str, &str)], full_args: &[&str]) -> Self {
        Self::spawn(command(vars, full_args))
    }

    /// Starts a command made with [`command`] and then adjusted (e.g. given a variable that is
    /// not UTF-8) and waits until it logs that it is ready.
    pub(crate) fn start_prepared(command: Command) -> Self {
        Self::spawn(command)
    }

    /// Starts `amb-serf run --listen-addr <host ip> ARGS` inside simulated host `host` (its
    /// environment is `vars` only) and waits until it is ready.
    pub(crate) fn start_in(
        host: &testkit::netns::Host,
        vars: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let ip = host.ip.to_string();
        let mut full_args = vec!["run", "--listen-addr", &ip];
        full_args.extend_from_slice(args);
        Self::spawn(configure(host.command(binary()), vars, &full_args))
    }

    /// Starts `amb-serf ARGS` (a subcommand and its flags, e.g. `connect …`) inside simulated
    /// host `host` (its environment is `vars` only) and waits until it logs that it is ready.
    pub(crate) fn start_command_in(
        host: &testkit::netns::Host,
        vars: &[(&str, &str)],
        full_args: &[&str],
    ) -> Self {
        Self::spawn(configure(host.command(binary()), vars, full_args))
    }

    fn spawn(mut command: Command) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "amb-serf-e2e-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let child = testkit::Child::spawn("amb-serf", &mut command, Some(&log));
        let mut ambassador = Self { child, log };
        eventually(DEADLINE, "amb-serf ready", || {
            if let Some(status) = ambassador.child.wait_timeout(Duration::ZERO) {
                panic!("amb-serf exited early ({status}):\n{}", ambassador.log());
            }
            ambassador.log().contains("\"ready\"").then_some(())
        });
        ambassador
    }

    /// Everything it printed so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many lines of its log contain every one of `needles`.
    pub(crate) fn lines_with(&self, needles: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .count()
    }

    /// Its process ID.
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it is still running (it was not restarted: the same process).
    pub(crate) fn is_running(&mut self) -> bool {
        self.child.wait_timeout(Duration::ZERO).is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub(crate) fn signal(&self, signal: i32) {
        self.child.signal(signal);
    }

    /// Waits for it to exit by itself; panics with its log if it does not within `deadline`.
    pub(crate) fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        match self.child.wait_timeout(deadline) {
            Some(status) => status,
            None => panic!("amb-serf did not exit within {deadline:?}:\n{}", self.log()),
        }
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- amb-serf log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A 64-bit FNV-1a checksum, fed piece by piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checksum(u64);

impl Checksum {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A stream of pseudo-random bytes from a random seed (xorshift), generated chunk by chunk; a
/// clone generates the same stream again (to check what came back).
#[derive(Clone)]
pub(crate) struct RandomBytes(u64);

impl RandomBytes {
    pub(crate) fn new() -> Self {
        Self(rand::random::<u64>() | 1)
    }

    pub(crate) fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Raises this process's soft open-file limit to at least `needed` (up to the hard limit) and
/// returns the soft limit now in force.
#[allow(unsafe_code)]
pub(crate) fn ensure_open_files(needed: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit"
    );
    if limit.rlim_cur < needed && limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = needed.min(limit.rlim_max);
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard
        // limit needs no privilege.
        assert_eq!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
            0,
            "setrlimit"
        );
    }
    limit.rlim_cur
}

/// Sets `SO_LINGER` to 0 so that closing `stream` sends a reset.
#[allow(unsafe_code)]
pub(crate) fn reset_on_close(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid `linger` on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
}

/// The lines a piped child prints, read on a thread of their own.
pub(crate) fn stdout_lines(child: &mut testkit::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.take_stdout();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    lines_rx
}

/// The first line from `lines` that contains `pattern`; panics naming `what` after
/// [`testkit::DEADLINE`].
pub(crate) fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    pattern: &str,
) -> String {
    let start = std::time::Instant::now();
    loop {
        let left = testkit::DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(pattern) => return line,
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for {what} ({pattern:?})"),
        }
    }
}

/// `text`'s lines sorted, each `k=v,k=v` tag list in them sorted (Go prints maps in random
/// order); with `collapse`, runs of spaces as one (column widths differ between two tables).
pub(crate) fn unordered_lines(text: &str, collapse: bool) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(|line| {
            let tokens: Vec<&str> = if collapse {
                line.split_whitespace().collect()
            } else {
                line.split(' ').collect()
            };
            tokens
                .into_iter()
                .map(|token| {
                    let mut tags: Vec<&str> = token.split(',').collect();
                    tags.sort_unstable();
                    tags.join(",")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.sort();
    lines
}

/// Runs Debian's `promtool check metrics` (the Prometheus package's linter) on a `/metrics`
/// body and fails the test with its findings.
pub(crate) fn promtool_check(metrics: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(metrics.as_bytes())
        .expect("writing to promtool");
    drop(stdin);
    let output = child.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\non:\n{metrics}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
