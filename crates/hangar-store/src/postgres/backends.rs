//! Backends, their key leases and their state history.
//!
//! Status numbers ([`BackendStatus::number`]) appear as literals in some SQL below (`50` ready,
//! `60` terminating, `70` terminated) to match the partial indexes declared with the same literals; a
//! test in the SQLite store pins the numbers.

use super::actions::insert_action;
use super::notify::{self, Notice};
use super::rows::{
    backend_row, json_column, parse, to_json, violates_unique, BACKEND_COLUMNS, BACKEND_ID_UNIQUE,
    KEY_SINGLE_HOLDER,
};
use super::{millis_of, PostgresStore};
use crate::events::StoreEvent;
use crate::model::*;
use crate::StoreResult;
use hangar_types::protocol::{AcquiredKey, ActionMessage, BackendAction};
use hangar_types::timing::CONNECTED_REPORT_TTL;
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, Millis};
use serde_json::Value;
use sqlx::{PgConnection, Row};

pub(super) async fn key_lookup(s: &PostgresStore, key: &KeyRef) -> StoreResult<KeyLookup> {
    let sql = format!(
        "SELECT k.tag AS held_tag, k.expires_at <= hangar_now_ms($1) AS expired, {BACKEND_COLUMNS} \
         FROM backend_key k JOIN backend b ON b.id = k.backend_id JOIN node n ON n.id = b.drone_id \
         WHERE k.namespace = $2 AND k.name = $3"
    );
    let Some(row) = sqlx::query(&sql)
        .bind(s.offset())
        .bind(&key.namespace)
        .bind(&key.name)
        .fetch_optional(&s.pool)
        .await?
    else {
        return Ok(KeyLookup::Missing);
    };
    if row.try_get::<bool, _>("expired")? {
        return Ok(KeyLookup::Expired {
            backend: backend_row(&row)?,
        });
    }
    Ok(KeyLookup::Live {
        tag: row.try_get("held_tag")?,
        backend: backend_row(&row)?,
    })
}

