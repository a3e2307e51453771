//! `hangar`: one binary for every Hangar component and for operators.
//!
//! - `hangar dev` runs controller + drone + proxy in one process on an embedded store ([`dev`]);
//! - `hangar controller|drone|proxy` run one component as a standalone process ([`serve`]);
//! - `hangar connect|status|terminate|...` are clients of the controller's HTTP API ([`cli`]).
//!
//! This crate is the only place with clap, signal handling and logging setup; every decision about
//! backends lives in the component crates.

mod cli;
#[cfg(test)]
mod config_docs;
mod config_file;
mod container_watchdog;
mod database;
mod dev;
mod dns;
mod legacy_env;
mod logging;
mod proxy_tls;
mod serve;
mod shutdown;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use cli::{Client, NoArgs, OutputArgs};
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the controller's reconnect path serves about 9 % more calls
/// per second with it; the proxy's CPU per request is the same within the noise, and an idle
/// WebSocket tunnel holds about 1 KB more (freed pages are kept until the next allocation).
/// Measured in BENCHMARKS.md, "The allocator".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Run session backends: one isolated process per key, started on demand, reached through a proxy",
    after_help = cli::EXIT_STATUS_HELP
)]
struct Cli {
    /// Format of the log lines on stderr. Default: text (`HANGAR_LOG_JSON=1` still selects json).
    #[arg(long, global = true, value_enum, env = "HANGAR_LOG_FORMAT")]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// Server commands run components; the others are clients of a controller (`--controller`,
/// `--timeout`, `--json`: [`Client`]) or local tools.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run controller, drone and proxy in one process on an embedded store (the quickstart).
    Dev(dev::DevArgs),
    /// Run a standalone controller.
    Controller(serve::ControllerArgs),
    /// Run a standalone drone.
    Drone(serve::DroneArgs),
    /// Run a standalone proxy.
    Proxy(serve::ProxyArgs),
    /// Run an ACME DNS-01 responder (answers `_acme-challenge` TXT queries for the proxies' ACME orders).
    Dns(dns::DnsArgs),
    /// Apply the database schema migrations (PostgreSQL URL or SQLite file) and exit.
    Migrate(database::MigrateArgs),
    /// Get or create the backend of a key and print its URL.
    Connect(Client<cli::connect::ConnectArgs>),
    /// List backends, newest first (filter by status, cluster, key).
    #[command(visible_alias = "ls")]
    List(Client<cli::list::ListArgs>),
    /// Print the status of a backend with its key, drone and history (or follow it with --follow).
    Status(Client<cli::backend::StatusArgs>),
    /// Print a backend's output (stdout and stderr, as kept by its drone); -f to follow it.
    Logs(Client<cli::logs::LogsArgs>),
    /// Terminate a backend (SIGTERM then SIGKILL after a grace period; --hard for SIGKILL now).
    Terminate(Client<cli::backend::TerminateArgs>),
    /// Revoke the connection tokens a user holds for a backend.
    Revoke(Client<cli::backend::RevokeArgs>),
    /// Print the drones and proxies of a cluster.
    ClusterState(Client<cli::cluster::ClusterStateArgs>),
    /// Stop scheduling new backends on a drone (its running backends keep running).
    Drain(Client<cli::cluster::DrainArgs>),
    /// Record every live backend of a drone that is gone for good as lost, freeing their keys.
    MarkLost(Client<cli::operator::MarkLostArgs>),
    /// Stop renewing a backend's key lease, so its drone terminates it and the key expires.
    PreventRenew(Client<cli::operator::PreventRenewArgs>),
    /// Plane's `plane admin` commands, flags and output (connect, terminate, drain, status,
    /// cluster-state, backend-status).
    Admin(cli::admin::AdminArgs),
    /// List the drones and proxies attached to a controller (Plane's `db-cli list-nodes`).
    ListNodes(Client<cli::inspect::ListNodesArgs>),
    /// Explain which backends of a drone the sweeper would terminate now (Plane's `db-cli
    /// termination-candidates`).
    TerminationCandidates(Client<cli::inspect::TerminationCandidatesArgs>),
    /// Print every event of the controllers' event bus as it happens (Plane's `db-cli events`).
    Events(Client<NoArgs>),
    /// Manage warm pools: backends kept started for connects to claim.
    WarmPool(Client<cli::warm_pool::WarmPoolArgs>),
    /// Print the version of this binary.
    Version(VersionArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cli::docs::CompletionsArgs),
    /// Write man pages for hangar and each of its commands.
    Man(cli::docs::ManArgs),
    /// Started by an ephemeral Docker drone: removes its containers once it is gone.
    #[command(name = container_watchdog::COMMAND, hide = true)]
    ContainerWatchdog(container_watchdog::WatchdogArgs),
}

