//! Periodic deletion of data nobody needs any more: expired tokens, left-behind ACME HTTP challenges, and (when an age is configured)
//! long-terminated backends with everything that refers to them.

use super::{millis_of, SqliteStore};
use crate::{StoreResult, HTTP_CHALLENGE_RETENTION};
use std::time::Duration;

/// The old terminated backends of one pass: the same rows every time it is evaluated inside the pass's
/// transaction (deterministic order, and deleting their children does not change the backend rows).
/// 70 = terminated. Binds: cutoff, limit.
const OLD_BACKENDS: &str = "SELECT id FROM backend \
    WHERE last_status_number = 70 AND last_status_time <= ? \
    ORDER BY last_status_time, id LIMIT ?";

pub(super) async fn cleanup(
    s: &SqliteStore,
    min_age: Option<Duration>,
    batch: u32,
) -> StoreResult<u64> {
    let now = s.clock();
    let limit = i64::from(batch);
    let mut tx = s.writer.begin().await?;

    let mut deleted = sqlx::query(
        "DELETE FROM token WHERE token IN \
         (SELECT token FROM token WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
    )
    .bind(now.0)
    .bind(limit)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    deleted += sqlx::query(
        "DELETE FROM acme_http_challenge WHERE (cluster, token) IN \
         (SELECT cluster, token FROM acme_http_challenge WHERE created_at <= ? \
          ORDER BY created_at LIMIT ?)",
    )
    .bind(now.0.saturating_sub(millis_of(HTTP_CHALLENGE_RETENTION)))
    .bind(limit)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    if let Some(min_age) = min_age {
        let cutoff = now.0.saturating_sub(millis_of(min_age));
        // Children first: foreign keys are enforced.
        for child in [
            "DELETE FROM token WHERE backend_id IN",
            "DELETE FROM backend_action WHERE backend_id IN",
            "DELETE FROM backend_state WHERE backend_id IN",
            "DELETE FROM backend_key WHERE backend_id IN",
            "DELETE FROM backend WHERE id IN",
        ] {
            deleted += sqlx::query(&format!("{child} ({OLD_BACKENDS})"))
                .bind(cutoff)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        // A key's fencing token only has to exceed its previous one; once that one is older than
        // `min_age` and the key is free, the clock alone (max(now, last + 1)) keeps tokens increasing
        // unless the clock goes back by more than `min_age`.
        deleted += sqlx::query(
            "DELETE FROM key_fencing WHERE (namespace, name) IN \
             (SELECT f.namespace, f.name FROM key_fencing f WHERE f.last_token <= ? \
              AND NOT EXISTS (SELECT 1 FROM backend_key k \
                              WHERE k.namespace = f.namespace AND k.name = f.name) \
              LIMIT ?)",
        )
        .bind(cutoff)
        .bind(limit)
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
