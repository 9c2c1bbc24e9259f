//! Any bytes as a request head on `--metrics-addr`: completeness and the request line. Must
//! never panic; an accepted request is a `GET` or `HEAD` of a path taken from the head.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/metrics/request.rs"]
mod request;

fuzz_target!(|data: &[u8]| {
    let _ = request::head_complete(data);
    if let Ok((method, path)) = request::parse_request(data) {
        assert!(method == "GET" || method == "HEAD");
        assert!(data.len() <= request::MAX_HEAD);
        assert!(!path.contains('?') && !path.contains(' '));
    }
});
