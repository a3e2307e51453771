//! Hangar's routing proxy. End users reach a backend at `http://<cluster>/<token>/<path>`; the proxy
//! resolves the token to a route through its controller session (caching routes, coalescing
//! concurrent lookups, waiting while a backend starts), checks the host against the route's cluster and
//! subdomain, forwards HTTP and WebSocket traffic with `x-verified-*` headers, and reports activity as
//! keepalives so the controller can stop idle backends.
//!
//! It defends itself against its clients: limits on connections, request heads and bodies,
//! timeouts for slow and idle clients, and no panic on any input (see `server.rs`, `service.rs`).
//! On shutdown it stops accepting, lets in-flight requests finish, then closes WebSocket tunnels
//! with a close frame (1001) on a frame boundary (see `upgrade.rs`).
//!
//! Boundary: the proxy talks to the controller only through `hangar-client`'s node session, never to
//! the store; it makes no decisions about backends beyond forwarding.
//!
//! Not here yet: TLS and ACME (Plane §7.9–7.10).

mod activity;
mod body_limit;
mod config;
mod connection_tracker;
mod error;
mod headers;
mod route_cache;
mod server;
mod service;
mod session;
mod upgrade;
mod ws_frames;

pub use config::{
    ConfigError, ProxyConfig, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_ROUTE_WAIT_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT, MAX_DURATION, MIN_MAX_HEADER_BYTES,
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
use tokio::sync::{watch, Notify, Semaphore};
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
    /// One permit per open client connection (tunnels keep theirs); `max_connections` in all.
    connection_slots: Arc<Semaphore>,
    /// Shutdown, after the grace period: WebSocket tunnels send close frames and end.
    going_away: CancellationToken,
    /// Hard stop: ends the session, the keepalive visits, connections and tunnels.
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// The tunnels among `tasks`, so shutdown can wait for them to close before ending the
    /// session (their last keepalives still go out).
    tunnels: TaskTracker,
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

    let config_max_connections = config.max_connections;
    let cancel = CancellationToken::new();
    let drain = cancel.child_token();
    let going_away = cancel.child_token();
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
        connection_slots: Arc::new(Semaphore::new(config_max_connections)),
        going_away: going_away.clone(),
        cancel: cancel.clone(),
        tasks: tasks.clone(),
        tunnels: TaskTracker::new(),
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
        monitor: ProxyMonitor { state },
        cancel,
        drain,
        going_away,
        tasks,
        accept: Some(accept),
    })
}

/// A read-only view of a proxy's connections that stays usable while (and after) the proxy shuts
/// down. Cheap to clone.
#[derive(Clone)]
pub struct ProxyMonitor {
    state: Arc<ProxyState>,
}

impl ProxyMonitor {
    /// Open connections and recent activity of `backend` as the keepalive logic sees them; `None`
    /// when the proxy does not track the backend (no traffic for a keepalive interval, or removed).
    pub fn connection_counts(&self, backend: &BackendId) -> Option<ConnectionCounts> {
        self.state.tracker.counts(backend)
    }

    /// Open client connections, including upgraded (WebSocket) ones; at most `max_connections`.
    pub fn open_client_connections(&self) -> usize {
        self.state
            .config
            .max_connections
            .saturating_sub(self.state.connection_slots.available_permits())
    }

    /// Running WebSocket (upgraded) tunnels.
    pub fn open_tunnels(&self) -> usize {
        self.state.tunnels.len()
    }
}

/// A running proxy. Dropping it without [`ProxyHandle::shutdown`] stops everything at once.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    monitor: ProxyMonitor,
    cancel: CancellationToken,
    /// Graceful stop: stop accepting and let in-flight exchanges finish.
    drain: CancellationToken,
    /// After the drain: close WebSocket tunnels with a close frame.
    going_away: CancellationToken,
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
        &self.monitor.state.config.name
    }

    /// Whether the proxy currently holds a controller connection (what `/ready` reports).
    pub fn is_ready(&self) -> bool {
        self.monitor.state.is_connected()
    }

    /// See [`ProxyMonitor::connection_counts`].
    pub fn connection_counts(&self, backend: &BackendId) -> Option<ConnectionCounts> {
        self.monitor.connection_counts(backend)
    }

    /// See [`ProxyMonitor::open_client_connections`].
    pub fn open_client_connections(&self) -> usize {
        self.monitor.open_client_connections()
    }

    /// See [`ProxyMonitor::open_tunnels`].
    pub fn open_tunnels(&self) -> usize {
        self.monitor.open_tunnels()
    }

    /// A view of the connections that outlives this handle (e.g. to watch a shutdown).
    pub fn monitor(&self) -> ProxyMonitor {
        self.monitor.clone()
    }

    /// Number of requests currently waiting for their route (e.g. for a starting backend).
    pub fn waiting_requests(&self) -> usize {
        self.monitor.state.route_cache.waiting_requests()
    }

    /// Stops accepting connections and lets in-flight HTTP exchanges finish for up to
    /// `shutdown_grace`; then sends each WebSocket client (and backend) a close frame with status
    /// 1001 (going away) at a frame boundary and closes the tunnels; then drops whatever is left and
    /// ends the controller session.
    pub async fn shutdown(mut self) {
        tracing::info!("Proxy shutting down");
        self.drain.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        self.going_away.cancel();
        let tunnels = &self.monitor.state.tunnels;
        tunnels.close();
        // Each tunnel bounds its own goodbye; this bound only guards against a bug there.
        let bound = upgrade::GOING_AWAY_WAIT * 2;
        if tokio::time::timeout(bound, tunnels.wait()).await.is_err() {
            tracing::warn!(
                open = tunnels.len(),
                "Tunnels still open after closing them; dropping them"
            );
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
