//! The proxies compared: how each is installed, configured and started in front of a backend.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::procs::{self, Group};

/// One column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    /// No proxy: the client talks to the backend (the physical limit).
    Direct,
    /// `socat TCP4-LISTEN:…,fork,reuseaddr`: what the original ambassador images ran.
    Socat,
    /// HAProxy, `mode tcp`, default threads.
    Haproxy,
    /// HAProxy with `option splice-auto`.
    HaproxySplice,
    /// nginx `stream` module.
    Nginx,
    /// `amb-serf run` with a Docker link variable.
    AmbSerf,
    /// The same as [`Tool::AmbSerf`] with the `--baseline` binary: an earlier build measured in
    /// the same run, for before/after comparisons of a change.
    AmbSerfBaseline,
    /// `amb-serf run --dataplane kernel`: nftables DNAT in the namespace; only the kernel
    /// section runs it (`kernel.rs`), never in the machine's own namespace.
    AmbSerfKernel,
    /// `amb-serf connect`: the consumer side, forwarding to the member of a real `serf agent`
    /// that advertises the backend's port as its `role`.
    AmbSerfConnect,
}

impl Tool {
    /// The tools a run without `--only` measures (the baseline only with `--baseline`).
    pub(crate) const ALL: [Self; 7] = [
        Self::Direct,
        Self::Socat,
        Self::Haproxy,
        Self::HaproxySplice,
        Self::Nginx,
        Self::AmbSerf,
        Self::AmbSerfConnect,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Socat => "socat",
            Self::Haproxy => "haproxy",
            Self::HaproxySplice => "haproxy-splice",
            Self::Nginx => "nginx",
            Self::AmbSerf => "amb-serf",
            Self::AmbSerfBaseline => "amb-serf-baseline",
            Self::AmbSerfKernel => "amb-serf-kernel",
            Self::AmbSerfConnect => "amb-serf-connect",
        }
    }

    pub(crate) fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::AmbSerfBaseline])
            .find(|tool| tool.name() == name)
            .with_context(|| {
                let names: Vec<_> = Self::ALL.iter().map(|tool| tool.name()).collect();
                format!("unknown tool {name:?} (known: {})", names.join(", "))
            })
    }

    /// Debian packages the tool needs.
    fn packages(self) -> &'static [&'static str] {
        match self {
            Self::Direct | Self::AmbSerf | Self::AmbSerfBaseline | Self::AmbSerfKernel => &[],
            Self::Socat => &["socat"],
            Self::Haproxy | Self::HaproxySplice => &["haproxy"],
            Self::Nginx => &["nginx", "libnginx-mod-stream"],
            Self::AmbSerfConnect => &["serf"],
        }
    }

    /// A line naming the tool's version, for BENCHMARKS.md.
    pub(crate) fn version(self, amb_serf: &Path) -> String {
        let (program, args): (&Path, &[&str]) = match self {
            Self::Direct => return String::new(),
            Self::Socat => (Path::new("socat"), &["-V"]),
            Self::Haproxy | Self::HaproxySplice => (Path::new("haproxy"), &["-v"]),
            Self::Nginx => (Path::new("nginx"), &["-v"]),
            Self::AmbSerf | Self::AmbSerfBaseline | Self::AmbSerfKernel | Self::AmbSerfConnect => {
                (amb_serf, &["--version"])
            }
        };
        let Ok(output) = Command::new(program).args(args).output() else {
            return format!("{}: not runnable", program.display());
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        text.lines()
            .map(str::trim)
            .find(|line| {
                let lower = line.to_lowercase();
                lower.contains("version") || lower.starts_with("amb-serf")
            })
            .unwrap_or("")
            .to_owned()
    }
}