#[derive(Debug, Args)]
struct VersionArgs {
    #[command(flatten)]
    output: OutputArgs,
}

impl Command {
    /// Whether this command runs components (and logs at info) rather than being a client command
    /// or a local tool (which log only warnings so their output stays clean).
    fn runs_components(&self) -> bool {
        match self {
            Command::Dev(_)
            | Command::Controller(_)
            | Command::Drone(_)
            | Command::Proxy(_)
            | Command::Dns(_)
            | Command::ContainerWatchdog(_) => true,
            Command::Connect(_)
            | Command::List(_)
            | Command::Status(_)
            | Command::Logs(_)
            | Command::Terminate(_)
            | Command::Revoke(_)
            | Command::ClusterState(_)
            | Command::Drain(_)
            | Command::MarkLost(_)
            | Command::PreventRenew(_)
            | Command::Admin(_)
            | Command::ListNodes(_)
            | Command::TerminationCandidates(_)
            | Command::Events(_)
            | Command::WarmPool(_)
            | Command::Migrate(_)
            | Command::Version(_)
            | Command::Completions(_)
            | Command::Man(_) => false,
        }
    }

    /// Whether errors are printed as JSON (`--json`).
    fn json_errors(&self) -> bool {
        match self {
            Command::Connect(c) => c.client.output.json,
            Command::List(c) => c.client.output.json,
            Command::Status(c) => c.client.output.json,
            Command::Terminate(c) => c.client.output.json,
            Command::Revoke(c) => c.client.output.json,
            Command::ClusterState(c) => c.client.output.json,
            Command::Drain(c) => c.client.output.json,
            Command::MarkLost(c) => c.client.output.json,
            Command::PreventRenew(c) => c.client.output.json,
            Command::ListNodes(c) => c.client.output.json,
            Command::TerminationCandidates(c) => c.client.output.json,
            Command::Events(c) => c.client.output.json,
            Command::Logs(c) => c.client.output.json,
            Command::WarmPool(c) => c.client.output.json,
            Command::Version(v) => v.output.json,
            Command::Dev(_)
            | Command::Controller(_)
            | Command::Drone(_)
            | Command::Proxy(_)
            | Command::Dns(_)
            | Command::Migrate(_)
            | Command::Admin(_)
            | Command::Completions(_)
            | Command::Man(_)
            | Command::ContainerWatchdog(_) => false,
        }
    }
}

/// The command line definition, as `--help`, completions and man pages show it: every default is
/// written the same way, as a `Default: …` sentence in the flag's text (server flags have their
/// defaults in the component's config, so clap cannot show them), and the exit statuses at the end.
fn command() -> clap::Command {
    defaults_in_text(Cli::command())
}

/// Moves clap's `[default: …]` of each flag into its text as `Default: …`.
fn defaults_in_text(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let defaults = arg.get_default_values();
            if defaults.is_empty()
                || arg.is_hide_default_value_set()
                || !arg.get_action().takes_values()
            {
                return arg;
            }
            let shown: Vec<String> = defaults
                .iter()
                .map(|v| match v.to_string_lossy() {
                    v if v.is_empty() => "\"\"".to_string(),
                    v => v.into_owned(),
                })
                .collect();
            // Without a final period, as clap's derive writes one-sentence doc comments.
            let sentence = format!("Default: {}", shown.join(","));
            let with_default = |text: Option<&clap::builder::StyledStr>| {
                let text = text.map(ToString::to_string).unwrap_or_default();
                let text = text.trim_end();
                if text.is_empty() || text.ends_with('.') {
                    format!("{text} {sentence}").trim_start().to_string()
                } else {
                    format!("{text}. {sentence}")
                }
            };
            let help = with_default(arg.get_help());
            let long_help = arg.get_long_help().map(|h| with_default(Some(h)));
            let arg = arg.help(help).hide_default_value(true);
            match long_help {
                Some(long) => arg.long_help(long),
                None => arg,
            }
        })
        .mut_subcommands(defaults_in_text)
}

