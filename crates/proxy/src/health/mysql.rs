//! The `mysql` health check: read the server's greeting, then log in politely and quit.
//!
//! MySQL and MariaDB count a client that connects and leaves without completing the handshake
//! as a connection error of its host, and block the host after `max_connect_errors` of them
//! ("Host '…' is blocked because of many connection errors"). A bare TCP probe every two
//! seconds does exactly that. This check completes the exchange instead:
//!
//! 1. read the Initial Handshake (protocol 10); an ERR packet in its place (host blocked, too
//!    many connections, host not allowed) is [`Failure::Server`]: critical;
//! 2. send a Handshake Response 41 for `--health-mysql-user` with an empty password, offering
//!    the server's own auth plugin (an empty password needs no scramble for any of them);
//! 3. read the answer: OK means we are logged in (send `COM_QUIT`); an ERR that refuses the
//!    login (access denied, account locked …) means the server is up and authenticating (a
//!    failed login is not a blocking connect error); an auth-switch request is answered with an
//!    empty password again; any other ERR (too many connections, shutting down) is critical.
//!
//! [`Login`] is the sans-IO core (packets in, bytes to send and a verdict out); [`talk`] is the
//! I/O shell that the health loop bounds with its timeout. Facts from the MySQL client/server
//! protocol documentation (Connection Phase, Protocol::HandshakeV10, HandshakeResponse41,
//! ERR_Packet, COM_QUIT) and MariaDB's "Connection" page of its protocol docs.

use std::fmt;

use tokio::net::TcpStream;

/// Packets larger than this are not part of a handshake: the greeting is about 100 bytes.
const MAX_PACKET: usize = 64 * 1024;

/// Server text (messages, the version) in a log line is cut at this many characters.
const MAX_TEXT: usize = 300;

/// How many auth-switch requests we answer before giving up (servers send at most one).
const MAX_SWITCHES: u8 = 2;

// Capability flags (protocol docs, "Capabilities Flags").
const CLIENT_LONG_PASSWORD: u32 = 0x0000_0001;
const CLIENT_PROTOCOL_41: u32 = 0x0000_0200;
const CLIENT_SECURE_CONNECTION: u32 = 0x0000_8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x0008_0000;

/// `utf8_general_ci`, known to every server since 4.1.
const CHARSET_UTF8: u8 = 33;

/// `COM_QUIT`.
const COM_QUIT: u8 = 0x01;

/// Error codes that refuse the login itself: the server is up and checked our credentials
/// (the check user need not exist, may be locked or need TLS). Access denied (1044, 1045,
/// 1698), auth method not supported (1251), password expired (1862); MySQL's account locked
/// (3118) and secure transport required (3159); MariaDB's user blocked after password errors
/// (4150) and account locked (4151). Only login errors arrive here, so the two servers'
/// differing codes above 3000 cannot be confused with anything else.
const LOGIN_REFUSED: [u16; 9] = [1044, 1045, 1251, 1698, 1862, 3118, 3159, 4150, 4151];

/// Why the server is not healthy (or not MySQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server answered with an ERR packet that is not an access denial.
    Server {
        /// The MySQL error code (e.g. 1129 host blocked, 1040 too many connections).
        code: u16,
        /// The server's message.
        message: String,
    },
    /// What the server sent is not the MySQL protocol as we know it.
    Protocol(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server { code, message } => write!(f, "mysql error {code}: {message}"),
            Self::Protocol(what) => write!(f, "not a mysql server as expected: {what}"),
        }
    }
}

/// How a healthy exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The check user logged in (and we sent `COM_QUIT`).
    LoggedIn,
    /// The server refused the check user: it is up and authenticating.
    Refused {
        /// The error code (one of [`LOGIN_REFUSED`]).
        code: u16,
        /// The server's message.
        message: String,
    },
}

/// What to do after a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes (a framed packet) and read the next packet.
    Send(Vec<u8>),
    /// Read the next packet.
    Read,
    /// The exchange is over: send these bytes if any (`COM_QUIT`), then close.
    Done {
        /// A framed packet to send before closing.
        send: Option<Vec<u8>>,
        /// Healthy.
        outcome: Outcome,
    },
}

/// A packet: its sequence number and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The sequence number (the fourth header byte).
    pub seq: u8,
    /// The payload, without the header.
    pub payload: &'a [u8],
}

