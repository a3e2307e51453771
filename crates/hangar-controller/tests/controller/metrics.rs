//! `GET /metrics`: the Prometheus series count what happened on this controller, and the endpoint is
//! behind the bearer token like the `/ctrl` routes.

use crate::support::{
    connect_body, eventually, with_controller_config, FakeDrone, FakeProxy, TestController, CLUSTER,
};
use hangar_controller::ControllerConfig;
use hangar_test_support::prometheus::parse_exposition;
use hangar_types::protocol::DroneToController;
use serde_json::{json, Value};
use std::collections::HashMap;

const TOKEN: &str = "s3cret";

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// `hangar_node_sessions` of drones and of proxies.
    fn node_sessions(&self) -> (f64, f64) {
        let kind = |kind| self.get("hangar_node_sessions", &[("kind", kind)]);
        (kind("drone"), kind("proxy"))
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.get(&series(name, labels)).copied()
    }

    /// The value, failing the test when the series is missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {}", series(name, labels)))
    }
}

async fn scrape(ctl: &TestController) -> Scrape {
    let response = ctl.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape(parse_exposition(&response.text().await.unwrap()))
}

fn secured() -> ControllerConfig {
    ControllerConfig {
        default_cluster: Some(CLUSTER.parse().unwrap()),
        bearer_token: Some(TOKEN.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_need_the_bearer_token() {
    with_controller_config(secured(), async |ctl| {
        let url = format!("{}/metrics", ctl.base);
        let anonymous = ctl.http.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
        let body: Value = anonymous.json().await.unwrap();
        assert_eq!(body["kind"], "Unauthorized");
        assert!(body["id"].is_string() && body["message"].is_string());
        let wrong = ctl.http.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let right = ctl.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(right.status(), 200);
        assert!(right
            .text()
            .await
            .unwrap()
            .contains("hangar_connect_requests_total"));
    })
    .await
}

#[tokio::test]
async fn metrics_count_connects_sessions_states_and_terminations() {
    with_controller_config(secured(), async |ctl| {
        let before = scrape(ctl).await;
        for outcome in ["created", "reused", "error"] {
            assert_eq!(
                before.get("hangar_connect_requests_total", &[("outcome", outcome)]),
                0.0
            );
        }
        for kind in ["drone", "proxy", "dns"] {
            assert_eq!(before.get("hangar_node_sessions", &[("kind", kind)]), 0.0);
        }
        assert_eq!(before.get("hangar_backends_sampled", &[]), 0.0);

        let mut drone = FakeDrone::connect(ctl).await;
        let proxy = FakeProxy::connect(ctl).await;
        eventually("both node sessions counted", || async {
            let s = scrape(ctl).await;
            (s.node_sessions() == (1.0, 1.0)).then_some(())
        })
        .await;

        let created = ctl.connect(&connect_body(Some("metrics-key"))).await;
        assert!(created.spawned);
        let reused = ctl.connect(&connect_body(Some("metrics-key"))).await;
        assert!(!reused.spawned);
        // A key nobody holds, without a spawn config: KeyUnheldNoSpawnConfig.
        let refused = ctl
            .post("/ctrl/connect", &json!({"key": {"name": "unheld"}}))
            .await;
        assert_eq!(refused.status(), 409);
        // A body of the wrong shape is a connect error too: InvalidRequest.
        let invalid = ctl.post("/ctrl/connect", &json!({"key": 5})).await;
        assert_eq!(invalid.status(), 400);

        let backend = created.backend_id.clone();
        drone.make_ready(&backend).await;
        drone
            .send(&DroneToController::BackendMetrics {
                backend_id: backend.clone(),
                mem_used: 1000,
                mem_limit: 8000,
                cpu_used_ns: 5,
                sys_cpu_ns: 50,
            })
            .await;
        let soft = ctl
            .post(&format!("/ctrl/b/{backend}/soft-terminate"), &Value::Null)
            .await;
        assert_eq!(soft.status(), 200);
        let s = eventually("the memory sample to be summarised", || async {
            let s = scrape(ctl).await;
            (s.get("hangar_backends_sampled", &[]) == 1.0).then_some(s)
        })
        .await;

        let outcome = |o| s.get("hangar_connect_requests_total", &[("outcome", o)]);
        assert_eq!(outcome("created"), 1.0);
        assert_eq!(outcome("reused"), 1.0);
        assert_eq!(outcome("error"), 2.0);
        let errors = |k| s.get("hangar_connect_errors_total", &[("kind", k)]);
        assert_eq!(errors("KeyUnheldNoSpawnConfig"), 1.0);
        assert_eq!(errors("InvalidRequest"), 1.0);
        assert_eq!(s.get("hangar_connect_duration_seconds_count", &[]), 4.0);
        assert_eq!(
            s.get("hangar_connect_duration_seconds_bucket", &[("le", "+Inf")]),
            4.0
        );
        for status in ["loading", "starting", "waiting", "ready"] {
            assert_eq!(
                s.get("hangar_backend_state_changes_total", &[("status", status)]),
                1.0,
                "{status}"
            );
        }
        assert_eq!(
            s.value(
                "hangar_backend_state_changes_total",
                &[("status", "terminated")]
            ),
            None
        );
        assert_eq!(
            s.get("hangar_terminate_requests_total", &[("kind", "soft")]),
            1.0
        );
        assert_eq!(s.get("hangar_backend_memory_used_bytes", &[]), 1000.0);
        assert_eq!(s.get("hangar_backend_memory_limit_bytes", &[]), 8000.0);

        // A session that ends is no longer counted.
        drop(proxy);
        eventually("the proxy session to be uncounted", || async {
            let s = scrape(ctl).await;
            (s.node_sessions() == (1.0, 0.0)).then_some(())
        })
        .await;
    })
    .await
}

#[test]
fn exposition_parser_reads_labels_and_values() {
    let parsed = parse_exposition(
        "# HELP x_total A thing.\n# TYPE x_total counter\nx_total{a=\"b\"} 3\ny 1.5\n",
    );
    assert_eq!(parsed.get("x_total{a=\"b\"}"), Some(&3.0));
    assert_eq!(parsed.get(&series("y", &[])), Some(&1.5));
    assert_eq!(parsed.len(), 2);
}

/// `hangar_connect_drone_reads_total{read}` of `ctl`, in the order alongside_lookup, wasted,
/// after_lookup.
async fn drone_reads(ctl: &TestController) -> [f64; 3] {
    let s = scrape(ctl).await;
    ["alongside_lookup", "wasted", "after_lookup"]
        .map(|read| s.get("hangar_connect_drone_reads_total", &[("read", read)]))
}

#[tokio::test]
async fn a_cold_spawn_reads_the_drones_alongside_its_key_lookup_and_a_reconnect_reads_none() {
    with_controller_config(TestController::config(), async |ctl| {
        let _drone = FakeDrone::connect(ctl).await;
        assert_eq!(drone_reads(ctl).await, [0.0, 0.0, 0.0]);

        // A key never seen: the drones are read while the key is looked up, and the spawn uses it.
        let created = ctl.connect(&connect_body(Some("doc"))).await;
        assert!(created.spawned);
        assert_eq!(drone_reads(ctl).await, [1.0, 0.0, 0.0]);

        // Its reconnects: the key is remembered as held, so no drone read at all.
        for _ in 0..3 {
            let reused = ctl.connect(&connect_body(Some("doc"))).await;
            assert!(!reused.spawned);
            assert_eq!(reused.backend_id, created.backend_id);
        }
        assert_eq!(drone_reads(ctl).await, [1.0, 0.0, 0.0]);

        // Without a key there is no lookup: the spawn reads by itself.
        let keyless = ctl.connect(&connect_body(None)).await;
        assert!(keyless.spawned);
        assert_eq!(drone_reads(ctl).await, [1.0, 0.0, 1.0]);

        // A second controller on the same store has not seen the key held: its first connect reads
        // the drones for nothing (counted as wasted), its next one does not read.
        let other = TestController::start_on(TestController::config(), ctl.store.clone()).await;
        for _ in 0..2 {
            let reused = other.connect(&connect_body(Some("doc"))).await;
            assert_eq!(reused.backend_id, created.backend_id);
        }
        assert_eq!(drone_reads(&other).await, [0.0, 1.0, 0.0]);
        other.shutdown().await;
    })
    .await
}
