//! Backends, their key leases and their state history.
//!
//! Status numbers ([`BackendStatus::number`]) appear as literals in some SQL below (`50` ready,
//! `60` terminating, `70` terminated) so that SQLite can use the partial indexes declared with the same
//! literals; a test in this module pins the numbers.

use super::actions::insert_action;
use super::rows::{backend_row, from_json, is_unique_violation, to_json, BACKEND_COLUMNS};
use super::SqliteStore;
use crate::events::StoreEvent;
use crate::model::*;
use crate::StoreResult;
use hangar_types::protocol::{AcquiredKey, ActionMessage, BackendAction};
use hangar_types::timing::{CONNECTED_REPORT_TTL, KEY_LEASE};
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, Millis};
use sqlx::{Row, SqliteConnection};

pub(super) async fn key_lookup(s: &SqliteStore, key: &KeyRef) -> StoreResult<KeyLookup> {
    let now = s.clock();
    let sql = format!(
        "SELECT k.tag AS held_tag, k.expires_at, {BACKEND_COLUMNS} \
         FROM backend_key k JOIN backend b ON b.id = k.backend_id JOIN node n ON n.id = b.drone_id \
         WHERE k.namespace = ? AND k.name = ?"
    );
    let Some(row) = sqlx::query(&sql)
        .bind(&key.namespace)
        .bind(&key.name)
        .fetch_optional(&s.reader)
        .await?
    else {
        return Ok(KeyLookup::Missing);
    };
    let expires_at: i64 = row.try_get("expires_at")?;
    if expires_at <= now.0 {
        return Ok(KeyLookup::Expired {
            backend: backend_row(&row)?,
        });
    }
    Ok(KeyLookup::Live {
        tag: row.try_get("held_tag")?,
        backend: backend_row(&row)?,
    })
}

pub(super) async fn remove_expired_key(s: &SqliteStore, key: &KeyRef) -> StoreResult<bool> {
    let now = s.clock();
    let deleted =
        sqlx::query("DELETE FROM backend_key WHERE namespace = ? AND name = ? AND expires_at <= ?")
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(now.0)
            .execute(&s.writer)
            .await?
            .rows_affected();
    Ok(deleted > 0)
}

