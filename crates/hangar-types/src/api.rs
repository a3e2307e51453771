//! Bodies of the controller's HTTP API, shaped exactly as Plane's (see `plane-api.md` §2), with a few
//! Hangar extensions that Plane clients ignore.

use crate::executable::{Executable, ExecutorKind};
use crate::names::{BackendId, ClusterName, ControllerName, DroneName, KeyName, NodeName};
use crate::state::{BackendStatus, BackendStatusEntry, TerminationReason};
use crate::time::Millis;
use crate::token::{ConnectionToken, SecretToken};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The identity of a key: `(namespace, name)`; `tag` must match to reuse a running backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: KeyName,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub tag: String,
}

impl KeyConfig {
    /// The key `name` in the default namespace (`""`), without a tag.
    pub fn named(name: KeyName) -> Self {
        KeyConfig {
            name,
            namespace: String::new(),
            tag: String::new(),
        }
    }
}

/// How to create a backend when the key is not held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnConfig {
    /// Explicit backend id (discouraged); random when absent.
    #[serde(default)]
    pub id: Option<BackendId>,
    /// Falls back to the controller's default cluster.
    #[serde(default)]
    pub cluster: Option<ClusterName>,
    /// Drone pool; `""` is the default pool.
    #[serde(default)]
    pub pool: String,
    pub executable: Executable,
    /// Hard lifetime in seconds from scheduling.
    #[serde(default)]
    pub lifetime_limit_seconds: Option<i32>,
    /// Seconds without any proxied connection before the backend is terminated.
    #[serde(default)]
    pub max_idle_seconds: Option<i32>,
    #[serde(default)]
    pub use_static_token: bool,
    /// Backend reachable only through `<subdomain>.<cluster>`.
    #[serde(default)]
    pub subdomain: Option<String>,
}

