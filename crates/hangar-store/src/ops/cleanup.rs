//! Periodic deletion of data nobody needs any more: expired tokens, left-behind ACME HTTP challenges,
//! and (when an age is configured) long-terminated backends with everything that refers to them.
//!
//! Several controllers may clean up at once (PostgreSQL): the rows of a pass are locked with
//! `FOR UPDATE SKIP LOCKED`, so concurrent passes split the work instead of waiting for each other, and
//! the children deleted are exactly those of the old backends this pass locked and read.

use super::S;
use crate::dialect::millis_of;
use crate::{StoreResult, HTTP_CHALLENGE_RETENTION};
use sqlx::types::Json;
use std::time::Duration;

pub(super) async fn cleanup(s: &S, min_age: Option<Duration>, batch: u32) -> StoreResult<u64> {
    let clock = s.clock();
    let limit = i64::from(batch);
    let mut tx = s.writer.begin().await?;

    let mut deleted = sqlx::query(sql!(
        "DELETE FROM token WHERE token IN \
         (SELECT token FROM token WHERE expires_at <= {now} ORDER BY expires_at LIMIT $2 \
          {lock:FOR UPDATE SKIP LOCKED})"
    ))
    .bind(clock)
    .bind(limit)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    deleted += sqlx::query(sql!(
        "DELETE FROM acme_http_challenge WHERE (cluster, token) IN \
         (SELECT cluster, token FROM acme_http_challenge WHERE created_at <= {now} - $3 \
          ORDER BY created_at LIMIT $2 {lock:FOR UPDATE SKIP LOCKED})"
    ))
    .bind(clock)
    .bind(limit)
    .bind(millis_of(HTTP_CHALLENGE_RETENTION))
    .execute(&mut *tx)
    .await?
    .rows_affected();

    if let Some(min_age) = min_age {
        let min_age = millis_of(min_age);
        // 70 = terminated.
        let old: Vec<String> = sqlx::query_scalar(sql!(
            "SELECT id FROM backend WHERE last_status_number = 70 AND last_status_time <= {now} - $3 \
             ORDER BY last_status_time, id LIMIT $2 {lock:FOR UPDATE SKIP LOCKED}"
        ))
        .bind(clock)
        .bind(limit)
        .bind(min_age)
        .fetch_all(&mut *tx)
        .await?;
        if !old.is_empty() {
            // Children first: foreign keys are enforced.
            for statement in [
                sql!("DELETE FROM token WHERE backend_id IN (SELECT value FROM {json_texts}($1))"),
                sql!("DELETE FROM backend_action WHERE backend_id IN (SELECT value FROM {json_texts}($1))"),
                sql!("DELETE FROM backend_state WHERE backend_id IN (SELECT value FROM {json_texts}($1))"),
                sql!("DELETE FROM backend_key WHERE backend_id IN (SELECT value FROM {json_texts}($1))"),
                sql!("DELETE FROM backend WHERE id IN (SELECT value FROM {json_texts}($1))"),
            ] {
                deleted += sqlx::query(statement)
                    .bind(Json(&old))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        // A key's fencing token only has to exceed its previous one; once that one is older than
        // `min_age` and the key is free, the clock alone (max(now, last + 1)) keeps tokens increasing
        // unless the clock goes back by more than `min_age`. The age is tested on the target row itself
        // so that a row updated by a concurrent acquisition (which holds its lock) is re-checked and kept.
        deleted += sqlx::query(sql!(
            "DELETE FROM key_fencing WHERE last_token <= {now} - $3 AND (namespace, name) IN \
             (SELECT f.namespace, f.name FROM key_fencing f WHERE f.last_token <= {now} - $3 \
              AND NOT EXISTS (SELECT 1 FROM backend_key k \
                              WHERE k.namespace = f.namespace AND k.name = f.name) \
              LIMIT $2)"
        ))
        .bind(clock)
        .bind(limit)
        .bind(min_age)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }

    tx.commit().await?;
    if deleted > 0 {
        tracing::debug!(deleted, "Store cleanup deleted rows");
    }
    Ok(deleted)
}
