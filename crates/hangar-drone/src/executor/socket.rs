//! The unix-socket executor (`hangar drone --executor-socket PATH`, plane-api.md §6.6): the drone is
//! a client of an external executor process and speaks Plane's protocol unchanged, so an executor
//! written for Plane runs under a Hangar drone as is.
//!
//! Mapping onto the [`Executor`] contract: `prepare` → `Prepare`, `start` → `Spawn` (the backend's
//! address is `<drone ip>:<port from SpawnResult>`), readiness → `WaitForBackend` (the executor owns
//! it, as in Plane; the drone's readiness timeout still bounds it), terminate → `Terminate(id, hard)`
//! (`false` = nothing to stop, the backend counts as exited), exit → the executor's `TerminateEvent`.
//! The executor receives Docker-style executables only (`image` required, parsed as
//! `DockerExecutable`, Hangar's own Docker fields passed through); process executables never reach
//! it. Plane's protocol cannot ask what runs, so after a drone restart a backend is not re-adopted:
//! it is hard-terminated at the executor, as Plane does with leftovers.
//!
//! Connection handling (queueing, reconnects, the 30 s give-up) is in `link`.

mod link;
mod wire;

pub use link::LinkError;

use super::{
    BackendSpec, Executor, ExecutorError, ReadinessError, Reattached, RunningBackend, Started,
};
use async_trait::async_trait;
use hangar_types::api::KeyConfig;
use hangar_types::executable::{DockerExecutable, Executable, ExecutorKind};
use hangar_types::protocol::{AcquiredKey, DroneToController, KeyDeadlines};
use hangar_types::{BackendId, Millis, TerminationKind};
use link::{Ending, Link, LinkSettings};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wire::{MessageToClient, MessageToServer, WaitError};

/// How long the executor may take to answer a `Terminate` (the supervisor waits for it).
const TERMINATE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the socket executor needs.
#[derive(Debug, Clone)]
pub struct SocketSettings {
    /// The executor's unix socket.
    pub path: PathBuf,
    /// The drone's address for proxies; backends are `ip:<port from SpawnResult>`.
    pub ip: IpAddr,
    /// How long the socket may stay unreachable before its backends are lost (Plane: 30 s).
    pub give_up_after: Duration,
}

