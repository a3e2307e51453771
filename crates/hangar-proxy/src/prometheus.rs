//! The proxy's Prometheus metrics, served as `GET /metrics` (text format 0.0.4) on a separate,
//! optional listener (`metrics_addr`): the public proxy port never serves them, since end users reach
//! it (there `/metrics` is just a token path).
//!
//! Owns: the series and their registry, and what a scrape reads (the listener itself is
//! [`hangar_client::metrics_listener`]). Hot-path updates are atomic
//! increments on counters fetched once at start (no map lookup or lock per request); the connection
//! and tunnel gauges are read from the proxy's own bookkeeping at scrape time.

use crate::ProxyState;
use hangar_client::metrics_listener;
use http::StatusCode;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One label with a fixed value.
type Label = [(&'static str, &'static str); 1];

/// What a route lookup found in the cache.
#[derive(Clone, Debug, Default)]
pub(crate) struct RouteCacheCounters {
    /// Answered from the cache.
    pub(crate) hit: Counter,
    /// Not cached: this lookup asked the controller.
    pub(crate) miss: Counter,
    /// Not cached, but another request was already asking: this one waited for that answer.
    pub(crate) coalesced: Counter,
}

/// The proxy's series and their registry.
#[derive(Debug)]
pub(crate) struct ProxyMetrics {
    registry: Registry,
    /// By status class: index 0 is `1xx`, …, 4 is `5xx`.
    requests: [Counter; 5],
    request_duration: Histogram,
    open_connections: Gauge,
    websockets_open: Gauge,
    route_cache: RouteCacheCounters,
    upstream_errors: Counter,
}

const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl ProxyMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("hangar_proxy");
        let requests_family = Family::<Label, Counter>::default();
        let requests =
            CODE_CLASSES.map(|class| requests_family.get_or_create_owned(&[("code_class", class)]));
        let route_family = Family::<Label, Counter>::default();
        let route_cache = RouteCacheCounters {
            hit: route_family.get_or_create_owned(&[("result", "hit")]),
            miss: route_family.get_or_create_owned(&[("result", "miss")]),
            coalesced: route_family.get_or_create_owned(&[("result", "coalesced")]),
        };
        // 1 ms .. ~33 s: a response head can wait for a backend to start.
        let request_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let metrics = ProxyMetrics {
            registry: Registry::default(),
            requests,
            request_duration,
            open_connections: Gauge::default(),
            websockets_open: Gauge::default(),
            route_cache,
            upstream_errors: Counter::default(),
        };
        registry.register(
            "requests",
            "Requests answered on the proxy ports, by status class",
            requests_family,
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head",
            metrics.request_duration.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections, upgraded ones included",
            metrics.open_connections.clone(),
        );
        registry.register(
            "websockets_open",
            "Running WebSocket (upgraded) tunnels",
            metrics.websockets_open.clone(),
        );
        registry.register(
            "route_cache",
            "Route lookups by cache result: hit, miss (asked the controller) or coalesced",
            route_family,
        );
        registry.register(
            "upstream_errors",
            "Requests that failed because the backend could not be reached or broke the exchange",
            metrics.upstream_errors.clone(),
        );
        ProxyMetrics {
            registry,
            ..metrics
        }
    }

    /// The counters the route cache increments.
    pub(crate) fn route_cache_counters(&self) -> RouteCacheCounters {
        self.route_cache.clone()
    }

    /// Counts an answered request; `took` is the time to its response head.
    pub(crate) fn record_request(&self, status: StatusCode, took: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        if let Some(counter) = self.requests.get(class) {
            counter.inc();
        }
        self.request_duration.observe(took.as_secs_f64());
    }

    pub(crate) fn record_upstream_error(&self) {
        self.upstream_errors.inc();
    }

    fn encode(&self, state: &ProxyState) -> Result<String, std::fmt::Error> {
        let open = state
            .config
            .max_connections
            .saturating_sub(state.connection_slots.available_permits());
        self.open_connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        self.websockets_open
            .set(i64::try_from(state.tunnels.len()).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        hangar_process_metrics::encode(&mut text)?;
        Ok(text)
    }
}

/// Serves `GET /metrics` on `listener` until `cancel` fires; connections run on the proxy's tasks.
pub(crate) async fn run_metrics_listener(
    listener: TcpListener,
    state: Arc<ProxyState>,
    cancel: CancellationToken,
) {
    let tasks = state.tasks.clone();
    let scrape = move || {
        let state = state.clone();
        async move { state.metrics.encode(&state) }
    };
    metrics_listener::run_metrics_listener(listener, scrape, tasks, cancel).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_status_class() {
        let metrics = ProxyMetrics::new();
        metrics.record_request(StatusCode::OK, Duration::from_millis(3));
        metrics.record_request(StatusCode::GONE, Duration::from_millis(1));
        metrics.record_request(StatusCode::GONE, Duration::from_millis(1));
        metrics.record_request(StatusCode::SWITCHING_PROTOCOLS, Duration::ZERO);
        let counts: Vec<u64> = metrics.requests.iter().map(Counter::get).collect();
        assert_eq!(counts, [1, 1, 0, 2, 0]);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        assert!(
            text.contains("hangar_proxy_requests_total{code_class=\"4xx\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("hangar_proxy_request_duration_seconds_count 4\n"),
            "{text}"
        );
        assert!(
            text.contains("hangar_proxy_route_cache_total{result=\"miss\"} 0\n"),
            "{text}"
        );
    }
}
