//! The drone's Prometheus listener (`metrics_addr`), scraped over real HTTP while a whole drone runs a
//! test backend against the fake controller.

use crate::drive::started_with;
use crate::session::{config, events_until, spawn, start_drone, terminate, with_timeout};
use hangar_test_support::eventually_within;
use hangar_test_support::prometheus::parse_exposition;
use hangar_types::{BackendId, BackendStatus, TerminationKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// How long a polled series may take to reach its expected value.
const POLL_DEADLINE: Duration = Duration::from_secs(30);

/// Every sample of a scrape, keyed by `name{labels}` as written.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn value(&self, series: &str) -> f64 {
        match self.0.get(series) {
            Some(value) => *value,
            None => panic!("no series {series} in {:?}", self.0.keys()),
        }
    }

    /// The sum of `hangar_drone_backends` over every status.
    fn backends_total(&self) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with("hangar_drone_backends{"))
            .map(|(_, v)| v)
            .sum()
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape(parse_exposition(&response.text().await.unwrap()))
}

/// Scrapes until `series` reads `expected`, failing after [`POLL_DEADLINE`].
async fn wait_for_value(addr: SocketAddr, series: &str, expected: f64) {
    let what = format!("{series} to read {expected}");
    eventually_within(POLL_DEADLINE, &what, || async {
        (scrape(addr).await.value(series) == expected).then_some(())
    })
    .await
}

#[tokio::test]
async fn metrics_follow_a_backend_from_spawn_to_exit() {
    with_timeout(async {
        let (mut fake, drone, mut conn) =
            started_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
        let addr = drone.metrics_addr().unwrap();
        assert_ne!(addr.port(), 0);

        let before = scrape(addr).await;
        assert_eq!(before.value("hangar_drone_controller_connected"), 1.0);
        assert_eq!(before.value("hangar_drone_spawns_total"), 0.0);
        assert_eq!(before.value("hangar_drone_reconnects_total"), 0.0);
        assert_eq!(before.backends_total(), 0.0);

        let backend = BackendId::random();
        let action = conn.send_action(&backend, spawn(&[]));
        conn.wait_ack(&action).await;
        let events = events_until(&mut conn, BackendStatus::Ready).await;
        assert_eq!(events.len(), 5, "scheduled … ready");

        let ready = scrape(addr).await;
        assert_eq!(ready.value("hangar_drone_spawns_total"), 1.0);
        assert_eq!(ready.value("hangar_drone_backends{status=\"ready\"}"), 1.0);
        assert_eq!(ready.backends_total(), 1.0);
        assert_eq!(
            ready.value("hangar_drone_spawn_to_ready_seconds_count"),
            1.0
        );
        let took = ready.value("hangar_drone_spawn_to_ready_seconds_sum");
        assert!(took > 0.0 && took < 60.0, "{took}");
        assert_eq!(ready.value("hangar_drone_controller_connected"), 1.0);
        // Nothing acked yet: every event is still in the outbox.
        assert_eq!(ready.value("hangar_drone_outbox_pending"), 5.0);
        assert_eq!(
            ready.value("hangar_drone_backend_exits_total{reason=\"external\"}"),
            0.0
        );
        for event in &events {
            conn.ack(event.event_id);
        }
        wait_for_value(addr, "hangar_drone_outbox_pending", 0.0).await;

        let action = conn.send_action(&backend, terminate(TerminationKind::Soft));
        let events = conn.events_until_terminated().await;
        assert_eq!(events.len(), 2, "terminating, terminated");
        conn.wait_ack(&action).await;
        let gone = scrape(addr).await;
        assert_eq!(gone.value("hangar_drone_backends{status=\"ready\"}"), 0.0);
        assert_eq!(gone.backends_total(), 0.0);
        assert_eq!(
            gone.value("hangar_drone_backend_exits_total{reason=\"external\"}"),
            1.0
        );
        assert_eq!(
            gone.value("hangar_drone_backend_exits_total{reason=\"exited\"}"),
            0.0
        );
        assert_eq!(gone.value("hangar_drone_spawns_total"), 1.0);
        assert_eq!(gone.value("hangar_drone_outbox_pending"), 2.0);
        for event in &events {
            conn.ack(event.event_id);
        }
        wait_for_value(addr, "hangar_drone_outbox_pending", 0.0).await;

        // A cut connection: the gauge drops, the next session counts as a reconnect.
        drone.reconnect();
        conn.closed().await;
        let conn = fake.next_connection().await;
        wait_for_value(addr, "hangar_drone_reconnects_total", 1.0).await;
        wait_for_value(addr, "hangar_drone_controller_connected", 1.0).await;

        conn.shutdown_drone(drone).await;
        assert!(
            reqwest::get(format!("http://{addr}/metrics"))
                .await
                .is_err(),
            "the listener stops with the drone"
        );
    })
    .await;
}

#[tokio::test]
async fn metrics_listener_serves_only_get_metrics() {
    with_timeout(async {
        let (mut fake, drone, conn) =
            started_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
        let addr = drone.metrics_addr().unwrap();
        let http = reqwest::Client::new();
        for path in ["/", "/metrics/", "/ctrl/c/x/drone-socket", "/other"] {
            let response = http
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 404, "{path}");
        }
        for (method, expected) in [(reqwest::Method::POST, 405), (reqwest::Method::GET, 200)] {
            let response = http
                .request(method.clone(), format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), expected, "{method} /metrics");
        }
        conn.shutdown_drone(drone).await;

        // Off by default.
        let plain = config(&fake);
        let (drone, conn) = start_drone(&mut fake, plain).await;
        assert_eq!(drone.metrics_addr(), None);
        conn.shutdown_drone(drone).await;
    })
    .await;
}
