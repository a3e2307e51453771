//! One backend's task: drives the executor through `loading` → `starting` → `waiting` → `ready`,
//! reacts to terminate commands and key deadlines at every step (terminating during loading, starting
//! or waiting aborts that step), escalates a soft termination to SIGKILL after the grace period, and
//! ends once the backend is `terminated`. Every state comes from `BackendState::apply` and is written to
//! the outbox before anything else learns of it.

use super::Supervisors;
use crate::executor::{BackendSpec, Executor, ReadinessError, RunningBackend, Started};
use crate::key_manager::{KeyManager, KeyStep};
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{DroneToController, KeyDeadlines};
use hangar_types::state::Transition;
use hangar_types::{BackendId, BackendState, Millis, TerminationKind, TerminationReason};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How often a failed outbox write is tried before the state change is given up (and logged).
const RECORD_ATTEMPTS: u32 = 5;

pub(super) enum Command {
    /// A terminate action; `applied` is answered once the resulting state is in the outbox.
    Terminate {
        kind: TerminationKind,
        reason: TerminationReason,
        applied: oneshot::Sender<()>,
    },
    /// The controller's answer to `RenewKey` (`None`: refused).
    Renewed(Option<KeyDeadlines>),
    /// The drone is shutting down: backends that cannot outlive it are terminated this way (hard
    /// once an operator asked to skip the grace period).
    DroneShutdown(TerminationKind),
}

/// What an interruption of the current step asks for.
enum Interrupt {
    Nothing,
    /// The state moved to (hard-)terminating: act on it.
    Terminate(TerminationKind),
    /// Stop supervising, leave the backend as it is.
    Detach,
}

/// Outcome of a step before the backend runs.
enum Step<T> {
    Done(T),
    /// Termination was requested: the step was abandoned.
    Stopped,
    Detached,
}

pub(super) struct BackendTask {
    pub(super) id: BackendId,
    pub(super) state: BackendState,
    pub(super) key: KeyManager,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) supervisors: Supervisors,
    /// When a soft termination turns into SIGKILL.
    pub(super) kill_at: Option<Instant>,
    /// When the spawn action of a new backend was applied (none for a re-adopted one).
    pub(super) spawn_received: Option<Instant>,
    /// States reached but not written to the outbox yet, with when they were reached: `loading`
    /// and `starting` of an executor whose start need not be recorded first (see
    /// [`BackendTask::run_fresh`]). The next state written takes them along, before it, in one
    /// commit.
    pub(super) unrecorded: Vec<(BackendState, Millis)>,
}

/// Why a backend of this kind cannot run here, in words for the user.
fn unavailable_message(kind: ExecutorKind, offered: &[ExecutorKind]) -> String {
    let what = match kind {
        ExecutorKind::Docker => "Docker images",
        ExecutorKind::Process => "local processes",
        ExecutorKind::Socket => "backends through an executor socket",
    };
    let offered: Vec<String> = offered.iter().map(ToString::to_string).collect();
    format!(
        "this drone cannot run {what} (executors offered: {})",
        offered.join(", ")
    )
}

impl BackendTask {
    pub(super) async fn run(
        mut self,
        executor: Option<Arc<dyn Executor>>,
        spec: BackendSpec,
        started: Option<Started>,
        offered: Vec<ExecutorKind>,
    ) {
        match (executor, started) {
            (executor, Some(started)) => {
                let outlives = executor.is_some_and(|e| self.outlives_drone(&*e));
                self.run_started(started, outlives).await
            }
            (None, None) => {
                let message = unavailable_message(spec.executable.kind(), &offered);
                self.apply(Transition::Failed {
                    reason: TerminationReason::InternalError,
                    message,
                })
                .await;
            }
            (Some(executor), None) => self.run_fresh(executor, &spec).await,
        }
        self.supervisors.ended(&self.id);
        let metrics = &self.supervisors.inner.metrics;
        metrics.backend_unsupervised(self.state.status());
        tracing::debug!(backend = %self.id, status = %self.state.status(), "Backend task ended");
    }

