//! Claim hooks: after a claim of a pool with `claim_path`, the controller asks the backend's drone
//! (over its session here) to `POST` the claim to the backend, and waits for the drone's answer.
//!
//! Only backends on drones with a session on this controller are claimed for such a pool (see
//! `WarmClaim::on_controller`), so the hook never needs another controller.

use crate::log_relay::DroneLinks;
use hangar_store::BackendRow;
use hangar_types::api::{KeyConfig, SpawnConfig};
use hangar_types::protocol::{ClaimHookOutcome, ControllerToDrone};
use hangar_types::timing::CLAIM_HOOK_ANSWER_TIMEOUT;
use hangar_types::warm_pool::ClaimHook;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Claim hooks waiting for their drone's answer on this controller. Cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct ClaimHooks {
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<ClaimHookOutcome>>>>,
    next_request: Arc<AtomicU64>,
}

/// What the hook tells a backend claimed for `key` by a connect with `spawn`.
pub(crate) fn hook_body(backend: &BackendRow, key: &KeyConfig, spawn: &SpawnConfig) -> ClaimHook {
    ClaimHook {
        backend_id: backend.id.clone(),
        key: key.clone(),
        fencing_token: backend.fencing_token,
        static_token: backend.static_token.clone(),
        env: spawn.executable.env().clone(),
    }
}

/// How a hook ended, as the connect sees it.
#[derive(Debug)]
pub(crate) enum HookResult {
    Accepted,
    /// The drone refused the claim and killed the backend (its final state, when known).
    Refused(ClaimHookOutcome),
    /// No answer: the drone has no session here, or did not answer in time.
    Unanswered,
}

impl ClaimHooks {
    /// Hands a drone's `ClaimHookResult` to the claim waiting for it (late answers are dropped).
    pub fn deliver(&self, request_id: u64, outcome: ClaimHookOutcome) {
        let waiting = match self.waiting.lock() {
            Ok(mut w) => w.remove(&request_id),
            Err(poisoned) => poisoned.into_inner().remove(&request_id),
        };
        match waiting {
            Some(sender) => {
                let _ = sender.send(outcome);
            }
            None => tracing::debug!(request_id, "Claim hook answer nobody waits for"),
        }
    }

    fn forget(&self, request_id: u64) {
        match self.waiting.lock() {
            Ok(mut w) => w.remove(&request_id),
            Err(poisoned) => poisoned.into_inner().remove(&request_id),
        };
    }

    /// Sends the hook for a just-claimed `backend` and waits for the drone's answer.
    pub(crate) async fn run(
        &self,
        links: &DroneLinks,
        backend: &BackendRow,
        path: &str,
        body: ClaimHook,
    ) -> HookResult {
        let Some(sender) = links.sender(&backend.cluster, &backend.drone) else {
            return HookResult::Unanswered;
        };
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiting.lock() {
            Ok(mut w) => w.insert(request_id, tx),
            Err(poisoned) => poisoned.into_inner().insert(request_id, tx),
        };
        let message = ControllerToDrone::ClaimHook {
            request_id,
            backend: backend.id.clone(),
            path: path.to_string(),
            body,
        };
        let sent = sender.send(&message).await.is_ok();
        let answer = match sent {
            true => tokio::time::timeout(CLAIM_HOOK_ANSWER_TIMEOUT, rx)
                .await
                .ok(),
            false => None,
        };
        self.forget(request_id);
        match answer {
            Some(Ok(ClaimHookOutcome::Accepted)) => HookResult::Accepted,
            Some(Ok(refused)) => HookResult::Refused(refused),
            Some(Err(_)) | None => HookResult::Unanswered,
        }
    }
}
