//! Health and version endpoints.

use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::Json;
use hangar_types::api::{HealthResponse, StatusResponse};

/// Git hash baked in by the build, when the build provides one.
const GIT_HASH: &str = match option_env!("HANGAR_GIT_HASH") {
    Some(hash) => hash,
    None => "unknown",
};

/// `GET /ctrl/status`: store round trip, version and hash.
pub async fn status_get(State(state): State<AppState>) -> Result<Json<StatusResponse>, ApiError> {
    state
        .store
        .health()
        .await
        .map_err(ApiError::store("Database health check failed"))?;
    Ok(Json(StatusResponse {
        status: "ok".into(),
        version: hangar_types::VERSION.into(),
        hash: GIT_HASH.into(),
    }))
}

/// `GET /pub/health`: store round trip.
pub async fn health_get(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    state
        .store
        .health()
        .await
        .map_err(ApiError::store("Database health check failed"))?;
    Ok(Json(HealthResponse {
        status: "ok".into(),
    }))
}