pub(super) async fn remove_expired_key(s: &PostgresStore, key: &KeyRef) -> StoreResult<bool> {
    // Re-checked under the row lock: a key renewed or re-acquired meanwhile is not deleted.
    let deleted = sqlx::query(
        "DELETE FROM backend_key \
         WHERE namespace = $1 AND name = $2 AND expires_at <= hangar_now_ms($3)",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(s.offset())
    .execute(&s.pool)
    .await?
    .rows_affected();
    Ok(deleted > 0)
}

pub(super) async fn insert_backend_with_key(
    s: &PostgresStore,
    new: NewBackend,
) -> StoreResult<Acquire> {
    let state = BackendState::Scheduled;
    let state_json = to_json("backend state", &state)?;

    // Dropping `tx` without commit rolls everything back; refusals roll back explicitly first.
    let mut tx = s.pool.begin().await?;
    // Locks the key's fencing row until commit, so acquisitions of one key run one at a time, and each
    // gets a token strictly greater than the previous one even if the clock went backwards.
    let row = sqlx::query(
        "INSERT INTO key_fencing (namespace, name, last_token) \
         VALUES ($1, $2, hangar_now_ms($3)) \
         ON CONFLICT (namespace, name) \
         DO UPDATE SET last_token = GREATEST(excluded.last_token, key_fencing.last_token + 1) \
         RETURNING last_token, hangar_now_ms($3) AS now",
    )
    .bind(&new.key.namespace)
    .bind(new.key.name.as_str())
    .bind(s.offset())
    .fetch_one(&mut *tx)
    .await?;
    let fencing_token: i64 = row.try_get("last_token")?;
    let now = Millis(row.try_get("now")?);
    let expiration_time = new
        .lifetime_limit_seconds
        .map(|secs| now.0.saturating_add(i64::from(secs).saturating_mul(1000)));

    let backend_insert = sqlx::query(
        "INSERT INTO backend (id, cluster, pool, drone_id, key_namespace, key_name, key_tag, \
         fencing_token, last_status, last_status_number, last_status_time, state, static_token, \
         subdomain, created_at, max_idle_seconds, lifetime_limit_seconds, expiration_time, \
         last_keepalive) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $11, $15, $16, $17, $11)",
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
    .bind(new.max_idle_seconds)
    .bind(new.lifetime_limit_seconds)
    .bind(expiration_time)
    .execute(&mut *tx)
    .await;
    match backend_insert {
        Ok(_) => {}
        Err(e) if violates_unique(&e, BACKEND_ID_UNIQUE) => {
            tx.rollback().await?;
            return Ok(Acquire::BackendIdTaken);
        }
        Err(e) => return Err(e.into()),
    }

    // The unique (namespace, name) constraint is what makes the key single-holder.
    let key_insert = sqlx::query(
        "INSERT INTO backend_key (backend_id, namespace, name, tag, expires_at, fencing_token) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(new.id.as_str())
    .bind(&new.key.namespace)
    .bind(new.key.name.as_str())
    .bind(&new.key.tag)
    .bind(now.0.saturating_add(s.key_lease_ms()))
    .bind(fencing_token)
    .execute(&mut *tx)
    .await;
    match key_insert {
        Ok(_) => {}
        Err(e) if violates_unique(&e, KEY_SINGLE_HOLDER) => {
            tx.rollback().await?;
            return Ok(Acquire::KeyHeld);
        }
        Err(e) => return Err(e.into()),
    }

    let history_id = insert_history(&mut tx, &new.id, &state_json, now).await?;
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
    let notices = vec![
        Notice::state(history_id, &new.id, &state, now),
        Notice::Action {
            drone: new.drone,
            action_id: action.action_id.clone(),
        },
    ];
    notify::send(&mut tx, &s.origin, notices).await?;
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

/// Appends a state to the history; returns its row id.
async fn insert_history(
    conn: &mut PgConnection,
    id: &BackendId,
    state_json: &Value,
    now: Millis,
) -> StoreResult<i64> {
    let history_id = sqlx::query_scalar(
        "INSERT INTO backend_state (backend_id, state, created_at) VALUES ($1, $2, $3) \
         RETURNING id",
    )
    .bind(id.as_str())
    .bind(state_json)
    .bind(now.0)
    .fetch_one(conn)
    .await?;
    Ok(history_id)
}

pub(super) async fn backend(s: &PostgresStore, id: &BackendId) -> StoreResult<Option<BackendRow>> {
    let sql = format!(
        "SELECT {BACKEND_COLUMNS} FROM backend b JOIN node n ON n.id = b.drone_id WHERE b.id = $1"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .fetch_optional(&s.pool)
        .await?;
    row.as_ref().map(backend_row).transpose()
}

pub(super) async fn record_backend_state(
    s: &PostgresStore,
    id: &BackendId,
    state: &BackendState,
) -> StoreResult<StateUpdate> {
    let status = state.status();
    let state_json = to_json("backend state", state)?;
    let address = state.address().map(|a| a.to_string());

    let mut tx = s.pool.begin().await?;
    // Monotonic: only a status strictly after the stored one is stored (re-checked after waiting for a
    // concurrent writer's row lock). State times never go backwards either. The idle clock starts at
    // ready.
    let time: Option<i64> = sqlx::query_scalar(
        "UPDATE backend SET last_status = $1, last_status_number = $2, \
         last_status_time = GREATEST(hangar_now_ms($3), last_status_time), \
         state = $4, cluster_address = $5, \
         last_keepalive = CASE WHEN $6 THEN GREATEST(hangar_now_ms($3), last_status_time) \
                          ELSE last_keepalive END \
         WHERE id = $7 AND last_status_number < $2 \
         RETURNING last_status_time",
    )
    .bind(status.as_str())
    .bind(status.number())
    .bind(s.offset())
    .bind(&state_json)
    .bind(address)
    .bind(status == BackendStatus::Ready)
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(time) = time.map(Millis) else {
        let exists = sqlx::query("SELECT 1 FROM backend WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        return Ok(if exists {
            StateUpdate::Stale
        } else {
            StateUpdate::UnknownBackend
        });
    };
    if status == BackendStatus::Terminated {
        // Releases the key at once; a key re-acquired by another backend has another row.
        sqlx::query("DELETE FROM backend_key WHERE backend_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    let history_id = insert_history(&mut tx, id, &state_json, time).await?;
    notify::send(
        &mut tx,
        &s.origin,
        vec![Notice::state(history_id, id, state, time)],
    )
    .await?;
    tx.commit().await?;

    s.events.publish(StoreEvent::BackendState {
        backend: id.clone(),
        state: state.clone(),
        time,
    });
    Ok(StateUpdate::Applied { time })
}

pub(super) async fn backend_history(
    s: &PostgresStore,
    id: &BackendId,
) -> StoreResult<Vec<(BackendState, Millis)>> {
    let rows = sqlx::query(
        "SELECT state, created_at FROM backend_state WHERE backend_id = $1 ORDER BY id",
    )
    .bind(id.as_str())
    .fetch_all(&s.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                json_column(row, "state", "backend state")?,
                Millis(row.try_get("created_at")?),
            ))
        })
        .collect()
}

pub(super) async fn sweep_candidates(
    s: &PostgresStore,
    drone: NodeId,
) -> StoreResult<Vec<BackendId>> {
    // 50 = ready, 60 = terminating. `max_idle_seconds` is INTEGER: widen before multiplying.
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM backend \
         WHERE drone_id = $1 AND terminate_requested_at IS NULL AND last_status_number < 60 \
         AND ((last_status_number = 50 AND max_idle_seconds IS NOT NULL \
               AND hangar_now_ms($2) - last_keepalive > max_idle_seconds::BIGINT * 1000 \
               AND NOT EXISTS (SELECT 1 FROM backend_connection c \
                               WHERE c.backend_id = backend.id \
                               AND c.connected_until > hangar_now_ms($2))) \
              OR (expiration_time IS NOT NULL AND hangar_now_ms($2) > expiration_time)) \
         ORDER BY created_at, id",
    )
    .bind(drone)
    .bind(s.offset())
    .fetch_all(&s.pool)
    .await?;
    ids.iter().map(|id| parse("backend id", id)).collect()
}

pub(super) async fn keepalive(
    s: &PostgresStore,
    id: &BackendId,
    proxy: NodeId,
    connected: bool,
) -> StoreResult<bool> {
    let mut tx = s.pool.begin().await?;
    // 70 = terminated.
    let updated = sqlx::query(
        "UPDATE backend SET last_keepalive = GREATEST(last_keepalive, hangar_now_ms($1)) \
         WHERE id = $2 AND last_status_number < 70",
    )
    .bind(s.offset())
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
             VALUES ($1, $2, hangar_now_ms($3) + $4) ON CONFLICT (backend_id, proxy_id) \
             DO UPDATE SET connected_until = excluded.connected_until",
        )
        .bind(id.as_str())
        .bind(proxy)
        .bind(s.offset())
        .bind(millis_of(CONNECTED_REPORT_TTL))
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query("DELETE FROM backend_connection WHERE backend_id = $1 AND proxy_id = $2")
            .bind(id.as_str())
            .bind(proxy)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn renew_key(s: &PostgresStore, backend: &BackendId) -> StoreResult<bool> {
    let updated = sqlx::query(
        "UPDATE backend_key SET expires_at = hangar_now_ms($1) + $2 \
         WHERE backend_id = $3 AND allow_renew",
    )
    .bind(s.offset())
    .bind(s.key_lease_ms())
    .bind(backend.as_str())
    .execute(&s.pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}
