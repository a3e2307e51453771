//! The drone's Prometheus metrics, served as `GET /metrics` (text format 0.0.4) on a separate,
//! optional listener (`metrics_addr`).
//!
//! Owns: the series and their registry, and what a scrape reads (the listener itself is
//! [`hangar_client::metrics_listener`]). Backend tasks and the controller
//! session update them with atomic operations on series fetched once at start (no map lookup or lock
//! on a state change); the connection gauge and the outbox backlog are read at scrape time (the latter
//! is one `COUNT` on the drone's own SQLite state, never the controller's store).

use crate::outbox::Outbox;
use hangar_client::metrics_listener;
use hangar_types::{BackendState, BackendStatus, TerminationReason};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One label with a fixed value.
type Label = [(&'static str, &'static str); 1];

/// Statuses of a supervised backend: every status but `terminated` (a terminated backend is no
/// longer supervised).
const LIVE_STATUSES: [BackendStatus; 7] = BackendStatus::LIVE;

/// Exit reasons: the termination reason, or `exited` when the backend ended on its own.
const EXIT_REASONS: [&str; 7] = [
    "swept",
    "external",
    "keyexpired",
    "lost",
    "startuptimeout",
    "internalerror",
    "exited",
];

/// The drone's series and their registry.
#[derive(Debug)]
pub(crate) struct DroneMetrics {
    registry: Registry,
    /// Indexed like [`LIVE_STATUSES`].
    backends: [Gauge; 7],
    spawns: Counter,
    /// Indexed like [`EXIT_REASONS`].
    exits: [Counter; 7],
    spawn_to_ready: Histogram,
    outbox_pending: Gauge,
    controller_connected: Gauge,
    reconnects: Counter,
    /// Output lines captured and dropped by the log store.
    pub(crate) log_lines: crate::log_store::LogCounters,
}

impl DroneMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("hangar_drone");
        let backends_family = Family::<Label, Gauge>::default();
        let backends = LIVE_STATUSES
            .map(|status| backends_family.get_or_create_owned(&[("status", status.as_str())]));
        let exits_family = Family::<Label, Counter>::default();
        let exits =
            EXIT_REASONS.map(|reason| exits_family.get_or_create_owned(&[("reason", reason)]));
        // 10 ms .. ~5.5 min: a process is ready in milliseconds, a container may pull its image first.
        let spawn_to_ready = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let metrics = DroneMetrics {
            registry: Registry::default(),
            backends,
            spawns: Counter::default(),
            exits,
            spawn_to_ready,
            outbox_pending: Gauge::default(),
            controller_connected: Gauge::default(),
            reconnects: Counter::default(),
            log_lines: Default::default(),
        };
        registry.register(
            "backends",
            "Backends this drone supervises, by current status",
            backends_family,
        );
        registry.register(
            "spawns",
            "Spawn actions that started a new backend (resent duplicates excluded)",
            metrics.spawns.clone(),
        );
        registry.register(
            "backend_exits",
            "Backends that reached terminated, by termination reason (exited: ended on its own)",
            exits_family,
        );
        registry.register(
            "spawn_to_ready_seconds",
            "Time from applying a spawn action to the backend answering on its port",
            metrics.spawn_to_ready.clone(),
        );
        registry.register(
            "outbox_pending",
            "Backend events in the outbox not yet acknowledged by the controller",
            metrics.outbox_pending.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while a session with the controller is up, else 0",
            metrics.controller_connected.clone(),
        );
        registry.register(
            "reconnects",
            "Controller sessions established after the first one",
            metrics.reconnects.clone(),
        );
        registry.register(
            "log_lines",
            "Backend output lines captured into the drone's log store",
            metrics.log_lines.captured.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Backend output lines dropped from the log store (caps, oldest first, or a write error)",
            metrics.log_lines.dropped.clone(),
        );
        DroneMetrics {
            registry,
            ..metrics
        }
    }

    fn backends_gauge(&self, status: BackendStatus) -> Option<&Gauge> {
        let index = LIVE_STATUSES.iter().position(|s| *s == status)?;
        self.backends.get(index)
    }

    /// A backend task started supervising a backend in `status`.
    pub(crate) fn backend_supervised(&self, status: BackendStatus) {
        if let Some(gauge) = self.backends_gauge(status) {
            gauge.inc();
        }
    }

    /// A supervised backend moved from `from` to `to`.
    pub(crate) fn backend_moved(&self, from: BackendStatus, to: BackendStatus) {
        if let Some(gauge) = self.backends_gauge(from) {
            gauge.dec();
        }
        self.backend_supervised(to);
    }

    /// A backend task stopped supervising its backend, last seen in `status`.
    pub(crate) fn backend_unsupervised(&self, status: BackendStatus) {
        if let Some(gauge) = self.backends_gauge(status) {
            gauge.dec();
        }
    }

    pub(crate) fn record_spawn(&self) {
        self.spawns.inc();
    }

    pub(crate) fn record_ready(&self, since_spawn: Duration) {
        self.spawn_to_ready.observe(since_spawn.as_secs_f64());
    }

    /// Counts an exit when `state` is terminated (call once per recorded `terminated` state).
    pub(crate) fn record_terminated(&self, state: &BackendState) {
        let BackendState::Terminated { reason, .. } = state else {
            return;
        };
        let label = match reason {
            Some(TerminationReason::Swept) => "swept",
            Some(TerminationReason::External) => "external",
            Some(TerminationReason::KeyExpired) => "keyexpired",
            Some(TerminationReason::Lost) => "lost",
            Some(TerminationReason::StartupTimeout) => "startuptimeout",
            Some(TerminationReason::InternalError) => "internalerror",
            None => "exited",
        };
        if let Some(index) = EXIT_REASONS.iter().position(|r| *r == label) {
            if let Some(counter) = self.exits.get(index) {
                counter.inc();
            }
        }
    }

    /// Counts a controller session; every one after the first is a reconnect.
    pub(crate) fn record_connected(&self, first: bool) {
        if !first {
            self.reconnects.inc();
        }
    }

    async fn encode(&self, source: &MetricsSource) -> Result<String, std::fmt::Error> {
        self.controller_connected
            .set(i64::from(*source.connected.borrow()));
        match source.outbox.pending_events().await {
            Ok(pending) => {
                self.outbox_pending.set(pending);
            }
            // The previous value stays: one unreadable gauge should not fail the whole scrape.
            Err(error) => tracing::warn!(%error, "Failed to count unacked events for metrics"),
        }
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        hangar_process_metrics::encode(&mut text)?;
        Ok(text)
    }
}