impl SpawnConfig {
    /// Runs `executable` with what an absent field means: a random id, the controller's default
    /// cluster, the default pool, no lifetime or idle limit, no static token, no subdomain.
    pub fn new(executable: Executable) -> Self {
        SpawnConfig {
            id: None,
            cluster: None,
            pool: String::new(),
            executable,
            lifetime_limit_seconds: None,
            max_idle_seconds: None,
            use_static_token: false,
            subdomain: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    #[serde(default)]
    pub key: Option<KeyConfig>,
    #[serde(default)]
    pub spawn_config: Option<SpawnConfig>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub auth: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConnectResponse {
    pub backend_id: BackendId,
    pub spawned: bool,
    pub status: BackendStatus,
    pub token: ConnectionToken,
    pub url: String,
    pub subdomain: Option<String>,
    pub secret_token: Option<SecretToken>,
    pub status_url: String,
    /// Only when `spawned`.
    pub drone: Option<DroneName>,
    /// Hangar extension: the backend is a claimed warm-pool backend (already `ready`).
    #[serde(default)]
    pub warm: bool,
}

/// Error kinds of Plane's `ApiError`, plus Hangar's `InvalidRequest` and `Unauthorized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ApiErrorKind {
    FailedToAcquireKey,
    KeyUnheldNoSpawnConfig,
    KeyHeldUnhealthy,
    KeyHeld,
    NoDroneAvailable,
    FailedToRemoveKey,
    DatabaseError,
    NoClusterProvided,
    NotFound,
    InvalidClusterName,
    /// Malformed or invalid request body, path or query (Hangar).
    InvalidRequest,
    /// Missing or wrong bearer token (Hangar).
    Unauthorized,
    /// The backend's drone is connected to no controller, so what only it keeps (logs) cannot be
    /// read (Hangar; 503).
    DroneUnreachable,
    Other,
}

/// Plane's error body `{id, kind, message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub id: String,
    pub kind: ApiErrorKind,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: {} (error id {})",
            self.kind, self.message, self.id
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub backend_id: BackendId,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainResult {
    pub updated: bool,
}

/// Answer of `POST /ctrl/c/{cluster}/d/{drone}/mark-lost` (Hangar): the backends this call recorded
/// as terminated with reason `lost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MarkLostResult {
    pub backends: Vec<BackendId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusResponse {
    pub status: String,
    pub version: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeState {
    pub name: NodeName,
    pub plane_version: String,
    pub plane_hash: String,
    pub controller: Option<ControllerName>,
    pub controller_heartbeat_age: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterDroneState {
    pub ready: bool,
    pub draining: bool,
    pub last_heartbeat_age: Option<i64>,
    pub backend_count: i64,
    pub node: NodeState,
    /// Hangar extension.
    #[serde(default)]
    pub pool: String,
    /// Hangar extension: executors this drone offers.
    #[serde(default)]
    pub executors: Vec<ExecutorKind>,
    /// Hangar extension: why the drone cannot run backends right now (its executor socket has been
    /// unreachable too long), as reported by the drone to the controller it is attached to. Absent
    /// when all is well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
pub struct ClusterState {
    pub drones: Vec<ClusterDroneState>,
    pub proxies: Vec<NodeState>,
}

impl ClusterState {
    /// Whether drone `name` is registered and has sent a heartbeat: it can be scheduled on.
    pub fn drone_heartbeating(&self, name: &DroneName) -> bool {
        self.drones
            .iter()
            .any(|d| d.node.name.as_str() == name.as_str() && d.last_heartbeat_age.is_some())
    }
}

/// Why the sweeper would terminate a backend (see [`TerminationCandidate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SweepReason {
    /// `ready` with no proxied connection for `max_idle_seconds`.
    Idle,
    /// Older than `lifetime_limit_seconds`.
    Lifetime,
}

/// A backend the sweeper would terminate now: an element of the answer of
/// `GET /ctrl/c/{cluster}/d/{drone}/termination-candidates` (Hangar; Plane's `db-cli
/// termination-candidates`). Times are store times in milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TerminationCandidate {
    pub backend_id: BackendId,
    pub status: BackendStatus,
    pub reason: SweepReason,
    pub created_at: Millis,
    /// When the current status was recorded.
    pub status_time: Millis,
    pub max_idle_seconds: Option<i32>,
    pub lifetime_limit_seconds: Option<i32>,
}

/// Answer of `GET /ctrl/c/{cluster}/d/{drone}/termination-candidates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TerminationCandidates {
    /// Store time of the check.
    pub now: Millis,
    pub candidates: Vec<TerminationCandidate>,
}

/// One event of the controllers' event bus, as streamed by `GET /ctrl/events` (Server-Sent Events;
/// Hangar's form of Plane's `db-cli events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BusEvent {
    /// Store time of the event, or the controller's clock when it has none (milliseconds since the
    /// Unix epoch).
    pub time: Millis,
    /// `backend_state`, `backend_action`, `tokens_revoked`, `http_challenge`, `certificate`, or
    /// `lagged` (this stream fell behind and missed `payload.missed` events).
    pub kind: String,
    /// What the event is about (a backend id, a cluster); `None` for global events.
    pub key: Option<String>,
    pub payload: serde_json::Value,
}

/// A backend as listed by `GET /ctrl/backends` and described by `GET /ctrl/b/{backend}` (Hangar; Plane
/// has `db-cli list-backends`). Times are store times in milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendSummary {
    pub id: BackendId,
    pub cluster: ClusterName,
    pub drone: DroneName,
    pub key: KeyConfig,
    /// The current status.
    pub status: BackendStatus,
    /// When the current status was recorded.
    pub status_time: Millis,
    /// Why it was terminated, once terminated.
    pub termination_reason: Option<TerminationReason>,
    pub created_at: Millis,
}

/// Answer of `GET /ctrl/backends?status=&cluster=&key=&namespace=&limit=`: newest first, at most
/// `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendList {
    pub backends: Vec<BackendSummary>,
    /// The limit applied.
    pub limit: u32,
}

