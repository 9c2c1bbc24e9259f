//! The published image on a real Docker engine: built from the root `Dockerfile`, run with real
//! `--link`s and on a user-defined network, checked from other containers.
//!
//! Nothing can be pulled here, so `scripts/docker-test-images` makes the base images from this
//! machine and Debian's mirror (a debootstrap + host-toolchain build base, passed as
//! `--build-arg RUST_IMAGE`, a redis backend, Debian's Go `serf agent` with and without an
//! EXPOSE line, MariaDB and WordPress for the seed story in `seed_story`); they are tagged by
//! content hash and kept for the next run. Everything else a test creates (the image under
//! test, containers, networks, volumes) is removed by ID when it ends, pass or fail.
//!
//! Runs when a Docker engine answers; under `AMB_REQUIRE_PEERS=1` (the README's test command,
//! CI) a missing engine or `docker-compose` is a failure.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::support::{eventually, DEADLINE};

mod kernel;
mod seed_story;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The aim for the image (the original Ubuntu + supervisord + socat + serf ones were hundreds of MB).
const SIZE_LIMIT_BYTES: u64 = 15_000_000;
/// Base images (a debootstrap the first time) and the image build itself, on a busy machine.
const BUILD_DEADLINE: Duration = Duration::from_secs(1200);
/// A hang detector for `docker stop`. Whether the ambassador stopped by itself within Docker's
/// 10 s grace is its exit code (SIGKILL gives 137); the daemon's own overhead on a loaded
/// machine has been seen to add several seconds to the command's wall time.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// "Within 5 s" of `docker run`, serf_1 shows the ambassador alive.
const SERF_ALIVE_LIMIT: Duration = Duration::from_secs(5);
/// Generous: Go's agent, the ambassador's health check and gossip on a loaded machine.
const GO_SERF_ALIVE_DEADLINE: Duration = Duration::from_secs(60);

/// One Docker test at a time: each builds the image (a cache hit after the first) and runs a
/// handful of containers, on a machine whose other cores run the rest of the suite.
static ENGINE: Mutex<()> = Mutex::new(());

fn engine_lock() -> MutexGuard<'static, ()> {
    ENGINE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn required() -> bool {
    std::env::var_os("AMB_REQUIRE_PEERS").is_some_and(|value| value == "1")
}

/// Whether a Docker engine answers; without one the test is skipped, unless required.
fn engine_answers() -> bool {
    let answered = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !answered {
        assert!(
            !required(),
            "AMB_REQUIRE_PEERS=1 but no Docker engine answers `docker version`"
        );
        eprintln!("skipping: no Docker engine answers `docker version`");
    }
    answered
}

fn docker_output(args: &[&str], deadline: Duration) -> Output {
    testkit::run_with_timeout(Command::new("docker").args(args), deadline)
}

