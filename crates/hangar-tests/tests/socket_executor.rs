//! The unix-socket executor (`hangar drone --executor-socket`, plane-api.md §6.6) against an executor
//! written for Plane's protocol: `tests/socket_executor/plane_executor.py`, a real program that starts
//! real `hangar-test-backend` processes. Controller, drone and proxy run in this process on real
//! sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_tests::{eventually, test_backend, within, TestEnv, WAIT};
use hangar_types::api::{ClusterDroneState, ConnectRequest};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::{BackendStatus, TerminationReason};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/socket_executor/plane_executor.py"
);

/// The Plane-protocol test executor, restartable on the same socket and state file.
struct PlaneExecutor {
    dir: tempfile::TempDir,
    garbage: bool,
    child: Option<Child>,
}

impl PlaneExecutor {
    fn new(garbage: bool) -> PlaneExecutor {
        PlaneExecutor {
            dir: tempfile::tempdir().unwrap(),
            garbage,
            child: None,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("executor.sock")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the executor and waits until it listens.
    async fn start(&mut self) {
        let mut command = Command::new("python3");
        command
            .arg(SCRIPT)
            .arg("--socket")
            .arg(self.socket())
            .arg("--backend")
            .arg(test_backend())
            .arg("--state")
            .arg(self.path("state.json"))
            .arg("--log")
            .arg(self.path("received.log"))
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if self.garbage {
            command.arg("--garbage");
        }
        let mut child = command.spawn().expect("cannot run python3");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("executor did not start")
            .unwrap();
        assert_eq!(first.as_deref(), Some("listening"));
        self.child = Some(child);
    }

    /// Kills the executor (SIGKILL); the backends it started keep running.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Every line the executor received, in all its runs.
    fn received(&self) -> String {
        std::fs::read_to_string(self.path("received.log")).unwrap_or_default()
    }

    /// Backend id → pid of the backends the executor runs.
    fn pids(&self) -> HashMap<String, i32> {
        std::fs::read_to_string(self.path("state.json"))
            .map(|s| serde_json::from_str(&s).unwrap())
            .unwrap_or_default()
    }
}

impl Drop for PlaneExecutor {
    fn drop(&mut self) {
        // Whatever a failed test left running.
        for pid in self.pids().values() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).spawn();
        }
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            !matches!(state, Some("Z" | "X"))
        })
        .unwrap_or(false)
}

/// A controller, a drone on the executor's socket (giving up after `give_up`), and a proxy.
async fn env_with(executor: &PlaneExecutor, give_up: Duration) -> TestEnv {
    let mut env = TestEnv::controller_only(false).await;
    let socket = executor.socket();
    env.add_drone(|c| {
        c.executors = vec![ExecutorKind::Docker];
        c.executor_socket = Some(socket);
        c.executor_socket_give_up = give_up;
    })
    .await;
    env.start_proxy().await;
    env
}

/// A connect request whose executable is Docker-style, as Plane's executors receive.
fn socket_request(env: &TestEnv, key: &str, image: &str) -> ConnectRequest {
    let mut req = env.connect_request(key, &[]);
    req.spawn_config.as_mut().unwrap().executable =
        Executable::from_json(&json!({"image": image, "env": {"FROM_CONFIG": "yes"}})).unwrap();
    req
}

async fn drone_state(env: &TestEnv) -> ClusterDroneState {
    let state = env.client.cluster_state(&env.cluster).await.unwrap();
    assert_eq!(state.drones.len(), 1, "{state:?}");
    state.drones.into_iter().next().unwrap()
}

