//! Several "hosts" on one machine, for fault-injection tests: one network namespace per host,
//! each joined by a veth pair to a bridge in a namespace of its own, on a private subnet
//! (`10.77.0.0/24`; host `i` is `10.77.0.<i+1>`). The addresses exist only inside the
//! namespaces the test creates, so two tests can use the same subnet at once.
//!
//! A host runs real processes (`ip netns exec NS program …`, spawned as a [`Child`] so they die
//! with the test) and test code ([`Host::enter`] runs a closure on a thread inside the
//! namespace; sockets it opens stay in that namespace). Faults:
//!
//! - [`Net::cut`] / [`Net::heal`]: the host's interface down / up. Its peers see silence (the
//!   bridge-side end loses carrier and drops), the host itself sees "network unreachable".
//! - [`Net::set_loss`]: drop this percentage of the packets the host sends, at random. With
//!   `tc netem` where the kernel has it, else an nftables rule (`numgen random`) on the host's
//!   output; on every host, each packet crosses exactly one lossy hop.
//! - [`Net::set_delay`]: `tc netem delay`; an error when the kernel has no netem qdisc.
//! - [`Net::clear`]: remove the host's delay and loss.
//!
//! Every name starts with a prefix unique to the process and the `Net`
//! (`amb<pid>x<n>-br`, `amb<pid>x<n>-h<i>`); veth names live inside those namespaces. Dropping
//! the `Net` (also on panic) kills what still runs in its namespaces, deletes its veths by name
//! and deletes its namespaces; it never touches anything it did not create. A test killed
//! with SIGKILL leaves `amb<pid>x*` namespaces behind (`ip netns list`).
//!
//! Needs root and iproute2 (`ip`, `tc`), plus `nft` for loss on kernels without netem.
//! [`Net::new`] says exactly what is missing; [`Net::for_test`] turns that into a failure
//! under `AMB_REQUIRE_PEERS=1` and a printed skip otherwise.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{require, run_with_timeout, Child};

/// The first three octets of the test subnet.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Why the harness cannot run here, naming the step that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// What was attempted (a command line, or a requirement).
    pub step: String,
    /// What went wrong (the command's stderr, or the missing piece).
    pub reason: String,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.reason)
    }
}

impl std::error::Error for Unavailable {}

/// One simulated host: a network namespace with one interface on the test subnet.
#[derive(Debug, Clone)]
pub struct Host {
    /// Index in the [`Net`].
    pub index: usize,
    /// The namespace name (for `ip netns exec`).
    pub netns: String,
    /// Its address on the test subnet.
    pub ip: Ipv4Addr,
    /// Its interface (inside its namespace).
    pub dev: String,
    /// The other end of its veth pair, in the bridge namespace.
    bridge_dev: String,
}

impl Host {
    /// `ip netns exec <netns> <program>`: add arguments and spawn it (with [`Child::spawn`])
    /// or run it (with [`run_with_timeout`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(ip());
        command
            .arg("netns")
            .arg("exec")
            .arg(&self.netns)
            .arg(program);
        command
    }

    /// Spawns `program args…` in this host as a [`Child`] (killed with its group on drop).
    pub fn spawn(&self, name: &str, program: &Path, args: &[&str], log: Option<&Path>) -> Child {
        Child::spawn(name, self.command(program).args(args), log)
    }

    /// Runs `f` on a new thread inside this host's namespace and returns its result. Sockets
    /// opened there stay in the namespace and can be used from any thread afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter_netns(&self.netns);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Connects from this host to `addr` (within `timeout`).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// Whether a TCP connection from this host to `addr` succeeds now.
    pub fn accepts_tcp(&self, addr: SocketAddr) -> bool {
        self.connect(addr, Duration::from_millis(500)).is_ok()
    }
}

