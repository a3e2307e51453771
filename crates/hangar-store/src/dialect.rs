//! What differs between SQLite and PostgreSQL, as one interface ([`Dialect`]), and the store type both
//! databases share ([`SqlStore`]). The operations themselves are written once, in `src/ops/`, against
//! this interface; `sqlite.rs` and `postgres.rs` each implement it and compile the operations for
//! their database (see `src/ops/mod.rs` for why they are compiled per database rather than generic).
//!
//! SQL text is shared too: it is PostgreSQL-flavoured SQL with numbered parameters (`$1`, which SQLite
//! and sqlx accept as well) and a few markers that [`render`] replaces with the dialect's spelling:
//!
//! | marker | SQLite | PostgreSQL |
//! |---|---|---|
//! | `{now}` (store clock; reads parameter `$1`, [`SqlStore::clock`]) | `$1` (this process's clock) | `hangar_now_ms($1)` (the server's) |
//! | `{greatest}` | `MAX` | `GREATEST` |
//! | `{json_texts}` (rows `value` of a JSON array of strings) | `json_each` | `jsonb_array_elements_text` |
//! | `{lock:CLAUSE}` (a row lock) | dropped: the single writer serializes | `CLAUSE` |

use crate::events::{EventBus, StoreEvent};
use crate::StoreResult;
use hangar_types::timing::KEY_LEASE;
use hangar_types::{BackendId, BackendState, Millis};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// One database's spelling and machinery.
pub trait Dialect: Send + Sync + 'static {
    type Db: sqlx::Database;

    /// `{now}`.
    const NOW: &'static str;
    /// `{greatest}`.
    const GREATEST: &'static str;
    /// `{json_texts}`.
    const JSON_TEXTS: &'static str;
    /// Whether `{lock:…}` clauses are kept.
    const ROW_LOCKS: bool;
    /// Whether the store clock is this process's clock (then `$1` of `{now}` is the time itself).
    const LOCAL_CLOCK: bool;

    /// Connections for statements outside a write transaction that only read.
    fn reader(&self) -> &sqlx::Pool<Self::Db>;
    /// Connections for writes.
    fn writer(&self) -> &sqlx::Pool<Self::Db>;
    /// The value bound as `$1` for `{now}`, given the test clock offset.
    fn clock_arg(&self, offset_ms: i64) -> i64;
    /// Tells the other stores sharing the database about `events`, inside the transaction on `conn`
    /// (PostgreSQL: `NOTIFY`, delivered only if it commits; SQLite: nothing, it has one store).
    fn relay(
        &self,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        events: &[Announced],
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Whether `e` is a violation of `constraint`.
    fn violates(e: &sqlx::Error, constraint: Unique) -> bool;
    /// Closes every connection (and stops background tasks).
    fn close(&self) -> impl Future<Output = ()> + Send;
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
pub struct SqlStore<D> {
    pub(crate) dialect: D,
    pub(crate) events: EventBus,
    /// Added to the store clock; only ever changed by the test hooks.
    clock_offset_ms: AtomicI64,
    /// Key lease length in milliseconds: [`KEY_LEASE`] unless a test shortened it.
    key_lease_ms: AtomicI64,
}

impl<D: Dialect> SqlStore<D> {
    pub(crate) fn new(dialect: D) -> Self {
        SqlStore {
            dialect,
            events: EventBus::new(),
            clock_offset_ms: AtomicI64::new(0),
            key_lease_ms: AtomicI64::new(millis_of(KEY_LEASE)),
        }
    }

    /// Closes every connection (waits for running operations). Later calls fail with `PoolClosed`.
    pub async fn close(&self) {
        self.dialect.close().await;
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

    /// `$1` of a statement that reads `{now}`; taken once per operation, so that all its statements
    /// agree on the time (PostgreSQL's clock is the transaction's start anyway).
    pub(crate) fn clock(&self) -> i64 {
        self.dialect
            .clock_arg(self.clock_offset_ms.load(Ordering::SeqCst))
    }

    /// See [`Dialect::reader`].
    pub(crate) fn reader(&self) -> &sqlx::Pool<D::Db> {
        self.dialect.reader()
    }

    /// See [`Dialect::writer`].
    pub(crate) fn writer(&self) -> &sqlx::Pool<D::Db> {
        self.dialect.writer()
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
        .replace("{now}", D::NOW)
        .replace("{greatest}", D::GREATEST)
        .replace("{json_texts}", D::JSON_TEXTS);
    while let Some(start) = sql.find("{lock:") {
        let Some(len) = sql[start..].find('}') else {
            break;
        };
        let clause = &sql[start + "{lock:".len()..start + len];
        let kept = if D::ROW_LOCKS {
            clause.to_string()
        } else {
            String::new()
        };
        sql.replace_range(start..=start + len, &kept);
    }
    sql
}
