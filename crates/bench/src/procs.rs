//! Processes the suite starts: each in its own process group, killed (the group, by PID) when
//! dropped, on a panic and on SIGINT/SIGTERM; and what `/proc` says about a group (CPU time, RSS,
//! PSS of all its processes).
#![allow(unsafe_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Process groups alive now, for the signal handler and the panic hook (0 = free slot). The
/// gossip metric runs 53 members at once.
static GROUPS: [AtomicI32; 128] = [const { AtomicI32::new(0) }; 128];

/// Kills every registered process group. Async-signal-safe: atomics and kill(2) only.
fn kill_all_groups() {
    for slot in &GROUPS {
        let pgid = slot.swap(0, Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) has no memory preconditions; the group is one we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    kill_all_groups();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + signal) };
}

/// Installs the SIGINT/SIGTERM handler and the panic hook that kill every started group.
pub(crate) fn install_cleanup() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all_groups();
        previous(info);
    }));
}

/// A process the suite started, in its own process group; dropping it kills the group.
#[derive(Debug)]
pub(crate) struct Group {
    child: std::process::Child,
    name: String,
    /// Killed and reaped: the PID may belong to someone else now.
    reaped: bool,
}

impl Group {
    /// Spawns `command` as the leader of a new process group, output to `log`.
    pub(crate) fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let pgid = child.id() as i32;
        if !GROUPS.iter().any(|slot| {
            slot.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }) {
            let mut group = Self {
                child,
                name: name.to_owned(),
                reaped: false,
            };
            group.kill();
            bail!("too many processes started at once");
        }
        Ok(Self {
            child,
            name: name.to_owned(),
            reaped: false,
        })
    }

    /// The leader's PID, which is also the group's ID.
    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails if the leader has exited (a proxy that died is a failed measurement).
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }

    /// Stops the whole group: SIGTERM (so a profiler wrapping the proxy writes its report), up
    /// to 3 s for the leader to exit, then SIGKILL for anything left; reaps the leader.
    pub(crate) fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: kill(2) on a process group we started and have not reaped.
        unsafe { libc::kill(-self.pid(), libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) && matches!(self.child.try_wait(), Ok(None))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill_now();
    }

    /// SIGKILL to the whole group at once (a crash, or a quick teardown); reaps the leader.
    pub(crate) fn kill_now(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = self.pid();
        // SAFETY: kill(2) on a process group we started and have not reaped.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        self.reaped = true;
        for slot in &GROUPS {
            let _ = slot.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// PIDs of every live process in process group `pgid`.
pub(crate) fn group_pids(pgid: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(stat) = read_stat(pid) {
            if stat.pgrp == pgid {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The fields of `/proc/<pid>/stat` we use.
struct Stat {
    pgrp: i32,
    /// utime + stime + cutime + cstime, in clock ticks (reaped children included).
    ticks: u64,
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); pgrp is field 5, utime..cstime are fields 14..17.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<i64>().ok());
    let ticks = (14..=17).map(|n| field(n).unwrap_or(0).max(0) as u64).sum();
    Some(Stat {
        pgrp: field(5)? as i32,
        ticks,
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time (user + system, reaped children included) of every process in group `pgid`.
pub(crate) fn group_cpu(pgid: i32) -> Duration {
    let ticks: u64 = group_pids(pgid)
        .into_iter()
        .filter_map(read_stat)
        .map(|stat| stat.ticks)
        .sum();
    Duration::from_secs_f64(ticks as f64 / ticks_per_second())
}

/// CPU time (user + system) of this process's threads so far, children excluded.
pub(crate) fn own_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage; getrusage fills it and touches nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (it was zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Memory of a process group: summed RSS (counts shared pages once per process) and PSS.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    pub(crate) rss_kib: u64,
    pub(crate) pss_kib: u64,
    pub(crate) processes: usize,
}

/// RSS and PSS of every process in group `pgid`, from `smaps_rollup`.
pub(crate) fn group_memory(pgid: i32) -> Memory {
    let mut memory = Memory::default();
    for pid in group_pids(pgid) {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        memory.processes += 1;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let value: u64 = value.parse().unwrap_or(0);
            match key {
                "Rss:" => memory.rss_kib += value,
                "Pss:" => memory.pss_kib += value,
                _ => {}
            }
        }
    }
    memory
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; pid 0 is the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a `bind` to an address with port 0 leaves the port to `connect`,
/// which may then share it among different destinations.
pub(crate) fn bind_address_no_port(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a valid pointer; the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The open-file limits (soft, hard); raises the soft one to the hard one.
pub(crate) fn raise_open_files() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (1024, 1024);
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// Moves the calling thread (and every process or thread it starts from now on) into a new,
/// empty network namespace with its loopback up. It goes away with the last of them.
pub(crate) fn isolate_network() -> anyhow::Result<()> {
    // SAFETY: unshare(2) changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let error = std::io::Error::last_os_error();
        bail!(
            "unshare(CLONE_NEWNET): {error} (the cluster metrics and the kernel section need root)"
        );
    }
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running ip link set lo up")?;
    if !status.success() {
        bail!("ip link set lo up: {status}");
    }
    Ok(())
}

/// Counters of the calling thread's network namespace (where the only interface is `lo`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopbackCounters {
    /// Bytes sent on `lo`, link level (Ethernet, IP and UDP or TCP headers included).
    pub(crate) tx_bytes: u64,
    /// TCP connections opened (`connect`), from the namespace's SNMP `Tcp: ActiveOpens`.
    pub(crate) tcp_active_opens: u64,
}

pub(crate) fn loopback_counters() -> anyhow::Result<LoopbackCounters> {
    Ok(LoopbackCounters {
        tx_bytes: loopback_tx_bytes()?,
        tcp_active_opens: tcp_active_opens()?,
    })
}

fn loopback_tx_bytes() -> anyhow::Result<u64> {
    // /proc/net is the process's namespace; thread-self/net is this thread's.
    let text = fs::read_to_string("/proc/thread-self/net/dev")?;
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("lo:"))
        .context("no lo in /proc/thread-self/net/dev")?;
    // Face |bytes packets errs drop fifo frame compressed multicast|bytes (transmit) ...
    let fields: Vec<&str> = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields
        .get(8)
        .and_then(|field| field.parse().ok())
        .context("malformed lo line in /proc/thread-self/net/dev")
}

fn tcp_active_opens() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/thread-self/net/snmp")?;
    snmp_field(&text, "Tcp", "ActiveOpens")
        .context("no Tcp ActiveOpens in /proc/thread-self/net/snmp")
}

/// A counter of `/proc/net/snmp`: a line of names, then a line of values, both led by `proto:`.
fn snmp_field(text: &str, proto: &str, name: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// Polls `condition` every 20 ms until true or `deadline` passes.
pub(crate) fn wait_for(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens PassiveOpens\nTcp: 1 53 50\n\
                    Udp: InDatagrams OutDatagrams\nUdp: 7 9\n";
        for (proto, name, expected) in [
            ("Tcp", "ActiveOpens", Some(53)),
            ("Tcp", "PassiveOpens", Some(50)),
            ("Udp", "OutDatagrams", Some(9)),
            ("Udp", "ActiveOpens", None),
            ("Icmp", "InMsgs", None),
        ] {
            assert_eq!(snmp_field(text, proto, name), expected, "{proto} {name}");
        }
    }
}
