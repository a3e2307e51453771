//! Whole drones (`hangar_drone::start`) against a fake controller, running real test backends.

use crate::drive::{
    soft_terminated, spawn_executable, spawn_with, started, statuses, terminated, termination_of,
    with_adjusted_drone, with_drone, with_state_file, CrashableDrone, SOFT_STOP, TO_READY,
};
use crate::fake_controller::{Event, FakeController};
use hangar_drone::DroneConfig;
use hangar_test_support::{process_executable, IGNORING_SIGTERM};
use hangar_types::executable::Executable;
use hangar_types::protocol::{
    ActionMessage, BackendAction, ControllerToDrone, DroneToController, KeyDeadlines,
};
use hangar_types::{
    BackendId, BackendState, BackendStatus, Millis, TerminationKind, TerminationReason,
};
use std::time::Duration;
use tokio::time::Instant;

// Kept under their old paths for the tests of other executors.
pub(crate) use crate::drive::{config, events_until, spawn, start_drone, terminate, with_timeout};

async fn answers_http(address: std::net::SocketAddr) -> bool {
    reqwest::get(format!("http://{address}/")).await.is_ok()
}

#[tokio::test]
async fn spawn_reports_states_replays_until_acked_and_terminates() {
    with_timeout(async {
        let (mut fake, drone, mut conn) = started().await;
        let backend = BackendId::random();
        let action = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&action).await;
        let events = events_until(&mut conn, BackendStatus::Ready).await;
        assert_eq!(statuses(&events), TO_READY);
        assert!(events.iter().all(|e| e.backend_id == backend));
        assert!(events.windows(2).all(|w| w[0].event_id < w[1].event_id));
        let address = events[4].state.address().unwrap();
        assert_eq!(events[3].state.address(), Some(address));
        assert!(answers_http(address).await);

        // The drone drops the connection: everything unacked is replayed, in order.
        drone.reconnect();
        conn.closed().await;
        let mut conn = fake.next_connection().await;
        let replayed = events_until(&mut conn, BackendStatus::Ready).await;
        let ids = |events: &[Event]| events.iter().map(|e| e.event_id).collect::<Vec<_>>();
        assert_eq!(ids(&replayed), ids(&events));
        assert_eq!(statuses(&replayed), statuses(&events));

        // The controller drops it without acking: replayed again. Then acked.
        drop(conn);
        let mut conn = fake.next_connection().await;
        let replayed = events_until(&mut conn, BackendStatus::Ready).await;
        assert_eq!(ids(&replayed), ids(&events));
        for event in &replayed {
            conn.ack(event.event_id);
        }
        // A duplicate spawn is acked without events, and only after the acks before it were
        // handled: once it is acked, cutting the connection cannot lose them.
        let barrier = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&barrier).await;
        drop(conn);

        // Acked events are not sent again: the first event now is the termination.
        let mut conn = fake.next_connection().await;
        let action = conn.send_action(&backend, terminate(TerminationKind::Soft));
        let events = conn.events_until_terminated().await;
        assert_eq!(statuses(&events), SOFT_STOP);
        assert_eq!(events[1].state, soft_terminated(0));
        conn.wait_ack(&action).await;
        assert!(!answers_http(address).await);
        for event in &events {
            conn.ack(event.event_id);
        }
        conn.shutdown_drone(drone).await;
    })
    .await;
}

/// Events the controller leaves unacked while the connection stays up (it could not record them) are
/// sent again on that connection, oldest first, after `EVENT_RESEND_INTERVAL` (at most two); once
/// acked, never again.
#[tokio::test]
async fn unacked_events_are_sent_again_on_the_same_connection() {
    use hangar_types::timing::EVENT_RESEND_INTERVAL;
    with_timeout(async {
        let (_fake, drone, mut conn) = started().await;
        let backend = BackendId::random();
        let action = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&action).await;
        let events = events_until(&mut conn, BackendStatus::Ready).await;
        let ids = |events: &[Event]| events.iter().map(|e| e.event_id).collect::<Vec<_>>();

        // Nothing acked: the same events come again, in order, on this connection.
        let mut resent = Vec::new();
        while resent.len() < events.len() {
            resent.push(conn.next_sent_event().await);
        }
        assert_eq!(ids(&resent), ids(&events));
        assert_eq!(statuses(&resent), statuses(&events));

        // Acked: nothing is sent again, however long the connection lasts.
        for event in &events {
            conn.ack(event.event_id);
        }
        let quiet =
            tokio::time::timeout(EVENT_RESEND_INTERVAL * 2 + Duration::from_secs(1), async {
                conn.next_sent_event().await
            })
            .await;
        assert!(quiet.is_err(), "an acked event was sent again: {quiet:?}");
        conn.shutdown_drone(drone).await;
    })
    .await;
}

