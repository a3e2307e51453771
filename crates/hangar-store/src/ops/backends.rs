//! Backends, their key leases and their state history.
//!
//! Key acquisition: the `key_fencing` row of a key is written (so, on PostgreSQL, locked until commit)
//! by every acquisition of that key, which serializes them and keeps fencing tokens strictly
//! increasing even if the clock goes backwards; the unique `(namespace, name)` of `backend_key` makes
//! the key single-holder, and a concurrent acquisition that loses is reported as [`Acquire::KeyHeld`].

use super::actions::{ack_actions, push_actions};
use super::chain::Chain;
use super::rows::{backend_row, inserted, json, parse, Row, BACKEND_COLUMNS};
use super::tokens::push_tokens;
use super::{commit, placeholders, Conn, Db, D, S};
use crate::dialect::{millis_of, render, Announced, Dialect, Unique};
use crate::events::StoreEvent;
use crate::group_commit::{all_or_each, Answers};
use crate::model::*;
use crate::{StoreError, StoreResult};
use hangar_types::api::KeyConfig;
use hangar_types::protocol::{AcquiredKey, ActionMessage, BackendAction};
use hangar_types::timing::CONNECTED_REPORT_TTL;
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, Millis, WarmPoolName};
use sqlx::types::Json;
use sqlx::Row as _;
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

/// Takes an expired key from `holder` in one transaction: deletes the key row only if `holder` still
/// holds it and its lease is still expired (re-checked under the row lock: a key renewed or
/// re-acquired meanwhile is kept) and records `lost` for `holder` (applied like any state: not over a
/// terminated one). One transaction, so a failure leaves the key with its holder instead of freeing it
/// unrecorded, and the holder's `terminated` event (which makes proxies cut its tunnels) is out when
/// the key is free.
pub(super) async fn take_over_expired_key(
    s: &S,
    key: &KeyRef,
    holder: &BackendId,
    lost: &BackendState,
) -> StoreResult<bool> {
    let clock = s.clock();
    let mut tx = s.writer.begin().await?;
    let deleted = sqlx::query(sql!(
        "DELETE FROM backend_key \
         WHERE namespace = $2 AND name = $3 AND backend_id = $4 AND expires_at <= {now}"
    ))
    .bind(clock)
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(holder.as_str())
    .execute(&mut *tx)
    .await?;
    if deleted.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let (_, events) = record_states(&mut tx, clock, &[(holder.clone(), lost.clone())]).await?;
    commit(s, tx, events).await?;
    Ok(true)
}

/// Group-committed ([`crate::group_commit`]): the spawns of concurrent connects are written by one
/// transaction of a fixed number of statements ([`insert_backends_with_keys`]). Returns once this
/// spawn is committed or refused.
pub(super) async fn insert_backend_with_key(s: &S, new: NewBackend) -> StoreResult<Acquire> {
    s.spawns
        .write(new, |batch| all_or_each(s, batch, spawn_batch))
        .await
}

fn spawn_batch<'a>(s: &'a S, news: Vec<&'a NewBackend>) -> Answers<'a, Acquire> {
    Box::pin(insert_backends_with_keys(s, news))
}

/// Inserts the backends of `news` with their keys in one transaction, all or nothing, and answers
/// each. A batch that is refused (an id or a key taken, or two of its spawns for one id or key) is
/// written again one spawn at a time, so each gets the answer it would get alone.
async fn insert_backends_with_keys(
    s: &S,
    news: Vec<&NewBackend>,
) -> StoreResult<Vec<StoreResult<Acquire>>> {
    if news.len() == 1 || distinct_ids_and_keys(&news) {
        match spawn_together(s, &news).await? {
            Ok(acquired) => return Ok(acquired.into_iter().map(Ok).collect()),
            Err(refusal) if news.len() == 1 => return Ok(vec![Ok(refusal)]),
            Err(_) => {}
        }
    }
    let mut answers = Vec::with_capacity(news.len());
    for new in news {
        answers.push(match spawn_together(s, &[new]).await {
            Ok(Ok(mut acquired)) => acquired
                .pop()
                .ok_or_else(|| StoreError::Corrupt("a spawn was not answered".into())),
            Ok(Err(refusal)) => Ok(refusal),
            Err(e) => Err(e),
        });
    }
    Ok(answers)
}

