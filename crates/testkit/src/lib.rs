//! Test support shared by the crates' tests and the end-to-end suite.
//!
//! - [`Child`]: a spawned process in its own process group, killed (the whole group, by PID) when
//!   dropped, so a failing test never leaves processes behind.
//! - [`eventually`]: poll a condition until a generous deadline; never a fixed sleep.
//! - [`free_port`], [`loopback`]: addresses on the loopback range only.
//! - [`require`]: the path of a peer binary (`serf`, `etcd`, `redis-server`, …); a missing peer
//!   is a test failure, never a skip (the README's test command installs them).
//! - [`SerfAgent`], [`Etcd`], [`Redis`], [`Mariadb`]: real peers from Debian's packages, on
//!   loopback or (`start_in`) in a simulated host of a [`netns::Net`].
//! - [`netns`]: several hosts on one machine (network namespaces, veth pairs, a bridge) with
//!   partitions and packet loss, for fault-injection tests.
#![deny(missing_docs)]

mod mariadb;
pub mod netns;

pub use mariadb::{Mariadb, APP_PASSWORD, APP_USER, HOST_NAME};

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The default deadline for [`eventually`]: generous, for a busy 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `condition` every 20 ms until it returns `Some` or `deadline` passes.
///
/// Panics with `what` when the deadline passes.
pub fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`eventually`] but returns how long it took, for assertions such as "within 2 s".
pub fn time_until(deadline: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    eventually(deadline, what, || condition().then_some(()));
    start.elapsed()
}

/// `127.0.0.<n>`: a loopback address of its own for each simulated host.
pub fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// A port that is free for both TCP and UDP on `ip` right now, for a process a test starts.
///
/// Ports come from below the kernel's ephemeral range, so the outbound connections of a busy
/// suite can never take one between this call and the child's bind (the race that binding `:0`
/// and releasing it has), and from a per-process cursor, so two tests never get the same port.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    const LOW: u32 = 10_000;
    static HIGH: OnceLock<u32> = OnceLock::new();
    static CURSOR: AtomicU32 = AtomicU32::new(0);
    let high = *HIGH.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range");
        let ephemeral_low = range
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768);
        ephemeral_low.clamp(LOW + 1_000, 65_536)
    });
    let span = high - LOW;
    // Different test binaries start at different places, spread by their PID.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = CURSOR.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + offset) % span) as u16;
        let free = TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free port for TCP and UDP on {ip} below the ephemeral range");
}

/// The sockets on `port` (any address, TCP and UDP, with their processes) as `ss` lists them,
/// for a failure message when a port from [`free_port`] turns out to be taken.
pub fn port_holders(port: u16) -> String {
    let filter = format!("( sport = :{port} )");
    match Command::new("ss").args(["-Htanup", &filter]).output() {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if text.is_empty() {
                format!("no socket on port {port} any more")
            } else {
                format!("sockets on port {port}:\n{text}")
            }
        }
        Ok(output) => format!(
            "ss failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => format!("ss could not run: {error}"),
    }
}

/// Whether a TCP connection to `addr` succeeds now.
pub fn accepts_tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// The path of peer binary `name`, panicking with an install hint when it is missing.
pub fn require(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("peer `{name}` is not installed: run ./scripts/test (as root it installs the peers)");
}

/// A spawned process in its own process group; dropping it kills the group by PID.
#[derive(Debug)]
pub struct Child {
    child: std::process::Child,
    name: String,
}

impl Child {
    /// Spawns `command` in a new process group. Its stdout and stderr go to `log` if given.
    pub fn spawn(name: &str, command: &mut Command, log: Option<&Path>) -> Self {
        command.process_group(0).stdin(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::File::create(log).expect("creating a log file");
            let file2 = file.try_clone().expect("cloning a log file handle");
            command.stdout(file).stderr(file2);
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {name}: {error}"));
        Self {
            child,
            name: name.to_owned(),
        }
    }

    /// Spawns `command` in a new process group with its stdout piped (see [`Child::take_stdout`]);
    /// stderr is discarded.
    pub fn spawn_piped(name: &str, command: &mut Command) -> Self {
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {name}: {error}"));
        Self {
            child,
            name: name.to_owned(),
        }
    }

    /// The piped stdout of a child from [`Child::spawn_piped`] (once).
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("stdout was piped by spawn_piped and is taken once")
    }

    /// The process ID (also the process group ID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process (not the group).
    pub fn signal(&self, signal: i32) {
        unsafe_kill(self.child.id() as i32, signal);
    }

