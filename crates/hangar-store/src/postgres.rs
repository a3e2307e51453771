//! PostgreSQL implementation of [`crate::Store`]: the production store, shared by several controllers.
//!
//! Owns: the connection pool, the schema (`migrations/postgres`), the store clock and the cross-controller
//! event relay.
//!
//! Clock: the database server's clock (`hangar_now_ms(offset)` in SQL, the start time of the current
//! transaction in milliseconds), so every controller sharing the database agrees on it. The offset is 0
//! except under the test hooks [`PostgresStore::advance_clock`] / [`PostgresStore::rewind_clock`]; it is
//! passed as a bind parameter to every statement that reads the clock.
//!
//! Concurrency: every method is one transaction at READ COMMITTED. Uniqueness is enforced by the
//! database, not by checks in Rust: a concurrent acquisition of the same key fails on the unique
//! `(namespace, name)` of `backend_key` and is reported as [`Acquire::KeyHeld`] after the rollback.
//! The `key_fencing` row of a key is locked by every acquisition of that key, which serializes them and
//! keeps fencing tokens strictly increasing.
//!
//! Events: after a commit an event is published on this store's [`EventBus`] (so a caller's own
//! subscribers see it before the method returns, exactly as with SQLite), and the same transaction sends
//! a `NOTIFY` (delivered by PostgreSQL only if it commits) that the other stores sharing the database
//! relay onto their buses. Each store tags its notifications with a random origin and skips its own, so
//! no event is published twice on one bus. Notifications carry pointers for large data (actions, large
//! states): see [`notify`]. If the listening connection drops, it is re-established and a warning is
//! logged; events of other controllers sent during the gap are lost, and subscribers that must not miss
//! any resync from the store (status streams re-read history, drone sessions re-read pending actions).

mod actions;
mod backends;
mod cleanup;
mod dashboard;
mod listener;
mod lost;
mod nodes;
mod notify;
mod rows;
mod tls;
mod tokens;

use crate::events::EventBus;
use crate::model::*;
use crate::{Store, StoreResult};
use async_trait::async_trait;
use hangar_types::api::ClusterState;
use hangar_types::protocol::ActionMessage;
use hangar_types::timing::KEY_LEASE;
use hangar_types::token::{random_token, ConnectionToken};
use hangar_types::{
    ActionId, BackendId, BackendState, BackendStatus, ClusterName, ControllerName, DroneName,
    Millis, ProxyName, TerminationKind, TerminationReason,
};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections per store (one of them is held by the event listener).
const POOL_SIZE: u32 = 20;
/// How long an operation waits for a free connection before failing with `PoolTimedOut` (retryable).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Applies the schema migrations to the database at `url` (`hangar migrate --db URL`). Safe to run
/// while controllers are connected: sqlx serializes concurrent migrators with an advisory lock.
pub async fn migrate(url: &str) -> StoreResult<()> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let result = MIGRATOR.run(&pool).await;
    pool.close().await;
    Ok(result?)
}

#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    events: EventBus,
    /// Tags this store's notifications so that its own listener skips them.
    origin: String,
    /// Added to the database clock; only ever changed by the test hooks.
    clock_offset_ms: AtomicI64,
    /// Key lease length in milliseconds: [`KEY_LEASE`] unless a test shortened it
    /// ([`PostgresStore::set_key_lease`]).
    key_lease_ms: AtomicI64,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user:password@host:port/database`), applies migrations and
    /// starts listening for events of other controllers. Must be called inside a tokio runtime.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        if let Err(e) = MIGRATOR.run(&pool).await {
            pool.close().await;
            return Err(e.into());
        }
        // Listening before `connect` returns: every event committed by another store after this point
        // reaches this store's bus.
        let mut pg_listener = PgListener::connect_with(&pool).await?;
        pg_listener.listen(notify::CHANNEL).await?;

        let store = PostgresStore {
            pool: pool.clone(),
            events: EventBus::new(),
            origin: random_token(),
            clock_offset_ms: AtomicI64::new(0),
            key_lease_ms: AtomicI64::new(millis_of(KEY_LEASE)),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let relay = listener::Relay {
            pool,
            bus: store.events.clone(),
            origin: store.origin.clone(),
        };
        store.tasks.spawn(listener::run_event_listener(
            pg_listener,
            relay,
            store.cancel.child_token(),
        ));
        store.tasks.close();
        Ok(store)
    }

    /// Stops the event listener and closes every connection (waits for running operations). Later calls
    /// fail with `PoolClosed`.
    pub async fn close(&self) {
        self.cancel.cancel();
        self.tasks.wait().await;
        self.pool.close().await;
    }

    /// Test hook: moves the store clock forward by `d`, so tests can expire leases and tokens and reach
    /// idle and lifetime limits without waiting. Affects only this store instance.
    #[doc(hidden)]
    pub fn advance_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_add(millis_of(d), Ordering::SeqCst);
    }

    /// Test hook: moves the store clock back by `d` (a database clock stepped backwards), to check that
    /// fencing tokens still increase.
    #[doc(hidden)]
    pub fn rewind_clock(&self, d: Duration) {
        self.clock_offset_ms
            .fetch_sub(millis_of(d), Ordering::SeqCst);
    }

    /// Test hook: key leases acquired or renewed from now on last `lease` instead of [`KEY_LEASE`], so
    /// partition tests need not wait a minute. The controller's drone deadlines must be shortened to
    /// match (`ControllerConfig::key_timing`), keeping hard-terminate < lease. Affects only this store
    /// instance.
    #[doc(hidden)]
    pub fn set_key_lease(&self, lease: Duration) {
        self.key_lease_ms.store(millis_of(lease), Ordering::SeqCst);
    }

    /// The key lease length in milliseconds.
    fn key_lease_ms(&self) -> i64 {
        self.key_lease_ms.load(Ordering::SeqCst)
    }

    /// The bind parameter of `hangar_now_ms(…)`.
    fn offset(&self) -> i64 {
        self.clock_offset_ms.load(Ordering::SeqCst)
    }
}

impl Drop for PostgresStore {
    /// A store dropped without [`PostgresStore::close`] still stops its listener task (which would
    /// otherwise keep a connection and the pool alive).
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A duration in whole milliseconds, saturating.
fn millis_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for PostgresStore {
    async fn now(&self) -> StoreResult<Millis> {
        let now: i64 = sqlx::query_scalar("SELECT hangar_now_ms($1)")
            .bind(self.offset())
            .fetch_one(&self.pool)
            .await?;
        Ok(Millis(now))
    }

    async fn health(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
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
