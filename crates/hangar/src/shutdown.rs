//! Waiting for the process to be asked to stop (Ctrl-C / SIGINT or SIGTERM).

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT and SIGTERM handlers. Install them before announcing that the process is up, so a signal
/// sent right after the announcement is handled instead of killing the process.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves with the signal's name when SIGINT or SIGTERM arrives.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
