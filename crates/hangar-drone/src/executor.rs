//! The executor contract: how the drone runs one backend on some runtime (local processes, Docker).
//!
//! The supervisor drives a backend through an executor in this order: [`Executor::prepare`]
//! (`loading`: pull the image / find the program) → [`Executor::start`] (`starting`: start it and
//! learn its address) → the supervisor probes the address (`waiting` → `ready`) →
//! [`RunningBackend::terminate`] (soft, then hard after the grace period) → [`RunningBackend::exited`]
//! (`terminated`). After a drone restart, [`Executor::reattach`] re-adopts a backend from what
//! [`RunningBackend::record`] stored, or cleans it up, and [`Executor::remove_orphans`] removes what
//! belongs to no supervised backend. An executor never touches the outbox or the state machine: it
//! reports facts, the supervisor decides.

pub mod docker;
mod log_lines;
pub mod process;
pub mod socket;

use async_trait::async_trait;
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendId, KeyName, TerminationKind};
use std::net::SocketAddr;
use std::time::Duration;

pub use docker::{DockerExecutor, DockerSettings};
pub use process::ProcessExecutor;
pub use socket::{SocketExecutor, SocketSettings};

/// Everything an executor needs to start one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub id: BackendId,
    pub executable: Executable,
    pub key: KeyName,
    pub fencing_token: i64,
    pub static_token: Option<ConnectionToken>,
}

impl BackendSpec {
    /// The environment every backend gets besides the user's own (design.md §5, backend contract).
    pub fn contract_env(&self, port: u16) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PORT", port.to_string()),
            ("SESSION_BACKEND_ID", self.id.to_string()),
            ("SESSION_BACKEND_KEY", self.key.to_string()),
            (
                "SESSION_BACKEND_FENCING_TOKEN",
                self.fencing_token.to_string(),
            ),
        ];
        if let Some(token) = &self.static_token {
            env.push(("SESSION_BACKEND_STATIC_TOKEN", token.as_str().to_string()));
        }
        env
    }
}

/// What [`Executor::reattach`] found of a backend of a previous drone run.
pub enum Reattached {
    /// It still runs: supervise it again.
    Running(Started),
    /// It exited while nobody supervised it (what was left of it is removed).
    Exited {
        exit_code: Option<i32>,
        oom_killed: bool,
    },
    /// Nothing is left of it (or it could not be re-adopted and was stopped).
    Gone,
}

/// A backend that was started (or re-adopted).
pub struct Started {
    /// Where proxies reach it (`drone ip:port`); also what the readiness probe connects to.
    pub address: SocketAddr,
    pub backend: Box<dyn RunningBackend>,
}

/// Control over one running backend. All methods take `&self` so the supervisor can wait for the exit
/// while it sends signals.
#[async_trait]
pub trait RunningBackend: Send + Sync {
    /// What the executor needs to find this backend again after a drone restart (a pid, a container
    /// id); stored in the outbox.
    fn record(&self) -> serde_json::Value;

    /// Soft: ask the backend to stop (SIGTERM). Hard: kill it (SIGKILL). Succeeds when the backend is
    /// already gone. The grace period between the two is the supervisor's business.
    async fn terminate(&self, kind: TerminationKind) -> Result<(), ExecutorError>;

    /// Resolves once the backend has exited, with its exit code (128 + signal for a signal exit;
    /// `None` when unknown). Cancel-safe, and may be awaited again after it resolved.
    async fn exited(&self) -> Option<i32>;

    /// The last lines the backend wrote to stdout/stderr, oldest first.
    fn recent_logs(&self) -> Vec<String>;

    /// Whether the kernel killed the backend for exceeding its memory limit. Meaningful once
    /// [`RunningBackend::exited`] resolved.
    fn oom_killed(&self) -> bool {
        false
    }

    /// `waiting`: resolves once the backend at `address` serves, or fails after `timeout`. By
    /// default the drone probes the address over HTTP; an executor that owns readiness overrides
    /// it (Plane's socket executors answer `WaitForBackend`).
    async fn wait_ready(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<(), ReadinessError> {
        crate::readiness::wait_ready(address, timeout)
            .await
            .map_err(|e| ReadinessError::Timeout(e.to_string()))
    }

    /// Set when the executor lost the backend rather than saw it exit (its executor socket
    /// vanished): the backend ends `terminated` with reason `lost` and this message. Meaningful once
    /// [`RunningBackend::exited`] resolved.
    fn lost(&self) -> Option<String> {
        None
    }
}

/// Why a backend did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadinessError {
    /// It did not answer in time: hard-terminated with reason `startuptimeout`.
    #[error("{0}")]
    Timeout(String),
    /// Readiness could not be established for another reason: reason `internalerror`.
    #[error("{0}")]
    Failed(String),
}

