//! The read-only operator routes of Plane's `db-cli`: termination candidates (on the router, with
//! the SQLite store's clock moved forward, so no sweeper races the check) and the event stream (on a
//! running controller).

use crate::support::{connect_body, router_on_memory, timed, with_drone, CLUSTER, WAIT};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt;
use hangar_controller::ControllerConfig;
use hangar_store::sqlite::SqliteStore;
use hangar_store::{DroneRegistration, NodeId, Registration, SessionId, Store};
use hangar_types::api::{BusEvent, TerminationCandidates};
use hangar_types::executable::ExecutorKind;
use hangar_types::{BackendId, BackendState, DroneName, Millis};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Registers a new process drone of `CLUSTER` held by `config`'s controller.
/// `POST /ctrl/connect` with `body`.
fn connect_request(body: &Value) -> Request<Body> {
    Request::post("/ctrl/connect")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The string `field` of every element of the JSON array `values`.
fn each<'a>(values: &'a Value, field: &str) -> Vec<&'a str> {
    let values = values.as_array().unwrap();
    values.iter().map(|v| v[field].as_str().unwrap()).collect()
}

async fn register_drone(
    store: &SqliteStore,
    config: &ControllerConfig,
) -> (DroneName, NodeId, SessionId) {
    let drone = DroneName::random();
    let registration = store
        .register_drone(&DroneRegistration {
            cluster: CLUSTER.parse().unwrap(),
            name: drone.clone(),
            pool: String::new(),
            executors: vec![ExecutorKind::Process],
            controller: config.name.clone(),
            version: "test".into(),
        })
        .await
        .unwrap();
    let Registration::Registered { node, session } = registration else {
        panic!("drone refused: {registration:?}");
    };
    (drone, node, session)
}

/// The router of a controller on an in-memory store, with one registered drone that has a heartbeat.
async fn router_with_drone() -> (axum::Router, Arc<SqliteStore>, DroneName) {
    let config = ControllerConfig {
        default_cluster: Some(CLUSTER.parse().unwrap()),
        ..Default::default()
    };
    let (app, store) = router_on_memory(&config, "127.0.0.1:1").await;
    store
        .controller_heartbeat(&config.name, true)
        .await
        .unwrap();
    let (drone, node, _) = register_drone(&store, &config).await;
    store.drone_heartbeat(node, Millis::now()).await.unwrap();
    (app, store, drone)
}

#[tokio::test]
async fn termination_candidates_explain_idle_and_lifetime_limits() {
    timed(async {
        let (app, store, drone) = router_with_drone().await;
        let path = format!("/ctrl/c/{CLUSTER}/d/{drone}/termination-candidates");
        let get = |path: String| Request::get(path).body(Body::empty()).unwrap();

        let mut body = connect_body(Some("limited"));
        body["spawn_config"]["lifetime_limit_seconds"] = json!(60);
        let (status, connected) = send(&app, connect_request(&body)).await;
        assert_eq!(status, StatusCode::OK, "{connected}");
        let id: BackendId = connected["backend_id"].as_str().unwrap().parse().unwrap();

        // A second backend, ready, that may idle for 30 s.
        let mut body = connect_body(Some("idler"));
        body["spawn_config"]["max_idle_seconds"] = json!(30);
        let (_, connected) = send(&app, connect_request(&body)).await;
        let idler: BackendId = connected["backend_id"].as_str().unwrap().parse().unwrap();
        let address = "127.0.0.1:4000".parse().unwrap();
        store
            .record_backend_state(&idler, &BackendState::Ready { address })
            .await
            .unwrap();

        let (status, answer) = send(&app, get(path.clone())).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let answer: TerminationCandidates = serde_json::from_value(answer).unwrap();
        assert!(answer.candidates.is_empty(), "{answer:?}");

        store.advance_clock(Duration::from_secs(61));
        let (_, answer) = send(&app, get(path.clone())).await;
        let mut answer: TerminationCandidates = serde_json::from_value(answer).unwrap();
        assert_eq!(answer.candidates.len(), 2, "{answer:?}");
        answer.candidates.sort_by_key(|c| c.backend_id != id);
        let candidate = &answer.candidates[0];
        assert_eq!(candidate.backend_id, id);
        assert_eq!(serde_json::to_value(candidate.reason).unwrap(), "lifetime");
        assert_eq!(candidate.lifetime_limit_seconds, Some(60));
        let candidate = &answer.candidates[1];
        assert_eq!(candidate.backend_id, idler);
        assert_eq!(serde_json::to_value(candidate.reason).unwrap(), "idle");
        assert_eq!(candidate.max_idle_seconds, Some(30));
        assert_eq!(serde_json::to_value(candidate.status).unwrap(), "ready");

        // An unknown drone, then a name that is not a drone name.
        for (name, expected, kind) in [
            ("dr-nosuchdrone", StatusCode::NOT_FOUND, Some("NotFound")),
            ("Bad_Name", StatusCode::BAD_REQUEST, None),
        ] {
            let other = format!("/ctrl/c/{CLUSTER}/d/{name}/termination-candidates");
            let (status, body) = send(&app, get(other)).await;
            assert_eq!(status, expected, "{name}");
            if let Some(kind) = kind {
                assert_eq!(body["kind"], kind);
            }
        }
    })
    .await
}

