//! The login one packet at a time, with packets shaped like those of MariaDB 10.11 and
//! MySQL 8.

use super::*;

/// A greeting: protocol 10, `version`, capabilities `caps`, auth plugin `plugin`.
fn greeting(version: &str, caps: u32, plugin: &str) -> Vec<u8> {
    let mut payload = vec![10];
    payload.extend_from_slice(version.as_bytes());
    payload.push(0);
    payload.extend_from_slice(&9u32.to_le_bytes()); // connection id
    payload.extend_from_slice(b"D7&V^Y\"<"); // scramble part 1
    payload.push(0);
    payload.extend_from_slice(&(caps as u16).to_le_bytes());
    payload.push(8); // latin1
    payload.extend_from_slice(&2u16.to_le_bytes()); // autocommit
    payload.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    payload.push(21);
    payload.extend_from_slice(&[0; 10]);
    payload.extend_from_slice(b"H5oQ&gVY=c[~\0"); // scramble part 2
    payload.extend_from_slice(plugin.as_bytes());
    payload.push(0);
    payload
}

/// MariaDB 10.11's capabilities (0xf7fe lower, 0x81ff upper, as it sends them).
const MARIADB: u32 = 0x81ff_f7fe;

fn packet(seq: u8, payload: &[u8]) -> Packet<'_> {
    Packet { seq, payload }
}

fn err(code: u16, sql_state: Option<&str>, message: &str) -> Vec<u8> {
    let mut payload = vec![0xFF];
    payload.extend_from_slice(&code.to_le_bytes());
    if let Some(state) = sql_state {
        payload.push(b'#');
        payload.extend_from_slice(state.as_bytes());
    }
    payload.extend_from_slice(message.as_bytes());
    payload
}

/// What we answer a MariaDB greeting with, as the test expects it on the wire.
fn expected_response(user: &str, caps: u32, plugin: &str) -> Vec<u8> {
    let mut payload = caps.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u32 << 24).to_le_bytes());
    payload.push(33);
    payload.extend_from_slice(&[0; 23]);
    payload.extend_from_slice(user.as_bytes());
    payload.extend_from_slice(&[0, 0]);
    payload.extend_from_slice(plugin.as_bytes());
    payload.push(0);
    frame(1, &payload)
}

#[test]
fn framing() {
    assert_eq!(next_packet(b""), Ok(None));
    assert_eq!(next_packet(&[5, 0, 0, 0, 1, 2]), Ok(None));
    let bytes = [2, 0, 0, 7, 0xAA, 0xBB, 0xCC];
    assert_eq!(next_packet(&bytes), Ok(Some((packet(7, &[0xAA, 0xBB]), 6))));
    assert_eq!(frame(3, &[1]), vec![1, 0, 0, 3, 1]);
    // A length over the bound is refused before anything is buffered.
    assert_eq!(
        next_packet(&[0xFF, 0xFF, 0xFF, 0]),
        Err(Failure::Protocol(
            "a 16777215-byte packet during the handshake".into()
        ))
    );
}

#[test]
fn greetings() {
    let parsed = parse_greeting(&greeting(
        "5.5.5-10.11.19-MariaDB-0+deb12u1",
        MARIADB,
        "mysql_native_password",
    ));
    assert_eq!(
        parsed,
        Ok(Greeting {
            server_version: "5.5.5-10.11.19-MariaDB-0+deb12u1".into(),
            capabilities: MARIADB,
            auth_plugin: Some("mysql_native_password".into()),
        })
    );
    // The plugin name's NUL may be missing at the end of the packet.
    let mut no_nul = greeting("8.0.36", 0xdfff_ffff, "caching_sha2_password");
    no_nul.pop();
    assert_eq!(
        parse_greeting(&no_nul).map(|g| g.auth_plugin),
        Ok(Some("caching_sha2_password".into()))
    );
    for (payload, expected) in [
        (vec![], "an empty greeting"),
        (
            vec![9, b'x', 0],
            "handshake protocol version 9, expected 10",
        ),
        (vec![10, b'8', 0, 1, 2], "the greeting is truncated"),
        (
            b"HTTP/1.1 400".to_vec(),
            "handshake protocol version 72, expected 10",
        ),
    ] {
        assert_eq!(
            parse_greeting(&payload),
            Err(Failure::Protocol(expected.into())),
            "{payload:?}"
        );
    }
}

