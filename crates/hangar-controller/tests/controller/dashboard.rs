//! The dashboard's JSON (`GET /ctrl/dashboard/state`) and page over real HTTP, against a controller
//! with a fake drone and proxy.

use crate::support::{
    connect_body, eventually, with_controller_config, FakeDrone, FakeProxy, TestController, CLUSTER,
};
use hangar_controller::ControllerConfig;
use hangar_types::protocol::DroneToController;
use serde_json::Value;

const TOKEN: &str = "s3cret";

async fn state(ctl: &TestController, query: &str) -> (u16, Value) {
    let response = ctl.get(&format!("/ctrl/dashboard/state{query}")).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn backend<'a>(state: &'a Value, id: &str) -> Option<&'a Value> {
    state["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
}

#[tokio::test]
async fn dashboard_state_needs_the_token_and_lists_clusters_and_backends() {
    let config = ControllerConfig {
        bearer_token: Some(TOKEN.into()),
        ..TestController::config()
    };
    with_controller_config(config, async |ctl| {
        // The JSON is behind the bearer token; the page itself is public.
        let anonymous = reqwest::get(format!("{}/ctrl/dashboard/state", ctl.base))
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401);
        let body: Value = anonymous.json().await.unwrap();
        assert_eq!(body["kind"], "Unauthorized", "{body}");
        assert!(body["id"].is_string() && body["message"].is_string());
        let page = reqwest::get(format!("{}/dashboard", ctl.base))
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert!(page
            .text()
            .await
            .unwrap()
            .contains("<title>Hangar dashboard</title>"));
        for asset in ["dashboard.js", "dashboard.css"] {
            let response = reqwest::get(format!("{}/dashboard/{asset}", ctl.base))
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{asset}");
        }

        let (status, empty) = state(ctl, "").await;
        assert_eq!(status, 200, "{empty}");
        assert_eq!(empty["clusters"], Value::Array(vec![]));
        assert_eq!(empty["backends"], Value::Array(vec![]));
        assert_eq!(empty["limit"], 200);
        assert!(empty["time"].as_i64().unwrap() > 0);

        let mut drone = FakeDrone::connect(ctl).await;
        let _proxy = FakeProxy::connect(ctl).await;
        let mut ids = Vec::new();
        for key in ["dash-a", "dash-b", "dash-c"] {
            ids.push(ctl.connect(&connect_body(Some(key))).await.backend_id);
        }
        let ready = ids[0].clone();
        drone.make_ready(&ready).await;
        drone
            .send(&DroneToController::BackendMetrics {
                backend_id: ready.clone(),
                mem_used: 4096,
                mem_limit: 1 << 20,
                cpu_used_ns: 30,
                sys_cpu_ns: 1000,
            })
            .await;
        let snapshot = eventually("the metrics sample in the dashboard state", || async {
            let (_, snapshot) = state(ctl, "").await;
            let has_sample = backend(&snapshot, ready.as_str())
                .is_some_and(|b| b["metrics"]["mem_used"] == 4096);
            has_sample.then_some(snapshot)
        })
        .await;

        let clusters = snapshot["clusters"].as_array().unwrap();
        assert_eq!(clusters.len(), 1, "{snapshot}");
        assert_eq!(clusters[0]["name"], CLUSTER);
        let drones = clusters[0]["drones"].as_array().unwrap();
        assert_eq!(drones.len(), 1, "{snapshot}");
        assert_eq!(drones[0]["node"]["name"]["Drone"], drone.name.as_str());
        assert_eq!(drones[0]["backend_count"], 3);
        assert_eq!(drones[0]["draining"], false);
        assert!(drones[0]["last_heartbeat_age"].is_i64());
        assert_eq!(clusters[0]["proxies"].as_array().unwrap().len(), 1);

        assert_eq!(snapshot["backends"].as_array().unwrap().len(), 3);
        let entry = backend(&snapshot, ready.as_str()).unwrap();
        assert_eq!(entry["status"], "ready");
        assert_eq!(entry["key"], "dash-a");
        assert_eq!(entry["namespace"], "");
        assert_eq!(entry["cluster"], CLUSTER);
        assert_eq!(entry["drone"], drone.name.as_str());
        assert!(entry["termination_reason"].is_null());
        assert!(entry["status_time"].as_i64().unwrap() >= entry["created_at"].as_i64().unwrap());
        assert_eq!(entry["metrics"]["mem_limit"], 1 << 20);
        assert_eq!(entry["metrics"]["cpu_used_ns"], 30);
        assert_eq!(entry["metrics"]["sys_cpu_ns"], 1000);
        let other = backend(&snapshot, ids[1].as_str()).unwrap();
        assert_eq!(other["status"], "scheduled");
        assert!(other["metrics"].is_null());

        // Limit and status filter.
        let (_, two) = state(ctl, "?limit=2").await;
        assert_eq!(two["backends"].as_array().unwrap().len(), 2);
        assert_eq!(two["limit"], 2);
        let (_, capped) = state(ctl, "?limit=100000").await;
        assert_eq!(capped["limit"], 1000);
        let (_, only_ready) = state(ctl, "?status=ready").await;
        let only_ready = only_ready["backends"].as_array().unwrap();
        assert_eq!(only_ready.len(), 1);
        assert_eq!(only_ready[0]["id"], ready.as_str());
        for bad in ["?limit=0", "?limit=many", "?status=sleeping"] {
            let (status, body) = state(ctl, bad).await;
            assert_eq!(status, 400, "{bad}: {body}");
            assert_eq!(body["kind"], "InvalidRequest", "{bad}: {body}");
        }
    })
    .await
}
