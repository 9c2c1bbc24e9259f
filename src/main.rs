//! `amb-serf`: a Docker ambassador that forwards linked ports and advertises them in Serf.
//!
//! `main` parses flags, installs the tracing subscriber, runs one command and maps its error to
//! an exit code: 2 for bad usage or configuration ([`cmd::UsageError`]), 1 for a runtime failure.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

mod cmd;
mod config_file;
mod dataplane;
mod duration;
mod environment;
mod go_flags;
mod logs;
mod member;
mod metrics;
mod nameserver;
mod registry;
mod reload;

#[derive(Debug, Parser)]
#[command(
    name = "amb-serf",
    version,
    about = "Docker ambassador: forwards linked ports and advertises them in a Serf cluster",
    long_about = None,
    after_help = "Examples:\n  \
        docker run -d --link mysql:mysql --link serf_1:serf_1 -p 3306:3306 amb-serf\n  \
        amb-serf run --forward 3306=mysql:3306 --join serf_1:7946"
)]
struct Cli {
    /// Log level or filter (also RUST_LOG), e.g. `info` or `serf=debug,info`.
    #[arg(long, env = "AMB_LOG_LEVEL", global = true, value_parser = parse_log_filter)]
    log_level: Option<String>,

    /// Log output format.
    #[arg(long, env = "AMB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward linked ports and advertise them (the default command).
    Run(Box<cmd::run::Args>),
    /// List the members of a Serf cluster (like `serf members`), optionally watching changes.
    Members(cmd::members::Args),
    /// Print the address of a live, healthy member that advertises a role.
    Resolve(cmd::resolve::Args),
    /// A plain Serf-compatible agent (like `serf agent`), e.g. to seed a cluster.
    Agent(cmd::agent::Args),
    /// Exit 0 if a running amb-serf's /healthz answers 200 (for Docker's HEALTHCHECK).
    Health(cmd::health::Args),
    /// Serve roles advertised in the cluster on local ports, following membership live.
    Connect(Box<cmd::connect::Args>),
    /// Send a custom event through the Serf cluster (`serf event`).
    Event(cmd::event::Args),
    /// Send a query to the Serf cluster (`serf query`).
    Query(cmd::query::Args),
    /// Tell the agent to join the cluster (`serf join`).
    Join(cmd::membership::JoinArgs),
    /// Make the agent leave the cluster gracefully and shut down (`serf leave`).
    Leave(cmd::membership::LeaveArgs),
    /// Force a member into the "left" state (`serf force-leave`).
    ForceLeave(cmd::membership::ForceLeaveArgs),
    /// Manage the cluster's gossip encryption keyring (`serf keys`).
    Keys(cmd::keys::Args),
    /// Generate a new encryption key (`serf keygen`).
    Keygen(cmd::keys::KeygenArgs),
    /// Modify the tags of a running agent (`serf tags`).
    Tags(cmd::tags::Args),
    /// Debugging information about the agent (`serf info`).
    Info(cmd::info::Args),
    /// Stream the agent's log and events (`serf monitor`); the level is `--log-level`.
    Monitor(cmd::monitor::Args),
    /// Estimate the round-trip time between two nodes (`serf rtt`).
    Rtt(cmd::info::RttArgs),
    /// Test the network reachability of the cluster's members (`serf reachability`).
    Reachability(cmd::reachability::Args),
    /// Print the version and the Serf protocol range (`serf version`).
    Version(cmd::version::Args),
}

/// The levels a filter directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A log filter whose every directive is a level or `TARGET=LEVEL` (a span filter is left to
/// the filter's own parser): a typo such as `inf` would otherwise read as a target name and
/// silently turn logging off. Go's level name `err` (`serf agent -log-level=err`) is `error`.
fn parse_log_filter(value: &str) -> Result<String, String> {
    let is_level = |level: &str| LEVELS.contains(&level.trim().to_ascii_lowercase().as_str());
    let go_level = |level: &str| {
        if level.trim().eq_ignore_ascii_case("err") {
            "error".to_owned()
        } else {
            level.to_owned()
        }
    };
    let mut directives = Vec::new();
    for directive in value.split(',').map(str::trim) {
        let directive = match directive.split_once('=') {
            Some((target, level)) if !directive.contains('[') => {
                format!("{target}={}", go_level(level))
            }
            _ => go_level(directive),
        };
        let valid = if directive.contains('[') {
            tracing_subscriber::EnvFilter::try_new(&directive).is_ok()
        } else {
            match directive.split_once('=') {
                Some((target, level)) => !target.trim().is_empty() && is_level(level),
                None => is_level(&directive),
            }
        };
        if !valid {
            return Err(format!(
                "{directive:?} is neither a level ({}) nor TARGET=LEVEL",
                LEVELS.join(", ")
            ));
        }
        directives.push(directive);
    }
    Ok(directives.join(","))
}

