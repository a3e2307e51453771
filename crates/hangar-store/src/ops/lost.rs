//! Backends whose drone is gone: finding the ones that certainly stopped running, listing a drone's
//! live backends for the operator's mark-lost, and forbidding key renewals (`prevent-renew`).
//!
//! Nothing here records a state: the controller records `terminated` through
//! [`crate::Store::record_backend_state`], the one monotonic path that also releases keys and publishes,
//! so concurrent sweeps by several controllers are harmless (the second recording is stale).

use super::rows::live_backend;
use super::S;
use crate::dialect::millis_of;
use crate::model::*;
use crate::StoreResult;
use hangar_types::{BackendId, ClusterName, DroneName};
use std::time::Duration;

pub(super) async fn lost_backends(
    s: &S,
    max_heartbeat_age: Duration,
    limit: u32,
) -> StoreResult<Vec<LiveBackend>> {
    // 70 = terminated.
    let rows = sqlx::query(sql!(
        "SELECT b.id, n.name AS drone_name, b.state \
         FROM backend b JOIN node n ON n.id = b.drone_id JOIN drone d ON d.id = b.drone_id \
         WHERE b.last_status_number < 70 \
         AND (n.controller IS NULL OR d.last_heartbeat IS NULL OR d.last_heartbeat <= {now} - $2) \
         AND NOT EXISTS (SELECT 1 FROM backend_key k \
                         WHERE k.backend_id = b.id AND k.expires_at > {now}) \
         ORDER BY b.created_at, b.id LIMIT $3"
    ))
    .bind(s.clock())
    .bind(millis_of(max_heartbeat_age))
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await?;
    rows.iter().map(live_backend).collect()
}

pub(super) async fn drone_live_backends(
    s: &S,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<Vec<LiveBackend>>> {
    let node: Option<NodeId> = sqlx::query_scalar(
        "SELECT id FROM node WHERE kind = 'drone' AND cluster = $1 AND name = $2",
    )
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&s.reader)
    .await?;
    let Some(node) = node else {
        return Ok(None);
    };
    // 70 = terminated.
    let rows = sqlx::query(
        "SELECT b.id, n.name AS drone_name, b.state \
         FROM backend b JOIN node n ON n.id = b.drone_id \
         WHERE b.drone_id = $1 AND b.last_status_number < 70 ORDER BY b.created_at, b.id",
    )
    .bind(node)
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(live_backend)
        .collect::<StoreResult<_>>()
        .map(Some)
}

pub(super) async fn prevent_renew(s: &S, backend: &BackendId) -> StoreResult<bool> {
    let updated = sqlx::query("UPDATE backend_key SET allow_renew = FALSE WHERE backend_id = $1")
        .bind(backend.as_str())
        .execute(&s.writer)
        .await?;
    Ok(updated.rows_affected() > 0)
}
