//! The etcd backend against a real etcd (Debian's `etcd-server`, on loopback, temp data dir).
//!
//! Tests are plain `#[test]`s: a tokio runtime runs the registrar and discovery tasks on its own
//! threads while the test thread polls etcd with `etcdctl` (the way a person would check).

use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use registrar::etcd::{Client, Endpoints, Prefix, Registrar, Registration, Snapshot, Watcher};
use testkit::{eventually, free_port, loopback, time_until, Etcd, DEADLINE};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A short lease so expiry tests stay quick (etcd's minimum is about 2 s).
const TTL: Duration = Duration::from_secs(3);
/// "Within a second", the promise for registering, revoking and discovery.
const PROMPT: Duration = Duration::from_secs(1);

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("registrar=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

fn runtime() -> Runtime {
    init_tracing();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

fn client_for(addrs: &[SocketAddr]) -> Client {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let value = format!("etcd://{}", list.join(","));
    Client::new(Endpoints::parse(&value).expect("a valid endpoint list"))
}

fn registration(node: &str, port: u16) -> Registration {
    let mut registration = Registration::new(node, "127.0.0.1", port, "0.1.0-test");
    registration.service_addr = Some(format!("192.0.2.10:{port}"));
    registration.ports = vec![format!("{port}/tcp"), "33060/tcp".to_owned()];
    registration.tags = [("role", port.to_string()), ("env", "test".to_owned())]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    registration
}

/// The value at `key` according to `etcdctl get`, if any.
fn etcdctl_value(etcd: &Etcd, key: &str) -> Option<String> {
    let output = etcd.etcdctl(&["get", "--print-value-only", key]);
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}

/// The keys under `prefix` according to `etcdctl get --prefix --keys-only`.
fn etcdctl_keys(etcd: &Etcd, prefix: &str) -> Vec<String> {
    let output = etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix]);
    assert!(output.status.success(), "etcdctl get: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A registrar task and its inputs.
struct Running {
    shutdown: CancellationToken,
    health: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start_registrar(
    runtime: &Runtime,
    client: Client,
    key: &str,
    registration: &Registration,
) -> Running {
    let shutdown = CancellationToken::new();
    let (health, health_rx) = watch::channel(true);
    let registrar = Registrar::new(client, key.to_owned(), registration, TTL);
    let task = runtime.spawn(registrar.run(health_rx, shutdown.clone()));
    Running {
        shutdown,
        health,
        task,
    }
}

impl Running {
    /// Cancels the registrar (like SIGTERM) and waits until it has revoked its lease.
    fn stop(self, runtime: &Runtime) {
        self.shutdown.cancel();
        runtime
            .block_on(async { tokio::time::timeout(DEADLINE, self.task).await })
            .expect("the registrar stops after revoking")
            .expect("the registrar task does not panic");
    }
}

fn wait_for(
    runtime: &Runtime,
    discovery: &mut Watcher,
    what: &str,
    condition: impl FnMut(&Snapshot) -> bool,
) -> Duration {
    let start = Instant::now();
    runtime
        .block_on(async { tokio::time::timeout(DEADLINE, discovery.wait_for(condition)).await })
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for: {what}"))
        .expect("the discovery task is running");
    start.elapsed()
}

#[test]
fn registration_appears_with_its_fields_and_revoking_removes_it() {
    let runtime = runtime();
    let etcd = Etcd::start();
    let key = Prefix::default().key("3306", "amb-1");
    let running = start_registrar(
        &runtime,
        client_for(&[etcd.client_addr]),
        &key,
        &registration("amb-1", 3306),
    );

    let took = time_until(DEADLINE, "the key under /services/", || {
        etcdctl_keys(&etcd, "/services/") == [key.clone()]
    });
    assert!(took <= PROMPT, "registered after {took:?}");
    let value = etcdctl_value(&etcd, &key).expect("the key has a value");
    let json: serde_json::Value = serde_json::from_str(&value).expect("the value is JSON");
    assert_eq!(
        json,
        serde_json::json!({
            "container_id": "amb-1", "local_ip": "127.0.0.1", "port": 3306,
            "version": "0.1.0-test", "service_addr": "192.0.2.10:3306",
            "ports": ["3306/tcp", "33060/tcp"], "tags": {"env": "test", "role": "3306"},
        })
    );

    running.shutdown.cancel();
    let took = time_until(DEADLINE, "the key gone after cancel", || {
        etcdctl_value(&etcd, &key).is_none()
    });
    assert!(took <= PROMPT, "deregistered after {took:?}");
    running.stop(&runtime);
}

#[test]
fn a_registrar_killed_without_revoking_expires_after_the_ttl() {
    let runtime = runtime();
    let etcd = Etcd::start();
    let key = Prefix::new("/amb").key("6379", "amb-k");
    let running = start_registrar(
        &runtime,
        client_for(&[etcd.client_addr]),
        &key,
        &registration("amb-k", 6379),
    );
    eventually(DEADLINE, "registered", || etcdctl_value(&etcd, &key));
    // Let a few keep-alives pass: the key must outlive its first TTL.
    std::thread::sleep(TTL + TTL / 2);
    assert!(
        etcdctl_value(&etcd, &key).is_some(),
        "kept alive past the first TTL"
    );

    // Like SIGKILL: the task stops without revoking.
    running.task.abort();
    let killed = Instant::now();
    assert!(
        etcdctl_value(&etcd, &key).is_some(),
        "still there right after the kill"
    );
    eventually(DEADLINE, "the key expired", || {
        etcdctl_value(&etcd, &key).is_none().then_some(())
    });
    let took = killed.elapsed();
    assert!(took >= TTL / 3, "gone after {took:?}: expired, not revoked");
    assert!(
        took <= TTL + Duration::from_secs(3),
        "gone only after {took:?}"
    );
}

#[test]
fn health_deletes_the_key_and_puts_it_back() {
    let runtime = runtime();
    let etcd = Etcd::start();
    let key = Prefix::default().key("6379", "amb-h");
    let running = start_registrar(
        &runtime,
        client_for(&[etcd.client_addr]),
        &key,
        &registration("amb-h", 6379),
    );
    eventually(DEADLINE, "registered", || etcdctl_value(&etcd, &key));

    running.health.send_replace(false);
    let took = time_until(DEADLINE, "deleted while unhealthy", || {
        etcdctl_value(&etcd, &key).is_none()
    });
    assert!(took <= PROMPT, "deleted after {took:?}");
    // Stays away while unhealthy, across keep-alives.
    std::thread::sleep(TTL / 2);
    assert_eq!(etcdctl_value(&etcd, &key), None);

    running.health.send_replace(true);
    let took = time_until(DEADLINE, "back when healthy", || {
        etcdctl_value(&etcd, &key).is_some()
    });
    assert!(took <= PROMPT, "back after {took:?}");
    running.stop(&runtime);
}

#[test]
fn registration_comes_back_after_etcd_restarts() {
    let runtime = runtime();
    let mut etcd = Etcd::start();
    let key = Prefix::default().key("3306", "amb-r");
    let client = client_for(&[etcd.client_addr]);
    let running = start_registrar(&runtime, client.clone(), &key, &registration("amb-r", 3306));
    let shutdown = CancellationToken::new();
    let mut discovery = runtime.block_on(async {
        Watcher::spawn(client, Prefix::default().role("3306"), shutdown.clone())
    });
    eventually(DEADLINE, "registered", || etcdctl_value(&etcd, &key));
    wait_for(&runtime, &mut discovery, "discovered", |snapshot| {
        snapshot.registrations.contains_key(&key)
    });

    // Down for longer than a keep-alive interval, so keep-alives fail; then back with the same
    // data dir: the lease survives and keep-alives resume.
    etcd.child.kill();
    std::thread::sleep(TTL / 2);
    etcd.restart();
    let took = time_until(DEADLINE, "registered after a restart", || {
        etcdctl_value(&etcd, &key).is_some()
    });
    assert!(took <= TTL, "back after {took:?}");
    std::thread::sleep(TTL * 2);
    assert!(
        etcdctl_value(&etcd, &key).is_some(),
        "still kept alive two TTLs after the restart"
    );

    // Data lost: the lease is unknown, so a new one is granted and the key put again.
    etcd.child.kill();
    std::fs::remove_dir_all(etcd.dir.path().join("data")).expect("removing etcd's data dir");
    std::thread::sleep(TTL / 2);
    etcd.restart();
    let took = time_until(DEADLINE, "registered after etcd lost its data", || {
        etcdctl_value(&etcd, &key).is_some()
    });
    assert!(took <= TTL, "back after {took:?}");
    // Discovery re-listed the new store and still shows it.
    wait_for(
        &runtime,
        &mut discovery,
        "discovered after the restarts",
        |snapshot| snapshot.registrations.contains_key(&key),
    );
    etcd.etcdctl(&["del", &key]);
    wait_for(
        &runtime,
        &mut discovery,
        "a deletion seen by the new watch",
        |snapshot| !snapshot.registrations.contains_key(&key),
    );

    shutdown.cancel();
    running.stop(&runtime);
}

#[test]
fn discovery_follows_new_deleted_expired_and_foreign_values() {
    let runtime = runtime();
    let etcd = Etcd::start();
    let prefix = Prefix::default();
    let client = client_for(&[etcd.client_addr]);
    let shutdown = CancellationToken::new();
    let mut discovery = runtime
        .block_on(async { Watcher::spawn(client.clone(), prefix.role("5432"), shutdown.clone()) });
    wait_for(
        &runtime,
        &mut discovery,
        "the first listing",
        Snapshot::is_synced,
    );

    // Foreign values under the prefix are skipped, not fatal.
    let foreign = prefix.key("5432", "not-ours");
    assert!(etcd
        .etcdctl(&["put", &foreign, "plain text"])
        .status
        .success());
    assert!(etcd
        .etcdctl(&["put", &prefix.key("5432", "half"), r#"{"port":5432}"#])
        .status
        .success());

    let key_a = prefix.key("5432", "amb-a");
    let a = start_registrar(
        &runtime,
        client.clone(),
        &key_a,
        &registration("amb-a", 5432),
    );
    let took = wait_for(&runtime, &mut discovery, "amb-a discovered", |snapshot| {
        snapshot.registrations.contains_key(&key_a)
    });
    assert!(took <= PROMPT, "discovered after {took:?}");
    let key_b = prefix.key("5432", "amb-b");
    let b = start_registrar(
        &runtime,
        client.clone(),
        &key_b,
        &registration("amb-b", 5432),
    );
    let took = wait_for(&runtime, &mut discovery, "amb-b discovered", |snapshot| {
        snapshot.registrations.contains_key(&key_b)
    });
    assert!(took <= PROMPT, "discovered after {took:?}");
    let snapshot = discovery.current();
    assert_eq!(
        snapshot.registrations.keys().collect::<Vec<_>>(),
        [&key_a, &key_b],
        "foreign values are left out"
    );
    assert_eq!(
        snapshot.registrations[&key_a].dial_addr(),
        "192.0.2.10:5432"
    );
    // Another role's key is outside this prefix.
    assert!(etcd
        .etcdctl(&["put", &prefix.key("54321", "x"), "{}"])
        .status
        .success());

    // Revoked (SIGTERM) → dropped within a second.
    a.shutdown.cancel();
    let took = wait_for(&runtime, &mut discovery, "amb-a dropped", |snapshot| {
        !snapshot.registrations.contains_key(&key_a)
    });
    assert!(took <= PROMPT, "dropped after {took:?}");
    // Expired (SIGKILL) → dropped after the TTL.
    b.task.abort();
    wait_for(&runtime, &mut discovery, "amb-b expired", |snapshot| {
        snapshot.registrations.is_empty()
    });
    shutdown.cancel();
}

#[test]
fn a_dead_first_endpoint_fails_over_to_the_second() {
    let runtime = runtime();
    let etcd = Etcd::start();
    let dead = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let client = client_for(&[dead, etcd.client_addr]);
    let key = Prefix::default().key("8080", "amb-f");
    let running = start_registrar(&runtime, client.clone(), &key, &registration("amb-f", 8080));
    let took = time_until(DEADLINE, "registered through the second endpoint", || {
        etcdctl_value(&etcd, &key).is_some()
    });
    assert!(took <= PROMPT, "registered after {took:?}");

    let shutdown = CancellationToken::new();
    let mut discovery = runtime.block_on(async {
        Watcher::spawn(
            client_for(&[dead, etcd.client_addr]),
            Prefix::default().all(),
            shutdown.clone(),
        )
    });
    wait_for(
        &runtime,
        &mut discovery,
        "discovered through the second endpoint",
        |snapshot| snapshot.registrations.contains_key(&key),
    );
    running.shutdown.cancel();
    let took = wait_for(
        &runtime,
        &mut discovery,
        "revoked through the second endpoint",
        |snapshot| snapshot.registrations.is_empty(),
    );
    assert!(took <= PROMPT, "dropped after {took:?}");
    shutdown.cancel();
}

#[test]
fn an_unreachable_etcd_at_start_is_retried_until_it_is_up() {
    let runtime = runtime();
    let mut etcd = Etcd::start();
    etcd.child.kill();
    let key = Prefix::default().key("11211", "amb-u");
    let running = start_registrar(
        &runtime,
        client_for(&[etcd.client_addr]),
        &key,
        &registration("amb-u", 11211),
    );
    // Some failed attempts happen while etcd is down.
    std::thread::sleep(Duration::from_millis(500));
    etcd.restart();
    let took = time_until(DEADLINE, "registered once etcd is up", || {
        etcdctl_value(&etcd, &key).is_some()
    });
    assert!(took <= TTL, "registered {took:?} after etcd came up");
    running.stop(&runtime);
}

#[test]
fn errors_name_the_endpoint_and_the_operation() {
    let runtime = runtime();
    let dead = SocketAddr::from((loopback(1), free_port(loopback(1))));
    let error = runtime
        .block_on(client_for(&[dead]).put("/services/1/x", b"{}", None))
        .expect_err("nothing listens there");
    let message = error.to_string();
    assert!(error.is_unavailable(), "{message}");
    assert!(
        message.starts_with(&format!("etcd put /services/1/x at {dead}: ")),
        "{message}"
    );
}
