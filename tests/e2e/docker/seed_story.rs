//! Issue #21, the seed story end to end on the Docker engine: an unmodified MariaDB, Debian's Go
//! `serf agent` as serf_1, the ambassador run exactly as the seed ran it, the members watcher,
//! and WordPress finding its database through the cluster in three ways: through a consumer
//! sidecar (`amb-serf connect`, as `docker-compose.yml` does), by asking the cluster at boot (as
//! ctlc/wordpress-serf did with `serf members`), and by name through DNS
//! (`WORDPRESS_DB_HOST=3306.role.serf`, answered by an `amb-serf agent --dns-addr` in its
//! network namespace). Then the faults, with nothing restarted by
//! hand, and the repository's own `docker-compose.yml` brought up with the offline images.
//!
//! Every image is built on this machine (`scripts/docker-test-images`); the Go agent's own
//! `serf members`, run inside serf_1, is the judge of what the cluster sees.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::{
    base_images, build_image, container_ip, docker, docker_output, engine_answers, engine_lock,
    required, BaseImages, Created, GO_SERF_ALIVE_DEADLINE, REPO, SERF_ALIVE_LIMIT, STOP_LIMIT,
};
use crate::support::{eventually, free_port, DEADLINE};

/// "Within 2 s" of `docker stop`, serf_1 shows the ambassador `left`.
const LEFT_LIMIT: Duration = Duration::from_secs(2);
/// MariaDB's first start (system tables, users), Apache, WordPress's first page, on a busy
/// machine.
const SERVICE_DEADLINE: Duration = Duration::from_secs(180);
/// One HTTP request (the installer creates the tables and writes the options).
const HTTP_TIMEOUT: Duration = Duration::from_secs(90);
/// With the database down, WordPress answers its error page, not a hang: `connect` waits
/// 5 s for a provider (`--wait-for-target`) and the ambassador 5 s for its upstream
/// (`--connect-timeout`).
const ERROR_PAGE_LIMIT: Duration = Duration::from_secs(30);
/// The Go agent's failure detection (probe, suspicion) on a busy machine.
const FAILED_DEADLINE: Duration = Duration::from_secs(90);
/// A restarted, empty serf_1 learns of the ambassador at the latest by the next push-pull
/// (every 30 s, to one random peer).
const REGISTERED_AGAIN_DEADLINE: Duration = Duration::from_secs(180);
/// What WordPress prints when it cannot reach its database.
const DB_ERROR: &str = "Error establishing a database connection";
/// MariaDB and WordPress get at most one core each: the rest of the suite, some of it timing
/// RPC answers, runs beside them.
const SERVICE_CPUS: &str = "--cpus=1";
/// The WordPress administrator's password (the test site exists only for the test).
const ADMIN_PASSWORD: &str = "amb-serf-e2e-admin";

/// The database's secrets, unique per run so that finding one in a log means it leaked.
struct Secrets {
    root: String,
    password: String,
}

impl Secrets {
    fn new() -> Self {
        let seed: u64 = rand::random();
        Self {
            root: format!("root-{seed:016x}"),
            password: format!("wp-{:016x}", seed.rotate_left(17)),
        }
    }

    /// The environment the official mariadb image takes, as `-e` arguments.
    fn mariadb_env(&self) -> Vec<String> {
        vec![
            format!("MARIADB_ROOT_PASSWORD={}", self.root),
            "MARIADB_DATABASE=wordpress".to_owned(),
            "MARIADB_USER=wordpress".to_owned(),
            format!("MARIADB_PASSWORD={}", self.password),
        ]
    }

    /// The environment `wordpress:6-apache` takes (but the host), as `-e` arguments.
    fn wordpress_env(&self, table_prefix: &str) -> Vec<String> {
        vec![
            "WORDPRESS_DB_USER=wordpress".to_owned(),
            format!("WORDPRESS_DB_PASSWORD={}", self.password),
            "WORDPRESS_DB_NAME=wordpress".to_owned(),
            format!("WORDPRESS_TABLE_PREFIX={table_prefix}"),
        ]
    }
}

/// `-e VALUE` for each value, then `rest`.
fn with_env<'a>(env: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    let mut args: Vec<&str> = env.iter().flat_map(|var| ["-e", var.as_str()]).collect();
    args.extend_from_slice(rest);
    args
}