    /// Drives a new backend to `waiting`. `loading` and `starting` are written to the outbox before
    /// the executor acts, unless [`Executor::start_must_be_recorded_first`] says a restarted drone
    /// would do the same whether or not they were (process backends: the child dies with the drone,
    /// and a restart removes a backend recorded `scheduled`, `loading` or `starting` alike). Then
    /// they are written together with the state after them (`waiting` with the backend's record,
    /// or the failure or termination), in one commit after the start instead of two before it. The
    /// controller still receives every state in order, and no state is reported before it is
    /// written; a terminate action is still answered only once its state is written.
    async fn run_fresh(&mut self, executor: Arc<dyn Executor>, spec: &BackendSpec) {
        let defer = !executor.start_must_be_recorded_first();
        self.advance(Transition::Load, defer).await;
        match self.step(executor.prepare(spec)).await {
            Step::Done(Ok(())) => {}
            Step::Done(Err(e)) => return self.fail(e.to_string()).await,
            Step::Stopped => return self.apply_exited(None, false).await,
            Step::Detached => return,
        }
        self.advance(Transition::Start, defer).await;
        match self.step(executor.start(spec)).await {
            Step::Done(Ok(started)) => {
                let outlives = self.outlives_drone(&*executor);
                self.run_started(started, outlives).await
            }
            Step::Done(Err(e)) => self.fail(e.to_string()).await,
            Step::Stopped => {
                // The start future was dropped; anything it created is removed.
                if let Err(e) = executor.remove(&self.id, None).await {
                    tracing::warn!(backend = %self.id, error = %e, "Failed to remove aborted backend");
                }
                self.apply_exited(None, false).await;
            }
            Step::Detached => {}
        }
    }

    /// Whether the backend is left running when the drone shuts down (to be re-adopted).
    fn outlives_drone(&self, executor: &dyn Executor) -> bool {
        executor.backends_outlive_drone() && self.supervisors.inner.settings.durable_state
    }

    async fn fail(&mut self, message: String) {
        tracing::info!(backend = %self.id, %message, "Backend could not be started");
        self.apply(Transition::Failed {
            reason: TerminationReason::InternalError,
            message,
        })
        .await;
    }

    /// Runs one step before the backend exists, while handling commands and key deadlines.
    async fn step<T>(&mut self, work: impl Future<Output = T>) -> Step<T> {
        tokio::pin!(work);
        loop {
            let interrupt = tokio::select! {
                biased;
                _ = self.supervisors.inner.detach.cancelled() => Interrupt::Detach,
                // Nothing runs yet, so a drone shutdown abandons the step whatever the executor.
                command = self.commands.recv() => self.on_command(command, false).await,
                step = self.key.next_step() => self.on_key_step(step).await,
                out = &mut work => return Step::Done(out),
            };
            match interrupt {
                Interrupt::Nothing => {}
                Interrupt::Terminate(_) => return Step::Stopped,
                Interrupt::Detach => return Step::Detached,
            }
        }
    }

