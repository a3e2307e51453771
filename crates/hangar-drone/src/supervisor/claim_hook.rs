//! Claim hooks of warm backends (`ControllerToDrone::ClaimHook`): the drone `POST`s who the backend
//! now is to its `claim_path` and answers the controller with `ClaimHookResult`.
//!
//! Invariant: a `Refused` answer is sent only after the backend was hard-terminated (and, when the
//! drone runs it, its `terminated` state is in the outbox), so the controller may hand the key to a
//! cold spawn without two live backends for it.

use super::Supervisors;
use hangar_types::protocol::{ClaimHookOutcome, DroneToController};
use hangar_types::timing::CLAIM_HOOK_TIMEOUT;
use hangar_types::warm_pool::ClaimHook;
use hangar_types::{ActionId, BackendId, BackendState, TerminationKind, TerminationReason};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

/// How long the drone waits for a refused backend to be recorded `terminated` (SIGKILL is quick).
const KILL_WAIT: Duration = Duration::from_secs(8);

/// One claim hook as the controller sent it.
pub struct ClaimHookRequest {
    pub request_id: u64,
    pub backend: BackendId,
    pub path: String,
    pub body: ClaimHook,
}

impl Supervisors {
    /// Runs the hook in the background; the answer goes out with the drone's other messages.
    pub fn claim_hook(&self, request: ClaimHookRequest) {
        let supervisors = self.clone();
        self.inner.tracker.spawn(async move {
            let request_id = request.request_id;
            let outcome = supervisors.run_claim_hook(request).await;
            let answer = DroneToController::ClaimHookResult {
                request_id,
                outcome,
            };
            if supervisors.inner.outbound.send(answer).await.is_err() {
                tracing::debug!(
                    request_id,
                    "Claim hook answer not sent: the drone is stopping"
                );
            }
        });
    }

    async fn run_claim_hook(&self, request: ClaimHookRequest) -> ClaimHookOutcome {
        let backend = &request.backend;
        let state = match self.inner.outbox.backend(backend).await {
            Ok(Some(stored)) => stored.state,
            Ok(None) => {
                return ClaimHookOutcome::Refused {
                    message: "the drone does not run this backend".into(),
                    terminated: None,
                }
            }
            Err(e) => {
                tracing::warn!(%backend, error = %e, "Failed to read a claimed backend");
                return self
                    .refuse(backend, format!("drone state unreadable: {e}"))
                    .await;
            }
        };
        let BackendState::Ready { address } = state else {
            let message = format!("the backend is {}, not ready", state.status());
            return self.refuse(backend, message).await;
        };
        let url = format!("http://{}{}", reachable(address), request.path);
        let client = match client() {
            Ok(client) => client,
            Err(e) => return self.refuse(backend, format!("no HTTP client: {e}")).await,
        };
        let answer = client
            .post(&url)
            .json(&request.body)
            .timeout(CLAIM_HOOK_TIMEOUT)
            .send()
            .await
            .map(|response| response.status());
        match answer {
            Ok(status) if status.is_success() => {
                tracing::debug!(%backend, %status, "Claim hook accepted");
                ClaimHookOutcome::Accepted
            }
            Ok(status) => {
                let message = format!("the claim hook answered {status}");
                self.refuse(backend, message).await
            }
            Err(e) if e.is_timeout() => {
                let message =
                    format!("the claim hook did not answer within {CLAIM_HOOK_TIMEOUT:?}");
                self.refuse(backend, message).await
            }
            Err(e) => {
                let message = format!("the claim hook failed: {e}");
                self.refuse(backend, message).await
            }
        }
    }

    /// Hard-terminates a backend whose claim failed and waits until it is recorded `terminated`.
    async fn refuse(&self, backend: &BackendId, message: String) -> ClaimHookOutcome {
        tracing::warn!(%backend, %message, "Claim hook failed; terminating the backend");
        let mut changes = self.inner.outbox.subscribe();
        let action = ActionId::random();
        let (kind, reason) = (TerminationKind::Hard, TerminationReason::InternalError);
        if let Err(e) = self.terminate(&action, backend, kind, reason).await {
            tracing::warn!(%backend, error = %e, "Failed to terminate a refused backend");
        }
        let terminated = tokio::time::timeout(KILL_WAIT, async {
            loop {
                match self.inner.outbox.backend(backend).await {
                    Ok(Some(b)) if matches!(b.state, BackendState::Terminated { .. }) => {
                        return Some(b.state)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%backend, error = %e, "Failed to read a refused backend");
                        return None;
                    }
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten();
        ClaimHookOutcome::Refused {
            message,
            terminated,
        }
    }
}

/// The backend's address as the drone reaches it (a wildcard listen address means this host).
fn reachable(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    }
}

/// One client for every hook: no proxy (backends are on this host or its container network).
fn client() -> Result<&'static reqwest::Client, &'static reqwest::Error> {
    static CLIENT: OnceLock<Result<reqwest::Client, reqwest::Error>> = OnceLock::new();
    CLIENT
        .get_or_init(|| reqwest::Client::builder().no_proxy().build())
        .as_ref()
}