/// What a scrape reads besides the counters.
#[derive(Clone)]
pub(crate) struct MetricsSource {
    pub(crate) metrics: Arc<DroneMetrics>,
    pub(crate) outbox: Outbox,
    pub(crate) connected: watch::Receiver<bool>,
}

/// Serves `GET /metrics` on `listener` until `cancel` fires; connections run on `tasks`.
pub(crate) async fn run_metrics_listener(
    listener: TcpListener,
    source: MetricsSource,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let scrape = move || {
        let source = source.clone();
        async move { source.metrics.encode(&source).await }
    };
    metrics_listener::run_metrics_listener(listener, scrape, tasks, cancel).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn text(metrics: &DroneMetrics) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        text
    }

    #[test]
    fn backends_are_counted_by_live_status_and_exits_by_reason() {
        let metrics = DroneMetrics::new();
        metrics.backend_supervised(BackendStatus::Scheduled);
        metrics.backend_moved(BackendStatus::Scheduled, BackendStatus::Ready);
        metrics.backend_supervised(BackendStatus::Scheduled);
        metrics.backend_moved(BackendStatus::Ready, BackendStatus::Terminated);
        metrics.backend_unsupervised(BackendStatus::Terminated);
        let gauges: Vec<i64> = metrics.backends.iter().map(Gauge::get).collect();
        assert_eq!(gauges, [1, 0, 0, 0, 0, 0, 0]);
        metrics.record_terminated(&BackendState::Ready {
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        });
        let exited = BackendState::Scheduled
            .apply(hangar_types::state::Transition::Exited {
                exit_code: Some(1),
                oom_killed: false,
            })
            .unwrap();
        metrics.record_terminated(&exited);
        let text = text(&metrics);
        assert!(
            text.contains("hangar_drone_backends{status=\"scheduled\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hangar_drone_backends{status=\"hard-terminating\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("status=\"terminated\""), "{text}");
        assert!(
            text.contains("hangar_drone_backend_exits_total{reason=\"exited\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hangar_drone_backend_exits_total{reason=\"external\"} 0\n"),
            "{text}"
        );
    }
}
