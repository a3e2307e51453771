//! Drone sessions over real WebSockets: handshake, action delivery and resend, events, key renewal,
//! terminate actions and the sweeper.

use crate::support::*;
use hangar_controller::ControllerConfig;
use hangar_types::api::ConnectResponse;
use hangar_types::protocol::{
    BackendAction, ControllerToDrone, DroneToController, HelloResponse, KeyDeadlines, NodeHello,
    ProxyToController,
};
use hangar_types::{
    BackendId, BackendState, DroneName, Millis, ProxyName, TerminationKind, TerminationReason,
    PROTOCOL_VERSION,
};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn handshake_welcomes_a_drone_and_refuses_bad_hellos() {
    with_drone(async |ctl, drone| {
        assert!(drone.name.as_str().starts_with("dr-"));

        let path = format!("/ctrl/c/{CLUSTER}/drone-socket");
        let mut ws = ctl.ws_connect(&path).await;
        ws.send(&json!({"protocol": PROTOCOL_VERSION + 1, "version": "x",
            "node": {"Drone": {"name": "dr-abc", "pool": "", "executors": []}}}))
            .await;
        let answer: HelloResponse = ws.recv().await.unwrap();
        assert!(matches!(answer, HelloResponse::Refused { reason } if reason.contains("protocol")));
        assert!(
            ws.recv::<serde_json::Value>().await.is_none(),
            "socket must be closed"
        );

        let mut ws = ctl.ws_connect(&path).await;
        let answer = ws
            .hello(NodeHello::Proxy {
                name: ProxyName::random(),
            })
            .await;
        assert!(matches!(answer, HelloResponse::Refused { .. }));

        let mut ws = ctl.ws_connect(&path).await;
        ws.send_raw("garbage").await;
        let answer: HelloResponse = ws.recv().await.unwrap();
        assert!(matches!(answer, HelloResponse::Refused { reason } if reason.contains("Hello")));
    })
    .await
}

#[tokio::test]
async fn connect_delivers_spawn_with_deadlines_from_the_drone_clock() {
    with_drone(async |ctl, mut drone| {
        let base = Millis(1_000_000);
        drone
            .send(&DroneToController::Heartbeat { local_time: base })
            .await;
        // The heartbeat is stored before any later frame of the same session is handled.
        drone
            .report(1, &BackendId::random(), BackendState::Loading)
            .await;
        let connected = ctl.connect(&connect_body(Some("room"))).await;
        assert_eq!(connected.drone.as_ref(), Some(&drone.name));
        let spawn = drone.expect_spawn(&connected.backend_id).await;
        let BackendAction::Spawn {
            key,
            executable,
            static_token,
        } = spawn.action
        else {
            unreachable!()
        };
        assert_eq!(key.key.name.as_str(), "room");
        assert_eq!(key.deadlines, KeyDeadlines::from_base(base));
        assert!(key.token > 0);
        assert_eq!(
            executable.kind(),
            hangar_types::executable::ExecutorKind::Process
        );
        assert!(static_token.is_none());
    })
    .await
}

#[tokio::test]
async fn get_or_create_is_per_key_and_namespace() {
    with_drone(async |ctl, _drone| {
        let a = ctl.connect(&connect_body(Some("k1"))).await;
        let a_again = ctl.connect(&connect_body(Some("k1"))).await;
        assert_eq!(a.backend_id, a_again.backend_id);
        assert!(a.spawned && !a_again.spawned);
        let b = ctl.connect(&connect_body(Some("k2"))).await;
        assert_ne!(a.backend_id, b.backend_id);
        let mut other_ns = connect_body(Some("k1"));
        other_ns["key"]["namespace"] = json!("games");
        let c = ctl.connect(&other_ns).await;
        assert_ne!(a.backend_id, c.backend_id);
        assert!(c.spawned);
        let no_key_1 = ctl.connect(&connect_body(None)).await;
        let no_key_2 = ctl.connect(&connect_body(None)).await;
        assert_ne!(no_key_1.backend_id, no_key_2.backend_id);
    })
    .await
}