/// Whether no two of `news` share a backend id or a key.
fn distinct_ids_and_keys(news: &[&NewBackend]) -> bool {
    let mut ids = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    news.iter().all(|new| {
        ids.insert(new.id.as_str()) && keys.insert((&new.key.namespace, new.key.name.as_str()))
    })
}

/// One transaction on the spawns' flush connection: every spawn of `news` acquired (in order) with
/// its connection token ([`NewBackend::token`]), or the refusal (`KeyHeld`, `BackendIdTaken`) that
/// rolled them all back.
async fn spawn_together(s: &S, news: &[&NewBackend]) -> StoreResult<Result<Vec<Acquire>, Acquire>> {
    let mut conn = s.flush_connection(&s.spawn_flush).await?;
    let outcome = spawn_in(s, &mut conn, news).await;
    conn.settle(outcome)
}

async fn spawn_in(
    s: &S,
    conn: &mut Conn,
    news: &[&NewBackend],
) -> StoreResult<Result<Vec<Acquire>, Acquire>> {
    use sqlx::Connection as _;
    // Dropping `tx` without commit rolls everything back; refusals roll back explicitly first.
    let clock = s.clock();
    let mut tx = conn.begin().await?;
    let keys: Vec<&KeyConfig> = news.iter().map(|new| &new.key).collect();
    let (fencing_tokens, now) = next_fencing_tokens(&mut tx, clock, &keys).await?;
    let spawns: Vec<(&NewBackend, i64)> = news.iter().copied().zip(fencing_tokens).collect();
    let actions = spawn_actions(&spawns);
    let leases: Vec<KeyLease> = spawns
        .iter()
        .map(|(new, fencing_token)| (&new.id, &new.key, *fencing_token))
        .collect();
    let expires_at = now.0.saturating_add(s.key_lease_ms());
    let tokens: Vec<NewToken> = news
        .iter()
        .filter_map(|new| Some(new.token.as_ref()?.for_backend(new.id.clone())))
        .collect();
    let tokens: Vec<&NewToken> = tokens.iter().collect();
    // The backends, their states and actions, their keys and tokens: one round trip.
    let mut chain = Chain::with_clock(clock)?;
    push_spawns(&mut chain, &spawns, &actions, now, None)?;
    push_keys(&mut chain, &leases, expires_at)?;
    if !tokens.is_empty() {
        push_tokens(&mut chain, &tokens)?;
    }
    let rows = match chain.run(&mut *tx).await {
        Ok(rows) => rows,
        Err(e) => {
            let refusal = if D::violates(&e, Unique::BackendId) {
                Acquire::BackendIdTaken
            } else if D::violates(&e, Unique::KeyHolder) {
                Acquire::KeyHeld
            } else {
                return Err(e.into());
            };
            tx.rollback().await?;
            return Ok(Err(refusal));
        }
    };
    let events = spawn_events(&spawns, &actions, now, history_ids(&rows)?);
    commit(s, tx, events).await?;
    Ok(Ok(spawns
        .iter()
        .zip(actions)
        .map(|((_, fencing_token), action)| Acquire::Acquired {
            fencing_token: *fencing_token,
            action,
        })
        .collect()))
}

/// Hands out the key's next fencing token (writing, so on PostgreSQL locking, its `key_fencing` row);
/// returns it with the store time.
pub(super) async fn next_fencing_token(
    conn: &mut Conn,
    clock: i64,
    key: &KeyConfig,
) -> StoreResult<(i64, Millis)> {
    let (mut tokens, now) = next_fencing_tokens(conn, clock, &[key]).await?;
    let token = tokens
        .pop()
        .ok_or_else(|| StoreError::Corrupt("no fencing token was handed out".into()))?;
    Ok((token, now))
}