#[tokio::test]
async fn executable_of_another_kind_fails_at_once() {
    with_drone(async |conn, backend| {
        let image = Executable::from_json(&serde_json::json!({"image": "app:1"})).unwrap();
        let action = conn.send_action(&backend, spawn_executable(image));
        conn.wait_ack(&action).await;
        let events = conn.events_until_terminated().await;
        assert_eq!(
            statuses(&events),
            [BackendStatus::Scheduled, BackendStatus::Terminated]
        );
        assert_eq!(
            events[1].state,
            BackendState::Terminated {
                last_status: BackendStatus::Scheduled,
                termination: None,
                reason: Some(TerminationReason::InternalError),
                exit_code: None,
                message: Some(
                    "this drone cannot run Docker images (executors offered: process)".into()
                ),
                oom_killed: false,
            }
        );
    })
    .await;
}

#[tokio::test]
async fn missing_program_is_reported_with_its_message() {
    with_drone(async |conn, backend| {
        let exe =
            Executable::from_json(&serde_json::json!({"command": ["/nonexistent/prog"]})).unwrap();
        conn.send_action(&backend, spawn_executable(exe));
        let events = conn.events_until_terminated().await;
        assert_eq!(
            statuses(&events),
            [&TO_READY[..2], &[BackendStatus::Terminated]].concat()
        );
        assert_eq!(
            termination_of(&events[2].state),
            (
                BackendStatus::Loading,
                Some(TerminationReason::InternalError),
                Some("cannot start `/nonexistent/prog`: No such file or directory")
            )
        );
    })
    .await;
}

#[tokio::test]
async fn backend_exiting_by_itself_reports_its_exit_code() {
    with_drone(async |conn, backend| {
        conn.send_action(
            &backend,
            spawn(&[
                ("TEST_BACKEND_EXIT_CODE", "3"),
                ("TEST_BACKEND_EXIT_AFTER_MS", "500"),
            ]),
        );
        let events = conn.events_until_terminated().await;
        let BackendState::Terminated {
            termination,
            reason,
            exit_code,
            ..
        } = &events.last().unwrap().state
        else {
            unreachable!()
        };
        assert_eq!((*termination, *reason, *exit_code), (None, None, Some(3)));
    })
    .await;
}

#[tokio::test]
async fn backend_that_never_listens_times_out() {
    let adjust = |c: &mut DroneConfig| c.readiness_timeout = Duration::from_millis(500);
    with_adjusted_drone(adjust, async |conn, backend| {
        conn.send_action(&backend, spawn(&[("TEST_BACKEND_NEVER_LISTEN", "1")]));
        let events = conn.events_until_terminated().await;
        let hard_stop = [BackendStatus::HardTerminating, BackendStatus::Terminated];
        assert_eq!(statuses(&events), [&TO_READY[..4], &hard_stop].concat());
        assert_eq!(
            events[5].state,
            terminated(
                BackendStatus::Waiting,
                Some(TerminationKind::Hard),
                Some(TerminationReason::StartupTimeout),
                Some(137),
            )
        );
    })
    .await;
}

#[tokio::test]
async fn ignored_sigterm_is_followed_by_sigkill_after_the_grace_period() {
    let adjust = |c: &mut DroneConfig| c.soft_terminate_grace = Duration::from_millis(300);
    with_adjusted_drone(adjust, async |conn, backend| {
        conn.send_action(&backend, spawn(IGNORING_SIGTERM));
        events_until(conn, BackendStatus::Ready).await;
        let started = Instant::now();
        conn.send_action(&backend, terminate(TerminationKind::Soft));
        let events = conn.events_until_terminated().await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(events.last().unwrap().state, soft_terminated(137));
    })
    .await;
}

#[tokio::test]
async fn resent_spawns_are_acked_but_not_started_twice() {
    with_drone(async |conn, backend| {
        let action = ActionMessage {
            action_id: hangar_types::ActionId::random(),
            backend_id: backend.clone(),
            action: spawn(&[]),
        };
        conn.send(ControllerToDrone::Action(action.clone()));
        conn.wait_ack(&action.action_id).await;
        events_until(conn, BackendStatus::Ready).await;
        // The same action again, then a new action for the same backend.
        conn.send(ControllerToDrone::Action(action.clone()));
        conn.wait_acks(&action.action_id, 2).await;
        let again = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&again).await;
        let stop = conn.send_action(&backend, terminate(TerminationKind::Hard));
        conn.wait_ack(&stop).await;
        let events = conn.events_until_terminated().await;
        assert_eq!(
            statuses(&events),
            [BackendStatus::HardTerminating, BackendStatus::Terminated]
        );
    })
    .await;
}

#[tokio::test]
async fn terminate_for_an_unknown_backend_reports_it_lost() {
    with_drone(async |conn, backend| {
        let action = conn.send_action(&backend, terminate(TerminationKind::Soft));
        conn.wait_ack(&action).await;
        let event = conn.next_event().await;
        assert_eq!(event.backend_id, backend);
        let BackendState::Terminated {
            last_status,
            reason,
            termination,
            exit_code,
            ..
        } = event.state
        else {
            panic!("expected terminated, got {:?}", event.state)
        };
        assert_eq!(last_status, BackendStatus::Ready);
        assert_eq!(reason, Some(TerminationReason::Lost));
        assert_eq!((termination, exit_code), (None, None));
    })
    .await;
}