#[tokio::test]
async fn unacked_action_is_resent_and_acked_one_is_not() {
    with_scheduled_backend("r", async |ctl, mut drone, backend| {
        let first = drone.expect_spawn(&backend).await;
        let again = drone.expect_spawn(&backend).await;
        assert_eq!(
            first.action_id, again.action_id,
            "the same action is resent"
        );

        drone
            .send(&DroneToController::AckAction {
                action_id: first.action_id.clone(),
            })
            .await;
        // Frames are handled in order: once this event is acked, so is the action.
        drone.report(7, &backend, BackendState::Loading).await;
        let response = ctl
            .post(&format!("/ctrl/b/{backend}/soft-terminate"), &json!(null))
            .await;
        assert_eq!(response.status(), 200);
        let (soft, external) = (TerminationKind::Soft, TerminationReason::External);
        let terminate = drone.expect_terminate(&backend, soft, external).await;
        drone.seen.clear();
        let resent = drone.expect_terminate(&backend, soft, external).await;
        assert_eq!(terminate.action_id, resent.action_id);
        assert!(
            !drone.seen.iter().any(
                |m| matches!(m, ControllerToDrone::Action(a) if a.action_id == first.action_id)
            ),
            "an acked action was resent: {:?}",
            drone.seen
        );
    })
    .await
}

#[tokio::test]
async fn unacked_action_is_resent_after_reconnect() {
    with_controller(async |ctl| {
        let name = DroneName::random();
        let mut drone = FakeDrone::connect_as(ctl, name.clone()).await;
        let backend = ctl.connect(&connect_body(Some("r"))).await.backend_id;
        let first = drone.expect_spawn(&backend).await;
        drop(drone);

        let mut drone = FakeDrone::connect_as(ctl, name).await;
        let again = drone.expect_spawn(&backend).await;
        assert_eq!(first.action_id, again.action_id);
    })
    .await
}

#[tokio::test]
async fn backend_events_are_acked_and_advance_status() {
    with_scheduled_backend("e", async |ctl, mut drone, backend| {
        assert_eq!(ctl.status(&backend).await["status"], "scheduled");
        drone.make_ready(&backend).await;
        assert_eq!(ctl.status(&backend).await["status"], "ready");

        // Stale and unknown-backend events are still acked, and change nothing.
        drone.report(2001, &backend, BackendState::Loading).await;
        drone
            .report(2002, &BackendId::random(), BackendState::Loading)
            .await;
        assert_eq!(ctl.status(&backend).await["status"], "ready");

        drone
            .report(
                2003,
                &backend,
                terminated_state(hangar_types::BackendStatus::Ready, None, None, Some(3)),
            )
            .await;
        let status = ctl.status(&backend).await;
        assert_eq!(status["status"], "terminated");
        assert_eq!(status["exit_error"], true);
    })
    .await
}

