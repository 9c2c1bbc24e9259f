//! `amb-serf health` against a one-shot HTTP server on loopback: exit codes and messages.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;

use crate::support::{free_port, loopback, run_to_exit};

/// Serves one connection with `answer`, returns the address as `0.0.0.0:PORT` (the form
/// `AMB_METRICS_ADDR` has in the image) and the thread, which returns the request it read.
fn serve_once(answer: &'static str) -> (String, thread::JoinHandle<String>) {
    let listener = TcpListener::bind((loopback(1), 0)).expect("binding");
    let port = listener.local_addr().expect("bound").port();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accepting");
        let mut request = [0u8; 512];
        let n = stream.read(&mut request).expect("reading the request");
        stream.write_all(answer.as_bytes()).expect("answering");
        String::from_utf8_lossy(&request[..n]).into_owned()
    });
    (format!("127.0.0.1:{port}"), server)
}

#[track_caller]
fn check(answer: &'static str, code: i32, expected_output: &str) {
    let (addr, server) = serve_once(answer);
    let output = run_to_exit(&[("AMB_METRICS_ADDR", &addr)], &["health"]);
    let request = server.join().expect("server thread");
    assert!(request.starts_with("GET /healthz HTTP/1."), "{request:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(code), "{answer:?}: {text}");
    assert!(text.contains(expected_output), "{answer:?}: {text}");
    assert!(
        text.contains(&addr),
        "the message names the address: {text}"
    );
}

#[test]
fn health_exit_codes() {
    check(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        0,
        "healthy",
    );
    check("HTTP/1.1 503 Service Unavailable\r\n\r\n", 1, "503");
    check("-ERR unknown command\r\n", 1, "not HTTP");
}

#[test]
fn health_nothing_listening() {
    let addr = format!("0.0.0.0:{}", free_port(loopback(1)));
    let output = run_to_exit(&[], &["health", "--addr", &addr]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("resolved to [127.0.0.1:") && stderr.contains("refused"),
        "0.0.0.0 is checked on loopback, and the refusal is named: {stderr}"
    );
}
