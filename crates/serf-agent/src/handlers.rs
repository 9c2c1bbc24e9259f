//! Serf event handlers, as `serf agent -event-handler` runs them (serf/cmd/serf/command/agent
//! event_handler.go, invoke.go): `[type[:name][,type…]=]command`, run with `/bin/sh -c` (or, in
//! an image without a shell, split into words as a POSIX shell splits them, [`split_words`], and
//! run directly), one at a time in event order.
//!
//! The environment carries `SERF_EVENT`, `SERF_SELF_NAME`, `SERF_SELF_ROLE`, `SERF_TAG_<TAG>`,
//! `SERF_USER_EVENT`/`SERF_USER_LTIME` or `SERF_QUERY_NAME`/`SERF_QUERY_LTIME`, plus whatever the
//! caller adds (the ambassador adds `AMB_BACKEND_HOST`/`AMB_BACKEND_PORT`). Stdin is the payload
//! (with a newline added, as Go does) or, for member events, one `name\taddr\trole\ttags` line
//! per member. A query handler's output (first 8 KiB) is the query's response.
//!
//! Unlike Go, a handler does not get the whole environment of the daemon: the secrets it holds
//! are withheld ([`is_withheld`]: every Docker link `<ALIAS>_ENV_<NAME>` variable, which carries
//! the linked container's own settings such as `MYSQL_ENV_MARIADB_ROOT_PASSWORD`, and our
//! `AMB_ENCRYPT` and `AMB_RPC_AUTH`). Any member can trigger a handler with a payload of its
//! choosing, so a handler is code that untrusted input reaches. Handler output is logged only
//! as a bounded excerpt ([`excerpt`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tracing::{debug, warn};

/// How much handler output is kept (Go's `maxBufSize`).
const MAX_OUTPUT: usize = 8 * 1024;
/// A handler running longer than this is logged as slow (Go's `warnSlow`).
const WARN_SLOW: Duration = Duration::from_secs(1);
/// Handler output (stdout, stderr) reaches the log as at most this many lines…
const LOG_MAX_LINES: usize = 8;
/// …of at most this many bytes each, then a note of the whole length.
const LOG_MAX_LINE_BYTES: usize = 256;
/// Variables of the daemon that hold secrets of its own (`--encrypt`, `--rpc-auth`); a handler
/// never sees them.
const OUR_SECRETS: [&str; 2] = ["AMB_ENCRYPT", "AMB_RPC_AUTH"];

/// Whether a variable of the daemon's environment is kept from handlers: one of
/// [`OUR_SECRETS`], or anything of the Docker link form `<ALIAS>_ENV_<NAME>` (the linked
/// container's environment: passwords, keys).
pub fn is_withheld(name: &OsStr) -> bool {
    let name = name.as_bytes();
    if OUR_SECRETS.iter().any(|secret| secret.as_bytes() == name) {
        return true;
    }
    const MARK: &[u8] = b"_ENV_";
    name.windows(MARK.len())
        .enumerate()
        .any(|(at, window)| window == MARK && at > 0 && at + MARK.len() < name.len())
}

/// A bounded, printable excerpt of handler output for the log: the first [`LOG_MAX_LINES`]
/// lines, each cut at [`LOG_MAX_LINE_BYTES`], plus a note of the whole length when anything
/// was left out.
pub fn excerpt(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim_end();
    let mut out = String::new();
    let mut cut = false;
    for (index, line) in text.lines().enumerate() {
        if index == LOG_MAX_LINES {
            cut = true;
            break;
        }
        if index > 0 {
            out.push('\n');
        }
        if line.len() > LOG_MAX_LINE_BYTES {
            let mut end = LOG_MAX_LINE_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&line[..end]);
            out.push('…');
            cut = true;
        } else {
            out.push_str(line);
        }
    }
    if cut {
        out.push_str(&format!(
            " [{} bytes, {} lines in all]",
            output.len(),
            text.lines().count()
        ));
    }
    out
}

/// The event kinds a handler can subscribe to.
const KINDS: [&str; 8] = [
    "member-join",
    "member-leave",
    "member-failed",
    "member-update",
    "member-reap",
    "user",
    "query",
    "*",
];

/// One `type[:name]` filter of a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    kind: String,
    name: Option<String>,
}

