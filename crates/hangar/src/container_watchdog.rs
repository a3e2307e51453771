//! The watchdog of an ephemeral Docker drone (`hangar dev --in-memory`, `hangar drone` without a
//! state file): a second `hangar` process that removes the drone's containers once the drone is
//! gone, however it went (SIGKILL included), so none of them runs on as an orphan.
//!
//! The drone starts it with a pipe on its stdin and never writes to it; the kernel closes the pipe
//! when the drone's process ends, and the watchdog then removes every container labelled with the
//! drone's process ([`DRONE_PROCESS_LABEL`](hangar_drone::executor::docker::DRONE_PROCESS_LABEL)).
//! After a clean stop that finds nothing: the drone stopped its containers itself. The watchdog runs
//! in a process group of its own, so the Ctrl-C that starts a graceful stop does not reach it.
//!
//! When the watchdog dies with the drone (a whole cgroup killed), the next drone of the machine
//! removes the containers when it starts (see the Docker executor's cleanup).

use anyhow::Context;
use clap::Args;
use hangar_drone::executor::docker::{remove_containers_of_process, DroneProcess};
use hangar_drone::DroneConfig;
use hangar_types::executable::ExecutorKind;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use tokio::io::AsyncReadExt;

/// The command the drone starts its watchdog with (hidden from `--help`).
pub const COMMAND: &str = "container-watchdog";

#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// The drone process whose containers to remove once the standard input closes.
    #[arg(long)]
    drone_process: DroneProcess,
}

/// A running watchdog; the pipe it waits on closes when this is dropped or the process ends.
pub struct Watchdog {
    _pipe: ChildStdin,
    _child: Child,
}

/// Starts the watchdog of this process's containers when `config` is an ephemeral Docker drone;
/// `None` otherwise, or where the process cannot be named (no `/proc`: its containers then carry no
/// process label either). Keep the result until the drone has stopped. Without a watchdog (it
/// cannot start: a warning) the next drone of the machine still removes the containers.
pub fn start_for(config: &DroneConfig) -> Option<Watchdog> {
    let ephemeral_docker =
        config.state_file.is_none() && config.executors.contains(&ExecutorKind::Docker);
    let process = match DroneProcess::current() {
        Some(process) if ephemeral_docker => process,
        _ => return None,
    };
    match start(&process) {
        Ok(watchdog) => Some(watchdog),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "The containers of this drone outlive a crash until the next drone starts");
            None
        }
    }
}

fn start(process: &DroneProcess) -> anyhow::Result<Watchdog> {
    let exe = std::env::current_exe().context("finding the hangar binary for the watchdog")?;
    let mut child = Command::new(exe)
        .args([COMMAND, "--drone-process", &process.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the container watchdog")?;
    let pipe = child
        .stdin
        .take()
        .context("the container watchdog has no stdin")?;
    tracing::debug!(pid = child.id(), "Started the container watchdog");
    Ok(Watchdog {
        _pipe: pipe,
        _child: child,
    })
}

/// Waits for the standard input to close, then removes the containers and exits at once (it holds
/// the drone's stderr, which whoever reads the drone's output waits on). A container whose creation
/// was under way when the drone died may appear after this pass: the next drone removes it.
pub async fn run(args: WatchdogArgs) -> anyhow::Result<ExitCode> {
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 64];
    // Nothing is ever written: any read returns at end of file (or on an error, which also means
    // that the drone cannot be reached any more).
    while let Ok(1..) = stdin.read(&mut buffer).await {}
    match remove_containers_of_process(&args.drone_process).await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "The drone is gone: removed its containers"),
        Err(e) => tracing::warn!(error = %e, "Cannot remove the containers of a gone drone"),
    }
    Ok(ExitCode::SUCCESS)
}