pub(super) async fn insert_backend_with_key(
    s: &SqliteStore,
    new: NewBackend,
) -> StoreResult<Acquire> {
    let now = s.clock();
    let state = BackendState::Scheduled;
    let state_json = to_json("backend state", &state)?;
    let expiration_time = new
        .lifetime_limit_seconds
        .map(|secs| now.0.saturating_add(i64::from(secs).saturating_mul(1000)));

    // Dropping `tx` without commit rolls everything back, so every early return leaves nothing behind.
    let mut tx = s.writer.begin().await?;
    // Race-free here: all writes go through the single writer connection.
    let id_taken = sqlx::query("SELECT 1 FROM backend WHERE id = ?")
        .bind(new.id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    if id_taken {
        return Ok(Acquire::BackendIdTaken);
    }

    // Strictly greater than any token this key had before, even if the clock went backwards.
    let fencing_token: i64 = sqlx::query_scalar(
        "INSERT INTO key_fencing (namespace, name, last_token) VALUES (?, ?, ?) \
         ON CONFLICT (namespace, name) \
         DO UPDATE SET last_token = MAX(excluded.last_token, key_fencing.last_token + 1) \
         RETURNING last_token",
    )
    .bind(&new.key.namespace)
    .bind(new.key.name.as_str())
    .bind(now.0)
    .fetch_one(&mut *tx)
    .await?;

    sqlx::query(
        "INSERT INTO backend (id, cluster, pool, drone_id, key_namespace, key_name, key_tag, \
         fencing_token, last_status, last_status_number, last_status_time, state, static_token, \
         subdomain, created_at, max_idle_seconds, lifetime_limit_seconds, expiration_time, \
         last_keepalive) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.id.as_str())
    .bind(new.cluster.as_str())
    .bind(&new.pool)
    .bind(new.drone)
    .bind(&new.key.namespace)
    .bind(new.key.name.as_str())
    .bind(&new.key.tag)
    .bind(fencing_token)
    .bind(state.status().as_str())
    .bind(state.status().number())
    .bind(now.0)
    .bind(&state_json)
    .bind(new.static_token.as_ref().map(|t| t.as_str()))
    .bind(&new.subdomain)
    .bind(now.0)
    .bind(new.max_idle_seconds)
    .bind(new.lifetime_limit_seconds)
    .bind(expiration_time)
    .bind(now.0)
    .execute(&mut *tx)
    .await?;

    // The unique (namespace, name) constraint is what makes the key single-holder.
    let key_insert = sqlx::query(
        "INSERT INTO backend_key (backend_id, namespace, name, tag, expires_at, fencing_token) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(new.id.as_str())
    .bind(&new.key.namespace)
    .bind(new.key.name.as_str())
    .bind(&new.key.tag)
    .bind(now.plus(KEY_LEASE).0)
    .bind(fencing_token)
    .execute(&mut *tx)
    .await;
    match key_insert {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Ok(Acquire::KeyHeld),
        Err(e) => return Err(e.into()),
    }

    insert_history(&mut tx, &new.id, &state_json, now).await?;
    let action = ActionMessage {
        action_id: ActionId::random(),
        backend_id: new.id.clone(),
        action: BackendAction::Spawn {
            executable: new.executable,
            key: AcquiredKey {
                key: new.key,
                deadlines: new.deadlines,
                token: fencing_token,
            },
            static_token: new.static_token,
        },
    };
    insert_action(&mut tx, new.drone, &action, now).await?;
    tx.commit().await?;

    s.events.publish(StoreEvent::BackendState {
        backend: new.id,
        state,
        time: now,
    });
    s.events.publish(StoreEvent::Action {
        drone: new.drone,
        action: action.clone(),
    });
    Ok(Acquire::Acquired {
        fencing_token,
        action,
    })
}

pub(super) async fn insert_history(
    conn: &mut SqliteConnection,
    id: &BackendId,
    state_json: &str,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO backend_state (backend_id, state, created_at) VALUES (?, ?, ?)")
        .bind(id.as_str())
        .bind(state_json)
        .bind(now.0)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn backend(s: &SqliteStore, id: &BackendId) -> StoreResult<Option<BackendRow>> {
    let sql = format!(
        "SELECT {BACKEND_COLUMNS} FROM backend b JOIN node n ON n.id = b.drone_id WHERE b.id = ?"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .fetch_optional(&s.reader)
        .await?;
    row.as_ref().map(backend_row).transpose()
}

pub(super) async fn record_backend_state(
    s: &SqliteStore,
    id: &BackendId,
    state: &BackendState,
) -> StoreResult<StateUpdate> {
    let now = s.clock();
    let status = state.status();
    let state_json = to_json("backend state", state)?;
    let address = state.address().map(|a| a.to_string());

    let mut tx = s.writer.begin().await?;
    // Monotonic: only a status strictly after the stored one is stored. The idle clock starts at ready.
    let updated = sqlx::query(
        "UPDATE backend SET last_status = ?, last_status_number = ?, last_status_time = ?, \
         state = ?, cluster_address = ?, \
         last_keepalive = CASE WHEN ? THEN ? ELSE last_keepalive END \
         WHERE id = ? AND last_status_number < ?",
    )
    .bind(status.as_str())
    .bind(status.number())
    .bind(now.0)
    .bind(&state_json)
    .bind(address)
    .bind(status == BackendStatus::Ready)
    .bind(now.0)
    .bind(id.as_str())
    .bind(status.number())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        let exists = sqlx::query("SELECT 1 FROM backend WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        return Ok(if exists {
            StateUpdate::Stale
        } else {
            StateUpdate::UnknownBackend
        });
    }
    if status == BackendStatus::Terminated {
        // Releases the key at once; a key re-acquired by another backend has another row.
        sqlx::query("DELETE FROM backend_key WHERE backend_id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    insert_history(&mut tx, id, &state_json, now).await?;
    tx.commit().await?;

    s.events.publish(StoreEvent::BackendState {
        backend: id.clone(),
        state: state.clone(),
        time: now,
    });
    Ok(StateUpdate::Applied { time: now })
}

pub(super) async fn backend_history(
    s: &SqliteStore,
    id: &BackendId,
) -> StoreResult<Vec<(BackendState, Millis)>> {
    let rows =
        sqlx::query("SELECT state, created_at FROM backend_state WHERE backend_id = ? ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&s.reader)
            .await?;
    rows.iter()
        .map(|row| {
            let state: String = row.try_get("state")?;
            Ok((
                from_json("backend state", &state)?,
                Millis(row.try_get("created_at")?),
            ))
        })
        .collect()
}

pub(super) async fn sweep_candidates(
    s: &SqliteStore,
    drone: NodeId,
) -> StoreResult<Vec<BackendId>> {
    let now = s.clock();
    // 50 = ready, 60 = terminating.
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM backend \
         WHERE drone_id = ? AND terminate_requested_at IS NULL AND last_status_number < 60 \
         AND ((last_status_number = 50 AND max_idle_seconds IS NOT NULL \
               AND ? - last_keepalive > max_idle_seconds * 1000 \
               AND NOT EXISTS (SELECT 1 FROM backend_connection c \
                               WHERE c.backend_id = backend.id AND c.connected_until > ?)) \
              OR (expiration_time IS NOT NULL AND ? > expiration_time)) \
         ORDER BY created_at, id",
    )
    .bind(drone)
    .bind(now.0)
    .bind(now.0)
    .bind(now.0)
    .fetch_all(&s.reader)
    .await?;
    ids.iter()
        .map(|id| super::rows::parse("backend id", id))
        .collect()
}

pub(super) async fn keepalive(
    s: &SqliteStore,
    id: &BackendId,
    proxy: NodeId,
    connected: bool,
) -> StoreResult<bool> {
    let now = s.clock();
    let mut tx = s.writer.begin().await?;
    // 70 = terminated.
    let updated = sqlx::query(
        "UPDATE backend SET last_keepalive = MAX(last_keepalive, ?) \
         WHERE id = ? AND last_status_number < 70",
    )
    .bind(now.0)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    if connected {
        sqlx::query(
            "INSERT INTO backend_connection (backend_id, proxy_id, connected_until) \
             VALUES (?, ?, ?) ON CONFLICT (backend_id, proxy_id) \
             DO UPDATE SET connected_until = excluded.connected_until",
        )
        .bind(id.as_str())
        .bind(proxy)
        .bind(now.plus(CONNECTED_REPORT_TTL).0)
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query("DELETE FROM backend_connection WHERE backend_id = ? AND proxy_id = ?")
            .bind(id.as_str())
            .bind(proxy)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn renew_key(s: &SqliteStore, backend: &BackendId) -> StoreResult<bool> {
    let now = s.clock();
    let updated = sqlx::query(
        "UPDATE backend_key SET expires_at = ? WHERE backend_id = ? AND allow_renew = TRUE",
    )
    .bind(now.plus(KEY_LEASE).0)
    .bind(backend.as_str())
    .execute(&s.writer)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

#[cfg(test)]
mod tests {
    use hangar_types::BackendStatus;

    /// The SQL in this crate spells these numbers out; they must not drift.
    #[test]
    fn status_numbers_used_in_sql() {
        assert_eq!(BackendStatus::Ready.number(), 50);
        assert_eq!(BackendStatus::Terminating.number(), 60);
        assert_eq!(BackendStatus::Terminated.number(), 70);
    }
}
