//! Driving a whole drone (`hangar_drone::start`) from the fake controller, for the session tests of
//! both executors: its configuration, the actions sent to it, and reading its backend events.

use crate::fake_controller::{Event, FakeConnection, FakeController};
use hangar_drone::DroneConfig;
use hangar_types::api::KeyConfig;
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::protocol::{
    AcquiredKey, BackendAction, DroneToController, KeyDeadlines, NodeHello,
};
use hangar_types::{
    BackendId, BackendState, BackendStatus, Millis, TerminationKind, TerminationReason,
};
use std::future::Future;
use std::time::Duration;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The statuses of a backend that started normally, in order.
pub const TO_READY: [BackendStatus; 5] = [
    BackendStatus::Scheduled,
    BackendStatus::Loading,
    BackendStatus::Starting,
    BackendStatus::Waiting,
    BackendStatus::Ready,
];

/// The statuses of a backend stopped softly, in order.
pub const SOFT_STOP: [BackendStatus; 2] = [BackendStatus::Terminating, BackendStatus::Terminated];

pub async fn with_timeout(test: impl Future<Output = ()>) {
    hangar_test_support::with_timeout(TEST_TIMEOUT, test).await;
}

/// A drone of cluster `localhost:9090` offering the process executor.
pub fn config(fake: &FakeController) -> DroneConfig {
    config_for(fake, ExecutorKind::Process)
}

/// A drone of cluster `localhost:9090` offering `executor`.
pub fn config_for(fake: &FakeController, executor: ExecutorKind) -> DroneConfig {
    let mut config = DroneConfig::new(fake.url(), "localhost:9090".parse().unwrap());
    config.executors = vec![executor];
    config.soft_terminate_grace = Duration::from_secs(10);
    config.readiness_timeout = Duration::from_secs(60);
    config
}

/// Spawn `executable` for key `room-1` with fencing token 7.
pub fn spawn_with(executable: Executable, deadlines: KeyDeadlines) -> BackendAction {
    BackendAction::Spawn {
        executable,
        key: AcquiredKey {
            key: KeyConfig::named("room-1".parse().unwrap()),
            deadlines,
            token: 7,
        },
        static_token: None,
    }
}

/// Spawn `executable` under deadlines from now.
pub fn spawn_executable(executable: Executable) -> BackendAction {
    spawn_with(executable, KeyDeadlines::from_base(Millis::now()))
}

/// Spawn the test backend as a process, with `env`, under deadlines from now.
pub fn spawn(env: &[(&str, &str)]) -> BackendAction {
    spawn_executable(hangar_test_support::process_executable(env))
}

/// Terminate, asked by the controller.
pub fn terminate(kind: TerminationKind) -> BackendAction {
    BackendAction::Terminate {
        kind,
        reason: TerminationReason::External,
    }
}

pub use hangar_test_support::soft_terminated_state as soft_terminated;
pub use hangar_test_support::terminated_state as terminated;

/// The status before termination, the reason and the message of a terminal `state`.
pub fn termination_of(
    state: &BackendState,
) -> (BackendStatus, Option<TerminationReason>, Option<&str>) {
    match state {
        BackendState::Terminated {
            last_status,
            reason,
            message,
            ..
        } => (*last_status, *reason, message.as_deref()),
        other => panic!("not a terminal state: {other:?}"),
    }
}

pub fn statuses(events: &[Event]) -> Vec<BackendStatus> {
    events.iter().map(|e| e.state.status()).collect()
}

