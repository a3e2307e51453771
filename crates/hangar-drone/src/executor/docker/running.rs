//! One started (or re-adopted) container: its handle for the supervisor, and the tasks that follow it
//! — the exit watcher, the log follower and the metrics sampler.
//!
//! The watcher waits for the container to stop (Docker's `wait`, with `inspect` as the fallback when
//! the wait connection breaks), then reads the exit code and `OOMKilled`, keeps the last log lines,
//! removes the container and only then reports the exit. At the drone's shutdown every task stops and
//! the container keeps running, for the next drone run to re-adopt.

use super::metrics::{run_metrics, MetricsSink, Sampler};
use super::{error_message, is_gone, is_not_found, Tracked};
use crate::executor::log_lines::{LineSplitter, RecentLines, LOG_LINES};
use crate::executor::{ExecutorError, RunningBackend};
use crate::log_store::LogWriter;
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptions, LogsOptions, RemoveContainerOptions,
    WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use hangar_types::logs::LogStream;
use hangar_types::{BackendId, TerminationKind};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First delay before asking again when waiting on a container failed; doubles up to the max.
const WAIT_RETRY_FIRST: Duration = Duration::from_millis(500);
const WAIT_RETRY_MAX: Duration = Duration::from_secs(10);

/// What is stored to find the container again after a drone restart (its name is enough; the id
/// is kept for operators).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub code: Option<i32>,
    pub oom_killed: bool,
}

pub struct RunningContainer {
    record: ContainerRecord,
    docker: Docker,
    /// `None` while running.
    exit: watch::Receiver<Option<ContainerExit>>,
    logs: RecentLines,
}

/// What following a container needs besides the container itself.
pub struct Followers<'a> {
    pub tracker: &'a TaskTracker,
    /// The executor's token: fired at drone shutdown.
    pub cancel: &'a CancellationToken,
    pub metrics: MetricsSink,
    pub stats_permits: Arc<Semaphore>,
    /// Where the output is captured, when set.
    pub logs: Option<LogWriter>,
}

impl RunningContainer {
    /// Starts following a running container and returns its handle.
    pub fn follow(
        docker: &Docker,
        record: ContainerRecord,
        backend: &BackendId,
        tracked: Tracked,
        followers: Followers<'_>,
    ) -> RunningContainer {
        let logs = RecentLines::default();
        let (exit_tx, exit) = watch::channel(None);
        let container_cancel = followers.cancel.child_token();
        let follow = LogFollow {
            docker: docker.clone(),
            container: record.container.clone(),
            backend: backend.clone(),
            recent: logs.clone(),
            store: followers.logs.clone(),
            follow: true,
        };
        let follower = followers
            .tracker
            .spawn(follow.run(container_cancel.clone()));
        let sampler = Sampler {
            docker: docker.clone(),
            container: record.container.clone(),
            backend: backend.clone(),
            sink: followers.metrics,
            permits: followers.stats_permits,
        };
        followers
            .tracker
            .spawn(run_metrics(sampler, container_cancel.clone()));
        let watcher = Watcher {
            docker: docker.clone(),
            container: record.container.clone(),
            backend: backend.clone(),
            exit: exit_tx,
            logs: logs.clone(),
            cancel: container_cancel,
            follower,
            store: followers.logs,
            _tracked: tracked,
        };
        followers.tracker.spawn(watcher.run());
        RunningContainer {
            record,
            docker: docker.clone(),
            exit,
            logs,
        }
    }
}

#[async_trait]
impl RunningBackend for RunningContainer {
    fn record(&self) -> serde_json::Value {
        serde_json::to_value(&self.record).unwrap_or(serde_json::Value::Null)
    }

    /// Soft is SIGTERM only (the supervisor sends SIGKILL after the grace period), hard is SIGKILL.
    async fn terminate(&self, kind: TerminationKind) -> Result<(), ExecutorError> {
        let signal = match kind {
            TerminationKind::Soft => "SIGTERM",
            TerminationKind::Hard => "SIGKILL",
        };
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        match self
            .docker
            .kill_container(&self.record.container, Some(options))
            .await
        {
            Ok(()) => Ok(()),
            // Gone or not running: nothing left to signal.
            Err(e) if is_gone(&e) => Ok(()),
            Err(source) => Err(ExecutorError::Docker {
                action: "signal the container",
                source,
            }),
        }
    }

