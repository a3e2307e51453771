//! Hangar's routing proxy. End users reach a backend at `http://<cluster>/<token>/<path>`; the proxy
//! resolves the token to a route through its controller session (caching routes, coalescing
//! concurrent lookups, waiting while a backend starts), checks the host against the route's cluster and
//! subdomain, forwards HTTP and WebSocket traffic with `x-verified-*` headers, and reports activity as
//! keepalives so the controller can stop idle backends.
//!
//! Boundary: the proxy talks to the controller only through `hangar-client`'s node session, never to
//! the store; it makes no decisions about backends beyond forwarding.
//!
//! Not here yet: TLS and ACME (Plane §7.9–7.10).

mod config;
mod connection_tracker;
mod error;
mod headers;
mod route_cache;
mod server;
mod service;
mod session;
mod upgrade;

pub use config::{
    ConfigError, ProxyConfig, DEFAULT_ROUTE_WAIT_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
};
pub use connection_tracker::ConnectionCounts;
pub use headers::{server_header_value, X_HANGAR_BACKEND_ID, X_PLANE_BACKEND_ID};

use anyhow::Context;
use connection_tracker::ConnectionTracker;
use error::ProxyBody;
use hangar_client::ControllerClient;
use hangar_types::{BackendId, ProxyName};
use http::HeaderValue;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use route_cache::RouteCache;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound for each async unit test (virtual time in tests with paused time).
#[cfg(test)]
pub(crate) const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything the accept loop, the request pipeline and the controller session share.
pub(crate) struct ProxyState {
    config: ProxyConfig,
    route_cache: RouteCache,
    tracker: Arc<ConnectionTracker>,
    /// Wakes the session's sender when route requests or keepalives are queued.
    outbound: Arc<Notify>,
    /// Whether a controller connection is up; lookups watch it to give up when it stays down.
    connected: watch::Sender<bool>,
    upstream: Client<HttpConnector, ProxyBody>,
    server_header: HeaderValue,
    /// Hard stop: ends the session, the keepalive visits, connections and tunnels.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl ProxyState {
    fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    fn set_connected(&self, connected: bool) {
        self.connected.send_replace(connected);
    }
}

/// Starts the proxy on `listener` (bind it first; tests use port 0) and its controller session.
pub async fn start(config: ProxyConfig, listener: TcpListener) -> anyhow::Result<ProxyHandle> {
    config.validate().context("invalid proxy configuration")?;
    let client =
        ControllerClient::new(config.controller_url.clone()).context("invalid controller URL")?;
    let local_addr = listener
        .local_addr()
        .context("proxy listener has no local address")?;

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.upstream_connect_timeout));
    connector.set_nodelay(true);
    // The timer lets the pool close idle upstream connections (after 90 s by default).
    let upstream = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(connector);

    let cancel = CancellationToken::new();
    let drain = cancel.child_token();
    let tasks = TaskTracker::new();
    let outbound = Arc::new(Notify::new());
    let tracker = Arc::new(ConnectionTracker::new(outbound.clone()));
    let state = Arc::new(ProxyState {
        config,
        route_cache: RouteCache::new(outbound.clone()),
        tracker: tracker.clone(),
        outbound,
        connected: watch::Sender::new(false),
        upstream,
        server_header: server_header_value(),
        cancel: cancel.clone(),
        tasks: tasks.clone(),
    });

    tasks.spawn(session::run_session(state.clone(), client, cancel.clone()));
    tasks.spawn(tracker.run_keepalive_visits(cancel.clone()));
    let accept = tasks.spawn(server::run_accept_loop(
        listener,
        state.clone(),
        drain.clone(),
    ));
    tracing::info!(%local_addr, name = %state.config.name, cluster = %state.config.cluster, "Proxy started");
    Ok(ProxyHandle {
        local_addr,
        state,
        cancel,
        drain,
        tasks,
        accept: Some(accept),
    })
}

/// A running proxy. Dropping it without [`ProxyHandle::shutdown`] stops everything at once.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    state: Arc<ProxyState>,
    cancel: CancellationToken,
    /// Graceful stop: stop accepting and let in-flight exchanges finish.
    drain: CancellationToken,
    tasks: TaskTracker,
    accept: Option<JoinHandle<()>>,
}

impl ProxyHandle {
    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This proxy's node name.
    pub fn name(&self) -> &ProxyName {
        &self.state.config.name
    }

    /// Whether the proxy currently holds a controller connection (what `/ready` reports).
    pub fn is_ready(&self) -> bool {
        self.state.is_connected()
    }

    /// Open connections and recent activity of `backend` as the keepalive logic sees them; `None`
    /// when the proxy does not track the backend (no traffic for a keepalive interval, or removed).
    pub fn connection_counts(&self, backend: &BackendId) -> Option<ConnectionCounts> {
        self.state.tracker.counts(backend)
    }

    /// Number of requests currently waiting for their route (e.g. for a starting backend).
    pub fn waiting_requests(&self) -> usize {
        self.state.route_cache.waiting_requests()
    }

    /// Stops accepting connections, lets in-flight HTTP exchanges finish for up to
    /// `shutdown_grace`, then closes everything that is left (including WebSocket tunnels) and ends
    /// the controller session.
    pub async fn shutdown(mut self) {
        tracing::info!("Proxy shutting down");
        self.drain.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        tracing::info!("Proxy stopped");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
