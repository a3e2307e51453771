//! SQLite implementation of [`crate::Store`]: the embedded store of `hangar dev` and of single-controller
//! deployments.
//!
//! Owns: the connection pools, the schema (`migrations/sqlite`) and the store clock. The store clock of
//! an SQLite store is this process's wall clock ([`Millis::now`]): an SQLite store has exactly one
//! controller, so there is no other clock to agree with.
//!
//! Concurrency: every write goes through a pool of exactly one connection, so write transactions are
//! serialized in the pool and a deferred transaction can never hit `SQLITE_BUSY` upgrading from a read
//! lock to a write lock. In file mode reads use a separate read-only pool (WAL lets them run beside the
//! writer); in memory mode each connection would be its own database, so one connection serves both.
//!
//! Every method is one transaction; events are published on the [`EventBus`] only after the commit, so
//! a subscriber that reacts to an event always finds the data in the store.
//!
//! The SQL is kept close to what PostgreSQL accepts so that a PostgreSQL store can mirror it statement by
//! statement (`MAX(a, b)` there is `GREATEST(a, b)`).

mod actions;
mod backends;
mod cleanup;
mod dashboard;
mod lost;
mod nodes;
mod rows;
mod tls;
mod tokens;

use crate::events::EventBus;
use crate::model::*;
use crate::{Store, StoreResult};
use async_trait::async_trait;
use hangar_types::api::ClusterState;
use hangar_types::protocol::ActionMessage;
use hangar_types::token::ConnectionToken;
use hangar_types::{
    ActionId, BackendId, BackendState, BackendStatus, ClusterName, ControllerName, DroneName,
    Millis, ProxyName, TerminationKind, TerminationReason,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How long a connection waits for a lock held by another connection before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections in file mode.
const READ_CONNECTIONS: u32 = 4;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

#[derive(Debug)]
pub struct SqliteStore {
    /// Exactly one connection: all writes are serialized here.
    writer: SqlitePool,
    /// Read-only connections in file mode; the writer itself in memory mode.
    reader: SqlitePool,
    events: EventBus,
    /// Added to the wall clock; only ever changed by the test hook [`SqliteStore::advance_clock`].
    clock_offset_ms: AtomicI64,
    /// Owns the directory of a throwaway store (see [`SqliteStore::in_memory`]); deleted on drop.
    temp_dir: Option<tempfile::TempDir>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` in WAL mode and applies migrations.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal),
            )
            .await?;
        MIGRATOR.run(&writer).await?;
        // Opened after the writer so the file exists and is already in WAL mode.
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(base.read_only(true))
            .await?;
        Ok(Self::from_pools(writer, reader))
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
        store.temp_dir = Some(dir);
        Ok(store)
    }

    fn from_pools(writer: SqlitePool, reader: SqlitePool) -> SqliteStore {
        SqliteStore {
            writer,
            reader,
            events: EventBus::new(),
            clock_offset_ms: AtomicI64::new(0),
            temp_dir: None,
        }
    }

    /// Closes every connection (waits for running operations). Later calls fail with `PoolClosed`.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    /// Test hook: moves the store clock forward by `d`, so tests can expire leases and tokens and reach
    /// idle and lifetime limits without waiting.
    #[doc(hidden)]
    pub fn advance_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_add(millis_of(d), Ordering::SeqCst);
    }

    /// Test hook: moves the store clock back by `d` (a wall clock stepped backwards), to check that
    /// fencing tokens still increase.
    #[doc(hidden)]
    pub fn rewind_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_sub(millis_of(d), Ordering::SeqCst);
    }

    fn clock(&self) -> Millis {
        let offset = self.clock_offset_ms.load(Ordering::SeqCst);
        Millis(Millis::now().0.saturating_add(offset))
    }
}

/// A duration in whole milliseconds, saturating.
fn millis_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for SqliteStore {
    async fn now(&self) -> StoreResult<Millis> {
        Ok(self.clock())
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        sqlx::query("SELECT 1").execute(&self.writer).await?;
        Ok(())
    }

    fn events(&self) -> &EventBus {
        &self.events
    }

    async fn key_lookup(&self, key: &KeyRef) -> StoreResult<KeyLookup> {
        backends::key_lookup(self, key).await
    }

    async fn remove_expired_key(&self, key: &KeyRef) -> StoreResult<bool> {
        backends::remove_expired_key(self, key).await
    }

    async fn insert_backend_with_key(&self, new: NewBackend) -> StoreResult<Acquire> {
        backends::insert_backend_with_key(self, new).await
    }

    async fn insert_token(&self, token: NewToken) -> StoreResult<()> {
        tokens::insert_token(self, token).await
    }

    async fn revoke_tokens(
        &self,
        backend: &BackendId,
        user: &str,
    ) -> StoreResult<Vec<ConnectionToken>> {
        tokens::revoke_tokens(self, backend, user).await
    }

    async fn schedulable_drones(&self, query: &DroneQuery) -> StoreResult<Vec<DroneCandidate>> {
        nodes::schedulable_drones(self, query).await
    }

    async fn backend(&self, id: &BackendId) -> StoreResult<Option<BackendRow>> {
        backends::backend(self, id).await
    }

    async fn record_backend_state(
        &self,
        id: &BackendId,
        state: &BackendState,
    ) -> StoreResult<StateUpdate> {
        backends::record_backend_state(self, id, state).await
    }

    async fn backend_history(&self, id: &BackendId) -> StoreResult<Vec<(BackendState, Millis)>> {
        backends::backend_history(self, id).await
    }

    async fn queue_terminate(
        &self,
        id: &BackendId,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<ActionMessage>> {
        actions::queue_terminate(self, id, kind, reason).await
    }

    async fn sweep_candidates(&self, drone: NodeId) -> StoreResult<Vec<BackendId>> {
        backends::sweep_candidates(self, drone).await
    }

    async fn keepalive(&self, id: &BackendId, proxy: NodeId, connected: bool) -> StoreResult<bool> {
        backends::keepalive(self, id, proxy, connected).await
    }

    async fn resolve_token(&self, token: &ConnectionToken) -> StoreResult<TokenLookup> {
        tokens::resolve_token(self, token).await
    }

    async fn pending_actions(&self, drone: NodeId, limit: u32) -> StoreResult<Vec<ActionMessage>> {
        actions::pending_actions(self, drone, limit).await
    }

    async fn ack_action(&self, drone: NodeId, action: &ActionId) -> StoreResult<()> {
        actions::ack_action(self, drone, action).await
    }

    async fn register_drone(&self, reg: &DroneRegistration) -> StoreResult<Registration> {
        nodes::register_drone(self, reg).await
    }

    async fn register_proxy(
        &self,
        cluster: &ClusterName,
        name: &ProxyName,
        controller: &ControllerName,
        version: &str,
    ) -> StoreResult<Registration> {
        nodes::register_proxy(self, cluster, name, controller, version).await
    }

    async fn node_disconnected(&self, node: NodeId, session: SessionId) -> StoreResult<()> {
        nodes::node_disconnected(self, node, session).await
    }

    async fn drone_heartbeat(&self, drone: NodeId, local_time: Millis) -> StoreResult<()> {
        nodes::drone_heartbeat(self, drone, local_time).await
    }

    async fn renew_key(&self, backend: &BackendId) -> StoreResult<bool> {
        backends::renew_key(self, backend).await
    }

    async fn cluster_state(&self, cluster: &ClusterName) -> StoreResult<ClusterState> {
        nodes::cluster_state(self, cluster).await
    }

    async fn drain_drone(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<bool>> {
        nodes::drain_drone(self, cluster, drone).await
    }

    async fn controller_heartbeat(
        &self,
        controller: &ControllerName,
        online: bool,
    ) -> StoreResult<()> {
        nodes::controller_heartbeat(self, controller, online).await
    }

    async fn cleanup(&self, min_age: Option<Duration>, batch: u32) -> StoreResult<u64> {
        cleanup::cleanup(self, min_age, batch).await
    }

    async fn lost_backends(
        &self,
        max_heartbeat_age: Duration,
        limit: u32,
    ) -> StoreResult<Vec<LiveBackend>> {
        lost::lost_backends(self, max_heartbeat_age, limit).await
    }

    async fn drone_live_backends(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<Vec<LiveBackend>>> {
        lost::drone_live_backends(self, cluster, drone).await
    }

    async fn prevent_renew(&self, backend: &BackendId) -> StoreResult<bool> {
        lost::prevent_renew(self, backend).await
    }

    async fn drone_attachment(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<DroneAttachment>> {
        nodes::drone_attachment(self, cluster, drone).await
    }

    async fn acquire_cert_lease(&self, cluster: &ClusterName, proxy: NodeId) -> StoreResult<bool> {
        tls::acquire_cert_lease(self, cluster, proxy).await
    }

    async fn release_cert_lease(&self, cluster: &ClusterName, proxy: NodeId) -> StoreResult<bool> {
        tls::release_cert_lease(self, cluster, proxy).await
    }

    async fn set_txt_record(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        txt_value: Option<&str>,
    ) -> StoreResult<bool> {
        tls::set_txt_record(self, cluster, proxy, txt_value).await
    }

    async fn txt_record(&self, cluster: &ClusterName) -> StoreResult<Option<String>> {
        tls::txt_record(self, cluster).await
    }

    async fn set_http_challenge(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        token: &str,
        key_authorization: Option<&str>,
    ) -> StoreResult<bool> {
        tls::set_http_challenge(self, cluster, proxy, token, key_authorization).await
    }

    async fn http_challenges(&self, cluster: &ClusterName) -> StoreResult<Vec<HttpChallenge>> {
        tls::http_challenges(self, cluster).await
    }

    async fn store_certificate(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        cert_pem: &str,
        key_pem: &str,
    ) -> StoreResult<StoredCertificate> {
        tls::store_certificate(self, cluster, proxy, cert_pem, key_pem).await
    }

    async fn certificate(&self, cluster: &ClusterName) -> StoreResult<Option<StoredCertificate>> {
        tls::certificate(self, cluster).await
    }

    async fn active_clusters(&self, limit: u32) -> StoreResult<Vec<ClusterName>> {
        dashboard::active_clusters(self, limit).await
    }

    async fn recent_backends(
        &self,
        status: Option<BackendStatus>,
        limit: u32,
    ) -> StoreResult<Vec<BackendRow>> {
        dashboard::recent_backends(self, status, limit).await
    }
}