/// Runs `docker ARGS`, panics with its stderr unless it succeeds, returns its trimmed stdout.
fn docker(args: &[&str]) -> String {
    let output = docker_output(args, DEADLINE);
    assert!(
        output.status.success(),
        "docker {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Every container, network and image this test created, removed by ID on drop, even when
/// the test panics (with the containers' logs printed first).
#[derive(Default)]
struct Created {
    containers: Vec<(String, String)>,
    networks: Vec<String>,
    images: Vec<String>,
}

impl Created {
    /// `docker run -d ARGS`, remembered for removal; returns the container ID.
    fn run(&mut self, what: &str, args: &[&str]) -> String {
        let mut full = vec!["run", "-d"];
        full.extend_from_slice(args);
        let id = docker(&full);
        self.containers.push((what.to_owned(), id.clone()));
        id
    }

    fn network(&mut self, name: &str) -> String {
        let id = docker(&["network", "create", name]);
        self.networks.push(id.clone());
        id
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (what, id) in &self.containers {
                let logs = docker_output(&["logs", "--tail", "40", id], DEADLINE);
                eprintln!(
                    "--- {what} ({id:.12}) ---\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
        }
        let ids: Vec<&str> = self.containers.iter().map(|(_, id)| id.as_str()).collect();
        if !ids.is_empty() {
            let _ = docker_output(&[&["rm", "-f", "-v"], &ids[..]].concat(), DEADLINE);
        }
        for id in &self.networks {
            let _ = docker_output(&["network", "rm", id], DEADLINE);
        }
        for id in &self.images {
            let _ = docker_output(&["rmi", "-f", id], DEADLINE);
        }
    }
}

/// The images `scripts/docker-test-images` makes.
struct BaseImages {
    /// The build base (`--build-arg RUST_IMAGE`).
    rust: String,
    /// A redis backend.
    redis: String,
    /// Debian's Go `serf agent`, with no EXPOSE line.
    serf: String,
    /// The same agent exposing 7946/tcp and 7946/udp, as ctlc/serf did.
    serf_exposed: String,
    /// Debian's MariaDB, configured like the official image (`MARIADB_*`).
    mariadb: String,
    /// Debian's WordPress on Apache, configured like `wordpress:6-apache` (`WORDPRESS_DB_*`).
    wordpress: String,
}

/// `name=tag` lines from `scripts/docker-test-images`, built or reused.
fn base_images() -> BaseImages {
    let tag = base_image_tags(&["all"]);
    BaseImages {
        rust: tag("rust"),
        redis: tag("redis"),
        serf: tag("serf"),
        serf_exposed: tag("serf-exposed"),
        mariadb: tag("mariadb"),
        wordpress: tag("wordpress"),
    }
}

/// `scripts/docker-test-images NAMES…` (built or reused); returns the lookup of each tag.
fn base_image_tags(names: &[&str]) -> impl Fn(&str) -> String {
    let start = Instant::now();
    let script = Path::new(REPO).join("scripts/docker-test-images");
    let output = testkit::run_with_timeout(Command::new(&script).args(names), BUILD_DEADLINE);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("base images ready in {:.1?}", start.elapsed());
    move |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= line from {}: {stdout}", script.display()))
            .to_owned()
    }
}

/// `docker build` of the root Dockerfile with the local build base; returns the image ID.
fn build_image(created: &mut Created, rust_image: &str) -> String {
    let start = Instant::now();
    let iidfile = std::env::temp_dir().join(format!("amb-serf-e2e-{}.iid", std::process::id()));
    let build_arg = format!("RUST_IMAGE={rust_image}");
    // At most 1.5 cores: the rest of the suite runs beside it with its own deadlines.
    let output = docker_output(
        &[
            "build",
            // A failed build leaves no intermediate container behind.
            "--force-rm",
            "--cpu-period=100000",
            "--cpu-quota=150000",
            "--build-arg",
            &build_arg,
            // The shipped code, without fat LTO's minutes (Cargo.toml's `docker-test` profile).
            "--build-arg",
            "CARGO_PROFILE=docker-test",
            "--iidfile",
            iidfile.to_str().expect("temp paths are UTF-8"),
            REPO,
        ],
        BUILD_DEADLINE,
    );
    let id = std::fs::read_to_string(&iidfile).unwrap_or_default();
    let _ = std::fs::remove_file(&iidfile);
    if !id.is_empty() {
        created.images.push(id.clone());
    }
    assert!(
        output.status.success() && !id.is_empty(),
        "docker build failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("docker build took {:.1?}", start.elapsed());
    id
}

/// The image's size and configuration: under the aim, non-root, the documented entry points.
fn check_image(image: &str) {
    let size: u64 = docker(&["image", "inspect", "-f", "{{.Size}}", image])
        .parse()
        .expect("image size is a number");
    eprintln!(
        "image size: {size} bytes ({:.1} MB)",
        size as f64 / 1_000_000.0
    );
    assert!(
        size < SIZE_LIMIT_BYTES,
        "the image is {size} bytes, over the {SIZE_LIMIT_BYTES}-byte aim"
    );
    let config: serde_json::Value = serde_json::from_str(&docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config}}",
        image,
    ]))
    .expect("image config is JSON");
    let check = |field: &str, expected: serde_json::Value| {
        assert_eq!(config[field], expected, "image config {field}: {config}");
    };
    check("User", "10001:10001".into());
    check("Entrypoint", serde_json::json!(["amb-serf"]));
    check("Cmd", serde_json::json!(["run"]));
    check(
        "ExposedPorts",
        serde_json::json!({"7946/tcp": {}, "7946/udp": {}, "9090/tcp": {}}),
    );
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "amb-serf", "health"]),
        "image healthcheck: {config}"
    );
}

fn container_ip(id: &str, network: Option<&str>) -> String {
    let format = match network {
        None => "{{.NetworkSettings.IPAddress}}".to_owned(),
        Some(network) => {
            format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}")
        }
    };
    let ip = docker(&["inspect", "-f", &format, id]);
    assert!(!ip.is_empty(), "container {id:.12} has no IP address");
    ip
}

