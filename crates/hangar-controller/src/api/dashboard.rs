//! The live web dashboard: `GET /ctrl/dashboard/state` (one JSON snapshot of clusters, their drones and
//! proxies, and the most recent backends with their latest resource sample) and the static page that
//! polls it (`GET /dashboard`, plus its script and style sheet), embedded in the binary. The page's
//! backend view (`/dashboard#b/<backend id>`) shows one backend's event timeline
//! (`GET /ctrl/b/{backend}/events`, polled) and its live log tail (`GET /ctrl/b/{backend}/logs`,
//! followed), both served by [`super::logs`].
//!
//! The page is public (it holds no data); the JSON sits behind the `/ctrl` bearer check like every
//! other operator route. The page never builds HTML from data (the script uses `textContent` only), and
//! its Content-Security-Policy allows scripts, styles and fetches from this origin only.

use crate::api::AppState;
use crate::error::ApiError;
use crate::metrics::BackendSample;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use hangar_store::BackendRow;
use hangar_types::api::{ClusterDroneState, NodeState};
use hangar_types::warm_pool::WarmPool;
use hangar_types::{BackendId, BackendStatus, ClusterName, DroneName, Millis, TerminationReason};
use serde::Serialize;

/// Backends listed when the request names no `limit`.
pub const DEFAULT_BACKEND_LIMIT: u32 = 200;
/// Most backends one request may list; larger `limit`s are lowered to this.
pub const MAX_BACKEND_LIMIT: u32 = 1000;
/// Most clusters listed (each costs one cluster-state query).
pub const MAX_CLUSTERS: u32 = 100;

const PAGE_HTML: &str = include_str!("dashboard/index.html");
const PAGE_JS: &str = include_str!("dashboard/dashboard.js");
const PAGE_CSS: &str = include_str!("dashboard/dashboard.css");

/// Only this origin's script, style and fetches; no framing, no plugins, no inline code.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The answer of `GET /ctrl/dashboard/state`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DashboardState {
    /// Store time of the snapshot, milliseconds since the Unix epoch.
    pub time: i64,
    pub clusters: Vec<DashboardCluster>,
    /// Newest first.
    pub backends: Vec<DashboardBackend>,
    /// The limit applied to `backends`.
    pub limit: u32,
    /// Every warm pool with its counts, by name.
    pub warm_pools: Vec<WarmPool>,
}