/// Installs the Debian packages of `tools`, and `extra`, that are missing (needs root).
pub(crate) fn install(tools: &[Tool], extra: &[&'static str]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for package in tools.iter().flat_map(|tool| tool.packages()).chain(extra) {
        let installed = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
            .unwrap_or(false);
        if !installed && !missing.contains(package) {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    // apt-get needs root.
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
    {
        bail!("missing packages {missing:?}: run as root, or apt-get install them");
    }
    let status = Command::new("apt-get").args(["update", "-qq"]).status()?;
    if !status.success() {
        bail!("apt-get update failed: {status}");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed: {status}");
    }
    Ok(())
}

/// A proxy started in front of a backend.
pub(crate) struct Running {
    /// Where clients connect.
    pub(crate) addr: SocketAddr,
    /// The proxy's process group; `None` for [`Tool::Direct`].
    pub(crate) group: Option<Group>,
    /// What the proxy needs beside it and is not measured: the `serf agent` that provides the
    /// role to [`Tool::AmbSerfConnect`].
    _provider: Option<Group>,
}

impl Running {
    pub(crate) fn pgid(&self) -> Option<i32> {
        self.group.as_ref().map(Group::pid)
    }

    /// CPU time of all the proxy's processes so far.
    pub(crate) fn cpu(&self) -> Option<Duration> {
        self.pgid().map(procs::group_cpu)
    }

    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.group {
            Some(group) => group.check_alive(),
            None => Ok(()),
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `tool` in front of `backend` (on 127.0.0.1), all of it on CPU 0 if `pinned`; waits
/// until it forwards a connection.
pub(crate) fn start(
    tool: Tool,
    backend: SocketAddr,
    pinned: bool,
    dir: &Path,
    amb_serf: &Path,
    wrap: &[String],
) -> anyhow::Result<Running> {
    if tool == Tool::Direct {
        return Ok(Running {
            addr: backend,
            group: None,
            _provider: None,
        });
    }
    let port = free_port()?;
    let mut addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let log = dir.join(format!("{}.log", tool.name()));
    let mut command = if pinned {
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]);
        command
    } else {
        // `env` keeps the two forms alike: the program is always an argument.
        Command::new("env")
    };
    command.args(wrap);
    let mut provider = None;
    match tool {
        Tool::Direct => unreachable!("handled above"),
        Tool::Socat => {
            command.arg("socat").arg(format!(
                "TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096"
            ));
            command.arg(format!("TCP4:{backend}"));
        }
        Tool::Haproxy | Tool::HaproxySplice => {
            let config = dir.join(format!("{}.cfg", tool.name()));
            let splice = if tool == Tool::HaproxySplice {
                "    option splice-auto\n"
            } else {
                ""
            };
            std::fs::write(
                &config,
                format!(
                    "global\n    log stderr format raw local0 err\n\
                     defaults\n    mode tcp\n{splice}    timeout connect 5s\n    \
                     timeout client 1h\n    timeout server 1h\n\
                     frontend bench\n    bind 127.0.0.1:{port}\n    default_backend upstream\n\
                     backend upstream\n    server backend {backend}\n"
                ),
            )?;
            command.arg("haproxy").arg("-db").arg("-f").arg(&config);
        }
        Tool::Nginx => {
            let config = dir.join("nginx.conf");
            let (soft, _) = procs::raise_open_files();
            std::fs::write(
                &config,
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                     daemon off;\nworker_processes auto;\nworker_rlimit_nofile {soft};\n\
                     pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log error;\n\
                     events {{ worker_connections {soft}; }}\n\
                     stream {{ server {{ listen 127.0.0.1:{port} backlog=4096; \
                     proxy_pass {backend}; }} }}\n",
                    dir = dir.display()
                ),
            )?;
            command
                .arg("nginx")
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-error.log"))
                .arg("-c")
                .arg(&config);
        }
        Tool::AmbSerf | Tool::AmbSerfBaseline | Tool::AmbSerfKernel => {
            // A Docker link variable, as `--link backend:backend` would set it. The local port is
            // the linked port, so the ambassador listens on another loopback address.
            addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), backend.port()));
            command
                .arg(amb_serf)
                .arg("run")
                .arg(format!("--node={}", tool.name()))
                // Its own gossip port and no RPC: another amb-serf on this machine (a second
                // bench, a test) must not make it fail to start.
                .arg(format!("--bind=127.0.0.2:{}", free_port()?))
                .arg("--rpc-addr=")
                .env(
                    format!("BACKEND_PORT_{}_TCP", backend.port()),
                    format!("tcp://{backend}"),
                )
                .env("AMB_LISTEN_ADDR", "127.0.0.2")
                // Run as root, `auto` would take the kernel path: each column says which.
                .env(
                    "AMB_DATAPLANE",
                    if tool == Tool::AmbSerfKernel {
                        "kernel"
                    } else {
                        "userspace"
                    },
                );
        }
        Tool::AmbSerfConnect => {
            // The provider: a real agent on the backend's address whose `role` is the backend's
            // port, so `connect` resolves the role to the backend itself.
            let gossip = free_port()?;
            let mut agent = Command::new("serf");
            agent
                .arg("agent")
                .arg("-node=bench-provider")
                .arg(format!("-bind={}:{gossip}", backend.ip()))
                .arg(format!("-rpc-addr={}:{}", backend.ip(), free_port()?))
                .arg(format!("-tag=role={}", backend.port()));
            provider = Some(Group::spawn(
                "serf-provider",
                &mut agent,
                &dir.join("serf-provider.log"),
            )?);
            addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), backend.port()));
            command
                .arg(amb_serf)
                .arg("connect")
                .arg(backend.port().to_string())
                .arg("--listen-addr=127.0.0.2")
                .arg("--node=bench-connect")
                .arg(format!("--bind=127.0.0.1:{}", free_port()?))
                .arg("--rpc-addr=")
                .arg(format!("--join={}:{gossip}", backend.ip()));
        }
    }
    let group = Group::spawn(tool.name(), &mut command, &log)?;
    let mut running = Running {
        addr,
        group: Some(group),
        _provider: provider,
    };
    let ready = procs::wait_for(Duration::from_secs(20), || {
        running.check_alive().is_ok() && crate::load::probe(addr)
    });
    running.check_alive().with_context(|| {
        format!(
            "{} did not start; its log:\n{}",
            tool.name(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    if !ready {
        bail!("{} did not forward a connection within 20 s", tool.name());
    }
    if tool == Tool::AmbSerfKernel {
        wait_for_dnat(tool.name(), &log)?;
    }
    Ok(running)
}

/// Waits until the kernel column's nftables table DNATs (the table is installed after the
/// user-space listeners are bound, and its rules only while the backend passes its health
/// check); until then a probe is served in user space and proves nothing.
fn wait_for_dnat(node: &str, log: &Path) -> anyhow::Result<()> {
    let table = format!("amb-serf-{node}");
    let mut listing = String::new();
    let ready = procs::wait_for(Duration::from_secs(20), || {
        listing = Command::new("nft")
            .args(["list", "table", "ip", &table])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        listing.contains("dnat")
    });
    if !ready {
        bail!(
            "{node}: no DNAT rule in table ip {table} within 20 s (listing: {listing:?}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

/// The amb-serf binary: `path` if given, else the one next to this program, built first when run
/// under cargo.
pub(crate) fn amb_serf_binary(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = path {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("this program has no directory")?;
    let release = dir.file_name().is_some_and(|name| name == "release");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut command = Command::new(cargo);
        command.args(["build", "--bin", "amb-serf"]);
        if release {
            command.arg("--release");
        }
        let status = command.status().context("building amb-serf")?;
        if !status.success() {
            bail!("cargo build --bin amb-serf failed: {status}");
        }
    }
    let path = dir.join("amb-serf");
    if !path.exists() {
        bail!(
            "{} not found: build it (cargo build --release --bin amb-serf) or pass --amb-serf",
            path.display()
        );
    }
    Ok(path)
}
