//! Whole drones offering Docker against a fake controller: the lifecycle, metrics, out-of-memory and
//! image errors as the controller sees them, and drones that crash or restart while containers run.

use super::run::{docker, TestRun};
use super::{container_exists, docker_test};
use crate::drive::{
    config_for, events_of_until, soft_terminated, spawn_with, start_drone, statuses, terminate,
    terminated, with_state_file, CrashableDrone, SOFT_STOP, TO_READY,
};
use crate::fake_controller::{Event, FakeConnection, FakeController};
use crate::probe::get_json;
use hangar_drone::executor::docker::container_name;
use hangar_drone::{DroneConfig, DroneHandle};
use hangar_types::executable::{DockerExecutable, Executable, ExecutorKind};
use hangar_types::protocol::{BackendAction, DroneToController, KeyDeadlines};
use hangar_types::state::OUT_OF_MEMORY_MESSAGE;
use hangar_types::{
    BackendId, BackendState, BackendStatus, Millis, TerminationKind, TerminationReason,
};

fn config(fake: &FakeController) -> DroneConfig {
    config_for(fake, ExecutorKind::Docker)
}

/// A test run, and a fake controller with a Docker drone connected to it.
async fn started() -> (TestRun, FakeController, DroneHandle, FakeConnection) {
    let run = TestRun::new();
    let mut fake = FakeController::start().await;
    let config = config(&fake);
    let (drone, conn) = start_drone(&mut fake, config).await;
    (run, fake, drone, conn)
}

fn spawn(exe: DockerExecutable) -> BackendAction {
    spawn_with(
        Executable::Docker(Box::new(exe)),
        KeyDeadlines::from_base(Millis::now()),
    )
}

/// Backend events of `backend` until one with `status` (metrics and other backends' events skipped).
async fn events_until(
    conn: &mut FakeConnection,
    backend: &BackendId,
    status: BackendStatus,
) -> Vec<Event> {
    events_of_until(conn, Some(backend), status).await
}

#[tokio::test]
async fn docker_backend_lifecycle_with_metrics() {
    docker_test(async {
        let (run, _fake, drone, mut conn) = started().await;
        let backend = BackendId::random();
        conn.send_action(&backend, spawn(run.executable(&[])));
        // Events up to ready, and a memory sample (taken at once, so maybe before `ready`).
        let mut events = Vec::new();
        let mut mem_used = None;
        while mem_used.is_none()
            || events.last().map(|e: &Event| e.state.status()) != Some(BackendStatus::Ready)
        {
            match conn.next().await {
                DroneToController::BackendEvent {
                    event_id,
                    backend_id,
                    state,
                    timestamp,
                } => {
                    assert_eq!(backend_id, backend);
                    events.push(Event {
                        event_id,
                        backend_id,
                        state,
                        timestamp,
                    });
                }
                DroneToController::BackendMetrics {
                    backend_id,
                    mem_used: used,
                    ..
                } => {
                    assert_eq!(backend_id, backend);
                    mem_used = Some(used);
                }
                _ => {}
            }
        }
        assert!(mem_used > Some(0));
        assert_eq!(statuses(&events), TO_READY);
        let address = events[4].state.address().unwrap();
        assert_eq!(get_json(address, "/env").await["PORT"], "8080");

        conn.send_action(&backend, terminate(TerminationKind::Soft));
        let events = events_until(&mut conn, &backend, BackendStatus::Terminated).await;
        assert_eq!(events.last().unwrap().state, soft_terminated(0));
        assert!(!container_exists(&container_name(&backend)));

        // Without a state file nothing could re-adopt a container: shutdown terminates them.
        let left = BackendId::random();
        conn.send_action(&left, spawn(run.executable(&[])));
        events_until(&mut conn, &left, BackendStatus::Ready).await;
        conn.shutdown_drone(drone).await;
        assert!(run.containers().is_empty());
    })
    .await;
}

#[tokio::test]
async fn out_of_memory_and_missing_images_reach_the_controller() {
    docker_test(async {
        let (run, _fake, drone, mut conn) = started().await;

        let missing = BackendId::random();
        let exe = run.executable_with(
            &[],
            serde_json::json!({"image": "hangar-test-missing-image:never", "pull_policy": "Never"}),
        );
        conn.send_action(&missing, spawn(exe));
        let events = events_until(&mut conn, &missing, BackendStatus::Terminated).await;
        assert_eq!(
            events.last().unwrap().state,
            BackendState::Terminated {
                last_status: BackendStatus::Loading,
                termination: None,
                reason: Some(TerminationReason::InternalError),
                exit_code: None,
                message: Some(
                    "image hangar-test-missing-image:never is not present and pull_policy is Never"
                        .into()
                ),
                oom_killed: false,
            }
        );

        let hungry = BackendId::random();
        let exe = run.executable_with(
            &[],
            serde_json::json!({"resource_limits": {"memory_limit_bytes": 64 * 1024 * 1024}}),
        );
        conn.send_action(&hungry, spawn(exe));
        let ready = events_until(&mut conn, &hungry, BackendStatus::Ready).await;
        let address = ready.last().unwrap().state.address().unwrap();
        let _ = reqwest::Client::new()
            .post(format!("http://{address}/alloc/512"))
            .send()
            .await;
        let events = events_until(&mut conn, &hungry, BackendStatus::Terminated).await;
        let terminated = &events.last().unwrap().state;
        assert_eq!(
            *terminated,
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: None,
                reason: None,
                exit_code: Some(137),
                message: Some(OUT_OF_MEMORY_MESSAGE.into()),
                oom_killed: true,
            }
        );
        let entry = serde_json::to_value(terminated.to_status_entry(Millis(0))).unwrap();
        assert_eq!(entry["oom_killed"], true);
        assert!(entry["message"].as_str().unwrap().contains("out of memory"));
        conn.shutdown_drone(drone).await;
    })
    .await;
}

