//! Any bytes from a backend, as the `mysql` and `redis` health checks read them: the MySQL
//! login (framing, greeting, OK/ERR, auth switch) fed packet by packet as `talk` does, and the
//! Redis reply line. Must never panic, and must finish in as many steps as there are packets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::health::mysql::{next_packet, Login, Reply};
use proxy::health::redis::verdict;

fuzz_target!(|data: &[u8]| {
    let mut login = Login::new("amb-serf");
    let mut rest = data;
    while let Ok(Some((packet, used))) = next_packet(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
        match login.handle_packet(packet) {
            Ok(Reply::Send(bytes)) => assert!(!bytes.is_empty()),
            Ok(Reply::Read) => {}
            Ok(Reply::Done { .. }) | Err(_) => break,
        }
    }
    if let Some(Err(failure)) = verdict(data) {
        // A failure is logged: its text stays a line of bounded length (512 characters of
        // the server's, each at most a 10-byte escape in the quoted form).
        assert!(failure.to_string().len() < 8 * 1024);
    }
});