/// [`next_fencing_token`] of each of `keys` (distinct), with one statement; in the order of `keys`.
/// The rows are written in key order, so two batches on one database cannot deadlock.
async fn next_fencing_tokens(
    conn: &mut Conn,
    clock: i64,
    keys: &[&KeyConfig],
) -> StoreResult<(Vec<i64>, Millis)> {
    let mut sorted: Vec<(&str, &str)> = keys
        .iter()
        .map(|key| (key.namespace.as_str(), key.name.as_str()))
        .collect();
    sorted.sort_unstable();
    let rows: Vec<String> = (0..sorted.len())
        .map(|i| format!("(${}, ${}, {{now}})", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let sql = render::<D>(&format!(
        "INSERT INTO key_fencing (namespace, name, last_token) VALUES {} \
         ON CONFLICT (namespace, name) \
         DO UPDATE SET last_token = {{greatest}}(excluded.last_token, key_fencing.last_token + 1) \
         RETURNING namespace, name, last_token, {{now}} AS now",
        rows.join(", ")
    ));
    let mut query = sqlx::query(&sql).bind(clock);
    for (namespace, name) in &sorted {
        query = query.bind(*namespace).bind(*name);
    }
    let mut now = None;
    let mut tokens = HashMap::new();
    for row in query.fetch_all(&mut *conn).await? {
        let key: (String, String) = (row.try_get("namespace")?, row.try_get("name")?);
        tokens.insert(key, row.try_get::<i64, _>("last_token")?);
        now = Some(Millis(row.try_get("now")?));
    }
    let now = now.ok_or_else(|| StoreError::Corrupt("no fencing token was handed out".into()))?;
    let tokens = keys
        .iter()
        .map(|key| {
            tokens
                .get(&(key.namespace.clone(), key.name.to_string()))
                .copied()
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("no fencing token for key {}", key.name))
                })
        })
        .collect::<StoreResult<_>>()?;
    Ok((tokens, now))
}

/// A key lease to insert: its backend, key and fencing token.
type KeyLease<'a> = (&'a BackendId, &'a KeyConfig, i64);

/// Inserts the key lease of `backend`; `false` if another backend holds the key.
pub(super) async fn insert_key(
    conn: &mut Conn,
    backend: &BackendId,
    key: &KeyConfig,
    expires_at: i64,
    fencing_token: i64,
) -> StoreResult<bool> {
    let mut chain = Chain::new();
    push_keys(&mut chain, &[(backend, key, fencing_token)], expires_at)?;
    inserted(chain.run(conn).await, Unique::KeyHolder)
}

/// Adds to `chain` the insert of `leases`, all expiring at `expires_at`, as one write; it fails with
/// a [`Unique::KeyHolder`] violation (nothing inserted) if another backend holds one of the keys.
fn push_keys<'q>(
    chain: &mut Chain<'q>,
    leases: &[KeyLease<'q>],
    expires_at: i64,
) -> StoreResult<()> {
    let expires_at = chain.bind(expires_at)?;
    let mut rows = Vec::with_capacity(leases.len());
    for (backend, key, fencing_token) in leases {
        let backend = chain.bind(backend.as_str())?;
        let namespace = chain.bind(key.namespace.as_str())?;
        let name = chain.bind(key.name.as_str())?;
        let tag = chain.bind(key.tag.as_str())?;
        let fencing_token = chain.bind(*fencing_token)?;
        rows.push(format!(
            "(${backend}, ${namespace}, ${name}, ${tag}, ${expires_at}, ${fencing_token})"
        ));
    }
    chain.push(&format!(
        "INSERT INTO backend_key (backend_id, namespace, name, tag, expires_at, fencing_token) \
         VALUES {}",
        rows.join(", ")
    ));
    Ok(())
}