/// Parses the command line; a usage error is printed (as JSON when `--json` is among the
/// arguments) and ends the process with exit status 2.
fn parse(args: &[String]) -> Cli {
    let parsed = command()
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches));
    match parsed {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && args.iter().any(|a| a == "--json") => {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            let message = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!(
                "{}",
                serde_json::json!({"error": {"kind": "Usage", "message": message}})
            );
            std::process::exit(i32::from(cli::exit::USAGE));
        }
        Err(e) => e.exit(),
    }
}

fn main() -> ExitCode {
    hangar_types::set_git_hash(env!("HANGAR_GIT_HASH"));
    let args: Vec<String> = std::env::args().collect();
    // Before anything reads the environment, and while this is the only thread.
    let renamed = legacy_env::apply(&args);
    let cli = parse(&args);
    let verbosity = if cli.command.runs_components() {
        logging::Verbosity::Component
    } else {
        logging::Verbosity::Client
    };
    let log_format = logging::resolve_format(
        cli.log_format,
        std::env::var("HANGAR_LOG_JSON").ok().as_deref(),
    );
    if let Err(e) = logging::init(verbosity, log_format) {
        eprintln!("Error: could not set up logging: {e:#}");
        return ExitCode::FAILURE;
    }
    for warning in renamed {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_errors = cli.command.json_errors();
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => cli::report_failure(&e, json_errors),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Controller(args) => serve::run_controller(args).await,
        Command::Drone(args) => serve::run_drone(args).await,
        Command::Proxy(args) => serve::run_proxy(args).await,
        Command::Dns(args) => dns::run_dns(args).await,
        Command::Migrate(args) => database::run_migrate(args).await,
        Command::ContainerWatchdog(args) => container_watchdog::run(args).await,
        Command::Connect(c) => c.run(cli::connect::run).await,
        Command::List(c) => c.run(cli::list::list).await,
        Command::Logs(c) => c.run(cli::logs::run).await,
        Command::Status(c) => c.run(cli::backend::status).await,
        Command::Terminate(c) => c.run(cli::backend::terminate).await,
        Command::Revoke(c) => c.run(cli::backend::revoke).await,
        Command::ClusterState(c) => c.run(cli::cluster::cluster_state).await,
        Command::Drain(c) => c.run(cli::cluster::drain).await,
        Command::MarkLost(c) => c.run(cli::operator::mark_lost).await,
        Command::PreventRenew(c) => c.run(cli::operator::prevent_renew).await,
        Command::Admin(args) => {
            let client = args.connection.client()?;
            Ok(cli::admin::run(&client, args).await)
        }
        Command::ListNodes(c) => c.run(cli::inspect::list_nodes).await,
        Command::TerminationCandidates(c) => c.run(cli::inspect::termination_candidates).await,
        Command::Events(c) => cli::inspect::events(&c.client.connection, c.client.output()).await,
        Command::WarmPool(c) => c.run(cli::warm_pool::run).await,
        Command::Version(v) => Ok(cli::version(cli::Output {
            json: v.output.json,
        })),
        Command::Completions(args) => Ok(cli::docs::completions(args, command())),
        Command::Man(args) => cli::docs::man(args, command()),
    }
}

