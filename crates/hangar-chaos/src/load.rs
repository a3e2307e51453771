//! The steady client load: for every key and every controller, a loop that connects through that
//! controller and then sends a few requests through a proxy (each proxy in turn) to the URL it got,
//! and for every key a loop that holds a WebSocket through a proxy and asks the backend who it is
//! every [`WS_ASK_EVERY`]; every connect outcome and every answer (which backend answered, with which
//! fencing token) is recorded.

use crate::history::{Answer, Connect, ConnectOutcome};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Keys with this prefix run in a container of the Docker drone (with the harness's marker in its
/// environment, so that its process is found like the others), the others as processes.
pub const DOCKER_KEY_PREFIX: &str = "chaos-docker-";

/// Marks a run's backends in their environment.
pub const RUN_VAR: &str = "HANGAR_CHAOS_RUN";

/// Longest wait for one connect or one request.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests through the proxy after each successful connect.
const REQUESTS_PER_CONNECT: usize = 3;
/// Pause between two rounds of one loop.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// A WebSocket asks its backend who it is this often...
const WS_ASK_EVERY: Duration = Duration::from_millis(200);
/// ...and is closed and opened again (after a new connect) after this many questions.
const WS_ASKS_PER_SOCKET: usize = 25;

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
    /// Every proxy of the cluster; requests go to each in turn, with the cluster as `Host`.
    pub proxies: Vec<SocketAddr>,
    pub next_proxy: Arc<AtomicUsize>,
    /// The backend's command line and extra environment.
    pub command: Vec<String>,
    pub env: Map<String, Value>,
    pub origin: Instant,
}

impl LoadTarget {
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn connect_body(&self, key: &str) -> Value {
        let executable = if key.starts_with(DOCKER_KEY_PREFIX) {
            let marker = self.env.get(RUN_VAR).cloned().unwrap_or_default();
            json!({
                "image": crate::cluster::DOCKER_IMAGE,
                "pull_policy": "Never",
                "env": {RUN_VAR: marker},
            })
        } else {
            json!({"command": self.command, "env": self.env})
        };
        json!({
            "key": {"name": key},
            "spawn_config": {"cluster": self.cluster, "executable": executable},
        })
    }

    /// The next proxy in turn.
    fn proxy(&self) -> SocketAddr {
        let i = self.next_proxy.fetch_add(1, Ordering::Relaxed);
        self.proxies[i % self.proxies.len()]
    }

    /// `url` (under the cluster's name) with the host and port of `proxy`, and the path appended.
    fn via(&self, url: &str, proxy: SocketAddr, path: &str, scheme: &str) -> Option<url::Url> {
        let mut url = url::Url::parse(url).ok()?.join(path).ok()?;
        url.set_ip_host(proxy.ip()).ok()?;
        url.set_port(Some(proxy.port())).ok()?;
        url.set_scheme(scheme).ok()?;
        Some(url)
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

    /// One request through the next proxy to `url`; the answering backend's report.
    pub async fn request(&self, key: &str, url: &str) -> Option<Answer> {
        self.request_via(key, url, self.proxy()).await
    }

    /// One request through `proxy` to `url`.
    pub async fn request_via(&self, key: &str, url: &str, proxy: SocketAddr) -> Option<Answer> {
        let sent_ms = self.elapsed_ms();
        let response = self
            .http
            .get(self.via(url, proxy, "env", "http")?)
            .header(reqwest::header::HOST, &self.cluster)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let env: Value = response.json().await.ok()?;
        answer_from(key, &env, sent_ms, self.elapsed_ms())
    }

    /// Holds one WebSocket to `url` through a proxy and asks the backend who it is, until
    /// [`WS_ASKS_PER_SOCKET`] answers, an error or `stop`.
    async fn hold_websocket(
        &self,
        key: &str,
        url: &str,
        recorded: &Mutex<Recorded>,
        stop: &CancellationToken,
    ) -> Option<()> {
        let proxy = self.proxy();
        let mut request = self
            .via(url, proxy, "ws", "ws")?
            .as_str()
            .into_client_request()
            .ok()?;
        request
            .headers_mut()
            .insert("host", self.cluster.parse().ok()?);
        let open = async {
            let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
            tokio_tungstenite::client_async(request, stream).await.ok()
        };
        let (mut socket, _) = tokio::time::timeout(CALL_TIMEOUT, open).await.ok()??;
        for _ in 0..WS_ASKS_PER_SOCKET {
            let sent_ms = self.elapsed_ms();
            let ask = async {
                socket.send(Message::text("env")).await.ok()?;
                loop {
                    match socket.next().await?.ok()? {
                        Message::Text(text) => return serde_json::from_str::<Value>(&text).ok(),
                        Message::Close(_) => return None,
                        _ => {}
                    }
                }
            };
            let env = tokio::time::timeout(CALL_TIMEOUT, ask).await.ok()??;
            lock(recorded)
                .answers
                .extend(answer_from(key, &env, sent_ms, self.elapsed_ms()));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(WS_ASK_EVERY) => {}
            }
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT, socket.close(None)).await;
        Some(())
    }
}

