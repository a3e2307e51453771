//! Hangar's persistent state. [`Store`] is the only way the controller reads or writes it; each method is
//! one transaction named for the fact it establishes. Implementations: [`sqlite::SqliteStore`]
//! (embedded default, one controller) and [`postgres::PostgresStore`] (several controllers sharing one
//! database), both a [`dialect::SqlStore`]: the operations are written once (`src/ops/`), and what
//! differs between the databases is in `sqlite.rs` and `postgres.rs` behind [`dialect::Dialect`].
//!
//! Invariants every implementation keeps:
//! - at most one key row per `(namespace, name)`; the fencing token of a key strictly increases across
//!   acquisitions;
//! - a backend's stored status only moves forward; recording `terminated` releases its key;
//! - all times are integer milliseconds of the store's own clock ([`Store::now`]); the controller never
//!   uses its local clock for shared decisions.
//!
//! Boundary: only the controller depends on this crate.

mod deadline;
pub mod dialect;
mod events;
mod flush_connection;
mod group_commit;
mod migrations;
pub mod model;
pub mod postgres;
pub mod sqlite;

pub use deadline::STORE_CALL_DEADLINE;
pub use events::{EventBus, StoreEvent};
pub use model::*;

use async_trait::async_trait;
use hangar_types::api::ClusterState;
use hangar_types::protocol::ActionMessage;
use hangar_types::token::ConnectionToken;
use hangar_types::warm_pool::WarmPoolConfig;
use hangar_types::{
    BackendId, BackendState, BackendStatus, ClusterName, ControllerName, DroneName, Millis,
    ProxyName, TerminationKind, TerminationReason, WarmPoolName,
};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The call did not finish within its deadline ([`STORE_CALL_DEADLINE`]): the database or the
    /// link to it is down or lost the request. Its connection is closed, not reused.
    #[error("the database did not answer within {} ms", .0.as_millis())]
    DeadlineExceeded(Duration),
}