/// A drone with a state file, started so that it can crash, and a ready container of it: where the
/// tests of a crashed Docker drone start.
struct CrashingDrone {
    run: TestRun,
    fake: FakeController,
    _state: tempfile::TempDir,
    config: DroneConfig,
    drone: CrashableDrone,
    conn: FakeConnection,
    backend: BackendId,
    /// The container's events up to `Ready`, not acked.
    ready: Vec<Event>,
}

impl CrashingDrone {
    async fn start() -> CrashingDrone {
        let run = TestRun::new();
        let mut fake = FakeController::start().await;
        let state = tempfile::tempdir().unwrap();
        let config = with_state_file(config(&fake), state.path());
        let (drone, mut conn) = CrashableDrone::start(&mut fake, config.clone()).await;
        let backend = BackendId::random();
        conn.send_action(&backend, spawn(run.executable(&[])));
        let ready = events_until(&mut conn, &backend, BackendStatus::Ready).await;
        CrashingDrone {
            run,
            fake,
            _state: state,
            config,
            drone,
            conn,
            backend,
            ready,
        }
    }
}

#[tokio::test]
async fn crashed_drone_readopts_its_running_container() {
    docker_test(async {
        let CrashingDrone {
            run,
            mut fake,
            config,
            drone: first,
            mut conn,
            backend,
            ready: events,
            _state,
        } = CrashingDrone::start().await;
        let address = events.last().unwrap().state.address().unwrap();
        first.crash().await;
        conn.closed().await;
        // The container survived the drone.
        get_json(address, "/env").await;

        // The next run replays what was not acked and takes the backend back: no terminated event.
        let (drone, mut conn) = start_drone(&mut fake, config.clone()).await;
        let replayed = events_until(&mut conn, &backend, BackendStatus::Ready).await;
        let ids = |events: &[Event]| events.iter().map(|e| e.event_id).collect::<Vec<_>>();
        assert_eq!(ids(&replayed), ids(&events));
        for event in &replayed {
            conn.ack(event.event_id);
        }
        assert_eq!(
            get_json(address, "/env").await["SESSION_BACKEND_ID"],
            backend.as_str()
        );
        // A graceful shutdown of a drone with a state file leaves the container running too.
        conn.shutdown_drone(drone).await;
        assert!(container_exists(&container_name(&backend)));

        let (drone, mut conn) = start_drone(&mut fake, config).await;
        conn.send_action(&backend, terminate(TerminationKind::Soft));
        let events = events_until(&mut conn, &backend, BackendStatus::Terminated).await;
        assert_eq!(statuses(&events), SOFT_STOP);
        assert!(matches!(
            events[1].state,
            BackendState::Terminated {
                exit_code: Some(0),
                reason: Some(TerminationReason::External),
                ..
            }
        ));
        conn.shutdown_drone(drone).await;
        assert!(
            run.containers().is_empty(),
            "containers left: {:?}",
            run.containers()
        );
    })
    .await;
}

#[tokio::test]
async fn container_that_stopped_while_the_drone_was_down_is_reported_with_its_exit_code() {
    docker_test(async {
        let crashing = CrashingDrone::start().await;
        let (run, mut fake, config) = (crashing.run, crashing.fake, crashing.config);
        let (first, mut conn, backend) = (crashing.drone, crashing.conn, crashing.backend);
        let events = crashing.ready;
        for event in &events {
            conn.ack(event.event_id);
        }
        // Make sure the acks were applied before the crash: a spawn barrier is acked after them.
        let barrier = conn.send_action(&backend, spawn(run.executable(&[])));
        conn.wait_ack(&barrier).await;
        first.crash().await;
        conn.closed().await;
        docker(&["kill", &container_name(&backend)]).unwrap();
        // A container of this drone that no backend claims (a start cut short by the crash).
        let orphan = format!("hangar-test-orphan-{}", run.id);
        let drone_label = format!("dev.hangar.drone={}", config.name);
        docker(&[
            "create",
            "--name",
            &orphan,
            "--label",
            &run.label(),
            "--label",
            &drone_label,
            "--label",
            "dev.hangar.backend=nobody",
            super::run::TEST_IMAGE,
        ])
        .unwrap();

        let (drone, mut conn) = start_drone(&mut fake, config).await;
        let event = conn.next_event().await;
        assert_eq!(event.backend_id, backend);
        assert_eq!(
            event.state,
            terminated(BackendStatus::Ready, None, None, Some(137),)
        );
        assert!(
            run.containers().is_empty(),
            "containers left: {:?}",
            run.containers()
        );
        conn.shutdown_drone(drone).await;
    })
    .await;
}
