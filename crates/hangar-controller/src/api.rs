//! The controller's HTTP API: Plane's route table (plane-api.md §2.2) plus `/ctrl/revoke` and the
//! operator routes Plane has only in `db-cli` (`mark-lost`, `prevent-renew`,
//! `termination-candidates`, `events`). `/ctrl/*` is
//! the trusted group (optionally behind a bearer token and Plane's forward auth, node sockets
//! included); `/pub/*` is public and carries a CORS layer. Handlers live in `api/`, named `<resource>_<verb>`.
//! Every `/ctrl` and `/pub` route is documented in the OpenAPI document (`api/openapi.rs`; a test
//! fails when a route is missing from it): give a new handler its `#[utoipa::path]` and list it there.

mod auth;
mod backend_views;
mod backends;
mod dashboard;
mod extract;
pub mod forward_auth;
mod logs;
mod nodes;
mod openapi;
mod operator;
mod system;
mod warm_pools;

use crate::config::{ConfigError, ControllerConfig};
use crate::error::ApiError;
use crate::executor_errors::ExecutorErrors;
use crate::metrics::LatestMetrics;
use crate::prometheus::ControllerMetrics;
use axum::http::{header, Method};
use axum::routing::{get, post};
use axum::Router;
use hangar_store::Store;
use hangar_types::BackendId;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{Any, CorsLayer};
use url::Url;

pub use extract::{ApiJson, ApiPath};
pub(crate) use logs::unreachable_message as logs_unreachable_message;

/// Everything handlers and node sessions share. Cheap to clone: one reference count. (axum clones
/// the state for every request, in every middleware and handler service; cloning the fields one by
/// one cost a dozen shared counter updates and a cancellation-token lock each time, 3 % of a
/// reconnect's CPU. BENCHMARKS.md, "Reconnect: the controller's state cloned per request".)
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

/// What [`AppState`] shares.
pub struct SharedState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Arc<ControllerConfig>,
    /// `<base>/pub/b/`, where the base is the configured `controller_url` or `http://<local addr>`
    /// (see [`AppState::status_url`]).
    status_url_prefix: String,
    /// Cancelled on shutdown; node sessions and status streams end when it fires.
    pub(crate) cancel: CancellationToken,
    /// Tracks node sessions, status streams and route waits so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Latest CPU/memory sample of each backend whose drone is connected here (memory only).
    pub(crate) metrics: LatestMetrics,
    /// This process's Prometheus series (`GET /metrics`).
    pub(crate) prometheus: Arc<ControllerMetrics>,
    /// The auth service asked before `/ctrl`, dashboard and metrics requests (`forward_auth`).
    pub(crate) forward_auth: Option<Arc<forward_auth::ForwardAuth>>,
    /// Executor errors reported by the drones attached here (memory only).
    pub(crate) executor_errors: ExecutorErrors,
    /// The warm pools as last read, and the fill loop's wake-up.
    pub(crate) warm: crate::warm_pool::WarmPools,
    /// Drones with a session here, for relaying log reads.
    pub(crate) drone_links: crate::log_relay::DroneLinks,
    /// Keys recently found held here: their connects read no drones in advance.
    pub(crate) held_keys: crate::held_keys::HeldKeys,
}

impl AppState {
    /// Validates `config`; `local_addr` is the listener's address (default base of `status_url`).
    pub fn new(
        config: ControllerConfig,
        store: Arc<dyn Store>,
        local_addr: SocketAddr,
    ) -> Result<AppState, ConfigError> {
        config.validate()?;
        let forward_auth = forward_auth::ForwardAuth::from_config(&config)?.map(Arc::new);
        let controller_url = match &config.controller_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{local_addr}"))
                .map_err(|e| ConfigError::InvalidControllerUrl(e.to_string()))?,
        };
        Ok(AppState(Arc::new(SharedState {
            store,
            config: Arc::new(config),
            status_url_prefix: status_url_prefix(controller_url),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics: LatestMetrics::default(),
            prometheus: Arc::new(ControllerMetrics::new()),
            forward_auth,
            executor_errors: ExecutorErrors::default(),
            warm: Default::default(),
            drone_links: Default::default(),
            held_keys: Default::default(),
        })))
    }

    /// `<controller_url>/pub/b/<id>/status`, with any path, query and user info of the base replaced.
    pub fn status_url(&self, backend: &BackendId) -> String {
        // A backend id is `[a-z0-9-]+`: nothing in it needs escaping in a path.
        format!("{}{backend}/status", self.status_url_prefix)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }
}

