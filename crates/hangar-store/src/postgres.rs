//! The PostgreSQL dialect: the production store, shared by several controllers.
//!
//! Holds: the connection pool, the store clock, the spelling of the shared SQL, the constraint names,
//! and the cross-controller event relay ([`notify`], [`listener`]). The operations are shared
//! (`src/ops/`, mounted below).
//!
//! Clock: the database server's clock (`hangar_now_ms(offset)` in SQL, the start time of the current
//! transaction in milliseconds), so every controller sharing the database agrees on it. The offset,
//! bound as `$1` of `{now}`, is 0 except under the test hooks.
//!
//! Concurrency: every method is one transaction at READ COMMITTED. Uniqueness is enforced by the
//! database, not by checks in Rust: a concurrent acquisition of the same key fails on the unique
//! `(namespace, name)` of `backend_key` and is reported as `KeyHeld` after the rollback; the
//! `key_fencing` row of a key is locked by every acquisition of that key, which serializes them.
//! `{lock:…}` clauses are kept.
//!
//! Events: the same transaction that makes a change sends a `NOTIFY` (delivered by PostgreSQL only if
//! it commits) that the other stores sharing the database relay onto their buses. Each store tags its
//! notifications with a random origin and skips its own, so no event is published twice on one bus.
//! Notifications carry pointers for large data (see [`notify`]). If the listening connection drops, it is
//! re-established and a warning is logged; events of other controllers sent during the gap are lost,
//! and subscribers that must not miss any resync from the store.

mod listener;
mod notify;
// Compiled once per database on purpose: see `src/ops/mod.rs`.
#[allow(clippy::duplicate_mod)]
#[path = "ops/mod.rs"]
mod ops;
/// The dialect the shared operations are compiled for here.
type D = PostgresDialect;

use crate::deadline::{Overruns, RELEASE_PING_TIMEOUT};
use crate::dialect::{Announced, Clock, Dialect, Spelling, SqlStore, Unique};
use crate::flush_connection::ConnectionSetup;
use crate::StoreResult;
use hangar_types::token::random_token;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, Postgres};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections per store (one of them is held by the event listener).
const POOL_SIZE: u32 = 20;
/// How long an operation waits for a free connection before failing with `PoolTimedOut` (retryable).
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the schema migrations to the database at `url` (`hangar migrate --db URL`). Safe to run
/// while controllers are connected: sqlx serializes concurrent migrators with an advisory lock.
pub async fn migrate(url: &str) -> StoreResult<()> {
    check_reachable(url).await?;
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let result = run_migrations(&pool).await;
    pool.close().await;
    result
}

async fn run_migrations(pool: &PgPool) -> StoreResult<()> {
    let migrator = crate::migrations::migrator(|step| step.postgres).await?;
    Ok(migrator.run(pool).await?)
}

/// Opens and closes one connection, so that an unreachable or misconfigured server is reported with
/// its own error (connection refused, unknown host, wrong password) at once, instead of the pool's
/// `PoolTimedOut` after [`ACQUIRE_TIMEOUT`] of silent retries.
async fn check_reachable(url: &str) -> StoreResult<()> {
    use sqlx::Connection;
    let connection = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect(url))
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the server did not answer within {} s",
                    ACQUIRE_TIMEOUT.as_secs()
                ),
            ))
        })??;
    connection.close().await?;
    Ok(())
}

/// The PostgreSQL store.
pub type PostgresStore = SqlStore<PostgresDialect>;

