//! Typed inputs and outcomes of [`crate::Store`] operations.

use hangar_types::api::KeyConfig;
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::protocol::{ActionMessage, KeyDeadlines, RouteInfo};
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::warm_pool::WarmPool;
use hangar_types::{
    ActionId, BackendId, BackendState, BackendStatus, ClusterName, ControllerName, DroneName,
    Millis, WarmPoolName,
};
use std::time::Duration;

/// Row id of a node (drone or proxy).
pub type NodeId = i64;

/// Identifies one attachment of a node to a controller, so that a stale session's disconnect does not
/// detach a newer session of the same node.
pub type SessionId = i64;

/// Which backends [`crate::Store::list_backends`] returns: every given condition holds (`None`
/// matches all), newest first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendFilter {
    pub status: Option<hangar_types::BackendStatus>,
    pub cluster: Option<ClusterName>,
    /// The key's name (any namespace unless `namespace` is given too).
    pub key: Option<String>,
    pub namespace: Option<String>,
    pub limit: u32,
}

/// A key's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub namespace: String,
    pub name: String,
}

impl From<&KeyConfig> for KeyRef {
    fn from(k: &KeyConfig) -> Self {
        KeyRef {
            namespace: k.namespace.clone(),
            name: k.name.to_string(),
        }
    }
}

// Values of this enum are short-lived (one per call), so the size of the spawn action is not worth a
// `Box` in every caller's pattern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum KeyLookup {
    /// No key row.
    Missing,
    /// A key row whose lease has expired on the store clock; `backend` is its last holder.
    Expired { backend: BackendRow },
    /// The key is held by a backend.
    Live { tag: String, backend: BackendRow },
}

/// Everything needed to create a backend in [`crate::Store::insert_backend_with_key`].
#[derive(Debug, Clone)]
pub struct NewBackend {
    pub id: BackendId,
    pub key: KeyConfig,
    pub cluster: ClusterName,
    pub pool: String,
    pub drone: NodeId,
    pub executable: Executable,
    /// Deadlines on the drone's clock, computed by the controller from the drone's last heartbeat.
    pub deadlines: KeyDeadlines,
    pub static_token: Option<ConnectionToken>,
    /// The dynamic connection token to insert for the new backend in the spawn's own transaction
    /// (so it exists once the spawn is committed, and never for a refused spawn); `None` for a
    /// backend whose static token is the connect's token, or a warm backend (its claim issues one).
    pub token: Option<TokenGrant>,
    pub subdomain: Option<String>,
    pub max_idle_seconds: Option<i32>,
    pub lifetime_limit_seconds: Option<i32>,
}

// Values of this enum are short-lived (one per call), so the size of the spawn action is not worth a
// `Box` in every caller's pattern.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Acquire {
    /// Backend and key inserted; the spawn action was queued and published.
    Acquired {
        fencing_token: i64,
        action: ActionMessage,
    },
    /// The key was taken concurrently (retry the connect: it will find the holder).
    KeyHeld,
    /// A backend with this id already exists.
    BackendIdTaken,
}

/// A dynamic connection token a connect issues, with everything its row holds but the backend, which
/// the store fills in ([`KeyReuse`]: the key's holder; [`NewBackend`]: the new backend).
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub token: ConnectionToken,
    pub secret: SecretToken,
    pub user: Option<String>,
    pub auth: serde_json::Map<String, serde_json::Value>,
    /// Token lifetime from store now.
    pub lifetime: Duration,
}

