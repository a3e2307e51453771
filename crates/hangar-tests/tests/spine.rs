//! End-to-end tests of the spine: controller + process drone + proxy on real sockets, real backend
//! processes (the `hangar-test-backend` binary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use hangar_test_support::IGNORING_SIGTERM;
use hangar_tests::{assert_api_error, eventually, with_env, within, TestEnv};
use hangar_types::api::ApiErrorKind;
use hangar_types::{BackendStatus, TerminationKind, TerminationReason};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn http_and_headers_through_the_proxy() {
    within(with_env(async |env| {
        let resp = env.connect_ready(&env.connect_request("http-1", &[])).await;
        assert!(resp.spawned);
        assert!(resp.url.starts_with(&format!("http://{}/", env.cluster)));

        let body = env.get(&resp.url).await;
        assert_eq!(body.status(), 200);
        assert_eq!(body.text().await.unwrap(), "hello from hangar-test-backend");

        let seen: Value = env
            .http
            .get(format!("{}a/b/?x=1", resp.url))
            .header("x-verified-username", "mallory")
            .header("x-verified-blah", "spoofed")
            .header("x-custom", "kept")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["__path"], "/a/b/");
        assert_eq!(seen["__query"], "x=1");
        assert_eq!(seen["x-verified-username"], "alice");
        assert_eq!(seen["x-verified-user-data"], r#"{"role":"editor"}"#);
        assert_eq!(seen["x-verified-backend"], resp.backend_id.as_str());
        assert_eq!(
            seen["x-verified-path"],
            format!("/{}/a/b/", resp.token.as_str())
        );
        assert_eq!(
            seen["x-verified-secret"],
            resp.secret_token.as_ref().unwrap().as_str()
        );
        assert!(seen.get("x-verified-blah").is_none());
        assert_eq!(seen["x-custom"], "kept");

        // Unknown token: 410 with a body saying why.
        let gone = env.get(format!("http://{}/nope/", env.cluster)).await;
        assert_eq!(gone.status(), 410);
        assert!(!gone.text().await.unwrap().is_empty());
    }))
    .await;
}

#[tokio::test]
async fn websocket_through_the_proxy_is_counted() {
    within(with_env(async |env| {
        let resp = env.connect_ready(&env.connect_request("ws-1", &[])).await;
        let mut ws = hangar_tests::open_ws(&resp.url).await;
        hangar_tests::ws_echo(&mut ws, "ping-1").await;
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap().into_data().as_ref(),
            &[1, 2, 3]
        );
        let proxy = env.proxy();
        let id = resp.backend_id.clone();
        eventually("one open connection", || async {
            (proxy.connection_counts(&id)?.open_connections == 1).then_some(())
        })
        .await;
        ws.close(None).await.unwrap();
        eventually("no open connections", || async {
            match proxy.connection_counts(&id) {
                None => Some(()),
                Some(c) => (c.open_connections == 0).then_some(()),
            }
        })
        .await;
    }))
    .await;
}

#[tokio::test]
async fn get_or_create_is_per_key_namespace_and_tag() {
    within(with_env(async |env| {
        let first = env.connect(&env.connect_request("room", &[])).await;
        let again = env.connect(&env.connect_request("room", &[])).await;
        assert!(first.spawned);
        assert!(!again.spawned);
        assert_eq!(first.backend_id, again.backend_id);
        assert!(again.drone.is_none());
        assert_ne!(first.token, again.token, "each connect gets its own token");

        let other = env.connect(&env.connect_request("room-2", &[])).await;
        assert_ne!(other.backend_id, first.backend_id);

        let mut in_ns = env.connect_request("room", &[]);
        in_ns.key.as_mut().unwrap().namespace = "games".into();
        let ns = env.connect(&in_ns).await;
        assert_ne!(ns.backend_id, first.backend_id);

        let mut tagged = env.connect_request("room", &[]);
        tagged.key.as_mut().unwrap().tag = "v2".into();
        assert_api_error(
            env.client.connect(&tagged).await,
            409,
            ApiErrorKind::KeyHeld,
        );

        // No spawn config and nothing running under the key.
        let mut bare = env.connect_request("nobody-home", &[]);
        bare.spawn_config = None;
        assert_api_error(
            env.client.connect(&bare).await,
            409,
            ApiErrorKind::KeyUnheldNoSpawnConfig,
        );

        // A container image on a cluster whose drones only run processes: clear error, no hang.
        let mut docker = env.connect_request("docker-1", &[]);
        docker.spawn_config.as_mut().unwrap().executable =
            serde_json::from_value(serde_json::json!({"image": "app:1"})).unwrap();
        assert_api_error(
            env.client.connect(&docker).await,
            503,
            ApiErrorKind::NoDroneAvailable,
        );
    }))
    .await;
}

