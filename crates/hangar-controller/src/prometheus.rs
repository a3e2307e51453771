//! Prometheus metrics of this controller process, served as `GET /metrics` (text format 0.0.4)
//! behind the same optional bearer token as the `/ctrl` routes.
//!
//! Owns: in-memory counters, gauges and histograms that handlers and node sessions update as things
//! happen. Per process, as Prometheus expects: with several controllers, sum over them. Must not: query
//! the store on a scrape (a scrape only reads memory; the resource gauges summarise
//! [`LatestMetrics`](crate::metrics::LatestMetrics)).
//!
//! The exception to "per process" is `hangar_backends{cluster, status}`: live backends of every
//! controller, refreshed by [`run_backend_gauges`] with one grouped count on the store every
//! [`BACKEND_GAUGES_INTERVAL`]. Counting from events seen here would miss backends of drones attached
//! to other controllers and drift after a restart; a periodic count costs one query per interval
//! whatever the scrape rate, and is always right within one interval. Every controller reports the
//! same numbers: aggregate with `max`, not `sum`. The process series (`hangar_build_info`,
//! `process_*`) come from [`hangar_process_metrics`].

use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hangar_store::{BackendCount, StoreResult, TokenLookup};
use hangar_types::api::{self, ApiErrorKind, ConnectResponse};
use hangar_types::names::random_string;
use hangar_types::ticks::every;
use hangar_types::ClusterName;
use hangar_types::{BackendStatus, TerminationKind};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One label with a fixed value.
type Label = [(&'static str, &'static str); 1];
/// One label whose value is built at run time (error kinds).
type OwnedLabel = [(&'static str, String); 1];
/// `cluster` and `status` labels.
type ClusterStatusLabels = [(&'static str, String); 2];

/// The `answer` labels of `hangar_route_lookups_total`.
const ROUTE_LOOKUP_ANSWERS: [&str; 4] = ["route", "pending", "none", "error"];

/// A connect's read of the drones for the scheduler ([`crate::connect`]), counted in
/// `hangar_connect_drone_reads_total{read}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DroneRead {
    /// Made alongside the key lookup and used by the spawn.
    AlongsideLookup,
    /// Made alongside the key lookup, but the key was held: not needed.
    Wasted,
    /// Made by the spawn itself, after the key lookup (or for a connect without a key).
    AfterLookup,
}

impl DroneRead {
    const ALL: [DroneRead; 3] = [
        DroneRead::AlongsideLookup,
        DroneRead::Wasted,
        DroneRead::AfterLookup,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DroneRead::AlongsideLookup => "alongside_lookup",
            DroneRead::Wasted => "wasted",
            DroneRead::AfterLookup => "after_lookup",
        }
    }
}

/// How often `hangar_backends` is recounted from the store.
pub const BACKEND_GAUGES_INTERVAL: Duration = Duration::from_secs(5);

/// The kinds of node session a controller holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Drone,
    Proxy,
    Dns,
}

impl NodeKind {
    fn as_str(self) -> &'static str {
        match self {
            NodeKind::Drone => "drone",
            NodeKind::Proxy => "proxy",
            NodeKind::Dns => "dns",
        }
    }
}

