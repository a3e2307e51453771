//! Read-only views of backends for operators (Hangar; Plane has `db-cli list-backends`):
//! `GET /ctrl/backends` lists them newest first with filters, `GET /ctrl/b/{backend}` describes one
//! with every status it went through. Unknown or malformed query parameters are refused in Plane's
//! error shape.

use crate::api::{ApiPath, AppState};
use crate::error::ApiError;
use axum::extract::{RawQuery, State};
use axum::Json;
use hangar_store::{BackendFilter, BackendRow};
use hangar_types::api::{BackendDetails, BackendList, BackendSummary};
use hangar_types::names::validate_key_text;
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, ClusterName};

/// Backends listed when the request names no `limit`.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// Most backends one request may list.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// `?status=&cluster=&key=&namespace=&limit=`; an empty value is the same as an absent one.
fn parse_list_query(query: Option<&str>) -> Result<BackendFilter, ApiError> {
    let mut filter = BackendFilter {
        limit: DEFAULT_LIST_LIMIT,
        ..BackendFilter::default()
    };
    let pairs = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    for (name, value) in pairs {
        if value.is_empty() {
            continue;
        }
        let invalid = |what: &str| ApiError::InvalidRequest(format!("{what}: {value:?}"));
        match name.as_ref() {
            "status" => {
                filter.status = Some(value.parse().map_err(|_| invalid("unknown backend status"))?)
            }
            "cluster" => {
                let cluster: ClusterName = value.parse().map_err(|_| invalid("invalid cluster"))?;
                filter.cluster = Some(cluster);
            }
            "key" | "namespace" => {
                validate_key_text(&value).map_err(|e| invalid(&format!("invalid {name} ({e})")))?;
                if name == "key" {
                    filter.key = Some(value.into_owned());
                } else {
                    filter.namespace = Some(value.into_owned());
                }
            }
            "limit" => {
                let limit: u32 = value.parse().map_err(|_| {
                    invalid(&format!("limit must be an integer from 1 to {MAX_LIST_LIMIT}"))
                })?;
                if !(1..=MAX_LIST_LIMIT).contains(&limit) {
                    return Err(invalid(&format!(
                        "limit must be an integer from 1 to {MAX_LIST_LIMIT}"
                    )));
                }
                filter.limit = limit;
            }
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter {other:?}; expected status, cluster, key, namespace or limit"
                )))
            }
        }
    }
    Ok(filter)
}

fn summary(row: BackendRow) -> BackendSummary {
    let entry = row.state.to_status_entry(row.state_time);
    BackendSummary {
        id: row.id,
        cluster: row.cluster,
        drone: row.drone,
        key: row.key,
        status: entry.status,
        status_time: row.state_time,
        termination_reason: entry.termination_reason,
        created_at: row.created_at,
    }
}

/// `GET /ctrl/backends[?status=S][&cluster=C][&key=K][&namespace=N][&limit=L]`.
#[utoipa::path(get, path = "/ctrl/backends", tag = "ctrl", params(("status" = Option<String>, Query, description = "Only backends with this status"), ("cluster" = Option<String>, Query, description = "Only backends of this cluster"), ("key" = Option<String>, Query, description = "Only backends of this key name"), ("namespace" = Option<String>, Query, description = "Key namespace (with key)"), ("limit" = Option<u32>, Query, description = "At most this many (1 to 1000)")), responses((status = 200, description = "Backends, newest first", body = BackendList)))]
pub async fn backends_list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<BackendList>, ApiError> {
    let filter = parse_list_query(query.as_deref())?;
    let rows = state
        .store
        .list_backends(&filter)
        .await
        .map_err(ApiError::store("Database error"))?;
    Ok(Json(BackendList {
        backends: rows.into_iter().map(summary).collect(),
        limit: filter.limit,
    }))
}

/// `GET /ctrl/b/{backend}`.
#[utoipa::path(get, path = "/ctrl/b/{backend}", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "The backend with its status history", body = BackendDetails)))]
pub async fn backends_get(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
) -> Result<Json<BackendDetails>, ApiError> {
    let (row, history) = backend_with_history(&state, &backend).await?;
    Ok(Json(BackendDetails {
        backend: summary(row),
        history,
    }))
}

/// The stored row of `backend`; `404` when there is none.
pub(super) async fn backend_row(
    state: &AppState,
    backend: &BackendId,
) -> Result<BackendRow, ApiError> {
    ApiError::found(state.store.backend(backend).await, "Backend does not exist")
}

/// The stored row of `backend` with its status history as status entries; `404` when there is no
/// row.
pub(super) async fn backend_with_history(
    state: &AppState,
    backend: &BackendId,
) -> Result<(BackendRow, Vec<BackendStatusEntry>), ApiError> {
    let row = backend_row(state, backend).await?;
    let history = state
        .store
        .backend_history(backend)
        .await
        .map_err(ApiError::store("Database error"))?
        .into_iter()
        .map(|(state, time)| state.to_status_entry(time))
        .collect();
    Ok((row, history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::BackendStatus;

    #[test]
    fn list_queries_parse_or_are_refused() {
        let f = parse_list_query(None).unwrap();
        assert_eq!(f.limit, DEFAULT_LIST_LIMIT);
        assert_eq!(f.status, None);
        let f = parse_list_query(Some(
            "status=ready&cluster=localhost%3A9090&key=room%201&namespace=games&limit=5&key=",
        ))
        .unwrap();
        assert_eq!(f.status, Some(BackendStatus::Ready));
        assert_eq!(f.cluster.unwrap().as_str(), "localhost:9090");
        assert_eq!(f.key.as_deref(), Some("room 1"));
        assert_eq!(f.namespace.as_deref(), Some("games"));
        assert_eq!(f.limit, 5);
        for bad in [
            "status=sleeping",
            "limit=0",
            "limit=1001",
            "limit=x",
            "cluster=not%20a%20cluster",
            "colour=blue",
        ] {
            let err = parse_list_query(Some(bad)).unwrap_err();
            assert!(matches!(err, ApiError::InvalidRequest(_)), "{bad}: {err}");
        }
    }
}