impl StoreError {
    /// Worth retrying the whole operation (lock contention, serialization failure, lost connection, no
    /// answer in time).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    // PostgreSQL: serialization failure, deadlock, the server shutting down or
                    // starting up; SQLite: busy, locked.
                    .is_some_and(|c| {
                        matches!(
                            c.as_ref(),
                            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "5" | "6"
                        )
                    })
            }
            StoreError::DeadlineExceeded(_) => true,
            StoreError::Migration(_) | StoreError::Corrupt(_) => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// What a drone reported together, in one transaction: marks `acks` acked (as
    /// [`Store::ack_action`]) and records `states` in order, as [`Store::record_backend_state`]
    /// would one by one. All or nothing: an error stores none of it.
    async fn record_drone_reports(
        &self,
        drone: NodeId,
        acks: &[hangar_types::ActionId],
        states: &[(BackendId, BackendState)],
    ) -> StoreResult<Vec<StateUpdate>>;

    /// The store's clock: the only clock the controller trusts for shared decisions.
    async fn now(&self) -> StoreResult<Millis>;

    /// A cheap round trip (`select 1`).
    async fn health(&self) -> StoreResult<()>;

    /// Live events (backend states, queued actions, revoked tokens) from every controller sharing this
    /// store. Subscribe *before* reading history to avoid gaps.
    fn events(&self) -> &EventBus;

    // ---- connect -------------------------------------------------------------------------------

    /// Looks up a key. A key whose lease has expired on the store clock is reported as `Expired`.
    async fn key_lookup(&self, key: &KeyRef) -> StoreResult<KeyLookup>;

    /// Takes an expired key from `holder` (as [`Store::key_lookup`] reported it), in one transaction:
    /// deletes the key row only if `holder` still holds it with an expired lease, and records `lost` (a
    /// `terminated` state) for `holder`, so the key is never free while its last holder is recorded
    /// live. `false` when the key was renewed or changed hands meanwhile (the caller retries its
    /// connect).
    async fn take_over_expired_key(
        &self,
        key: &KeyRef,
        holder: &BackendId,
        lost: &BackendState,
    ) -> StoreResult<bool>;

    /// In one transaction: inserts the backend, its key lease (expires at now + lease), its initial
    /// `scheduled` state (history + event), and the `Spawn` action for the chosen drone (with the fencing
    /// token assigned here), and its dynamic connection token if `new.token` is given. `KeyHeld` if
    /// the key was taken concurrently; a refused spawn writes nothing, its token included.
    async fn insert_backend_with_key(&self, new: NewBackend) -> StoreResult<Acquire>;

    /// Inserts a dynamic connection token for a backend.
    async fn insert_token(&self, token: NewToken) -> StoreResult<()>;

    /// Deletes a user's dynamic tokens for a backend; returns the deleted tokens (for proxies).
    async fn revoke_tokens(
        &self,
        backend: &BackendId,
        user: &str,
    ) -> StoreResult<Vec<ConnectionToken>>;

    // ---- scheduling ----------------------------------------------------------------------------

    /// Drones of `cluster`/`pool` that offer `executor`, are not draining, and whose own heartbeat and
    /// their controller's (a controller that died without detaching its drones leaves them attached)
    /// are younger than `max_heartbeat_age` — with their live backend counts.
    async fn schedulable_drones(&self, query: &DroneQuery) -> StoreResult<Vec<DroneCandidate>>;

    // ---- backends ------------------------------------------------------------------------------

    async fn backend(&self, id: &BackendId) -> StoreResult<Option<BackendRow>>;

    /// Records a state reported by `drone` (or by the controller). Stored only when its status is after
    /// the stored one; `terminated` releases the key; a `ready` state resets the idle clock.
    async fn record_backend_state(
        &self,
        id: &BackendId,
        state: &BackendState,
    ) -> StoreResult<StateUpdate>;

    /// Every recorded state of a backend, oldest first, with the time it was recorded.
    async fn backend_history(&self, id: &BackendId) -> StoreResult<Vec<(BackendState, Millis)>>;

    /// Queues a `Terminate` action for the backend's drone and publishes it. `None` if the backend does
    /// not exist. Also marks the backend as having a termination requested, so the sweeper does not queue
    /// another one every pass.
    async fn queue_terminate(
        &self,
        id: &BackendId,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> StoreResult<Option<ActionMessage>>;

    /// Backends of `drone` due for termination at the store clock: `ready` with no keepalive for
    /// `max_idle_seconds` (the idle clock starts when the backend becomes ready), or any status before
    /// `terminating` past `created + lifetime_limit_seconds`; excluding those with a termination
    /// already requested.
    async fn sweep_candidates(&self, drone: NodeId) -> StoreResult<Vec<BackendId>>;

    /// A proxy saw traffic for the backend; answers with its key lease (see [`KeepAlive`]).
    ///
    /// `proxy` reports whether it has open connections to the backend (`connected`). A `ready`
    /// backend is not idle while any proxy's connected report is younger than
    /// [`hangar_types::timing::CONNECTED_REPORT_TTL`]; `connected: false` withdraws that proxy's
    /// report, so the idle clock then runs from this keepalive.
    async fn keepalive(
        &self,
        id: &BackendId,
        proxy: NodeId,
        connected: bool,
    ) -> StoreResult<KeepAlive>;

    /// Resolves a connection token to a route (see [`TokenLookup`]).
    async fn resolve_token(&self, token: &ConnectionToken) -> StoreResult<TokenLookup>;

    // ---- actions -------------------------------------------------------------------------------

    /// Unacked actions for a drone, oldest first, at most `limit`.
    async fn pending_actions(&self, drone: NodeId, limit: u32) -> StoreResult<Vec<ActionMessage>>;

    /// Marks an action acked (only if it belongs to `drone`).
    async fn ack_action(&self, drone: NodeId, action: &hangar_types::ActionId) -> StoreResult<()>;

    // ---- nodes ---------------------------------------------------------------------------------

    /// Registers (or re-registers) a drone session attached to `controller`. A reconnecting drone takes
    /// its node over: the old session is replaced and a fresh `SessionId` returned (the SQLite store never
    /// returns `Registration::Refused`). `draining` is kept; pool and executors come from `reg`; the
    /// heartbeat is cleared until the new session sends one.
    async fn register_drone(&self, reg: &DroneRegistration) -> StoreResult<Registration>;

    async fn register_proxy(
        &self,
        cluster: &ClusterName,
        name: &ProxyName,
        controller: &ControllerName,
        version: &str,
    ) -> StoreResult<Registration>;

    /// Detaches a node, only if `session` is still its current session.
    async fn node_disconnected(&self, node: NodeId, session: SessionId) -> StoreResult<()>;

    /// Records a drone heartbeat: last heartbeat = store now, last local time = `local_time`.
    async fn drone_heartbeat(&self, drone: NodeId, local_time: Millis) -> StoreResult<()>;

    /// Extends a key lease by the lease duration from store now, if renewals are allowed.
    async fn renew_key(&self, backend: &BackendId) -> StoreResult<bool>;

    /// Drones and proxies of a cluster attached to some controller.
    async fn cluster_state(&self, cluster: &ClusterName) -> StoreResult<ClusterState> {
        self.cluster_nodes(cluster, false).await
    }

    /// Like [`Store::cluster_state`]; with `include_detached`, also the drones and proxies that no
    /// controller holds now (`controller: None`), as Plane's `db-cli list-nodes --all` shows them.
    async fn cluster_nodes(
        &self,
        cluster: &ClusterName,
        include_detached: bool,
    ) -> StoreResult<ClusterState>;

    /// Marks a drone draining. `None` if no such drone; `Some(true)` if it was not draining before.
    async fn drain_drone(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<bool>>;

    /// Records that a controller is alive (store clock).
    async fn controller_heartbeat(
        &self,
        controller: &ControllerName,
        online: bool,
    ) -> StoreResult<()>;

    /// Deletes expired tokens and ACME HTTP challenges older than [`HTTP_CHALLENGE_RETENTION`] (and,
    /// with `min_age`, terminated backends older than it), at most `batch` rows of each kind. Returns
    /// the number of rows deleted.
    async fn cleanup(&self, min_age: Option<Duration>, batch: u32) -> StoreResult<u64>;

    // ---- lost drones ---------------------------------------------------------------------------

    /// Backends that are certainly gone although nobody reported `terminated`, oldest first, at most
    /// `limit`: not terminated, on a drone that is detached or whose last heartbeat is missing or older
    /// than `max_heartbeat_age`, and whose key lease has expired on the store clock (or whose key row is
    /// gone, which only happens once it expired). The drone hard-terminates a backend by its own
    /// deadlines before the lease can expire, so such a backend no longer runs anywhere.
    async fn lost_backends(
        &self,
        max_heartbeat_age: Duration,
        limit: u32,
    ) -> StoreResult<Vec<LiveBackend>>;

    /// Every backend of the drone that is not terminated, oldest first. `None` if no such drone.
    async fn drone_live_backends(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<Vec<LiveBackend>>>;

    /// Forbids further renewals of the backend's key lease (`allow_renew = false`), so the backend dies
    /// by its drone's deadlines and the key expires (Plane's `db-cli prevent-renew`). `false` when the
    /// backend holds no key (unknown or terminated).
    async fn prevent_renew(&self, backend: &BackendId) -> StoreResult<bool>;

    /// The stored session of a drone. `None` if no such drone.
    async fn drone_attachment(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<DroneAttachment>>;

    // ---- TLS: certificate lease, ACME challenges, certificates (plane-api.md §7.9.3) -------------

    /// Takes or renews the cluster's certificate lease for `proxy` until store now +
    /// [`hangar_types::timing::CERT_LEASE`]. Granted when nobody holds it, when the lease has expired,
    /// or when `proxy` already holds it (a renewal, which keeps the TXT value; a takeover clears it).
    async fn acquire_cert_lease(&self, cluster: &ClusterName, proxy: NodeId) -> StoreResult<bool>;

    /// Deletes the cluster's lease (and its TXT value) if `proxy` holds it. `true` if it did.
    async fn release_cert_lease(&self, cluster: &ClusterName, proxy: NodeId) -> StoreResult<bool>;

    /// Sets or clears the cluster's ACME DNS-01 TXT value, only if `proxy` is the lease holder (even
    /// if the lease ran out meanwhile, as long as nobody took it over). `true` if stored.
    async fn set_txt_record(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        txt_value: Option<&str>,
    ) -> StoreResult<bool>;

    /// The cluster's current TXT value (`None` without a lease or a value).
    async fn txt_record(&self, cluster: &ClusterName) -> StoreResult<Option<String>>;

    /// Sets (`Some`) or removes (`None`) an ACME HTTP-01 challenge answer of the cluster, only if
    /// `proxy` is the lease holder, and publishes [`StoreEvent::HttpChallenge`]. `true` if applied.
    /// The caller bounds the sizes (they travel inline in PostgreSQL notifications).
    async fn set_http_challenge(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        token: &str,
        key_authorization: Option<&str>,
    ) -> StoreResult<bool>;

    /// The cluster's current HTTP-01 challenge answers, oldest first.
    async fn http_challenges(&self, cluster: &ClusterName) -> StoreResult<Vec<HttpChallenge>>;

    /// Stores `proxy`'s new certificate as the cluster's certificate (replacing any older one) and
    /// publishes [`StoreEvent::Certificate`]. Returns what was stored.
    async fn store_certificate(
        &self,
        cluster: &ClusterName,
        proxy: NodeId,
        cert_pem: &str,
        key_pem: &str,
    ) -> StoreResult<StoredCertificate>;

    /// The cluster's current certificate, if any.
    async fn certificate(&self, cluster: &ClusterName) -> StoreResult<Option<StoredCertificate>>;

    // ---- dashboard -----------------------------------------------------------------------------

    /// Clusters with at least one drone or proxy attached to a controller, by name, at most `limit`.
    async fn active_clusters(&self, limit: u32) -> StoreResult<Vec<ClusterName>>;

    /// The backends matching `filter`, most recently created first (ties by id), at most
    /// `filter.limit` (`hangar list`).
    async fn list_backends(&self, filter: &BackendFilter) -> StoreResult<Vec<BackendRow>>;

    /// The most recently created backends, newest first (ties by id), at most `limit`; with `status`,
    /// only those whose current status is `status`.
    async fn recent_backends(
        &self,
        status: Option<BackendStatus>,
        limit: u32,
    ) -> StoreResult<Vec<BackendRow>> {
        let filter = BackendFilter {
            status,
            limit,
            ..BackendFilter::default()
        };
        self.list_backends(&filter).await
    }

    // ---- warm pools ----------------------------------------------------------------------------

    /// Creates or changes a warm pool (counters kept); a change of cluster, pool or executable starts
    /// a new generation, whose backends replace the unclaimed ones. Returns the pool as stored now.
    async fn put_warm_pool(
        &self,
        name: &WarmPoolName,
        cluster: &ClusterName,
        config: &WarmPoolConfig,
    ) -> StoreResult<WarmPoolRow>;

    /// Every warm pool, by name, with its counts.
    async fn warm_pools(&self) -> StoreResult<Vec<WarmPoolRow>>;

    async fn warm_pool(&self, name: &WarmPoolName) -> StoreResult<Option<WarmPoolRow>>;

    /// Deletes a warm pool; its unclaimed backends are left for the caller to terminate (they no
    /// longer count anywhere and are never claimed). `false` if there was no such pool.
    async fn delete_warm_pool(&self, name: &WarmPoolName) -> StoreResult<bool>;

    /// Every unclaimed warm backend that is neither terminated nor asked to terminate, oldest first.
    async fn unclaimed_backends(&self) -> StoreResult<Vec<UnclaimedBackend>>;

    /// In one transaction: if the pool still has `new.generation` and fewer than `size` unclaimed
    /// backends of it (not asked to terminate), inserts an unclaimed backend (no key), its `scheduled`
    /// state and its spawn action. Concurrent calls for one pool never overfill it.
    async fn insert_warm_backend(&self, new: NewWarmBackend) -> StoreResult<WarmInsert>;

    /// In one transaction: picks the oldest ready unclaimed backend of the pool's current generation
    /// on an attached, heartbeating, non-draining drone, gives it the key (lease, next fencing token,
    /// the connect's static token, subdomain and limits), makes it an ordinary backend and counts the
    /// claim. A warm backend is claimed at most once, whatever runs concurrently.
    async fn claim_warm_backend(&self, claim: WarmClaim) -> StoreResult<WarmClaimOutcome>;
    /// Backends that are not terminated, counted by cluster and status (ordered by both); statuses
    /// without backends are absent.
    async fn live_backend_counts(&self) -> StoreResult<Vec<BackendCount>>;
    // ---- controllers reaching each other (backend logs) ---------------------------------------

    /// Records where the other controllers reach `controller` (its `internal_url`).
    async fn set_controller_url(&self, controller: &ControllerName, url: &str) -> StoreResult<()>;

    /// The controller holding the session of `drone` and its `internal_url`; `None` when the drone is
    /// unknown or detached.
    async fn drone_controller(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> StoreResult<Option<DroneController>>;

    // ---- reconnect -----------------------------------------------------------------------------

    /// A connect's reuse of the key's holder, as one call: looks the key up and, if it is live, held
    /// under `reuse.tag`, and its backend is neither terminating nor terminated, inserts the connection
    /// token for that backend (nothing if the backend has a static token). Otherwise writes nothing and
    /// answers what [`Store::key_lookup`] answers. The token row is the one [`Store::insert_token`]
    /// writes. Group-committed: concurrent calls share one statement on PostgreSQL and one turn of
    /// the single writer on SQLite.
    async fn reuse_key(&self, reuse: KeyReuse) -> StoreResult<Reuse>;
}

/// ACME HTTP-01 challenge answers older than this are deleted by [`Store::cleanup`]: an ACME order
/// validates its challenges within minutes, so an older answer was only left behind.
pub const HTTP_CHALLENGE_RETENTION: Duration = Duration::from_secs(3600);
