//! Bytes from etcd: a value under the registration prefix, a watch-stream line, a key, and an
//! endpoint list. Each decodes or is an error naming the input; nothing panics, and a value that
//! decodes encodes back to one that decodes to the same registration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registrar::etcd::{decode_watch_line, Endpoints, Prefix, Registration};

fuzz_target!(|data: &[u8]| {
    if let Ok(registration) = Registration::from_json("/services/fuzz/node", data) {
        let _ = registration.dial_addr();
        let again = Registration::from_json("/services/fuzz/node", &registration.to_json())
            .expect("our own JSON decodes");
        assert_eq!(again, registration);
    }
    if let Ok(Some((events, _revision))) = decode_watch_line(data) {
        assert!(!events.is_empty());
    }
    let text = String::from_utf8_lossy(data);
    let (prefix, key) = text.split_once('\n').unwrap_or((&text, "/services/a/b"));
    let prefix = Prefix::new(prefix);
    if let Some((role, node)) = prefix.split(key) {
        assert_eq!(prefix.split(&prefix.key(role, node)), Some((role, node)), "{key:?}");
    }
    let _ = Endpoints::parse(&text);
});