/// Parses `flags` as one command's arguments `A` (the unit tests of each command's flags).
#[cfg(test)]
fn parse_flags<A: clap::Args + clap::FromArgMatches>(flags: &[&str]) -> Result<A, clap::Error> {
    let command = A::augment_args(clap::Command::new("hangar"));
    A::from_arg_matches(
        &command.try_get_matches_from(std::iter::once("hangar").chain(flags.iter().copied()))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The client flags of a client command, or `None` for other commands.
    fn client_flags(cli: &Cli) -> Option<&cli::ClientArgs> {
        match &cli.command {
            Command::Status(c) => Some(&c.client),
            Command::List(c) => Some(&c.client),
            _ => None,
        }
    }

    #[test]
    fn client_flags_belong_to_client_commands() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let cli = parse(&["hangar", "status", "abc"]).unwrap();
        let flags = client_flags(&cli).unwrap();
        assert_eq!(
            flags.connection.controller.as_str(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(flags.connection.timeout, 30);
        assert!(!flags.output.json);
        let cli = parse(&[
            "hangar",
            "status",
            "abc",
            "--json",
            "--controller",
            "http://tok@ctrl:9000",
            "--timeout",
            "5",
        ])
        .unwrap();
        let flags = client_flags(&cli).unwrap();
        assert!(flags.output.json);
        assert_eq!(
            flags.connection.controller.as_str(),
            "http://tok@ctrl:9000/"
        );
        assert_eq!(flags.connection.timeout, 5);
        // `host:port` means http://host:port.
        let cli = parse(&["hangar", "ls", "--controller", "127.0.0.1:8080"]).unwrap();
        assert_eq!(
            client_flags(&cli).unwrap().connection.controller.as_str(),
            "http://127.0.0.1:8080/"
        );
        assert!(parse(&["hangar", "status", "abc", "--controller", "not a url"]).is_err());
        assert!(parse(&["hangar", "status", "abc", "--timeout", "0"]).is_err());
        assert!(!cli.command.runs_components());
        // Not on server commands, nor before the command.
        assert!(parse(&["hangar", "dev", "--json"]).is_err());
        assert!(parse(&["hangar", "drone", "--controller", "http://x"]).is_err());
        assert!(parse(&["hangar", "--controller", "http://x", "status", "abc"]).is_err());
        let cli = parse(&["hangar", "dev", "--in-memory"]).unwrap();
        assert!(cli.command.runs_components());
        // Plane's admin takes them before its subcommand too.
        assert!(parse(&["hangar", "admin", "--controller", "http://x:1", "status"]).is_ok());
        assert!(parse(&["hangar", "admin", "status", "--controller", "http://x:1"]).is_ok());
        assert!(parse(&["hangar", "version", "--json"]).is_ok());
    }

    #[test]
    fn defaults_are_shown_in_the_text_only() {
        fn check(command: &clap::Command, path: &str) {
            for arg in command.get_arguments() {
                if arg.get_default_values().is_empty() || !arg.get_action().takes_values() {
                    continue;
                }
                assert!(
                    arg.is_hide_default_value_set(),
                    "{path} --{:?}",
                    arg.get_long()
                );
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    help.contains("Default: "),
                    "{path} {:?}: {help}",
                    arg.get_long()
                );
            }
            for sub in command.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        let command = command();
        check(&command, "hangar");
        let mut command = command;
        let help = command
            .find_subcommand_mut("connect")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("Key namespace. Default: \"\"\n"), "{help}");
    }

    #[test]
    fn forward_auth_flags_on_dev_and_controller() {
        let cli = Cli::try_parse_from([
            "hangar",
            "dev",
            "--forward-auth",
            "https://auth.internal/check",
            "--forward-auth-ca-cert",
            "/etc/ca.pem",
        ])
        .unwrap();
        let Command::Dev(args) = cli.command else {
            panic!("not dev");
        };
        assert_eq!(
            args.forward_auth.unwrap().as_str(),
            "https://auth.internal/check"
        );
        // A CA certificate without an auth URL is refused.
        assert!(Cli::try_parse_from(["hangar", "dev", "--forward-auth-ca-cert", "/x"]).is_err());
        let cli = Cli::try_parse_from([
            "hangar",
            "controller",
            "--db",
            "x.db",
            "--forward-auth",
            "ftp://auth.internal/",
        ])
        .unwrap();
        let Command::Controller(args) = cli.command else {
            panic!("not controller");
        };
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(err.contains("forward_auth"), "{err}");
        assert!(Cli::try_parse_from(["hangar", "admin", "status"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "events"]).is_ok());
        assert!(
            Cli::try_parse_from(["hangar", "termination-candidates", "--cluster", "c:1"]).is_err()
        );
    }

    #[test]
    fn unknown_commands_and_bad_ids_are_refused() {
        assert!(Cli::try_parse_from(["hangar", "frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "status", "Bad_Id"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "terminate"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "drain", "localhost:9090", "not-a-drone"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "drain", "localhost:9090", "dr-abc"]).is_ok());
        let warm = [
            "hangar",
            "warm-pool",
            "set",
            "p",
            "--size",
            "2",
            "--command",
            "sleep 9",
        ];
        assert!(Cli::try_parse_from(warm).is_ok());
        assert!(Cli::try_parse_from(["hangar", "warm-pool", "set", "p", "--size", "2"]).is_err());
        assert!(Cli::try_parse_from([
            "hangar",
            "warm-pool",
            "set",
            "p",
            "--size",
            "-1",
            "--image",
            "x"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["hangar", "warm-pool", "delete", "Bad Name"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "warm-pool", "list", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "warm-pool", "--json", "list"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "mark-lost", "localhost:9090", "dr-abc"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "mark-lost", "localhost:9090", "bk-abc"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "prevent-renew", "ba-abc"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "prevent-renew", "Bad_Id"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "migrate"]).is_err());
    }
}
