//! Handler tests: the router driven with `tower::ServiceExt::oneshot` over an in-memory store.

use crate::support::{router_on_memory, terminated_state, timed, CLUSTER};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use hangar_controller::ControllerConfig;
use hangar_store::sqlite::SqliteStore;
use hangar_store::{DroneRegistration, NodeId, Registration, Store};
use hangar_types::executable::ExecutorKind;
use hangar_types::{
    BackendId, BackendState, BackendStatus, DroneName, Millis, TerminationKind, TerminationReason,
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

struct Api {
    app: Router,
    store: Arc<SqliteStore>,
    config: ControllerConfig,
}

impl Api {
    async fn new() -> Api {
        Self::with_config(ControllerConfig {
            default_cluster: Some(CLUSTER.parse().unwrap()),
            controller_url: Some(
                "https://user:pw@ctl.example.com/some/path?q=1"
                    .parse()
                    .unwrap(),
            ),
            ..Default::default()
        })
        .await
    }

    async fn with_config(config: ControllerConfig) -> Api {
        let (app, store) = router_on_memory(&config, "127.0.0.1:8080").await;
        Api { app, store, config }
    }

    /// Registers a drone attached to this controller, with a heartbeat (and one of the controller, which
    /// the router alone does not record).
    async fn add_drone(&self) -> (NodeId, DroneName) {
        self.store
            .controller_heartbeat(&self.config.name, true)
            .await
            .unwrap();
        let name = DroneName::random();
        let registration = self
            .store
            .register_drone(&DroneRegistration {
                cluster: CLUSTER.parse().unwrap(),
                name: name.clone(),
                pool: String::new(),
                executors: vec![ExecutorKind::Process],
                controller: self.config.name.clone(),
                version: "test".into(),
            })
            .await
            .unwrap();
        let Registration::Registered { node, .. } = registration else {
            panic!("drone refused: {registration:?}");
        };
        self.store
            .drone_heartbeat(node, Millis::now())
            .await
            .unwrap();
        (node, name)
    }

    /// The router's response to `request`, its body unread.
    async fn respond(&self, request: Request<Body>) -> axum::response::Response {
        self.app.clone().oneshot(request).await.unwrap()
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.respond(request).await;
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        let mut request = Request::post(path);
        if let Some(ct) = content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        self.send(request.body(body.into()).unwrap()).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_raw(path, Some("application/json"), body.to_string())
            .await
    }

    /// `POST path` with the JSON `null` Plane's client sends where a route takes no body.
    async fn post_null(&self, path: &str) -> (StatusCode, Value) {
        self.post(path, &Value::Null).await
    }

    async fn connect(&self, body: &Value) -> (StatusCode, Value) {
        self.post("/ctrl/connect", body).await
    }
}

/// Runs `test` with [`timed`] against the router of [`Api::new`].
async fn with_api(test: impl AsyncFnOnce(Api)) {
    timed(async { test(Api::new().await).await }).await
}

/// [`with_api`] with a drone registered ([`Api::add_drone`]).
async fn with_api_and_drone(test: impl AsyncFnOnce(Api, NodeId, DroneName)) {
    with_api(async |api| {
        let (node, drone) = api.add_drone().await;
        test(api, node, drone).await
    })
    .await
}

/// Runs `test` with [`timed`] against the router of a controller requiring the bearer token
/// `s3cret`.
async fn with_secured_api(test: impl AsyncFnOnce(Api)) {
    let config = ControllerConfig {
        bearer_token: Some("s3cret".into()),
        ..Default::default()
    };
    timed(async { test(Api::with_config(config).await).await }).await
}

fn spawn_body(key: &str) -> Value {
    json!({
        "key": {"name": key},
        "spawn_config": {"executable": {"command": ["sleep", "100"]}},
        "user": "alice"
    })
}

/// A backend id of no backend, and a string that is no backend id.
const BACKEND_IDS: [&str; 2] = ["nosuchbackend", "Bad%20Id"];
/// A drone name of no drone, and a name that is no drone's.
const DRONE_NAMES: [&str; 2] = ["dr-unknown", "px-notadrone"];

/// `POST` to `route` (its `{}` replaced by an id) is 404 with `missing` for `unknown`, an id of
/// nothing, and 400 for `invalid`, no valid id.
async fn assert_ids_checked(api: &Api, route: &str, [unknown, invalid]: [&str; 2], missing: &str) {
    let answer = api.post_null(&route.replace("{}", unknown)).await;
    let message = expect_error(answer, StatusCode::NOT_FOUND, "NotFound");
    assert_eq!(message, missing, "{route}");
    let answer = api.post_null(&route.replace("{}", invalid)).await;
    expect_error(answer, StatusCode::BAD_REQUEST, "InvalidRequest");
}

/// An answer with `status` and Plane's error shape with the expected kind; returns the message.
fn expect_error((status, body): (StatusCode, Value), expected: StatusCode, kind: &str) -> String {
    assert_eq!(status, expected, "{body}");
    assert_error(&body, kind)
}

/// Plane's error shape with the expected kind; returns the message.
fn assert_error(body: &Value, kind: &str) -> String {
    assert_eq!(body["kind"], kind, "{body}");
    assert_eq!(body["id"].as_str().unwrap().len(), 14, "{body}");
    body["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn status_and_health_are_ok() {
    with_api(async |api| {
        let (status, body) = api.get("/ctrl/status").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["version"], hangar_types::VERSION);
        let (status, body) = api.get("/pub/health").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"status": "ok"}));
    })
    .await
}