/// Joins the calling thread to network namespace `name` (`/run/netns/<name>`).
#[allow(unsafe_code)]
fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()));
    // SAFETY: setns(2) on a valid, open namespace file descriptor; CLONE_NEWNET affects only
    // the calling thread, which is a scoped thread made for this closure.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns({}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A bridge namespace and N host namespaces, removed on drop.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    bridge: String,
    hosts: Vec<Host>,
    /// Namespaces created so far (the bridge first), deleted on drop.
    created: Vec<String>,
}

impl Net {
    /// Builds `n_hosts` hosts on one bridge (at most 200). Fails, naming the step, when this
    /// machine cannot (not root, no iproute2, `ip netns add` refused); whatever was created
    /// before the failure is removed.
    pub fn new(n_hosts: usize) -> Result<Self, Unavailable> {
        assert!(n_hosts <= 200, "at most 200 hosts on the test subnet");
        check_prerequisites()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "amb{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Self {
            bridge: format!("{prefix}-br"),
            prefix,
            hosts: Vec::new(),
            created: Vec::new(),
        };
        net.add_netns(&net.bridge.clone())?;
        let bridge = net.bridge.clone();
        run_ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        run_ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for index in 0..n_hosts {
            let host = Host {
                index,
                netns: format!("{}-h{index}", net.prefix),
                ip: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], index as u8 + 1),
                dev: format!("eth{index}"),
                bridge_dev: format!("vh{index}"),
            };
            net.add_netns(&host.netns)?;
            // Created directly in the two namespaces: nothing appears in the caller's.
            run_ip(&[
                "link",
                "add",
                &host.dev,
                "netns",
                &host.netns,
                "type",
                "veth",
                "peer",
                "name",
                &host.bridge_dev,
                "netns",
                &bridge,
            ])?;
            run_ip(&[
                "-n",
                &bridge,
                "link",
                "set",
                &host.bridge_dev,
                "master",
                "br0",
                "up",
            ])?;
            let cidr = format!("{}/24", host.ip);
            run_ip(&["-n", &host.netns, "addr", "add", &cidr, "dev", &host.dev])?;
            run_ip(&["-n", &host.netns, "link", "set", &host.dev, "up"])?;
            run_ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
            net.hosts.push(host);
        }
        Ok(net)
    }

    /// [`Net::new`] for a test: `None` (after printing why) when the harness cannot run here,
    /// unless `AMB_REQUIRE_PEERS=1` asks for every peer, in which case it panics.
    pub fn for_test(n_hosts: usize) -> Option<Self> {
        match Self::new(n_hosts) {
            Ok(net) => Some(net),
            Err(error) if std::env::var("AMB_REQUIRE_PEERS").as_deref() == Ok("1") => {
                panic!("fault-injection harness unavailable (AMB_REQUIRE_PEERS=1): {error}")
            }
            Err(error) => {
                eprintln!("SKIPPED: fault-injection harness unavailable: {error}");
                None
            }
        }
    }

    /// The per-test prefix of every namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Host `index`.
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Cuts host `index` off: its interface goes down (it keeps its address and processes).
    pub fn cut(&self, index: usize) {
        let host = &self.hosts[index];
        expect_ok(run_ip(&[
            "-n",
            &host.netns,
            "link",
            "set",
            &host.dev,
            "down",
        ]));
    }

    /// Reconnects host `index` (its interface up again; the kernel restores its route).
    pub fn heal(&self, index: usize) {
        let host = &self.hosts[index];
        expect_ok(run_ip(&["-n", &host.netns, "link", "set", &host.dev, "up"]));
    }

    /// Drops `percent` % of the packets host `index` sends, at random (replacing any earlier
    /// loss on it). 0 removes the loss.
    pub fn set_loss(&self, index: usize, percent: u32) {
        assert!(percent <= 100, "loss of {percent} % is not a percentage");
        let host = &self.hosts[index];
        let _ = run_nft(host, &["delete", "table", "inet", NFT_TABLE]);
        if percent == 0 {
            return;
        }
        let chain = "{ type filter hook output priority 0 ; policy accept ; }";
        let rule = format!(
            "add rule inet {NFT_TABLE} out oifname \"{}\" numgen random mod 100 < {percent} drop",
            host.dev
        );
        expect_ok(run_nft(host, &["add", "table", "inet", NFT_TABLE]));
        expect_ok(run_nft(
            host,
            &["add", "chain", "inet", NFT_TABLE, "out", chain],
        ));
        expect_ok(run_nft(host, &[&rule]));
    }

    /// Delays every packet host `index` sends by `delay` (`tc netem`). An error when the kernel
    /// has no netem qdisc (`CONFIG_NET_SCH_NETEM`).
    pub fn set_delay(&self, index: usize, delay: Duration) -> Result<(), Unavailable> {
        let host = &self.hosts[index];
        let delay = format!("{}us", delay.as_micros());
        let tc = require("tc");
        let args = [
            "qdisc", "replace", "dev", &host.dev, "root", "netem", "delay", &delay,
        ];
        let mut command = host.command(&tc);
        command.args(args);
        run_checked(&mut command, &format!("tc {}", args.join(" ")))
    }

    /// Removes the delay and loss of host `index`.
    pub fn clear(&self, index: usize) {
        let host = &self.hosts[index];
        let _ = run_nft(host, &["delete", "table", "inet", NFT_TABLE]);
        let mut command = host.command(require("tc"));
        command.args(["qdisc", "del", "dev", &host.dev, "root"]);
        // "No such file": there was no qdisc; anything else is reported by the next fault.
        let _ = run_with_timeout(&mut command, Duration::from_secs(10));
    }

    fn add_netns(&mut self, name: &str) -> Result<(), Unavailable> {
        run_ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Processes first: a namespace with a process in it outlives `ip netns del`.
        for netns in &self.created {
            let output = run_with_timeout(
                Command::new(ip()).args(["netns", "pids", netns]),
                Duration::from_secs(10),
            );
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    crate::unsafe_kill(pid, libc::SIGKILL);
                }
            }
        }
        if self.created.first() == Some(&self.bridge) {
            for host in &self.hosts {
                let _ = run_ip(&["-n", &self.bridge, "link", "del", &host.bridge_dev]);
            }
        }
        for netns in self.created.iter().rev() {
            if let Err(error) = run_ip(&["netns", "del", netns]) {
                eprintln!("warning: removing test namespace {netns}: {error}");
            }
        }
    }
}