    /// Waits up to `deadline` for the process to exit; returns its status, or `None` on timeout.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child") {
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the whole process group with SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        unsafe_kill(-(self.child.id() as i32), libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// The name given at spawn, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        } else {
            // The leader exited; still kill anything left in its group.
            unsafe_kill(-(self.child.id() as i32), libc::SIGKILL);
        }
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is one of our children or its group.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Runs a command to completion with a timeout; panics if it cannot be spawned.
pub fn run_with_timeout(command: &mut Command, deadline: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.process_group(0);
    let mut child = command.spawn().expect("spawning a command");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("waiting").is_some() {
            return child.wait_with_output().expect("collecting output");
        }
        if start.elapsed() > deadline {
            unsafe_kill(-(child.id() as i32), libc::SIGKILL);
            return child.wait_with_output().expect("collecting output");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A real `serf agent` from Debian's package, on loopback.
#[derive(Debug)]
pub struct SerfAgent {
    /// The agent process.
    pub child: Child,
    /// The node name.
    pub name: String,
    /// Gossip address (UDP and TCP).
    pub bind: SocketAddr,
    /// RPC address.
    pub rpc: SocketAddr,
    /// Directory for the log and anything else the agent writes.
    pub dir: tempfile::TempDir,
    /// The simulated host it runs in, if any (its RPC is then on that host's loopback).
    host: Option<netns::Host>,
    /// The extra arguments it was started with (kept for [`SerfAgent::restart`]).
    extra: Vec<String>,
}

impl SerfAgent {
    /// Starts `serf agent -node NAME -bind IP:PORT -rpc-addr 127.0.0.1:PORT` plus `extra`
    /// arguments, and waits until its RPC answers.
    pub fn start(name: &str, ip: Ipv4Addr, extra: &[&str]) -> Self {
        Self::start_at(name, SocketAddr::from((ip, free_port(ip))), extra)
    }

    /// Like [`SerfAgent::start`] on a gossip address chosen beforehand (e.g. one an ambassador
    /// was told to join before the agent existed).
    pub fn start_at(name: &str, bind: SocketAddr, extra: &[&str]) -> Self {
        let rpc = SocketAddr::from((loopback(1), free_port(loopback(1))));
        Self::launch(name, bind, rpc, None, extra)
    }

    /// Starts an agent in simulated host `host`: gossip on `<host ip>:7946`, RPC on the host's
    /// own `127.0.0.1:7373`; `cli` runs `serf` inside the host too.
    pub fn start_in(host: &netns::Host, name: &str, extra: &[&str]) -> Self {
        let bind = SocketAddr::from((host.ip, 7946));
        let rpc = SocketAddr::from((loopback(1), 7373));
        Self::launch(name, bind, rpc, Some(host.clone()), extra)
    }

    fn launch(
        name: &str,
        bind: SocketAddr,
        rpc: SocketAddr,
        host: Option<netns::Host>,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let extra: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
        let child = Self::spawn(name, bind, rpc, host.as_ref(), &extra, dir.path());
        let agent = Self {
            child,
            name: name.to_owned(),
            bind,
            rpc,
            dir,
            host,
            extra,
        };
        agent.wait_ready();
        agent
    }

    fn spawn(
        name: &str,
        bind: SocketAddr,
        rpc: SocketAddr,
        host: Option<&netns::Host>,
        extra: &[String],
        dir: &Path,
    ) -> Child {
        let serf = require("serf");
        let mut command = match host {
            Some(host) => host.command(serf),
            None => Command::new(serf),
        };
        command
            .arg("agent")
            .arg(format!("-node={name}"))
            .arg(format!("-bind={bind}"))
            .arg(format!("-rpc-addr={rpc}"))
            .args(extra);
        Child::spawn(
            &format!("serf agent {name}"),
            &mut command,
            Some(&dir.join("agent.log")),
        )
    }

    /// Kills the agent (SIGKILL) and starts a fresh one with the same name and addresses and an
    /// empty member list, as `docker restart serf_1` does.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(
            &self.name,
            self.bind,
            self.rpc,
            self.host.as_ref(),
            &self.extra,
            self.dir.path(),
        );
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let (name, rpc) = (&self.name, self.rpc);
        // An agent with `rpc_auth` in its config answers "Authentication required": it is up.
        eventually(DEADLINE, &format!("serf agent {name} RPC at {rpc}"), || {
            let output = self.cli(&["members"]);
            let answered = output.status.success()
                || String::from_utf8_lossy(&output.stderr).contains("Authentication required")
                || String::from_utf8_lossy(&output.stdout).contains("Authentication required");
            answered.then_some(())
        });
    }

    /// Runs `serf <subcommand> -rpc-addr=<this agent> <rest of args>` and returns its output
    /// (Go's flag parsing stops at the first positional argument, so the address goes first).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = match &self.host {
            Some(host) => host.command(require("serf")),
            None => Command::new(require("serf")),
        };
        let (subcommand, rest) = args.split_first().expect("a serf subcommand");
        command
            .arg(subcommand)
            .arg(format!("-rpc-addr={}", self.rpc))
            .args(rest);
        run_with_timeout(&mut command, Duration::from_secs(20))
    }

    /// `serf members -format json` at this agent, as (name, addr, status, tags) rows.
    pub fn members_json(&self) -> String {
        let output = self.cli(&["members", "-format=json"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// A real etcd from Debian's `etcd-server`, on loopback with a temporary data dir.
#[derive(Debug)]
pub struct Etcd {
    /// The etcd process.
    pub child: Child,
    /// Client URL, `http://127.0.0.1:PORT`.
    pub client_url: String,
    /// Client address.
    pub client_addr: SocketAddr,
    /// Data directory (kept for restarts).
    pub dir: tempfile::TempDir,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd on loopback and waits until its client port answers.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let client_port = free_port(loopback(1));
        let peer_port = free_port(loopback(1));
        let client_addr = SocketAddr::from((loopback(1), client_port));
        let child = Self::spawn(dir.path(), client_port, peer_port);
        let etcd = Self {
            child,
            client_url: format!("http://{client_addr}"),
            client_addr,
            dir,
            peer_port,
        };
        etcd.wait_ready();
        etcd
    }

    fn spawn(dir: &Path, client_port: u16, peer_port: u16) -> Child {
        let mut command = Command::new(require("etcd"));
        command
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=test=http://127.0.0.1:{peer_port}"
            ))
            .env("ETCD_UNSUPPORTED_ARCH", "arm64");
        Child::spawn("etcd", &mut command, Some(&dir.join("etcd.log")))
    }

    fn wait_ready(&self) {
        eventually(DEADLINE, "etcd ready", || {
            let output = self.etcdctl(&["endpoint", "health"]);
            output.status.success().then_some(())
        });
    }

    /// Stops etcd (SIGKILL) and starts it again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(self.dir.path(), self.client_addr.port(), self.peer_port);
        self.wait_ready();
    }

    /// Runs `etcdctl --endpoints=<this> <args>` (API v3).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut command = Command::new(require("etcdctl"));
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.client_url))
            .args(args);
        run_with_timeout(&mut command, Duration::from_secs(20))
    }
}