    async fn exited(&self) -> Option<i32> {
        let mut exit = self.exit.clone();
        // An error means the watcher stopped without a result (only at drone shutdown).
        let exited = exit.wait_for(Option::is_some).await.ok().and_then(|e| *e);
        exited.and_then(|e| e.code)
    }

    fn recent_logs(&self) -> Vec<String> {
        self.logs.snapshot()
    }

    fn oom_killed(&self) -> bool {
        self.exit.borrow().is_some_and(|e| e.oom_killed)
    }
}

struct Watcher {
    docker: Docker,
    container: String,
    backend: BackendId,
    exit: watch::Sender<Option<ContainerExit>>,
    logs: RecentLines,
    /// The container's token: fired here once it stopped, or by the executor at shutdown.
    cancel: CancellationToken,
    follower: JoinHandle<()>,
    /// The log store, told when the container's output is complete.
    store: Option<LogWriter>,
    /// Keeps the periodic cleanup away until the container is removed.
    _tracked: Tracked,
}

/// How waiting for a container ended.
enum Waited {
    /// It stopped; the exit code Docker's `wait` reported, if it did.
    Stopped(Option<i32>),
    /// It no longer exists.
    Gone,
}

impl Watcher {
    async fn run(mut self) {
        let waited = tokio::select! {
            // The drone is shutting down: leave the container running.
            _ = self.cancel.cancelled() => return,
            waited = wait_for_exit(&self.docker, &self.container) => waited,
        };
        // Stop the sampler, and let the follower finish the last lines (Docker ends the followed
        // stream once the container stopped; the cancel below is the backstop).
        if tokio::time::timeout(FOLLOWER_DRAIN, &mut self.follower)
            .await
            .is_err()
        {
            self.cancel.cancel();
            let _ = (&mut self.follower).await;
        }
        self.cancel.cancel();
        if let Some(store) = &self.store {
            store.end(&self.backend).await;
        }
        let exit = match waited {
            Waited::Gone => ContainerExit {
                code: None,
                oom_killed: false,
            },
            Waited::Stopped(code) => {
                let exit = self.inspect_exit(code).await;
                self.keep_final_logs().await;
                self.remove().await;
                exit
            }
        };
        tracing::debug!(backend = %self.backend, code = ?exit.code, oom_killed = exit.oom_killed, "Container exited");
        self.exit.send_replace(Some(exit));
    }

    async fn inspect_exit(&self, waited_code: Option<i32>) -> ContainerExit {
        match self
            .docker
            .inspect_container(&self.container, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                ContainerExit {
                    code: state
                        .exit_code
                        .and_then(|c| i32::try_from(c).ok())
                        .or(waited_code),
                    oom_killed: state.oom_killed.unwrap_or(false),
                }
            }
            Err(e) => {
                tracing::warn!(backend = %self.backend, error = %error_message(&e), "Cannot inspect the exited container");
                ContainerExit {
                    code: waited_code,
                    oom_killed: false,
                }
            }
        }
    }

    /// Replaces what the follower kept with the container's last lines as Docker stored them.
    async fn keep_final_logs(&self) {
        match last_log_lines(&self.docker, &self.container).await {
            Ok(lines) => self.logs.replace(lines),
            Err(e) => {
                tracing::debug!(backend = %self.backend, error = %error_message(&e), "Cannot read the final logs")
            }
        }
    }

    async fn remove(&self) {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self
            .docker
            .remove_container(&self.container, Some(options))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // The periodic cleanup removes it later.
            Err(e) => {
                tracing::warn!(backend = %self.backend, error = %error_message(&e), "Cannot remove the exited container")
            }
        }
    }
}