#[tokio::test]
async fn connect_spawns_a_backend() {
    with_api_and_drone(async |api, _, drone| {
        let (status, body) = api.connect(&spawn_body("room-1")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["spawned"], true);
        assert_eq!(body["status"], "scheduled");
        assert_eq!(body["drone"], drone.as_str());
        let id = body["backend_id"].as_str().unwrap();
        let token = body["token"].as_str().unwrap();
        assert_eq!(body["url"], format!("http://{CLUSTER}/{token}/"));
        assert_eq!(
            body["status_url"],
            format!("https://ctl.example.com/pub/b/{id}/status")
        );
        assert_eq!(body["secret_token"].as_str().unwrap().len(), 43);
        assert!(body["subdomain"].is_null());

        // Same key: the same backend, not spawned, with a fresh token and no drone.
        let (status, again) = api.connect(&spawn_body("room-1")).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["backend_id"], id);
        assert_eq!(again["spawned"], false);
        assert!(again["drone"].is_null());
        assert_ne!(again["token"], body["token"]);
        // The fresh token is stored for the backend.
        let fresh = hangar_types::token::ConnectionToken::from_path_segment(
            again["token"].as_str().unwrap(),
        );
        assert_eq!(
            api.store.resolve_token(&fresh).await.unwrap(),
            hangar_store::TokenLookup::Pending {
                backend: id.parse().unwrap()
            }
        );
    })
    .await
}

