//! Read-only listings for the controller's dashboard and `hangar list`. Each is one bounded query on an
//! index.

use super::rows::{backend_row, parse, parsed, BACKEND_COLUMNS};
use super::S;
use crate::model::{BackendCount, BackendFilter, BackendRow};
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

/// Newest first on the `backend_created` / `backend_status_created` indexes (migration 0004); the
/// other conditions filter the rows that walk yields.
pub(super) async fn list_backends(s: &S, filter: &BackendFilter) -> StoreResult<Vec<BackendRow>> {
    // Only the conditions given are in the statement, each with the next parameter number, so every
    // parameter has a known type (PostgreSQL cannot type `$1 IS NULL`).
    let mut conditions = Vec::new();
    let mut values: Vec<&str> = Vec::new();
    let given = [
        ("b.last_status", filter.status.map(BackendStatus::as_str)),
        (
            "b.cluster",
            filter.cluster.as_ref().map(ClusterName::as_str),
        ),
        ("b.key_name", filter.key.as_deref()),
        ("b.key_namespace", filter.namespace.as_deref()),
    ];
    for (column, value) in given {
        if let Some(value) = value {
            values.push(value);
            conditions.push(format!("{column} = ${}", values.len()));
        }
    }
    let filter_sql = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {BACKEND_COLUMNS} FROM backend b JOIN node n ON n.id = b.drone_id {filter_sql} \
         ORDER BY b.created_at DESC, b.id DESC LIMIT ${}",
        values.len() + 1
    );
    let mut query = sqlx::query(&sql);
    for value in values {
        query = query.bind(value);
    }
    let rows = query
        .bind(i64::from(filter.limit))
        .fetch_all(&s.reader)
        .await?;
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