/// The first complete packet in `buffer` and how many bytes it took, `Ok(None)` if more bytes
/// are needed. A length over [`MAX_PACKET`] is an error before anything is buffered.
pub fn next_packet(buffer: &[u8]) -> Result<Option<(Packet<'_>, usize)>, Failure> {
    let Some(header) = buffer.get(..4) else {
        return Ok(None);
    };
    let length =
        usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if length > MAX_PACKET {
        return Err(Failure::Protocol(format!(
            "a {length}-byte packet during the handshake"
        )));
    }
    Ok(buffer.get(4..4 + length).map(|payload| {
        (
            Packet {
                seq: header[3],
                payload,
            },
            4 + length,
        )
    }))
}

/// Frames `payload` as packet `seq`.
fn frame(seq: u8, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|&length| length < 1 << 24)
        .expect("our packets are a few dozen bytes");
    let mut packet = Vec::with_capacity(4 + payload.len());
    packet.extend_from_slice(&length.to_le_bytes()[..3]);
    packet.push(seq);
    packet.extend_from_slice(payload);
    packet
}

/// The parts of the server's greeting we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The server's version text, made printable.
    pub server_version: String,
    /// The capability flags, both halves.
    pub capabilities: u32,
    /// The default auth plugin, when the server names one.
    pub auth_plugin: Option<String>,
}

/// A little cursor over a payload: every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Failure> {
        if self.bytes.len() < n {
            return Err(Failure::Protocol(format!("{} is truncated", self.what)));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Failure> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Failure> {
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    /// A NUL-terminated string; at the end of the payload the NUL may be missing (some servers
    /// omit it after the plugin name).
    fn nul_string(&mut self) -> String {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.bytes.len());
        let text = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        self.bytes = &self.bytes[(end + 1).min(self.bytes.len())..];
        text
    }
}

/// Parses an ERR packet's payload (it starts with 0xFF).
pub fn parse_err(payload: &[u8]) -> Result<(u16, String), Failure> {
    let mut cursor = Cursor {
        bytes: payload,
        what: "an ERR packet",
    };
    cursor.u8()?;
    let code = cursor.u16()?;
    // Protocol 4.1 servers add `#` and a 5-byte SQL state, except before the handshake.
    if cursor.bytes.first() == Some(&b'#') && cursor.bytes.len() >= 6 {
        cursor.take(6)?;
    }
    Ok((code, super::printable(cursor.bytes, MAX_TEXT)))
}

/// Parses the Initial Handshake packet (protocol 10), or the ERR packet sent in its place.
pub fn parse_greeting(payload: &[u8]) -> Result<Greeting, Failure> {
    match payload.first() {
        Some(0xFF) => {
            let (code, message) = parse_err(payload)?;
            return Err(Failure::Server { code, message });
        }
        Some(10) => {}
        Some(version) => {
            return Err(Failure::Protocol(format!(
                "handshake protocol version {version}, expected 10"
            )))
        }
        None => return Err(Failure::Protocol("an empty greeting".to_owned())),
    }
    let mut cursor = Cursor {
        bytes: &payload[1..],
        what: "the greeting",
    };
    let server_version = super::printable(cursor.nul_string().as_bytes(), MAX_TEXT);
    cursor.take(4)?; // connection id
    cursor.take(8)?; // auth-plugin-data part 1
    cursor.take(1)?; // filler
    let mut capabilities = u32::from(cursor.u16()?);
    let mut auth_plugin = None;
    if !cursor.bytes.is_empty() {
        cursor.u8()?; // character set
        cursor.u16()?; // status flags
        capabilities |= u32::from(cursor.u16()?) << 16;
        let auth_data_length = cursor.u8()?;
        cursor.take(10)?; // reserved (MariaDB: its extended capabilities)
        if capabilities & CLIENT_SECURE_CONNECTION != 0 {
            let part_2 = usize::from(auth_data_length).saturating_sub(8).max(13);
            cursor.take(part_2)?;
        }
        if capabilities & CLIENT_PLUGIN_AUTH != 0 {
            auth_plugin = Some(cursor.nul_string()).filter(|name| !name.is_empty());
        }
    }
    Ok(Greeting {
        server_version,
        capabilities,
        auth_plugin,
    })
}

/// Where the login is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the greeting.
    Greeting,
    /// Our response is sent; waiting for OK, ERR or an auth switch.
    Authenticating { switches: u8 },
    /// Over.
    Done,
}

/// The sans-IO login: feed it the server's packets in order with [`Login::handle_packet`].
#[derive(Debug, Clone)]
pub struct Login {
    user: String,
    state: State,
}

impl Login {
    /// A login as `user` with an empty password.
    pub fn new(user: &str) -> Self {
        Self {
            user: user.to_owned(),
            state: State::Greeting,
        }
    }

