//! A real MariaDB server (Debian's `mariadb-server`) for a test: its own data directory in a
//! temp dir (`mariadb-install-db`), grants on, a low `max_connect_errors`, reachable over TCP
//! on one address and, for administration, over a Unix socket in the temp dir.
//!
//! MariaDB never counts connect errors from 127.0.0.1 and counts them only for a client address
//! whose name resolves forward and back ("validated"); any other loopback address reaches it
//! from 127.0.0.1 as well. So a test that needs the server to block a host starts it in a
//! simulated host ([`Mariadb::start_in`]): clients in that host connect from its own address,
//! and the server sees an `/etc/hosts` of its own (a private mount namespace, nothing changes
//! outside) that names that address. The test's own administration goes over the socket,
//! which counts nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{eventually, free_port, netns, require, run_with_timeout, Child, DEADLINE};

/// A user every test may log in as over TCP (from any host), with all privileges.
pub const APP_USER: &str = "app";
/// [`APP_USER`]'s password.
pub const APP_PASSWORD: &str = "secret";
/// The name the server's `/etc/hosts` gives the simulated host's address.
pub const HOST_NAME: &str = "amb-test-host";

/// A running `mariadbd`; dropping it kills the server, then removes its data directory.
#[derive(Debug)]
pub struct Mariadb {
    /// The server process (declared first: killed before the directory goes).
    pub child: Child,
    /// Where it listens for TCP clients.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    host: Option<netns::Host>,
    max_connect_errors: u32,
}

impl Mariadb {
    /// Starts MariaDB on `ip` (a free port) with `max_connect_errors`, and waits until it
    /// answers. Connect errors from this machine's loopback are not counted by the server.
    pub fn start(ip: Ipv4Addr, max_connect_errors: u32) -> Self {
        Self::start_at(
            SocketAddr::from((ip, free_port(ip))),
            None,
            max_connect_errors,
        )
    }

    /// Starts MariaDB in simulated host `host` on `<host ip>:port`, where connect errors from
    /// that host's address count (see the module docs).
    pub fn start_in(host: &netns::Host, port: u16, max_connect_errors: u32) -> Self {
        Self::start_at(
            SocketAddr::from((host.ip, port)),
            Some(host.clone()),
            max_connect_errors,
        )
    }

    fn start_at(addr: SocketAddr, host: Option<netns::Host>, max_connect_errors: u32) -> Self {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        // A tmpdir of its own: two servers bootstrapping at once collide on temp table names
        // in a shared /tmp ("Unknown table 'mysql.tmp_user_sys'").
        std::fs::create_dir(dir.path().join("tmp")).expect("creating the server's tmpdir");
        let mut install = Command::new(require("mariadb-install-db"));
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]);
        let output = run_with_timeout(&mut install, Duration::from_secs(60));
        assert!(
            output.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(host) = &host {
            let hosts = format!("127.0.0.1 localhost\n{} {HOST_NAME}\n", host.ip);
            std::fs::write(dir.path().join("hosts"), hosts)
                .expect("writing the server's hosts file");
        }
        let child = Self::spawn(dir.path(), addr, host.as_ref(), max_connect_errors);
        let mut server = Self {
            child,
            addr,
            dir,
            host,
            max_connect_errors,
        };
        server.wait_ready("mariadb answers");
        let create = format!(
            "CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}'; \
             GRANT ALL ON *.* TO '{APP_USER}'@'%';"
        );
        let output = server.sql(&create);
        assert!(output.status.success(), "creating {APP_USER}: {output:?}");
        server
    }

    fn spawn(
        dir: &Path,
        addr: SocketAddr,
        host: Option<&netns::Host>,
        max_connect_errors: u32,
    ) -> Child {
        let server_args = [
            "--no-defaults".to_owned(),
            format!("--datadir={}", dir.join("data").display()),
            format!("--socket={}", dir.join("mysqld.sock").display()),
            format!("--pid-file={}", dir.join("mysqld.pid").display()),
            format!("--tmpdir={}", dir.join("tmp").display()),
            format!("--bind-address={}", addr.ip()),
            format!("--port={}", addr.port()),
            format!("--max-connect-errors={max_connect_errors}"),
            "--user=root".to_owned(),
            "--innodb-buffer-pool-size=16M".to_owned(),
        ];
        let mut command = match host {
            Some(host) => {
                // The server alone sees our hosts file: a private mount namespace.
                let mut command = host.command(require("unshare"));
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
                    .arg(dir.join("hosts"))
                    .arg(require("mariadbd"));
                command
            }
            None => Command::new(require("mariadbd")),
        };
        command.args(server_args);
        Child::spawn("mariadbd", &mut command, Some(&dir.join("mariadbd.log")))
    }

    fn wait_ready(&mut self, what: &str) {
        eventually(DEADLINE, what, || {
            let mut ping = Command::new(require("mariadb-admin"));
            ping.args(["--no-defaults", "--user=root", "--connect-timeout=2"])
                .arg(format!("--socket={}", self.socket().display()))
                .arg("ping");
            let up = run_with_timeout(&mut ping, Duration::from_secs(10))
                .status
                .success();
            if !up {
                if let Some(status) = self.child.wait_timeout(Duration::ZERO) {
                    panic!("mariadbd exited ({status}):\n{}", self.log());
                }
            }
            up.then_some(())
        });
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// Runs `statements` as root over the Unix socket (`mariadb -N -B -e`), which the host
    /// cache never sees.
    pub fn sql(&self, statements: &str) -> Output {
        let mut client = Command::new(require("mariadb"));
        client
            .args(["--no-defaults", "--user=root", "-N", "-B"])
            .arg(format!("--socket={}", self.socket().display()))
            .arg("-e")
            .arg(statements);
        run_with_timeout(&mut client, DEADLINE)
    }

    /// A global status counter (`SHOW GLOBAL STATUS`), e.g. `Access_denied_errors`.
    pub fn status(&self, name: &str) -> Option<u64> {
        let output = self.sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"));
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Its `max_connect_errors`.
    pub fn max_connect_errors(&self) -> u32 {
        self.max_connect_errors
    }

    /// The server's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default()
    }

    /// Stops the server (SIGKILL: it recovers on restart).
    pub fn stop(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same address and data (a fresh host cache).
    pub fn restart(&mut self) {
        self.child.kill();
        // The killed server leaves its socket file behind; the new one would refuse to start
        // while another server might use it.
        let _ = std::fs::remove_file(self.socket());
        self.child = Self::spawn(
            self.dir.path(),
            self.addr,
            self.host.as_ref(),
            self.max_connect_errors,
        );
        self.wait_ready("mariadb answers again");
    }
}
