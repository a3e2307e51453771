//! Idle and lifetime enforcement (plane-api.md §4.5.2): one sweeper per connected drone session, every
//! `SWEEP_INTERVAL`, queues a soft `Terminate{swept}` for each backend the store reports as due. The
//! decision uses the store clock only; the store excludes backends whose termination was already
//! requested (so unlike Plane, quirk 8, a terminating backend is not re-sent a terminate every pass).

use hangar_store::{NodeId, Store, StoreResult};
use hangar_types::ticks::every;
use hangar_types::timing::SWEEP_INTERVAL;
use hangar_types::{DroneName, TerminationKind, TerminationReason};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Sweeps `drone`'s backends until `cancel` fires. Store errors are logged; the next pass retries.
pub async fn run_sweeper(
    store: Arc<dyn Store>,
    drone: NodeId,
    name: DroneName,
    cancel: CancellationToken,
) {
    let mut ticks = every(SWEEP_INTERVAL, &cancel);
    while ticks.next().await {
        if let Err(e) = sweep_once(store.as_ref(), drone).await {
            tracing::warn!(drone = %name, error = %e, "Sweep failed");
        }
    }
}

/// One pass; returns how many terminations were queued.
pub async fn sweep_once(store: &dyn Store, drone: NodeId) -> StoreResult<usize> {
    let mut queued = 0;
    for backend in store.sweep_candidates(drone).await? {
        if store
            .queue_terminate(&backend, TerminationKind::Soft, TerminationReason::Swept)
            .await?
            .is_some()
        {
            tracing::info!(%backend, "Backend swept (idle or past its lifetime)");
            queued += 1;
        }
    }
    Ok(queued)
}
