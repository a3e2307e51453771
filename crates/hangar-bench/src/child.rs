//! A child process a scenario starts (a backend for a baseline, `hangar proxy`, nginx): killed if the
//! scenario fails before stopping it, stopped with SIGTERM (then SIGKILL) otherwise.

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct ChildProcess {
    what: String,
    child: Child,
}

impl ChildProcess {
    /// Spawns `command` with stdin and stdout closed and stderr inherited (so failures are visible).
    pub fn spawn(what: &str, mut command: Command) -> anyhow::Result<ChildProcess> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {what} ({command:?})"))?;
        Ok(ChildProcess {
            what: what.to_string(),
            child,
        })
    }

    /// The process id (while it runs).
    pub fn id(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has exited", self.what))
    }

    /// Fails when the child has exited already.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => anyhow::bail!("{} exited early ({status})", self.what),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.what)),
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; waits for the exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
            eprintln!("hangar-bench: {} ignored SIGTERM; killing it", self.what);
        }
        let _ = self.child.kill().await;
    }
}