/// Spawn the test backend with its key due for renewal at once and the soft deadline `soft_in` from
/// now.
fn spawn_renewing_at_once(soft_in: Duration) -> BackendAction {
    let now = Millis::now();
    let deadlines = KeyDeadlines {
        renew_at: now,
        soft_terminate_at: now.plus(soft_in),
        hard_terminate_at: now.plus(Duration::from_secs(60)),
    };
    spawn_with(process_executable(&[]), deadlines)
}

#[tokio::test]
async fn unrenewed_key_terminates_the_backend() {
    with_drone(async |conn, backend| {
        conn.send_action(&backend, spawn_renewing_at_once(Duration::from_secs(2)));
        let mut events = Vec::new();
        loop {
            match conn.next().await {
                DroneToController::RenewKey { backend: b, .. } => {
                    assert_eq!(b, backend);
                    // Refused: the drone lets the backend run into its deadlines.
                    conn.answer_renewal(&backend, None);
                }
                DroneToController::BackendEvent { state, .. } => {
                    let done = state.status() == BackendStatus::Terminated;
                    events.push(state);
                    if done {
                        break;
                    }
                }
                _ => {}
            }
        }
        let terminating = events
            .iter()
            .find(|s| s.status() == BackendStatus::Terminating)
            .expect("no terminating state");
        assert!(matches!(
            terminating,
            BackendState::Terminating {
                reason: TerminationReason::KeyExpired,
                ..
            }
        ));
        assert!(matches!(
            events.last().unwrap(),
            BackendState::Terminated {
                reason: Some(TerminationReason::KeyExpired),
                exit_code: Some(0),
                ..
            }
        ));
    })
    .await;
}

#[tokio::test]
async fn renewed_key_replaces_the_deadlines() {
    with_drone(async |conn, backend| {
        conn.send_action(&backend, spawn_renewing_at_once(Duration::from_secs(3)));
        let mut renewals = 0;
        while renewals < 2 {
            match conn.next().await {
                DroneToController::RenewKey { local_time, .. } => {
                    renewals += 1;
                    // The next renewal is due after the old soft deadline: only the new deadlines
                    // can bring it before any termination.
                    let deadlines = KeyDeadlines {
                        renew_at: local_time.plus(Duration::from_secs(4)),
                        soft_terminate_at: local_time.plus(Duration::from_secs(60)),
                        hard_terminate_at: local_time.plus(Duration::from_secs(70)),
                    };
                    conn.answer_renewal(&backend, Some(deadlines));
                }
                DroneToController::BackendEvent { state, .. } => {
                    assert!(state.status() <= BackendStatus::Ready, "{state:?}");
                }
                _ => {}
            }
        }
    })
    .await;
}

#[tokio::test]
async fn shutdown_terminates_backends_and_waits_for_acks() {
    with_timeout(async {
        let (_fake, drone, mut conn) = started().await;
        let backend = BackendId::random();
        conn.send_action(&backend, spawn(&[]));
        let events = events_until(&mut conn, BackendStatus::Ready).await;
        let address = events.last().unwrap().state.address().unwrap();
        for event in &events {
            conn.ack(event.event_id);
        }
        let shutdown = tokio::spawn(drone.shutdown());
        let events = conn.events_until_terminated().await;
        assert_eq!(statuses(&events), SOFT_STOP);
        assert!(matches!(
            events[1].state,
            BackendState::Terminated {
                termination: Some(TerminationKind::Soft),
                reason: Some(TerminationReason::Lost),
                exit_code: Some(0),
                ..
            }
        ));
        assert!(!shutdown.is_finished());
        for event in &events {
            conn.ack(event.event_id);
        }
        shutdown.await.unwrap();
        conn.closed().await;
        assert!(!answers_http(address).await);
    })
    .await;
}

#[tokio::test]
async fn restarted_drone_reports_backends_of_the_crashed_one_lost() {
    with_timeout(async {
        let mut fake = FakeController::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = with_state_file(config(&fake), dir.path());

        // The first drone runs on its own runtime, which is dropped mid-flight: a crash.
        let (first, mut conn) = CrashableDrone::start(&mut fake, config.clone()).await;
        let backend = BackendId::random();
        conn.send_action(&backend, spawn(&[]));
        let events = events_until(&mut conn, BackendStatus::Ready).await;
        first.crash().await;
        conn.closed().await;

        // The second drone replays what was not acked, then reports the backend lost.
        let (drone, mut conn) = start_drone(&mut fake, config).await;
        let replayed = conn.events_until_terminated().await;
        let ids = |events: &[Event]| events.iter().map(|e| e.event_id).collect::<Vec<_>>();
        assert_eq!(ids(&replayed)[..5], ids(&events)[..]);
        assert_eq!(
            statuses(&replayed),
            [&TO_READY[..], &[BackendStatus::Terminated]].concat()
        );
        let (last_status, reason, message) = termination_of(&replayed[5].state);
        assert_eq!(
            (last_status, reason),
            (BackendStatus::Ready, Some(TerminationReason::Lost))
        );
        assert!(message.unwrap_or("").contains("re-adopt"));
        // A resent spawn for it is acked without starting anything.
        let again = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&again).await;
        conn.shutdown_drone(drone).await;
    })
    .await;
}