fn hostname(id: &str) -> String {
    docker(&["inspect", "-f", "{{.Config.Hostname}}", id])
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The members the Go agent in `serf_1` lists (`serf members -format json`, over its RPC on
/// its own loopback); empty while it does not answer.
fn go_members(serf_1: &str) -> Vec<Value> {
    let output = docker_output(
        &["exec", serf_1, "serf", "members", "-format", "json"],
        DEADLINE,
    );
    serde_json::from_slice::<Value>(&output.stdout)
        .ok()
        .and_then(|members| members["members"].as_array().cloned())
        .unwrap_or_default()
}

/// Polls the Go agent until it lists `name` as `matches` says; returns the member and how long
/// that took.
fn wait_go_member(
    serf_1: &str,
    name: &str,
    what: &str,
    deadline: Duration,
    matches: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    let member = eventually(deadline, &format!("serf_1 showing {name} {what}"), || {
        go_members(serf_1)
            .into_iter()
            .find(|member| member["name"] == name && matches(member))
    });
    (member, start.elapsed())
}

fn alive_with_role(member: &Value) -> bool {
    member["status"] == "alive"
        && member["tags"]["role"] == "3306"
        && member["tags"]["health"] == "passing"
}

fn alive_without_role(member: &Value) -> bool {
    member["status"] == "alive"
        && member["tags"].get("role").is_none()
        && member["tags"]["health"] == "critical"
}

/// MariaDB answers on TCP (its first start creates the system tables and users first).
fn wait_mysql(mysql: &str) {
    eventually(SERVICE_DEADLINE, "MariaDB answering on TCP", || {
        let output = docker_output(
            &[
                "exec",
                mysql,
                "mariadb-admin",
                "--protocol=tcp",
                "-h127.0.0.1",
                "ping",
            ],
            DEADLINE,
        );
        output.status.success().then_some(())
    });
}

/// The tables of database `wordpress` whose names start with `prefix`, asked as root.
fn tables(mysql: &str, root_password: &str, prefix: &str) -> Vec<String> {
    let password = format!("MYSQL_PWD={root_password}");
    let output = docker(&[
        "exec",
        "-e",
        &password,
        mysql,
        "mariadb",
        "-uroot",
        "-N",
        "-e",
        "SHOW TABLES",
        "wordpress",
    ]);
    output
        .lines()
        .filter(|table| table.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

fn assert_installed(mysql: &str, root_password: &str, prefix: &str) {
    let tables = tables(mysql, root_password, prefix);
    for table in ["options", "posts", "users"] {
        assert!(
            tables.contains(&format!("{prefix}{table}")),
            "no table {prefix}{table} in MariaDB after the install: {tables:?}"
        );
    }
}

/// What one HTTP/1.0 request got back.
struct Response {
    status: u16,
    body: String,
}

/// One HTTP/1.0 request to `addr` (`IP:PORT`), with `Host: addr`; `form` is sent
/// url-encoded with POST.
fn http(addr: &str, method: &str, path: &str, form: Option<&str>) -> std::io::Result<Response> {
    let socket: SocketAddr = addr.parse().expect("IP:PORT");
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(form) = form {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:.200}")))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

/// Runs WordPress's installer over HTTP, as a person filling in its form would, once the
/// installer page answers (it needs the database).
fn install_wordpress(addr: &str, title: &str) {
    eventually(
        SERVICE_DEADLINE,
        &format!("WordPress's installer at {addr}"),
        || {
            let response = http(addr, "GET", "/wp-admin/install.php", None).ok()?;
            (response.status == 200 && response.body.contains("weblog_title")).then_some(())
        },
    );
    let form = format!(
        "weblog_title={}&user_name=admin&admin_password={ADMIN_PASSWORD}\
         &admin_password2={ADMIN_PASSWORD}&pw_weak=1&admin_email=admin%40example.com&blog_public=0",
        title.replace(' ', "+")
    );
    let response = http(addr, "POST", "/wp-admin/install.php?step=2", Some(&form))
        .unwrap_or_else(|error| panic!("installing WordPress at {addr}: {error}"));
    assert!(
        response.status == 200 && response.body.contains("<h1>Success!</h1>"),
        "WordPress's installer at {addr} answered {}: {:.2000}",
        response.status,
        response.body
    );
}

/// The site's name from its REST API (`/?rest_route=/`), read from the database.
fn site_name(addr: &str) -> Option<String> {
    let response = http(addr, "GET", "/?rest_route=/", None).ok()?;
    if response.status != 200 {
        return None;
    }
    let index: Value = serde_json::from_str(&response.body).ok()?;
    index["name"].as_str().map(str::to_owned)
}

fn wait_site(addr: &str, title: &str) {
    eventually(
        SERVICE_DEADLINE,
        &format!("WordPress at {addr} answering with its name {title:?}"),
        || (site_name(addr)? == title).then_some(()),
    );
}

/// Polls the site until it answers WordPress's database error page; no request may hang.
fn answers_db_error_promptly(addr: &str) {
    let took = eventually(
        SERVICE_DEADLINE,
        &format!("WordPress at {addr} answering {DB_ERROR:?}"),
        || {
            let start = Instant::now();
            let response = http(addr, "GET", "/?rest_route=/", None);
            let took = start.elapsed();
            assert!(
                took < ERROR_PAGE_LIMIT,
                "a request to WordPress at {addr} took {took:?} with the database down"
            );
            let response = response.ok()?;
            (response.status == 500 && response.body.contains(DB_ERROR)).then_some(took)
        },
    );
    eprintln!("WordPress at {addr} answered its database error page in {took:.1?}");
}

/// The watcher's stdout so far.
fn watcher_output(watcher: &str) -> String {
    stdout_of(&docker_output(&["logs", watcher], DEADLINE))
}

/// Waits for a line of the watcher that starts with `start` and contains every one of
/// `contains`; returns it.
fn wait_watcher_line(watcher: &str, start: &str, contains: &[&str]) -> String {
    eventually(
        DEADLINE,
        &format!("the watcher printing `{start}…` with {contains:?}"),
        || {
            watcher_output(watcher)
                .lines()
                .find(|line| {
                    line.starts_with(start) && contains.iter().all(|part| line.contains(part))
                })
                .map(str::to_owned)
        },
    )
}

/// The root password (from the link's `MYSQL_ENV_MARIADB_ROOT_PASSWORD`) is nowhere in what
/// the ambassador printed or advertises.
fn no_secret_leaks(what: &str, id: &str, member: &Value, secrets: &Secrets) {
    let logs = docker_output(&["logs", id], DEADLINE);
    let logs = format!(
        "{}{}",
        stdout_of(&logs),
        String::from_utf8_lossy(&logs.stderr)
    );
    for secret in [&secrets.root, &secrets.password] {
        assert!(!logs.contains(secret.as_str()), "{what} logged a secret");
        assert!(
            !member.to_string().contains(secret.as_str()),
            "{what} advertises a secret: {member}"
        );
    }
}

/// The seed's consumer, ctlc/wordpress-serf: asks the cluster where the database is, then
/// starts WordPress with that address. Here `amb-serf resolve` (join mode through the
/// `serf_1` link) asks instead of `serf members`.
const WORDPRESS_SERF_ENTRYPOINT: &str = r#"#!/bin/sh
# Ask the cluster for the database (a member alive with role=3306 and not critical), then
# start WordPress with it. Nothing else changes in the WordPress image.
set -eu
addr=$(amb-serf resolve "${WORDPRESS_DB_ROLE:-3306}" --wait "${WORDPRESS_DB_WAIT:-60s}")
echo "wordpress-serf: database at $addr" >&2
export WORDPRESS_DB_HOST="$addr"
exec docker-entrypoint.sh "$@"
"#;

/// The WordPress image plus the amb-serf binary (copied from the image under test) and the
/// entrypoint above; returns its ID, removed with the rest.
fn build_wordpress_serf(created: &mut Created, image: &str, wordpress: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "amb-serf-e2e-wordpress-serf-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a build context");
    let holder = docker(&["create", image]);
    created
        .containers
        .push(("amb-serf binary holder".to_owned(), holder.clone()));
    let binary = dir.join("amb-serf");
    docker(&[
        "cp",
        &format!("{holder}:/usr/local/bin/amb-serf"),
        binary.to_str().expect("UTF-8 path"),
    ]);
    let entrypoint = dir.join("wordpress-serf");
    std::fs::write(&entrypoint, WORDPRESS_SERF_ENTRYPOINT).expect("writing the entrypoint");
    std::fs::set_permissions(&entrypoint, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {wordpress}\n\
             COPY amb-serf wordpress-serf /usr/local/bin/\n\
             ENTRYPOINT [\"wordpress-serf\"]\n\
             CMD [\"apache2-foreground\"]\n"
        ),
    )
    .expect("writing the Dockerfile");
    let iidfile = dir.with_extension("iid");
    let output = docker_output(
        &[
            "build",
            "--force-rm",
            "-q",
            "--iidfile",
            iidfile.to_str().expect("UTF-8 path"),
            dir.to_str().expect("UTF-8 path"),
        ],
        super::BUILD_DEADLINE,
    );
    let id = std::fs::read_to_string(&iidfile)
        .unwrap_or_default()
        .trim()
        .to_owned();
    let _ = std::fs::remove_file(&iidfile);
    let _ = std::fs::remove_dir_all(&dir);
    if !id.is_empty() {
        created.images.push(id.clone());
    }
    assert!(
        output.status.success() && !id.is_empty(),
        "building the wordpress-serf image failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    id
}

/// `docker stop` in the background; the Go agent shows the member `left` within
/// [`LEFT_LIMIT`] of the command starting, and the process exits 0 by itself.
fn stop_shows_left(serf_1: &str, id: &str, name: &str) {
    let stopping = std::thread::spawn({
        let id = id.to_owned();
        move || docker_output(&["stop", &id], STOP_LIMIT)
    });
    let (_, left_after) = wait_go_member(serf_1, name, "left", STOP_LIMIT, |member| {
        member["status"] == "left"
    });
    let stopped = stopping.join().expect("the docker stop thread");
    assert!(stopped.status.success(), "docker stop {id:.12} failed");
    eprintln!("serf_1 showed the ambassador left {left_after:.1?} after docker stop began");
    assert!(
        left_after < LEFT_LIMIT,
        "serf_1 showed the ambassador left only {left_after:?} after docker stop"
    );
    let exit_code = docker(&["inspect", "-f", "{{.State.ExitCode}}", id]);
    assert_eq!(exit_code, "0", "the ambassador exited with {exit_code}");
}

/// Issue #21, steps 1 to 4, with `docker run` and legacy links as the seed ran them.
#[test]
fn seed_story_with_links() {
    if !engine_answers() {
        return;
    }
    let _engine = engine_lock();
    let start = Instant::now();
    let mut created = Created::default();
    let images = base_images();
    let image = build_image(&mut created, &images.rust);
    let prefix = format!("amb-seed-{}", std::process::id());
    let name = |what: &str| format!("{prefix}-{what}");
    let secrets = Secrets::new();

    // serf_1 is the Go agent; mysql knows nothing of Serf.
    let serf_1 = created.run(
        "serf_1 (Go serf agent)",
        &["--name", &name("serf_1"), &images.serf_exposed],
    );
    let mariadb_env = secrets.mariadb_env();
    let mysql_name = name("mysql");
    let mysql = created.run(
        "mysql",
        &with_env(
            &mariadb_env,
            &["--name", &mysql_name, SERVICE_CPUS, &images.mariadb],
        ),
    );
    wait_mysql(&mysql);
    let mysql_ip = container_ip(&mysql, None);
    let serf_1_link = format!("{}:serf_1", name("serf_1"));
    let mysql_link = format!("{mysql_name}:mysql");

    // 2. The watcher, started first so that it sees the ambassador join.
    let watcher = created.run(
        "watcher",
        &["--link", &serf_1_link, &image, "members", "--watch"],
    );
    let serf_1_node = hostname(&serf_1);
    wait_watcher_line(&watcher, &serf_1_node, &["alive"]);

    // 1. Exactly the seed's line: two links, no other argument.
    let ambassador = created.run(
        "ambassador",
        &["--link", &mysql_link, "--link", &serf_1_link, &image],
    );
    let started = Instant::now();
    let ambassador_name = hostname(&ambassador);
    let (member, alive_after) = wait_go_member(
        &serf_1,
        &ambassador_name,
        "alive with role=3306",
        GO_SERF_ALIVE_DEADLINE,
        alive_with_role,
    );
    eprintln!("the Go serf_1 saw the ambassador alive with role=3306 {alive_after:.1?} after docker run returned ({:.1?} since)", started.elapsed());
    assert!(
        alive_after < SERF_ALIVE_LIMIT,
        "serf_1 saw the ambassador alive with role=3306 only {alive_after:?} after docker run"
    );
    let ambassador_ip = container_ip(&ambassador, None);
    assert_eq!(member["addr"], format!("{ambassador_ip}:7946"), "{member}");
    let table = docker(&["exec", &serf_1, "serf", "members"]);
    eprintln!("serf members, inside serf_1:\n{table}");
    assert!(
        table.lines().any(|line| line.starts_with(&ambassador_name)
            && line.contains("alive")
            && line.contains("role=3306")),
        "`serf members` in serf_1 does not list the ambassador alive with role=3306:\n{table}"
    );
    no_secret_leaks("the ambassador", &ambassador, &member, &secrets);
    wait_watcher_line(
        &watcher,
        &format!("member-join {ambassador_name} {ambassador_ip}:7946 alive"),
        &[],
    );
    let with_role = eventually(DEADLINE, "the watcher printing role=3306", || {
        watcher_output(&watcher)
            .lines()
            .find(|line| {
                (line.starts_with(&format!("member-join {ambassador_name} "))
                    || line.starts_with(&format!("member-update {ambassador_name} ")))
                    && line.contains("role=3306")
            })
            .map(str::to_owned)
    });
    eprintln!("the watcher: {with_role}");

    // 3a. WordPress with the consumer sidecar in its network namespace.
    let connect_env = secrets.wordpress_env("connect_");
    let wordpress = created.run(
        "wordpress (connect sidecar)",
        &with_env(
            &connect_env,
            &[
                "-e",
                "WORDPRESS_DB_HOST=127.0.0.1:3306",
                SERVICE_CPUS,
                &images.wordpress,
            ],
        ),
    );
    let join = format!("AMB_JOIN={}:7946", container_ip(&serf_1, None));
    let sidecar = created.run(
        "wordpress's connect sidecar",
        &[
            "--read-only",
            "--network",
            &format!("container:{wordpress}"),
            "-e",
            &join,
            &image,
            "connect",
            "3306",
            // The web application shares this namespace: no RPC for it to drive.
            "--rpc-addr",
            "",
        ],
    );
    let connect_site = format!("{}:80", container_ip(&wordpress, None));
    let connect_title = "Seed story through connect";
    install_wordpress(&connect_site, connect_title);
    assert_installed(&mysql, &secrets.root, "connect_");
    wait_site(&connect_site, connect_title);
    let sidecar_logs = docker_output(&["logs", &sidecar], DEADLINE);
    assert!(
        !String::from_utf8_lossy(&sidecar_logs.stderr).contains("rpc server listening"),
        "the sidecar in WordPress's namespace serves RPC"
    );

    // 3b. WordPress asking the cluster at boot, as ctlc/wordpress-serf did.
    let wordpress_serf = build_wordpress_serf(&mut created, &image, &images.wordpress);
    let seed_env = secrets.wordpress_env("seed_");
    let seed_wordpress = created.run(
        "wordpress (resolve at boot)",
        &with_env(
            &seed_env,
            &["--link", &serf_1_link, SERVICE_CPUS, &wordpress_serf],
        ),
    );
    let seed_site = format!("{}:80", container_ip(&seed_wordpress, None));
    let seed_title = "Seed story through resolve";
    install_wordpress(&seed_site, seed_title);
    assert_installed(&mysql, &secrets.root, "seed_");
    wait_site(&seed_site, seed_title);
    let logs = docker_output(&["logs", &seed_wordpress], DEADLINE);
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(
        logs.contains(&format!("wordpress-serf: database at {ambassador_ip}:3306")),
        "WordPress did not get the ambassador's address from the cluster:\n{logs}"
    );

    // 3c. WordPress finding its database by name through DNS: an `amb-serf agent` in its
    // network namespace answers `3306.role.serf` on 127.0.0.1:53, the one nameserver of its
    // resolv.conf (`--dns`); the namespace lets unprivileged users bind port 53, so the sidecar
    // keeps its non-root user.
    let dns_env = secrets.wordpress_env("dns_");
    let dns_wordpress = created.run(
        "wordpress (DNS)",
        &with_env(
            &dns_env,
            &[
                "-e",
                "WORDPRESS_DB_HOST=3306.role.serf",
                "--dns",
                "127.0.0.1",
                "--sysctl",
                "net.ipv4.ip_unprivileged_port_start=53",
                SERVICE_CPUS,
                &images.wordpress,
            ],
        ),
    );
    created.run(
        "wordpress's DNS sidecar",
        &[
            "--read-only",
            "--network",
            &format!("container:{dns_wordpress}"),
            "-e",
            &join,
            &image,
            "agent",
            "--dns-addr",
            "127.0.0.1:53",
            "--rpc-addr",
            "",
        ],
    );
    // glibc's resolver, inside WordPress's container, as PHP's mysqli will ask it.
    let resolved = eventually(
        SERVICE_DEADLINE,
        "getent hosts 3306.role.serf in WordPress's container",
        || {
            let output = docker_output(
                &["exec", &dns_wordpress, "getent", "hosts", "3306.role.serf"],
                DEADLINE,
            );
            let text = stdout_of(&output);
            text.split_whitespace()
                .next()
                .filter(|ip| *ip == ambassador_ip)
                .map(|_| text.clone())
        },
    );
    eprintln!("WordPress's resolver: {}", resolved.trim());
    let dns_site = format!("{}:80", container_ip(&dns_wordpress, None));
    let dns_title = "Seed story through DNS";
    install_wordpress(&dns_site, dns_title);
    assert_installed(&mysql, &secrets.root, "dns_");
    wait_site(&dns_site, dns_title);

    // 4. Faults. MariaDB stops: the role is withdrawn and WordPress says so, promptly.
    docker(&["stop", &mysql]);
    wait_go_member(
        &serf_1,
        &ambassador_name,
        "alive without role (health=critical)",
        FAILED_DEADLINE,
        alive_without_role,
    );
    wait_watcher_line(
        &watcher,
        &format!("member-update {ambassador_name} "),
        &["alive", "health=critical"],
    );
    // Both at once: MariaDB's address is free while it is stopped, and another container
    // could take it (the link's variables would then point there).
    std::thread::scope(|scope| {
        scope.spawn(|| answers_db_error_promptly(&connect_site));
        answers_db_error_promptly(&seed_site);
    });
    docker(&["start", &mysql]);
    let mysql_ip_again = container_ip(&mysql, None);
    if mysql_ip_again == mysql_ip {
        wait_go_member(
            &serf_1,
            &ambassador_name,
            "alive with role=3306 again",
            FAILED_DEADLINE,
            alive_with_role,
        );
        wait_site(&connect_site, connect_title);
        wait_site(&seed_site, seed_title);
    } else {
        // The default bridge gives a started container the lowest free address; on an engine
        // shared with other tests a lower one may have been freed meanwhile. The link's
        // variables, and so this ambassador, still name the old one (README, "The seed
        // story"): only a quiet engine can check the way back.
        eprintln!(
            "WARNING: MariaDB came back at {mysql_ip_again}, not {mysql_ip} (other containers \
             on the default bridge); the site's return through the first ambassador is not \
             checked in this run"
        );
        wait_mysql(&mysql);
    }

    // `docker stop`: left within 2 s, and the watcher says so.
    stop_shows_left(&serf_1, &ambassador, &ambassador_name);
    wait_watcher_line(
        &watcher,
        &format!("member-leave {ambassador_name} "),
        &["left"],
    );

    // `docker kill`: failed.
    let killed = created.run(
        "ambassador (killed)",
        &["--link", &mysql_link, "--link", &serf_1_link, &image],
    );
    let killed_name = hostname(&killed);
    wait_go_member(
        &serf_1,
        &killed_name,
        "alive with role=3306",
        GO_SERF_ALIVE_DEADLINE,
        alive_with_role,
    );
    wait_watcher_line(&watcher, &format!("member-join {killed_name} "), &[]);
    docker(&["kill", &killed]);
    let (_, failed_after) =
        wait_go_member(&serf_1, &killed_name, "failed", FAILED_DEADLINE, |member| {
            member["status"] == "failed"
        });
    eprintln!("serf_1 showed the killed ambassador failed {failed_after:.1?} after docker kill");
    wait_watcher_line(
        &watcher,
        &format!("member-failed {killed_name} "),
        &["failed"],
    );
    eprintln!("the watcher printed:\n{}", watcher_output(&watcher));

    // serf_1 restarted empty: the ambassador registers again by itself.
    let survivor = created.run(
        "ambassador (serf_1 restarts)",
        &["--link", &mysql_link, "--link", &serf_1_link, &image],
    );
    let survivor_name = hostname(&survivor);
    wait_go_member(
        &serf_1,
        &survivor_name,
        "alive with role=3306",
        GO_SERF_ALIVE_DEADLINE,
        alive_with_role,
    );
    let survivor_started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &survivor]);
    let serf_1_ip = container_ip(&serf_1, None);
    docker(&["restart", &serf_1]);
    let serf_1_ip_again = container_ip(&serf_1, None);
    if serf_1_ip_again != serf_1_ip {
        // As for MariaDB above: the ambassador knows serf_1 by its old address.
        eprintln!(
            "WARNING: serf_1 came back at {serf_1_ip_again}, not {serf_1_ip} (other containers \
             on the default bridge); registering again is not checked in this run"
        );
        eprintln!("seed story (links) took {:.1?}", start.elapsed());
        return;
    }
    let (_, again_after) = wait_go_member(
        &serf_1,
        &survivor_name,
        "alive with role=3306 after its restart",
        REGISTERED_AGAIN_DEADLINE,
        alive_with_role,
    );
    eprintln!("the restarted serf_1 listed the ambassador again after {again_after:.1?}");
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &survivor]),
        survivor_started,
        "the ambassador was restarted"
    );
    eprintln!("seed story (links) took {:.1?}", start.elapsed());
}