#[tokio::test]
async fn idle_backend_is_terminated() {
    within(with_env(async |env| {
        let mut req = env.connect_request("idle-1", &[]);
        req.spawn_config.as_mut().unwrap().max_idle_seconds = Some(1);
        let resp = env.connect_ready(&req).await;
        let done = env.terminated(&resp.backend_id).await;
        assert_eq!(done.termination_reason, Some(TerminationReason::Swept));
        assert_eq!(
            done.exit_error,
            Some(false),
            "SIGTERM exits cleanly: {done:?}"
        );
        // The key is released: a new connect spawns a new backend.
        let next = env.connect(&req).await;
        assert!(next.spawned);
        assert_ne!(next.backend_id, resp.backend_id);
    }))
    .await;
}

#[tokio::test]
async fn open_websocket_keeps_an_idle_limited_backend_alive_until_lifetime() {
    within(with_env(async |env| {
        let mut req = env.connect_request("life-1", &[]);
        let sc = req.spawn_config.as_mut().unwrap();
        sc.max_idle_seconds = Some(2);
        sc.lifetime_limit_seconds = Some(12);
        let resp = env.connect_ready(&req).await;
        let mut ws = hangar_tests::open_ws(&resp.url).await;
        // Well past the idle limit, the backend still answers through the open connection.
        tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                hangar_tests::ws_echo(&mut ws, "still here").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .ok();
        let now = env.client.backend_status(&resp.backend_id).await.unwrap();
        assert_eq!(now.status, BackendStatus::Ready, "idle-swept while in use");
        let done = env.terminated(&resp.backend_id).await;
        assert_eq!(done.termination_reason, Some(TerminationReason::Swept));
    }))
    .await;
}

#[tokio::test]
async fn soft_and_hard_terminate() {
    within(with_env(async |env| {
        let soft = env.connect_ready(&env.connect_request("soft-1", &[])).await;
        let done = env.soft_terminated(&soft.backend_id).await;
        assert_eq!(done.termination_kind, Some(TerminationKind::Soft));
        assert_eq!(done.termination_reason, Some(TerminationReason::External));
        assert_eq!(done.exit_code, Some(0), "backend saw SIGTERM and exited 0");

        let stubborn = env
            .connect_ready(&env.connect_request("soft-2", IGNORING_SIGTERM))
            .await;
        env.client
            .soft_terminate(&stubborn.backend_id)
            .await
            .unwrap();
        let done = env.terminated(&stubborn.backend_id).await;
        assert_eq!(done.exit_code, Some(137), "killed after the grace period");
        assert_eq!(done.exit_error, Some(true));

        let hard = env
            .connect_ready(&env.connect_request("hard-1", IGNORING_SIGTERM))
            .await;
        env.client.hard_terminate(&hard.backend_id).await.unwrap();
        let done = env.terminated(&hard.backend_id).await;
        assert_eq!(done.termination_kind, Some(TerminationKind::Hard));
        assert_eq!(done.exit_code, Some(137));
    }))
    .await;
}

