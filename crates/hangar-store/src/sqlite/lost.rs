//! Backends whose drone is gone: finding the ones that certainly stopped running, listing a drone's
//! live backends for the operator's mark-lost, and forbidding key renewals (`prevent-renew`).
//!
//! Nothing here records a state: the controller records `terminated` through
//! [`crate::Store::record_backend_state`], the one monotonic path that also releases keys and publishes.

use super::rows::{from_json, parse};
use super::{millis_of, SqliteStore};
use crate::model::*;
use crate::StoreResult;
use hangar_types::{BackendId, ClusterName, DroneName};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::time::Duration;

fn live_backend(row: &SqliteRow) -> StoreResult<LiveBackend> {
    let id: String = row.try_get("id")?;
    let drone: String = row.try_get("drone_name")?;
    let state: String = row.try_get("state")?;
    Ok(LiveBackend {
        id: parse("backend id", &id)?,
        drone: parse("drone name", &drone)?,
        state: from_json("backend state", &state)?,
    })
}

pub(super) async fn lost_backends(
    s: &SqliteStore,
    max_heartbeat_age: Duration,
    limit: u32,
) -> StoreResult<Vec<LiveBackend>> {
    let now = s.clock();
    let oldest_heartbeat = now.0.saturating_sub(millis_of(max_heartbeat_age));
    // 70 = terminated.
    let rows = sqlx::query(
        "SELECT b.id, n.name AS drone_name, b.state \
         FROM backend b JOIN node n ON n.id = b.drone_id JOIN drone d ON d.id = b.drone_id \
         WHERE b.last_status_number < 70 \
         AND (n.controller IS NULL OR d.last_heartbeat IS NULL OR d.last_heartbeat <= ?) \
         AND NOT EXISTS (SELECT 1 FROM backend_key k WHERE k.backend_id = b.id AND k.expires_at > ?) \
         ORDER BY b.created_at, b.id LIMIT ?",
    )
    .bind(oldest_heartbeat)
    .bind(now.0)
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await?;
    rows.iter().map(live_backend).collect()
}

pub(super) async fn drone_live_backends(
    s: &SqliteStore,
    cluster: &ClusterName,
    drone: &DroneName,
) -> StoreResult<Option<Vec<LiveBackend>>> {
    let node: Option<NodeId> =
        sqlx::query_scalar("SELECT id FROM node WHERE kind = 'drone' AND cluster = ? AND name = ?")
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
         WHERE b.drone_id = ? AND b.last_status_number < 70 ORDER BY b.created_at, b.id",
    )
    .bind(node)
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(live_backend)
        .collect::<StoreResult<_>>()
        .map(Some)
}

pub(super) async fn prevent_renew(s: &SqliteStore, backend: &BackendId) -> StoreResult<bool> {
    let updated = sqlx::query("UPDATE backend_key SET allow_renew = FALSE WHERE backend_id = ?")
        .bind(backend.as_str())
        .execute(&s.writer)
        .await?
        .rows_affected();
    Ok(updated > 0)
}