impl TokenGrant {
    /// The token row of this grant for `backend`.
    pub fn for_backend(&self, backend: BackendId) -> NewToken {
        NewToken {
            token: self.token.clone(),
            backend,
            secret: self.secret.clone(),
            user: self.user.clone(),
            auth: self.auth.clone(),
            lifetime: self.lifetime,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: ConnectionToken,
    pub backend: BackendId,
    pub secret: SecretToken,
    pub user: Option<String>,
    pub auth: serde_json::Map<String, serde_json::Value>,
    /// Token lifetime from store now.
    pub lifetime: Duration,
}

/// What one call of [`crate::Store::record_drone_reports`] or [`crate::Store::record_backend_state`]
/// records: a drone's action acks, and backend states in order.
#[derive(Debug)]
pub(crate) struct Reports {
    pub(crate) acks: Option<(NodeId, Vec<ActionId>)>,
    pub(crate) states: Vec<(BackendId, BackendState)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneQuery {
    pub cluster: ClusterName,
    pub pool: String,
    pub executor: ExecutorKind,
    /// Drones whose last heartbeat is older than this are skipped.
    pub max_heartbeat_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneCandidate {
    pub id: NodeId,
    pub name: DroneName,
    /// The drone's clock at its last heartbeat (base for key deadlines).
    pub last_local_time: Millis,
    /// Backends on the drone that are not terminated.
    pub backend_count: i64,
}

/// How many live backends of a cluster are in a status ([`crate::Store::live_backend_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCount {
    pub cluster: ClusterName,
    pub status: BackendStatus,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendRow {
    pub id: BackendId,
    pub cluster: ClusterName,
    pub drone_id: NodeId,
    pub drone: DroneName,
    pub state: BackendState,
    /// Store time the current state was recorded.
    pub state_time: Millis,
    pub key: KeyConfig,
    pub fencing_token: i64,
    pub static_token: Option<ConnectionToken>,
    pub subdomain: Option<String>,
    pub created_at: Millis,
    pub max_idle_seconds: Option<i32>,
    pub lifetime_limit_seconds: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateUpdate {
    /// Stored and published, at this store time.
    Applied { time: Millis },
    /// Not after the stored status: ignored (still acked to the drone).
    Stale,
    /// No such backend.
    UnknownBackend,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenLookup {
    /// Unknown or expired token, or a backend that is terminating/terminated.
    NotFound,
    /// The backend exists but is not ready yet.
    Pending {
        backend: BackendId,
    },
    Ready(RouteInfo),
}

/// What a proxy's keepalive found (see [`crate::Store::keepalive`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Recorded. `lease_left`: how long the backend's key lease still runs on the store clock (zero
    /// once it has run out); `None` for a backend that holds no key (an unclaimed warm backend).
    Recorded { lease_left: Option<Duration> },
    /// No such backend, or it is terminated.
    Gone,
}

#[derive(Debug, Clone)]
pub struct DroneRegistration {
    pub cluster: ClusterName,
    pub name: DroneName,
    pub pool: String,
    pub executors: Vec<ExecutorKind>,
    pub controller: ControllerName,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Registered { node: NodeId, session: SessionId },
    Refused { reason: String },
}

/// A backend that is not terminated yet, with its drone and its current state: what the lost-backend
/// sweep and the operator's mark-lost act on (the caller records `terminated` from `state`).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveBackend {
    pub id: BackendId,
    pub drone: DroneName,
    pub state: BackendState,
}

/// Which controller holds a drone's session, and where the other controllers reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneController {
    /// The controller holding the drone's session.
    pub controller: ControllerName,
    /// Where the other controllers reach it (`None`: it never announced an address).
    pub internal_url: Option<String>,
}

/// The stored session of a drone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneAttachment {
    pub node: NodeId,
    /// The controller holding the drone's session; `None` when detached.
    pub controller: Option<ControllerName>,
    pub session: SessionId,
    /// Store time since the drone's last heartbeat; `None` before the session's first heartbeat.
    pub heartbeat_age: Option<Duration>,
}

/// A cluster's TLS certificate as stored by a proxy. `Debug` leaves the private key out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCertificate {
    pub cluster: ClusterName,
    /// PEM certificate chain.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// Store time it was stored.
    pub stored_at: Millis,
}

impl std::fmt::Debug for StoredCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCertificate")
            .field("cluster", &self.cluster)
            .field("cert_pem_len", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .field("stored_at", &self.stored_at)
            .finish()
    }
}

