//! The Hangar controller: the only component with a store. It serves the HTTP API (Plane's routes and
//! JSON shapes), decides get-or-create and placement, holds the WebSocket sessions of drones, proxies
//! and ACME DNS responders, enforces idle and lifetime limits, records backends of vanished drones as
//! lost, coordinates the proxies' certificates, cleans up old rows, and streams backend status.
//!
//! Boundary: depends on `hangar-store` and `hangar-types` only; it never depends on the drone or the
//! proxy crates. All shared time decisions use the store clock.
//!
//! Entry point: [`start`] returns a [`ControllerHandle`]; [`router`] gives the bare HTTP surface for
//! handler tests.

pub mod api;
pub mod cert;
pub mod cleanup;
pub mod config;
pub mod connect;
mod dns_session;
pub mod drone_session;
pub mod error;
pub mod executor_errors;
pub mod held_keys;
mod listener;
pub mod log_relay;
pub mod lost;
mod maintenance;
pub mod metrics;
mod node_socket;
pub mod prometheus;
pub mod proxy_session;
pub mod scheduler;
mod status_stream;
pub mod sweeper;
pub mod warm_pool;

pub use api::{router, AppState};
pub use config::{ConfigError, ControllerConfig};
pub use error::ApiError;

use anyhow::Context;
use hangar_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

/// A running controller.
pub struct ControllerHandle {
    local_addr: SocketAddr,
    url: Url,
    state: AppState,
    server: tokio::task::JoinHandle<()>,
}

impl ControllerHandle {
    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<local addr>/` — where nodes and clients on this machine reach the API.
    pub fn url(&self) -> Url {
        self.url.clone()
    }

    /// Stops accepting, ends node sessions and status streams, marks the controller offline and waits
    /// for every task.
    pub async fn shutdown(self) {
        self.state.cancel.cancel();
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "Controller server task panicked");
        }
        self.state.tracker.close();
        self.state.tracker.wait().await;
        tracing::info!(controller = %self.state.config.name, "Controller stopped");
    }
}

/// Serves `app` on `listener` with the connection limits of `config` (request-head timeout, idle
/// timeout, connection cap, header size) until `cancel` fires, as the controller's own API listener
/// does. For answering on the controller's port before the controller runs (the `503` of a controller
/// waiting for its database), so that no listener of the process is without limits.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: axum::Router,
    config: &ControllerConfig,
    cancel: CancellationToken,
) {
    let limits = listener::ListenerLimits::from_config(config);
    listener::run_api_listener(listener, app, limits, cancel).await;
}

/// Starts the controller on an already-bound `listener`: records its heartbeat, then serves the API
/// and runs its background loops until [`ControllerHandle::shutdown`].
pub async fn start(
    config: ControllerConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
) -> anyhow::Result<ControllerHandle> {
    let local_addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    let state = AppState::new(config, store, local_addr).context("invalid controller config")?;
    let name = state.config.name.clone();
    // Be schedulable from the first request on: drones attached to us need a live controller heartbeat.
    state
        .store
        .controller_heartbeat(&name, true)
        .await
        .context("recording the controller's first heartbeat")?;

    let internal_url = match &state.config.internal_url {
        Some(url) => url.to_string(),
        None => format!("http://{local_addr}/"),
    };
    state
        .store
        .set_controller_url(&name, &internal_url)
        .await
        .context("recording the controller's internal URL")?;
    state.tracker.spawn(maintenance::run_controller_heartbeat(
        state.store.clone(),
        name.clone(),
        state.cancel.child_token(),
    ));
    let cleanup_policy = cleanup::CleanupPolicy::new(
        state.config.cleanup_min_age_days,
        state.config.cleanup_interval,
    );
    state.tracker.spawn(cleanup::run_cleanup(
        state.store.clone(),
        cleanup_policy,
        state.cancel.child_token(),
    ));
    state.tracker.spawn(lost::run_lost_backend_sweep(
        state.store.clone(),
        state.cancel.child_token(),
    ));
    state.tracker.spawn(prometheus::run_backend_gauges(
        state.clone(),
        state.cancel.child_token(),
    ));

    state.tracker.spawn(warm_pool::run_warm_pools(
        state.clone(),
        state.cancel.child_token(),
    ));

    let app = router(state.clone());
    let cancel = state.cancel.clone();
    let limits = listener::ListenerLimits::from_config(&state.config);
    let server = tokio::spawn(listener::run_api_listener(listener, app, limits, cancel));
    let url = Url::parse(&format!("http://{local_addr}/")).context("building the local URL")?;
    tracing::info!(controller = %name, %local_addr, "Controller listening");
    Ok(ControllerHandle {
        local_addr,
        url,
        state,
        server,
    })
}