#[tokio::test]
async fn connect_with_static_token_and_subdomain() {
    with_api_and_drone(async |api, _, _| {
        let mut request = spawn_body("static");
        request["spawn_config"]["use_static_token"] = json!(true);
        request["spawn_config"]["subdomain"] = json!("abc");
        let (status, body) = api.connect(&request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let token = body["token"].as_str().unwrap();
        assert!(token.starts_with("s."));
        assert!(body["secret_token"].is_null());
        assert_eq!(body["url"], format!("http://abc.{CLUSTER}/{token}/"));
        let (_, again) = api.connect(&request).await;
        assert_eq!(again["token"], token);
    })
    .await
}

#[tokio::test]
async fn connect_tag_mismatch_is_409_key_held() {
    with_api_and_drone(async |api, _, _| {
        assert_eq!(api.connect(&spawn_body("tagged")).await.0, StatusCode::OK);
        let mut other = spawn_body("tagged");
        other["key"]["tag"] = json!("v2");
        assert_eq!(
            expect_error(api.connect(&other).await, StatusCode::CONFLICT, "KeyHeld"),
            "Lock is held but tag does not match."
        );
    })
    .await
}

#[tokio::test]
async fn connect_to_a_terminating_backend_is_refused() {
    with_api_and_drone(async |api, _, _| {
        let (_, body) = api.connect(&spawn_body("dying")).await;
        let id: BackendId = body["backend_id"].as_str().unwrap().parse().unwrap();
        api.store
            .record_backend_state(
                &id,
                &BackendState::Terminating {
                    last_status: BackendStatus::Scheduled,
                    termination: TerminationKind::Soft,
                    reason: TerminationReason::External,
                },
            )
            .await
            .unwrap();
        assert!(expect_error(
            api.connect(&spawn_body("dying")).await,
            StatusCode::CONFLICT,
            "KeyHeld"
        )
        .contains("shutting down"));

        // Once terminated, the key is free again.
        api.store
            .record_backend_state(
                &id,
                &terminated_state(
                    BackendStatus::Scheduled,
                    Some(TerminationKind::Soft),
                    Some(TerminationReason::External),
                    Some(0),
                ),
            )
            .await
            .unwrap();
        let (status, body) = api.connect(&spawn_body("dying")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["spawned"], true);
        assert_ne!(body["backend_id"], id.as_str());
    })
    .await
}

#[tokio::test]
async fn connect_takes_over_an_expired_key() {
    with_api_and_drone(async |api, node, _| {
        let (_, first) = api.connect(&spawn_body("expiring")).await;
        api.store.advance_clock(Duration::from_secs(120));
        // What a running controller and drone do every few seconds.
        api.store
            .controller_heartbeat(&api.config.name, true)
            .await
            .unwrap();
        api.store
            .drone_heartbeat(node, Millis::now())
            .await
            .unwrap();
        let (status, second) = api.connect(&spawn_body("expiring")).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        assert_eq!(second["spawned"], true);
        assert_ne!(second["backend_id"], first["backend_id"]);
        // The old holder is recorded as lost before the new backend was created.
        let old: hangar_types::BackendId = first["backend_id"].as_str().unwrap().parse().unwrap();
        let new: hangar_types::BackendId = second["backend_id"].as_str().unwrap().parse().unwrap();
        let old_row = api.store.backend(&old).await.unwrap().unwrap();
        assert_eq!(
            old_row.state.status(),
            hangar_types::BackendStatus::Terminated
        );
        assert!(matches!(
            old_row.state,
            hangar_types::BackendState::Terminated {
                reason: Some(hangar_types::TerminationReason::Lost),
                ..
            }
        ));
        let new_row = api.store.backend(&new).await.unwrap().unwrap();
        assert!(old_row.state_time <= new_row.created_at);
    })
    .await
}

#[tokio::test]
async fn connect_without_spawn_config_is_409() {
    with_api(async |api| {
        assert_eq!(
            expect_error(
                api.connect(&json!({"key": {"name": "nobody"}})).await,
                StatusCode::CONFLICT,
                "KeyUnheldNoSpawnConfig"
            ),
            "Lock is unheld but no spawn config was provided."
        );
    })
    .await
}

#[tokio::test]
async fn connect_without_drone_is_503() {
    with_api(async |api| {
        assert_eq!(
            expect_error(
                api.connect(&spawn_body("k")).await,
                StatusCode::SERVICE_UNAVAILABLE,
                "NoDroneAvailable"
            ),
            "No active drone available."
        );
        // A drone that offers only another executor does not count.
        api.add_drone().await;
        let mut docker = spawn_body("k");
        docker["spawn_config"]["executable"] = json!({"image": "app:1"});
        assert_eq!(
            api.connect(&docker).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    })
    .await
}

#[tokio::test]
async fn connect_without_cluster_is_400() {
    timed(async {
        let api = Api::with_config(ControllerConfig::default()).await;
        expect_error(
            api.connect(&spawn_body("k")).await,
            StatusCode::BAD_REQUEST,
            "NoClusterProvided",
        );
    })
    .await
}

#[tokio::test]
async fn connect_bad_input_is_a_clear_4xx() {
    with_api(async |api| {
        assert!(expect_error(
            api.post_raw("/ctrl/connect", Some("application/json"), "{not json")
                .await,
            StatusCode::BAD_REQUEST,
            "InvalidRequest"
        )
        .contains("Malformed JSON"));

        expect_error(
            api.post_raw("/ctrl/connect", Some("text/plain"), "{}")
                .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidRequest",
        );
        assert_eq!(
            api.post_raw("/ctrl/connect", None, "{}").await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );

        assert!(expect_error(
            api.connect(&json!({"key": {"name": "k"}, "bogus": 1}))
                .await,
            StatusCode::BAD_REQUEST,
            "InvalidRequest"
        )
        .contains("bogus"));

        expect_error(
            api.connect(&json!({"key": {"name": ""}})).await,
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
        );

        assert!(expect_error(
            api.connect(&json!({"spawn_config": {"executable": {"nothing": true}}}))
                .await,
            StatusCode::BAD_REQUEST,
            "InvalidRequest"
        )
        .contains("image"));

        let mut bad_id = spawn_body("k");
        bad_id["spawn_config"]["id"] = json!("../etc");
        assert_eq!(api.connect(&bad_id).await.0, StatusCode::BAD_REQUEST);

        for (field, value) in [
            ("subdomain", json!("-bad-")),
            ("max_idle_seconds", json!(0)),
            ("lifetime_limit_seconds", json!(-1)),
            ("cluster", json!("bad host")),
        ] {
            let mut body = spawn_body("k");
            body["spawn_config"][field] = value;
            let (status, response) = api.connect(&body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {response}");
            assert_error(&response, "InvalidRequest");
        }

        let huge = format!(r#"{{"user": "{}"}}"#, "x".repeat(2 * 1024 * 1024));
        expect_error(
            api.post_raw("/ctrl/connect", Some("application/json"), huge)
                .await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "InvalidRequest",
        );
    })
    .await
}

#[tokio::test]
async fn terminate_routes() {
    with_api(async |api| {
        for kind in ["soft", "hard"] {
            let route = format!("/ctrl/b/{{}}/{kind}-terminate");
            assert_ids_checked(&api, &route, BACKEND_IDS, "Backend does not exist").await;
        }

        api.add_drone().await;
        let (_, connected) = api.connect(&spawn_body("t")).await;
        let id = connected["backend_id"].as_str().unwrap();
        // Plane's client posts JSON `null`; no body at all is fine too.
        let (status, body) = api.post_null(&format!("/ctrl/b/{id}/hard-terminate")).await;
        assert_eq!((status, body), (StatusCode::OK, Value::Null));
        let no_body = Request::post(format!("/ctrl/b/{id}/soft-terminate"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(api.respond(no_body).await.status(), StatusCode::OK);
    })
    .await
}

#[tokio::test]
async fn revoke_on_both_paths() {
    with_api(async |api| {
        for path in ["/ctrl/b/revoke", "/ctrl/revoke"] {
            let (status, body) = api
                .post(path, &json!({"backend_id": "abc", "user": "alice"}))
                .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, json!("Token revoked successfully"));
        }
        let (status, _) = api
            .post("/ctrl/b/revoke", &json!({"backend_id": "abc"}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await
}

#[tokio::test]
async fn drain_and_cluster_state() {
    with_api_and_drone(async |api, _, drone| {
        let (status, state) = api.get(&format!("/ctrl/c/{CLUSTER}/state")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(state["drones"][0]["node"]["name"]["Drone"], drone.as_str());
        assert_eq!(state["drones"][0]["draining"], false);

        let path = format!("/ctrl/c/{CLUSTER}/d/{drone}/drain");
        assert_eq!(api.post_null(&path).await.1, json!({"updated": true}));
        assert_eq!(api.post_null(&path).await.1, json!({"updated": false}));
        // A draining drone takes no new backends.
        assert_eq!(
            api.connect(&spawn_body("d")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );

        let route = format!("/ctrl/c/{CLUSTER}/d/{{}}/drain");
        assert_ids_checked(&api, &route, DRONE_NAMES, "Drone does not exist").await;
    })
    .await
}

#[tokio::test]
async fn invalid_cluster_paths_are_400() {
    with_api(async |api| {
        for path in [
            "/ctrl/c/bad%20host/state",
            "/ctrl/c/host:notaport/d/dr-abc/drain",
            "/ctrl/c/host:notaport/d/dr-abc/mark-lost",
            "/ctrl/c/bad%20host/drone-socket",
            "/ctrl/c/bad%20host/proxy-socket",
        ] {
            let method = if path.ends_with("drain") || path.ends_with("mark-lost") {
                Method::POST
            } else {
                Method::GET
            };
            let (status, body) = api
                .send(
                    Request::builder()
                        .method(method)
                        .uri(path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(
                assert_error(&body, "InvalidClusterName"),
                "Invalid cluster name"
            );
        }
        // A valid cluster but no WebSocket upgrade: still a Plane-shaped 4xx.
        let (status, body) = api.get(&format!("/ctrl/c/{CLUSTER}/drone-socket")).await;
        assert!(status.is_client_error());
        assert_error(&body, "InvalidRequest");
    })
    .await
}

#[tokio::test]
async fn public_status() {
    with_api(async |api| {
        assert_eq!(
            expect_error(
                api.get("/pub/b/nosuchbackend/status").await,
                StatusCode::NOT_FOUND,
                "NotFound"
            ),
            "Backend does not exist"
        );

        api.add_drone().await;
        let (_, connected) = api.connect(&spawn_body("s")).await;
        let id = connected["backend_id"].as_str().unwrap();
        let (status, body) = api.get(&format!("/pub/b/{id}/status")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "scheduled");
        assert!(body["time"].as_i64().unwrap() > 0);
        assert!(body.get("termination_reason").is_none());
        assert!(body.get("exit_error").is_none());
    })
    .await
}

#[tokio::test]
async fn status_stream_of_unknown_backend_is_an_open_event_stream() {
    with_api(async |api| {
        let response = api
            .app
            .clone()
            .oneshot(
                Request::get("/pub/b/nosuchbackend/status-stream")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
    })
    .await
}

#[tokio::test]
async fn pub_has_cors_and_ctrl_does_not() {
    with_api(async |api| {
        let preflight = |path: &str| {
            Request::builder()
                .method(Method::OPTIONS)
                .uri(path)
                .header(header::ORIGIN, "https://app.example.com")
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET")
                .body(Body::empty())
                .unwrap()
        };
        let response = api.respond(preflight("/pub/health")).await;
        assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let response = api.respond(preflight("/ctrl/status")).await;
        assert!(response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
    })
    .await
}

#[tokio::test]
async fn bearer_token_guards_ctrl_only() {
    with_secured_api(async |api| {
        let (status, body) = api.get("/ctrl/status").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_error(&body, "Unauthorized");
        let wrong = Request::get("/ctrl/status")
            .header(header::AUTHORIZATION, "Bearer nope")
            .body(Body::empty())
            .unwrap();
        assert_eq!(api.send(wrong).await.0, StatusCode::UNAUTHORIZED);
        let right = Request::get("/ctrl/status")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(Body::empty())
            .unwrap();
        assert_eq!(api.send(right).await.0, StatusCode::OK);
        assert_eq!(
            api.get(&format!("/ctrl/c/{CLUSTER}/drone-socket")).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(api.get("/pub/health").await.0, StatusCode::OK);
    })
    .await
}

#[tokio::test]
async fn unknown_route_is_a_plane_shaped_404() {
    with_api(async |api| {
        expect_error(
            api.get("/ctrl/nope").await,
            StatusCode::NOT_FOUND,
            "NotFound",
        );
    })
    .await
}

#[tokio::test]
async fn mark_lost_records_terminated_lost_and_frees_keys() {
    with_api_and_drone(async |api, node, drone| {
        let (status, first) = api.connect(&spawn_body("lost-a")).await;
        assert_eq!(status, StatusCode::OK);
        let (_, second) = api.connect(&spawn_body("lost-b")).await;
        let first = first["backend_id"].as_str().unwrap().to_string();
        let second = second["backend_id"].as_str().unwrap().to_string();
        let mut events = api.store.events().subscribe();

        let path = format!("/ctrl/c/{CLUSTER}/d/{drone}/mark-lost");
        let (status, body) = api.post_null(&path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut marked: Vec<String> = serde_json::from_value(body["backends"].clone()).unwrap();
        marked.sort();
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort();
        assert_eq!(marked, expected);

        let (_, status_body) = api.get(&format!("/pub/b/{first}/status")).await;
        assert_eq!(status_body["status"], "terminated");
        assert_eq!(status_body["termination_reason"], "lost");
        assert!(status_body["message"]
            .as_str()
            .unwrap()
            .contains(drone.as_str()));
        // The terminated state went out on the bus (so proxies drop the routes).
        let mut terminated = 0;
        while let Ok(event) = events.try_recv() {
            if let hangar_store::StoreEvent::BackendState { state, .. } = event {
                terminated += usize::from(state.status() == BackendStatus::Terminated);
            }
        }
        assert_eq!(terminated, 2);
        // A hard terminate is queued for a drone that comes back still running them.
        let pending = api.store.pending_actions(node, 10).await.unwrap();
        assert_eq!(
            pending
                .iter()
                .filter(|a| matches!(
                    a.action,
                    hangar_types::protocol::BackendAction::Terminate {
                        kind: TerminationKind::Hard,
                        reason: TerminationReason::Lost
                    }
                ))
                .count(),
            2
        );
        // The keys are free: a new connect spawns a new backend.
        let (status, again) = api.connect(&spawn_body("lost-a")).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["spawned"], true);
        assert_ne!(again["backend_id"], first.as_str());

        // Again: only the new backend is marked.
        let (_, body) = api.post_null(&path).await;
        assert_eq!(body, json!({"backends": [again["backend_id"]]}));
    })
    .await
}

#[tokio::test]
async fn mark_lost_bad_input() {
    with_api(async |api| {
        let route = format!("/ctrl/c/{CLUSTER}/d/{{}}/mark-lost");
        assert_ids_checked(&api, &route, DRONE_NAMES, "Drone does not exist").await;
        for bad in ["px-notadrone", "dr-UPPER", "dr-a%20b"] {
            let (status, body) = api
                .post_null(&format!("/ctrl/c/{CLUSTER}/d/{bad}/mark-lost"))
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(assert_error(&body, "InvalidRequest").contains("invalid drone name"));
        }
        let (status, _) = api
            .get(&format!("/ctrl/c/{CLUSTER}/d/dr-abc/mark-lost"))
            .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    })
    .await
}

#[tokio::test]
async fn prevent_renew_route() {
    with_api(async |api| {
        let route = "/ctrl/b/{}/prevent-renew";
        let missing = "Backend does not exist or holds no key";
        assert_ids_checked(&api, route, BACKEND_IDS, missing).await;

        api.add_drone().await;
        let (_, connected) = api.connect(&spawn_body("blocked")).await;
        let id: BackendId = connected["backend_id"].as_str().unwrap().parse().unwrap();
        assert!(api.store.renew_key(&id).await.unwrap());
        let (status, body) = api.post_null(&format!("/ctrl/b/{id}/prevent-renew")).await;
        assert_eq!((status, body), (StatusCode::OK, Value::Null));
        assert!(!api.store.renew_key(&id).await.unwrap());

        // A terminated backend holds no key.
        let terminated = terminated_state(BackendStatus::Scheduled, None, None, Some(0));
        api.store
            .record_backend_state(&id, &terminated)
            .await
            .unwrap();
        let (status, _) = api.post_null(&format!("/ctrl/b/{id}/prevent-renew")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    })
    .await
}

#[tokio::test]
async fn new_routes_require_the_bearer_token() {
    with_secured_api(async |api| {
        for (method, path) in [
            (
                Method::POST,
                format!("/ctrl/c/{CLUSTER}/d/dr-abc/mark-lost"),
            ),
            (Method::POST, "/ctrl/b/abc/prevent-renew".to_string()),
            (Method::GET, "/ctrl/dns-socket".to_string()),
        ] {
            let (status, body) = api
                .send(
                    Request::builder()
                        .method(method)
                        .uri(&path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert_error(&body, "Unauthorized");
        }
        // With the token, a plain GET of the DNS socket is a clear 4xx (no upgrade), not a 500.
        let (status, body) = api
            .send(
                Request::get("/ctrl/dns-socket")
                    .header(header::AUTHORIZATION, "Bearer s3cret")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert!(status.is_client_error());
        assert_error(&body, "InvalidRequest");
    })
    .await
}