async fn get_text(env: &TestEnv, url: &str) -> (u16, String) {
    let resp = env.get(url).await;
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Connects to key `key` with a backend of `image`, which must end with an internal error; returns
/// the error's message.
async fn internal_error(env: &TestEnv, key: &str, image: &str) -> String {
    let connected = env.connect(&socket_request(env, key, image)).await;
    let done = env
        .wait_for_status(&connected.backend_id, BackendStatus::Terminated)
        .await;
    let reason = done.termination_reason;
    assert_eq!(reason, Some(TerminationReason::InternalError), "{done:?}");
    done.message.unwrap_or_default()
}

/// Shuts `env` down, then kills `executor`.
async fn shut_down(env: TestEnv, executor: &mut PlaneExecutor) {
    env.shutdown().await;
    executor.kill().await;
}

/// How long the drones of these tests wait for an executor that is not there.
const GIVE_UP: Duration = Duration::from_secs(30);

/// Runs `test` with [`within`] on a started executor (garbage on every connection when `garbage`)
/// and [`env_with`] on it, giving up after `give_up`; then shuts the environment down and kills the
/// executor.
async fn with_executor_env(
    garbage: bool,
    give_up: Duration,
    test: impl AsyncFnOnce(&mut PlaneExecutor, &TestEnv),
) {
    within(async {
        let mut executor = PlaneExecutor::new(garbage);
        executor.start().await;
        let env = env_with(&executor, give_up).await;
        test(&mut executor, &env).await;
        shut_down(env, &mut executor).await;
    })
    .await;
}

#[tokio::test]
async fn spine_through_a_plane_executor() {
    // With garbage on every connection: bad lines, unknown ids and duplicate answers are skipped.
    with_executor_env(true, GIVE_UP, async |executor, env| {
        let drone = drone_state(env).await;
        assert_eq!(drone.executors, vec![ExecutorKind::Socket]);
        assert_eq!(drone.executor_error, None);

        let mut req = socket_request(env, "socket-spine", "plane-app:1");
        req.spawn_config.as_mut().unwrap().max_idle_seconds = Some(2);
        let resp = env.connect_ready(&req).await;
        assert!(resp.spawned);
        let (status, body) = get_text(env, &resp.url).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from hangar-test-backend")
        );
        let seen = env.backend_env(&resp.url).await;
        assert_eq!(seen["SESSION_BACKEND_ID"], resp.backend_id.as_str());
        assert_eq!(seen["SESSION_BACKEND_KEY"], "socket-spine");
        assert_eq!(seen["FROM_CONFIG"], "yes");

        // Idle: swept, terminated softly through the executor, exit reported by TerminateEvent.
        let done = env
            .wait_for_status(&resp.backend_id, BackendStatus::Terminated)
            .await;
        assert_eq!(done.termination_reason, Some(TerminationReason::Swept));
        assert_eq!(done.exit_code, Some(0), "{done:?}");
        let received = executor.received();
        let id = resp.backend_id.as_str();
        for request in [
            r#""Prepare":{"image":"plane-app:1""#.to_string(),
            format!(r#""Spawn":["{id}",{{"image":"plane-app:1""#),
            format!(r#""WaitForBackend":["{id}","127.0.0.1:"#),
            format!(r#""Terminate":["{id}",false]"#),
        ] {
            assert!(received.contains(&request), "{request} not in {received}");
        }

        // An executor error is the backend's termination message.
        let message = internal_error(env, "socket-fail", "fail-prepare").await;
        assert!(message.contains("no such image: fail-prepare"), "{message}");

        // Process executables do not go to the socket: no drone offers them here.
        let process = env.client.connect(&env.connect_request("p", &[])).await;
        assert!(process.is_err(), "{process:?}");
    })
    .await;
}

#[tokio::test]
async fn requests_wait_for_an_executor_that_starts_late() {
    within(async {
        let mut executor = PlaneExecutor::new(false);
        let env = env_with(&executor, GIVE_UP).await;
        let resp = env
            .connect(&socket_request(&env, "late", "plane-app:1"))
            .await;
        env.wait_for_status(&resp.backend_id, BackendStatus::Loading)
            .await;
        executor.start().await;
        env.wait_for_status(&resp.backend_id, BackendStatus::Ready)
            .await;
        let (status, _) = get_text(&env, &resp.url).await;
        assert_eq!(status, 200);
        // The executor's MetricsMessage reached the controller as the backend's resource sample.
        let metrics_url = env.controller_url().join("metrics").unwrap();
        eventually(
            "the executor's metrics sample at the controller",
            || async {
                let text = env.http.get(metrics_url.clone()).send().await.ok()?;
                let text = text.text().await.ok()?;
                text.lines()
                    .any(|l| l == "hangar_backend_memory_used_bytes 1234")
                    .then_some(())
            },
        )
        .await;
        shut_down(env, &mut executor).await;
    })
    .await;
}

#[tokio::test]
async fn executor_restarting_mid_session_loses_nothing() {
    with_executor_env(false, GIVE_UP, async |executor, env| {
        let a = env
            .connect_ready(&socket_request(env, "restart-a", "plane-app:1"))
            .await;

        executor.kill().await;
        // The backend runs on without its executor. (The body says why if not: a 410 once in CI on
        // 2026-12-07, not reproduced since.)
        let (status, body) = get_text(env, &a.url).await;
        assert_eq!(status, 200, "{body}");
        // Sent while the executor is down: a terminate and a new backend's requests.
        env.client.soft_terminate(&a.backend_id).await.unwrap();
        env.wait_for_status(&a.backend_id, BackendStatus::Terminating)
            .await;
        let b = env
            .connect(&socket_request(env, "restart-b", "plane-app:1"))
            .await;
        env.wait_for_status(&b.backend_id, BackendStatus::Loading)
            .await;

        executor.start().await;
        let done = env
            .wait_for_status(&a.backend_id, BackendStatus::Terminated)
            .await;
        assert_eq!(done.termination_reason, Some(TerminationReason::External));
        env.wait_for_status(&b.backend_id, BackendStatus::Ready)
            .await;
        let (status, _) = get_text(env, &b.url).await;
        assert_eq!(status, 200);
        let received = executor.received();
        let terminate_a = format!(r#""Terminate":["{}",false]"#, a.backend_id);
        assert!(received.contains(&terminate_a), "{received}");
        assert_eq!(drone_state(env).await.executor_error, None);
    })
    .await;
}

#[tokio::test]
async fn executor_gone_too_long_is_a_drone_error_and_its_backends_end_lost() {
    let give_up = Duration::from_secs(2);
    with_executor_env(false, give_up, async |executor, env| {
        let a = env
            .connect_ready(&socket_request(env, "vanish-a", "plane-app:1"))
            .await;
        let pid = executor.pids()[a.backend_id.as_str()];

        executor.kill().await;
        let error = eventually("the executor error in cluster state", || async {
            drone_state(env).await.executor_error
        })
        .await;
        assert!(error.contains("unreachable"), "{error}");
        assert!(
            error.contains(&executor.socket().display().to_string()),
            "{error}"
        );
        let done = env
            .wait_for_status(&a.backend_id, BackendStatus::Terminated)
            .await;
        assert_eq!(done.termination_reason, Some(TerminationReason::Lost));
        assert!(done.message.unwrap_or_default().contains("unreachable"));
        // New backends fail at once with the same reason instead of waiting.
        let message = internal_error(env, "vanish-c", "plane-app:1").await;
        assert!(message.contains("unreachable"), "{message}");

        // Back: the error clears and the lost backend is hard-terminated at the executor.
        executor.start().await;
        eventually("the executor error to clear", || async {
            drone_state(env)
                .await
                .executor_error
                .is_none()
                .then_some(())
        })
        .await;
        eventually("the lost backend's process to be killed", || async {
            (!alive(pid)).then_some(())
        })
        .await;
        let received = executor.received();
        let kill_a = format!(r#""Terminate":["{}",true]"#, a.backend_id);
        assert!(received.contains(&kill_a), "{received}");
    })
    .await;
}
