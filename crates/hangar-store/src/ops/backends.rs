//! Backends, their key leases and their state history.
//!
//! Key acquisition: the `key_fencing` row of a key is written (so, on PostgreSQL, locked until commit)
//! by every acquisition of that key, which serializes them and keeps fencing tokens strictly
//! increasing even if the clock goes backwards; the unique `(namespace, name)` of `backend_key` makes
//! the key single-holder, and a concurrent acquisition that loses is reported as [`Acquire::KeyHeld`].

use super::actions::{ack_actions, insert_action};
use super::rows::{backend_row, inserted, json, parse, BACKEND_COLUMNS};
use super::{commit, placeholders, tuples, Conn, Db, D, S};
use crate::dialect::{millis_of, render, Announced, Unique};
use crate::events::StoreEvent;
use crate::model::*;
use crate::{StoreError, StoreResult};
use hangar_types::api::KeyConfig;
use hangar_types::protocol::{AcquiredKey, ActionMessage, BackendAction};
use hangar_types::timing::CONNECTED_REPORT_TTL;
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, Millis, WarmPoolName};
use sqlx::types::Json;
use sqlx::Row;
use std::collections::HashMap;

pub(super) async fn key_lookup(s: &S, key: &KeyRef) -> StoreResult<KeyLookup> {
    let row = sqlx::query(sql!(&format!(
        "SELECT k.tag AS held_tag, k.expires_at <= {{now}} AS expired, {BACKEND_COLUMNS} \
         FROM backend_key k JOIN backend b ON b.id = k.backend_id JOIN node n ON n.id = b.drone_id \
         WHERE k.namespace = $2 AND k.name = $3"
    )))
    .bind(s.clock())
    .bind(&key.namespace)
    .bind(&key.name)
    .fetch_optional(&s.reader)
    .await?;
    let Some(row) = row else {
        return Ok(KeyLookup::Missing);
    };
    let backend = backend_row(&row)?;
    if row.try_get::<bool, _>("expired")? {
        return Ok(KeyLookup::Expired { backend });
    }
    Ok(KeyLookup::Live {
        tag: row.try_get("held_tag")?,
        backend,
    })
}

pub(super) async fn remove_expired_key(s: &S, key: &KeyRef) -> StoreResult<bool> {
    // Re-checked under the row lock: a key renewed or re-acquired meanwhile is not deleted.
    let deleted = sqlx::query(sql!(
        "DELETE FROM backend_key WHERE namespace = $2 AND name = $3 AND expires_at <= {now}"
    ))
    .bind(s.clock())
    .bind(&key.namespace)
    .bind(&key.name)
    .execute(&s.writer)
    .await?;
    Ok(deleted.rows_affected() > 0)
}

pub(super) async fn insert_backend_with_key(s: &S, new: NewBackend) -> StoreResult<Acquire> {
    // Dropping `tx` without commit rolls everything back; refusals roll back explicitly first.
    let mut tx = s.writer.begin().await?;
    let (fencing_token, now) = next_fencing_token(&mut tx, s.clock(), &new.key).await?;
    let Some((action, events)) = insert_spawn(&mut tx, &new, fencing_token, now, None).await?
    else {
        tx.rollback().await?;
        return Ok(Acquire::BackendIdTaken);
    };
    if !insert_key(
        &mut tx,
        &new.id,
        &new.key,
        now.0.saturating_add(s.key_lease_ms()),
        fencing_token,
    )
    .await?
    {
        tx.rollback().await?;
        return Ok(Acquire::KeyHeld);
    }
    commit(s, tx, events).await?;
    Ok(Acquire::Acquired {
        fencing_token,
        action,
    })
}

/// Hands out the key's next fencing token (writing, so on PostgreSQL locking, its `key_fencing` row);
/// returns it with the store time.
pub(super) async fn next_fencing_token(
    conn: &mut Conn,
    clock: i64,
    key: &KeyConfig,
) -> StoreResult<(i64, Millis)> {
    let row = sqlx::query(sql!(
        "INSERT INTO key_fencing (namespace, name, last_token) VALUES ($2, $3, {now}) \
         ON CONFLICT (namespace, name) \
         DO UPDATE SET last_token = {greatest}(excluded.last_token, key_fencing.last_token + 1) \
         RETURNING last_token, {now} AS now"
    ))
    .bind(clock)
    .bind(&key.namespace)
    .bind(key.name.as_str())
    .fetch_one(conn)
    .await?;
    Ok((row.try_get("last_token")?, Millis(row.try_get("now")?)))
}

