//! End to end with real containers: controller + a drone offering Docker + proxy, running the
//! `hangar-test-backend:latest` image (built by `scripts/build-test-image.sh`). Skipped without Docker,
//! except under CI (`CI` set), where a missing Docker engine or image fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use hangar_tests::{TestEnv, WAIT};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::{BackendStatus, TerminationKind};
use serde_json::Value;
use std::process::Command;
use tokio_tungstenite::tungstenite::Message;

const TEST_IMAGE: &str = "hangar-test-backend:latest";
const TEST_RUN_LABEL: &str = "dev.hangar.test-run";

fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Whether the test can run; panics under CI when it cannot.
fn docker_ready() -> bool {
    let ready = docker(&["info", "--format", "{{.ServerVersion}}"])
        .map_err(|e| format!("the Docker engine is unreachable: {e}"))
        .and_then(|_| {
            docker(&["image", "inspect", "--format", "{{.Id}}", TEST_IMAGE]).map_err(|_| {
                format!("image {TEST_IMAGE} is missing: run scripts/build-test-image.sh")
            })
        });
    match ready {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("Docker tests under CI: {e}"),
        Err(e) => {
            eprintln!("skipping a Docker test: {e}");
            false
        }
    }
}

/// Removes every container labelled with the run id when dropped (also when the test fails).
struct TestRun(String);

impl TestRun {
    fn containers(&self) -> Vec<String> {
        let filter = format!("label={TEST_RUN_LABEL}={}", self.0);
        docker(&["ps", "-aq", "--filter", &filter])
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestRun {
    fn drop(&mut self) {
        for container in self.containers() {
            let _ = docker(&["rm", "-f", &container]);
        }
    }
}

#[tokio::test]
async fn docker_backend_through_the_proxy() {
    if !docker_ready() {
        return;
    }
    tokio::time::timeout(WAIT * 3, async {
        let run = TestRun(format!("t{}", hangar_types::names::random_string()));
        let mut env = TestEnv::controller_only(false).await;
        env.add_drone(|c| c.executors = vec![ExecutorKind::Docker, ExecutorKind::Process])
            .await;
        env.start_proxy().await;

        let mut req = env.connect_request("docker-1", &[]);
        let executable = Executable::from_json(&serde_json::json!({
            "image": TEST_IMAGE,
            "pull_policy": "Never",
            "env": {"GREETING": "hello"},
            "labels": {TEST_RUN_LABEL: run.0},
        }))
        .unwrap();
        req.spawn_config.as_mut().unwrap().executable = executable;
        let resp = env.connect_ready(&req).await;
        assert!(resp.spawned);

        // HTTP through the proxy reaches the container.
        let body = env.http.get(&resp.url).send().await.unwrap();
        assert_eq!(body.status(), 200);
        assert_eq!(body.text().await.unwrap(), "hello from hangar-test-backend");
        let vars: Value = env
            .http
            .get(format!("{}env", resp.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(vars["SESSION_BACKEND_ID"], resp.backend_id.as_str());
        assert_eq!(vars["GREETING"], "hello");
        assert_eq!(vars["PORT"], "8080");
        assert_eq!(run.containers().len(), 1);

        // And so does a WebSocket.
        let ws_url = format!("{}ws", resp.url.replacen("http://", "ws://", 1));
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        ws.send(Message::text("ping-1")).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), "ping-1");
        ws.close(None).await.unwrap();

        // Soft termination: SIGTERM, the backend exits 0, the container is removed.
        env.client.soft_terminate(&resp.backend_id).await.unwrap();
        let entry = env
            .wait_for_status(&resp.backend_id, BackendStatus::Terminated)
            .await;
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