/// One configured handler: the events it takes and its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    filters: Vec<Filter>,
    command: String,
}

/// A handler specification that is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpecError {
    spec: String,
    reason: String,
}

impl fmt::Display for HandlerSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event handler {:?}: {}", self.spec, self.reason)
    }
}

impl std::error::Error for HandlerSpecError {}

impl Handler {
    /// Parses `[type[:name][,…]=]command` as `serf agent -event-handler` does.
    pub fn parse(spec: &str) -> Result<Self, HandlerSpecError> {
        let error = |reason: String| HandlerSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let (filter, command) = match spec.split_once('=') {
            Some((filter, command)) => (filter, command),
            None => ("", spec),
        };
        if command.trim().is_empty() {
            return Err(error("no command".into()));
        }
        // Neither a shell nor the split without one runs an unterminated quote.
        split_words(command).map_err(|reason| error(reason.to_owned()))?;
        let filter = if filter.is_empty() { "*" } else { filter };
        let mut filters = Vec::new();
        for part in filter.split(',') {
            let (kind, name) = match part.split_once(':') {
                Some((kind @ ("user" | "query"), name)) => (kind, Some(name.to_owned())),
                _ => (part, None),
            };
            if !KINDS.contains(&kind) {
                return Err(error(format!(
                    "unknown event type {kind:?} (expected one of {})",
                    KINDS.join(", ")
                )));
            }
            filters.push(Filter {
                kind: kind.to_owned(),
                name: name.filter(|name| !name.is_empty()),
            });
        }
        Ok(Self {
            filters,
            command: command.to_owned(),
        })
    }

    fn wants(&self, event: &HandlerEvent) -> bool {
        self.filters.iter().any(|filter| {
            filter.kind == "*"
                || (filter.kind == event.kind()
                    && match (&filter.name, event) {
                        (None, _) => true,
                        (Some(want), HandlerEvent::User { name, .. })
                        | (Some(want), HandlerEvent::Query { name, .. }) => want == name,
                        (Some(_), HandlerEvent::Member { .. }) => false,
                    })
        })
    }
}

/// A member as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerMember {
    /// Node name.
    pub name: String,
    /// Gossip address, `IP:PORT`.
    pub addr: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// An event to hand to the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerEvent {
    /// `member-join`, `member-leave`, `member-failed`, `member-update`, `member-reap`.
    Member {
        /// The event type, e.g. `member-join`.
        kind: &'static str,
        /// The members it is about.
        members: Vec<HandlerMember>,
    },
    /// A user event.
    User {
        /// The event's name.
        name: String,
        /// Its Lamport time.
        ltime: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A query; the output of the handlers that take it is the response.
    Query {
        /// The query's name.
        name: String,
        /// Its Lamport time.
        ltime: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
}

impl HandlerEvent {
    /// The handler form of a member's event, and the responder for a query; `None` for events
    /// handlers never see (join and leave completion, …).
    pub fn from_event(
        event: &serf::serf::Event,
    ) -> Option<(Self, Option<serf::serf::ResponderId>)> {
        use serf::serf::Event;
        let member = |kind: &'static str, member: &serf::serf::Member| Self::Member {
            kind,
            members: vec![HandlerMember {
                name: member.name.clone(),
                addr: member.addr.to_string(),
                tags: member.tags.clone(),
            }],
        };
        Some(match event {
            Event::MemberJoin(m) => (member("member-join", m), None),
            Event::MemberLeave(m) => (member("member-leave", m), None),
            Event::MemberFailed(m) => (member("member-failed", m), None),
            Event::MemberUpdate(m) => (member("member-update", m), None),
            Event::MemberReap(m) => (member("member-reap", m), None),
            Event::UserEvent(user) => (
                Self::User {
                    name: user.name.clone(),
                    ltime: user.ltime.0,
                    payload: user.payload.clone(),
                },
                None,
            ),
            Event::Query(query) => (
                Self::Query {
                    name: query.name.clone(),
                    ltime: query.ltime.0,
                    payload: query.payload.clone(),
                },
                Some(query.id),
            ),
            _ => return None,
        })
    }

    fn kind(&self) -> &str {
        match self {
            Self::Member { kind, .. } => kind,
            Self::User { .. } => "user",
            Self::Query { .. } => "query",
        }
    }
}