#[tokio::test]
async fn backend_exiting_on_its_own_and_unstartable_commands() {
    within(with_env(async |env| {
        let resp = env
            .connect_ready(&env.connect_request(
                "self-exit",
                &[
                    ("TEST_BACKEND_EXIT_CODE", "3"),
                    ("TEST_BACKEND_EXIT_AFTER_MS", "1500"),
                ],
            ))
            .await;
        let done = env.terminated(&resp.backend_id).await;
        assert_eq!(done.exit_code, Some(3));
        assert_eq!(done.termination_reason, None);

        let mut req = env.connect_request("no-such-prog", &[]);
        req.spawn_config.as_mut().unwrap().executable =
            serde_json::from_value(serde_json::json!({"command": ["/nonexistent/hangar-prog"]}))
                .unwrap();
        let resp = env.connect(&req).await;
        let done = env.terminated(&resp.backend_id).await;
        let message = done.message.unwrap_or_default();
        assert!(
            message.contains("/nonexistent/hangar-prog"),
            "message should name the program: {message:?}"
        );
    }))
    .await;
}

/// Reads raw SSE events from the status stream until `n` events were seen.
async fn raw_sse(env: &TestEnv, backend: &str, last_id: Option<&str>, n: usize) -> Vec<String> {
    let mut req = env.http.get(format!(
        "{}pub/b/{backend}/status-stream",
        env.controller_url()
    ));
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = hangar_client::status_stream::SseParser::default();
    let mut ids = Vec::new();
    while ids.len() < n {
        let chunk = body.next().await.unwrap().unwrap();
        for ev in parser.feed(&chunk) {
            ids.push(ev.id.unwrap_or_default());
        }
    }
    ids
}

#[tokio::test]
async fn status_stream_replays_history_and_resumes() {
    within(with_env(async |env| {
        let resp = env.connect_ready(&env.connect_request("sse-1", &[])).await;
        env.client.soft_terminate(&resp.backend_id).await.unwrap();
        env.terminated(&resp.backend_id).await;
        let all = raw_sse(env, resp.backend_id.as_str(), None, 7).await;
        assert_eq!(
            all,
            [
                "scheduled",
                "loading",
                "starting",
                "waiting",
                "ready",
                "terminating",
                "terminated"
            ]
        );
        let resumed = raw_sse(env, resp.backend_id.as_str(), Some("ready"), 2).await;
        assert_eq!(resumed, ["terminating", "terminated"]);
    }))
    .await;
}

#[tokio::test]
async fn drone_reconnects_and_resends_its_events() {
    within(with_env(async |env| {
        let resp = env
            .connect(&env.connect_request("recon-1", &[("TEST_BACKEND_READY_DELAY_MS", "1500")]))
            .await;
        // Cut the drone's connection repeatedly while the backend starts.
        for _ in 0..3 {
            env.drones[0].reconnect();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        env.wait_for_status(&resp.backend_id, BackendStatus::Ready)
            .await;
        env.drones[0].reconnect();
        let done = env.soft_terminated(&resp.backend_id).await;
        assert_eq!(done.termination_reason, Some(TerminationReason::External));
    }))
    .await;
}

#[tokio::test]
async fn controller_restart_keeps_proxied_connections_and_replays_events() {
    within(async {
        let mut env = TestEnv::controller_only(true).await;
        env.add_drone(|_| {}).await;
        env.start_proxy().await;
        let resp = env
            .connect_ready(&env.connect_request("restart-1", &[]))
            .await;
        let mut ws = hangar_tests::open_ws(&resp.url).await;

        env.stop_controller().await;
        hangar_tests::ws_echo(&mut ws, "during outage").await;
        // The backend exits while no controller is there to hear it; the drone keeps the event.
        let exit = env.post(format!("{}exit/3", resp.url)).await;
        assert_eq!(exit.status(), 200);

        env.restart_controller().await;
        let done = env.terminated(&resp.backend_id).await;
        assert_eq!(done.exit_code, Some(3));
        env.shutdown().await;
    })
    .await;
}