pub struct SocketExecutor {
    ip: IpAddr,
    link: Link,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl SocketExecutor {
    /// Starts connecting in the background (the executor need not be up yet). Metrics samples go to
    /// `metrics`; `error` holds why the executor is unavailable, while it is.
    pub fn start(
        settings: SocketSettings,
        metrics: mpsc::Sender<DroneToController>,
        error: watch::Sender<Option<String>>,
    ) -> SocketExecutor {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let link_settings = LinkSettings {
            path: settings.path,
            give_up_after: settings.give_up_after,
        };
        let link = Link::start(link_settings, metrics, error, &tracker, cancel.clone());
        tracker.close();
        SocketExecutor {
            ip: settings.ip,
            link,
            tracker,
            cancel,
        }
    }
}

/// The Docker-style executable of `spec`; the socket executor runs nothing else.
fn docker_executable(spec: &BackendSpec) -> Result<&DockerExecutable, ExecutorError> {
    match &spec.executable {
        Executable::Docker(d) => Ok(d),
        Executable::Process(_) => Err(ExecutorError::WrongKind(ExecutorKind::Process)),
    }
}

/// Plane's `AcquiredKey` for the executor. The spec carries only the key's name and fencing token;
/// namespace and tag are sent empty and the deadlines are counted from now (the drone's key manager
/// enforces the real ones; Plane's executors do not use them).
fn acquired_key(spec: &BackendSpec) -> AcquiredKey {
    AcquiredKey {
        key: KeyConfig::named(spec.key.clone()),
        deadlines: KeyDeadlines::from_base(Millis::now()),
        token: spec.fencing_token,
    }
}

fn unexpected(request: &'static str, answer: MessageToClient) -> ExecutorError {
    ExecutorError::SocketAnswer {
        request,
        answer: format!("{answer:?}"),
    }
}

#[async_trait]
impl Executor for SocketExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Socket
    }

    /// Plane's protocol cannot re-adopt a backend, so backends are stopped with the drone.
    fn backends_outlive_drone(&self) -> bool {
        false
    }

    async fn prepare(&self, spec: &BackendSpec) -> Result<(), ExecutorError> {
        let executable = docker_executable(spec)?.clone();
        match self
            .link
            .request(MessageToServer::Prepare(executable))
            .await?
        {
            MessageToClient::PrepareResult(Ok(())) => Ok(()),
            MessageToClient::PrepareResult(Err(message)) => Err(ExecutorError::SocketRefused {
                request: "Prepare",
                message,
            }),
            other => Err(unexpected("Prepare", other)),
        }
    }

    async fn start(&self, spec: &BackendSpec) -> Result<Started, ExecutorError> {
        let executable = docker_executable(spec)?.clone();
        // Watched before the request: a TerminateEvent may come right after the SpawnResult.
        let exit = self.link.watch_exit(&spec.id);
        let request = MessageToServer::Spawn(
            spec.id.clone(),
            executable,
            Some(acquired_key(spec)),
            spec.static_token.as_ref().map(|t| t.as_str().to_string()),
        );
        let answer = self.link.request(request).await;
        let result = match answer {
            Ok(MessageToClient::SpawnResult(Ok(spawned))) => {
                let backend = SocketBackend {
                    id: spec.id.clone(),
                    container_id: spawned.container_id,
                    link: self.link.clone(),
                    exit,
                };
                return Ok(Started {
                    address: SocketAddr::new(self.ip, spawned.port),
                    backend: Box::new(backend),
                });
            }
            Ok(MessageToClient::SpawnResult(Err(message))) => Err(ExecutorError::SocketRefused {
                request: "Spawn",
                message,
            }),
            Ok(other) => Err(unexpected("Spawn", other)),
            Err(e) => Err(e.into()),
        };
        self.link.forget(&spec.id);
        result
    }

    /// Hard-terminates the leftover at the executor (queued until it is reachable) and reports it
    /// gone: Plane's protocol has no way to ask whether it still runs.
    async fn reattach(
        &self,
        backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<Reattached, ExecutorError> {
        self.link
            .send_later(MessageToServer::Terminate(backend.clone(), true));
        Ok(Reattached::Gone)
    }

    async fn remove(
        &self,
        backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<(), ExecutorError> {
        self.link.forget(backend);
        self.link
            .send_later(MessageToServer::Terminate(backend.clone(), true));
        Ok(())
    }

    async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}

/// One backend the executor started.
struct SocketBackend {
    id: BackendId,
    /// What the executor called it (`SpawnResult.container_id`), for logs.
    container_id: String,
    link: Link,
    exit: watch::Receiver<Option<Ending>>,
}

impl SocketBackend {
    fn ending(&self) -> Option<Ending> {
        self.exit.borrow().clone()
    }
}

impl Drop for SocketBackend {
    fn drop(&mut self) {
        self.link.forget(&self.id);
    }
}

#[async_trait]
impl RunningBackend for SocketBackend {
    fn record(&self) -> serde_json::Value {
        serde_json::json!({"executor": "socket", "container_id": self.container_id})
    }

    async fn terminate(&self, kind: TerminationKind) -> Result<(), ExecutorError> {
        let hard = kind == TerminationKind::Hard;
        let request = self
            .link
            .request(MessageToServer::Terminate(self.id.clone(), hard));
        let answer = tokio::time::timeout(TERMINATE_ANSWER_TIMEOUT, request)
            .await
            .map_err(|_| ExecutorError::SocketNoAnswer {
                request: "Terminate",
                after: TERMINATE_ANSWER_TIMEOUT,
            })??;
        match answer {
            MessageToClient::TerminateResult(Ok(true)) => Ok(()),
            MessageToClient::TerminateResult(Ok(false)) => {
                tracing::info!(backend = %self.id, "The executor had nothing to terminate");
                self.link.end(&self.id, Ending::Exited(None));
                Ok(())
            }
            MessageToClient::TerminateResult(Err(message)) => Err(ExecutorError::SocketRefused {
                request: "Terminate",
                message,
            }),
            other => Err(unexpected("Terminate", other)),
        }
    }

    async fn exited(&self) -> Option<i32> {
        let mut exit = self.exit.clone();
        let ending = exit.wait_for(Option::is_some).await.map(|e| e.clone());
        match ending {
            Ok(Some(Ending::Exited(code))) => code,
            Ok(Some(Ending::Lost(_)) | None) => None,
            // The link is gone (drone shutdown): nothing will ever report this backend's exit.
            Err(_) => std::future::pending().await,
        }
    }

    fn recent_logs(&self) -> Vec<String> {
        // The executor owns the backend's output.
        Vec::new()
    }

    async fn wait_ready(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<(), ReadinessError> {
        let request = self
            .link
            .request(MessageToServer::WaitForBackend(self.id.clone(), address));
        let answer = match tokio::time::timeout(timeout, request).await {
            Ok(answer) => answer,
            Err(_) => {
                return Err(ReadinessError::Timeout(format!(
                    "the executor did not report the backend ready within {timeout:?}"
                )))
            }
        };
        match answer {
            Ok(MessageToClient::WaitForBackendResult(Ok(()))) => Ok(()),
            Ok(MessageToClient::WaitForBackendResult(Err(WaitError::StartupTimeout))) => Err(
                ReadinessError::Timeout("the executor reports a startup timeout".into()),
            ),
            Ok(MessageToClient::WaitForBackendResult(Err(WaitError::Other(message)))) => Err(
                ReadinessError::Failed(format!("the executor reports: {message}")),
            ),
            Ok(other) => Err(ReadinessError::Failed(
                unexpected("WaitForBackend", other).to_string(),
            )),
            Err(e) => Err(ReadinessError::Failed(e.to_string())),
        }
    }

    fn lost(&self) -> Option<String> {
        match self.ending() {
            Some(Ending::Lost(message)) => Some(message),
            _ => None,
        }
    }
}