/// The answering backend's report, from its environment.
fn answer_from(key: &str, env: &Value, sent_ms: u64, answered_ms: u64) -> Option<Answer> {
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
    // Plane's 409 `KeyHeld`: the key's previous backend is still shutting down; retry shortly.
    let key_held = status == reqwest::StatusCode::CONFLICT && body["kind"] == "KeyHeld";
    if (status.is_server_error() || key_held) && plane_shaped {
        (ConnectOutcome::Retryable { reason }, None)
    } else {
        (ConnectOutcome::Unclear { reason }, None)
    }
}

/// How a loop uses the URL each connect gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    /// [`REQUESTS_PER_CONNECT`] HTTP requests through the proxies in turn.
    Requests,
    /// One WebSocket held through a proxy (see [`LoadTarget::hold_websocket`]).
    WebSocket,
}

/// One client loop of the load.
#[derive(Debug, Clone)]
pub struct LoadLoop {
    pub kind: LoopKind,
    /// The controller's index and URL.
    pub controller: (usize, String),
    pub key: String,
}

/// Runs `spec` until `stop`: connect for its key through its controller (recorded), use the URL as
/// its kind says (answers recorded), pause, again.
pub async fn run_load_loop(
    target: LoadTarget,
    spec: LoadLoop,
    recorded: Arc<Mutex<Recorded>>,
    stop: CancellationToken,
) {
    let LoadLoop {
        kind,
        controller: (index, controller_url),
        key,
    } = spec;
    while !stop.is_cancelled() {
        let at_ms = target.elapsed_ms();
        let (outcome, got) = target.connect(&controller_url, &key).await;
        lock(&recorded).connects.push(Connect {
            key: key.clone(),
            controller: index,
            at_ms,
            outcome,
        });
        match (got, kind) {
            (None, _) => {}
            (Some((_, url)), LoopKind::Requests) => {
                for _ in 0..REQUESTS_PER_CONNECT {
                    if let Some(answer) = target.request(&key, &url).await {
                        lock(&recorded).answers.push(answer);
                    }
                }
            }
            (Some((_, url)), LoopKind::WebSocket) => {
                target.hold_websocket(&key, &url, &recorded, &stop).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn outcome(status: StatusCode, body: Value) -> ConnectOutcome {
        classify(status, Some(body)).0
    }

    #[test]
    fn connect_answers_are_sorted_as_a_client_should_treat_them() {
        let ok = json!({"backend_id": "b1", "url": "http://x/t/"});
        assert!(matches!(
            outcome(StatusCode::OK, ok),
            ConnectOutcome::Ok { backend } if backend == "b1"
        ));
        let plane = |kind: &str| json!({"id": "e1", "kind": kind, "message": "m"});
        for (status, kind) in [
            (StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable"),
            (StatusCode::CONFLICT, "KeyHeld"),
        ] {
            assert!(
                matches!(
                    outcome(status, plane(kind)),
                    ConnectOutcome::Retryable { .. }
                ),
                "{status} {kind}"
            );
        }
        for (status, body) in [
            (StatusCode::CONFLICT, plane("Other")),
            (StatusCode::BAD_REQUEST, plane("BadRequest")),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "not Plane's shape"}),
            ),
            (StatusCode::OK, json!({"url": "no backend id"})),
        ] {
            assert!(
                matches!(
                    outcome(status, body.clone()),
                    ConnectOutcome::Unclear { .. }
                ),
                "{status} {body}"
            );
        }
    }
}
