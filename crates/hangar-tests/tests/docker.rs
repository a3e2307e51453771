//! End to end with real containers: controller + a drone offering Docker + proxy, running the
//! `hangar-test-backend:latest` image (built by `scripts/build-test-image.sh`). Skipped without Docker,
//! except under CI (`CI` set), where a missing Docker engine or image fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_test_support::docker::{docker_ready, TestRun};
use hangar_tests::{TestEnv, WAIT};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::{BackendStatus, TerminationKind};

#[tokio::test]
async fn docker_backend_through_the_proxy() {
    if !docker_ready() {
        return;
    }
    tokio::time::timeout(WAIT * 3, async {
        let run = TestRun::new();
        let mut env = TestEnv::controller_only(false).await;
        env.add_drone(|c| c.executors = vec![ExecutorKind::Docker, ExecutorKind::Process])
            .await;
        env.start_proxy().await;

        let mut req = env.connect_request("docker-1", &[]);
        let never_pull = serde_json::json!({"pull_policy": "Never"});
        let executable = run.executable_with(&[("GREETING", "hello")], never_pull);
        req.spawn_config.as_mut().unwrap().executable = Executable::Docker(Box::new(executable));
        let resp = env.connect_ready(&req).await;
        assert!(resp.spawned);

        // HTTP through the proxy reaches the container.
        let body = env.get(&resp.url).await;
        assert_eq!(body.status(), 200);
        assert_eq!(body.text().await.unwrap(), "hello from hangar-test-backend");
        let vars = env.backend_env(&resp.url).await;
        assert_eq!(vars["SESSION_BACKEND_ID"], resp.backend_id.as_str());
        assert_eq!(vars["GREETING"], "hello");
        assert_eq!(vars["PORT"], "8080");
        assert_eq!(run.containers().len(), 1);

        // And so does a WebSocket.
        let mut ws = hangar_tests::open_ws(&resp.url).await;
        hangar_tests::ws_echo(&mut ws, "ping-1").await;
        ws.close(None).await.unwrap();

        // Soft termination: SIGTERM, the backend exits 0, the container is removed.
        let entry = env.soft_terminated(&resp.backend_id).await;
        assert_eq!(entry.status, BackendStatus::Terminated);
        assert_eq!(entry.termination_kind, Some(TerminationKind::Soft));
        assert_eq!(entry.exit_code, Some(0));
        assert_eq!(entry.exit_error, Some(false));
        assert!(run.containers().is_empty());
        env.shutdown().await;
    })
    .await
    .expect("test timed out");
}