/// Who we are, for `SERF_SELF_*` and `SERF_TAG_*`, plus extra environment.
#[derive(Debug, Clone, Default)]
pub struct SelfInfo {
    /// Our node name (`SERF_SELF_NAME`).
    pub name: String,
    /// Our tags (`SERF_TAG_*`, `SERF_SELF_ROLE`).
    pub tags: BTreeMap<String, String>,
    /// Extra environment, e.g. `AMB_BACKEND_HOST`.
    pub extra_env: Vec<(String, String)>,
}

/// Runs every handler that wants `event`, one after the other. Returns the output of the last
/// handler that produced any (the response, for a query). Failures are logged, not returned:
/// a broken handler must not stop the member.
pub async fn dispatch(
    handlers: &[Handler],
    me: &SelfInfo,
    event: &HandlerEvent,
) -> Option<Vec<u8>> {
    let mut response = None;
    for handler in handlers.iter().filter(|handler| handler.wants(event)) {
        match invoke(&handler.command, me, event).await {
            Ok(output) => {
                if !output.is_empty() {
                    response = Some(output);
                }
            }
            Err(error) => warn!(command = %handler.command, %error, "event handler failed"),
        }
    }
    response
}

async fn invoke(command: &str, me: &SelfInfo, event: &HandlerEvent) -> std::io::Result<Vec<u8>> {
    let mut process = if Path::new("/bin/sh").exists() {
        let mut process = Command::new("/bin/sh");
        process.arg("-c").arg(command);
        process
    } else {
        let words = split_words(command)
            .map_err(|reason| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason))?;
        let mut words = words.into_iter();
        let program = words.next().unwrap_or_default();
        let mut process = Command::new(program);
        process.args(words);
        process
    };
    for (name, _) in std::env::vars_os() {
        if is_withheld(&name) {
            process.env_remove(name);
        }
    }
    process
        .env("SERF_EVENT", event.kind())
        .env("SERF_SELF_NAME", &me.name)
        .env(
            "SERF_SELF_ROLE",
            me.tags.get("role").map(String::as_str).unwrap_or(""),
        );
    for (tag, value) in &me.tags {
        process.env(format!("SERF_TAG_{}", sanitize(tag)), value);
    }
    for (key, value) in &me.extra_env {
        process.env(key, value);
    }
    let stdin = match event {
        HandlerEvent::Member { members, .. } => member_lines(members),
        HandlerEvent::User {
            name,
            ltime,
            payload,
        } => {
            process
                .env("SERF_USER_EVENT", name)
                .env("SERF_USER_LTIME", ltime.to_string());
            with_newline(payload)
        }
        HandlerEvent::Query {
            name,
            ltime,
            payload,
        } => {
            process
                .env("SERF_QUERY_NAME", name)
                .env("SERF_QUERY_LTIME", ltime.to_string());
            with_newline(payload)
        }
    };
    process
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = process.spawn()?;
    let mut child_stdin = child.stdin.take().expect("stdin was piped");
    let writer = tokio::spawn(async move {
        // A handler that does not read its stdin is fine: ignore a broken pipe.
        let _ = child_stdin.write_all(&stdin).await;
    });
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let collect = async {
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let mut limited_out = (&mut stdout).take(MAX_OUTPUT as u64);
        let mut limited_err = (&mut stderr).take(MAX_OUTPUT as u64);
        let (out, err) = tokio::join!(
            limited_out.read_to_end(&mut output),
            limited_err.read_to_end(&mut errors),
        );
        out?;
        err?;
        // Drain whatever is left so the handler never blocks on a full pipe.
        tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await?;
        tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await?;
        Ok::<_, std::io::Error>((output, errors))
    };
    tokio::pin!(collect);
    let (output, errors) = tokio::select! {
        result = &mut collect => result?,
        () = tokio::time::sleep(WARN_SLOW) => {
            warn!(%command, slow = ?WARN_SLOW, "event handler slow");
            collect.await?
        }
    };
    let status = child.wait().await?;
    let _ = writer.await;
    debug!(%command, event = event.kind(), output = %excerpt(&output), "event handler done");
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "{status}: {}",
            excerpt(&errors)
        )));
    }
    Ok(output)
}