/// A cluster with the drones and proxies attached to some controller (as `GET /ctrl/c/{cluster}/state`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DashboardCluster {
    pub name: ClusterName,
    pub drones: Vec<ClusterDroneState>,
    pub proxies: Vec<NodeState>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DashboardBackend {
    pub id: BackendId,
    pub cluster: ClusterName,
    pub drone: DroneName,
    pub key: String,
    pub namespace: String,
    pub status: BackendStatus,
    /// Store time the current status was recorded, milliseconds since the Unix epoch.
    pub status_time: i64,
    pub termination_reason: Option<TerminationReason>,
    /// Store time the backend was created, milliseconds since the Unix epoch.
    pub created_at: i64,
    /// The latest resource sample, when the backend's drone is connected to this controller.
    pub metrics: Option<DashboardSample>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DashboardSample {
    /// Bytes.
    pub mem_used: u64,
    /// Bytes; 0 when unlimited.
    pub mem_limit: u64,
    /// CPU time of the backend since its previous sample, nanoseconds.
    pub cpu_used_ns: u64,
    /// CPU time of the whole host over the same span, nanoseconds.
    pub sys_cpu_ns: u64,
    /// How long ago this controller received the sample, milliseconds.
    pub age_ms: u64,
}

impl From<BackendSample> for DashboardSample {
    fn from(s: BackendSample) -> Self {
        let age = tokio::time::Instant::now().saturating_duration_since(s.received);
        DashboardSample {
            mem_used: s.mem_used,
            mem_limit: s.mem_limit,
            cpu_used_ns: s.cpu_used_ns,
            sys_cpu_ns: s.sys_cpu_ns,
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// What `?limit=&status=` asked for.
#[derive(Debug, PartialEq, Eq)]
struct BackendFilter {
    limit: u32,
    status: Option<BackendStatus>,
}

fn parse_filter(query: Option<&str>) -> Result<BackendFilter, ApiError> {
    let mut filter = BackendFilter {
        limit: DEFAULT_BACKEND_LIMIT,
        status: None,
    };
    let pairs = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    for (name, value) in pairs {
        match name.as_ref() {
            "limit" => {
                let limit: u32 = value.parse().map_err(|_| {
                    ApiError::InvalidRequest(format!("limit must be a positive integer: {value:?}"))
                })?;
                if limit == 0 {
                    return Err(ApiError::InvalidRequest("limit must be at least 1".into()));
                }
                filter.limit = limit.min(MAX_BACKEND_LIMIT);
            }
            "status" if value.is_empty() => filter.status = None,
            "status" => {
                let status = value.parse().map_err(|_| {
                    ApiError::InvalidRequest(format!("unknown backend status: {value:?}"))
                })?;
                filter.status = Some(status);
            }
            // Unknown parameters are ignored, as browsers add their own (cache busters).
            _ => {}
        }
    }
    Ok(filter)
}

fn backend_entry(state: &AppState, row: BackendRow) -> DashboardBackend {
    let entry = row.state.to_status_entry(row.state_time);
    DashboardBackend {
        metrics: state.metrics.get(&row.id).map(DashboardSample::from),
        status: entry.status,
        termination_reason: entry.termination_reason,
        status_time: row.state_time.0,
        created_at: row.created_at.0,
        key: row.key.name.to_string(),
        namespace: row.key.namespace,
        id: row.id,
        cluster: row.cluster,
        drone: row.drone,
    }
}

/// `GET /ctrl/dashboard/state[?limit=N][&status=S]`.
#[utoipa::path(get, path = "/ctrl/dashboard/state", tag = "ctrl", params(("limit" = Option<u32>, Query, description = "Most backends listed (default 200, at most 1000)"), ("status" = Option<BackendStatus>, Query, description = "Only backends in this status")), responses((status = 200, description = "Clusters and recent backends", body = DashboardState)))]
pub async fn dashboard_state_get(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<DashboardState>, ApiError> {
    let filter = parse_filter(query.as_deref())?;
    let store = &state.store;
    let now: Millis = store
        .now()
        .await
        .map_err(ApiError::store("Database error"))?;
    let names = store
        .active_clusters(MAX_CLUSTERS)
        .await
        .map_err(ApiError::store("Database error"))?;
    let mut clusters = Vec::with_capacity(names.len());
    for name in names {
        let cluster = store
            .cluster_state(&name)
            .await
            .map_err(ApiError::store("Database error"))?;
        clusters.push(DashboardCluster {
            name,
            drones: cluster.drones,
            proxies: cluster.proxies,
        });
    }
    let rows = store
        .recent_backends(filter.status, filter.limit)
        .await
        .map_err(ApiError::store("Database error"))?;
    let backends = rows
        .into_iter()
        .map(|row| backend_entry(&state, row))
        .collect();
    let warm_pools = store
        .warm_pools()
        .await
        .map_err(ApiError::store("Database error"))?
        .into_iter()
        .map(|p| p.api)
        .collect();
    Ok(Json(DashboardState {
        time: now.0,
        clusters,
        backends,
        limit: filter.limit,
        warm_pools,
    }))
}

fn static_asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: the controller's front door leads to the dashboard.
pub async fn root_get() -> Redirect {
    Redirect::to("/dashboard")
}

/// `GET /dashboard`: the page (public; the data it shows comes from the `/ctrl` route above).
pub async fn dashboard_page_get() -> Response {
    static_asset("text/html; charset=utf-8", PAGE_HTML)
}

/// `GET /dashboard/dashboard.js`.
pub async fn dashboard_script_get() -> Response {
    static_asset("text/javascript; charset=utf-8", PAGE_JS)
}

/// `GET /dashboard/dashboard.css`.
pub async fn dashboard_style_get() -> Response {
    static_asset("text/css; charset=utf-8", PAGE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_defaults_caps_and_rejects() {
        assert_eq!(
            parse_filter(None).unwrap(),
            BackendFilter {
                limit: DEFAULT_BACKEND_LIMIT,
                status: None
            }
        );
        let f = parse_filter(Some("limit=5000&status=ready&_=17")).unwrap();
        assert_eq!(f.limit, MAX_BACKEND_LIMIT);
        assert_eq!(f.status, Some(BackendStatus::Ready));
        assert_eq!(
            parse_filter(Some("status=hard-terminating"))
                .unwrap()
                .status,
            Some(BackendStatus::HardTerminating)
        );
        assert_eq!(parse_filter(Some("status=")).unwrap().status, None);
        for bad in ["limit=0", "limit=-1", "limit=x", "status=sleeping"] {
            assert!(
                matches!(parse_filter(Some(bad)), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_loads_its_assets_relative_to_itself() {
        assert!(PAGE_HTML.contains(r#"src="dashboard/dashboard.js""#));
        assert!(PAGE_HTML.contains(r#"href="dashboard/dashboard.css""#));
        assert!(
            !PAGE_JS.contains("innerHTML"),
            "the script must not build HTML"
        );
    }
}
