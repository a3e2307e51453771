//! The drone's durable local state (SQLite): the backends it runs and the state changes it has not yet
//! had acknowledged by the controller.
//!
//! Invariants: every state change is written here (one transaction: the backend's latest state plus an
//! `event` row) *before* it is sent; an event row is deleted only on `AckEvent`, so every connection
//! replays all unacked events in id order; an action id or backend id that was applied once is never
//! applied again (resent spawns are deduplicated here). This module knows nothing about sessions or
//! executors.

use hangar_types::executable::Executable;
use hangar_types::protocol::{AcquiredKey, DroneToController, KeyDeadlines};
use hangar_types::token::ConnectionToken;
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, DroneName, Millis};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, MappedMutexGuard, Mutex, MutexGuard};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS backend (
    id TEXT PRIMARY KEY NOT NULL,
    status TEXT NOT NULL,
    state TEXT NOT NULL,
    spawn TEXT,
    deadlines TEXT,
    runtime TEXT,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL,
    state TEXT NOT NULL,
    timestamp INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS drone (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_action (
    action_id TEXT PRIMARY KEY NOT NULL,
    backend_id TEXT NOT NULL,
    applied_at INTEGER NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the drone state file {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create the drone state file {path}: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("drone state database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("corrupt drone state ({what}): {source}")]
    Corrupt {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("corrupt drone state ({what}): invalid backend id: {source}")]
    InvalidId {
        what: String,
        #[source]
        source: hangar_types::NameError,
    },
}

/// What a drone keeps of a spawn action, to start (or re-adopt) the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnRecord {
    pub action_id: ActionId,
    pub executable: Executable,
    pub key: AcquiredKey,
    pub static_token: Option<ConnectionToken>,
}

/// A backend row.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBackend {
    pub id: BackendId,
    pub state: BackendState,
    /// `None` for a backend the drone only learnt of through a terminate.
    pub spawn: Option<SpawnRecord>,
    /// The latest key deadlines (drone clock).
    pub deadlines: Option<KeyDeadlines>,
    /// What the executor recorded to find the backend again (pid, container id).
    pub runtime: Option<serde_json::Value>,
}

/// An unacknowledged state change.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: i64,
    pub backend_id: BackendId,
    pub state: BackendState,
    pub timestamp: Millis,
}

impl StoredEvent {
    pub fn to_message(&self) -> DroneToController {
        DroneToController::BackendEvent {
            event_id: self.event_id,
            backend_id: self.backend_id.clone(),
            state: self.state.clone(),
            timestamp: self.timestamp,
        }
    }
}

/// Result of [`Outbox::insert_spawn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnInsert {
    /// New backend, recorded in state `scheduled`.
    Inserted,
    /// The action id or the backend id was seen before: nothing to start.
    Duplicate,
}

#[derive(Clone)]
pub struct Outbox {
    /// The one connection that writes: every write of the drone goes through it, one at a time, in
    /// the order asked (tokio's mutex is fair). Writers on several connections meet on SQLite's
    /// write lock, and SQLite's busy handler waits for it by sleeping whole milliseconds (1, 2,
    /// 5 ms, ...): an event's ack colliding with a backend's state change cost the spawn path a
    /// millisecond or more. `None` once closed.
    writer: Arc<Mutex<Option<SqliteConnection>>>,
    /// Connections that only read (WAL: a reader never waits for the writer and sees every commit
    /// made before its query).
    readers: SqlitePool,
    /// Holds the directory of a state without a file (deleted when the last clone is dropped).
    _temp_dir: Option<Arc<tempfile::TempDir>>,
    /// Id of the newest event written; sessions wait on it to send new events.
    latest: watch::Sender<i64>,
    /// The events of the latest commit that wrote any, as committed: a session sends them without
    /// reading them back when they follow what it sent ([`Outbox::committed_after`]).
    committed: Arc<std::sync::Mutex<Arc<[StoredEvent]>>>,
    /// Bumped on every acknowledgement; shutdown waits on it for the outbox to drain.
    acks: watch::Sender<u64>,
    /// Every id the `backend` and `applied_action` tables may hold ([`KnownIds`]).
    known: Arc<std::sync::Mutex<KnownIds>>,
}

/// The backend ids and applied action ids of the outbox's tables, or more: read when the file is
/// opened, added before every write that may insert one, removed once a prune that deleted them has
/// committed. All writes come from this process (one writer connection), so an id missing here is
/// in neither table, and [`Outbox::spawn_applied`] answers a new spawn without reading the file.
#[derive(Debug, Default)]
struct KnownIds {
    backends: HashSet<String>,
    actions: HashSet<String>,
}