/// An ERR packet instead of the greeting: host blocked, too many connections.
#[test]
fn an_error_instead_of_the_greeting_is_critical() {
    let blocked = "Host '10.77.0.1' is blocked because of many connection errors; unblock with \
                   'mariadb-admin flush-hosts'";
    let mut login = Login::new("amb_serf_check");
    let failure = login
        .handle_packet(packet(0, &err(1129, None, blocked)))
        .unwrap_err();
    assert_eq!(
        failure,
        Failure::Server {
            code: 1129,
            message: blocked.into()
        }
    );
    assert!(failure
        .to_string()
        .starts_with("mysql error 1129: Host '10.77.0.1' is blocked"));
    // With an SQL state marker the state is not part of the message.
    let mut login = Login::new("amb_serf_check");
    assert_eq!(
        login.handle_packet(packet(0, &err(1040, Some("08004"), "Too many connections"))),
        Err(Failure::Server {
            code: 1040,
            message: "Too many connections".into()
        })
    );
    // A truncated ERR is a protocol error, not a panic.
    let mut login = Login::new("amb_serf_check");
    assert_eq!(
        login.handle_packet(packet(0, &[0xFF, 0x69])),
        Err(Failure::Protocol("an ERR packet is truncated".into()))
    );
}

#[test]
fn access_denied_is_up() {
    let mut login = Login::new("amb_serf_check");
    let greeting = greeting("5.5.5-10.11.19-MariaDB", MARIADB, "mysql_native_password");
    let response = login.handle_packet(packet(0, &greeting));
    // Only what the server offers: MariaDB leaves out bit 0 (its "CLIENT_MYSQL").
    let caps = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;
    assert_eq!(
        response,
        Ok(Reply::Send(expected_response(
            "amb_serf_check",
            caps,
            "mysql_native_password"
        )))
    );
    let denied = "Access denied for user 'amb_serf_check'@'ambhost' (using password: NO)";
    assert_eq!(
        login.handle_packet(packet(2, &err(1045, Some("28000"), denied))),
        Ok(Reply::Done {
            send: None,
            outcome: Outcome::Refused {
                code: 1045,
                message: denied.into()
            }
        })
    );
    // Nothing more is expected.
    assert!(login.handle_packet(packet(3, &[0])).is_err());
}

#[test]
fn logged_in_then_quit() {
    let mut login = Login::new("monitor");
    let greeting = greeting("8.0.36", 0xdfff_ffff, "caching_sha2_password");
    assert!(matches!(
        login.handle_packet(packet(0, &greeting)),
        Ok(Reply::Send(_))
    ));
    // caching_sha2_password's fast-auth success, then OK.
    assert_eq!(
        login.handle_packet(packet(2, &[0x01, 0x03])),
        Ok(Reply::Read)
    );
    assert_eq!(
        login.handle_packet(packet(3, &[0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00])),
        Ok(Reply::Done {
            send: Some(vec![1, 0, 0, 0, COM_QUIT]),
            outcome: Outcome::LoggedIn
        })
    );
}

#[test]
fn an_auth_switch_gets_the_empty_password_again() {
    let mut login = Login::new("amb_serf_check");
    let greeting = greeting("8.0.36", 0xdfff_ffff, "caching_sha2_password");
    login.handle_packet(packet(0, &greeting)).unwrap();
    let switch = b"\xfemysql_native_password\0abcdefghijklmnopqrst\0";
    assert_eq!(
        login.handle_packet(packet(2, switch)),
        Ok(Reply::Send(vec![0, 0, 0, 3]))
    );
    assert_eq!(
        login.handle_packet(packet(4, switch)),
        Ok(Reply::Send(vec![0, 0, 0, 5]))
    );
    // Not forever.
    assert!(login.handle_packet(packet(6, switch)).is_err());
}