/// Splits a command into words as a POSIX shell does (sh(1), "Quoting"), with no expansion:
/// unquoted blanks (space, tab, newline) separate words; a backslash outside quotes keeps the next
/// character literally (a backslash-newline is removed); single quotes keep everything up to the
/// next single quote; double quotes keep everything up to the next unescaped double quote, where
/// a backslash escapes only `$`, `` ` ``, `"`, `\` and newline. `''` and `""` make empty words.
/// `$`, `*`, `~`, `;`, `|` and the like are ordinary characters: there is no shell.
pub fn split_words(command: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    // The word being built; `None` between words (so `''` still makes a word).
    let mut word: Option<String> = None;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => words.extend(word.take()),
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(next) => word.get_or_insert_with(String::new).push(next),
                None => return Err("a backslash ends the command"),
            },
            '\'' => {
                let word = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated single quote"),
                    }
                }
            }
            '"' => {
                let word = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('\n') => {}
                            Some(c @ ('$' | '`' | '"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated double quote"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated double quote"),
                    }
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

fn sanitize(tag: &str) -> String {
    tag.to_uppercase()
        .chars()
        .map(|c| {
            if c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn with_newline(payload: &[u8]) -> Vec<u8> {
    let mut stdin = payload.to_vec();
    if stdin.last().is_some_and(|&last| last != b'\n') {
        stdin.push(b'\n');
    }
    stdin
}

fn member_lines(members: &[HandlerMember]) -> Vec<u8> {
    let clean = |value: &str| value.replace('\t', "\\t").replace('\n', "\\n");
    let mut out = String::new();
    for member in members {
        let tags: Vec<String> = member
            .tags
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            clean(&member.name),
            member.addr,
            clean(member.tags.get("role").map(String::as_str).unwrap_or("")),
            clean(&tags.join(","))
        ));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(spec: &str) -> Vec<(String, Option<String>)> {
        Handler::parse(spec)
            .unwrap()
            .filters
            .into_iter()
            .map(|f| (f.kind, f.name))
            .collect()
    }

    #[test]
    fn parses_specs_as_serf_agent() {
        assert_eq!(parsed("echo hi"), vec![("*".into(), None)]);
        assert_eq!(
            parsed("user:deploy=./deploy.sh"),
            vec![("user".into(), Some("deploy".into()))]
        );
        assert_eq!(
            parsed("member-join,member-leave=./x a=b"),
            vec![("member-join".into(), None), ("member-leave".into(), None)]
        );
        assert_eq!(
            Handler::parse("user:deploy=./x a=b").unwrap().command,
            "./x a=b"
        );
        let error = Handler::parse("member-joined=x").unwrap_err();
        assert!(error.to_string().contains("\"member-joined\""), "{error}");
        assert!(Handler::parse("user=").is_err());
    }

    #[test]
    fn commands_split_into_words_as_a_posix_shell_splits_them() {
        let split = |command: &str| split_words(command).expect(command);
        assert_eq!(split("  /bin/echo  a\tb\n"), ["/bin/echo", "a", "b"]);
        assert_eq!(
            split("/h/create_db --name 'my db' \"x \\\"y\\\" \\$HOME\""),
            ["/h/create_db", "--name", "my db", "x \"y\" $HOME"]
        );
        // No expansion, no operators: they are ordinary characters.
        assert_eq!(
            split("a $HOME ~ * ; b|c"),
            ["a", "$HOME", "~", "*", ";", "b|c"]
        );
        // Quotes join with what touches them; empty quotes make empty words.
        assert_eq!(split("a'b c'd \"\" ''"), ["ab cd", "", ""]);
        // A backslash escapes one character outside quotes, none inside single quotes, and
        // only $ ` " \\ and newline inside double quotes.
        assert_eq!(split(r#"a\ b 'c\d' "e\f\\g""#), ["a b", r"c\d", r"e\f\g"]);
        assert_eq!(split("a\\\nb"), ["ab"]);
        assert_eq!(split(""), Vec::<String>::new());
        for bad in ["'open", "\"open", "\"a\\\"", "end\\"] {
            assert!(split_words(bad).is_err(), "{bad:?}");
        }
        assert!(Handler::parse("user:x=/bin/echo 'open").is_err());
    }

    #[test]
    fn filters_by_kind_and_name() {
        let user = HandlerEvent::User {
            name: "deploy".into(),
            ltime: 1,
            payload: vec![],
        };
        assert!(Handler::parse("user:deploy=x").unwrap().wants(&user));
        assert!(!Handler::parse("user:other=x").unwrap().wants(&user));
        assert!(!Handler::parse("query=x").unwrap().wants(&user));
        assert!(Handler::parse("x").unwrap().wants(&user));
    }

    #[test]
    fn link_env_variables_and_our_secrets_are_withheld() {
        let check = |name: &str, withheld: bool| {
            assert_eq!(is_withheld(OsStr::new(name)), withheld, "{name}");
        };
        check("MYSQL_ENV_MARIADB_ROOT_PASSWORD", true);
        check("SERF_1_ENV_PATH", true);
        check("DB_ENV_X", true);
        check("AMB_ENCRYPT", true);
        check("AMB_RPC_AUTH", true);
        check("PATH", false);
        check("MYSQL_PORT_3306_TCP", false);
        check("MYSQL_NAME", false);
        check("AMB_BACKEND_HOST", false);
        check("AMB_ENCRYPTED", false);
        check("_ENV_X", false);
        check("MYSQL_ENV_", false);
        assert!(is_withheld(OsStr::from_bytes(b"DB\xff_ENV_PASS")));
    }

    #[test]
    fn logged_output_is_bounded() {
        assert_eq!(excerpt(b"ok\n"), "ok");
        assert_eq!(excerpt(b"a\nb"), "a\nb");
        let long = "x".repeat(1000);
        assert_eq!(
            excerpt(long.as_bytes()),
            format!("{}… [1000 bytes, 1 lines in all]", "x".repeat(256))
        );
        let many = "line\n".repeat(100);
        let logged = excerpt(many.as_bytes());
        assert_eq!(logged.lines().count(), LOG_MAX_LINES, "{logged}");
        assert!(
            logged.ends_with("line [500 bytes, 100 lines in all]"),
            "{logged}"
        );
        // A cut never splits a character.
        let wide = "é".repeat(200);
        assert!(excerpt(wide.as_bytes()).starts_with(&"é".repeat(128)));
        assert!(excerpt(&vec![b'y'; 8 * 1024]).len() < 2 * LOG_MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn runs_with_serf_environment_and_stdin() {
        let handlers = [Handler::parse(
            "user:create_db=printf '%s|%s|%s|%s|%s|' \"$SERF_EVENT\" \"$SERF_USER_EVENT\" \"$SERF_SELF_ROLE\" \"$SERF_TAG_SERVICE_ADDR\" \"$AMB_BACKEND_PORT\"; cat",
        )
        .unwrap()];
        let me = SelfInfo {
            name: "amb".into(),
            tags: BTreeMap::from([
                ("role".into(), "3306".into()),
                ("service-addr".into(), "10.0.0.1:3306".into()),
            ]),
            extra_env: vec![("AMB_BACKEND_PORT".into(), "3306".into())],
        };
        let event = HandlerEvent::User {
            name: "create_db".into(),
            ltime: 4,
            payload: b"wordpress".to_vec(),
        };
        let output = dispatch(&handlers, &me, &event).await.unwrap();
        assert_eq!(
            String::from_utf8(output).unwrap(),
            "user|create_db|3306|10.0.0.1:3306|3306|wordpress\n"
        );
    }

    #[tokio::test]
    async fn member_events_get_one_line_per_member_and_failures_are_contained() {
        let handlers = [
            Handler::parse("member-join=cat").unwrap(),
            Handler::parse("member-join=exit 3").unwrap(),
        ];
        let event = HandlerEvent::Member {
            kind: "member-join",
            members: vec![HandlerMember {
                name: "a\tb".into(),
                addr: "127.0.0.1".into(),
                tags: BTreeMap::from([("role".into(), "web".into()), ("dc".into(), "x".into())]),
            }],
        };
        let output = dispatch(&handlers, &SelfInfo::default(), &event).await;
        assert_eq!(
            String::from_utf8(output.unwrap()).unwrap(),
            "a\\tb\t127.0.0.1\tweb\tdc=x,role=web\n"
        );
    }
}
