//! `hangar`: one binary for every Hangar component and for operators.
//!
//! - `hangar dev` runs controller + drone + proxy in one process on an embedded store ([`dev`]);
//! - `hangar controller|drone|proxy` run one component as a standalone process ([`serve`]);
//! - `hangar connect|status|terminate|...` are clients of the controller's HTTP API ([`cli`]).
//!
//! This crate is the only place with clap, signal handling and logging setup; every decision about
//! backends lives in the component crates.

mod cli;
mod config_file;
mod database;
mod dev;
mod dns;
mod logging;
mod proxy_tls;
mod serve;
mod shutdown;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use url::Url;

/// Default controller URL of the client commands (where `hangar dev` listens by default).
const DEFAULT_CONTROLLER_URL: &str = "http://127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Run session backends: one isolated process per key, started on demand, reached through a proxy"
)]
struct Cli {
    /// Controller URL used by client commands. A bearer token may be given as the URL's username
    /// (`http://TOKEN@host:8080`).
    #[arg(long, global = true, env = "HANGAR_CONTROLLER", default_value = DEFAULT_CONTROLLER_URL)]
    controller: Url,
    /// Client commands print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Format of the log lines on stderr [default: text; `HANGAR_LOG_JSON=1` still selects json].
    #[arg(long, global = true, value_enum, env = "HANGAR_LOG_FORMAT")]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

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
    Connect(cli::connect::ConnectArgs),
    /// Print the status of a backend (or follow it with --follow).
    Status(cli::backend::StatusArgs),
    /// Print a backend's output (stdout and stderr, as kept by its drone); -f to follow it.
    Logs(cli::logs::LogsArgs),
    /// Terminate a backend (SIGTERM then SIGKILL after a grace period; --hard for SIGKILL now).
    Terminate(cli::backend::TerminateArgs),
    /// Revoke the connection tokens a user holds for a backend.
    Revoke(cli::backend::RevokeArgs),
    /// Print the drones and proxies of a cluster.
    ClusterState(cli::cluster::ClusterStateArgs),
    /// Stop scheduling new backends on a drone (its running backends keep running).
    Drain(cli::cluster::DrainArgs),
    /// Record every live backend of a drone that is gone for good as lost, freeing their keys.
    MarkLost(cli::operator::MarkLostArgs),
    /// Stop renewing a backend's key lease, so its drone terminates it and the key expires.
    PreventRenew(cli::operator::PreventRenewArgs),
    /// Plane's `plane admin` commands, flags and output (connect, terminate, drain, status,
    /// cluster-state, backend-status).
    Admin(cli::admin::AdminArgs),
    /// List the drones and proxies attached to a controller (Plane's `db-cli list-nodes`).
    ListNodes(cli::inspect::ListNodesArgs),
    /// Explain which backends of a drone the sweeper would terminate now (Plane's `db-cli
    /// termination-candidates`).
    TerminationCandidates(cli::inspect::TerminationCandidatesArgs),
    /// Print every event of the controllers' event bus as it happens (Plane's `db-cli events`).
    Events,
    /// Print the version of this binary.
    Version,
}

impl Command {
    /// Whether this command runs components (and logs at info) rather than being a client command
    /// (which logs only warnings so its output stays clean).
    fn runs_components(&self) -> bool {
        match self {
            Command::Dev(_)
            | Command::Controller(_)
            | Command::Drone(_)
            | Command::Proxy(_)
            | Command::Dns(_) => true,
            Command::Connect(_)
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
            | Command::Events
            | Command::Migrate(_)
            | Command::Version => false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", cli::describe_error(&e));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = cli::Output { json: cli.json };
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Controller(args) => serve::run_controller(args).await,
        Command::Drone(args) => serve::run_drone(args).await,
        Command::Proxy(args) => serve::run_proxy(args).await,
        Command::Dns(args) => dns::run_dns(args).await,
        Command::Migrate(args) => database::run_migrate(args).await,
        Command::Connect(args) => {
            cli::connect::run(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Status(args) => {
            cli::backend::status(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Logs(args) => cli::logs::run(&cli::client(&cli.controller)?, args, out).await,
        Command::Terminate(args) => {
            cli::backend::terminate(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Revoke(args) => {
            cli::backend::revoke(&cli::client(&cli.controller)?, args, out).await
        }
        Command::ClusterState(args) => {
            cli::cluster::cluster_state(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Drain(args) => {
            cli::cluster::drain(&cli::client(&cli.controller)?, args, out).await
        }
        Command::MarkLost(args) => {
            cli::operator::mark_lost(&cli::client(&cli.controller)?, args, out).await
        }
        Command::PreventRenew(args) => {
            cli::operator::prevent_renew(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Admin(args) => Ok(cli::admin::run(&cli::client(&cli.controller)?, args).await),
        Command::ListNodes(args) => {
            cli::inspect::list_nodes(&cli::client(&cli.controller)?, args, out).await
        }
        Command::TerminationCandidates(args) => {
            cli::inspect::termination_candidates(&cli::client(&cli.controller)?, args, out).await
        }
        Command::Events => cli::inspect::events(&cli::client(&cli.controller)?, out).await,
        Command::Version => Ok(cli::version(out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn controller_defaults_and_global_flags() {
        let cli = Cli::try_parse_from(["hangar", "status", "abc"]).unwrap();
        assert_eq!(cli.controller.as_str(), "http://127.0.0.1:8080/");
        assert!(!cli.json);
        let cli = Cli::try_parse_from([
            "hangar",
            "status",
            "abc",
            "--json",
            "--controller",
            "http://tok@ctrl:9000",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.controller.as_str(), "http://tok@ctrl:9000/");
        assert!(
            Cli::try_parse_from(["hangar", "status", "abc", "--controller", "not a url"]).is_err()
        );
        assert!(!cli.command.runs_components());
        let cli = Cli::try_parse_from(["hangar", "dev", "--in-memory"]).unwrap();
        assert!(cli.command.runs_components());
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
        assert!(Cli::try_parse_from(["hangar", "mark-lost", "localhost:9090", "dr-abc"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "mark-lost", "localhost:9090", "bk-abc"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "prevent-renew", "ba-abc"]).is_ok());
        assert!(Cli::try_parse_from(["hangar", "prevent-renew", "Bad_Id"]).is_err());
        assert!(Cli::try_parse_from(["hangar", "migrate"]).is_err());
    }
}