/// `docker-compose -p PROJECT -f docker-compose.yml -f <offline override>`, with the secrets
/// in a temporary env file; `down -v` on drop, even when the test fails.
struct Compose {
    project: String,
    env_file: PathBuf,
    images: Vec<(&'static str, String)>,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let repo = Path::new(REPO);
        let mut command = Command::new("docker-compose");
        command
            .current_dir(repo)
            .args(["-p", &self.project, "--env-file"])
            .arg(&self.env_file)
            .arg("-f")
            .arg(repo.join("docker-compose.yml"))
            .arg("-f")
            .arg(repo.join("tests/e2e/docker/compose-offline.yml"))
            .args(args)
            .envs(self.images.iter().map(|(var, value)| (*var, value)));
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        testkit::run_with_timeout(&mut self.command(args), super::BUILD_DEADLINE)
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "docker-compose {args:?} failed ({}):\n{}{}",
            output.status,
            stdout_of(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        stdout_of(&output)
    }

    /// The container of `service`.
    fn container(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]).trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// Everything of the project the engine still has (containers, networks, volumes).
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for kind in [
            &["ps", "-a", "-q"][..],
            &["network", "ls", "-q"],
            &["volume", "ls", "-q"],
        ] {
            let output = docker(&[kind, &["--filter", &label]].concat());
            left.extend(output.lines().map(|id| format!("{} {id}", kind[0])));
        }
        left
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.output(&["logs", "--no-color", "--tail", "40"]);
            eprintln!("--- docker-compose logs ---\n{}", stdout_of(&logs));
        }
        let _ = self.output(&["down", "-v", "--remove-orphans", "--timeout", "10"]);
        let _ = std::fs::remove_file(&self.env_file);
    }
}