    /// Supervises a started backend until it exits. `outlives` tells whether it survives the drone.
    async fn run_started(&mut self, started: Started, outlives: bool) {
        let Started { address, backend } = started;
        // Stored with `waiting`, in one commit; alone when the state does not move (re-adopted).
        let runtime = backend.record();
        if !self
            .apply_storing(Transition::Wait { address }, Some(&runtime))
            .await
        {
            self.save_runtime(Some(runtime)).await;
        }
        // A re-adopted backend may already be terminating: act on it again.
        match self.state {
            BackendState::Terminating { .. } => self.signal(&*backend, TerminationKind::Soft).await,
            BackendState::HardTerminating { .. } => {
                self.signal(&*backend, TerminationKind::Hard).await
            }
            _ => {}
        }
        let timeout = self.supervisors.inner.settings.readiness_timeout;
        let probe = backend.wait_ready(address, timeout);
        tokio::pin!(probe);
        loop {
            let probing = matches!(self.state, BackendState::Waiting { .. });
            let kill_at = self.kill_at;
            let interrupt = tokio::select! {
                biased;
                _ = self.supervisors.inner.detach.cancelled() => Interrupt::Detach,
                code = backend.exited() => {
                    if let Some(message) = backend.lost() {
                        tracing::warn!(backend = %self.id, %message, "Backend lost with its executor");
                        let reason = TerminationReason::Lost;
                        self.apply(Transition::Failed { reason, message }).await;
                        break;
                    }
                    if backend.oom_killed() {
                        tracing::info!(backend = %self.id, "Backend ran out of memory");
                    }
                    self.apply_exited(code, backend.oom_killed()).await;
                    break;
                }
                command = self.commands.recv() => self.on_command(command, outlives).await,
                step = self.key.next_step() => self.on_key_step(step).await,
                ready = &mut probe, if probing => match ready {
                    Ok(()) => {
                        self.apply(Transition::Ready { address }).await;
                        Interrupt::Nothing
                    }
                    Err(e) => {
                        tracing::info!(backend = %self.id, error = %e, "Backend did not become ready");
                        let reason = match e {
                            ReadinessError::Timeout(_) => TerminationReason::StartupTimeout,
                            ReadinessError::Failed(_) => TerminationReason::InternalError,
                        };
                        self.request_termination(TerminationKind::Hard, reason).await
                    }
                },
                _ = sleep_until_some(kill_at) => {
                    tracing::info!(backend = %self.id, "Grace period over; killing backend");
                    self.signal(&*backend, TerminationKind::Hard).await;
                    Interrupt::Nothing
                }
            };
            match interrupt {
                Interrupt::Nothing => {}
                Interrupt::Terminate(kind) => self.signal(&*backend, kind).await,
                Interrupt::Detach => {
                    tracing::info!(backend = %self.id, "Leaving backend running");
                    return;
                }
            }
        }
        self.save_runtime(None).await;
    }

    async fn signal(&mut self, backend: &dyn RunningBackend, kind: TerminationKind) {
        self.kill_at = match kind {
            TerminationKind::Soft => {
                Some(Instant::now() + self.supervisors.inner.settings.soft_terminate_grace)
            }
            TerminationKind::Hard => None,
        };
        if let Err(e) = backend.terminate(kind).await {
            tracing::warn!(backend = %self.id, error = %e, ?kind, "Failed to terminate backend");
        }
    }

    async fn on_command(&mut self, command: Option<Command>, outlives: bool) -> Interrupt {
        match command {
            Some(Command::Terminate {
                kind,
                reason,
                applied,
            }) => {
                let interrupt = self.request_termination(kind, reason).await;
                let _ = applied.send(());
                interrupt
            }
            Some(Command::Renewed(Some(deadlines))) => {
                self.key.renewed(&deadlines, Millis::now(), Instant::now());
                let outbox = &self.supervisors.inner.outbox;
                if let Err(e) = outbox.set_deadlines(&self.id, &deadlines).await {
                    tracing::warn!(backend = %self.id, error = %e, "Failed to store key deadlines");
                }
                Interrupt::Nothing
            }
            Some(Command::Renewed(None)) => {
                tracing::info!(backend = %self.id, "Key renewal refused; the backend will expire");
                self.key.refused();
                Interrupt::Nothing
            }
            Some(Command::DroneShutdown(kind)) if !outlives => {
                self.request_termination(kind, TerminationReason::Lost)
                    .await
            }
            // The supervisors are gone or the backend outlives the drone.
            Some(Command::DroneShutdown(_)) | None => Interrupt::Detach,
        }
    }