/// Inserts the key lease of `backend`; `false` if another backend holds the key.
pub(super) async fn insert_key(
    conn: &mut Conn,
    backend: &BackendId,
    key: &KeyConfig,
    expires_at: i64,
    fencing_token: i64,
) -> StoreResult<bool> {
    let key_insert = sqlx::query(
        "INSERT INTO backend_key (backend_id, namespace, name, tag, expires_at, fencing_token) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(backend.as_str())
    .bind(&key.namespace)
    .bind(key.name.as_str())
    .bind(&key.tag)
    .bind(expires_at)
    .bind(fencing_token)
    .execute(conn)
    .await;
    inserted(key_insert, Unique::KeyHolder)
}

/// Inserts the backend row (an unclaimed backend of `warm`'s pool and generation, if given), its
/// `scheduled` state and its spawn action; returns the action and the events to announce, or `None`
/// if the backend id is taken.
pub(super) async fn insert_spawn(
    conn: &mut Conn,
    new: &NewBackend,
    fencing_token: i64,
    now: Millis,
    warm: Option<(&WarmPoolName, i64)>,
) -> StoreResult<Option<(ActionMessage, Vec<Announced>)>> {
    let state = BackendState::Scheduled;
    let expiration_time = new
        .lifetime_limit_seconds
        .map(|secs| now.0.saturating_add(i64::from(secs).saturating_mul(1000)));
    let backend_insert = sqlx::query(
        "INSERT INTO backend (id, cluster, pool, drone_id, key_namespace, key_name, key_tag, \
         fencing_token, last_status, last_status_number, last_status_time, state, static_token, \
         subdomain, created_at, max_idle_seconds, lifetime_limit_seconds, expiration_time, \
         last_keepalive, warm_pool, warm_generation) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $11, $15, $16, $17, $11, \
         $18, $19)",
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
    .bind(Json(&state))
    .bind(new.static_token.as_ref().map(|t| t.as_str()))
    .bind(&new.subdomain)
    .bind(new.max_idle_seconds)
    .bind(new.lifetime_limit_seconds)
    .bind(expiration_time)
    .bind(warm.map(|(pool, _)| pool.as_str()))
    .bind(warm.map(|(_, generation)| generation))
    .execute(&mut *conn)
    .await;
    if !inserted(backend_insert, Unique::BackendId)? {
        return Ok(None);
    }
    let history_id = insert_history(conn, &new.id, &state, now).await?;
    let action = ActionMessage {
        action_id: ActionId::random(),
        backend_id: new.id.clone(),
        action: BackendAction::Spawn {
            executable: new.executable.clone(),
            key: AcquiredKey {
                key: new.key.clone(),
                deadlines: new.deadlines,
                token: fencing_token,
            },
            static_token: new.static_token.clone(),
        },
    };
    insert_action(conn, new.drone, &action, now).await?;
    let events = vec![
        Announced::state(history_id, &new.id, &state, now),
        StoreEvent::Action {
            drone: new.drone,
            action: action.clone(),
        }
        .into(),
    ];
    Ok(Some((action, events)))
}

/// Appends a state to the history; returns its row id.
async fn insert_history(
    conn: &mut Conn,
    id: &BackendId,
    state: &BackendState,
    now: Millis,
) -> StoreResult<i64> {
    let history_id = sqlx::query_scalar(
        "INSERT INTO backend_state (backend_id, state, created_at) VALUES ($1, $2, $3) \
         RETURNING id",
    )
    .bind(id.as_str())
    .bind(Json(state))
    .bind(now.0)
    .fetch_one(conn)
    .await?;
    Ok(history_id)
}

pub(super) async fn backend(s: &S, id: &BackendId) -> StoreResult<Option<BackendRow>> {
    read_backend(&s.reader, id.as_str()).await
}

/// The backend `id` with its drone's name, read on `conn`.
pub(super) async fn read_backend<'c>(
    conn: impl sqlx::Executor<'c, Database = Db>,
    id: &str,
) -> StoreResult<Option<BackendRow>> {
    let row = sqlx::query(sql!(&format!(
        "SELECT {BACKEND_COLUMNS} FROM backend b JOIN node n ON n.id = b.drone_id WHERE b.id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(backend_row).transpose()
}

pub(super) async fn record_backend_state(
    s: &S,
    id: &BackendId,
    state: &BackendState,
) -> StoreResult<StateUpdate> {
    let mut updates = record_reports(s, None, &[(id.clone(), state.clone())]).await?;
    updates
        .pop()
        .ok_or_else(|| StoreError::Corrupt("recording one state gave no outcome".to_string()))
}

pub(super) async fn record_drone_reports(
    s: &S,
    drone: NodeId,
    acks: &[ActionId],
    states: &[(BackendId, BackendState)],
) -> StoreResult<Vec<StateUpdate>> {
    record_reports(s, Some((drone, acks)), states).await
}

/// Acks `acks` of a drone and records `states`, in one transaction (see [`record_states`]).
async fn record_reports(
    s: &S,
    acks: Option<(NodeId, &[ActionId])>,
    states: &[(BackendId, BackendState)],
) -> StoreResult<Vec<StateUpdate>> {
    let clock = s.clock();
    let mut tx = s.writer.begin().await?;
    let acks = acks.filter(|(_, acks)| !acks.is_empty());
    if let Some((drone, acks)) = acks {
        ack_actions(&mut tx, clock, drone, acks).await?;
    }
    let (updates, events) = record_states(&mut tx, clock, states).await?;
    if acks.is_some() || !events.is_empty() {
        commit(s, tx, events).await?;
    } else {
        // Nothing written (every state stale or unknown): only row locks to let go of.
        tx.rollback().await?;
    }
    Ok(updates)
}

/// Records `states` in order inside `conn`'s transaction, with a fixed number of statements however
/// many there are: the backends' rows are locked and read, each backend's row is updated once (to its
/// last stored state), and the stored states are appended to the history by one insert. Returns each
/// state's outcome and what to announce.
///
/// Monotonic: a state is stored only when its status is after the stored one and after every state of
/// the batch stored before it for the same backend, exactly as if they were recorded one by one (the
/// row locks, or SQLite's single writer, keep the rows from changing meanwhile). Every state stored for
/// a backend by one batch gets the same time, as one by one: the store clock, or the backend's last
/// state time if that is later. The idle clock starts at `ready`.
async fn record_states(
    conn: &mut Conn,
    clock: i64,
    states: &[(BackendId, BackendState)],
) -> StoreResult<(Vec<StateUpdate>, Vec<Announced>)> {
    let mut stored = locked_status_numbers(conn, states).await?;
    let mut updates = Vec::with_capacity(states.len());
    // Indexes (into `states`) of the states to store, in order.
    let mut applied = Vec::new();
    for (i, (id, state)) in states.iter().enumerate() {
        let number = state.status().number();
        updates.push(match stored.get_mut(id.as_str()) {
            None => StateUpdate::UnknownBackend,
            Some(stored) if number > *stored => {
                *stored = number;
                applied.push(i);
                // Its time is filled in below.
                StateUpdate::Applied { time: Millis(0) }
            }
            Some(_) => StateUpdate::Stale,
        });
    }
    if applied.is_empty() {
        return Ok((updates, Vec::new()));
    }
    let times = update_backends(conn, clock, states, &applied).await?;
    let mut history = Vec::with_capacity(applied.len());
    for &i in &applied {
        let time = *times.get(states[i].0.as_str()).ok_or_else(|| {
            StoreError::Corrupt(format!("backend {} was not updated", states[i].0))
        })?;
        updates[i] = StateUpdate::Applied { time };
        history.push((&states[i].0, &states[i].1, time));
    }
    let terminated: Vec<&str> = history
        .iter()
        .filter(|(_, state, _)| state.status() == BackendStatus::Terminated)
        .map(|(id, _, _)| id.as_str())
        .collect();
    if !terminated.is_empty() {
        // Releases the key at once; a key re-acquired by another backend has another row.
        let sql = format!(
            "DELETE FROM backend_key WHERE backend_id IN ({})",
            placeholders(1, terminated.len())
        );
        let mut query = sqlx::query(&sql);
        for id in terminated {
            query = query.bind(id);
        }
        query.execute(&mut *conn).await?;
    }
    let history_ids = insert_histories(conn, &history).await?;
    let events = history
        .iter()
        .zip(history_ids)
        .map(|((id, state, time), history_id)| Announced::state(history_id, id, state, *time))
        .collect();
    Ok((updates, events))
}

/// Locks the rows of the backends of `states` (in id order, so two batches cannot deadlock) and
/// returns their stored status numbers; unknown backends are missing. The lock is the one the update
/// takes anyway (`FOR NO KEY UPDATE`), which does not hold up inserts that reference the backends
/// (connection tokens of reconnects).
async fn locked_status_numbers(
    conn: &mut Conn,
    states: &[(BackendId, BackendState)],
) -> StoreResult<HashMap<String, i32>> {
    let mut ids: Vec<&str> = states.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = render::<D>(&format!(
        "SELECT id, last_status_number FROM backend WHERE id IN ({}) \
         ORDER BY id {{lock:FOR NO KEY UPDATE}}",
        placeholders(1, ids.len())
    ));
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id);
    }
    query
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("last_status_number")?)))
        .collect()
}

