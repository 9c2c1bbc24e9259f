//! Go's flag syntax on our command line. Go's `serf` takes long flags with one dash
//! (`-rpc-addr=…`, `-format json`, `-coalesce=false`); clap takes `--`. [`normalize`] rewrites
//! every single-dash word that names a long flag of the command being parsed (or a global one)
//! to the `--` form, and a boolean switch given a value (`-replay=true`, `-detailed=false`) to
//! the switch or nothing, so scripts written for `serf` run unchanged. One-letter flags (`-h`),
//! unknown words and everything after `--` are left to clap.

use std::ffi::OsString;

use clap::{ArgAction, Command};

/// `args` (with `argv[0]` first) with Go-style flags rewritten for clap; see the module docs.
pub(crate) fn normalize(args: &[OsString], root: &Command) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.iter();
    out.extend(words.next().cloned());
    let mut command = root;
    let (mut positional_seen, mut value_next, mut verbatim) = (false, false, false);
    for word in words {
        let Some(text) = word.to_str() else {
            out.push(word.clone());
            continue;
        };
        if verbatim || std::mem::take(&mut value_next) {
            out.push(word.clone());
            continue;
        }
        if text == "--" {
            verbatim = true;
            out.push(word.clone());
            continue;
        }
        let Some(body) = text.strip_prefix("--").or_else(|| text.strip_prefix('-')) else {
            if !positional_seen {
                if let Some(sub) = command.find_subcommand(text) {
                    command = sub;
                    out.push(word.clone());
                    continue;
                }
            }
            positional_seen = true;
            out.push(word.clone());
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        let flag = [command, root].into_iter().find_map(|command| {
            command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(name))
        });
        let Some(flag) = flag.filter(|_| name.chars().count() > 1) else {
            out.push(word.clone());
            continue;
        };
        let is_switch = matches!(flag.get_action(), ArgAction::SetTrue);
        match (is_switch, value) {
            (true, Some(value)) => match super::cmd::client::parse_go_bool(value) {
                Ok(true) => out.push(format!("--{name}").into()),
                Ok(false) => {}
                Err(_) => out.push(format!("--{name}={value}").into()),
            },
            (_, Some(value)) => out.push(format!("--{name}={value}").into()),
            (true, None) => out.push(format!("--{name}").into()),
            (false, None) => {
                value_next = !flag.is_require_equals_set();
                out.push(format!("--{name}").into());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction, Command};

    fn root() -> Command {
        Command::new("amb-serf")
            .arg(Arg::new("log-level").long("log-level").global(true))
            .subcommand(
                Command::new("event")
                    .arg(Arg::new("rpc-addr").long("rpc-addr"))
                    .arg(
                        Arg::new("coalesce")
                            .long("coalesce")
                            .num_args(0..=1)
                            .require_equals(true),
                    )
                    .arg(Arg::new("name"))
                    .arg(Arg::new("payload")),
            )
            .subcommand(
                Command::new("members")
                    .arg(
                        Arg::new("detailed")
                            .long("detailed")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(Arg::new("format").long("format")),
            )
    }

    #[track_caller]
    fn check(args: &[&str], expected: &[&str]) {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let out = super::normalize(&args, &root());
        let out: Vec<&str> = out.iter().map(|arg| arg.to_str().unwrap()).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        check(
            &[
                "serf",
                "event",
                "-rpc-addr=127.0.0.1:1",
                "-coalesce=false",
                "deploy",
            ],
            &[
                "serf",
                "event",
                "--rpc-addr=127.0.0.1:1",
                "--coalesce=false",
                "deploy",
            ],
        );
        check(
            &["serf", "members", "-format", "json", "-log-level", "debug"],
            &[
                "serf",
                "members",
                "--format",
                "json",
                "--log-level",
                "debug",
            ],
        );
    }

    #[test]
    fn switches_take_go_booleans() {
        check(
            &["s", "members", "-detailed=true"],
            &["s", "members", "--detailed"],
        );
        check(&["s", "members", "-detailed=false"], &["s", "members"]);
        check(
            &["s", "members", "-detailed"],
            &["s", "members", "--detailed"],
        );
    }

    #[test]
    fn values_short_flags_and_unknown_words_are_left_alone() {
        // A value that looks like a flag, a one-letter flag, an unknown flag, after `--`.
        check(
            &["s", "members", "-format", "-detailed", "-h", "-nope"],
            &["s", "members", "--format", "-detailed", "-h", "-nope"],
        );
        check(
            &["s", "event", "x", "--", "-rpc-addr"],
            &["s", "event", "x", "--", "-rpc-addr"],
        );
    }
}