/// A real `redis-server` on loopback, without persistence.
#[derive(Debug)]
pub struct Redis {
    /// The redis process.
    pub child: Child,
    /// Its address.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    host: Option<netns::Host>,
}

impl Redis {
    /// Starts redis on `ip` and waits until it accepts connections.
    pub fn start(ip: Ipv4Addr) -> Self {
        Self::start_at(SocketAddr::from((ip, free_port(ip))), None)
    }

    /// Starts redis in simulated host `host`, on `<host ip>:port`.
    pub fn start_in(host: &netns::Host, port: u16) -> Self {
        Self::start_at(SocketAddr::from((host.ip, port)), Some(host.clone()))
    }

    fn start_at(addr: SocketAddr, host: Option<netns::Host>) -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let child = Self::spawn(dir.path(), addr, host.as_ref());
        let redis = Self {
            child,
            addr,
            dir,
            host,
        };
        redis.wait_ready("redis accepts connections");
        redis
    }

    fn wait_ready(&self, what: &str) {
        eventually(DEADLINE, what, || {
            let up = match &self.host {
                Some(host) => host.accepts_tcp(self.addr),
                None => accepts_tcp(self.addr),
            };
            up.then_some(())
        });
    }

    fn spawn(dir: &Path, addr: SocketAddr, host: Option<&netns::Host>) -> Child {
        let redis = require("redis-server");
        let mut command = match host {
            Some(host) => host.command(redis),
            None => Command::new(redis),
        };
        command
            .arg("--bind")
            .arg(addr.ip().to_string())
            .arg("--port")
            .arg(addr.port().to_string())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir);
        if host.is_some() {
            // Clients come from other simulated hosts, not loopback; the subnet exists only
            // inside the test's namespaces.
            command.arg("--protected-mode").arg("no");
        }
        Child::spawn("redis-server", &mut command, Some(&dir.join("redis.log")))
    }

    /// Stops redis (SIGKILL).
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// Starts redis again on the same address.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(self.dir.path(), self.addr, self.host.as_ref());
        self.wait_ready("redis accepts connections again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_start_and_stop() {
        let agent = SerfAgent::start("tk-a", loopback(1), &[]);
        assert!(
            agent.members_json().contains("\"tk-a\""),
            "{}",
            agent.members_json()
        );
        let etcd = Etcd::start();
        assert!(etcd.etcdctl(&["put", "k", "v"]).status.success());
        let mut redis = Redis::start(loopback(1));
        redis.restart();
        assert!(accepts_tcp(redis.addr));
    }
}