/// Inserts the backend rows of `spawns` (each with its fencing token; unclaimed backends of `warm`'s
/// pool and generation, if given), their `scheduled` states and their spawn actions, in one round
/// trip; returns the actions (in order) and the events to announce, or `None` (nothing inserted) if a
/// backend id is taken.
pub(super) async fn insert_spawns(
    conn: &mut Conn,
    spawns: &[(&NewBackend, i64)],
    now: Millis,
    warm: Option<(&WarmPoolName, i64)>,
) -> StoreResult<Option<(Vec<ActionMessage>, Vec<Announced>)>> {
    let actions = spawn_actions(spawns);
    let mut chain = Chain::new();
    push_spawns(&mut chain, spawns, &actions, now, warm)?;
    let rows = match chain.run(conn).await {
        Ok(rows) => rows,
        Err(e) if D::violates(&e, Unique::BackendId) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let events = spawn_events(spawns, &actions, now, history_ids(&rows)?);
    Ok(Some((actions, events)))
}

/// The spawn action of each of `spawns`, in order.
fn spawn_actions(spawns: &[(&NewBackend, i64)]) -> Vec<ActionMessage> {
    spawns
        .iter()
        .map(|(new, fencing_token)| ActionMessage {
            action_id: ActionId::random(),
            backend_id: new.id.clone(),
            action: BackendAction::Spawn {
                executable: new.executable.clone(),
                key: AcquiredKey {
                    key: new.key.clone(),
                    deadlines: new.deadlines,
                    token: *fencing_token,
                },
                static_token: new.static_token.clone(),
            },
        })
        .collect()
}

/// The state every new backend starts in.
static SCHEDULED: BackendState = BackendState::Scheduled;

/// Adds to `chain` the writes of [`insert_spawns`] (`actions` from [`spawn_actions`]): the backend
/// rows (one write, failing with a [`Unique::BackendId`] violation if an id is taken), their
/// `scheduled` states (the returning write: the history ids) and the actions.
fn push_spawns<'q>(
    chain: &mut Chain<'q>,
    spawns: &[(&'q NewBackend, i64)],
    actions: &'q [ActionMessage],
    now: Millis,
    warm: Option<(&'q WarmPoolName, i64)>,
) -> StoreResult<()> {
    let state = &SCHEDULED;
    // Shared by every row.
    let time = chain.bind(now.0)?;
    let status = chain.bind(state.status().as_str())?;
    let number = chain.bind(state.status().number())?;
    let json = chain.bind(Json(state))?;
    let warm_pool = chain.bind(warm.map(|(pool, _)| pool.as_str()))?;
    let generation = chain.bind(warm.map(|(_, generation)| generation))?;
    let mut rows = Vec::with_capacity(spawns.len());
    for (new, fencing_token) in spawns {
        let expiration_time = new
            .lifetime_limit_seconds
            .map(|secs| now.0.saturating_add(i64::from(secs).saturating_mul(1000)));
        let id = chain.bind(new.id.as_str())?;
        let cluster = chain.bind(new.cluster.as_str())?;
        let pool = chain.bind(new.pool.as_str())?;
        let drone = chain.bind(new.drone)?;
        let namespace = chain.bind(new.key.namespace.as_str())?;
        let name = chain.bind(new.key.name.as_str())?;
        let tag = chain.bind(new.key.tag.as_str())?;
        let fencing_token = chain.bind(*fencing_token)?;
        let static_token = chain.bind(new.static_token.as_ref().map(|t| t.as_str()))?;
        let subdomain = chain.bind(new.subdomain.as_deref())?;
        let max_idle = chain.bind(new.max_idle_seconds)?;
        let lifetime = chain.bind(new.lifetime_limit_seconds)?;
        let expiration_time = chain.bind(expiration_time)?;
        rows.push(format!(
            "(${id}, ${cluster}, ${pool}, ${drone}, ${namespace}, ${name}, ${tag}, \
             ${fencing_token}, ${status}, ${number}, ${time}, ${json}, ${static_token}, \
             ${subdomain}, ${time}, ${max_idle}, ${lifetime}, ${expiration_time}, ${time}, \
             ${warm_pool}, ${generation})"
        ));
    }
    chain.push(&format!(
        "INSERT INTO backend (id, cluster, pool, drone_id, key_namespace, key_name, key_tag, \
         fencing_token, last_status, last_status_number, last_status_time, state, static_token, \
         subdomain, created_at, max_idle_seconds, lifetime_limit_seconds, expiration_time, \
         last_keepalive, warm_pool, warm_generation) VALUES {}",
        rows.join(", ")
    ));
    let history: Vec<(&BackendId, &BackendState)> =
        spawns.iter().map(|(new, _)| (&new.id, state)).collect();
    push_histories(chain, &history, HistoryTime::At(now))?;
    let queued: Vec<(NodeId, &ActionMessage)> = spawns
        .iter()
        .zip(actions)
        .map(|((new, _), action)| (new.drone, action))
        .collect();
    push_actions(chain, &queued, now)
}

/// The events of [`insert_spawns`], given the history ids its chain returned.
fn spawn_events(
    spawns: &[(&NewBackend, i64)],
    actions: &[ActionMessage],
    now: Millis,
    history_ids: Vec<i64>,
) -> Vec<Announced> {
    let mut events = Vec::with_capacity(2 * spawns.len());
    for (((new, _), history_id), action) in spawns.iter().zip(history_ids).zip(actions) {
        events.push(Announced::state(history_id, &new.id, &SCHEDULED, now));
        events.push(
            StoreEvent::Action {
                drone: new.drone,
                action: action.clone(),
            }
            .into(),
        );
    }
    events
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
    let reports = Reports {
        acks: None,
        states: vec![(id.clone(), state.clone())],
    };
    let mut updates = record_reports(s, reports).await?;
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
    let reports = Reports {
        acks: (!acks.is_empty()).then(|| (drone, acks.to_vec())),
        states: states.to_vec(),
    };
    record_reports(s, reports).await
}

pub(super) async fn ack_action(s: &S, drone: NodeId, action: &ActionId) -> StoreResult<()> {
    record_drone_reports(s, drone, std::slice::from_ref(action), &[]).await?;
    Ok(())
}

/// Group-committed ([`crate::group_commit`]): the reports of concurrent calls (every drone session's,
/// and the controller's own states) are written by one transaction of a fixed number of statements on
/// the reports' flush connection ([`write_reports`]). Returns once this call's reports are committed.
async fn record_reports(s: &S, reports: Reports) -> StoreResult<Vec<StateUpdate>> {
    s.reports
        .write(reports, |batch| all_or_each(s, batch, report_batch))
        .await
}

fn report_batch<'a>(s: &'a S, batch: Vec<&'a Reports>) -> Answers<'a, Vec<StateUpdate>> {
    Box::pin(async move {
        let mut conn = s.flush_connection(&s.report_flush).await?;
        let written = write_reports(s, &mut conn, &batch).await;
        conn.settle(written)
    })
}

/// Acks the actions of `batch` and records its states (in the order of the calls, each call's in its
/// order), in one transaction, all or nothing; answers each call with its states' outcomes. Calls
/// recorded together get what they would get one after another: a backend's states are applied in
/// order, whichever call they came from (see [`record_states`]).
async fn write_reports(
    s: &S,
    conn: &mut Conn,
    batch: &[&Reports],
) -> StoreResult<Vec<StoreResult<Vec<StateUpdate>>>> {
    use sqlx::Connection as _;
    let clock = s.clock();
    let mut tx = conn.begin().await?;
    let acks: Vec<(NodeId, &ActionId)> = batch
        .iter()
        .filter_map(|reports| reports.acks.as_ref())
        .flat_map(|(drone, acks)| acks.iter().map(|ack| (*drone, ack)))
        .collect();
    if !acks.is_empty() {
        ack_actions(&mut tx, clock, &acks).await?;
    }
    let states: Vec<(BackendId, BackendState)> = batch
        .iter()
        .flat_map(|reports| reports.states.iter().cloned())
        .collect();
    let (updates, events) = record_states(&mut tx, clock, &states).await?;
    if !acks.is_empty() || !events.is_empty() {
        commit(s, tx, events).await?;
    } else {
        // Nothing written (every state stale or unknown): only row locks to let go of.
        tx.rollback().await?;
    }
    let mut updates = updates.into_iter();
    Ok(batch
        .iter()
        .map(|reports| Ok(updates.by_ref().take(reports.states.len()).collect()))
        .collect())
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
    // The updates, the keys released and the history rows: one round trip.
    let mut chain = Chain::with_clock(clock)?;
    push_backend_updates(&mut chain, states, &applied)?;
    let terminated: Vec<&str> = applied
        .iter()
        .map(|&i| &states[i])
        .filter(|(_, state)| state.status() == BackendStatus::Terminated)
        .map(|(id, _)| id.as_str())
        .collect();
    if !terminated.is_empty() {
        // Releases the key at once; a key re-acquired by another backend has another row.
        let ids: Vec<String> = terminated
            .into_iter()
            .map(|id| Ok(format!("${}", chain.bind(id)?)))
            .collect::<StoreResult<_>>()?;
        chain.push(&format!(
            "DELETE FROM backend_key WHERE backend_id IN ({})",
            ids.join(", ")
        ));
    }
    let history: Vec<(&BackendId, &BackendState)> = applied
        .iter()
        .map(|&i| (&states[i].0, &states[i].1))
        .collect();
    push_histories(&mut chain, &history, HistoryTime::StateTime)?;
    let rows = chain.run(&mut *conn).await?;
    let history_ids = history_ids(&rows)?;
    let mut times = HashMap::new();
    for row in &rows {
        times.insert(
            row.try_get::<String, _>("backend_id")?,
            Millis(row.try_get("created_at")?),
        );
    }
    let mut events = Vec::with_capacity(applied.len());
    for (&i, history_id) in applied.iter().zip(history_ids) {
        let (id, state) = &states[i];
        let time = *times
            .get(id.as_str())
            .ok_or_else(|| StoreError::Corrupt(format!("backend {id} got no history row")))?;
        updates[i] = StateUpdate::Applied { time };
        events.push(Announced::state(history_id, id, state, time));
    }
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

/// Adds to `chain` (made [`Chain::with_clock`]) the update of each backend with a state in `applied`
/// (indexes into `states`) to its last one, as one write. Its state time becomes the store clock, or
/// stays its last state time if that is later ([`HistoryTime::StateTime`] reads the same).
fn push_backend_updates<'q>(
    chain: &mut Chain<'q>,
    states: &'q [(BackendId, BackendState)],
    applied: &[usize],
) -> StoreResult<()> {
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
    let mut rows = Vec::with_capacity(last.len());
    for (id, state, ready) in last {
        let status = state.status();
        let id = chain.bind(id.as_str())?;
        let name = chain.bind(status.as_str())?;
        let number = chain.bind(status.number())?;
        let json = chain.bind(Json(state))?;
        let address = chain.bind(state.address().map(|a| a.to_string()))?;
        let ready = chain.bind(ready)?;
        rows.push(format!(
            "(${id}, ${name}, ${number}, ${json}, ${address}, ${ready})"
        ));
    }
    // The monotonic check is repeated here only as a safeguard: the rows are locked.
    chain.push(&format!(
        "UPDATE backend SET last_status = v.column2, last_status_number = v.column3, \
         last_status_time = {{greatest}}({{now}}, last_status_time), \
         state = v.column4, cluster_address = v.column5, \
         last_keepalive = CASE WHEN v.column6 THEN {{greatest}}({{now}}, last_status_time) \
                          ELSE last_keepalive END \
         FROM (VALUES {}) AS v \
         WHERE backend.id = v.column1 AND backend.last_status_number < v.column3",
        rows.join(", ")
    ));
    Ok(())
}

/// The time of a history row ([`push_histories`]).
enum HistoryTime {
    /// This time (a new backend's `scheduled`).
    At(Millis),
    /// The time [`push_backend_updates`] gives its backend's row: the store clock, or the row's last
    /// state time if that is later. The expression reads the row as it was before the chain on
    /// PostgreSQL (a `WITH` part sees the statement's snapshot) and as the update left it on SQLite
    /// (the script's statements run in turn); both give the updated time.
    StateTime,
}

/// Adds to `chain` the append of `history` (one row per state, in order) as its returning write: each
/// row's `id`, `backend_id` and `created_at`.
fn push_histories<'q>(
    chain: &mut Chain<'q>,
    history: &[(&'q BackendId, &'q BackendState)],
    time: HistoryTime,
) -> StoreResult<()> {
    let at = match time {
        HistoryTime::At(at) => Some(chain.bind(at.0)?),
        HistoryTime::StateTime => None,
    };
    let mut rows = Vec::with_capacity(history.len());
    for (id, state) in history {
        let id = chain.bind(id.as_str())?;
        let state = chain.bind(Json(*state))?;
        let time = match at {
            Some(at) => format!("${at}"),
            None => format!(
                "{{greatest}}({{now}}, (SELECT b.last_status_time FROM backend b WHERE b.id = ${id}))"
            ),
        };
        rows.push(format!("(${id}, ${state}, {time})"));
    }
    chain.push_returning(&format!(
        "INSERT INTO backend_state (backend_id, state, created_at) VALUES {} \
         RETURNING id, backend_id, created_at",
        rows.join(", ")
    ))
}

/// The history ids returned by [`push_histories`]'s write, in the order of its rows.
fn history_ids(rows: &[Row]) -> StoreResult<Vec<i64>> {
    let mut ids = rows
        .iter()
        .map(|row| row.try_get::<i64, _>("id"))
        .collect::<Result<Vec<_>, _>>()?;
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
