//! Waiting for the process to be asked to stop (Ctrl-C / SIGINT or SIGTERM), and to be asked again:
//! as with `docker compose`, a second signal during the shutdown skips the grace period.

use anyhow::Context;
use std::future::Future;
use std::pin::Pin;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::oneshot;

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

    /// After the first signal: runs `shutdown`, handing it a future that resolves when a second
    /// SIGINT or SIGTERM arrives (the log says the grace period is skipped). A `shutdown` that keeps
    /// that future is awaited to the end (it cuts its grace period short); one that dropped it is
    /// abandoned on the second signal.
    pub async fn run_shutdown<F: Future<Output = ()>>(
        mut self,
        shutdown: impl FnOnce(SecondSignal) -> F,
    ) {
        let (second_tx, second_rx) = oneshot::channel::<()>();
        let stop = shutdown(Box::pin(async move {
            let _ = second_rx.await;
        }));
        tokio::pin!(stop);
        let signal = tokio::select! {
            () = &mut stop => return,
            signal = self.recv() => signal,
        };
        tracing::warn!(
            signal,
            "Second stop signal: skipping the grace period, killing backends now"
        );
        if second_tx.send(()).is_ok() {
            stop.await;
        }
    }
}

/// Resolves when the operator asks a second time to stop.
pub type SecondSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The log line of the first stop signal.
pub fn announce(signal: &'static str) {
    tracing::info!(
        signal,
        "Shutting down (send SIGINT or SIGTERM again to skip the grace period)"
    );
}