#[tokio::test]
async fn events_stream_backend_states_and_actions() {
    with_drone(async |ctl, mut drone| {
        let response = ctl.get("/ctrl/events").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.bytes_stream();

        let connected = ctl.connect(&connect_body(Some("evented"))).await;
        drone.expect_spawn(&connected.backend_id).await;
        let mut text = String::new();
        let mut kinds = Vec::new();
        while !(kinds.contains(&"backend_state".to_string())
            && kinds.contains(&"backend_action".to_string()))
        {
            let chunk = tokio::time::timeout(WAIT, body.next())
                .await
                .expect("no event in time")
                .expect("stream ended")
                .unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let event: BusEvent = serde_json::from_str(data).unwrap();
                match event.kind.as_str() {
                    "backend_state" => {
                        assert_eq!(event.key.as_deref(), Some(connected.backend_id.as_str()));
                        assert_eq!(event.payload["status"], "scheduled");
                    }
                    "backend_action" => {
                        assert_eq!(event.payload["backend_id"], connected.backend_id.as_str());
                    }
                    _ => {}
                }
                kinds.push(event.kind);
            }
        }
    })
    .await
}

#[tokio::test]
async fn cluster_state_lists_detached_nodes_only_with_all() {
    timed(async {
        let config = ControllerConfig::default();
        let (app, store) = router_on_memory(&config, "127.0.0.1:1").await;
        let (drone, node, session) = register_drone(&store, &config).await;
        store.node_disconnected(node, session).await.unwrap();
        let get = |query: &str| {
            Request::get(format!("/ctrl/c/{CLUSTER}/state{query}"))
                .body(Body::empty())
                .unwrap()
        };
        let (status, attached) = send(&app, get("")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(attached["drones"], json!([]));
        let (status, all) = send(&app, get("?all=true")).await;
        assert_eq!(status, StatusCode::OK);
        let all: hangar_types::api::ClusterState = serde_json::from_value(all).unwrap();
        assert_eq!(all.drones.len(), 1);
        assert_eq!(
            all.drones[0].node.name,
            hangar_types::NodeName::Drone(drone)
        );
        assert_eq!(all.drones[0].node.controller, None);
        let (status, error) = send(&app, get("?every=1")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            error["message"].as_str().unwrap().contains("every=1"),
            "{error}"
        );
    })
    .await;
}

/// `GET /ctrl/backends` lists with filters and refuses bad parameters in Plane's error shape;
/// `GET /ctrl/b/{backend}` describes one backend with its status history.
#[tokio::test]
async fn backends_are_listed_and_described() {
    timed(async {
        let (app, store, drone) = router_with_drone().await;
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let mut ids = Vec::new();
        for key in ["alpha", "beta"] {
            let (status, connected) = send(&app, connect_request(&connect_body(Some(key)))).await;
            assert_eq!(status, StatusCode::OK, "{connected}");
            let id: BackendId = connected["backend_id"].as_str().unwrap().parse().unwrap();
            ids.push(id);
        }
        let address = "127.0.0.1:4000".parse().unwrap();
        store
            .record_backend_state(&ids[1], &BackendState::Ready { address })
            .await
            .unwrap();

        let (status, list) = send(&app, get("/ctrl/backends")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(list["limit"], 100);
        assert_eq!(
            each(&list["backends"], "id"),
            [ids[1].as_str(), ids[0].as_str()]
        );
        assert_eq!(list["backends"][0]["drone"], drone.as_str());
        assert_eq!(list["backends"][0]["key"]["name"], "beta");
        assert_eq!(list["backends"][0]["status"], "ready");

        let (_, list) = send(&app, get("/ctrl/backends?status=scheduled&key=alpha")).await;
        assert_eq!(list["backends"].as_array().unwrap().len(), 1, "{list}");
        assert_eq!(list["backends"][0]["id"], ids[0].as_str());
        let (_, list) = send(&app, get("/ctrl/backends?limit=1")).await;
        assert_eq!(list["backends"].as_array().unwrap().len(), 1, "{list}");
        let (_, list) = send(&app, get("/ctrl/backends?cluster=elsewhere.test")).await;
        assert!(list["backends"].as_array().unwrap().is_empty(), "{list}");
        for bad in ["status=sleeping", "limit=0", "limit=5000", "colour=blue"] {
            let (status, body) = send(&app, get(&format!("/ctrl/backends?{bad}"))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert_eq!(body["kind"], "InvalidRequest", "{bad}: {body}");
            assert!(
                body["id"].is_string() && body["message"].is_string(),
                "{body}"
            );
        }

        let (status, details) = send(&app, get(&format!("/ctrl/b/{}", ids[1]))).await;
        assert_eq!(status, StatusCode::OK, "{details}");
        assert_eq!(details["id"], ids[1].as_str());
        assert_eq!(details["drone"], drone.as_str());
        assert_eq!(details["key"]["name"], "beta");
        assert_eq!(details["status"], "ready");
        assert_eq!(each(&details["history"], "status"), ["scheduled", "ready"]);
        assert!(details["history"][1]["time"].as_i64().unwrap() > 0);
        let (status, body) = send(&app, get("/ctrl/b/ba-nosuchbackend")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["kind"], "NotFound");
    })
    .await;
}
