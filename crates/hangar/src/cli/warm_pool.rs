//! `hangar warm-pool set|list|delete`: the controller's warm pools (`/ctrl/warm-pools`).

use super::cluster::render_table;
use super::Output;
use crate::cli::connect::{build_executable, parse_command_line, parse_env_var, CommandLine};
use crate::cli::say;
use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use hangar_client::ControllerClient;
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig};
use hangar_types::{ClusterName, WarmPoolName};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct WarmPoolArgs {
    #[command(subcommand)]
    pub command: WarmPoolCommand,
}

#[derive(Debug, Subcommand)]
pub enum WarmPoolCommand {
    /// Create a warm pool or replace its configuration (a new executable replaces its unclaimed
    /// backends).
    ///
    /// `set` sends the whole configuration (`PUT /ctrl/warm-pools/NAME` replaces it): an option left
    /// out takes its default, not the pool's current value. Setting an existing pool without
    /// `--claim-path` removes its claim hook, without `--max-age-seconds` its age limit, without
    /// `--env` its environment; `--cluster` left out means the controller's default cluster.
    Set(SetArgs),
    /// List the warm pools with their ready, starting and claimed counts and failed starts.
    ///
    /// FAILED counts the backends of the pool's executable that failed to start in a row; while it
    /// is above 0 the pool waits before it starts another (2 s, doubling per failure, at most 5 min).
    List,
    /// Delete a warm pool and terminate its unclaimed backends.
    Delete {
        /// The pool's name.
        name: WarmPoolName,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("executable").required(true).args(["command", "image"])))]
pub struct SetArgs {
    /// The pool's name.
    pub name: WarmPoolName,
    /// Unclaimed backends to keep started.
    #[arg(long)]
    pub size: u32,
    /// Cluster; the controller's default cluster when absent.
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Drone pool ("" is the default pool).
    #[arg(long, default_value = "")]
    pub pool: String,
    /// Run a local process (process executor), split like a shell would.
    #[arg(long, value_parser = parse_command_line)]
    pub command: Option<CommandLine>,
    /// Run a container image (Docker executor).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub image: Option<String>,
    /// Environment variable for the backends, `NAME=VALUE`; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
    pub env: Vec<(String, String)>,
    /// Replace unclaimed backends older than this many seconds.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_age_seconds: Option<u32>,
    /// Path (starting with `/`) of the backends that the drone `POST`s a claim to before the connect
    /// answers: the key, fencing token, backend id, static token and the connect's env. Without it a
    /// claimed backend gets nothing ahead (see the README, "Warm pools").
    #[arg(long, value_name = "PATH")]
    pub claim_path: Option<String>,
}

pub async fn run(
    client: &ControllerClient,
    args: WarmPoolArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    match args.command {
        WarmPoolCommand::Set(set) => {
            let config = WarmPoolConfig {
                cluster: set.cluster,
                pool: set.pool,
                size: set.size,
                executable: build_executable(&set.command, &set.image, &set.env)?,
                max_age_seconds: set.max_age_seconds,
                claim_path: set.claim_path,
            };
            // The API's own check, so that a bad value gets its message before any request.
            config.validate().map_err(anyhow::Error::msg)?;
            let pool = client
                .put_warm_pool(&set.name, &config)
                .await
                .with_context(|| format!("setting warm pool {}", set.name))?;
            print_pools(out, std::slice::from_ref(&pool))?;
        }
        WarmPoolCommand::List => {
            let list = client.warm_pools().await.context("listing warm pools")?;
            if out.json {
                out.json_line(&list)?;
            } else {
                print_pools(out, &list.pools)?;
            }
        }
        WarmPoolCommand::Delete { name } => {
            let pool = client
                .delete_warm_pool(&name)
                .await
                .with_context(|| format!("deleting warm pool {name}"))?;
            if out.json {
                out.json_line(&pool)?;
            } else {
                say!("Warm pool {name} deleted; its unclaimed backends are terminating.");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_pools(out: Output, pools: &[WarmPool]) -> anyhow::Result<()> {
    if out.json {
        for pool in pools {
            out.json_line(pool)?;
        }
    } else if pools.is_empty() {
        say!("No warm pools.");
    } else {
        print!("{}", render_pools(pools));
    }
    Ok(())
}

/// `NAME  CLUSTER  POOL  SIZE  READY  STARTING  CLAIMED  FAILED  CLAIM PATH` rows (`-` for the default
/// drone pool and for no claim path).
fn render_pools(pools: &[WarmPool]) -> String {
    let or_dash = |s: &str| if s.is_empty() { "-" } else { s }.to_string();
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                p.cluster.to_string(),
                or_dash(&p.pool),
                p.size.to_string(),
                p.ready.to_string(),
                p.starting.to_string(),
                p.claimed.to_string(),
                p.failed_starts.to_string(),
                or_dash(p.claim_path.as_deref().unwrap_or_default()),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "CLUSTER",
            "POOL",
            "SIZE",
            "READY",
            "STARTING",
            "CLAIMED",
            "FAILED",
            "CLAIM PATH",
        ],
        &rows,
    )
}
