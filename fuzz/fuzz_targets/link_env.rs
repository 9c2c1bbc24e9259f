//! Arbitrary environment pairs and `--forward` entries: `link_env::parse` returns specs or an
//! error naming the input, never panics; every spec it returns is well formed and its
//! `--forward` form parses back to the same forward.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::link_env::{parse, parse_forward, Options};

fuzz_target!(|input: (Vec<(String, String)>, String, Vec<String>)| {
    let (vars, serf_link, forwards) = input;
    let options = Options {
        serf_link,
        forwards,
    };
    let Ok(specs) = parse(vars, &options) else {
        return;
    };
    for pair in specs.windows(2) {
        assert!(
            (pair[0].listen_port, pair[0].protocol) < (pair[1].listen_port, pair[1].protocol),
            "specs sorted and unique per (port, protocol)"
        );
    }
    for spec in &specs {
        assert_ne!(spec.listen_port, 0, "{spec:?}");
        let flag = spec.to_forward_flag();
        let again = parse_forward(&flag).unwrap_or_else(|error| panic!("{flag}: {error}"));
        assert_eq!(
            (again.listen_port, again.protocol, &again.target),
            (spec.listen_port, spec.protocol, &spec.target),
            "{flag}"
        );
    }
});