/// Updates each backend with a state in `applied` (indexes into `states`) to its last one, with one
/// statement; returns the new state time of each.
async fn update_backends(
    conn: &mut Conn,
    clock: i64,
    states: &[(BackendId, BackendState)],
    applied: &[usize],
) -> StoreResult<HashMap<String, Millis>> {
    // Per backend, in order of first appearance: its last applied state, and whether `ready` is among
    // its applied states (the idle clock starts then).
    let mut last: Vec<(&BackendId, &BackendState, bool)> = Vec::new();
    for &i in applied {
        let (id, state) = &states[i];
        let ready = state.status() == BackendStatus::Ready;
        match last.iter_mut().find(|(seen, _, _)| *seen == id) {
            Some(entry) => {
                entry.1 = state;
                entry.2 |= ready;
            }
            None => last.push((id, state, ready)),
        }
    }
    // The monotonic check is repeated here only as a safeguard: the rows are locked.
    let sql = render::<D>(&format!(
        "UPDATE backend SET last_status = v.column2, last_status_number = v.column3, \
         last_status_time = {{greatest}}({{now}}, last_status_time), \
         state = v.column4, cluster_address = v.column5, \
         last_keepalive = CASE WHEN v.column6 THEN {{greatest}}({{now}}, last_status_time) \
                          ELSE last_keepalive END \
         FROM (VALUES {}) AS v \
         WHERE backend.id = v.column1 AND backend.last_status_number < v.column3 \
         RETURNING id, last_status_time",
        tuples(2, 6, last.len())
    ));
    let mut query = sqlx::query(&sql).bind(clock);
    for (id, state, ready) in last {
        let status = state.status();
        query = query
            .bind(id.as_str())
            .bind(status.as_str())
            .bind(status.number())
            .bind(Json(state))
            .bind(state.address().map(|a| a.to_string()))
            .bind(ready);
    }
    query
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("id")?, Millis(row.try_get("last_status_time")?))))
        .collect()
}

