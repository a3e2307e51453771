//! Health and version endpoints.

use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::Json;
use hangar_types::api::{HealthResponse, StatusResponse};

/// `GET /ctrl/status`: store round trip, version and hash.
#[utoipa::path(get, path = "/ctrl/status", tag = "ctrl", responses((status = 200, description = "The store answers", body = StatusResponse)))]
pub async fn status_get(State(state): State<AppState>) -> Result<Json<StatusResponse>, ApiError> {
    check_store(&state).await?;
    Ok(Json(StatusResponse {
        status: "ok".into(),
        version: hangar_types::VERSION.into(),
        hash: hangar_types::git_hash().into(),
    }))
}

/// `GET /pub/health`: store round trip.
#[utoipa::path(get, path = "/pub/health", tag = "pub", responses((status = 200, description = "The store answers", body = HealthResponse)))]
pub async fn health_get(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    check_store(&state).await?;
    Ok(Json(HealthResponse {
        status: "ok".into(),
    }))
}

/// A store round trip, answered as an error when it fails.
async fn check_store(state: &AppState) -> Result<(), ApiError> {
    state
        .store
        .health()
        .await
        .map_err(ApiError::store("Database health check failed"))
}