#[async_trait]
pub trait Executor: Send + Sync {
    fn kind(&self) -> ExecutorKind;

    /// Whether backends keep running when the drone process exits (Docker containers do, child
    /// processes do not). Decides whether a drone shutdown terminates its backends or leaves them to
    /// be re-adopted.
    fn backends_outlive_drone(&self) -> bool;

    /// Whether `loading` and `starting` must be in the drone's outbox before [`Executor::prepare`]
    /// and [`Executor::start`] run. A drone restarted after dying mid-start removes a backend
    /// recorded before `starting` and tries to re-adopt one recorded `starting`, so an executor
    /// whose started backends can outlive the drone (a container, a backend of an external
    /// executor) must have `starting` written first. `false` lets the drone write them with the
    /// state after the start, in one commit.
    fn start_must_be_recorded_first(&self) -> bool {
        true
    }

    /// `loading`: makes the executable ready to start (pull the image, find the program).
    async fn prepare(&self, spec: &BackendSpec) -> Result<(), ExecutorError>;

    /// `starting`: starts the backend and returns once it runs.
    async fn start(&self, spec: &BackendSpec) -> Result<Started, ExecutorError>;

    /// After a drone restart: re-adopts the backend that [`RunningBackend::record`] described, or
    /// reports how it ended, or, when re-adopting is impossible, stops whatever is left of it and
    /// returns [`Reattached::Gone`].
    async fn reattach(
        &self,
        backend: &BackendId,
        record: Option<&serde_json::Value>,
    ) -> Result<Reattached, ExecutorError>;

    /// Force-removes anything left of a backend the drone does not supervise (a terminate for an
    /// unknown backend, a start that was aborted). Succeeds when nothing is left.
    async fn remove(
        &self,
        backend: &BackendId,
        record: Option<&serde_json::Value>,
    ) -> Result<(), ExecutorError>;

    /// At startup, after every backend of the previous run was re-adopted or reported: removes
    /// whatever this drone left on the runtime for backends not in `supervised` (the controller
    /// believes them terminated or never heard of them). Returns how many were removed.
    async fn remove_orphans(&self, supervised: &[BackendId]) -> Result<usize, ExecutorError> {
        let _ = supervised;
        Ok(0)
    }

    /// Stops the executor's own tasks (log readers, watchers, cleanup) once every backend task has
    /// ended. Backends that outlive the drone keep running.
    async fn shutdown(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("this executor cannot run {0} executables")]
    WrongKind(ExecutorKind),
    #[error("cannot start `{program}`: No such file or directory")]
    ProgramNotFound { program: String },
    #[error("cannot start `{program}`: Permission denied (not an executable file)")]
    ProgramNotExecutable { program: String },
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find a free port for the backend: {0}")]
    NoFreePort(#[source] std::io::Error),
    #[error("cannot signal the backend: {0}")]
    Signal(#[source] nix::Error),
    #[error("cannot reach the Docker engine: {0}")]
    DockerUnavailable(#[source] bollard::errors::Error),
    #[error("image {image} is not present and pull_policy is Never")]
    ImageNotPresent { image: String },
    #[error("cannot pull image {image}: {message}")]
    Pull { image: String, message: String },
    /// A Docker API call failed; `action` says which, in words (`create the container`).
    #[error("cannot {action}: {}", docker::error_message(.source))]
    Docker {
        action: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot find where container {container} listens: {reason}")]
    NoAddress { container: String, reason: String },
    #[error(transparent)]
    Mount(#[from] docker::MountError),
    #[error(transparent)]
    Socket(#[from] socket::LinkError),
    #[error("the executor refused {request}: {message}")]
    SocketRefused {
        request: &'static str,
        message: String,
    },
    #[error("the executor answered {request} with {answer}")]
    SocketAnswer {
        request: &'static str,
        answer: String,
    },
    #[error("the executor did not answer {request} within {after:?}")]
    SocketNoAnswer {
        request: &'static str,
        after: Duration,
    },
}