    async fn on_key_step(&mut self, step: KeyStep) -> Interrupt {
        match step {
            KeyStep::Renew => {
                let renew = DroneToController::RenewKey {
                    backend: self.id.clone(),
                    local_time: Millis::now(),
                };
                if self.supervisors.inner.outbound.try_send(renew).is_err() {
                    tracing::debug!(backend = %self.id, "Key renewal not queued (not connected)");
                }
                Interrupt::Nothing
            }
            KeyStep::Terminate(kind) => {
                tracing::info!(backend = %self.id, ?kind, "Key expired; terminating backend");
                self.request_termination(kind, TerminationReason::KeyExpired)
                    .await
            }
        }
    }

    async fn request_termination(
        &mut self,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> Interrupt {
        if self.apply(Transition::Terminate { kind, reason }).await {
            Interrupt::Terminate(kind)
        } else {
            Interrupt::Nothing
        }
    }

    async fn apply_exited(&mut self, exit_code: Option<i32>, oom_killed: bool) {
        self.apply(Transition::Exited {
            exit_code,
            oom_killed,
        })
        .await;
    }

    /// Moves the state machine; records and returns `true` when the state changed.
    async fn apply(&mut self, transition: Transition) -> bool {
        self.apply_storing(transition, None).await
    }

    /// [`apply`](Self::apply), or with `defer` only moves the state machine and keeps the state
    /// for the next write ([`BackendTask::unrecorded`]).
    async fn advance(&mut self, transition: Transition, defer: bool) {
        if !defer {
            self.apply(transition).await;
        } else if self.move_to(transition) {
            self.unrecorded.push((self.state.clone(), Millis::now()));
        }
    }

    /// [`apply`](Self::apply), storing the backend's `runtime` record with the new state.
    async fn apply_storing(
        &mut self,
        transition: Transition,
        runtime: Option<&serde_json::Value>,
    ) -> bool {
        if !self.move_to(transition) {
            return false;
        }
        self.record(runtime).await;
        true
    }

    /// Moves the state machine and counts the move; `true` when the state changed. The caller
    /// writes the new state to the outbox.
    fn move_to(&mut self, transition: Transition) -> bool {
        let next = match self.state.apply(transition) {
            Ok(next) if next == self.state => return false,
            Ok(next) => next,
            Err(e) => {
                tracing::debug!(backend = %self.id, error = %e, "Ignoring transition");
                return false;
            }
        };
        // Counted before the event is written, so whoever sees the event sees it counted.
        let metrics = &self.supervisors.inner.metrics;
        metrics.backend_moved(self.state.status(), next.status());
        metrics.record_terminated(&next);
        if let (BackendState::Ready { .. }, Some(received)) = (&next, self.spawn_received) {
            metrics.record_ready(received.elapsed());
        }
        self.state = next;
        tracing::info!(backend = %self.id, status = %self.state.status(), "Backend state changed");
        true
    }

    /// Writes the current state, after the states not written yet, in one commit.
    async fn record(&mut self, runtime: Option<&serde_json::Value>) {
        let outbox = &self.supervisors.inner.outbox;
        let mut states = std::mem::take(&mut self.unrecorded);
        states.push((self.state.clone(), Millis::now()));
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=RECORD_ATTEMPTS {
            match outbox.record_states(&self.id, &states, runtime).await {
                Ok(_) => return,
                Err(e) if attempt == RECORD_ATTEMPTS => {
                    tracing::error!(backend = %self.id, error = %e, status = %self.state.status(),
                        "Failed to record backend state; the controller will not learn of it");
                }
                Err(e) => {
                    tracing::warn!(backend = %self.id, error = %e, "Failed to record backend state; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    async fn save_runtime(&self, runtime: Option<serde_json::Value>) {
        let outbox = &self.supervisors.inner.outbox;
        if let Err(e) = outbox.set_runtime(&self.id, runtime.as_ref()).await {
            tracing::warn!(backend = %self.id, error = %e, "Failed to store backend runtime record");
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
