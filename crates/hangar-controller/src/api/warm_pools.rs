//! Warm pool routes (a Hangar extension): `PUT`, `GET` and `DELETE /ctrl/warm-pools/{name}`, and
//! `GET /ctrl/warm-pools`. Filling, replacing and claiming are in [`crate::warm_pool`].

use crate::api::{ApiJson, ApiPath, AppState};
use crate::connect::ConnectError;
use crate::error::ApiError;
use axum::extract::State;
use axum::Json;
use hangar_store::WarmPoolRow;
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig, WarmPoolList};
use hangar_types::WarmPoolName;

fn parse_name(raw: &str) -> Result<WarmPoolName, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid warm pool name: {e}")))
}

/// The stored warm pool `name`; `404` when there is none.
async fn warm_pool_row(state: &AppState, name: &WarmPoolName) -> Result<WarmPoolRow, ApiError> {
    ApiError::found(
        state.store.warm_pool(name).await,
        "Warm pool does not exist",
    )
}

/// `GET /ctrl/warm-pools`.
#[utoipa::path(get, path = "/ctrl/warm-pools", tag = "ctrl", responses((status = 200, description = "Every warm pool with its counts", body = WarmPoolList)))]
pub async fn warm_pools_list(
    State(state): State<AppState>,
) -> Result<Json<WarmPoolList>, ApiError> {
    let pools = state
        .store
        .warm_pools()
        .await
        .map_err(ApiError::store("Database error"))?;
    Ok(Json(WarmPoolList {
        pools: pools.into_iter().map(|p| p.api).collect(),
    }))
}

/// `GET /ctrl/warm-pools/{name}`.
#[utoipa::path(get, path = "/ctrl/warm-pools/{name}", tag = "ctrl", params(("name" = String, Path, description = "Warm pool name")), responses((status = 200, description = "The warm pool with its counts", body = WarmPool)))]
pub async fn warm_pools_get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WarmPool>, ApiError> {
    let name = parse_name(&name)?;
    Ok(Json(warm_pool_row(&state, &name).await?.api))
}

/// `PUT /ctrl/warm-pools/{name}`: creates or changes the pool; answers with it as listed.
#[utoipa::path(put, path = "/ctrl/warm-pools/{name}", tag = "ctrl", params(("name" = String, Path, description = "Warm pool name")), request_body = WarmPoolConfig, responses((status = 200, description = "The pool as stored now", body = WarmPool)))]
pub async fn warm_pools_put(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(config): ApiJson<WarmPoolConfig>,
) -> Result<Json<WarmPool>, ApiError> {
    let name = parse_name(&name)?;
    config.validate().map_err(ApiError::InvalidRequest)?;
    let cluster = config
        .cluster
        .clone()
        .or_else(|| state.config.default_cluster.clone())
        .ok_or(ConnectError::NoClusterProvided)?;
    let pool = state
        .store
        .put_warm_pool(&name, &cluster, &config)
        .await
        .map_err(ApiError::store("Database error"))?;
    tracing::info!(pool = %name, %cluster, size = pool.api.size, "Warm pool set");
    let listed = pool.api.clone();
    state.warm.update(&name, Some(pool));
    state.warm.wake();
    Ok(Json(listed))
}

/// `DELETE /ctrl/warm-pools/{name}`: removes the pool (answering with it as it was) and terminates its
/// unclaimed backends; claimed ones live on.
#[utoipa::path(delete, path = "/ctrl/warm-pools/{name}", tag = "ctrl", params(("name" = String, Path, description = "Warm pool name")), responses((status = 200, description = "The pool as it was", body = WarmPool)))]
pub async fn warm_pools_delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WarmPool>, ApiError> {
    let name = parse_name(&name)?;
    let pool = warm_pool_row(&state, &name).await?;
    ApiError::applied(
        state.store.delete_warm_pool(&name).await,
        "Warm pool does not exist",
    )?;
    tracing::info!(pool = %name, "Warm pool deleted");
    state.warm.update(&name, None);
    // The fill pass terminates the unclaimed backends of pools that no longer exist.
    crate::warm_pool::fill_once(&state)
        .await
        .map_err(ApiError::store("Database error"))?;
    Ok(Json(pool.api))
}