/// Answer of `GET /ctrl/b/{backend}`: the backend and every status it went through, oldest first,
/// each with the time it was recorded (the last one is the current status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendDetails {
    #[serde(flatten)]
    pub backend: BackendSummary,
    pub history: Vec<BackendStatusEntry>,
}

/// Builds the connection URL `<scheme>://[<sub>.]<cluster>/<token>/`.
pub fn connection_url(
    cluster: &ClusterName,
    subdomain: Option<&str>,
    token: &ConnectionToken,
) -> String {
    match subdomain {
        Some(sub) => format!("{}://{sub}.{cluster}/{token}/", cluster.scheme()),
        None => format!("{}://{cluster}/{token}/", cluster.scheme()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn connect_request_parses_plane_body() {
        let r: ConnectRequest = serde_json::from_value(json!({
            "key": {"name": "room-abc", "namespace": "games", "tag": "v2"},
            "spawn_config": {"id": null, "cluster": "c1.example.com", "pool": "",
                "executable": {"image": "ghcr.io/org/app:latest"},
                "lifetime_limit_seconds": 3600, "max_idle_seconds": 60,
                "use_static_token": false, "subdomain": null},
            "user": "user-123", "auth": {"any": "json object"}
        }))
        .unwrap();
        assert_eq!(r.key.unwrap().namespace, "games");
        let sc = r.spawn_config.unwrap();
        assert_eq!(sc.max_idle_seconds, Some(60));
        let r: ConnectRequest = serde_json::from_value(json!({})).unwrap();
        assert!(r.key.is_none() && r.spawn_config.is_none());
    }

    #[test]
    fn a_drone_heartbeats_once_its_age_is_known() {
        let state: ClusterState = serde_json::from_value(json!({"proxies": [], "drones": [
            {"ready": true, "draining": false, "last_heartbeat_age": 3, "backend_count": 0,
             "node": {"name": {"Drone": "dr-1"}, "plane_version": "", "plane_hash": "", "controller": null,
                      "controller_heartbeat_age": null}},
            {"ready": true, "draining": false, "last_heartbeat_age": null, "backend_count": 0,
             "node": {"name": {"Drone": "dr-2"}, "plane_version": "", "plane_hash": "", "controller": null,
                      "controller_heartbeat_age": null}}
        ]}))
        .unwrap();
        assert!(state.drone_heartbeating(&"dr-1".parse().unwrap()));
        assert!(!state.drone_heartbeating(&"dr-2".parse().unwrap()));
        assert!(!state.drone_heartbeating(&"dr-3".parse().unwrap()));
    }

    #[test]
    fn connect_request_refuses_bad_input() {
        assert!(serde_json::from_value::<ConnectRequest>(json!({"key": {"name": ""}})).is_err());
        assert!(serde_json::from_value::<ConnectRequest>(json!({"spawn_config": {}})).is_err());
        assert!(serde_json::from_value::<ConnectRequest>(
            json!({"spawn_config": {"executable": {"command": ["x"]}, "cluster": "bad host"}})
        )
        .is_err());
        assert!(serde_json::from_value::<ConnectRequest>(
            json!({"spawn_config": {"executable": {"command": ["x"]}, "max_idle_second": 3}})
        )
        .is_err());
    }

    #[test]
    fn urls() {
        let c: ClusterName = "plane.test".parse().unwrap();
        let t = ConnectionToken::from_path_segment("abc");
        assert_eq!(connection_url(&c, None, &t), "https://plane.test/abc/");
        assert_eq!(
            connection_url(&c, Some("sub"), &t),
            "https://sub.plane.test/abc/"
        );
        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert_eq!(connection_url(&c, None, &t), "http://localhost:9090/abc/");
    }

    #[test]
    fn error_shape() {
        let e = ApiError {
            id: "x".into(),
            kind: ApiErrorKind::NoDroneAvailable,
            message: "No active drone available.".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"id": "x", "kind": "NoDroneAvailable", "message": "No active drone available."})
        );
    }
}
