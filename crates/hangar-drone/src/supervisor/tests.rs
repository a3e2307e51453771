use super::*;
use crate::executor::ExecutorError;
use async_trait::async_trait;
use hangar_types::api::KeyConfig;
use hangar_types::executable::Executable;
use hangar_types::protocol::AcquiredKey;
use sqlx::{ConnectOptions, Connection};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, Semaphore};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A process-kind executor whose `start` waits until the test opens the gate, then fails.
struct GatedExecutor {
    recorded_first: bool,
    entered: Notify,
    gate: Semaphore,
    /// How many starts were entered.
    starts: AtomicUsize,
}

impl GatedExecutor {
    fn new(recorded_first: bool) -> Arc<Self> {
        Arc::new(GatedExecutor {
            recorded_first,
            entered: Notify::new(),
            gate: Semaphore::new(0),
            starts: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Executor for GatedExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }

    fn backends_outlive_drone(&self) -> bool {
        false
    }

    fn start_must_be_recorded_first(&self) -> bool {
        self.recorded_first
    }

    async fn prepare(&self, _spec: &BackendSpec) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn start(&self, _spec: &BackendSpec) -> Result<Started, ExecutorError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.entered.notify_one();
        let _open = self.gate.acquire().await;
        Err(ExecutorError::ProgramNotFound {
            program: "gated".into(),
        })
    }

    async fn reattach(
        &self,
        _backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<Reattached, ExecutorError> {
        Ok(Reattached::Gone)
    }

    async fn remove(
        &self,
        _backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<(), ExecutorError> {
        Ok(())
    }

    async fn shutdown(&self) {}
}

fn spawn_record() -> SpawnRecord {
    SpawnRecord {
        action_id: ActionId::random(),
        executable: Executable::from_json(&serde_json::json!({"command": ["gated"]})).unwrap(),
        key: AcquiredKey {
            key: KeyConfig {
                name: "k".parse().unwrap(),
                namespace: String::new(),
                tag: String::new(),
            },
            deadlines: KeyDeadlines::from_base(Millis::now()),
            token: 1,
        },
        static_token: None,
    }
}

fn supervisors(outbox: &Outbox, executor: &Arc<GatedExecutor>) -> Supervisors {
    let (outbound, _outbound) = mpsc::channel(8);
    let settings = SupervisorSettings {
        soft_terminate_grace: Duration::from_secs(10),
        readiness_timeout: Duration::from_secs(60),
        durable_state: false,
    };
    Supervisors::new(
        outbox.clone(),
        vec![executor.clone()],
        settings,
        outbound,
        Arc::new(DroneMetrics::new()),
    )
}

/// The outbox's events, as `(status, event id)` in id order.
async fn events(outbox: &Outbox) -> Vec<(BackendStatus, i64)> {
    let events = outbox.events_after(0, 100).await.unwrap();
    events
        .iter()
        .map(|e| (e.state.status(), e.event_id))
        .collect()
}

/// Spawns a backend on a [`GatedExecutor`]; returns the outbox's events while its start runs and
/// once it failed.
async fn events_during_and_after_start(
    recorded_first: bool,
) -> (Vec<(BackendStatus, i64)>, Vec<(BackendStatus, i64)>) {
    let outbox = Outbox::open(None).await.unwrap();
    let executor = GatedExecutor::new(recorded_first);
    let supervisors = supervisors(&outbox, &executor);
    let mut latest = outbox.subscribe();
    supervisors
        .spawn(&BackendId::random(), spawn_record())
        .await
        .unwrap();
    executor.entered.notified().await;
    let during = events(&outbox).await;
    executor.gate.add_permits(1);
    loop {
        let after = events(&outbox).await;
        if after.last().map(|e| e.0) == Some(BackendStatus::Terminated) {
            return (during, after);
        }
        latest.changed().await.unwrap();
    }
}

fn statuses(events: &[(BackendStatus, i64)]) -> Vec<BackendStatus> {
    events.iter().map(|e| e.0).collect()
}

const FAILED_START: [BackendStatus; 4] = [
    BackendStatus::Scheduled,
    BackendStatus::Loading,
    BackendStatus::Starting,
    BackendStatus::Terminated,
];

#[tokio::test]
async fn states_before_the_start_are_written_first_when_the_executor_needs_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (during, after) = events_during_and_after_start(true).await;
        assert_eq!(statuses(&during), FAILED_START[..3]);
        assert_eq!(statuses(&after), FAILED_START);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn states_before_the_start_are_written_with_the_next_one_otherwise() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (during, after) = events_during_and_after_start(false).await;
        assert_eq!(statuses(&during), [BackendStatus::Scheduled]);
        // Still every state, in order (ids increase with the order of the states).
        assert_eq!(statuses(&after), FAILED_START);
        assert!(after.windows(2).all(|w| w[0].1 < w[1].1), "{after:?}");
    })
    .await
    .unwrap();
}