/// Waits until the ambassador printed its startup summary (stdout) and logged `ready`; returns
/// the summary.
fn wait_ready(id: &str) -> String {
    eventually(DEADLINE, "the ambassador's startup summary", || {
        let logs = docker_output(&["logs", id], DEADLINE);
        let stdout = String::from_utf8_lossy(&logs.stdout).into_owned();
        String::from_utf8_lossy(&logs.stderr)
            .contains("ready")
            .then_some(stdout)
    })
}

/// `redis-cli PING` from a fresh client container (`client_args` says how it reaches `host`)
/// until it answers PONG.
fn wait_pong(redis_image: &str, client_args: &[&str], host: &str) {
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(client_args);
    args.extend_from_slice(&["--entrypoint", "redis-cli", redis_image, "-h", host, "ping"]);
    eventually(DEADLINE, &format!("PONG through {host}"), || {
        let output = docker_output(&args, DEADLINE);
        (String::from_utf8_lossy(&output.stdout).trim() == "PONG").then_some(())
    });
}

/// Asks the ambassador's own binary, in its scratch image, to resolve `host` and reach it:
/// `amb-serf health` names the address it resolved to in its error (redis is not HTTP).
fn resolves_in_container(container: &str, host_port: &str, expected_ip: &str) {
    let output = docker_output(
        &["exec", container, "amb-serf", "health", "--addr", host_port],
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let port = host_port.rsplit(':').next().expect("HOST:PORT");
    assert!(
        stderr.contains(&format!("resolved to {expected_ip}:{port}")),
        "{host_port} inside {container:.12} did not resolve to {expected_ip}: {stderr}"
    );
}

/// The image's `HEALTHCHECK` (exec form, no shell in the image) runs `amb-serf health`, which
/// asks the `/healthz` that `run` serves on `AMB_METRICS_ADDR` (set by the image).
fn healthcheck_passes(id: &str) {
    eventually(DEADLINE, "the HEALTHCHECK status healthy", || {
        let status = docker(&["inspect", "-f", "{{.State.Health.Status}}", id]);
        (status == "healthy").then_some(())
    });
}

/// Polls `serf members -format json` inside `serf_1` (the image's `serf` symlink to amb-serf,
/// the agent's RPC on its loopback) until `name` has `status`; returns that member's JSON.
fn serf_member(serf_1: &str, name: &str, status: &str, deadline: Duration) -> serde_json::Value {
    eventually(deadline, &format!("serf_1 showing {name} {status}"), || {
        let output = docker_output(
            &["exec", serf_1, "serf", "members", "-format", "json"],
            DEADLINE,
        );
        let members: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        members["members"]
            .as_array()?
            .iter()
            .find(|member| member["name"] == name && member["status"] == status)
            .cloned()
    })
}

/// `docker stop` returns well within Docker's grace, and the process exited 0 by itself.
fn stops_cleanly(id: &str) {
    let start = Instant::now();
    docker(&["stop", id]);
    let took = start.elapsed();
    let exit_code = docker(&["inspect", "-f", "{{.State.ExitCode}}", id]);
    assert_eq!(
        exit_code, "0",
        "the ambassador exited with {exit_code} on SIGTERM"
    );
    assert!(took < STOP_LIMIT, "docker stop took {took:?}");
    eprintln!("docker stop took {took:.1?}, exit code 0");
}

#[test]
fn image_forwards_links_and_resolves_names() {
    if !engine_answers() {
        return;
    }
    let _engine = engine_lock();
    let start = Instant::now();
    let mut created = Created::default();
    let BaseImages {
        rust: rust_image,
        redis: redis_image,
        serf: go_serf_image,
        ..
    } = base_images();
    let image = build_image(&mut created, &rust_image);
    check_image(&image);
    let version = docker(&["run", "--rm", &image, "--version"]);
    assert_eq!(version, format!("amb-serf {}", env!("CARGO_PKG_VERSION")));

    let prefix = format!("amb-e2e-{}", std::process::id());
    let name = |what: &str| format!("{prefix}-{what}");

    // Legacy links on the default bridge: serf_1 is the image's own `agent` mode, then
    // `--link redis:redis --link serf_1:serf_1` and no other argument.
    let redis = created.run("redis", &["--name", &name("redis"), &redis_image]);
    let serf_1 = created.run(
        "serf_1",
        // No /healthz in agent mode: the image's HEALTHCHECK is for `run` and `connect`.
        &[
            "--read-only",
            "--no-healthcheck",
            "--name",
            &name("serf_1"),
            &image,
            "agent",
        ],
    );
    let ambassador = created.run(
        "ambassador",
        &[
            "--read-only",
            "--name",
            &name("ambassador"),
            "--link",
            &format!("{}:redis", name("redis")),
            "--link",
            &format!("{}:serf_1", name("serf_1")),
            &image,
        ],
    );
    // Polled at once, as seen from serf_1 (its own `amb-serf members`, over RPC on its loopback):
    // within 5 s of `docker run` returning, the ambassador is alive, named by its container
    // hostname, at its container IP, advertising its link's port.
    let ambassador_started = Instant::now();
    let hostname = docker(&["inspect", "-f", "{{.Config.Hostname}}", &ambassador]);
    let ambassador_ip = container_ip(&ambassador, None);
    let member = serf_member(&serf_1, &hostname, "alive", DEADLINE);
    let alive_after = ambassador_started.elapsed();
    eprintln!("serf_1 saw the ambassador alive {alive_after:.1?} after docker run returned");
    assert!(
        alive_after < SERF_ALIVE_LIMIT,
        "serf_1 saw the ambassador alive only {alive_after:?} after docker run"
    );
    assert_eq!(
        member["addr"],
        format!("{ambassador_ip}:7946"),
        "member {member}"
    );
    assert_eq!(member["tags"]["role"], "6379", "member {member}");
    assert_eq!(member["tags"]["health"], "passing", "member {member}");
    let summary = wait_ready(&ambassador);
    let forwards: Vec<&str> = summary
        .lines()
        .filter(|line| line.starts_with("forward"))
        .collect();
    let redis_ip = container_ip(&redis, None);
    assert_eq!(
        forwards,
        [format!(
            "forward tcp 0.0.0.0:6379 -> {redis_ip}:6379 (link redis)"
        )],
        "only redis is forwarded, not the serf_1 link"
    );
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &ambassador]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc");
    let uid = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .unwrap_or_default();
    assert_eq!(
        uid.split_whitespace().nth(1),
        Some("10001"),
        "the ambassador runs as {uid:?}"
    );
    wait_pong(
        &redis_image,
        &["--link", &format!("{}:ambassador", name("ambassador"))],
        "ambassador",
    );
    // `redis` is only in the /etc/hosts that --link wrote (no DNS on the default bridge).
    resolves_in_container(&ambassador, "redis:6379", &redis_ip);

    stops_cleanly(&ambassador);
    serf_member(&serf_1, &hostname, "left", DEADLINE);

    joins_a_serf_image_that_exposes_no_port(
        &mut created,
        &image,
        &go_serf_image,
        &name("redis"),
        &prefix,
    );

    // A user-defined network (compose's case): no link variables, Docker's DNS, AMB_FORWARD.
    let network = name("net");
    created.network(&network);
    let backend = created.run(
        "redis (network)",
        &[
            "--network",
            &network,
            "--network-alias",
            "backend",
            &redis_image,
        ],
    );
    let ambassador = created.run(
        "ambassador (network)",
        &[
            "--read-only",
            "--network",
            &network,
            "--network-alias",
            "cache",
            "-e",
            "AMB_FORWARD=6379=backend:6379",
            "--health-interval",
            "1s",
            &image,
        ],
    );
    wait_ready(&ambassador);
    wait_pong(&redis_image, &["--network", &network], "cache");
    healthcheck_passes(&ambassador);
    resolves_in_container(
        &ambassador,
        "backend:6379",
        &container_ip(&backend, Some(&network)),
    );
    stops_cleanly(&ambassador);
    eprintln!("docker test took {:.1?}", start.elapsed());
}

