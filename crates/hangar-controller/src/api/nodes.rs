//! Cluster and node routes: cluster state, drain, and the drone/proxy WebSocket upgrades.

use crate::api::{ApiPath, AppState};
use crate::drone_session::run_drone_session;
use crate::error::ApiError;
use crate::proxy_session::run_proxy_session;
use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use hangar_types::api::{ClusterState, DrainResult};
use hangar_types::{ClusterName, DroneName};

fn parse_cluster(raw: &str) -> Result<ClusterName, ApiError> {
    raw.parse().map_err(|_| ApiError::InvalidClusterName)
}

/// `GET /ctrl/c/{cluster}/state`.
pub async fn cluster_state_get(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
) -> Result<Json<ClusterState>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let cluster_state = state
        .store
        .cluster_state(&cluster)
        .await
        .map_err(ApiError::store("Database error"))?;
    Ok(Json(cluster_state))
}

/// `POST /ctrl/c/{cluster}/d/{drone}/drain`.
pub async fn drones_drain(
    State(state): State<AppState>,
    ApiPath((cluster, drone)): ApiPath<(String, String)>,
) -> Result<Json<DrainResult>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let drone: DroneName = drone
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid drone name: {e}")))?;
    let updated = state
        .store
        .drain_drone(&cluster, &drone)
        .await
        .map_err(ApiError::store("Database error"))?
        .ok_or(ApiError::NotFound("Drone does not exist"))?;
    if updated {
        tracing::info!(%cluster, %drone, "Drone draining");
    }
    Ok(Json(DrainResult { updated }))
}

/// `GET /ctrl/c/{cluster}/drone-socket`: the cluster is validated before the upgrade.
pub async fn drone_socket(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let ws = ws.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let tracker = state.tracker.clone();
    Ok(ws
        .max_message_size(state.config.max_body_bytes)
        .on_upgrade(move |socket| tracker.track_future(run_drone_session(state, cluster, socket))))
}

/// `GET /ctrl/c/{cluster}/proxy-socket`: the cluster is validated before the upgrade.
pub async fn proxy_socket(
    State(state): State<AppState>,
    ApiPath(cluster): ApiPath<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let ws = ws.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let tracker = state.tracker.clone();
    Ok(ws
        .max_message_size(state.config.max_body_bytes)
        .on_upgrade(move |socket| tracker.track_future(run_proxy_session(state, cluster, socket))))
}