/// Waits until the container stopped or is gone, retrying with backoff when the wait itself fails
/// (a Docker engine restart, a broken connection).
async fn wait_for_exit(docker: &Docker, container: &str) -> Waited {
    let mut delay = WAIT_RETRY_FIRST;
    loop {
        let options = WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let waited = docker.wait_container(container, Some(options)).next().await;
        match waited {
            Some(Ok(response)) => return Waited::Stopped(i32::try_from(response.status_code).ok()),
            // bollard reports a non-zero exit as an error.
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => {
                return Waited::Stopped(i32::try_from(code).ok())
            }
            Some(Err(e)) if is_not_found(&e) => return Waited::Gone,
            Some(Err(e)) => {
                tracing::debug!(container, error = %error_message(&e), "Waiting for the container failed")
            }
            None => tracing::debug!(
                container,
                "Waiting for the container ended without an answer"
            ),
        }
        match docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        {
            Err(e) if is_not_found(&e) => return Waited::Gone,
            Ok(info) if !info.state.as_ref().and_then(|s| s.running).unwrap_or(false) => {
                return Waited::Stopped(None)
            }
            _ => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WAIT_RETRY_MAX);
    }
}

/// How long the exit watcher lets the log follower read the last lines of a stopped container.
const FOLLOWER_DRAIN: Duration = Duration::from_secs(2);

/// Follows one container's output into the log (debug), the recent lines and the log store.
pub(super) struct LogFollow {
    pub docker: Docker,
    pub container: String,
    pub backend: BackendId,
    pub recent: RecentLines,
    pub store: Option<LogWriter>,
    /// `false`: read what the container wrote so far and stop.
    pub follow: bool,
}

impl LogFollow {
    /// Follows until `cancel` fires or the container stops. Without a log store it starts with the
    /// last [`LOG_LINES`] lines; with one, with everything the store does not have yet (all of it
    /// for a new container; since the store's last write, to the second, for a re-adopted one, so a
    /// line of that second may be kept twice).
    pub async fn run(self, cancel: CancellationToken) {
        let since = self
            .store
            .as_ref()
            .and_then(|s| s.store().last_write(&self.backend));
        let options = LogsOptions {
            follow: self.follow,
            stdout: true,
            stderr: true,
            tail: match (&self.store, since) {
                (None, _) => LOG_LINES.to_string(),
                (Some(_), _) => "all".to_string(),
            },
            since: since.map_or(0, |s| i32::try_from(s.0 / 1000).unwrap_or(0)),
            ..Default::default()
        };
        let mut stream = self.docker.logs(&self.container, Some(options));
        let mut out = LineSplitter::default();
        let mut err = LineSplitter::default();
        let mut batch = Vec::new();
        loop {
            let output = tokio::select! {
                _ = cancel.cancelled() => break,
                output = stream.next() => output,
            };
            match output {
                Some(Ok(LogOutput::StdErr { message })) => {
                    err.feed(&message, |l| batch.push((LogStream::Stderr, l)))
                }
                Some(Ok(output)) => {
                    out.feed(&output.into_bytes(), |l| batch.push((LogStream::Stdout, l)))
                }
                Some(Err(e)) => {
                    tracing::debug!(backend = %self.backend, error = %error_message(&e), "Stopped following the container's logs");
                    break;
                }
                None => break,
            }
            self.keep(&mut batch).await;
        }
        batch.extend(out.finish().map(|l| (LogStream::Stdout, l)));
        batch.extend(err.finish().map(|l| (LogStream::Stderr, l)));
        self.keep(&mut batch).await;
    }

    async fn keep(&self, batch: &mut Vec<(LogStream, String)>) {
        for (stream, line) in batch.iter() {
            tracing::debug!(backend = %self.backend, %stream, "{line}");
            self.recent.push(line.clone());
        }
        match &self.store {
            Some(store) => store.append(&self.backend, std::mem::take(batch)).await,
            None => batch.clear(),
        }
    }
}

/// The container's last [`LOG_LINES`] lines, oldest first.
pub async fn last_log_lines(docker: &Docker, container: &str) -> Result<Vec<String>, DockerError> {
    let options = LogsOptions {
        follow: false,
        stdout: true,
        stderr: true,
        tail: LOG_LINES.to_string(),
        ..Default::default()
    };
    let mut stream = docker.logs(container, Some(options));
    let mut splitter = LineSplitter::default();
    let mut lines = Vec::new();
    while let Some(output) = stream.next().await {
        splitter.feed(&output?.into_bytes(), |line| lines.push(line));
    }
    lines.extend(splitter.finish());
    Ok(lines)
}
