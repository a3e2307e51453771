//! Cluster and node routes: cluster state, drain, mark-lost, and the drone/proxy/DNS WebSocket upgrades.

use crate::api::{ApiPath, AppState};
use crate::dns_session::run_dns_session;
use crate::drone_session::run_drone_session;
use crate::error::ApiError;
use crate::lost;
use crate::proxy_session::run_proxy_session;
use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::Json;
use hangar_types::api::{ClusterState, DrainResult, MarkLostResult};
use hangar_types::{ClusterName, DroneName};

pub(super) fn parse_cluster(raw: &str) -> Result<ClusterName, ApiError> {
    raw.parse().map_err(|_| ApiError::InvalidClusterName)
}

/// `GET /ctrl/c/{cluster}/state[?all=true]`: the nodes attached to a controller; with `all=true`
/// (a Hangar extension), also the detached ones (`controller: null`).
#[utoipa::path(get, path = "/ctrl/c/{cluster}/state", tag = "ctrl", params(("cluster" = ClusterName, Path, description = "Cluster"), ("all" = Option<bool>, Query, description = "Also list detached nodes")), responses((status = 200, description = "Drones and proxies of the cluster", body = ClusterState)))]
pub async fn cluster_state_get(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<ClusterState>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let include_detached = parse_all(query.as_deref())?;
    let mut cluster_state = state
        .store
        .cluster_nodes(&cluster, include_detached)
        .await
        .map_err(ApiError::store("Database error"))?;
    state.executor_errors.annotate(&cluster, &mut cluster_state);
    Ok(Json(cluster_state))
}

/// The `all` flag of the cluster-state query (`all=true|false`); other parameters are refused.
fn parse_all(query: Option<&str>) -> Result<bool, ApiError> {
    let mut all = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        all = match pair {
            "all" | "all=true" => true,
            "all=false" => false,
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "invalid query parameter {pair:?}: only all=true|false is accepted"
                )))
            }
        };
    }
    Ok(all)
}

pub(super) fn parse_drone(raw: &str) -> Result<DroneName, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid drone name: {e}")))
}

/// `POST /ctrl/c/{cluster}/d/{drone}/drain`.
#[utoipa::path(post, path = "/ctrl/c/{cluster}/d/{drone}/drain", tag = "ctrl", params(("cluster" = ClusterName, Path, description = "Cluster"), ("drone" = DroneName, Path, description = "Drone")), responses((status = 200, description = "Drain recorded", body = DrainResult)))]
pub async fn drones_drain(
    State(state): State<AppState>,
    ApiPath((cluster, drone)): ApiPath<(String, String)>,
) -> Result<Json<DrainResult>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let drone = parse_drone(&drone)?;
    let drained = state.store.drain_drone(&cluster, &drone).await;
    let updated = ApiError::found(drained, "Drone does not exist")?;
    if updated {
        tracing::info!(%cluster, %drone, "Drone draining");
    }
    Ok(Json(DrainResult { updated }))
}

/// `POST /ctrl/c/{cluster}/d/{drone}/mark-lost` (Plane's `db-cli mark-backend-lost --drone`): records
/// every backend of the drone that is not terminated as terminated with reason `lost`, releasing their
/// keys at once (see [`lost::mark_drone_lost`]). The body is ignored.
#[utoipa::path(post, path = "/ctrl/c/{cluster}/d/{drone}/mark-lost", tag = "ctrl", params(("cluster" = ClusterName, Path, description = "Cluster"), ("drone" = DroneName, Path, description = "Drone")), responses((status = 200, description = "Backends recorded as lost", body = MarkLostResult)))]
pub async fn drones_mark_lost(
    State(state): State<AppState>,
    ApiPath((cluster, drone)): ApiPath<(String, String)>,
) -> Result<Json<MarkLostResult>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let drone = parse_drone(&drone)?;
    let marked = lost::mark_drone_lost(state.store.as_ref(), &cluster, &drone).await;
    let backends = ApiError::found(marked, "Drone does not exist")?;
    Ok(Json(MarkLostResult { backends }))
}

/// `GET /ctrl/c/{cluster}/drone-socket`: the cluster is validated before the upgrade.
#[utoipa::path(get, path = "/ctrl/c/{cluster}/drone-socket", tag = "nodes", params(("cluster" = ClusterName, Path, description = "Cluster")), responses((status = 101, description = "WebSocket session of a drone (JSON messages)")))]
pub async fn drone_socket(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    upgrade(state, ws, |state, socket| {
        run_drone_session(state, cluster, socket)
    })
}

/// `GET /ctrl/c/{cluster}/proxy-socket`: the cluster is validated before the upgrade.
#[utoipa::path(get, path = "/ctrl/c/{cluster}/proxy-socket", tag = "nodes", params(("cluster" = ClusterName, Path, description = "Cluster")), responses((status = 101, description = "WebSocket session of a proxy (JSON messages)")))]
pub async fn proxy_socket(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    upgrade(state, ws, |state, socket| {
        run_proxy_session(state, cluster, socket)
    })
}

/// `GET /ctrl/dns-socket`: an ACME DNS responder's session (no cluster: it serves every cluster).
#[utoipa::path(get, path = "/ctrl/dns-socket", tag = "nodes", responses((status = 101, description = "WebSocket session of an ACME DNS responder (JSON messages)")))]
pub async fn dns_socket(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    upgrade(state, ws, run_dns_session)
}

/// Upgrades to a node session run by `session`, which the controller's tracker waits for at shutdown.
fn upgrade<F, Fut>(
    state: AppState,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    session: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(AppState, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ws = ws.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let tracker = state.tracker.clone();
    Ok(ws
        .max_message_size(state.config.max_body_bytes)
        .on_upgrade(move |socket| tracker.track_future(session(state, socket))))
}