/// Appends states to the history with one statement; returns their row ids, in the order given.
async fn insert_histories(
    conn: &mut Conn,
    history: &[(&BackendId, &BackendState, Millis)],
) -> StoreResult<Vec<i64>> {
    let sql = format!(
        "INSERT INTO backend_state (backend_id, state, created_at) VALUES {} RETURNING id",
        tuples(1, 3, history.len())
    );
    let mut query = sqlx::query_scalar(&sql);
    for (id, state, time) in history {
        query = query.bind(id.as_str()).bind(Json(*state)).bind(time.0);
    }
    let mut ids: Vec<i64> = query.fetch_all(&mut *conn).await?;
    // Row ids are handed out in the order of the VALUES rows; RETURNING's order is not promised.
    ids.sort_unstable();
    Ok(ids)
}

pub(super) async fn backend_history(
    s: &S,
    id: &BackendId,
) -> StoreResult<Vec<(BackendState, Millis)>> {
    let rows = sqlx::query(
        "SELECT state, created_at FROM backend_state WHERE backend_id = $1 ORDER BY id",
    )
    .bind(id.as_str())
    .fetch_all(&s.reader)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                json::<BackendState>(row, "state", "backend state")?,
                Millis(row.try_get("created_at")?),
            ))
        })
        .collect()
}