/// `<base>/pub/b/`, with any path, query and user info of `base` replaced.
fn status_url_prefix(mut base: Url) -> String {
    base.set_path("/pub/b/");
    base.set_query(None);
    base.set_fragment(None);
    // Only fails for URLs that cannot have credentials, which then have none to remove.
    let _ = base.set_username("");
    let _ = base.set_password(None);
    base.to_string()
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The whole HTTP surface of the controller.
pub fn router(state: AppState) -> Router {
    let ctrl = Router::new()
        .route("/ctrl/status", get(system::status_get))
        .route("/ctrl/openapi.json", get(openapi::openapi_ctrl_get))
        .route("/metrics", get(crate::prometheus::metrics_get))
        .route("/ctrl/connect", post(backends::connect_post))
        .route(
            "/ctrl/b/{backend}/soft-terminate",
            post(backends::backends_soft_terminate),
        )
        .route(
            "/ctrl/b/{backend}/hard-terminate",
            post(backends::backends_hard_terminate),
        )
        // Plane's server serves `/ctrl/b/revoke`, its client calls `/ctrl/revoke` (quirk 1): serve both.
        .route("/ctrl/b/revoke", post(backends::tokens_revoke))
        .route("/ctrl/revoke", post(backends::tokens_revoke))
        .route("/ctrl/c/{cluster}/state", get(nodes::cluster_state_get))
        .route("/ctrl/dashboard/state", get(dashboard::dashboard_state_get))
        .route("/ctrl/backends", get(backend_views::backends_list))
        .route("/ctrl/b/{backend}", get(backend_views::backends_get))
        .route(
            "/ctrl/b/{backend}/prevent-renew",
            post(backends::backends_prevent_renew),
        )
        .route(
            "/ctrl/c/{cluster}/d/{drone}/drain",
            post(nodes::drones_drain),
        )
        .route(
            "/ctrl/c/{cluster}/d/{drone}/mark-lost",
            post(nodes::drones_mark_lost),
        )
        .route(
            "/ctrl/c/{cluster}/d/{drone}/termination-candidates",
            get(operator::termination_candidates_get),
        )
        .route("/ctrl/events", get(operator::events_get))
        .route("/ctrl/warm-pools", get(warm_pools::warm_pools_list))
        .route(
            "/ctrl/warm-pools/{name}",
            get(warm_pools::warm_pools_get)
                .put(warm_pools::warm_pools_put)
                .delete(warm_pools::warm_pools_delete),
        )
        .route("/ctrl/b/{backend}/logs", get(logs::backend_logs_get))
        .route("/ctrl/b/{backend}/events", get(logs::backend_events_get))
        .route("/ctrl/dns-socket", get(nodes::dns_socket))
        .route("/ctrl/c/{cluster}/drone-socket", get(nodes::drone_socket))
        .route("/ctrl/c/{cluster}/proxy-socket", get(nodes::proxy_socket))
        // Both must pass. The bearer check is the outer layer, so it runs first: a request without
        // the bearer token is refused without a side request to the auth service.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward_auth::require_forward_auth,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_bearer,
        ));

    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE]);
    // The dashboard page has no bearer check (the page asks for the token and sends it with its
    // `/ctrl/dashboard/state` requests), but forward auth guards it as it guards `/ctrl`.
    let dashboard_page = Router::new()
        .route("/", get(dashboard::root_get))
        .route("/dashboard", get(dashboard::dashboard_page_get))
        .route(
            "/dashboard/dashboard.js",
            get(dashboard::dashboard_script_get),
        )
        .route(
            "/dashboard/dashboard.css",
            get(dashboard::dashboard_style_get),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward_auth::require_forward_auth,
        ))
        .layer(cors.clone());
    let public = Router::new()
        .route("/pub/health", get(system::health_get))
        .route("/pub/openapi.json", get(openapi::openapi_pub_get))
        .route("/pub/b/{backend}/status", get(backends::backends_status))
        .route(
            "/pub/b/{backend}/status-stream",
            get(backends::backends_status_stream),
        )
        .layer(cors);

    ctrl.merge(dashboard_page)
        .merge(public)
        .fallback(|| async { ApiError::NotFound("No such route.") })
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_url_replaces_the_bases_path_query_and_user_info() {
        for (base, prefix) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/pub/b/"),
            (
                "https://user:pw@ctl.example.com:8443/some/path/?q=1#frag",
                "https://ctl.example.com:8443/pub/b/",
            ),
        ] {
            assert_eq!(status_url_prefix(Url::parse(base).unwrap()), prefix);
        }
    }
}
