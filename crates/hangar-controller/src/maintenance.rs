//! The controller's own heartbeat in the store: drones attached to a controller without a recent
//! heartbeat (or marked offline) are not scheduled.

use hangar_store::Store;
use hangar_types::ticks::every;
use hangar_types::timing::HEARTBEAT_INTERVAL;
use hangar_types::ControllerName;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Records this controller as alive every `HEARTBEAT_INTERVAL`; marks it offline when cancelled.
pub async fn run_controller_heartbeat(
    store: Arc<dyn Store>,
    name: ControllerName,
    cancel: CancellationToken,
) {
    let mut ticks = every(HEARTBEAT_INTERVAL, &cancel);
    while ticks.next().await {
        if let Err(e) = store.controller_heartbeat(&name, true).await {
            tracing::warn!(controller = %name, error = %e, "Failed to record controller heartbeat");
        }
    }
    if let Err(e) = store.controller_heartbeat(&name, false).await {
        tracing::warn!(controller = %name, error = %e, "Failed to mark controller offline");
    }
}
