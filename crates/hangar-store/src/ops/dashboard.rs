//! Read-only listings for the controller's dashboard. Each is one bounded query on an index.

use super::rows::{backend_row, parse, parsed, BACKEND_COLUMNS};
use super::S;
use crate::model::{BackendCount, BackendRow};
use crate::StoreResult;
use hangar_types::{BackendStatus, ClusterName};
use sqlx::Row;

pub(super) async fn active_clusters(s: &S, limit: u32) -> StoreResult<Vec<ClusterName>> {
    let rows = sqlx::query(
        "SELECT DISTINCT cluster FROM node WHERE controller IS NOT NULL ORDER BY cluster LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| parsed(row, "cluster", "cluster name"))
        .collect()
}

/// Newest first on the `backend_created` / `backend_status_created` indexes (migration 0004).
pub(super) async fn recent_backends(
    s: &S,
    status: Option<BackendStatus>,
    limit: u32,
) -> StoreResult<Vec<BackendRow>> {
    let (filter, limit_param) = match status {
        Some(_) => ("WHERE b.last_status = $1", "$2"),
        None => ("", "$1"),
    };
    let sql = format!(
        "SELECT {BACKEND_COLUMNS} FROM backend b JOIN node n ON n.id = b.drone_id {filter} \
         ORDER BY b.created_at DESC, b.id DESC LIMIT {limit_param}"
    );
    let mut query = sqlx::query(&sql);
    if let Some(status) = status {
        query = query.bind(status.as_str());
    }
    let rows = query.bind(i64::from(limit)).fetch_all(&s.reader).await?;
    rows.iter().map(backend_row).collect()
}

/// Live (not terminated) backends counted by cluster and status, on the partial index of live
/// backends (`backend_drone_live`, migration 0001): its cost follows the live backends only.
pub(super) async fn live_backend_counts(s: &S) -> StoreResult<Vec<BackendCount>> {
    let rows = sqlx::query(
        "SELECT cluster, last_status, COUNT(*) AS n FROM backend WHERE last_status_number < 70 \
         GROUP BY cluster, last_status ORDER BY cluster, last_status",
    )
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(BackendCount {
                cluster: parsed(row, "cluster", "cluster name")?,
                status: parse("backend status", &row.try_get::<String, _>("last_status")?)?,
                count: row.try_get("n")?,
            })
        })
        .collect()
}