/// Issue #21, step 5: the repository's own `docker-compose.yml`, with a test-only override
/// that changes nothing but the three public image names, passes steps 1 to 3a and 4's first
/// step; `docker-compose down -v` removes everything. Also what makes it safe as shipped: the
/// gossip is encrypted (a member without the key cannot join, even from WordPress's network
/// namespace), serf_1's RPC is on its loopback, and the sidecar serves no RPC to WordPress.
#[test]
fn seed_story_with_compose() {
    if !engine_answers() {
        return;
    }
    if let Err(error) = Command::new("docker-compose").arg("version").output() {
        assert!(
            !required(),
            "AMB_REQUIRE_PEERS=1 but docker-compose cannot run: {error}"
        );
        eprintln!("skipping: docker-compose cannot run: {error}");
        return;
    }
    let _engine = engine_lock();
    let start = Instant::now();
    let mut created = Created::default();
    let BaseImages {
        rust,
        serf_exposed,
        mariadb,
        wordpress,
        ..
    } = base_images();
    let image = build_image(&mut created, &rust);
    let project = format!("ambseed{}", std::process::id());
    // The image under test, under a name of this run (removed with the image's ID).
    let amb_serf = format!("amb-serf-e2e:{project}");
    docker(&["tag", &image, &amb_serf]);
    // As the README makes it: 32 random bytes in base64 (AES-256; `serf keygen` makes 16).
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let secrets = Secrets::new();
    let port = free_port(Ipv4Addr::LOCALHOST);
    // The env file a user writes next to docker-compose.yml (README, "The seed story").
    let env_file = std::env::temp_dir().join(format!("amb-serf-e2e-{project}.env"));
    std::fs::write(
        &env_file,
        format!(
            "SERF_ENCRYPT_KEY={key}\nMARIADB_ROOT_PASSWORD={}\nWORDPRESS_DB_PASSWORD={}\n\
             WORDPRESS_PORT={port}\nAMB_SERF_IMAGE={amb_serf}\n",
            secrets.root, secrets.password
        ),
    )
    .expect("writing the env file");
    let compose = Compose {
        project,
        env_file,
        images: vec![
            ("AMB_TEST_SERF_IMAGE", serf_exposed),
            ("AMB_TEST_MARIADB_IMAGE", mariadb),
            ("AMB_TEST_WORDPRESS_IMAGE", wordpress),
        ],
    };
    // Everything is built already: nothing to pull, nothing to build.
    compose.run(&["up", "-d", "--no-build"]);

    // 1. The Go agent lists the ambassador alive with role=3306, and no secret leaked.
    let serf_1 = compose.container("serf_1");
    let (member, took) = wait_go_member(
        &serf_1,
        "mysql_ambassador",
        "alive with role=3306",
        SERVICE_DEADLINE,
        alive_with_role,
    );
    eprintln!("compose: serf_1 listed mysql_ambassador with role=3306 after {took:.1?}");
    let ambassador = compose.container("mysql_ambassador");
    no_secret_leaks("mysql_ambassador", &ambassador, &member, &secrets);

    // 2. The watcher's table, then its line for the ambassador.
    let watcher = compose.container("serf-members");
    let line = eventually(
        SERVICE_DEADLINE,
        "the compose watcher showing mysql_ambassador with role=3306",
        || {
            watcher_output(&watcher)
                .lines()
                .find(|line| line.contains("mysql_ambassador") && line.contains("role=3306"))
                .map(str::to_owned)
        },
    );
    eprintln!("compose watcher: {line}");

    // 3a. WordPress, through the sidecar, on the port the compose file publishes on loopback.
    let site = format!("127.0.0.1:{port}");
    let title = "Seed story with compose";
    install_wordpress(&site, title);
    assert_installed(&compose.container("mysql"), &secrets.root, "wp_");
    wait_site(&site, title);

    // Safe as shipped: WordPress's namespace reaches no RPC (the sidecar serves none, serf_1's
    // is on its own loopback), and without the key no member joins from there.
    let wordpress = compose.container("wordpress");
    let from_wordpress = format!("container:{wordpress}");
    for rpc in ["127.0.0.1:7373", "serf_1:7373"] {
        let output = docker_output(
            &[
                "run",
                "--rm",
                "--network",
                &from_wordpress,
                &image,
                "members",
                "--rpc-addr",
                rpc,
            ],
            DEADLINE,
        );
        assert!(
            !output.status.success(),
            "an RPC client in WordPress's namespace reached {rpc}:\n{}",
            stdout_of(&output)
        );
    }
    let join_from_wordpress = |key: Option<&str>| {
        let env = format!("AMB_ENCRYPT={}", key.unwrap_or_default());
        let mut args = vec!["run", "--rm", "--network", &from_wordpress];
        if key.is_some() {
            args.extend_from_slice(&["-e", &env]);
        }
        args.extend_from_slice(&[
            &image,
            "members",
            "--join",
            "serf_1:7946",
            // Beside the sidecar's member on 7946.
            "--bind",
            "0.0.0.0:0",
        ]);
        docker_output(&args, Duration::from_secs(60))
    };
    let output = join_from_wordpress(None);
    assert!(
        !output.status.success(),
        "a member without the key joined from WordPress's namespace:\n{}",
        stdout_of(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "compose: without the key, from WordPress's namespace: {}",
        stderr.lines().last().unwrap_or_default()
    );
    // The same with the key joins: the key is what kept the first one out.
    let output = join_from_wordpress(Some(&key));
    assert!(
        output.status.success() && stdout_of(&output).contains("mysql_ambassador"),
        "a member with the key did not join from WordPress's namespace:\n{}{}",
        stdout_of(&output),
        String::from_utf8_lossy(&output.stderr)
    );

    // 4, first step: MariaDB stops and starts; nothing else is touched.
    compose.run(&["stop", "mysql"]);
    wait_go_member(
        &serf_1,
        "mysql_ambassador",
        "alive without role (health=critical)",
        FAILED_DEADLINE,
        alive_without_role,
    );
    answers_db_error_promptly(&site);
    compose.run(&["start", "mysql"]);
    wait_go_member(
        &serf_1,
        "mysql_ambassador",
        "alive with role=3306 again",
        FAILED_DEADLINE,
        alive_with_role,
    );
    wait_site(&site, title);

    // 5. down -v removes everything it made.
    compose.run(&["down", "-v", "--timeout", "10"]);
    let left = compose.leftovers();
    assert!(left.is_empty(), "docker-compose down -v left {left:?}");
    eprintln!("seed story (compose) took {:.1?}", start.elapsed());
}
