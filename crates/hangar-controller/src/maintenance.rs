//! Controller-wide background loops: the controller's own heartbeat in the store (drones attached to a
//! controller without a recent heartbeat are not scheduled) and the periodic cleanup of expired tokens.

use hangar_store::Store;
use hangar_types::timing::HEARTBEAT_INTERVAL;
use hangar_types::ControllerName;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Cleanup cadence (Plane: 180 s, first pass after a random offset so controllers spread out).
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(180);
/// Rows of each kind deleted per cleanup pass.
pub const CLEANUP_BATCH: u32 = 100;

/// Records this controller as alive every `HEARTBEAT_INTERVAL`; marks it offline when cancelled.
pub async fn run_controller_heartbeat(
    store: Arc<dyn Store>,
    name: ControllerName,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = store.controller_heartbeat(&name, true).await {
            tracing::warn!(controller = %name, error = %e, "Failed to record controller heartbeat");
        }
    }
    if let Err(e) = store.controller_heartbeat(&name, false).await {
        tracing::warn!(controller = %name, error = %e, "Failed to mark controller offline");
    }
}

/// Deletes expired tokens every [`CLEANUP_INTERVAL`] (terminated backends are kept).
pub async fn run_cleanup(store: Arc<dyn Store>, cancel: CancellationToken) {
    let offset = rand::rng().random_range(Duration::ZERO..CLEANUP_INTERVAL);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, CLEANUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.cleanup(None, CLEANUP_BATCH).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "Cleanup pass deleted rows"),
            Err(e) => tracing::warn!(error = %e, "Cleanup pass failed"),
        }
    }
}