impl KnownIds {
    fn add(ids: &mut HashSet<String>, id: &str) {
        if !ids.contains(id) {
            ids.insert(id.to_string());
        }
    }

    /// Whether either id may be in the tables.
    fn may_hold(&self, backend: &BackendId, action: &ActionId) -> bool {
        self.backends.contains(backend.as_str()) || self.actions.contains(action.as_str())
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<String, OutboxError> {
    serde_json::to_string(v).map_err(|source| OutboxError::Corrupt {
        what: "cannot encode".into(),
        source,
    })
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, OutboxError> {
    serde_json::from_str(s).map_err(|source| OutboxError::Corrupt {
        what: what.to_string(),
        source,
    })
}

impl Outbox {
    /// Opens (creating if needed) the state file, or an in-memory database when `path` is `None`.
    pub async fn open(path: Option<&Path>) -> Result<Outbox, OutboxError> {
        // Without a state file the state still lives in a file, in a private temporary directory
        // deleted with the outbox: a real `:memory:` database lives only as long as its connection,
        // and sqlx may close a connection whose query was cancelled (as a reconnect does), which would
        // silently replace the state with an empty database.
        let (path, temp_dir) = match path {
            Some(path) => (path.to_path_buf(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("hangar-drone-")
                    .tempdir()
                    .map_err(|source| OutboxError::Open {
                        path: "temporary directory".into(),
                        source: sqlx::Error::Io(source),
                    })?;
                (dir.path().join("drone.db"), Some(dir))
            }
        };
        create_private_file(&path)?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A commit survives the drone process crashing (the write is in the WAL file before the
            // call returns); only an OS crash or power loss may lose the last commits, and that
            // takes the backends down with it. FULL would fsync on every state change, which was
            // ~0.5 ms on the spawn path per event (five per spawn), for no gain a drone can use.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let open_error = |source| OutboxError::Open {
            path: path.display().to_string(),
            source,
        };
        // The writer first: it creates the file and switches it to WAL.
        let mut writer = options.connect().await.map_err(open_error)?;
        sqlx::raw_sql(SCHEMA).execute(&mut writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(3)
            // A local file's connection does not go stale; the test would be one more round trip
            // to the connection's thread per read (each returned connection is still tested).
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        let latest: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM event")
            .fetch_one(&readers)
            .await?;
        let known = KnownIds {
            backends: sqlx::query_scalar("SELECT id FROM backend")
                .fetch_all(&readers)
                .await?
                .into_iter()
                .collect(),
            actions: sqlx::query_scalar("SELECT action_id FROM applied_action")
                .fetch_all(&readers)
                .await?
                .into_iter()
                .collect(),
        };
        Ok(Outbox {
            writer: Arc::new(Mutex::new(Some(writer))),
            readers,
            _temp_dir: temp_dir.map(Arc::new),
            latest: watch::Sender::new(latest.unwrap_or(0)),
            committed: Arc::default(),
            acks: watch::Sender::new(0),
            known: Arc::new(std::sync::Mutex::new(known)),
        })
    }

    /// The ids the tables may hold.
    fn known(&self) -> std::sync::MutexGuard<'_, KnownIds> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The writer connection, once the writes asked before are done.
    async fn writer(&self) -> Result<MappedMutexGuard<'_, SqliteConnection>, OutboxError> {
        MutexGuard::try_map(self.writer.lock().await, Option::as_mut)
            .map_err(|_| OutboxError::Database(sqlx::Error::PoolClosed))
    }

    /// Records a new backend from a spawn action (state `scheduled`, with its event), unless the action
    /// or the backend is already known.
    pub async fn insert_spawn(
        &self,
        backend: &BackendId,
        spawn: &SpawnRecord,
        now: Millis,
    ) -> Result<SpawnInsert, OutboxError> {
        self.insert_spawn_then(backend, spawn, now, || ()).await
    }

    /// [`insert_spawn`](Self::insert_spawn), calling `locked` once the writer connection is this
    /// call's and before its statements run. Writes take the connection in turn, in the order asked,
    /// so whatever `locked` starts writes only after this commit (the backend's later states come
    /// after its `scheduled`).
    pub async fn insert_spawn_then(
        &self,
        backend: &BackendId,
        spawn: &SpawnRecord,
        now: Millis,
        locked: impl FnOnce(),
    ) -> Result<SpawnInsert, OutboxError> {
        let mut writer = self.writer().await?;
        locked();
        {
            let mut known = self.known();
            KnownIds::add(&mut known.backends, backend.as_str());
            KnownIds::add(&mut known.actions, spawn.action_id.as_str());
        }
        let mut tx = begin_write(&mut writer).await?;
        // Inserts that tell whether the row was there (no lookup first: one round trip fewer to
        // the connection's thread on the spawn path). The action id first: kept even when the
        // backend is known (a new action for it), so that a resend of that action is recognised
        // too. Either one seen before: nothing to start.
        let action = sqlx::query(
            "INSERT OR IGNORE INTO applied_action (action_id, backend_id, applied_at)
             VALUES (?, ?, ?)",
        )
        .bind(spawn.action_id.as_str())
        .bind(backend.as_str())
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        let state = BackendState::Scheduled;
        let inserted = action.rows_affected() == 1
            && sqlx::query(
                "INSERT INTO backend (id, status, state, spawn, deadlines, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(backend.as_str())
            .bind(state.status().as_str())
            .bind(to_json(&state)?)
            .bind(to_json(spawn)?)
            .bind(to_json(&spawn.key.deadlines)?)
            .bind(now.0)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
        if !inserted {
            tx.commit().await?;
            return Ok(SpawnInsert::Duplicate);
        }
        let states = [(state, now)];
        let event_id = insert_events(&mut tx, backend, &states).await?;
        tx.commit().await?;
        self.committed(backend, &states, event_id);
        Ok(SpawnInsert::Inserted)
    }

    /// Whether a spawn of `backend` or with `action` was applied before (a read of the file, unless
    /// neither id was ever written: no write lock). Exact only while no
    /// [`insert_spawn`](Self::insert_spawn) of the same ids runs meanwhile.
    pub async fn spawn_applied(
        &self,
        backend: &BackendId,
        action: &ActionId,
    ) -> Result<bool, OutboxError> {
        if !self.known().may_hold(backend, action) {
            return Ok(false);
        }
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM applied_action WHERE action_id = ?)
                 OR EXISTS (SELECT 1 FROM backend WHERE id = ?)",
        )
        .bind(action.as_str())
        .bind(backend.as_str())
        .fetch_one(&self.readers)
        .await?)
    }

    /// Stores a backend's new state and queues it as an event; returns the event id.
    pub async fn record_state(
        &self,
        backend: &BackendId,
        state: &BackendState,
        now: Millis,
    ) -> Result<i64, OutboxError> {
        self.record_states(backend, &[(state.clone(), now)], None)
            .await
    }

    /// Queues `states` (oldest first, each with the time it was reached) as events of `backend` and
    /// stores the last one as its state, with `runtime` also
    /// [`set_runtime`](Self::set_runtime), all in one transaction (one commit: a started backend's
    /// record with its `waiting` state, and the states before it that were not written yet).
    /// Returns the id of the last event.
    pub async fn record_states(
        &self,
        backend: &BackendId,
        states: &[(BackendState, Millis)],
        runtime: Option<&serde_json::Value>,
    ) -> Result<i64, OutboxError> {
        let Some((state, now)) = states.last() else {
            return Ok(*self.latest.borrow());
        };
        let mut writer = self.writer().await?;
        KnownIds::add(&mut self.known().backends, backend.as_str());
        let mut tx = begin_write(&mut writer).await?;
        // The backend row, then its events, as one script: one round trip to the connection's
        // thread. The script's result carries its last statement's rowid: the last event's id.
        // A `NULL` runtime keeps the stored one.
        let sql = format!(
            "INSERT INTO backend (id, status, state, runtime, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, state = excluded.state,
                 runtime = COALESCE(excluded.runtime, backend.runtime),
                 updated_at = excluded.updated_at;
             {}",
            events_insert(states.len())
        );
        let query = sqlx::query(&sql)
            .bind(backend.as_str())
            .bind(state.status().as_str())
            .bind(to_json(state)?)
            .bind(runtime.map(to_json).transpose()?)
            .bind(now.0);
        let done = bind_events(query, backend, states)?
            .execute(&mut *tx)
            .await?;
        let event_id = done.last_insert_rowid();
        tx.commit().await?;
        self.committed(backend, states, event_id);
        Ok(event_id)
    }

    /// After a commit that queued `states` as events, the last with id `last_id`: keeps them as
    /// the latest commit's events and wakes the sessions. Called while the commit's writer is
    /// still held, so the kept events are always the latest commit's.
    fn committed(&self, backend: &BackendId, states: &[(BackendState, Millis)], last_id: i64) {
        // SQLite numbers the rows of one INSERT in the order of its VALUES: with AUTOINCREMENT
        // each new row gets one more than the largest id ever used.
        let first_id = last_id - states.len() as i64 + 1;
        let events: Arc<[StoredEvent]> = (first_id..)
            .zip(states)
            .map(|(event_id, (state, timestamp))| StoredEvent {
                event_id,
                backend_id: backend.clone(),
                state: state.clone(),
                timestamp: *timestamp,
            })
            .collect();
        match self.committed.lock() {
            Ok(mut committed) => *committed = events,
            Err(poisoned) => *poisoned.into_inner() = events,
        }
        self.latest.send_replace(last_id);
    }

    /// The events after id `after`, if the latest commit's events include the one right after it
    /// (then no event can lie between, and these are all up to that commit). `None` when they do
    /// not: the caller reads from the file ([`events_after`](Self::events_after)).
    pub fn committed_after(&self, after: i64) -> Option<Vec<StoredEvent>> {
        let committed = match self.committed.lock() {
            Ok(committed) => committed.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let first = committed.first()?.event_id;
        let last = committed.last()?.event_id;
        (first <= after + 1 && after < last).then(|| {
            committed
                .iter()
                .filter(|e| e.event_id > after)
                .cloned()
                .collect()
        })
    }

    pub async fn set_deadlines(
        &self,
        backend: &BackendId,
        deadlines: &KeyDeadlines,
    ) -> Result<(), OutboxError> {
        sqlx::query("UPDATE backend SET deadlines = ? WHERE id = ?")
            .bind(to_json(deadlines)?)
            .bind(backend.as_str())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    pub async fn set_runtime(
        &self,
        backend: &BackendId,
        runtime: Option<&serde_json::Value>,
    ) -> Result<(), OutboxError> {
        let runtime = runtime.map(to_json).transpose()?;
        sqlx::query("UPDATE backend SET runtime = ? WHERE id = ?")
            .bind(runtime)
            .bind(backend.as_str())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    pub async fn backend(&self, id: &BackendId) -> Result<Option<StoredBackend>, OutboxError> {
        let row =
            sqlx::query("SELECT id, state, spawn, deadlines, runtime FROM backend WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&self.readers)
                .await?;
        row.map(|r| decode_backend(&r)).transpose()
    }

    /// Backends whose latest state is not `terminated`.
    pub async fn unfinished_backends(&self) -> Result<Vec<StoredBackend>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, state, spawn, deadlines, runtime FROM backend WHERE status != ? ORDER BY id",
        )
        .bind(BackendStatus::Terminated.as_str())
        .fetch_all(&self.readers)
        .await?;
        rows.iter().map(decode_backend).collect()
    }

    /// Unacked events with an id above `after`, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, backend_id, state, timestamp FROM event WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                let event_id: i64 = r.try_get("id")?;
                let what = format!("event {event_id}");
                let backend_id: String = r.try_get("backend_id")?;
                let state: String = r.try_get("state")?;
                Ok(StoredEvent {
                    event_id,
                    backend_id: parse_id(&backend_id, &what)?,
                    state: from_json(&state, &what)?,
                    timestamp: Millis(r.try_get("timestamp")?),
                })
            })
            .collect()
    }

    /// Deletes acknowledged events, with one statement. Returns how many existed.
    pub async fn ack(&self, event_ids: &[i64]) -> Result<u64, OutboxError> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "DELETE FROM event WHERE id IN ({})",
            vec!["?"; event_ids.len()].join(", ")
        );
        let mut delete = sqlx::query(&sql);
        for id in event_ids {
            delete = delete.bind(id);
        }
        let done = delete.execute(&mut *self.writer().await?).await?;
        self.acks.send_modify(|n| *n += 1);
        Ok(done.rows_affected())
    }

    /// The id of the oldest unacked event, if any.
    pub async fn oldest_event(&self) -> Result<Option<i64>, OutboxError> {
        Ok(sqlx::query_scalar("SELECT MIN(id) FROM event")
            .fetch_one(&self.readers)
            .await?)
    }

    pub async fn pending_events(&self) -> Result<i64, OutboxError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM event")
            .fetch_one(&self.readers)
            .await?)
    }

    /// Forgets terminated backends last changed before `before` whose events are all acked, with their
    /// applied actions. The controller stops resending an action once acked, so after a while nothing
    /// can refer to them any more.
    pub async fn prune(&self, before: Millis) -> Result<u64, OutboxError> {
        let mut writer = self.writer().await?;
        let mut tx = begin_write(&mut writer).await?;
        let gone = "SELECT id FROM backend WHERE status = ? AND updated_at < ?
                    AND NOT EXISTS (SELECT 1 FROM event WHERE event.backend_id = backend.id)";
        let actions: Vec<String> = sqlx::query_scalar(&format!(
            "DELETE FROM applied_action WHERE backend_id IN ({gone}) RETURNING action_id"
        ))
        .bind(BackendStatus::Terminated.as_str())
        .bind(before.0)
        .fetch_all(&mut *tx)
        .await?;
        let backends: Vec<String> = sqlx::query_scalar(&format!(
            "DELETE FROM backend WHERE id IN ({gone}) RETURNING id"
        ))
        .bind(BackendStatus::Terminated.as_str())
        .bind(before.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        // Still holding the writer: no write can insert these ids again before they leave.
        let mut known = self.known();
        for action in &actions {
            known.actions.remove(action);
        }
        for backend in &backends {
            known.backends.remove(backend);
        }
        Ok(backends.len() as u64)
    }

    /// Changes whenever an event is written; the value is the newest event id.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }

    /// Changes whenever an event is acknowledged.
    pub fn subscribe_acks(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }

    pub async fn close(&self) {
        self.readers.close().await;
        let writer = self.writer.lock().await.take();
        if let Some(writer) = writer {
            if let Err(e) = writer.close().await {
                tracing::debug!(error = %e, "Failed to close the drone state's writer connection");
            }
        }
    }

    /// The name of the drone this state belongs to, if one was kept.
    pub async fn drone_name(&self) -> Result<Option<DroneName>, OutboxError> {
        let name: Option<String> = sqlx::query_scalar("SELECT name FROM drone WHERE id = 1")
            .fetch_optional(&self.readers)
            .await?;
        name.map(|n| {
            n.parse().map_err(|source| OutboxError::InvalidId {
                what: "drone name".into(),
                source,
            })
        })
        .transpose()
    }

    /// Keeps `name` as the owner of this state unless another drone's name is kept already, which
    /// is returned instead.
    pub async fn claim(&self, name: &DroneName) -> Result<Option<DroneName>, OutboxError> {
        sqlx::query("INSERT OR IGNORE INTO drone (id, name) VALUES (1, ?)")
            .bind(name.as_str())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(self.drone_name().await?.filter(|kept| kept != name))
    }
}

