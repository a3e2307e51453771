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
//! TLS (Plane §7.9–7.11): given an HTTPS listener ([`start_with_listeners`]) it serves the same
//! pipeline over TLS (ALPN `h2` and `http/1.1`) with one certificate for `<cluster>` and
//! `*.<cluster>` (`tls.rs`), taken from a certificate file that is reloaded when it changes
//! (`cert_file.rs`), from its own ACME orders (`acme.rs`, coordinated across the cluster's proxies by
//! the controller's certificate lease) or from the controller (another proxy's order). The HTTP port
//! then redirects to HTTPS and answers ACME HTTP-01 challenges and `/ready` (`redirect.rs`). Unlike
//! Plane, both listeners serve from the start: until there is a certificate TLS handshakes fail, and the
//! HTTP port can already answer the HTTP-01 challenges that get the first one.
//!
//! Boundary: the proxy talks to the controller only through `hangar-client`'s node session, never to
//! the store; it makes no decisions about backends beyond forwarding.

mod acme;
mod activity;
mod body_limit;
mod cert_file;
mod cert_link;
mod config;
mod connection_tracker;
mod error;
mod headers;
mod prometheus;
mod redirect;
mod route_cache;
mod server;
mod service;
mod session;
mod signal;
mod tls;
mod upgrade;
mod upstream;
mod workers;
mod ws_frames;

pub use acme::{
    AcmeChallenge, AcmeConfig, AcmeConfigError, EabConfig, DEFAULT_CHALLENGE_WAIT,
    DEFAULT_CHECK_INTERVAL, DEFAULT_LEASE_RETRY, DEFAULT_ORDER_TIMEOUT, DEFAULT_RETRY_INITIAL,
    DEFAULT_RETRY_MAX,
};
pub use cert_file::CertFileError;
pub use tls::{CertError, CertPem, CertSource, CertificateInfo};

pub use config::{
    ConfigError, ProxyConfig, DEFAULT_CERT_RELOAD_INTERVAL, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_RENEW_BEFORE, DEFAULT_ROUTE_WAIT_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_UPSTREAM_CONNECT_TIMEOUT, MAX_DURATION, MAX_WORKERS,
    MIN_MAX_HEADER_BYTES,
};
pub use connection_tracker::ConnectionCounts;
pub use headers::{server_header_value, X_HANGAR_BACKEND_ID, X_PLANE_BACKEND_ID};

use anyhow::Context;
use cert_file::CertFiles;
use cert_link::CertLink;
use connection_tracker::ConnectionTracker;
use hangar_client::ControllerClient;
use hangar_types::{BackendId, ProxyName};
use http::HeaderValue;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use route_cache::RouteCache;
use server::ListenerKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tls::TlsState;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound for each async unit test (virtual time in tests with paused time).
#[cfg(test)]
pub(crate) const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs an async unit test, failing it after [`TEST_TIMEOUT`].
#[cfg(test)]
pub(crate) async fn with_test_timeout<T>(test: impl std::future::Future<Output = T>) -> T {
    hangar_test_support::with_timeout(TEST_TIMEOUT, test).await
}

/// Everything the accept loop, the request pipeline and the controller session share.
pub(crate) struct ProxyState {
    config: ProxyConfig,
    route_cache: RouteCache,
    tracker: Arc<ConnectionTracker>,
    /// Wakes the session's sender when route requests or keepalives are queued.
    outbound: Arc<Notify>,
    /// Whether a controller connection is up; lookups watch it to give up when it stays down.
    connected: watch::Sender<bool>,
    upstream: upstream::Upstream,
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
    /// The served certificate and the ACME HTTP-01 answers.
    tls: TlsState,
    /// Certificate messages to and answers from the controller.
    cert_link: CertLink,
    /// ACME orders this proxy created (each one after winning the cluster's certificate lease).
    acme_orders: AtomicU64,
    /// ACME attempts that failed (each followed by a backoff wait).
    acme_failures: AtomicU64,
    /// Changes of the certificate file that could not be loaded.
    cert_file_errors: AtomicU64,
    /// The Prometheus series (served on the metrics listener, if any).
    metrics: prometheus::ProxyMetrics,
    /// Client connections each worker accepted (`workers.rs`), indexed by worker.
    accepted_per_worker: Box<[AtomicU64]>,
}

impl ProxyState {
    fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    fn set_connected(&self, connected: bool) {
        self.connected.send_replace(connected);
    }
}