pub(super) async fn sweep_candidates(s: &S, drone: NodeId) -> StoreResult<Vec<BackendId>> {
    // 50 = ready, 60 = terminating. `max_idle_seconds` is INTEGER: widen before multiplying.
    let ids: Vec<String> = sqlx::query_scalar(sql!(
        "SELECT id FROM backend \
         WHERE drone_id = $2 AND terminate_requested_at IS NULL AND last_status_number < 60 \
         AND ((last_status_number = 50 AND max_idle_seconds IS NOT NULL \
               AND {now} - last_keepalive > CAST(max_idle_seconds AS BIGINT) * 1000 \
               AND NOT EXISTS (SELECT 1 FROM backend_connection c \
                               WHERE c.backend_id = backend.id AND c.connected_until > {now})) \
              OR (expiration_time IS NOT NULL AND {now} > expiration_time)) \
         ORDER BY created_at, id"
    ))
    .bind(s.clock())
    .bind(drone)
    .fetch_all(&s.reader)
    .await?;
    ids.iter().map(|id| parse("backend id", id)).collect()
}

pub(super) async fn keepalive(
    s: &S,
    id: &BackendId,
    proxy: NodeId,
    connected: bool,
) -> StoreResult<KeepAlive> {
    let clock = s.clock();
    let mut tx = s.writer.begin().await?;
    // 70 = terminated.
    let updated = sqlx::query(sql!(
        "UPDATE backend SET last_keepalive = {greatest}(last_keepalive, {now}) \
         WHERE id = $2 AND last_status_number < 70"
    ))
    .bind(clock)
    .bind(id.as_str())
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(KeepAlive::Gone);
    }
    let lease_left: Option<i64> = sqlx::query_scalar(sql!(
        "SELECT expires_at - {now} FROM backend_key WHERE backend_id = $2"
    ))
    .bind(clock)
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    if connected {
        sqlx::query(sql!(
            "INSERT INTO backend_connection (backend_id, proxy_id, connected_until) \
             VALUES ($2, $3, {now} + $4) ON CONFLICT (backend_id, proxy_id) \
             DO UPDATE SET connected_until = excluded.connected_until"
        ))
        .bind(clock)
        .bind(id.as_str())
        .bind(proxy)
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
    let lease_left =
        lease_left.map(|left| std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0)));
    Ok(KeepAlive::Recorded { lease_left })
}

pub(super) async fn renew_key(s: &S, backend: &BackendId) -> StoreResult<bool> {
    let updated = sqlx::query(sql!(
        "UPDATE backend_key SET expires_at = {now} + $2 WHERE backend_id = $3 AND allow_renew"
    ))
    .bind(s.clock())
    .bind(s.key_lease_ms())
    .bind(backend.as_str())
    .execute(&s.writer)
    .await?;
    if updated.rows_affected() > 0 {
        return Ok(true);
    }
    // An unclaimed warm backend holds no key; its drone renews it like one, so that the deadlines keep
    // running when a claim gives it a key. 60 = terminating.
    let unclaimed = sqlx::query(
        "SELECT 1 FROM backend WHERE id = $1 AND warm_pool IS NOT NULL \
         AND terminate_requested_at IS NULL AND last_status_number < 60",
    )
    .bind(backend.as_str())
    .fetch_optional(&s.writer)
    .await?;
    Ok(unclaimed.is_some())
}
