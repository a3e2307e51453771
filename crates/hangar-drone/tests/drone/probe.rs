//! What the executor tests (process and Docker) do with a backend they started: describe it, wait for
//! its HTTP answers and its kept output, stop it. Every wait polls with a deadline.

use hangar_drone::executor::{BackendSpec, Started};
use hangar_types::executable::Executable;
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendId, TerminationKind};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// How long a test polls a backend before failing.
pub const WAIT: Duration = Duration::from_secs(60);
/// How often it polls.
const POLL: Duration = Duration::from_millis(20);

/// A backend for key `room-1` with fencing token 1234 and a static connection token.
pub fn spec(executable: Executable) -> BackendSpec {
    BackendSpec {
        id: BackendId::random(),
        executable,
        key: "room-1".parse().unwrap(),
        fencing_token: 1234,
        static_token: Some(ConnectionToken::random_static()),
    }
}

/// Polls `GET <path>` on the backend until it answers JSON or the deadline passes.
pub async fn get_json(address: SocketAddr, path: &str) -> serde_json::Value {
    let url = format!("http://{address}{path}");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(resp) = reqwest::get(&url).await {
            if let Ok(json) = resp.json().await {
                return json;
            }
        }
        assert!(Instant::now() < deadline, "backend never answered {url}");
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until the backend's kept output contains `needle`.
pub async fn wait_for_log(started: &Started, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !started
        .backend
        .recent_logs()
        .iter()
        .any(|l| l.contains(needle))
    {
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} in {:?}",
            started.backend.recent_logs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Asks a backend that ignores SIGTERM to stop, checks that it still serves (the executor does not
/// escalate by itself), then kills it; its exit code.
pub async fn soft_ignored_then_hard(started: &Started) -> Option<i32> {
    get_json(started.address, "/env").await;
    signal(started, TerminationKind::Soft).await;
    wait_for_log(started, "got SIGTERM").await;
    get_json(started.address, "/env").await;
    signal(started, TerminationKind::Hard).await;
    started.backend.exited().await
}

/// Stops a backend with SIGTERM (exit code 0) and checks that waiting again gives the same answer
/// and that signalling the exited backend is fine.
pub async fn soft_stop_then_signal_again(started: &Started) {
    signal(started, TerminationKind::Soft).await;
    assert_eq!(started.backend.exited().await, Some(0));
    assert_eq!(started.backend.exited().await, Some(0));
    signal(started, TerminationKind::Hard).await;
}

/// The test backend's switches to exit by itself with code 3 after `after_ms`.
pub fn exit_3_after(after_ms: &'static str) -> [(&'static str, &'static str); 2] {
    [
        ("TEST_BACKEND_EXIT_CODE", "3"),
        ("TEST_BACKEND_EXIT_AFTER_MS", after_ms),
    ]
}

/// Waits for a backend started with [`exit_3_after`] to exit, and checks that its last words were
/// kept.
pub async fn expect_exit_3(started: &Started) {
    assert_eq!(started.backend.exited().await, Some(3));
    wait_for_log(started, "exiting with code 3").await;
}

/// Signals the backend (SIGTERM or SIGKILL), which must succeed.
pub async fn signal(started: &Started, kind: TerminationKind) {
    started.backend.terminate(kind).await.unwrap();
}