/// PostgreSQL's spelling, clock, constraint names and event relay; the pool is the store's.
#[derive(Debug)]
pub struct PostgresDialect {
    /// Calls abandoned at their deadline; shared with the pool's release check.
    overruns: Arc<Overruns>,
    /// Tags this store's notifications so that its own listener skips them.
    origin: String,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl SqlStore<PostgresDialect> {
    /// Connects a pool to `url` (`postgres://user:password@host:port/database`), applies migrations and
    /// starts listening for events of other controllers. Must be called inside a tokio runtime.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        check_reachable(url).await?;
        let overruns = Arc::new(Overruns::default());
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(release_check(overruns.clone()))
            .connect(url)
            .await?;
        if let Err(e) = run_migrations(&pool).await {
            pool.close().await;
            return Err(e);
        }
        // Listening before `connect` returns: every event committed by another store after this point
        // reaches this store's bus.
        let mut pg_listener = PgListener::connect_with(&pool).await?;
        pg_listener.listen(notify::CHANNEL).await?;

        let dialect = PostgresDialect {
            overruns,
            origin: random_token(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        // One pool serves reads and writes.
        let store = SqlStore::new(dialect, pool.clone(), None);
        let relay = listener::Relay {
            pool,
            bus: store.events.clone(),
            origin: store.dialect.origin.clone(),
        };
        let d = &store.dialect;
        d.tasks.spawn(listener::run_event_listener(
            pg_listener,
            relay,
            d.cancel.child_token(),
        ));
        d.tasks.close();
        Ok(store)
    }
}

/// Whether a released connection may go back to the pool (see [`release_check`]).
type ReleaseVerdict<'c> = Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>>;

/// The pool's check of a released connection (sqlx pings every released connection after it; that
/// ping has no bound). Soon after a call was abandoned at its deadline, the connection it left
/// mid-exchange may be among the released ones: a connection must then answer a ping within
/// [`RELEASE_PING_TIMEOUT`], else it is closed (an error here makes sqlx close it without a goodbye,
/// which would wait on the dead link too). Otherwise nothing is added to the release.
fn release_check(
    overruns: Arc<Overruns>,
) -> impl for<'c> Fn(&'c mut PgConnection, sqlx::pool::PoolConnectionMetadata) -> ReleaseVerdict<'c>
       + Send
       + Sync
       + 'static {
    move |conn, _| {
        let check = overruns.recent();
        Box::pin(async move {
            if !check {
                return Ok(true);
            }
            use sqlx::Connection;
            match tokio::time::timeout(RELEASE_PING_TIMEOUT, conn.ping()).await {
                Ok(Ok(())) => Ok(true),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "a connection released after a store call overran its deadline did not \
                     answer a ping; closing it",
                ))),
            }
        })
    }
}

impl Drop for PostgresDialect {
    /// A store dropped without `close` still stops its listener task (which would otherwise keep a
    /// connection and the pool alive).
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Dialect for PostgresDialect {
    type Db = Postgres;
    const SPELLING: Spelling = Spelling {
        now: "hangar_now_ms($1)",
        greatest: "GREATEST",
        json_texts: "jsonb_array_elements_text",
        row_locks: true,
        modifying_ctes: true,
    };
    const OWN_FLUSH_CONNECTION: bool = true;
    const TOKEN_FLUSH_SETUP: Option<ConnectionSetup<Postgres>> = Some(commit_without_flush_wait);

    fn clock(&self, offset_ms: i64) -> Clock {
        Clock::Database { offset_ms }
    }

    fn call_abandoned(&self) {
        self.overruns.record();
    }

    async fn relay(&self, conn: &mut PgConnection, events: &[Announced]) -> StoreResult<()> {
        notify::send(conn, &self.origin, events).await
    }

    /// Constraints the store maps to outcomes are named in the schema (migration 0001). A taken
    /// backend id may also surface as `backend_key_pkey` (the key row's `backend_id`; such a row
    /// exists only for an existing backend): a spawn writes its backend and key rows in one statement
    /// (`ops/chain.rs`), and either insert may be the one that fails first.
    fn violates(e: &sqlx::Error, constraint: Unique) -> bool {
        let names: &[&str] = match constraint {
            Unique::BackendId => &["backend_id_unique", "backend_key_pkey"],
            Unique::KeyHolder => &["backend_key_single_holder"],
        };
        e.as_database_error().is_some_and(|d| {
            d.is_unique_violation() && d.constraint().is_some_and(|c| names.contains(&c))
        })
    }

    /// Stops the event listener, which holds a connection of the pool.
    async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.wait().await;
    }
}

/// `options` for connections whose commits return before the WAL flush (see
/// `src/flush_connection.rs`): the setting is sent with the startup message, no statement more.
fn commit_without_flush_wait(options: &PgConnectOptions) -> PgConnectOptions {
    options.clone().options([("synchronous_commit", "off")])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush_connection::FlushSlot;
    use hangar_test_support::postgres::TestDatabase;

    /// `synchronous_commit` on a connection `slot` writes its batches on.
    async fn commit_mode(store: &PostgresStore, slot: &FlushSlot<Postgres>) -> String {
        let mut conn = store.flush_connection(slot).await.unwrap();
        let mode = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut *conn)
            .await;
        conn.settle(mode.map_err(Into::into)).unwrap()
    }

    /// Only the token batches commit without waiting for the WAL flush; spawns, reports and every
    /// pooled write wait for it.
    #[tokio::test]
    async fn only_token_batches_commit_without_waiting_for_the_flush() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresStore::connect(db.url()).await.unwrap();
        assert_eq!(commit_mode(&store, &store.token_flush).await, "off");
        assert_eq!(commit_mode(&store, &store.reuse_flush).await, "off");
        // Kept: the slot's connection is the same one next time, still set.
        assert_eq!(commit_mode(&store, &store.token_flush).await, "off");
        assert_eq!(commit_mode(&store, &store.spawn_flush).await, "on");
        assert_eq!(commit_mode(&store, &store.report_flush).await, "on");
        let pooled: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(pooled, "on");
        store.close().await;
        db.drop_database().await;
    }
}
