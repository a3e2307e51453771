//! The connection a group-committed batch ([`crate::group_commit`]) is written on.
//!
//! A statement on a pooled connection costs sqlx three round trips: a ping when the connection is
//! acquired (`test_before_acquire`), the statement, and a ping when it is released (`sqlx-core` 0.8,
//! `pool/connection.rs`, "test the connection on-release", unconditional; run in a task of its own,
//! so it holds the connection rather than the caller). A batch's leader, which every caller in the
//! batch waits for, writes instead on a connection of its own where the dialect allows it
//! ([`crate::dialect::Dialect::OWN_FLUSH_CONNECTION`]; PostgreSQL: one per kind of batch, outside the
//! pool, opened on first use with the pool's options), so a batch is one round trip. Where it does not
//! (SQLite, whose writes all take turns on the single writer connection), the leader uses the pool,
//! whose connections SQLite takes without the acquire ping (`sqlite.rs`): two round trips to the
//! writer's thread, the batch and the release ping.
//!
//! Invariant: an own connection goes back to its slot only after a statement on it completed —
//! answered, or refused by the database (an error response leaves the protocol in step). A flush
//! dropped mid-exchange (the caller's deadline, a client gone) or failing on the link drops the
//! connection, and the next flush opens a new one, so no statement runs on a connection left
//! mid-exchange. This is what the pool's release ping and release check ([`crate::deadline`]) give the
//! pooled connections. An own connection idle for [`IDLE_PING_AFTER`] or longer is pinged before a
//! batch is written on it, and replaced if the ping fails (the server restarted, or closed it), as the
//! pool's acquire ping does for pooled ones: a kind of batch that is rarely written (spawns on a quiet
//! cluster, a controller's own state reports) must not fail its first batch after a database restart.
//!
//! A slot may set the options its own connections are opened with ([`FlushSlot::with_setup`]). The
//! token batches of PostgreSQL use it to commit without waiting for the WAL flush
//! (`synchronous_commit = off`): a connection token is a credential the client can get again, not
//! state, and on a disk with slow flushes the wait for each batch's flush bounded reconnects
//! (BENCHMARKS.md, "Tokens committed without waiting for the WAL flush"). What it gives up: the
//! tokens issued in the last moments (at most three `wal_writer_delay`s, 0.6 s by default) before a
//! crash of the PostgreSQL server may be forgotten; requests with them are then answered as for an
//! unknown token, and the client connects again. PostgreSQL commits in WAL order, so every other
//! transaction (spawns, key leases, fencing tokens, revocations) stays durable, and a commit after
//! a token's makes the token durable too. A proxy that cached such a token's route would still
//! serve it; a revocation therefore also names the backend and user it revokes, and proxies drop
//! every cached route of that holder, whichever tokens the store still has.

use crate::{StoreError, StoreResult};
use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions, Connection, Database, Pool};
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// Options of the pool → options an own connection is opened with ([`FlushSlot::with_setup`]).
pub type ConnectionSetup<DB> = fn(&ConnectOptionsOf<DB>) -> ConnectOptionsOf<DB>;
type ConnectOptionsOf<DB> = <<DB as Database>::Connection as Connection>::Options;

/// An own connection unused for this long is pinged before its next batch. Busy connections (the hot
/// path: a batch every few milliseconds) are never pinged.
pub(crate) const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// Where one kind of batch keeps its own connection between flushes.
pub(crate) struct FlushSlot<DB: Database> {
    /// The connection and when its last statement completed.
    conn: Mutex<Option<(DB::Connection, Instant)>>,
    /// Makes the options of each own connection opened for this slot from the pool's.
    setup: Option<ConnectionSetup<DB>>,
}

impl<DB: Database> Default for FlushSlot<DB> {
    fn default() -> Self {
        FlushSlot::with_setup(None)
    }
}

impl<DB: Database> std::fmt::Debug for FlushSlot<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushSlot").finish_non_exhaustive()
    }
}

impl<DB: Database> FlushSlot<DB> {
    /// A slot whose own connections are opened with the options `setup` makes from the pool's.
    pub(crate) fn with_setup(setup: Option<ConnectionSetup<DB>>) -> Self {
        FlushSlot {
            conn: Mutex::new(None),
            setup,
        }
    }

    /// The connection to write a batch on: this slot's own (`own`; opened with `pool`'s options if
    /// there is none), or one of `pool`. Fails with `PoolClosed` once `pool` is closed.
    pub(crate) async fn connection(
        &self,
        pool: &Pool<DB>,
        own: bool,
    ) -> StoreResult<FlushConnection<'_, DB>> {
        if !own {
            return Ok(FlushConnection::Pooled(pool.acquire().await?));
        }
        // Only the leader of this slot's batches locks it (the flush lock serializes them), so this
        // never waits.
        let mut slot = self.conn.lock().await;
        if pool.is_closed() {
            return Err(sqlx::Error::PoolClosed.into());
        }
        let kept = match slot.take() {
            Some((mut conn, idle_since)) if idle_since.elapsed() >= IDLE_PING_AFTER => {
                // Dropped, not closed, when the ping fails: the link is gone.
                conn.ping().await.is_ok().then_some(conn)
            }
            Some((conn, _)) => Some(conn),
            None => None,
        };
        let conn = match kept {
            Some(conn) => conn,
            None => {
                let timeout = pool.options().get_acquire_timeout();
                let options = match self.setup {
                    Some(setup) => setup(&pool.connect_options()),
                    None => (*pool.connect_options()).clone(),
                };
                tokio::time::timeout(timeout, options.connect())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??
            }
        };
        Ok(FlushConnection::Own { conn, slot })
    }

    /// Closes the own connection, if any (the store is closing).
    pub(crate) async fn close(&self) {
        if let Some((conn, _)) = self.conn.lock().await.take() {
            let _ = conn.close().await;
        }
    }
}

/// A connection a batch is being written on (derefs to it); see [`FlushConnection::settle`].
pub(crate) enum FlushConnection<'s, DB: Database> {
    Pooled(PoolConnection<DB>),
    Own {
        conn: DB::Connection,
        slot: MutexGuard<'s, Option<(DB::Connection, Instant)>>,
    },
}

impl<DB: Database> FlushConnection<'_, DB> {
    /// Ends the use of the connection with the outcome of its last statement: an own connection goes
    /// back to its slot if the statement completed (succeeded, or was refused by the database), and
    /// is dropped otherwise; a pooled one goes back to the pool.
    pub(crate) fn settle<T>(self, outcome: StoreResult<T>) -> StoreResult<T> {
        if let FlushConnection::Own { conn, mut slot } = self {
            let completed = match &outcome {
                Ok(_) => true,
                Err(StoreError::Database(e)) => e.as_database_error().is_some(),
                Err(_) => false,
            };
            if completed {
                *slot = Some((conn, Instant::now()));
            }
        }
        outcome
    }
}

impl<DB: Database> Deref for FlushConnection<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        match self {
            FlushConnection::Pooled(conn) => conn,
            FlushConnection::Own { conn, .. } => conn,
        }
    }
}

impl<DB: Database> DerefMut for FlushConnection<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match self {
            FlushConnection::Pooled(conn) => conn,
            FlushConnection::Own { conn, .. } => conn,
        }
    }
}
