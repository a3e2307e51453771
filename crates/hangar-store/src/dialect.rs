//! What differs between SQLite and PostgreSQL, as one interface ([`Dialect`]), and the store type both
//! databases share ([`SqlStore`]). The operations themselves are written once, in `src/ops/`, against
//! this interface; `sqlite.rs` and `postgres.rs` each implement it and compile the operations for
//! their database (see `src/ops/mod.rs` for why they are compiled per database rather than generic).
//!
//! SQL text is shared too: it is PostgreSQL-flavoured SQL with numbered parameters (`$1`, which SQLite
//! and sqlx accept as well) and a few markers that `render` replaces with the dialect's spelling:
//!
//! | marker | SQLite | PostgreSQL |
//! |---|---|---|
//! | `{now}` (store clock; reads parameter `$1`, `SqlStore::clock`) | `$1` (this process's clock) | `hangar_now_ms($1)` (the server's) |
//! | `{greatest}` | `MAX` | `GREATEST` |
//! | `{json_texts}` (rows `value` of a JSON array of strings) | `json_each` | `jsonb_array_elements_text` |
//! | `{lock:CLAUSE}` (a row lock) | dropped: the single writer serializes | `CLAUSE` |

use crate::deadline::STORE_CALL_DEADLINE;
use crate::events::{EventBus, StoreEvent};
use crate::flush_connection::{ConnectionSetup, FlushConnection, FlushSlot};
use crate::group_commit::GroupCommit;
use crate::model::{
    Acquire, DroneCandidate, DroneQuery, KeyReuse, NewBackend, NewToken, Reports, Reuse,
    StateUpdate,
};
use crate::{StoreError, StoreResult};
use hangar_types::timing::KEY_LEASE;
use hangar_types::{BackendId, BackendState, Millis};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// One database's spelling and machinery.
pub trait Dialect: Send + Sync + 'static {
    type Db: sqlx::Database;
    /// How this database spells the markers of the shared SQL.
    const SPELLING: Spelling;
    /// Whether group-committed batches are written on connections of their own, outside the pool
    /// (see `src/flush_connection.rs`); else on the writer pool.
    const OWN_FLUSH_CONNECTION: bool;
    /// The options of the own flush connections of the token batches (`token_flush`,
    /// `reuse_flush`), from the pool's: PostgreSQL commits them without waiting for the WAL flush
    /// (see `src/flush_connection.rs`). `None`: the pool's.
    const TOKEN_FLUSH_SETUP: Option<ConnectionSetup<Self::Db>>;
    /// The store clock, given the test hooks' offset.
    fn clock(&self, offset_ms: i64) -> Clock;
    /// Tells the other stores sharing the database about `events`, inside the transaction on `conn`
    /// (PostgreSQL: `NOTIFY`, delivered only if it commits; SQLite: nothing, it has one store).
    fn relay(
        &self,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        events: &[Announced],
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Whether `e` is a violation of `constraint`.
    fn violates(e: &sqlx::Error, constraint: Unique) -> bool;
    /// Stops background work; the pools close after it.
    fn stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// A call was abandoned at its deadline, leaving its connection mid-exchange (see
    /// `src/deadline.rs`).
    fn call_abandoned(&self) {}
}

/// The text of the markers (see the module docs).
#[derive(Debug)]
pub struct Spelling {
    pub now: &'static str,
    pub greatest: &'static str,
    pub json_texts: &'static str,
    /// Whether `{lock:…}` clauses are kept.
    pub row_locks: bool,
    /// Whether a `WITH` clause may hold an `INSERT` (PostgreSQL's data-modifying CTEs).
    pub modifying_ctes: bool,
}

/// A reading of the store clock.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// This process's clock (SQLite): the time itself.
    Local(Millis),
    /// The database server's clock (PostgreSQL), read by `{now}` with this offset.
    Database { offset_ms: i64 },
}

impl Clock {
    /// The value bound as `$1` of `{now}`.
    fn arg(self) -> i64 {
        match self {
            Clock::Local(now) => now.0,
            Clock::Database { offset_ms } => offset_ms,
        }
    }
}

/// Uniqueness constraints whose violation an operation reports as an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unique {
    /// The primary key of `backend`.
    BackendId,
    /// `(namespace, name)` of `backend_key`: one holder per key.
    KeyHolder,
}

