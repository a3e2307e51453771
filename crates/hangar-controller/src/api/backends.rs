//! Backend routes: connect, terminate, token revocation, public status and status stream.

use crate::api::backend_views::backend_row;
use crate::api::{ApiJson, ApiPath, AppState};
use crate::connect;
use crate::error::ApiError;
use crate::status_stream;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use hangar_types::api::{ConnectRequest, ConnectResponse, RevokeRequest};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus, TerminationKind, TerminationReason};

/// `POST /ctrl/connect`.
#[utoipa::path(post, path = "/ctrl/connect", tag = "ctrl", request_body = ConnectRequest, responses((status = 200, description = "The backend of the key, created or reused", body = ConnectResponse)))]
pub async fn connect_post(
    State(state): State<AppState>,
    request: Result<ApiJson<ConnectRequest>, ApiError>,
) -> Result<Json<ConnectResponse>, ApiError> {
    let started = std::time::Instant::now();
    let result = match request {
        Ok(ApiJson(request)) => connect::connect(&state, &request)
            .await
            .map_err(ApiError::from),
        Err(rejected) => Err(rejected),
    };
    state.prometheus.record_connect(&result, started.elapsed());
    result.map(Json)
}

/// `POST /ctrl/b/{backend}/soft-terminate`. The body is ignored (Plane's client sends `null`).
#[utoipa::path(post, path = "/ctrl/b/{backend}/soft-terminate", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "Termination queued (JSON null)", body = ())))]
pub async fn backends_soft_terminate(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
) -> Result<Json<()>, ApiError> {
    terminate(&state, &backend, TerminationKind::Soft).await
}

/// `POST /ctrl/b/{backend}/hard-terminate`. The body is ignored.
#[utoipa::path(post, path = "/ctrl/b/{backend}/hard-terminate", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "Termination queued (JSON null)", body = ())))]
pub async fn backends_hard_terminate(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
) -> Result<Json<()>, ApiError> {
    terminate(&state, &backend, TerminationKind::Hard).await
}

async fn terminate(
    state: &AppState,
    backend: &BackendId,
    kind: TerminationKind,
) -> Result<Json<()>, ApiError> {
    state.prometheus.record_terminate(kind);
    let queued = state
        .store
        .queue_terminate(backend, kind, TerminationReason::External)
        .await;
    let action = ApiError::found(queued, "Backend does not exist")?;
    tracing::info!(%backend, ?kind, action = %action.action_id, "Termination requested");
    Ok(Json(()))
}

/// `POST /ctrl/b/{backend}/prevent-renew` (Plane's `db-cli prevent-renew`): the backend's key lease is
/// not renewed any more, so its drone terminates it by its key deadlines and the key expires. 404 when
/// the backend does not exist or holds no key (terminated). The body is ignored.
#[utoipa::path(post, path = "/ctrl/b/{backend}/prevent-renew", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "Renewals refused from now on (JSON null)", body = ())))]
pub async fn backends_prevent_renew(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
) -> Result<Json<()>, ApiError> {
    ApiError::applied(
        state.store.prevent_renew(&backend).await,
        "Backend does not exist or holds no key",
    )?;
    tracing::warn!(%backend, "Key renewals blocked by an operator");
    Ok(Json(()))
}

/// `POST /ctrl/b/revoke` and `/ctrl/revoke`: deletes a user's tokens for a backend. The store publishes
/// `StoreEvent::TokensRevoked`, which proxy sessions forward, so proxies forget them (Plane does not,
/// quirk 2).
#[utoipa::path(post, path = "/ctrl/b/revoke", tag = "ctrl", request_body = RevokeRequest, responses((status = 200, description = "Tokens revoked", body = String)))]
pub async fn tokens_revoke(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RevokeRequest>,
) -> Result<Json<&'static str>, ApiError> {
    let tokens = state
        .store
        .revoke_tokens(&request.backend_id, &request.user)
        .await
        .map_err(ApiError::store("Failed to revoke token"))?;
    tracing::info!(backend = %request.backend_id, count = tokens.len(), "Tokens revoked");
    Ok(Json("Token revoked successfully"))
}

/// `GET /pub/b/{backend}/status`.
#[utoipa::path(get, path = "/pub/b/{backend}/status", tag = "pub", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "Current status", body = BackendStatusEntry)))]
pub async fn backends_status(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
) -> Result<Json<BackendStatusEntry>, ApiError> {
    let row = backend_row(&state, &backend).await?;
    Ok(Json(row.state.to_status_entry(row.state_time)))
}

/// `GET /pub/b/{backend}/status-stream` (Server-Sent Events). `Last-Event-ID` resumes after a status;
/// an unparseable value is ignored, as in Plane.
#[utoipa::path(get, path = "/pub/b/{backend}/status-stream", tag = "pub", params(("backend" = BackendId, Path, description = "Backend id"), ("last-event-id" = Option<String>, Header, description = "Resume after this event")), responses((status = 200, description = "Server-Sent Events, one status entry each", content_type = "text/event-stream", body = BackendStatusEntry)))]
pub async fn backends_status_stream(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let resume_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<BackendStatus>().ok());
    status_stream::open(&state, backend, resume_after)
}
