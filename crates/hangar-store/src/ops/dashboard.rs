//! Read-only listings for the controller's dashboard. Each is one bounded query on an index.

use super::rows::{backend_row, parsed, BACKEND_COLUMNS};
use super::S;
use crate::model::BackendRow;
use crate::StoreResult;
use hangar_types::{BackendStatus, ClusterName};

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