/// Issue #26: `--link serf_1:serf_1` to an image with no EXPOSE line (Debian's Go `serf agent`)
/// gives no `SERF_1_PORT_7946_TCP`, only `SERF_1_NAME` and the `/etc/hosts` line. The
/// ambassador joins `serf_1:7946`, and the Go agent's own `serf members` shows it alive with
/// its role.
fn joins_a_serf_image_that_exposes_no_port(
    created: &mut Created,
    image: &str,
    go_serf_image: &str,
    redis_name: &str,
    prefix: &str,
) {
    let exposed = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.ExposedPorts}}",
        go_serf_image,
    ]);
    assert_eq!(exposed, "null", "{go_serf_image} must expose no port");
    let go_serf_name = format!("{prefix}-go-serf");
    let go_serf = created.run(
        "go serf agent",
        &[
            "--name",
            &go_serf_name,
            go_serf_image,
            "agent",
            "-node",
            "go_serf_1",
        ],
    );
    let ambassador = created.run(
        "ambassador (go serf)",
        &[
            "--read-only",
            "--name",
            &format!("{prefix}-ambassador-go"),
            "--link",
            &format!("{redis_name}:redis"),
            "--link",
            &format!("{go_serf_name}:serf_1"),
            image,
        ],
    );
    // Link variables are in the process's environment, not in the container's config.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &ambassador]);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("reading /proc");
    let link_vars: Vec<String> = environ
        .split(|&byte| byte == 0)
        .map(|var| String::from_utf8_lossy(var).into_owned())
        .filter(|var| var.starts_with("SERF_1_"))
        .collect();
    assert!(
        link_vars.iter().any(|var| var.starts_with("SERF_1_NAME=/"))
            && !link_vars.iter().any(|var| var.starts_with("SERF_1_PORT")),
        "a link to a portless image should give SERF_1_NAME and no port variable: {link_vars:?}"
    );
    let hostname = docker(&["inspect", "-f", "{{.Config.Hostname}}", &ambassador]);
    let ambassador_ip = container_ip(&ambassador, None);
    let member = eventually(
        GO_SERF_ALIVE_DEADLINE,
        &format!("Go serf members showing {hostname} alive with role=6379"),
        || {
            let output = docker_output(
                &["exec", &go_serf, "serf", "members", "-format", "json"],
                DEADLINE,
            );
            let members: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            members["members"]
                .as_array()?
                .iter()
                .find(|member| {
                    member["name"] == hostname.as_str()
                        && member["status"] == "alive"
                        && member["tags"]["role"] == "6379"
                })
                .cloned()
        },
    );
    assert_eq!(
        member["addr"],
        format!("{ambassador_ip}:7946"),
        "member {member}"
    );
    let logs = docker_output(&["logs", &ambassador], DEADLINE);
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(
        logs.contains("seed to join") && logs.contains("link SERF_1_NAME without a port variable"),
        "the ambassador should log the rule that found serf_1:7946:\n{logs}"
    );
    stops_cleanly(&ambassador);
}

