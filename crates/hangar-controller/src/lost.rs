//! Lost backends (plane-api.md §11.1 item 7, fixed): a backend whose drone never comes back is recorded
//! `terminated` with reason `lost` once its key lease has certainly expired, so its key is free again and
//! its routes are dropped; and the operator's mark-lost does the same for a drone at once.
//!
//! Safety: the store reports a backend as lost only when its drone is detached or silent and its lease
//! has expired on the store clock. The drone hard-terminates a backend by its own deadlines before the
//! lease can expire (`KEY_HARD_TERMINATE_AFTER < KEY_LEASE`), so nothing runs any more.
//!
//! Every controller runs the sweep. States are recorded through the one monotonic path
//! ([`Store::record_backend_state`]: key released, event published, proxies told `BackendRemoved`), so
//! concurrent sweeps are harmless: the second recording of a backend is stale and changes nothing.

use hangar_store::{LiveBackend, StateUpdate, Store, StoreResult};
use hangar_types::state::Transition;
use hangar_types::ticks::every;
use hangar_types::timing::UNHEALTHY_AFTER;
use hangar_types::{BackendId, BackendState, ClusterName, DroneName};
use hangar_types::{TerminationKind, TerminationReason};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Time between two lost-backend sweeps.
pub const LOST_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Most backends recorded lost per sweep; the next sweep takes the rest.
pub const LOST_SWEEP_PAGE: u32 = 500;

/// Sweeps every [`LOST_SWEEP_INTERVAL`] until cancelled. Store errors are logged; the next sweep retries.
pub async fn run_lost_backend_sweep(store: Arc<dyn Store>, cancel: CancellationToken) {
    let mut ticks = every(LOST_SWEEP_INTERVAL, &cancel);
    while ticks.next().await {
        if let Err(e) = sweep_lost_backends(store.as_ref()).await {
            tracing::warn!(error = %e, "Lost-backend sweep failed");
        }
    }
}

/// One sweep: records `terminated {reason: lost}` for each backend the store reports as lost. Returns the
/// backends this sweep recorded (another controller's sweep may have recorded some first).
pub async fn sweep_lost_backends(store: &dyn Store) -> StoreResult<Vec<BackendId>> {
    let mut recorded = Vec::new();
    for backend in store
        .lost_backends(UNHEALTHY_AFTER, LOST_SWEEP_PAGE)
        .await?
    {
        let message = format!("drone {} stopped reporting", backend.drone);
        if record_lost(store, &backend, message).await? {
            tracing::warn!(backend = %backend.id, drone = %backend.drone, "Backend lost with its drone");
            recorded.push(backend.id);
        }
    }
    Ok(recorded)
}

/// Marks every backend of a drone that is not terminated as terminated/lost at once, releasing their
/// keys. Each also gets a hard `Terminate` action, so a drone that comes back still running one kills
/// it. `None` if no such drone. Returns the backends marked by this call.
///
/// This is an operator's decision: a drone that is in fact alive but cut off keeps its backends until
/// its key deadlines, while their keys may already be taken elsewhere.
pub async fn mark_drone_lost(
    store: &dyn Store,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<Vec<BackendId>>> {
    let Some(backends) = store.drone_live_backends(cluster, drone).await? else {
        return Ok(None);
    };
    let mut marked = Vec::new();
    for backend in backends {
        store
            .queue_terminate(&backend.id, TerminationKind::Hard, TerminationReason::Lost)
            .await?;
        let message = format!("drone {drone} marked lost by an operator");
        if record_lost(store, &backend, message).await? {
            marked.push(backend.id);
        }
    }
    tracing::warn!(%cluster, %drone, count = marked.len(), "Drone marked lost");
    Ok(Some(marked))
}

/// Records the lost state of `backend`; `true` if this call applied it.
async fn record_lost(
    store: &dyn Store,
    backend: &LiveBackend,
    message: String,
) -> StoreResult<bool> {
    let state = lost_state(&backend.state, message);
    Ok(matches!(
        store.record_backend_state(&backend.id, &state).await?,
        StateUpdate::Applied { .. }
    ))
}

/// `terminated {reason: lost}` after `current`, keeping what the state machine keeps (the last status
/// before termination, a termination kind already requested).
pub fn lost_state(current: &BackendState, message: String) -> BackendState {
    let failed = Transition::Failed {
        reason: TerminationReason::Lost,
        message: message.clone(),
    };
    // Only a terminated state refuses `Failed`; the store never reports those, but stay total.
    current.apply(failed).unwrap_or(BackendState::Terminated {
        last_status: current.status(),
        termination: None,
        reason: Some(TerminationReason::Lost),
        exit_code: None,
        message: Some(message),
        oom_killed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::BackendStatus;

    #[test]
    fn lost_state_keeps_the_last_status() {
        let address = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            lost_state(&BackendState::Ready { address }, "gone".into()),
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: None,
                reason: Some(TerminationReason::Lost),
                exit_code: None,
                message: Some("gone".into()),
                oom_killed: false,
            }
        );
        let terminating = BackendState::Terminating {
            last_status: BackendStatus::Loading,
            termination: TerminationKind::Soft,
            reason: TerminationReason::Swept,
        };
        match lost_state(&terminating, "gone".into()) {
            BackendState::Terminated {
                last_status,
                termination,
                reason,
                ..
            } => {
                assert_eq!(last_status, BackendStatus::Loading);
                assert_eq!(termination, Some(TerminationKind::Soft));
                assert_eq!(reason, Some(TerminationReason::Lost));
            }
            other => panic!("expected terminated, got {other:?}"),
        }
    }
}