/// A resent spawn (the same action, or a new action for the backend) while the first start is in
/// flight starts nothing, whether or not the start waits for the `scheduled` commit.
#[tokio::test]
async fn resent_spawn_during_the_start_starts_one_backend() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        for recorded_first in [false, true] {
            let outbox = Outbox::open(None).await.unwrap();
            let executor = GatedExecutor::new(recorded_first);
            let supervisors = supervisors(&outbox, &executor);
            let backend = BackendId::random();
            let first = spawn_record();
            supervisors.spawn(&backend, first.clone()).await.unwrap();
            executor.entered.notified().await;
            let new_action = SpawnRecord {
                action_id: ActionId::random(),
                ..first.clone()
            };
            supervisors.spawn(&backend, first.clone()).await.unwrap();
            supervisors.spawn(&backend, new_action).await.unwrap();
            assert_eq!(executor.starts.load(Ordering::SeqCst), 1);
            let mut latest = outbox.subscribe();
            executor.gate.add_permits(1);
            while events(&outbox).await.last().map(|e| e.0) != Some(BackendStatus::Terminated) {
                latest.changed().await.unwrap();
            }
            // Once the backend's task ended, the outbox still knows both actions.
            supervisors.spawn(&backend, first).await.unwrap();
            let other = SpawnRecord {
                action_id: ActionId::random(),
                ..spawn_record()
            };
            supervisors.spawn(&backend, other).await.unwrap();
            assert_eq!(executor.starts.load(Ordering::SeqCst), 1);
            assert_eq!(statuses(&events(&outbox).await), FAILED_START);
        }
    })
    .await
    .unwrap();
}

/// A process backend starts while its `scheduled` commit waits; a drone that dies before that
/// commit knows nothing of the backend after its restart (the backend died with it, the action
/// was not acked), and the controller's resend starts it again.
#[tokio::test]
async fn drone_dying_before_the_spawn_commit_starts_the_resent_spawn_after_restart() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drone.sqlite");
        let backend = BackendId::random();
        let spawn = spawn_record();
        {
            let outbox = Outbox::open(Some(&path)).await.unwrap();
            let executor = GatedExecutor::new(false);
            let supervisors = supervisors(&outbox, &executor);
            // Another process holds the file's write lock: the spawn's commit cannot happen.
            let mut other = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .connect()
                .await
                .unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut other)
                .await
                .unwrap();
            let applying = {
                let (supervisors, backend, spawn) =
                    (supervisors.clone(), backend.clone(), spawn.clone());
                tokio::spawn(async move { supervisors.spawn(&backend, spawn).await })
            };
            executor.entered.notified().await;
            assert_eq!(outbox.backend(&backend).await.unwrap(), None);
            assert!(!applying.is_finished(), "acked before its commit");
            // The drone dies here: nothing after this point runs.
            applying.abort();
            supervisors.inner.detach.cancel();
            other.close().await.unwrap();
            outbox.close().await;
        }
        let outbox = Outbox::open(Some(&path)).await.unwrap();
        let executor = GatedExecutor::new(false);
        let supervisors = supervisors(&outbox, &executor);
        supervisors.recover().await.unwrap();
        assert!(events(&outbox).await.is_empty());
        supervisors.spawn(&backend, spawn).await.unwrap();
        executor.entered.notified().await;
        assert_eq!(executor.starts.load(Ordering::SeqCst), 1);
        let stored = outbox.backend(&backend).await.unwrap().unwrap();
        assert_eq!(stored.state, BackendState::Scheduled);
        executor.gate.add_permits(1);
    })
    .await
    .unwrap();
}
