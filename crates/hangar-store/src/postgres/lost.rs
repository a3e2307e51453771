//! Backends whose drone is gone: finding the ones that certainly stopped running, listing a drone's
//! live backends for the operator's mark-lost, and forbidding key renewals (`prevent-renew`).
//!
//! Nothing here records a state: the controller records `terminated` through
//! [`crate::Store::record_backend_state`], the one monotonic path that also releases keys and publishes,
//! so concurrent sweeps by several controllers are harmless (the second recording is stale).

use super::rows::{json_column, parse};
use super::{millis_of, PostgresStore};
use crate::model::*;
use crate::StoreResult;
use hangar_types::{BackendId, ClusterName, DroneName};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::time::Duration;

fn live_backend(row: &PgRow) -> StoreResult<LiveBackend> {
    let id: String = row.try_get("id")?;
    let drone: String = row.try_get("drone_name")?;
    Ok(LiveBackend {
        id: parse("backend id", &id)?,
        drone: parse("drone name", &drone)?,
        state: json_column(row, "state", "backend state")?,
    })
}

pub(super) async fn lost_backends(
    s: &PostgresStore,
    max_heartbeat_age: Duration,
    limit: u32,
) -> StoreResult<Vec<LiveBackend>> {
    // 70 = terminated.
    let rows = sqlx::query(
        "SELECT b.id, n.name AS drone_name, b.state \
         FROM backend b JOIN node n ON n.id = b.drone_id JOIN drone d ON d.id = b.drone_id \
         WHERE b.last_status_number < 70 \
         AND (n.controller IS NULL OR d.last_heartbeat IS NULL \
              OR d.last_heartbeat <= hangar_now_ms($1) - $2) \
         AND NOT EXISTS (SELECT 1 FROM backend_key k \
                         WHERE k.backend_id = b.id AND k.expires_at > hangar_now_ms($1)) \
         ORDER BY b.created_at, b.id LIMIT $3",
    )
    .bind(s.offset())
    .bind(millis_of(max_heartbeat_age))
    .bind(i64::from(limit))
    .fetch_all(&s.pool)
    .await?;
    rows.iter().map(live_backend).collect()
}

pub(super) async fn drone_live_backends(
    s: &PostgresStore,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<Vec<LiveBackend>>> {
    let node: Option<NodeId> = sqlx::query_scalar(
        "SELECT id FROM node WHERE kind = 'drone' AND cluster = $1 AND name = $2",
    )
    .bind(cluster.as_str())
    .bind(drone.as_str())
    .fetch_optional(&s.pool)
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
    .fetch_all(&s.pool)
    .await?;
    rows.iter()
        .map(live_backend)
        .collect::<StoreResult<_>>()
        .map(Some)
}

pub(super) async fn prevent_renew(s: &PostgresStore, backend: &BackendId) -> StoreResult<bool> {
    let updated = sqlx::query("UPDATE backend_key SET allow_renew = FALSE WHERE backend_id = $1")
        .bind(backend.as_str())
        .execute(&s.pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
}