fn init_tracing(level: Option<&str>, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let filter = reload::log_filter(filter);
    let fmt = match format {
        LogFormat::Text => fmt
            .fmt_fields(logs::bounded_fields())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    // `serf monitor` has its own level filter; keep DEBUG and above of our own code for it, but
    // not the forwarder's per-connection DEBUG span and lines: always enabled, they cost every
    // connection a span in the registry and a formatted line (`RUST_LOG=proxy=debug` shows them).
    let monitor = logs::MonitorLayer::new().with_filter(EnvFilter::new(
        "info,serf=debug,amb_serf=debug,registrar=debug",
    ));
    tracing_subscriber::registry()
        .with(fmt)
        .with(monitor)
        .init();
}

/// Parses the command line. With no subcommand, `amb-serf [FLAGS]` is `amb-serf run [FLAGS]`, so
/// `docker run … amb-serf --forward 3306=mysql:3306` works as users expect. Go's single-dash
/// long flags are accepted ([`go_flags`]). Invoked as `serf` (a symlink), the binary is the
/// `serf` command line: a subcommand is required, as Go's `serf` requires one.
fn parse_cli() -> (Cli, Command) {
    use clap::{CommandFactory, FromArgMatches};
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Go's `serf -v` and `serf --version` are `serf version`.
    if invoked_as_serf(&args)
        && args.len() == 2
        && ["-v", "-version", "--version"].contains(&args[1].to_str().unwrap_or_default())
    {
        args[1] = "version".into();
    }
    let root = Cli::command();
    let parse = |args: &[std::ffi::OsString]| {
        let normalized = go_flags::normalize(args, &root);
        if invoked_as_serf(args) {
            let matches = Cli::command()
                .subcommand_required(true)
                .arg_required_else_help(true)
                .try_get_matches_from(normalized)?;
            Cli::from_arg_matches(&matches)
        } else {
            Cli::try_parse_from(normalized)
        }
    };
    let first = parse(&args);
    if let Ok(Cli {
        command: Some(_), ..
    }) = &first
    {
        let mut cli = first.expect("matched Ok above");
        let command = cli.command.take().expect("matched Some above");
        return (cli, command);
    }
    if let Err(error) = &first {
        use clap::error::ErrorKind;
        let asked_for_output = matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        // A first word that is not a flag (nor a global flag's value) was meant as a
        // subcommand: report that error (e.g. a bad AMB_* value for `… --log-format json run`).
        let names_a_subcommand = first_word(&args).is_some_and(|arg| !arg.starts_with('-'));
        if asked_for_output || names_a_subcommand || invoked_as_serf(&args) {
            fail(error, &args);
        }
    }
    let mut with_run = args.clone();
    with_run.insert(1.min(with_run.len()), "run".into());
    let mut cli = parse(&with_run).unwrap_or_else(|error| fail(&error, &args));
    let command = cli.command.take().expect("`run` was inserted");
    (cli, command)
}

/// Whether the binary was started under the name `serf` (argv[0]'s file name).
fn invoked_as_serf(args: &[std::ffi::OsString]) -> bool {
    args.first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .is_some_and(|name| name == "serf")
}

/// Exits with clap's `error` (code 2, or 0 for help); when a bad value came from an `AMB_*`
/// variable rather than the command line, the message names the variable, which the user set,
/// not only the flag it stands for.
fn fail(error: &clap::Error, args: &[std::ffi::OsString]) -> ! {
    use clap::error::{ContextKind, ContextValue};
    if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
    ) {
        let long = arg.split_whitespace().next().unwrap_or("");
        let on_command_line = args.iter().filter_map(|arg| arg.to_str()).any(|arg| {
            arg == value
                || arg
                    .strip_prefix(long)
                    .and_then(|rest| rest.strip_prefix('='))
                    == Some(value.as_str())
        });
        if let Some(var) = env_of(long).filter(|_| !on_command_line) {
            let rendered = error.render().to_string();
            let rendered = rendered.trim_end();
            eprintln!("{rendered}\n\nThe value came from the environment: {var}={value:?}");
            std::process::exit(2);
        }
    }
    error.exit()
}

/// The environment variable of the flag `--long` in any command, if it has one.
fn env_of(long: &str) -> Option<String> {
    use clap::CommandFactory;
    let name = long.strip_prefix("--")?;
    let root = Cli::command();
    let mut commands = vec![&root];
    while let Some(command) = commands.pop() {
        if let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(name))
        {
            return Some(arg.get_env()?.to_string_lossy().into_owned());
        }
        commands.extend(command.get_subcommands());
    }
    None
}