/// The controller's series and their registry. Shared through [`AppState`].
#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    connect_requests: Family<Label, Counter>,
    connect_errors: Family<OwnedLabel, Counter>,
    connect_duration: Histogram,
    terminate_requests: Family<Label, Counter>,
    node_sessions: Family<Label, Gauge>,
    /// `hangar_route_lookups`, by `answer`.
    route_lookups: Family<Label, Counter>,
    /// `hangar_connect_drone_reads`, by `read`.
    drone_reads: Family<Label, Counter>,
    backend_state_changes: Family<Label, Counter>,
    backends_sampled: Gauge,
    /// `hangar_backends`, by `(cluster, status)`.
    backends: Family<ClusterStatusLabels, Gauge>,
    /// Clusters seen by [`ControllerMetrics::set_backend_counts`]: their series stay (at 0) once
    /// their backends are gone.
    backend_clusters: Mutex<BTreeSet<ClusterName>>,
    backend_memory_used: Gauge,
    backend_memory_limit: Gauge,
    /// The warm pool series.
    pub warm: crate::warm_pool::WarmMetrics,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hangar");
        let metrics = ControllerMetrics {
            connect_requests: Family::default(),
            connect_errors: Family::default(),
            // 1 ms .. ~16 s: a connect is a few store transactions.
            connect_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            terminate_requests: Family::default(),
            node_sessions: Family::default(),
            route_lookups: Family::default(),
            drone_reads: Family::default(),
            backend_state_changes: Family::default(),
            backends_sampled: Gauge::default(),
            backends: Family::default(),
            backend_clusters: Mutex::default(),
            backend_memory_used: Gauge::default(),
            backend_memory_limit: Gauge::default(),
            warm: Default::default(),
            registry: Registry::default(),
        };
        // Series that exist from the start read 0 instead of being absent.
        for outcome in ["created", "reused", "error"] {
            let _ = metrics
                .connect_requests
                .get_or_create(&[("outcome", outcome)]);
        }
        for kind in [NodeKind::Drone, NodeKind::Proxy, NodeKind::Dns] {
            let _ = metrics
                .node_sessions
                .get_or_create(&[("kind", kind.as_str())]);
        }
        registry.register(
            "connect_requests",
            "Connect (get-or-create) requests by outcome: created, reused or error",
            metrics.connect_requests.clone(),
        );
        registry.register(
            "connect_errors",
            "Failed connect requests by Plane error kind",
            metrics.connect_errors.clone(),
        );
        registry.register(
            "connect_duration_seconds",
            "Time to answer a connect request",
            metrics.connect_duration.clone(),
        );
        registry.register(
            "terminate_requests",
            "Soft and hard terminate requests received on the API",
            metrics.terminate_requests.clone(),
        );
        registry.register(
            "node_sessions",
            "Node sessions (drone, proxy, dns) connected to this controller",
            metrics.node_sessions.clone(),
        );
        for answer in ROUTE_LOOKUP_ANSWERS {
            let _ = metrics.route_lookups.get_or_create(&[("answer", answer)]);
        }
        registry.register(
            "route_lookups",
            "Token lookups for proxies' route requests, by answer: route, pending (the backend is \
             not ready; looked up again once a state change may have decided it), none or error",
            metrics.route_lookups.clone(),
        );
        for read in DroneRead::ALL {
            let _ = metrics
                .drone_reads
                .get_or_create(&[("read", read.as_str())]);
        }
        registry.register(
            "connect_drone_reads",
            "Connects' reads of the drones for the scheduler: alongside_lookup (made while the key \
             was looked up, for a key not remembered as held, and used by a cold spawn), wasted \
             (made alongside, but the key was held) or after_lookup",
            metrics.drone_reads.clone(),
        );
        registry.register(
            "backend_state_changes",
            "Backend state changes reported by drones connected here and stored, by new status",
            metrics.backend_state_changes.clone(),
        );
        registry.register(
            "backends",
            "Live backends by cluster and status, in the whole store (refreshed periodically)",
            metrics.backends.clone(),
        );
        registry.register(
            "backends_sampled",
            "Backends with a resource sample from a drone connected here",
            metrics.backends_sampled.clone(),
        );
        registry.register(
            "backend_memory_used_bytes",
            "Memory in use summed over the latest samples of the sampled backends",
            metrics.backend_memory_used.clone(),
        );
        registry.register(
            "backend_memory_limit_bytes",
            "Memory limits summed over the latest samples of the sampled backends",
            metrics.backend_memory_limit.clone(),
        );
        metrics.warm.register(&mut registry);
        ControllerMetrics {
            registry,
            ..metrics
        }
    }

    /// Counts a finished connect request and its duration.
    pub fn record_connect(&self, result: &Result<ConnectResponse, ApiError>, took: Duration) {
        self.connect_duration.observe(took.as_secs_f64());
        let outcome = match result {
            Ok(response) if response.spawned => "created",
            Ok(_) => "reused",
            Err(e) => {
                let kind = format!("{:?}", e.kind());
                self.connect_errors.get_or_create(&[("kind", kind)]).inc();
                "error"
            }
        };
        self.connect_requests
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Counts one token lookup made for a proxy's route request.
    pub fn record_route_lookup(&self, lookup: &StoreResult<TokenLookup>) {
        let answer = match lookup {
            Ok(TokenLookup::Ready(_)) => "route",
            Ok(TokenLookup::Pending { .. }) => "pending",
            Ok(TokenLookup::NotFound) => "none",
            Err(_) => "error",
        };
        self.route_lookups
            .get_or_create(&[("answer", answer)])
            .inc();
    }

    /// Counts one connect's read of the drones.
    pub fn record_drone_read(&self, read: DroneRead) {
        self.drone_reads
            .get_or_create(&[("read", read.as_str())])
            .inc();
    }

    pub fn record_terminate(&self, kind: TerminationKind) {
        let kind = match kind {
            TerminationKind::Soft => "soft",
            TerminationKind::Hard => "hard",
        };
        self.terminate_requests
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// Counts a stored backend state change.
    pub fn record_state_change(&self, status: BackendStatus) {
        self.backend_state_changes
            .get_or_create(&[("status", status.as_str())])
            .inc();
    }

    /// Sets `hangar_backends` from a count of the store: every live status of every cluster seen so
    /// far gets a value (0 when absent from `counts`).
    pub fn set_backend_counts(&self, counts: &[BackendCount]) {
        let mut clusters = match self.backend_clusters.lock() {
            Ok(clusters) => clusters,
            Err(poisoned) => poisoned.into_inner(),
        };
        clusters.extend(counts.iter().map(|c| c.cluster.clone()));
        for cluster in clusters.iter() {
            // Every status but `terminated` (terminated backends are not counted).
            let live = BackendStatus::ALL
                .into_iter()
                .filter(|s| *s != BackendStatus::Terminated);
            for status in live {
                let count = counts
                    .iter()
                    .find(|c| c.cluster == *cluster && c.status == status)
                    .map_or(0, |c| c.count);
                let labels = [
                    ("cluster", cluster.to_string()),
                    ("status", status.as_str().to_string()),
                ];
                self.backends.get_or_create(&labels).set(count);
            }
        }
    }

    /// Counts a node session as connected until the returned guard is dropped.
    pub fn node_session(&self, kind: NodeKind) -> NodeSessionGuard {
        let gauge = self
            .node_sessions
            .get_or_create_owned(&[("kind", kind.as_str())]);
        gauge.inc();
        NodeSessionGuard { gauge }
    }

    /// The text exposition of every series, with the resource gauges refreshed from `state`.
    fn encode(&self, state: &AppState) -> Result<String, std::fmt::Error> {
        let totals = state.metrics.totals();
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.backends_sampled
            .set(i64::try_from(totals.backends).unwrap_or(i64::MAX));
        self.backend_memory_used.set(clamp(totals.mem_used));
        self.backend_memory_limit.set(clamp(totals.mem_limit));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        hangar_process_metrics::encode(&mut text)?;
        Ok(text)
    }
}

/// Keeps one node session counted in `hangar_node_sessions`.
#[derive(Debug)]
pub struct NodeSessionGuard {
    gauge: Gauge,
}

impl Drop for NodeSessionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Recounts `hangar_backends` from the store now and every [`BACKEND_GAUGES_INTERVAL`]. A failed
/// count keeps the previous values (logged).
pub async fn run_backend_gauges(state: AppState, cancel: CancellationToken) {
    let mut ticks = every(BACKEND_GAUGES_INTERVAL, &cancel);
    while ticks.next().await {
        match state.store.live_backend_counts().await {
            Ok(counts) => state.prometheus.set_backend_counts(&counts),
            Err(e) => tracing::warn!(error = %e, "Failed to count backends for metrics"),
        }
    }
}

/// `GET /metrics`.
pub async fn metrics_get(State(state): State<AppState>) -> Response {
    match state.prometheus.encode(&state) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        // Writing to a String does not fail; answered in Plane's shape all the same.
        Err(e) => {
            let id = random_string();
            tracing::error!(error_id = %id, error = %e, "Failed to encode metrics");
            let body = api::ApiError {
                id,
                kind: ApiErrorKind::Other,
                message: "Failed to encode metrics.".into(),
            };
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}