/// An event of one transaction: published on the store's bus after the commit, and relayed to the other
/// stores inside it. A state carries the id of its history row, which a relay may send instead of a
/// state too large to send inline.
#[derive(Debug, Clone)]
pub struct Announced {
    pub event: StoreEvent,
    pub history_id: Option<i64>,
}

impl Announced {
    pub fn state(history_id: i64, backend: &BackendId, state: &BackendState, time: Millis) -> Self {
        Announced {
            event: StoreEvent::BackendState {
                backend: backend.clone(),
                state: state.clone(),
                time,
            },
            history_id: Some(history_id),
        }
    }
}

impl From<StoreEvent> for Announced {
    fn from(event: StoreEvent) -> Self {
        Announced {
            event,
            history_id: None,
        }
    }
}

/// A store over one database: [`crate::sqlite::SqliteStore`] or [`crate::postgres::PostgresStore`].
#[derive(Debug)]
pub struct SqlStore<D: Dialect> {
    pub(crate) dialect: D,
    /// Connections for statements that only read, outside a write transaction.
    pub(crate) reader: sqlx::Pool<D::Db>,
    /// Connections for writes (SQLite: exactly one).
    pub(crate) writer: sqlx::Pool<D::Db>,
    /// Whether `reader` is a pool of its own (else it is `writer`).
    pub(crate) separate_reader: bool,
    pub(crate) events: EventBus,
    /// Added to the store clock; only ever changed by the test hooks.
    clock_offset_ms: AtomicI64,
    /// Key lease length in milliseconds: [`KEY_LEASE`] unless a test shortened it.
    key_lease_ms: AtomicI64,
    /// Every call's deadline in milliseconds: [`STORE_CALL_DEADLINE`] unless a test shortened it.
    call_deadline_ms: AtomicU64,
    /// Connection tokens waiting to be inserted together.
    pub(crate) tokens: GroupCommit<NewToken>,
    /// Reconnects waiting to be looked up and answered together ([`crate::Store::reuse_key`]).
    pub(crate) reuses: GroupCommit<KeyReuse, Reuse>,
    /// Spawns of new keys waiting to be inserted together ([`crate::Store::insert_backend_with_key`]).
    pub(crate) spawns: GroupCommit<NewBackend, Acquire>,
    /// Scheduler reads waiting to be answered together ([`crate::Store::schedulable_drones`]).
    pub(crate) drone_reads: GroupCommit<DroneQuery, Vec<DroneCandidate>>,
    /// Drone reports and backend states waiting to be recorded together
    /// ([`crate::Store::record_drone_reports`]).
    pub(crate) reports: GroupCommit<Reports, Vec<StateUpdate>>,
    /// The connections the batches of `tokens`, `reuses`, `spawns` and `reports` are written on.
    pub(crate) token_flush: FlushSlot<D::Db>,
    pub(crate) reuse_flush: FlushSlot<D::Db>,
    pub(crate) spawn_flush: FlushSlot<D::Db>,
    pub(crate) report_flush: FlushSlot<D::Db>,
}

impl<D: Dialect> SqlStore<D> {
    /// A store whose reads go to `reader`, or to `writer` when `None`.
    pub(crate) fn new(
        dialect: D,
        writer: sqlx::Pool<D::Db>,
        reader: Option<sqlx::Pool<D::Db>>,
    ) -> Self {
        SqlStore {
            dialect,
            separate_reader: reader.is_some(),
            reader: reader.unwrap_or_else(|| writer.clone()),
            writer,
            events: EventBus::new(),
            clock_offset_ms: AtomicI64::new(0),
            key_lease_ms: AtomicI64::new(millis_of(KEY_LEASE)),
            call_deadline_ms: AtomicU64::new(millis_of(STORE_CALL_DEADLINE).unsigned_abs()),
            tokens: GroupCommit::default(),
            reuses: GroupCommit::default(),
            spawns: GroupCommit::default(),
            drone_reads: GroupCommit::default(),
            reports: GroupCommit::default(),
            token_flush: FlushSlot::with_setup(D::TOKEN_FLUSH_SETUP),
            reuse_flush: FlushSlot::with_setup(D::TOKEN_FLUSH_SETUP),
            spawn_flush: FlushSlot::default(),
            report_flush: FlushSlot::default(),
        }
    }

    /// Closes every connection (waits for running operations). Later calls fail with `PoolClosed`.
    pub async fn close(&self) {
        self.dialect.stop().await;
        self.writer.close().await;
        self.token_flush.close().await;
        self.reuse_flush.close().await;
        self.spawn_flush.close().await;
        self.report_flush.close().await;
        self.reader.close().await;
    }