/// The first argument after the global flags and their values (`--log-level info`).
fn first_word(args: &[std::ffi::OsString]) -> Option<&str> {
    const GLOBALS_WITH_VALUE: [&str; 2] = ["--log-level", "--log-format"];
    let mut words = args.iter().skip(1).filter_map(|arg| arg.to_str());
    while let Some(word) = words.next() {
        if GLOBALS_WITH_VALUE.contains(&word) {
            words.next();
        } else if !GLOBALS_WITH_VALUE
            .iter()
            .any(|flag| word.starts_with(&format!("{flag}=")))
        {
            return Some(word);
        }
    }
    None
}

/// Keeps glibc from raising its mmap threshold after a large block is freed: a peer can make
/// us decode a message of megabytes (a compressed stream expands up to 20 MiB), and with the
/// default dynamic threshold later blocks of that size come from the heap, which glibc rarely
/// gives back. Fixed at 128 KiB, every large block is its own mapping, unmapped when freed.
fn pin_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Every few seconds, hands free heap pages back to the OS. Memory a peer made us use (its
/// messages are decoded, logged and dropped on several threads) is freed into glibc's
/// per-thread arenas, which it otherwise keeps; trimming an idle heap costs microseconds.
async fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

fn main() -> ExitCode {
    pin_mmap_threshold();
    let (cli, command) = parse_cli();
    // `monitor -log-level` is the level asked of the agent, not of this client's own log.
    let own_level = match command {
        Command::Monitor(_) => None,
        _ => cli.log_level.as_deref(),
    };
    init_tracing(own_level, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("amb-serf: starting the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.spawn(trim_heap());
    // SIGHUP's default action ends the process without leaving the cluster; `serf agent`
    // reloads its configuration instead, and so do the commands that subscribe to `reload`.
    match runtime.block_on(async { signal(SignalKind::hangup()) }) {
        Ok(mut hangups) => {
            runtime.spawn(async move {
                while hangups.recv().await.is_some() {
                    if !reload::request() {
                        tracing::info!("SIGHUP: nothing to reload in this command");
                    }
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot handle SIGHUP"),
    }
    let result = runtime.block_on(async {
        match command {
            Command::Run(args) => cmd::run::run(*args, cli.log_level.as_deref()).await,
            Command::Members(args) => cmd::members::run(args).await,
            Command::Resolve(args) => cmd::resolve::run(args).await,
            Command::Agent(args) => cmd::agent::run(args, cli.log_level.as_deref()).await,
            Command::Health(args) => cmd::health::run(args).await,
            Command::Connect(args) => cmd::connect::run(*args).await,
            Command::Event(args) => cmd::event::run(args).await,
            Command::Query(args) => cmd::query::run(args).await,
            Command::Join(args) => cmd::membership::join(args).await,
            Command::Leave(args) => cmd::membership::leave(args).await,
            Command::ForceLeave(args) => cmd::membership::force_leave(args).await,
            Command::Keys(args) => cmd::keys::run(args).await,
            Command::Keygen(args) => cmd::keys::keygen(args),
            Command::Tags(args) => cmd::tags::run(args).await,
            Command::Info(args) => cmd::info::run(args).await,
            Command::Monitor(args) => cmd::monitor::run(args, cli.log_level.as_deref()).await,
            Command::Rtt(args) => cmd::info::rtt(args).await,
            Command::Reachability(args) => cmd::reachability::run(args).await,
            Command::Version(args) => cmd::version::run(args),
        }
    });
    // Do not wait for blocking work (a DNS lookup of a connection cut by the drain timeout).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<cmd::Reported>().is_some() => ExitCode::from(1),
        Err(error) => {
            eprintln!("amb-serf: {error:#}");
            if error.downcast_ref::<cmd::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_word;

    #[test]
    fn log_filters_name_levels() {
        for good in [
            "info",
            "DEBUG",
            "serf=debug,info",
            "warn, proxy=trace",
            "off",
        ] {
            assert!(super::parse_log_filter(good).is_ok(), "{good}");
        }
        for bad in ["inf", "", "serf=verbose", "=debug", "info,,debug"] {
            let error = super::parse_log_filter(bad).expect_err(bad);
            assert!(error.contains("neither a level"), "{error}");
        }
    }

    #[track_caller]
    fn check(args: &[&str], expected: Option<&str>) {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        assert_eq!(first_word(&args), expected, "{args:?}");
    }

    #[test]
    fn the_first_word_skips_global_flags_and_their_values() {
        check(&["amb-serf"], None);
        check(&["amb-serf", "run"], Some("run"));
        check(&["amb-serf", "--log-format", "json", "run"], Some("run"));
        check(
            &["amb-serf", "--log-level=debug", "members"],
            Some("members"),
        );
        check(&["amb-serf", "--log-format", "json"], None);
        check(
            &["amb-serf", "--forward", "3306=mysql:3306"],
            Some("--forward"),
        );
    }
}