/// Queues `states` in order with one statement; returns the id of the last (ids follow the order
/// of the rows).
async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    backend: &BackendId,
    states: &[(BackendState, Millis)],
) -> Result<i64, OutboxError> {
    let sql = events_insert(states.len());
    let done = bind_events(sqlx::query(&sql), backend, states)?
        .execute(&mut **tx)
        .await?;
    Ok(done.last_insert_rowid())
}

/// The statement that queues `n` events ([`bind_events`] binds its values).
fn events_insert(n: usize) -> String {
    let rows = vec!["(?, ?, ?)"; n].join(", ");
    format!("INSERT INTO event (backend_id, state, timestamp) VALUES {rows}")
}

/// Binds the values of [`events_insert`] for `states` of `backend`, after those bound before.
fn bind_events<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    backend: &'q BackendId,
    states: &[(BackendState, Millis)],
) -> Result<sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>, OutboxError> {
    for (state, at) in states {
        query = query
            .bind(backend.as_str())
            .bind(to_json(state)?)
            .bind(at.0);
    }
    Ok(query)
}

/// Begins a transaction that writes. `BEGIN IMMEDIATE` takes the write lock first, waiting for it
/// up to the busy timeout (only another process can hold it: this one writes on one connection). A
/// deferred transaction (sqlx's `begin`) that reads and then writes after another connection
/// committed cannot upgrade its outdated snapshot: SQLite answers "database is locked" at once,
/// without the busy handler.
async fn begin_write(
    writer: &mut SqliteConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, OutboxError> {
    Ok(writer.begin_with("BEGIN IMMEDIATE").await?)
}

fn parse_id(id: &str, what: &str) -> Result<BackendId, OutboxError> {
    id.parse().map_err(|source| OutboxError::InvalidId {
        what: what.to_string(),
        source,
    })
}

fn decode_backend(r: &sqlx::sqlite::SqliteRow) -> Result<StoredBackend, OutboxError> {
    let id: String = r.try_get("id")?;
    let what = format!("backend {id}");
    let id = parse_id(&id, &what)?;
    let state: String = r.try_get("state")?;
    let spawn: Option<String> = r.try_get("spawn")?;
    let deadlines: Option<String> = r.try_get("deadlines")?;
    let runtime: Option<String> = r.try_get("runtime")?;
    Ok(StoredBackend {
        id,
        state: from_json(&state, &what)?,
        spawn: spawn.map(|s| from_json(&s, &what)).transpose()?,
        deadlines: deadlines.map(|s| from_json(&s, &what)).transpose()?,
        runtime: runtime.map(|s| from_json(&s, &what)).transpose()?,
    })
}

/// Creates the state file readable by its owner only (it holds tokens and commands).
fn create_private_file(path: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| OutboxError::Create {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::api::KeyConfig;
    use serde_json::json;

    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    fn spawn_record() -> SpawnRecord {
        SpawnRecord {
            action_id: ActionId::random(),
            executable: Executable::from_json(&json!({"command": ["true"]})).unwrap(),
            key: AcquiredKey {
                key: KeyConfig {
                    name: "k".parse().unwrap(),
                    namespace: String::new(),
                    tag: String::new(),
                },
                deadlines: KeyDeadlines::from_base(Millis(0)),
                token: 1,
            },
            static_token: None,
        }
    }

    fn ready() -> BackendState {
        BackendState::Ready {
            address: "127.0.0.1:4000".parse().unwrap(),
        }
    }

    async fn statuses(outbox: &Outbox) -> Vec<(i64, BackendStatus)> {
        outbox
            .events_after(0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.event_id, e.state.status()))
            .collect()
    }

    #[tokio::test]
    async fn spawn_is_recorded_once_and_events_replay_in_order() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let outbox = Outbox::open(None).await.unwrap();
            let id = BackendId::random();
            let spawn = spawn_record();
            let mut latest = outbox.subscribe();
            assert_eq!(
                outbox.insert_spawn(&id, &spawn, Millis(1)).await.unwrap(),
                SpawnInsert::Inserted
            );
            assert!(latest.has_changed().unwrap());
            // Same action again, and a new action for the same backend: both duplicates.
            assert_eq!(
                outbox.insert_spawn(&id, &spawn, Millis(2)).await.unwrap(),
                SpawnInsert::Duplicate
            );
            let other_action = SpawnRecord {
                action_id: ActionId::random(),
                ..spawn.clone()
            };
            assert_eq!(
                outbox
                    .insert_spawn(&id, &other_action, Millis(2))
                    .await
                    .unwrap(),
                SpawnInsert::Duplicate
            );
            outbox
                .record_state(&id, &BackendState::Loading, Millis(3))
                .await
                .unwrap();
            let last = outbox.record_state(&id, &ready(), Millis(4)).await.unwrap();
            assert_eq!(*latest.borrow_and_update(), last);
            let events = statuses(&outbox).await;
            let got: Vec<_> = events.iter().map(|(_, s)| *s).collect();
            assert_eq!(
                got,
                [
                    BackendStatus::Scheduled,
                    BackendStatus::Loading,
                    BackendStatus::Ready
                ]
            );
            assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
            let after_first = outbox.events_after(events[0].0, 100).await.unwrap();
            assert_eq!(after_first.len(), 2);
            assert_eq!(
                after_first[0].to_message(),
                DroneToController::BackendEvent {
                    event_id: events[1].0,
                    backend_id: id.clone(),
                    state: BackendState::Loading,
                    timestamp: Millis(3),
                }
            );

            let stored = outbox.backend(&id).await.unwrap().unwrap();
            assert_eq!(stored.state, ready());
            assert_eq!(stored.spawn, Some(spawn));
            assert_eq!(outbox.unfinished_backends().await.unwrap().len(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn acks_delete_and_prune_forgets_finished_backends() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let outbox = Outbox::open(None).await.unwrap();
            let id = BackendId::random();
            let spawn = spawn_record();
            let (other_backend, other_action) = (BackendId::random(), ActionId::random());
            assert!(!outbox.spawn_applied(&id, &spawn.action_id).await.unwrap());
            outbox.insert_spawn(&id, &spawn, Millis(1)).await.unwrap();
            // Applied: by its backend id, or by its action id.
            assert!(outbox.spawn_applied(&id, &other_action).await.unwrap());
            assert!(outbox
                .spawn_applied(&other_backend, &spawn.action_id)
                .await
                .unwrap());
            assert!(!outbox
                .spawn_applied(&other_backend, &other_action)
                .await
                .unwrap());
            let done = ready()
                .apply(hangar_types::state::Transition::Exited {
                    exit_code: Some(0),
                    oom_killed: false,
                })
                .unwrap();
            outbox.record_state(&id, &done, Millis(2)).await.unwrap();
            assert!(outbox.unfinished_backends().await.unwrap().is_empty());
            let acks = outbox.subscribe_acks();
            let events = statuses(&outbox).await;
            assert_eq!(outbox.ack(&[events[0].0]).await.unwrap(), 1);
            assert!(acks.has_changed().unwrap());
            assert_eq!(outbox.ack(&[events[0].0]).await.unwrap(), 0);
            assert_eq!(outbox.pending_events().await.unwrap(), 1);
            // An unacked event keeps the backend.
            assert_eq!(outbox.prune(Millis(100)).await.unwrap(), 0);
            // Several at once; an id acked before is not counted.
            assert_eq!(outbox.ack(&[events[0].0, events[1].0]).await.unwrap(), 1);
            assert_eq!(outbox.prune(Millis(2)).await.unwrap(), 0, "too recent");
            assert_eq!(outbox.prune(Millis(100)).await.unwrap(), 1);
            assert_eq!(outbox.backend(&id).await.unwrap(), None);
            assert!(!outbox.spawn_applied(&id, &spawn.action_id).await.unwrap());
            // Forgotten entirely: the same action would now start a backend again.
            assert_eq!(
                outbox.insert_spawn(&id, &spawn, Millis(200)).await.unwrap(),
                SpawnInsert::Inserted
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_backend_whose_row_a_state_wrote_counts_as_applied() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let outbox = Outbox::open(None).await.unwrap();
            let id = BackendId::random();
            assert!(!outbox
                .spawn_applied(&id, &ActionId::random())
                .await
                .unwrap());
            outbox
                .record_state(&id, &BackendState::Loading, Millis(1))
                .await
                .unwrap();
            assert!(outbox
                .spawn_applied(&id, &ActionId::random())
                .await
                .unwrap());
            assert_eq!(
                outbox
                    .insert_spawn(&id, &spawn_record(), Millis(2))
                    .await
                    .unwrap(),
                SpawnInsert::Duplicate
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn runtime_is_stored_with_the_state() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let outbox = Outbox::open(None).await.unwrap();
            let id = BackendId::random();
            outbox
                .insert_spawn(&id, &spawn_record(), Millis(1))
                .await
                .unwrap();
            let runtime = json!({"pid": 7});
            // Two states not written yet, then `ready` with the runtime: one commit, in order.
            let earlier = [
                (BackendState::Loading, Millis(2)),
                (BackendState::Starting, Millis(3)),
            ];
            let event = outbox
                .record_states(
                    &id,
                    &[&earlier[..], &[(ready(), Millis(4))]].concat(),
                    Some(&runtime),
                )
                .await
                .unwrap();
            assert_eq!(*outbox.subscribe().borrow(), event);
            let events = outbox.events_after(0, 100).await.unwrap();
            let recorded: Vec<_> = events
                .iter()
                .map(|e| (e.state.status(), e.timestamp))
                .collect();
            assert_eq!(
                recorded,
                [
                    (BackendStatus::Scheduled, Millis(1)),
                    (BackendStatus::Loading, Millis(2)),
                    (BackendStatus::Starting, Millis(3)),
                    (BackendStatus::Ready, Millis(4)),
                ]
            );
            assert_eq!(events.last().map(|e| e.event_id), Some(event));
            let stored = outbox.backend(&id).await.unwrap().unwrap();
            assert_eq!(stored.runtime, Some(runtime));
            assert_eq!(stored.state, ready());
            // Without one, the stored runtime stays.
            outbox
                .record_states(&id, &[(BackendState::Loading, Millis(5))], None)
                .await
                .unwrap();
            let stored = outbox.backend(&id).await.unwrap().unwrap();
            assert_eq!(stored.runtime, Some(json!({"pid": 7})));
        })
        .await
        .unwrap();
    }

    /// The latest commit's events, as kept, are the rows in the file (ids included), and are handed
    /// out only when nothing can lie between them and what the caller has.
    #[tokio::test]
    async fn latest_commit_is_kept_as_written() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let outbox = Outbox::open(None).await.unwrap();
            assert_eq!(outbox.committed_after(0), None);
            let id = BackendId::random();
            outbox
                .insert_spawn(&id, &spawn_record(), Millis(1))
                .await
                .unwrap();
            let scheduled = outbox.events_after(0, 100).await.unwrap();
            assert_eq!(outbox.committed_after(0), Some(scheduled.clone()));
            let after = scheduled[0].event_id;
            let states = [
                (BackendState::Loading, Millis(2)),
                (BackendState::Starting, Millis(3)),
                (ready(), Millis(4)),
            ];
            let last = outbox.record_states(&id, &states, None).await.unwrap();
            let written = outbox.events_after(after, 100).await.unwrap();
            assert_eq!(written.len(), 3);
            assert_eq!(outbox.committed_after(after), Some(written.clone()));
            assert_eq!(
                outbox.committed_after(written[0].event_id),
                Some(written[1..].to_vec())
            );
            // `scheduled` is not in the latest commit; nothing is after the last.
            assert_eq!(outbox.committed_after(0), None);
            assert_eq!(outbox.committed_after(last), None);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn state_survives_reopening_the_file() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("drone.sqlite");
            let id = BackendId::random();
            let spawn = spawn_record();
            let first_ids = {
                let outbox = Outbox::open(Some(&path)).await.unwrap();
                outbox.insert_spawn(&id, &spawn, Millis(1)).await.unwrap();
                outbox.record_state(&id, &ready(), Millis(2)).await.unwrap();
                outbox
                    .set_runtime(&id, Some(&json!({"pid": 42})))
                    .await
                    .unwrap();
                let d = KeyDeadlines::from_base(Millis(10));
                outbox.set_deadlines(&id, &d).await.unwrap();
                let ids = statuses(&outbox).await;
                outbox.ack(&[ids[0].0]).await.unwrap();
                outbox.close().await;
                ids
            };
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);

            let outbox = Outbox::open(Some(&path)).await.unwrap();
            assert_eq!(statuses(&outbox).await, first_ids[1..].to_vec());
            // What the file holds counts as applied after reopening, by either id.
            assert!(outbox
                .spawn_applied(&id, &ActionId::random())
                .await
                .unwrap());
            assert!(outbox
                .spawn_applied(&BackendId::random(), &spawn.action_id)
                .await
                .unwrap());
            let stored = outbox.unfinished_backends().await.unwrap();
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0].runtime, Some(json!({"pid": 42})));
            assert_eq!(
                stored[0].deadlines,
                Some(KeyDeadlines::from_base(Millis(10)))
            );
            // New events continue after the old ids.
            let next = outbox
                .record_state(&id, &BackendState::Loading, Millis(3))
                .await
                .unwrap();
            assert!(next > first_ids[1].0);
            assert_eq!(*outbox.subscribe().borrow(), next);
        })
        .await
        .unwrap();
    }

    /// Bursts of spawns, state changes and acks from many tasks at once (as warm fills and claims
    /// make them) all succeed and lose nothing: a transaction that reads before it writes must take
    /// the write lock up front, or SQLite answers "database is locked" without waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_spawns_states_and_acks_all_succeed() {
        const TASKS: usize = 16;
        const BACKENDS_PER_TASK: usize = 10;
        tokio::time::timeout(TEST_TIMEOUT, async {
            let dir = tempfile::tempdir().unwrap();
            let outbox = Outbox::open(Some(&dir.path().join("drone.sqlite")))
                .await
                .unwrap();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..TASKS {
                let outbox = outbox.clone();
                tasks.spawn(async move {
                    let mut ids = Vec::new();
                    for _ in 0..BACKENDS_PER_TASK {
                        let id = BackendId::random();
                        let inserted = outbox.insert_spawn(&id, &spawn_record(), Millis(1)).await?;
                        assert_eq!(inserted, SpawnInsert::Inserted);
                        let loading = outbox
                            .record_state(&id, &BackendState::Loading, Millis(2))
                            .await?;
                        outbox.ack(&[loading]).await?;
                        outbox.record_state(&id, &ready(), Millis(3)).await?;
                        ids.push(id);
                    }
                    Ok::<_, OutboxError>(ids)
                });
            }
            let mut ids = Vec::new();
            while let Some(done) = tasks.join_next().await {
                ids.extend(done.unwrap().unwrap());
            }
            assert_eq!(ids.len(), TASKS * BACKENDS_PER_TASK);
            // Per backend: the `scheduled` and `ready` events are left, `loading` was acked.
            let events = outbox.events_after(0, 10_000).await.unwrap();
            assert_eq!(events.len(), 2 * ids.len());
            for id in &ids {
                let statuses: Vec<_> = events
                    .iter()
                    .filter(|e| &e.backend_id == id)
                    .map(|e| e.state.status())
                    .collect();
                assert_eq!(
                    statuses,
                    [BackendStatus::Scheduled, BackendStatus::Ready],
                    "{id}"
                );
            }
            assert_eq!(outbox.unfinished_backends().await.unwrap().len(), ids.len());
        })
        .await
        .unwrap();
    }
}
