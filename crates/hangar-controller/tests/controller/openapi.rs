//! The OpenAPI document against the real router: every `/ctrl` and `/pub` route the router serves is
//! documented with its method, every documented operation is served, and the document is valid
//! OpenAPI 3.1 as a client generator reads it (parsed by `oas3`, every `$ref` resolves, every path
//! parameter is declared, operation ids are unique).

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use hangar_controller::{router, AppState, ControllerConfig};
use hangar_store::sqlite::SqliteStore;
use hangar_types::{BackendId, DroneName};
use http_body_util::BodyExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tower::ServiceExt;

/// Methods an API route may have (HEAD and OPTIONS come with GET and CORS).
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
];

/// Routes outside `/ctrl` and `/pub`, which are not part of the API document.
const NOT_API: [&str; 5] = [
    "/",
    "/metrics",
    "/dashboard",
    "/dashboard/dashboard.js",
    "/dashboard/dashboard.css",
];

async fn app() -> Router {
    let store = Arc::new(SqliteStore::in_memory().await.unwrap());
    let state = AppState::new(
        ControllerConfig::default(),
        store,
        "127.0.0.1:8080".parse().unwrap(),
    )
    .unwrap();
    router(state)
}

/// The route paths of `app`, read from its `Debug` output (axum lists its route table there and
/// offers no other way to enumerate it).
fn router_paths(app: &Router) -> BTreeSet<String> {
    let debug = format!("{app:?}");
    let paths: BTreeSet<String> = debug
        .split("RouteId(")
        .skip(1)
        .filter_map(|part| {
            let rest = part.split_once("): \"")?.1;
            Some(rest.split_once('"')?.0.to_string())
        })
        // axum's own catch-all route of the fallback.
        .filter(|path| !path.contains("__private__axum"))
        .collect();
    assert!(
        paths.contains("/ctrl/connect") && paths.contains("/pub/health"),
        "cannot read the route table from the router's Debug output (did axum change it?): {paths:?}"
    );
    paths
}

/// `path` with each `{parameter}` replaced by a valid sample value.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some((before, after)) = rest.split_once('{') {
        let (name, tail) = after.split_once('}').unwrap();
        let value = match name {
            "backend" => BackendId::random().to_string(),
            "cluster" => "localhost:9090".to_string(),
            "drone" => DroneName::random().to_string(),
            "name" => "sample-pool".to_string(),
            other => panic!(
                "no sample value for the path parameter {{{other}}} of {path}: add one to `concrete` \
                 in tests/controller/openapi.rs"
            ),
        };
        out.push_str(before);
        out.push_str(&value);
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Whether the router serves `method` on `path`: neither 405 nor the fallback's 404.
async fn served(app: &Router, method: &Method, path: &str) -> bool {
    let request = Request::builder()
        .method(method)
        .uri(concrete(path))
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    match response.status() {
        StatusCode::METHOD_NOT_ALLOWED => false,
        // Only the fallback's body is read: a served route may stream forever (SSE).
        StatusCode::NOT_FOUND => {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            !String::from_utf8_lossy(&body).contains("No such route.")
        }
        _ => true,
    }
}

async fn get_json(app: &Router, path: &str) -> Value {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// `(METHOD, path)` of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in &METHODS {
            if item.get(method.as_str().to_lowercase()).is_some() {
                operations.insert((method.to_string(), path.clone()));
            }
        }
    }
    operations
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_route_is_served() {
    let app = app().await;
    let doc = get_json(&app, "/pub/openapi.json").await;
    assert_eq!(get_json(&app, "/ctrl/openapi.json").await, doc);

    let mut served_operations = BTreeSet::new();
    for path in router_paths(&app) {
        if !(path.starts_with("/ctrl/") || path.starts_with("/pub/")) {
            assert!(
                NOT_API.contains(&path.as_str()),
                "route {path} is outside /ctrl and /pub: add it to the API under one of them, or \
                 to NOT_API in tests/controller/openapi.rs if it is not API"
            );
            continue;
        }
        for method in &METHODS {
            if served(&app, method, &path).await {
                served_operations.insert((method.to_string(), path.clone()));
            }
        }
    }
    let documented = documented(&doc);
    let missing: Vec<String> = served_operations
        .difference(&documented)
        .map(|(method, path)| {
            format!(
                "{method} {path} is served by the router but missing from the OpenAPI document \
                 (give its handler #[utoipa::path] and list it in src/api/openapi.rs)"
            )
        })
        .collect();
    let stale: Vec<String> = documented
        .difference(&served_operations)
        .map(|(method, path)| {
            format!("{method} {path} is in the OpenAPI document but the router does not serve it")
        })
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    assert!(stale.is_empty(), "{}", stale.join("\n"));
    // Sanity: the probing itself found the routes.
    assert!(served_operations.contains(&("POST".to_string(), "/ctrl/connect".to_string())));
    assert!(served_operations.len() >= 20, "{served_operations:?}");
}

/// Every `{"$ref": "#/components/schemas/X"}` in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                out.push(target.clone());
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_valid_openapi_3() {
    let app = app().await;
    let doc = get_json(&app, "/pub/openapi.json").await;
    let text = serde_json::to_string(&doc).unwrap();
    let spec = oas3::from_json(&text).unwrap_or_else(|e| panic!("not OpenAPI 3.1: {e}\n{text}"));
    assert!(spec.openapi.starts_with("3."), "{}", spec.openapi);
    assert_eq!(spec.info.title, "Hangar controller API");
    assert_eq!(spec.info.version, hangar_types::VERSION);

    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    assert!(!targets.is_empty());
    for target in targets {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {target}"));
        assert!(schemas.contains_key(name), "$ref {target} does not resolve");
    }

    let mut operation_ids = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let templated: BTreeSet<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|p| p.split_once('}').map(|(name, _)| name))
            .collect();
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap_or_else(|| {
                panic!("{method} {path} has no operationId");
            });
            if let Some(other) = operation_ids.insert(id.to_string(), format!("{method} {path}")) {
                panic!("operationId {id} is used by {other} and {method} {path}");
            }
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("default"), "{method} {path}");
            assert!(
                responses
                    .keys()
                    .any(|code| code.starts_with('2') || code == "101"),
                "{method} {path} documents no success"
            );
            let declared: BTreeSet<&str> = operation["parameters"]
                .as_array()
                .map(|params| {
                    params
                        .iter()
                        .filter(|p| p["in"] == "path" && p["required"] == true)
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, templated, "path parameters of {method} {path}");
        }
    }
    // The API types are described, not left opaque.
    let connect = &schemas["ConnectRequest"]["properties"];
    assert!(connect["key"].is_object() && connect["spawn_config"].is_object());
    assert!(schemas.contains_key("ApiError") && schemas.contains_key("BackendStatusEntry"));
}
