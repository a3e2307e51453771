//! The backends this drone supervises: applies spawn/terminate actions, recovers leftovers at startup
//! and stops everything at shutdown. Each backend is driven by its own task ([`backend_task`]).
//!
//! Invariants: a backend is started at most once (spawns are applied one at a time, and the outbox
//! deduplicates them by action id and by backend id before anything starts: with the spawn's commit,
//! or for process backends with a read while that commit runs beside the start); every state
//! reported for a backend comes out of
//! `BackendState::apply`; an action is reported applied only once its effect is in the outbox.

mod backend_task;
mod claim_hook;

pub use claim_hook::ClaimHookRequest;

use crate::executor::{BackendSpec, Executor, Reattached, Started};
use crate::key_manager::KeyManager;
use crate::outbox::{Outbox, OutboxError, SpawnInsert, SpawnRecord, StoredBackend};
use crate::prometheus::DroneMetrics;
use backend_task::{BackendTask, Command};
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{DroneToController, KeyDeadlines};
use hangar_types::state::Transition;
use hangar_types::{
    ActionId, BackendId, BackendState, BackendStatus, Millis, TerminationKind, TerminationReason,
};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Commands queued per backend task. Terminate senders wait for room; renewal answers are dropped when
/// full (the key manager asks again).
const COMMAND_CAPACITY: usize = 16;

/// Timing of the supervision of every backend.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorSettings {
    pub soft_terminate_grace: Duration,
    pub readiness_timeout: Duration,
    /// The drone's state survives a restart, so backends that outlive the drone are left running at
    /// shutdown for the next run to re-adopt. Without it they are terminated like any other.
    pub durable_state: bool,
}

/// How a backend task starts.
enum Launch {
    /// A new backend, for a spawn action applied at `received`.
    Fresh { received: Instant },
    /// A backend of a previous run.
    Resumed(Resumed),
}

/// A backend of a previous drone run that its executor re-adopted.
struct Resumed {
    state: BackendState,
    deadlines: KeyDeadlines,
    started: Started,
}

#[derive(Clone)]
pub struct Supervisors {
    inner: Arc<Inner>,
}

struct Inner {
    outbox: Outbox,
    executors: Vec<Arc<dyn Executor>>,
    settings: SupervisorSettings,
    /// Command senders of the running backend tasks; a task removes itself when it ends.
    live: Mutex<HashMap<BackendId, mpsc::Sender<Command>>>,
    /// Held by [`Supervisors::spawn`] from its duplicate check to its commit: spawns are applied one
    /// at a time, so a check reads every earlier spawn's commit.
    spawning: tokio::sync::Mutex<()>,
    /// Messages for the controller that are not events (key renewals). Bounded; when full (a long
    /// disconnection) renewals are dropped, and the key manager asks again.
    outbound: mpsc::Sender<DroneToController>,
    tracker: TaskTracker,
    /// Stops every backend task without touching its backend (the drone leaves it running).
    detach: CancellationToken,
    metrics: Arc<DroneMetrics>,
}

impl Supervisors {
    pub fn new(
        outbox: Outbox,
        executors: Vec<Arc<dyn Executor>>,
        settings: SupervisorSettings,
        outbound: mpsc::Sender<DroneToController>,
        metrics: Arc<DroneMetrics>,
    ) -> Self {
        Supervisors {
            inner: Arc::new(Inner {
                outbox,
                executors,
                settings,
                live: Mutex::new(HashMap::new()),
                spawning: tokio::sync::Mutex::new(()),
                outbound,
                tracker: TaskTracker::new(),
                detach: CancellationToken::new(),
                metrics,
            }),
        }
    }

    fn executor(&self, kind: ExecutorKind) -> Option<Arc<dyn Executor>> {
        self.inner
            .executors
            .iter()
            .find(|e| e.kind().runs(kind))
            .cloned()
    }