/// An ACME HTTP-01 challenge answer of a cluster: `/.well-known/acme-challenge/<token>` →
/// `key_authorization`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HttpChallenge {
    pub token: String,
    pub key_authorization: String,
}

/// A warm pool as stored: as the API lists it (its unclaimed backends counted now), and what only the
/// controller's fill loop needs.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmPoolRow {
    pub api: WarmPool,
    /// Changes when cluster, pool or executable change: unclaimed backends of another generation are
    /// replaced.
    pub generation: i64,
    /// Time since the newest of the failed starts ([`WarmPool::failed_starts`]) was created (`None`
    /// without any).
    pub last_failed_start_age: Option<Duration>,
}

/// An unclaimed warm backend that is not terminated and not asked to terminate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnclaimedBackend {
    pub id: BackendId,
    pub pool: WarmPoolName,
    pub generation: i64,
    /// Whether its drone is draining.
    pub drone_draining: bool,
    /// Store time since it was created.
    pub age: Duration,
}

/// A new unclaimed backend for [`crate::Store::insert_warm_backend`].
#[derive(Debug, Clone)]
pub struct NewWarmBackend {
    pub id: BackendId,
    pub pool: WarmPoolName,
    /// The pool generation it is started for; the insert is refused if the pool changed since.
    pub generation: i64,
    pub cluster: ClusterName,
    pub drone_pool: String,
    pub drone: NodeId,
    pub executable: Executable,
    /// Deadlines on the drone's clock; the drone renews them like a key lease's.
    pub deadlines: KeyDeadlines,
}

// Short-lived, like `Acquire`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum WarmInsert {
    /// Inserted; the spawn action was queued and published.
    Inserted { action: ActionMessage },
    /// The pool already has `size` unclaimed backends of its generation.
    Full,
    /// The pool was deleted or its generation changed.
    PoolChanged,
}

/// A connect's claim of an unclaimed backend of `pool` ([`crate::Store::claim_warm_backend`]).
#[derive(Debug, Clone)]
pub struct WarmClaim {
    pub pool: WarmPoolName,
    pub key: KeyConfig,
    pub static_token: Option<ConnectionToken>,
    pub subdomain: Option<String>,
    pub max_idle_seconds: Option<i32>,
    pub lifetime_limit_seconds: Option<i32>,
    /// Backends on drones whose last heartbeat is older than this are not claimed.
    pub max_heartbeat_age: Duration,
    /// Only backends on drones whose session is held by this controller (a claim hook is sent over
    /// that session). `None`: any drone.
    pub on_controller: Option<ControllerName>,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum WarmClaimOutcome {
    /// The backend now holds the key (lease and fencing token as in a spawn) and is an ordinary
    /// backend.
    Claimed { backend: BackendRow },
    /// No ready unclaimed backend (or no such pool): spawn cold.
    Empty,
    /// The key was taken concurrently.
    KeyHeld,
}

/// A connect for a key that asks to reuse the key's holder ([`crate::Store::reuse_key`]), with the
/// dynamic connection token to issue if it does.
#[derive(Debug, Clone)]
pub struct KeyReuse {
    pub key: KeyRef,
    /// The connect's tag: the holder is reused only under the same tag.
    pub tag: String,
    pub grant: TokenGrant,
}

/// The outcome of [`crate::Store::reuse_key`].
// Short-lived (one per call), as `KeyLookup`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Reuse {
    /// The key is live, held under the same tag by a backend that is neither terminating nor
    /// terminated: the token was inserted for it, unless it has a static token (which then is the
    /// connect's token and nothing was written).
    Reused { backend: BackendRow },
    /// Nothing was written; what [`crate::Store::key_lookup`] answers for the key: missing, expired,
    /// or held under another tag or by a backend that is shutting down.
    NotReused(KeyLookup),
}