/// The listeners of a proxy, bound by the caller (tests use port 0).
pub struct ProxyListeners {
    /// The HTTP port. Without `https` it serves the proxy; with it, redirects to HTTPS (and ACME
    /// HTTP-01 answers and `/ready`).
    pub http: TcpListener,
    /// The HTTPS port: the proxy over TLS.
    pub https: Option<TcpListener>,
}

/// Starts the proxy on `listener` (bind it first; tests use port 0) and its controller session,
/// HTTP only.
pub async fn start(config: ProxyConfig, listener: TcpListener) -> anyhow::Result<ProxyHandle> {
    start_with_listeners(
        config,
        ProxyListeners {
            http: listener,
            https: None,
        },
    )
    .await
}

/// Starts the proxy on `listeners` and its controller session; with an HTTPS listener also the
/// certificate sources: the certificate file (loaded now; without ACME a missing or bad file is an
/// error) and its watch, and the ACME loop.
pub async fn start_with_listeners(
    config: ProxyConfig,
    listeners: ProxyListeners,
) -> anyhow::Result<ProxyHandle> {
    config.validate().context("invalid proxy configuration")?;
    let client =
        ControllerClient::new(config.controller_url.clone()).context("invalid controller URL")?;
    let local_addr = listeners
        .http
        .local_addr()
        .context("proxy listener has no local address")?;
    let https_addr = match &listeners.https {
        Some(https) => Some(
            https
                .local_addr()
                .context("HTTPS listener has no local address")?,
        ),
        None => None,
    };

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.upstream_connect_timeout));
    connector.set_nodelay(true);

    let config_max_connections = config.max_connections;
    let worker_count = workers::worker_count(config.workers);
    let cancel = CancellationToken::new();
    let drain = cancel.child_token();
    let going_away = cancel.child_token();
    let tasks = TaskTracker::new();
    let upstream = upstream::Upstream {
        // The timer lets the pool close idle upstream connections (after 90 s by default).
        pool: Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector),
        connect_timeout: config.upstream_connect_timeout,
    };
    let outbound = Arc::new(Notify::new());
    let tracker = Arc::new(ConnectionTracker::new(outbound.clone()));
    let metrics_listener = hangar_client::metrics_listener::bind(config.metrics_addr).await?;
    let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);
    let metrics = prometheus::ProxyMetrics::new();
    let state = Arc::new(ProxyState {
        config,
        route_cache: RouteCache::new(outbound.clone())
            .with_counters(metrics.route_cache_counters()),
        tracker: tracker.clone(),
        outbound: outbound.clone(),
        connected: watch::Sender::new(false),
        upstream,
        server_header: server_header_value(),
        connection_slots: Arc::new(Semaphore::new(config_max_connections)),
        going_away: going_away.clone(),
        cancel: cancel.clone(),
        tasks: tasks.clone(),
        tunnels: TaskTracker::new(),
        tls: TlsState::new(),
        cert_link: CertLink::new(outbound),
        acme_orders: AtomicU64::new(0),
        acme_failures: AtomicU64::new(0),
        cert_file_errors: AtomicU64::new(0),
        metrics,
        accepted_per_worker: (0..worker_count).map(|_| AtomicU64::new(0)).collect(),
    });
    let https_kind = match &listeners.https {
        Some(_) => Some(start_tls(&state, &cancel).await?),
        None => {
            if state.config.cert_path.is_some() || state.config.acme.is_some() {
                tracing::warn!("A certificate source is configured but there is no HTTPS listener; it is not used");
            }
            None
        }
    };

    tasks.spawn(session::run_session(state.clone(), client, cancel.clone()));
    tasks.spawn(tracker.run_keepalive_visits(cancel.clone()));
    tasks.spawn(session::run_lease_expiry(state.clone(), cancel.clone()));
    if let Some((listener, _)) = metrics_listener {
        tasks.spawn(prometheus::run_metrics_listener(
            listener,
            state.clone(),
            cancel.clone(),
        ));
    }
    let http_kind = match https_kind {
        Some(_) => ListenerKind::Redirect,
        None => ListenerKind::Http,
    };
    let mut served = vec![(listeners.http, http_kind)];
    if let (Some(https), Some(kind)) = (listeners.https, https_kind) {
        served.push((https, kind));
    }
    let worker_handles = match workers::start_workers(&state, served, worker_count, &drain) {
        Ok(handles) => handles,
        Err(error) => {
            // Stops what was started above, workers included.
            cancel.cancel();
            return Err(error);
        }
    };
    tracing::info!(%local_addr, ?https_addr, workers = worker_count, name = %state.config.name, cluster = %state.config.cluster, "Proxy started");
    if let Some(addr) = metrics_addr {
        tracing::info!(%addr, "Proxy metrics at http://{addr}/metrics");
    }
    Ok(ProxyHandle {
        local_addr,
        https_addr,
        metrics_addr,
        monitor: ProxyMonitor { state },
        cancel,
        drain,
        going_away,
        tasks,
        workers: worker_handles,
    })
}

