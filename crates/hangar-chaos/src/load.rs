//! The steady client load: for every key and every controller, a loop that connects through that
//! controller and then sends a few requests through the proxy to the URL it got, recording every
//! connect outcome and every answer (which backend answered, with which fencing token).

use crate::history::{Answer, Connect, ConnectOutcome};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for one connect or one request.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests through the proxy after each successful connect.
const REQUESTS_PER_CONNECT: usize = 3;
/// Pause between two rounds of one loop.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// What the load recorded, shared by its loops.
#[derive(Default)]
pub struct Recorded {
    pub answers: Vec<Answer>,
    pub connects: Vec<Connect>,
}

/// Everything a load loop needs.
#[derive(Clone)]
pub struct LoadTarget {
    pub http: reqwest::Client,
    pub cluster: String,
    pub test_backend: String,
    pub run_id: String,
    pub origin: Instant,
}

impl LoadTarget {
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn connect_body(&self, key: &str) -> Value {
        json!({
            "key": {"name": key},
            "spawn_config": {
                "cluster": self.cluster,
                "executable": {
                    "command": [self.test_backend],
                    "env": {"HANGAR_CHAOS_RUN": self.run_id},
                },
            },
        })
    }

    /// One connect call; `Ok` carries the backend id and URL.
    pub async fn connect(
        &self,
        controller_url: &str,
        key: &str,
    ) -> (ConnectOutcome, Option<(String, String)>) {
        let call = self
            .http
            .post(format!("{controller_url}ctrl/connect"))
            .json(&self.connect_body(key))
            .timeout(CALL_TIMEOUT)
            .send();
        let response = match call.await {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("transport: {e}");
                return (ConnectOutcome::Retryable { reason }, None);
            }
        };
        let status = response.status();
        let body: Option<Value> = response.json().await.ok();
        classify(status, body)
    }

    /// One request through the proxy to `url`; the answering backend's report.
    pub async fn request(&self, key: &str, url: &str) -> Option<Answer> {
        let sent_ms = self.elapsed_ms();
        let response = self
            .http
            .get(format!("{url}env"))
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let env: Value = response.json().await.ok()?;
        let answered_ms = self.elapsed_ms();
        Some(Answer {
            key: key.to_string(),
            backend: env["SESSION_BACKEND_ID"].as_str()?.to_string(),
            fencing_token: env["SESSION_BACKEND_FENCING_TOKEN"]
                .as_str()
                .and_then(|t| t.parse().ok()),
            sent_ms,
            answered_ms,
        })
    }
}

/// Sorts a connect answer: success, a clear retryable error (5xx in Plane's error shape), or
/// anything else.
fn classify(
    status: reqwest::StatusCode,
    body: Option<Value>,
) -> (ConnectOutcome, Option<(String, String)>) {
    let Some(body) = body else {
        let reason = format!("{status} with an unreadable body");
        return (ConnectOutcome::Unclear { reason }, None);
    };
    if status.is_success() {
        let backend = body["backend_id"].as_str().map(str::to_string);
        let url = body["url"].as_str().map(str::to_string);
        return match (backend, url) {
            (Some(backend), Some(url)) => (
                ConnectOutcome::Ok {
                    backend: backend.clone(),
                },
                Some((backend, url)),
            ),
            _ => {
                let reason = format!("{status} without backend_id and url: {body}");
                (ConnectOutcome::Unclear { reason }, None)
            }
        };
    }
    let plane_shaped = body["id"].is_string() && body["kind"].is_string();
    let reason = format!("{status}: {body}");
    if status.is_server_error() && plane_shaped {
        (ConnectOutcome::Retryable { reason }, None)
    } else {
        (ConnectOutcome::Unclear { reason }, None)
    }
}

/// Runs one loop for `key` through `controller` until `stop`.
pub async fn run_load_loop(
    target: LoadTarget,
    controller: (usize, String),
    key: String,
    recorded: Arc<Mutex<Recorded>>,
    stop: CancellationToken,
) {
    let (index, controller_url) = controller;
    while !stop.is_cancelled() {
        let at_ms = target.elapsed_ms();
        let (outcome, got) = target.connect(&controller_url, &key).await;
        lock(&recorded).connects.push(Connect {
            key: key.clone(),
            controller: index,
            at_ms,
            outcome,
        });
        if let Some((_, url)) = got {
            for _ in 0..REQUESTS_PER_CONNECT {
                if let Some(answer) = target.request(&key, &url).await {
                    lock(&recorded).answers.push(answer);
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(ROUND_PAUSE) => {}
        }
    }
}

/// The lock is never held across an await, and a panic while holding it ends the run anyway.
pub fn lock(recorded: &Mutex<Recorded>) -> std::sync::MutexGuard<'_, Recorded> {
    recorded.lock().unwrap_or_else(|p| p.into_inner())
}