/// Starts a drone and returns its first connection, checking the handshake and first heartbeat.
pub async fn start_drone(
    fake: &mut FakeController,
    config: DroneConfig,
) -> (hangar_drone::DroneHandle, FakeConnection) {
    crate::init_tracing();
    let offered = config.executors.clone();
    let drone = hangar_drone::start(config).await.unwrap();
    let mut conn = fake.next_connection().await;
    assert_eq!(conn.path, "/ctrl/c/localhost:9090/drone-socket");
    assert_eq!(conn.hello.protocol, hangar_types::PROTOCOL_VERSION);
    match &conn.hello.node {
        NodeHello::Drone {
            name,
            pool,
            executors,
        } => {
            assert_eq!(name, drone.name());
            assert_eq!(pool, "");
            assert_eq!(executors, &offered);
        }
        other => panic!("unexpected hello {other:?}"),
    }
    let first = conn.recv().await;
    assert!(
        matches!(first, Some(DroneToController::Heartbeat { .. })),
        "{first:?}"
    );
    (drone, conn)
}

/// A fake controller and a drone with [`config`] connected to it.
pub async fn started() -> (FakeController, hangar_drone::DroneHandle, FakeConnection) {
    started_with(|_| {}).await
}

/// A fake controller and a drone with [`config`] changed by `adjust` connected to it.
pub async fn started_with(
    adjust: impl FnOnce(&mut DroneConfig),
) -> (FakeController, hangar_drone::DroneHandle, FakeConnection) {
    let mut fake = FakeController::start().await;
    let mut config = config(&fake);
    adjust(&mut config);
    let (drone, conn) = start_drone(&mut fake, config).await;
    (fake, drone, conn)
}

/// Runs `test` with [`with_timeout`] on the first connection of a drone with [`config`], with a
/// backend id of its own; then shuts the drone down.
pub async fn with_drone(test: impl AsyncFnOnce(&mut FakeConnection, BackendId)) {
    with_adjusted_drone(|_| {}, test).await;
}

/// [`with_drone`] with [`config`] changed by `adjust`.
pub async fn with_adjusted_drone(
    adjust: impl FnOnce(&mut DroneConfig),
    test: impl AsyncFnOnce(&mut FakeConnection, BackendId),
) {
    with_timeout(async {
        let (_fake, drone, mut conn) = started_with(adjust).await;
        test(&mut conn, BackendId::random()).await;
        conn.shutdown_drone(drone).await;
    })
    .await;
}

/// `config` keeping the drone's state in a file in `dir`, as a drone that restarts does.
pub fn with_state_file(mut config: DroneConfig, dir: &std::path::Path) -> DroneConfig {
    config.state_file = Some(dir.join("drone.sqlite"));
    config
}

/// A drone on its own runtime in its own thread, which [`CrashableDrone::crash`] drops without a
/// shutdown, as a crash (SIGKILL) would.
pub struct CrashableDrone {
    crash: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl CrashableDrone {
    /// Starts the drone and returns it with its first connection to `fake`.
    pub async fn start(
        fake: &mut FakeController,
        config: DroneConfig,
    ) -> (CrashableDrone, FakeConnection) {
        let (crash, crashed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let drone = runtime.block_on(hangar_drone::start(config)).unwrap();
            crashed.recv().unwrap();
            drop(drone);
            drop(runtime);
        });
        (
            CrashableDrone { crash, thread },
            fake.next_connection().await,
        )
    }

    /// Drops the drone's runtime and waits until its thread has ended.
    pub async fn crash(self) {
        self.crash.send(()).unwrap();
        tokio::task::spawn_blocking(move || self.thread.join().unwrap())
            .await
            .unwrap();
    }
}

/// Reads backend events until one with `status`, of any backend.
pub async fn events_until(conn: &mut FakeConnection, status: BackendStatus) -> Vec<Event> {
    events_of_until(conn, None, status).await
}

/// Reads backend events until one with `status`, skipping other backends' when `backend` is given.
pub async fn events_of_until(
    conn: &mut FakeConnection,
    backend: Option<&BackendId>,
    status: BackendStatus,
) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = conn.next_event().await;
        if backend.is_some_and(|b| b != &event.backend_id) {
            continue;
        }
        let done = event.state.status() == status;
        events.push(event);
        if done {
            return events;
        }
    }
}