#[tokio::test]
async fn garbage_frames_do_not_end_the_session() {
    with_drone(async |_, mut drone| {
        drone.ws.send_raw("not json").await;
        drone.ws.send_raw(r#"{"Nope": 1}"#).await;
        drone
            .ws
            .send_raw(r#"{"BackendEvent": {"event_id": 1, "backend_id": "../x"}}"#)
            .await;
        drone
            .report(5, &BackendId::random(), BackendState::Loading)
            .await;
    })
    .await
}

#[tokio::test]
async fn renew_key_gets_deadlines_from_the_drone_time() {
    with_scheduled_backend("renew", async |_, mut drone, backend| {
        let local_time = Millis(42_000);
        for (id, expected) in [
            (backend.clone(), Some(KeyDeadlines::from_base(local_time))),
            (BackendId::random(), None),
        ] {
            drone
                .send(&DroneToController::RenewKey {
                    backend: id.clone(),
                    local_time,
                })
                .await;
            let mut seen = Vec::new();
            let deadlines = drone
                .ws
                .recv_until(&mut seen, |m: &ControllerToDrone| match m {
                    ControllerToDrone::RenewKeyResponse { backend, deadlines }
                        if *backend == id =>
                    {
                        Some(*deadlines)
                    }
                    _ => None,
                })
                .await;
            assert_eq!(deadlines, expected);
        }
    })
    .await
}

#[tokio::test]
async fn terminate_api_delivers_terminate_actions() {
    with_scheduled_backend("t", async |ctl, mut drone, backend| {
        for kind in [TerminationKind::Soft, TerminationKind::Hard] {
            let path = match kind {
                TerminationKind::Soft => format!("/ctrl/b/{backend}/soft-terminate"),
                TerminationKind::Hard => format!("/ctrl/b/{backend}/hard-terminate"),
            };
            let response = ctl.post(&path, &json!(null)).await;
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await.unwrap(), "null");
            drone
                .expect_terminate(&backend, kind, TerminationReason::External)
                .await;
        }
    })
    .await
}

fn limited_body(key: &str, field: &str, seconds: i32) -> serde_json::Value {
    let mut body = connect_body(Some(key));
    body["spawn_config"][field] = json!(seconds);
    body
}

#[tokio::test]
async fn idle_backend_is_swept_unless_kept_alive() {
    with_drone(async |ctl, mut drone| {
        let mut proxy = FakeProxy::connect(ctl).await;
        let busy: ConnectResponse = ctl
            .connect(&limited_body("busy", "max_idle_seconds", 2))
            .await;
        drone.make_ready(&busy.backend_id).await;
        let idle = ctl
            .connect(&limited_body("idle", "max_idle_seconds", 2))
            .await;
        drone.make_ready(&idle.backend_id).await;

        // Keep `busy` alive while waiting for `idle` to be swept.
        let keepalives = async {
            loop {
                proxy
                    .send(&ProxyToController::KeepAlive {
                        backend: busy.backend_id.clone(),
                        connected: false,
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let swept = drone.expect_terminate(
            &idle.backend_id,
            TerminationKind::Soft,
            TerminationReason::Swept,
        );
        tokio::select! {
            _ = keepalives => unreachable!(),
            _ = swept => {}
        }
        // The sweeper handles candidates oldest first in one pass, so a sweep of `busy` would have
        // arrived before the one of `idle`.
        assert!(
            !drone.seen.iter().any(|m| matches!(m,
                ControllerToDrone::Action(a) if a.backend_id == busy.backend_id
                    && matches!(a.action, BackendAction::Terminate { .. }))),
            "a kept-alive backend was swept"
        );
    })
    .await
}

#[tokio::test]
async fn backend_past_its_lifetime_is_swept() {
    with_drone(async |ctl, mut drone| {
        let backend = ctl
            .connect(&limited_body("short", "lifetime_limit_seconds", 1))
            .await
            .backend_id;
        drone
            .expect_terminate(&backend, TerminationKind::Soft, TerminationReason::Swept)
            .await;
    })
    .await
}

#[tokio::test]
async fn node_sockets_require_the_bearer_token_when_configured() {
    let config = ControllerConfig {
        bearer_token: Some("t0ken".into()),
        ..TestController::config()
    };
    with_controller_config(config, async |ctl| {
        // With the token (the harness sends it) everything works.
        let (mut drone, backend) = FakeDrone::with_backend(ctl, "auth").await;
        drone.expect_spawn(&backend).await;

        let url = format!("{}/ctrl/c/{CLUSTER}/drone-socket", ctl.ws_base);
        let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("expected 401, got {other:?}"),
        }
        let response = ctl.get_without_bearer("/ctrl/status").await;
        assert_eq!(response.status(), 401);
    })
    .await
}

#[tokio::test]
async fn shutdown_closes_node_sessions() {
    timed(async {
        let ctl = TestController::start().await;
        let mut drone = FakeDrone::connect(&ctl).await;
        let shutdown = ctl.shutdown();
        let closed = async {
            loop {
                if drone.ws.recv::<serde_json::Value>().await.is_none() {
                    return;
                }
            }
        };
        tokio::join!(shutdown, closed);
    })
    .await
}