/// Loads the certificate file and starts its watch and the ACME loop; returns the HTTPS listener
/// kind.
async fn start_tls(
    state: &Arc<ProxyState>,
    cancel: &CancellationToken,
) -> anyhow::Result<ListenerKind> {
    let config = &state.config;
    let files = config.cert_path.as_ref().map(|cert_path| CertFiles {
        cert_path: cert_path.clone(),
        key_path: config.key_path.clone(),
    });
    if let Some(files) = &files {
        let path = files.cert_path.display();
        let loaded = if files.exists().await || config.acme.is_none() {
            Some(cert_file::load_and_install(state, files).await)
        } else {
            None
        };
        match loaded {
            Some(Ok(_)) => {}
            Some(Err(error)) if config.acme.is_some() => tracing::error!(
                %path,
                error = format!("{error:#}"),
                "Cannot load the certificate file; ACME will obtain a certificate"
            ),
            Some(Err(error)) => {
                return Err(error.context(format!("cannot load the certificate file {path}")))
            }
            None => {
                tracing::info!(%path, "No certificate file yet; ACME will obtain a certificate")
            }
        }
        state.tasks.spawn(cert_file::run_cert_file_watch(
            state.clone(),
            files.clone(),
            config.cert_reload_interval,
            cancel.clone(),
        ));
    } else if config.acme.is_none() {
        tracing::warn!(
            "HTTPS without a certificate file or ACME: serving the cluster certificate another proxy stores at the controller, once there is one"
        );
    }
    if let Some(acme) = &config.acme {
        state.tasks.spawn(acme::run_acme(
            state.clone(),
            acme.clone(),
            files,
            cancel.clone(),
        ));
    }
    let tls_config = tls::server_config(state.tls.resolver()).context("cannot configure TLS")?;
    Ok(ListenerKind::Https(tokio_rustls::TlsAcceptor::from(
        tls_config,
    )))
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

    /// Client connections accepted so far by each connection worker (one entry per worker).
    pub fn accepted_per_worker(&self) -> Vec<u64> {
        let accepted = &self.state.accepted_per_worker;
        accepted.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// Running WebSocket (upgraded) tunnels.
    pub fn open_tunnels(&self) -> usize {
        self.state.tunnels.len()
    }

    /// The certificate served on the HTTPS port, if there is one.
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.state.tls.current().map(|c| c.info().clone())
    }

    /// ACME orders this proxy has created (it creates one only while holding the cluster's
    /// certificate lease).
    pub fn acme_orders(&self) -> u64 {
        self.state.acme_orders.load(Ordering::Relaxed)
    }

    /// ACME attempts that failed: the reason is logged, the served certificate stays, and the next
    /// attempt waits longer (`retry_initial` doubling up to `retry_max`).
    pub fn acme_failures(&self) -> u64 {
        self.state.acme_failures.load(Ordering::Relaxed)
    }

    /// How many times the certificate file changed on disk but could not be loaded (the served
    /// certificate stayed the same each time).
    pub fn certificate_file_errors(&self) -> u64 {
        self.state.cert_file_errors.load(Ordering::Relaxed)
    }
}

/// A running proxy. Dropping it without [`ProxyHandle::shutdown`] stops everything at once.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    monitor: ProxyMonitor,
    cancel: CancellationToken,
    /// Graceful stop: stop accepting and let in-flight exchanges finish.
    drain: CancellationToken,
    /// After the drain: close WebSocket tunnels with a close frame.
    going_away: CancellationToken,
    tasks: TaskTracker,
    /// The connection workers (`workers.rs`).
    workers: Vec<workers::WorkerHandle>,
}

impl ProxyHandle {
    /// The address of the HTTP listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTPS listener, if the proxy has one.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The address of the metrics listener (`GET /metrics`), if `metrics_addr` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// See [`ProxyMonitor::certificate`].
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.monitor.certificate()
    }

    /// See [`ProxyMonitor::acme_orders`].
    pub fn acme_orders(&self) -> u64 {
        self.monitor.acme_orders()
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
        for worker in &mut self.workers {
            worker.drained().await;
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
        for worker in self.workers.drain(..) {
            worker.exited().await;
        }
        tracing::info!("Proxy stopped");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
