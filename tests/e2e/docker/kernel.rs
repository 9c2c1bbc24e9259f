//! The image's kernel data path: `--user 0 --cap-add NET_ADMIN --sysctl net.ipv4.ip_forward=1`
//! with a `--link`, clients in other containers; and what `auto` says without the rights.

use std::net::SocketAddr;

use super::{
    base_image_tags, build_image, container_ip, docker, engine_answers, engine_lock, stops_cleanly,
    wait_pong, wait_ready, Created,
};
use crate::ambassador::http_get;
use crate::support::{eventually, DEADLINE};

#[test]
fn image_forwards_in_the_kernel_with_net_admin_and_says_why_not_without() {
    if !engine_answers() {
        return;
    }
    let _engine = engine_lock();
    let mut created = Created::default();
    let tag = base_image_tags(&["rust", "redis"]);
    let (rust_image, redis_image) = (tag("rust"), tag("redis"));
    let image = build_image(&mut created, &rust_image);
    let prefix = format!("amb-e2e-kernel-{}", std::process::id());
    let name = |what: &str| format!("{prefix}-{what}");

    let _redis = created.run("redis", &["--name", &name("redis"), &redis_image]);
    let link = format!("{}:redis", name("redis"));
    let ambassador = created.run(
        "kernel ambassador",
        &[
            "--name",
            &name("kernel"),
            "--user",
            "0:0",
            "--cap-add",
            "NET_ADMIN",
            "--sysctl",
            "net.ipv4.ip_forward=1",
            "--link",
            &link,
            &image,
        ],
    );
    wait_ready(&ambassador);
    let logs = docker(&["logs", &ambassador]);
    let stderr = super::docker_output(&["logs", &ambassador], DEADLINE).stderr;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(
        stderr.contains("data path: kernel"),
        "auto did not choose the kernel path:\n{logs}{stderr}"
    );
    // From another container, through the ambassador's prerouting DNAT.
    wait_pong(
        &redis_image,
        &["--link", &format!("{}:ambassador", name("kernel"))],
        "ambassador",
    );
    let metrics_addr = SocketAddr::new(
        container_ip(&ambassador, None).parse().expect("an IP"),
        9090,
    );
    eventually(DEADLINE, "kernel connections in /metrics", || {
        let (_, body) = http_get(metrics_addr, "/metrics")?;
        let line = body
            .lines()
            .find(|line| line.starts_with("amb_serf_kernel_connections_total{"))?;
        let count: u64 = line.rsplit(' ').next()?.parse().ok()?;
        (count >= 1).then_some(())
    });
    stops_cleanly(&ambassador);

    // The image's own user with --cap-add: Docker gives it to root only, and auto says so.
    let plain = created.run(
        "non-root ambassador",
        &[
            "--name",
            &name("plain"),
            "--cap-add",
            "NET_ADMIN",
            "--link",
            &link,
            &image,
        ],
    );
    wait_ready(&plain);
    let stderr = super::docker_output(&["logs", &plain], DEADLINE).stderr;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(
        stderr.contains("data path: user space")
            && stderr.contains("docker run --user 0 --cap-add NET_ADMIN"),
        "{stderr}"
    );
    wait_pong(
        &redis_image,
        &["--link", &format!("{}:ambassador", name("plain"))],
        "ambassador",
    );
}