#[test]
fn errors_after_the_login_other_than_access_denied_are_critical() {
    let mut login = Login::new("amb_serf_check");
    let greeting = greeting("5.5.5-10.11.19-MariaDB", MARIADB, "mysql_native_password");
    login.handle_packet(packet(0, &greeting)).unwrap();
    assert_eq!(
        login.handle_packet(packet(2, &err(1040, Some("08004"), "Too many connections"))),
        Err(Failure::Server {
            code: 1040,
            message: "Too many connections".into()
        })
    );
}

#[test]
fn a_server_without_protocol_41_or_with_odd_replies_is_critical() {
    let mut login = Login::new("amb_serf_check");
    let old = greeting("4.0.30", 0x0000_002c, "");
    assert_eq!(
        login.handle_packet(packet(0, &old)),
        Err(Failure::Protocol(
            "server 4.0.30 does not speak protocol 4.1".into()
        ))
    );
    let mut login = Login::new("amb_serf_check");
    let greeting = greeting("8.0.36", 0xdfff_ffff, "caching_sha2_password");
    login.handle_packet(packet(0, &greeting)).unwrap();
    let failure = login.handle_packet(packet(2, &[0x01, 0x04])).unwrap_err();
    assert!(
        failure.to_string().contains("unexpected reply 0x01"),
        "{failure}"
    );
}

#[test]
fn the_plugin_is_left_out_when_the_server_has_no_plugin_auth() {
    let mut login = Login::new("u");
    let caps = CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
    let mut payload = vec![10];
    payload.extend_from_slice(b"5.1.73\0");
    payload.extend_from_slice(&[1, 0, 0, 0]);
    payload.extend_from_slice(b"abcdefgh\0");
    payload.extend_from_slice(&(caps as u16).to_le_bytes());
    payload.extend_from_slice(&[8, 2, 0, 0, 0, 0]);
    payload.extend_from_slice(&[0; 10]);
    payload.extend_from_slice(b"ijklmnopqrst\0");
    let Ok(Reply::Send(sent)) = login.handle_packet(packet(0, &payload)) else {
        panic!("a response");
    };
    let mut expected = caps.to_le_bytes().to_vec();
    expected.extend_from_slice(&(1u32 << 24).to_le_bytes());
    expected.push(33);
    expected.extend_from_slice(&[0; 23]);
    expected.extend_from_slice(b"u\0\0");
    assert_eq!(sent, frame(1, &expected));
}

/// Arbitrary bytes never panic the parser (seeded, so a failure reproduces).
#[test]
fn garbage_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d79_7371);
    let valid = greeting("8.0.36", 0xdfff_ffff, "caching_sha2_password");
    for _ in 0..20_000 {
        let length = rng.random_range(0..160);
        let mut bytes: Vec<u8> = (0..length).map(|_| rng.random()).collect();
        if rng.random_bool(0.5) {
            // Mostly a valid greeting with a few bytes flipped or cut.
            bytes = valid.clone();
            bytes.truncate(rng.random_range(0..=valid.len()));
            for _ in 0..rng.random_range(0..4) {
                if !bytes.is_empty() {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
            }
        }
        let mut login = Login::new("amb_serf_check");
        let _ = login.handle_packet(packet(0, &bytes));
        let _ = login.handle_packet(packet(2, &bytes));
        let _ = next_packet(&bytes);
    }
}

#[test]
fn refusals_of_the_login_are_up_other_errors_are_not() {
    for (code, up) in [
        (1044, true),
        (1045, true),
        (1698, true),
        (4151, true), // MariaDB: account locked
        (3159, true), // MySQL: secure transport required
        (1040, false),
        (1053, false),
        (1129, false),
        (1226, false), // user resource limit reached
    ] {
        let mut login = Login::new("amb_serf_check");
        let greeting = greeting("5.5.5-10.11.19-MariaDB", MARIADB, "mysql_native_password");
        login.handle_packet(packet(0, &greeting)).unwrap();
        let reply = login.handle_packet(packet(2, &err(code, Some("28000"), "no")));
        assert_eq!(reply.is_ok(), up, "{code}: {reply:?}");
    }
}
