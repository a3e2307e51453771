//! `hangar warm-pool set|list|delete`: the controller's warm pools (`/ctrl/warm-pools`).

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
    /// Create a warm pool or change it (a new executable replaces its unclaimed backends).
    Set(SetArgs),
    /// List the warm pools with their ready, starting and claimed counts.
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
                claim_path: None,
            };
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
        return Ok(());
    }
    say!("NAME  CLUSTER  POOL  SIZE  READY  STARTING  CLAIMED");
    for p in pools {
        say!(
            "{}  {}  {}  {}  {}  {}  {}",
            p.name,
            p.cluster,
            if p.pool.is_empty() { "-" } else { &p.pool },
            p.size,
            p.ready,
            p.starting,
            p.claimed
        );
    }
    Ok(())
}