    /// Test hook: moves the store clock forward by `d`, so tests can expire leases and tokens and reach
    /// idle and lifetime limits without waiting. Affects only this store instance.
    #[doc(hidden)]
    pub fn advance_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_add(millis_of(d), Ordering::SeqCst);
    }

    /// Test hook: moves the store clock back by `d` (a clock stepped backwards), to check that fencing
    /// tokens still increase.
    #[doc(hidden)]
    pub fn rewind_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_sub(millis_of(d), Ordering::SeqCst);
    }

    /// Test hook: key leases acquired or renewed from now on last `lease` instead of [`KEY_LEASE`], so
    /// partition tests need not wait a minute. The controller's drone deadlines must be shortened to
    /// match (`ControllerConfig::key_timing`), keeping hard-terminate < lease. Affects only this store.
    #[doc(hidden)]
    pub fn set_key_lease(&self, lease: Duration) {
        self.key_lease_ms.store(millis_of(lease), Ordering::SeqCst);
    }

    /// Test hook: every call fails with `DeadlineExceeded` after `deadline` instead of
    /// [`STORE_CALL_DEADLINE`], so fault tests need not wait 20 s. Affects only this store.
    #[doc(hidden)]
    pub fn set_call_deadline(&self, deadline: Duration) {
        let ms = millis_of(deadline).unsigned_abs();
        self.call_deadline_ms.store(ms, Ordering::SeqCst);
    }

    /// Runs one store call, giving up at the deadline (see `src/deadline.rs`).
    pub(crate) async fn within_deadline<T>(
        &self,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let deadline = Duration::from_millis(self.call_deadline_ms.load(Ordering::SeqCst));
        // Pinned here so that the abandoned call (and with it its connection) is dropped only after
        // the overrun is recorded: the pool's release check must see it.
        let mut call = std::pin::pin!(call);
        match tokio::time::timeout(deadline, call.as_mut()).await {
            Ok(result) => result,
            Err(_) => {
                self.dialect.call_abandoned();
                Err(StoreError::DeadlineExceeded(deadline))
            }
        }
    }

    /// The connection a batch of `slot`'s kind is written on (see `src/flush_connection.rs`).
    pub(crate) async fn flush_connection<'s>(
        &self,
        slot: &'s FlushSlot<D::Db>,
    ) -> StoreResult<FlushConnection<'s, D::Db>> {
        slot.connection(&self.writer, D::OWN_FLUSH_CONNECTION).await
    }

    /// The store clock now.
    pub(crate) fn read_clock(&self) -> Clock {
        self.dialect
            .clock(self.clock_offset_ms.load(Ordering::SeqCst))
    }

    /// `$1` of a statement that reads `{now}`; taken once per operation, so that all its statements
    /// agree on the time (PostgreSQL's clock is the transaction's start anyway).
    pub(crate) fn clock(&self) -> i64 {
        self.read_clock().arg()
    }

    pub(crate) fn key_lease_ms(&self) -> i64 {
        self.key_lease_ms.load(Ordering::SeqCst)
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The dialect's SQL for a shared statement (see the module docs for the markers).
pub(crate) fn render<D: Dialect>(template: &str) -> String {
    let mut sql = template
        .replace("{now}", D::SPELLING.now)
        .replace("{greatest}", D::SPELLING.greatest)
        .replace("{json_texts}", D::SPELLING.json_texts);
    while let Some(start) = sql.find("{lock:") {
        let Some(len) = sql[start..].find('}') else {
            break;
        };
        let clause = &sql[start + "{lock:".len()..start + len];
        let kept = if D::SPELLING.row_locks {
            clause.to_string()
        } else {
            String::new()
        };
        sql.replace_range(start..=start + len, &kept);
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::render;
    use crate::{postgres::PostgresDialect, sqlite::SqliteDialect};

    #[test]
    fn shared_sql_renders_per_dialect() {
        let sql = "SELECT {greatest}({now}, x) FROM {json_texts}($2) t {lock:FOR SHARE}";
        assert_eq!(
            render::<SqliteDialect>(sql),
            "SELECT MAX($1, x) FROM json_each($2) t "
        );
        assert_eq!(
            render::<PostgresDialect>(sql),
            "SELECT GREATEST(hangar_now_ms($1), x) FROM jsonb_array_elements_text($2) t FOR SHARE"
        );
    }
}
