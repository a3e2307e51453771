//! The SQLite dialect: the embedded store of `hangar dev` and of single-controller deployments.
//!
//! Holds: the connection pools and their pragmas, the store clock, the spelling of the shared SQL, and
//! the mapping of constraint violations. The operations are shared (`src/ops/`, mounted below).
//!
//! Clock: this process's wall clock ([`Millis::now`]): an SQLite store has exactly one controller, so
//! there is no other clock to agree with. It is read once per operation and bound as `$1` of `{now}`.
//!
//! Concurrency: every write goes through a pool of exactly one connection, so write transactions are
//! serialized in the pool (row locks are needless: `{lock:…}` clauses are dropped) and a deferred
//! transaction can never hit `SQLITE_BUSY` upgrading from a read lock to a write lock. Reads use a
//! separate read-only pool (WAL lets them run beside the writer). There is no other store to relay
//! events to.
//!
//! No ping when a connection is taken from a pool (`test_before_acquire`): an SQLite connection is a
//! thread of this process, not a link that can die unseen, and the pool already pings each connection
//! when it is released. On the hot paths the acquire ping was one more hand-off to that thread and
//! back per statement.

use crate::dialect::{Announced, Clock, Dialect, Spelling, SqlStore, Unique};
use crate::flush_connection::ConnectionSetup;
use crate::StoreResult;
use hangar_types::Millis;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteSynchronous,
};
use std::path::Path;
use std::time::Duration;

// Compiled once per database on purpose: see `src/ops/mod.rs`.
#[allow(clippy::duplicate_mod)]
#[path = "ops/mod.rs"]
mod ops;
/// The dialect the shared operations are compiled for here.
type D = SqliteDialect;

/// How long a connection waits for a lock held by another connection before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections.
const READ_CONNECTIONS: u32 = 4;
/// WAL pages after which a commit checkpoints them into the database file (SQLite's default is
/// 1 000, i.e. about 4 MB). A checkpoint writes each changed page once however often it changed, and
/// the hot pages (the ends of the token and history tables and their indexes) change with every
/// commit: at the default a burst of reconnects spent a fifth of the writer thread's time in
/// checkpoints (BENCHMARKS.md, "Reconnect, SQLite: checkpoints").
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_000;
/// What the WAL file is cut back to after a checkpoint, so a burst does not leave it large.
const WAL_SIZE_LIMIT_BYTES: u64 = 64 << 20;

/// The SQLite store.
pub type SqliteStore = SqlStore<SqliteDialect>;

/// SQLite's spelling, clock and constraint names; the pools are the store's.
#[derive(Debug)]
pub struct SqliteDialect {
    /// Owns the directory of a throwaway store (see [`SqliteStore::in_memory`]); deleted on drop.
    temp_dir: Option<tempfile::TempDir>,
}

impl SqlStore<SqliteDialect> {
    /// Opens (creating if needed) the database file at `path` in WAL mode and applies migrations.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
                    .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string()),
            )
            .await?;
        crate::migrations::migrator(|step| step.sqlite)
            .await?
            .run(&writer)
            .await?;
        // Opened after the writer so the file exists and is already in WAL mode.
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(base.read_only(true))
            .await?;
        Ok(SqlStore::new(
            SqliteDialect { temp_dir: None },
            writer,
            Some(reader),
        ))
    }

    /// A fresh throwaway database (tests, `hangar dev --in-memory`): a file in a private temporary
    /// directory that is deleted when the store is dropped. A real `:memory:` database lives only as
    /// long as its one connection, and sqlx may close a connection whose query was cancelled, which
    /// would silently replace the database with an empty one.
    pub async fn in_memory() -> StoreResult<SqliteStore> {
        let dir = tempfile::Builder::new()
            .prefix("hangar-store-")
            .tempdir()
            .map_err(|e| crate::StoreError::Database(sqlx::Error::Io(e)))?;
        let mut store = Self::open(&dir.path().join("hangar.db")).await?;
        store.dialect.temp_dir = Some(dir);
        Ok(store)
    }
}

impl Dialect for SqliteDialect {
    type Db = Sqlite;

    fn clock(&self, offset_ms: i64) -> Clock {
        Clock::Local(Millis(Millis::now().0.saturating_add(offset_ms)))
    }

    const SPELLING: Spelling = Spelling {
        now: "$1",
        greatest: "MAX",
        json_texts: "json_each",
        row_locks: false,
        modifying_ctes: false,
    };
    /// Every write takes its turn on the single writer connection.
    const OWN_FLUSH_CONNECTION: bool = false;
    const TOKEN_FLUSH_SETUP: Option<ConnectionSetup<Sqlite>> = None;

    async fn relay(&self, _: &mut SqliteConnection, _: &[Announced]) -> StoreResult<()> {
        Ok(())
    }

    /// SQLite names no constraint; its message names the columns.
    fn violates(e: &sqlx::Error, constraint: Unique) -> bool {
        let columns = match constraint {
            Unique::BackendId => "backend.id",
            Unique::KeyHolder => "backend_key.namespace, backend_key.name",
        };
        e.as_database_error().is_some_and(|d| {
            d.is_unique_violation() && d.message().ends_with(&format!("failed: {columns}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_checkpoints_less_often_and_cuts_the_wal_back() {
        let store = SqliteStore::in_memory().await.unwrap();
        let pragma = |name: &'static str| {
            let writer = store.writer.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("PRAGMA {name}"))
                    .fetch_one(&writer)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            pragma("wal_autocheckpoint").await,
            i64::from(WAL_AUTOCHECKPOINT_PAGES)
        );
        assert_eq!(
            pragma("journal_size_limit").await,
            i64::try_from(WAL_SIZE_LIMIT_BYTES).unwrap()
        );
    }
}