    fn live_sender(&self, backend: &BackendId) -> Option<mpsc::Sender<Command>> {
        match self.inner.live.lock() {
            Ok(live) => live.get(backend).cloned(),
            Err(poisoned) => poisoned.into_inner().get(backend).cloned(),
        }
    }

    /// Ids of the backends currently supervised.
    pub fn live_ids(&self) -> Vec<BackendId> {
        match self.inner.live.lock() {
            Ok(live) => live.keys().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().keys().cloned().collect(),
        }
    }

    /// Number of backends currently supervised.
    pub fn live_count(&self) -> usize {
        match self.inner.live.lock() {
            Ok(live) => live.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }

    /// Applies a spawn action: records the backend and starts supervising it, unless the action or the
    /// backend was seen before. `Ok` means the action may be acked (the backend is in the outbox).
    ///
    /// A backend whose executor does not need its start recorded first
    /// ([`Executor::start_must_be_recorded_first`]: process backends, which die with the drone) is
    /// started while its `scheduled` commit runs instead of after it, once the outbox found neither
    /// id ([`Outbox::spawn_applied`]: from the ids it keeps in memory, reading the file only for an
    /// id it has seen) and no task of the backend runs. Spawns are applied one at a time, so that
    /// check sees every earlier spawn. A drone that dies before the commit takes the backend with it
    /// and has not acked the action, so the controller resends it and the restarted drone starts the
    /// backend again; the backend's later states queue behind the commit (see
    /// [`Outbox::insert_spawn_then`]).
    pub async fn spawn(&self, backend: &BackendId, spawn: SpawnRecord) -> Result<(), OutboxError> {
        let received = Instant::now();
        let now = Millis::now();
        if spawn.key.deadlines.soft_terminate_at <= now {
            tracing::warn!(%backend, "Spawn arrived after its key's soft-terminate deadline");
        }
        let _one_at_a_time = self.inner.spawning.lock().await;
        if self.live_sender(backend).is_some() {
            // Its row may be missing only if its spawn's commit failed; the task writes it.
            tracing::debug!(%backend, action = %spawn.action_id, "Spawn of a backend already running");
            return Ok(());
        }
        let outbox = &self.inner.outbox;
        let start_first = self
            .executor(spawn.executable.kind())
            .is_some_and(|e| !e.start_must_be_recorded_first());
        if start_first && !outbox.spawn_applied(backend, &spawn.action_id).await? {
            let launched = spawn.clone();
            let inserted = outbox
                .insert_spawn_then(backend, &spawn, now, || {
                    self.start(backend, launched, received)
                })
                .await;
            return match inserted {
                Ok(SpawnInsert::Inserted) => Ok(()),
                // Not reachable while spawns are applied one at a time (see above).
                Ok(SpawnInsert::Duplicate) => {
                    tracing::error!(%backend, action = %spawn.action_id, "Spawn found applied after its backend started");
                    Ok(())
                }
                // Not acked: a resend finds the backend's task (or its states in the outbox) and
                // starts nothing.
                Err(e) => Err(e),
            };
        }
        match outbox.insert_spawn(backend, &spawn, now).await? {
            SpawnInsert::Duplicate => {
                tracing::debug!(%backend, action = %spawn.action_id, "Spawn already applied");
            }
            SpawnInsert::Inserted => self.start(backend, spawn, received),
        }
        Ok(())
    }

    /// Starts supervising a new backend.
    fn start(&self, backend: &BackendId, spawn: SpawnRecord, received: Instant) {
        tracing::info!(%backend, executable = %spawn.executable.kind(), "Spawning backend");
        self.inner.metrics.record_spawn();
        self.launch(backend.clone(), spawn, Launch::Fresh { received });
    }

    /// Applies a terminate action. `Ok` means the action may be acked.
    pub async fn terminate(
        &self,
        action: &ActionId,
        backend: &BackendId,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> Result<(), OutboxError> {
        if let Some(sender) = self.live_sender(backend) {
            let (applied, done) = oneshot::channel();
            let command = Command::Terminate {
                kind,
                reason,
                applied,
            };
            if sender.send(command).await.is_ok() && done.await.is_ok() {
                return Ok(());
            }
            // The task ended meanwhile: the backend is terminated (see below).
        }
        match self.inner.outbox.backend(backend).await? {
            Some(known) if known.state.status() == BackendStatus::Terminated => {
                tracing::debug!(%backend, %action, "Terminate for a terminated backend");
                Ok(())
            }
            known => {
                tracing::info!(%backend, %action, "Terminate for a backend this drone does not run");
                for executor in &self.inner.executors {
                    let runtime = known.as_ref().and_then(|k| k.runtime.as_ref());
                    if let Err(e) = executor.remove(backend, runtime).await {
                        tracing::warn!(%backend, error = %e, "Failed to remove unknown backend");
                    }
                }
                // Plane reports such a backend as last seen `ready`.
                let assumed = known.map(|k| k.state).unwrap_or(BackendState::Ready {
                    address: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                });
                let message = "the drone has no running backend with this id".to_string();
                self.record_lost(backend, &assumed, message).await
            }
        }
    }

    /// Passes the controller's answer to a key renewal to the backend's task.
    pub fn key_renewed(&self, backend: &BackendId, deadlines: Option<KeyDeadlines>) {
        match self.live_sender(backend) {
            Some(sender) => {
                if sender.try_send(Command::Renewed(deadlines)).is_err() {
                    tracing::debug!(%backend, "Dropping key renewal answer: backend task is busy");
                }
            }
            None => tracing::debug!(%backend, "Key renewal answer for a backend no longer running"),
        }
    }

    /// At startup: re-adopts the unfinished backends of a previous run, reports the ones that exited
    /// meanwhile with their exit code, and reports the rest terminated (reason `lost`) after their
    /// executor removed what was left. The events stay in the outbox until the controller acks them.
    pub async fn recover(&self) -> Result<(), OutboxError> {
        for stored in self.inner.outbox.unfinished_backends().await? {
            self.recover_one(stored).await?;
        }
        Ok(())
    }

    async fn recover_one(&self, stored: StoredBackend) -> Result<(), OutboxError> {
        let id = stored.id.clone();
        let executor = stored
            .spawn
            .as_ref()
            .and_then(|s| self.executor(s.executable.kind()));
        let (Some(spawn), Some(executor)) = (stored.spawn.clone(), executor) else {
            let message = "the drone restarted without an executor for this backend".to_string();
            return self.record_lost(&id, &stored.state, message).await;
        };
        let runtime = stored.runtime.as_ref();
        let adopted = if stored.state.status() < BackendStatus::Starting {
            executor
                .remove(&id, runtime)
                .await
                .map(|()| Reattached::Gone)
        } else {
            executor.reattach(&id, runtime).await
        };
        match adopted {
            Ok(Reattached::Running(started)) => {
                tracing::info!(backend = %id, status = %stored.state.status(), "Re-adopted backend");
                let resumed = Resumed {
                    state: stored.state,
                    deadlines: stored.deadlines.unwrap_or(spawn.key.deadlines),
                    started,
                };
                self.launch(id, spawn, Launch::Resumed(resumed));
                Ok(())
            }
            Ok(Reattached::Exited {
                exit_code,
                oom_killed,
            }) => {
                tracing::info!(backend = %id, ?exit_code, "Backend of a previous run exited meanwhile");
                let exited = Transition::Exited {
                    exit_code,
                    oom_killed,
                };
                match stored.state.apply(exited) {
                    Ok(state) => {
                        let outbox = &self.inner.outbox;
                        outbox.record_state(&id, &state, Millis::now()).await?;
                        self.inner.metrics.record_terminated(&state);
                        outbox.set_runtime(&id, None).await
                    }
                    Err(e) => {
                        tracing::debug!(backend = %id, error = %e, "Not reporting backend exited");
                        Ok(())
                    }
                }
            }
            Ok(Reattached::Gone) => {
                tracing::info!(backend = %id, "Backend of a previous run is gone");
                let message = "the drone restarted and could not re-adopt the backend".to_string();
                self.record_lost(&id, &stored.state, message).await
            }
            Err(e) => {
                tracing::warn!(backend = %id, error = %e, "Failed to re-adopt or remove backend");
                let message =
                    format!("the drone restarted and could not re-adopt the backend: {e}");
                self.record_lost(&id, &stored.state, message).await
            }
        }
    }

    async fn record_lost(
        &self,
        backend: &BackendId,
        from: &BackendState,
        message: String,
    ) -> Result<(), OutboxError> {
        let failed = Transition::Failed {
            reason: TerminationReason::Lost,
            message,
        };
        match from.apply(failed) {
            Ok(state) => {
                self.inner
                    .outbox
                    .record_state(backend, &state, Millis::now())
                    .await?;
                self.inner.metrics.record_terminated(&state);
            }
            // Already terminated: nothing to report.
            Err(e) => tracing::debug!(%backend, error = %e, "Not reporting backend lost"),
        }
        Ok(())
    }

    /// Starts the task of a new backend, or of a re-adopted one.
    fn launch(&self, id: BackendId, spawn: SpawnRecord, launch: Launch) {
        let (state, deadlines, started, received) = match launch {
            Launch::Resumed(r) => (r.state, r.deadlines, Some(r.started), None),
            Launch::Fresh { received } => (
                BackendState::Scheduled,
                spawn.key.deadlines,
                None,
                Some(received),
            ),
        };
        self.inner.metrics.backend_supervised(state.status());
        let executor = self.executor(spawn.executable.kind());
        let spec = BackendSpec {
            id: id.clone(),
            executable: spawn.executable,
            key: spawn.key.key.name,
            fencing_token: spawn.key.token,
            static_token: spawn.static_token,
        };
        let (sender, commands) = mpsc::channel(COMMAND_CAPACITY);
        match self.inner.live.lock() {
            Ok(mut live) => live.insert(id.clone(), sender),
            Err(poisoned) => poisoned.into_inner().insert(id.clone(), sender),
        };
        let task = BackendTask {
            id,
            state,
            key: KeyManager::new(&deadlines, Millis::now(), Instant::now()),
            commands,
            supervisors: self.clone(),
            kill_at: None,
            spawn_received: received,
            unrecorded: Vec::new(),
        };
        let offered = self.inner.executors.iter().map(|e| e.kind()).collect();
        self.inner
            .tracker
            .spawn(task.run(executor, spec, started, offered));
    }

    fn ended(&self, backend: &BackendId) {
        match self.inner.live.lock() {
            Ok(mut live) => live.remove(backend),
            Err(poisoned) => poisoned.into_inner().remove(backend),
        };
    }

    /// Stops supervising: backends of executors whose backends die with the drone are terminated
    /// (soft, with reason `lost`; their `terminated` events land in the outbox), the others are left
    /// running for the next drone run to re-adopt. After `wait`, remaining tasks are detached.
    /// Hard-terminates (SIGKILL) every backend that a shutdown terminates, without waiting: the rest
    /// of the shutdown's grace period is skipped. Backends that outlive the drone are left alone.
    pub async fn kill_all(&self) {
        self.send_shutdown(TerminationKind::Hard).await;
    }

    async fn send_shutdown(&self, kind: TerminationKind) {
        let senders: Vec<_> = match self.inner.live.lock() {
            Ok(live) => live.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        };
        for sender in senders {
            let _ = sender.send(Command::DroneShutdown(kind)).await;
        }
    }

    pub async fn shutdown(&self, wait: Duration) {
        self.send_shutdown(TerminationKind::Soft).await;
        self.inner.tracker.close();
        if tokio::time::timeout(wait, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                backends = self.live_count(),
                "Backends did not stop in time; leaving them"
            );
            self.inner.detach.cancel();
            self.inner.tracker.wait().await;
        }
    }
}

#[cfg(test)]
mod tests;