    /// The next step after `packet`. An `Err` ends the exchange: the backend is critical.
    pub fn handle_packet(&mut self, packet: Packet<'_>) -> Result<Reply, Failure> {
        let next_seq = packet.seq.wrapping_add(1);
        match self.state {
            State::Greeting => {
                let greeting = parse_greeting(packet.payload).inspect_err(|_| {
                    self.state = State::Done;
                })?;
                if greeting.capabilities & CLIENT_PROTOCOL_41 == 0 {
                    self.state = State::Done;
                    return Err(Failure::Protocol(format!(
                        "server {} does not speak protocol 4.1",
                        greeting.server_version
                    )));
                }
                self.state = State::Authenticating { switches: 0 };
                Ok(Reply::Send(frame(
                    next_seq,
                    &self.handshake_response(&greeting),
                )))
            }
            State::Authenticating { switches } => match packet.payload.first() {
                Some(0x00) => {
                    self.state = State::Done;
                    Ok(Reply::Done {
                        send: Some(frame(0, &[COM_QUIT])),
                        outcome: Outcome::LoggedIn,
                    })
                }
                Some(0xFF) => {
                    self.state = State::Done;
                    let (code, message) = parse_err(packet.payload)?;
                    if LOGIN_REFUSED.contains(&code) {
                        Ok(Reply::Done {
                            send: None,
                            outcome: Outcome::Refused { code, message },
                        })
                    } else {
                        Err(Failure::Server { code, message })
                    }
                }
                // AuthSwitchRequest: the same empty password for the plugin it names.
                Some(0xFE) if switches < MAX_SWITCHES => {
                    self.state = State::Authenticating {
                        switches: switches + 1,
                    };
                    Ok(Reply::Send(frame(next_seq, &[])))
                }
                // caching_sha2_password's "fast auth succeeded": OK follows.
                Some(0x01) if packet.payload == [0x01, 0x03] => Ok(Reply::Read),
                other => {
                    self.state = State::Done;
                    Err(Failure::Protocol(format!(
                        "unexpected reply 0x{:02x} to the login of {:?} (give \
                         --health-mysql-user an account without a password)",
                        other.copied().unwrap_or_default(),
                        self.user
                    )))
                }
            },
            State::Done => Err(Failure::Protocol(
                "a packet after the exchange ended".to_owned(),
            )),
        }
    }

    /// HandshakeResponse41 for our user, empty password, the server's auth plugin.
    fn handshake_response(&self, greeting: &Greeting) -> Vec<u8> {
        let wanted = CLIENT_LONG_PASSWORD
            | CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH;
        let capabilities = (greeting.capabilities & wanted) | CLIENT_PROTOCOL_41;
        let mut payload = Vec::with_capacity(64 + self.user.len());
        payload.extend_from_slice(&capabilities.to_le_bytes());
        payload.extend_from_slice(&(1u32 << 24).to_le_bytes()); // max packet size
        payload.push(CHARSET_UTF8);
        payload.extend_from_slice(&[0; 23]);
        payload.extend_from_slice(self.user.as_bytes());
        payload.push(0);
        // An empty auth response: a zero length byte with CLIENT_SECURE_CONNECTION, an empty
        // NUL-terminated string without; the same byte either way.
        payload.push(0);
        if capabilities & CLIENT_PLUGIN_AUTH != 0 {
            let plugin = greeting
                .auth_plugin
                .as_deref()
                .unwrap_or("mysql_native_password");
            payload.extend_from_slice(plugin.as_bytes());
            payload.push(0);
        }
        payload
    }
}

/// Runs the login over `stream` until the verdict. The caller bounds it with a timeout.
pub async fn talk(stream: &mut TcpStream, user: &str) -> Result<String, String> {
    let mut login = Login::new(user);
    let mut buffer = Vec::with_capacity(256);
    loop {
        let (reply, used) = match next_packet(&buffer).map_err(|e| e.to_string())? {
            Some((packet, used)) => (login.handle_packet(packet), used),
            None => {
                super::read_more(stream, &mut buffer, "mid-handshake").await?;
                continue;
            }
        };
        buffer.drain(..used);
        match reply.map_err(|failure| failure.to_string())? {
            Reply::Send(bytes) => super::write(stream, &bytes).await?,
            Reply::Read => {}
            Reply::Done { send, outcome } => {
                if let Some(bytes) = send {
                    super::write(stream, &bytes).await?;
                }
                return Ok(match outcome {
                    Outcome::LoggedIn => format!("logged in as {user:?}"),
                    Outcome::Refused { code, message } => {
                        format!("server up, login refused ({code}: {message})")
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