/// The nftables table the loss rule lives in (inside a host's namespace only).
const NFT_TABLE: &str = "amb_faults";

fn ip() -> std::path::PathBuf {
    require("ip")
}

fn check_prerequisites() -> Result<(), Unavailable> {
    // SAFETY-free: geteuid has no preconditions, but libc marks it unsafe.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Unavailable {
            step: "checking for root".to_owned(),
            reason: format!("running as uid {euid}; network namespaces need root"),
        });
    }
    for program in ["ip", "tc", "nft"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(program).exists());
        if !found {
            return Err(Unavailable {
                step: format!("looking for `{program}`"),
                reason: "not installed (Debian: iproute2, nftables)".to_owned(),
            });
        }
    }
    Ok(())
}

fn run_ip(args: &[&str]) -> Result<(), Unavailable> {
    let mut command = Command::new(ip());
    command.args(args);
    run_checked(&mut command, &format!("ip {}", args.join(" ")))
}

fn run_nft(host: &Host, args: &[&str]) -> Result<(), Unavailable> {
    let mut command = host.command(require("nft"));
    command.args(args);
    run_checked(
        &mut command,
        &format!("ip netns exec {} nft {}", host.netns, args.join(" ")),
    )
}

fn run_checked(command: &mut Command, step: &str) -> Result<(), Unavailable> {
    let output = run_with_timeout(command, Duration::from_secs(20));
    if output.status.success() {
        Ok(())
    } else {
        Err(Unavailable {
            step: step.to_owned(),
            reason: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

fn expect_ok(result: Result<(), Unavailable>) {
    if let Err(error) = result {
        panic!("{error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Sends `n` one-byte UDP probes from `from` to an echo on `to`; returns how many came back.
    fn udp_echoes(net: &Net, from: usize, to: usize, n: usize) -> usize {
        let server_addr = SocketAddr::from((net.host(to).ip, 9000));
        let server = net
            .host(to)
            .enter(|| std::net::UdpSocket::bind(server_addr).expect("binding the echo"));
        server
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let echo = std::thread::spawn(move || {
            let mut buffer = [0u8; 16];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = server.recv_from(&mut buffer) {
                    let _ = server.send_to(&buffer[..len], peer);
                }
            }
        });
        let client = net.host(from).enter(|| {
            std::net::UdpSocket::bind((net.host(from).ip, 0)).expect("binding the client")
        });
        client
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut answered = 0;
        for _ in 0..n {
            let _ = client.send_to(b"x", server_addr);
            let mut buffer = [0u8; 16];
            if client.recv_from(&mut buffer).is_ok() {
                answered += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        echo.join().expect("echo thread");
        answered
    }

    #[test]
    fn hosts_talk_over_the_bridge_and_faults_apply_and_clean_up() {
        let Some(net) = Net::for_test(3) else { return };
        let prefix = net.prefix().to_owned();
        assert_eq!(net.host(1).ip, Ipv4Addr::new(10, 77, 0, 2));

        // TCP across the bridge, with the listener made inside host 1.
        let addr = SocketAddr::from((net.host(1).ip, 8000));
        let listener = net
            .host(1)
            .enter(|| TcpListener::bind(addr).expect("binding in host 1"));
        let mut client = net
            .host(0)
            .connect(addr, Duration::from_secs(5))
            .expect("connecting from host 0");
        let (mut server, peer) = listener.accept().expect("accepting");
        assert_eq!(peer.ip(), net.host(0).ip);
        client.write_all(b"ping").expect("writing");
        let mut reply = [0u8; 4];
        server.read_exact(&mut reply).expect("reading");
        assert_eq!(&reply, b"ping");

        // Cut: silence from host 2's point of view; heal: back.
        net.cut(1);
        assert!(!net.host(2).accepts_tcp(addr));
        net.heal(1);
        crate::eventually(crate::DEADLINE, "host 1 reachable after heal", || {
            net.host(2).accepts_tcp(addr).then_some(())
        });

        // 50 % loss on host 0's sends: roughly half the echoes are lost, then none.
        net.set_loss(0, 50);
        let answered = udp_echoes(&net, 0, 2, 100);
        assert!(
            (20..=80).contains(&answered),
            "{answered}/100 with 50 % loss"
        );
        net.clear(0);
        assert_eq!(udp_echoes(&net, 0, 2, 50), 50);

        // Delay needs the kernel's netem; without it the error says so.
        match net.set_delay(0, Duration::from_millis(100)) {
            Ok(()) => {
                let started = std::time::Instant::now();
                assert!(net.host(0).accepts_tcp(addr));
                assert!(started.elapsed() >= Duration::from_millis(100));
                net.clear(0);
            }
            Err(error) => assert!(
                error.step.contains("netem") && !error.reason.is_empty(),
                "{error}"
            ),
        }

        // A process in a host, killed by the drop of the net.
        let sleeper = net
            .host(2)
            .spawn("sleep", Path::new("/bin/sleep"), &["600"], None);
        let pid = sleeper.pid();
        std::mem::forget(sleeper);
        drop(listener);
        drop(net);
        let listed = run_with_timeout(
            Command::new(ip()).args(["netns", "list"]),
            Duration::from_secs(10),
        );
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        assert!(!listed.contains(&prefix), "left behind: {listed}");
        crate::eventually(crate::DEADLINE, "the sleeper reaped or gone", || {
            (!Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|stat| stat.contains(") Z"))
                    .unwrap_or(true))
            .then_some(())
        });
    }
}