/// `docker-compose.yml` is valid, tells the whole story, and refuses to start without its
/// secrets (the gossip key and the database passwords come from `.env`). It runs for real in
/// `seed_story::seed_story_with_compose`.
#[test]
fn compose_file_is_valid() {
    let compose = Path::new(REPO).join("docker-compose.yml");
    // An empty env file: not the developer's own .env, if there is one.
    let env_file = tempfile::NamedTempFile::new().expect("creating an empty env file");
    let config = |secrets: &[(&str, &str)]| {
        Command::new("docker-compose")
            .arg("--env-file")
            .arg(env_file.path())
            .arg("-f")
            .arg(&compose)
            .args(["config", "--services"])
            .env_remove("SERF_ENCRYPT_KEY")
            .env_remove("MARIADB_ROOT_PASSWORD")
            .env_remove("WORDPRESS_DB_PASSWORD")
            .envs(secrets.iter().copied())
            .output()
    };
    let output = match config(&[
        ("SERF_ENCRYPT_KEY", "cHJldGVuZA=="),
        ("MARIADB_ROOT_PASSWORD", "root"),
        ("WORDPRESS_DB_PASSWORD", "wordpress"),
    ]) {
        Ok(output) => output,
        Err(error) => {
            assert!(
                !required(),
                "AMB_REQUIRE_PEERS=1 but docker-compose cannot run: {error}"
            );
            eprintln!("skipping: docker-compose cannot run: {error}");
            return;
        }
    };
    assert!(
        output.status.success(),
        "docker-compose config rejects {}:\n{}",
        compose.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut services: Vec<&str> = stdout.lines().collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "mysql",
            "mysql_ambassador",
            "serf-members",
            "serf_1",
            "wordpress",
            "wordpress_db"
        ]
    );
    let without = config(&[]).expect("docker-compose ran once already");
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        !without.status.success() && stderr.contains("SERF_ENCRYPT_KEY"),
        "docker-compose.yml should refuse to run without SERF_ENCRYPT_KEY: {stderr}"
    );
}
