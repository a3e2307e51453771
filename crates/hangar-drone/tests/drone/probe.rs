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

/// Signals the backend (SIGTERM or SIGKILL), which must succeed.
pub async fn signal(started: &Started, kind: TerminationKind) {
    started.backend.terminate(kind).await.unwrap();
}
