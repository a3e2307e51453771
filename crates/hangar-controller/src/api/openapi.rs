//! The OpenAPI 3.1 document of the controller's HTTP API: every `/ctrl` and `/pub` route, built by
//! `utoipa` from the `#[utoipa::path]` attribute on each handler and the `ToSchema` derives on the API
//! types of `hangar-types`. Served whole at `GET /pub/openapi.json` (public: the API's shape is no
//! secret, and a client generator needs no token) and at `GET /ctrl/openapi.json` (the same document
//! behind `/ctrl`'s auth, for deployments that expose only `/ctrl` to their app servers).
//!
//! Every operation also gets a `default` response in Plane's error shape (`ApiError`), and the
//! `/ctrl` ones the optional bearer token. A test compares the document with the router's routes.

use super::{backend_views, backends, dashboard, logs, nodes, operator, system, warm_pools};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use hangar_types::api::ApiError;
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hangar controller API",
        description = "Plane-compatible API of the Hangar controller. `/ctrl` is the trusted \
                       group (optionally behind a bearer token and forward auth); `/pub` is public."
    ),
    paths(
        system::status_get,
        system::health_get,
        backends::connect_post,
        backends::backends_soft_terminate,
        backends::backends_hard_terminate,
        backends::backends_prevent_renew,
        backends::tokens_revoke,
        backends::backends_status,
        backends::backends_status_stream,
        nodes::cluster_state_get,
        nodes::drones_drain,
        nodes::drones_mark_lost,
        nodes::drone_socket,
        nodes::proxy_socket,
        nodes::dns_socket,
        operator::termination_candidates_get,
        operator::events_get,
        dashboard::dashboard_state_get,
        backend_views::backends_list,
        backend_views::backends_get,
        logs::backend_logs_get,
        logs::backend_events_get,
        warm_pools::warm_pools_list,
        warm_pools::warm_pools_get,
        warm_pools::warm_pools_put,
        warm_pools::warm_pools_delete,
        openapi_ctrl_get,
        openapi_pub_get,
    ),
    components(schemas(ApiError, hangar_types::logs::LogReadEnd)),
    modifiers(&PlaneConventions),
    tags(
        (name = "ctrl", description = "Trusted routes for app servers and operators"),
        (name = "pub", description = "Public routes"),
        (name = "nodes", description = "WebSocket sessions of drones, proxies and DNS responders"),
    )
)]
pub struct ApiDoc;

/// Plane's `/ctrl/revoke` alias (quirk 1), the error response of every operation, and the optional
/// bearer token of `/ctrl`.
struct PlaneConventions;

/// Name of the bearer-token security scheme.
const BEARER: &str = "bearer";

impl Modify for PlaneConventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // Plane's server serves `/ctrl/b/revoke` and its client calls `/ctrl/revoke`: both are served.
        if let Some(revoke) = doc.paths.paths.get("/ctrl/b/revoke").cloned() {
            let mut alias = revoke;
            if let Some(post) = alias.post.as_mut() {
                post.operation_id = Some("tokens_revoke_plane_client".into());
            }
            doc.paths.paths.insert("/ctrl/revoke".into(), alias);
        }
        let error = ResponseBuilder::new()
            .description(
                "An error in Plane's shape (4xx: the request; 503: no capacity; 5xx: ours)",
            )
            .content(
                "application/json",
                Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ApiError::name(),
                )))),
            )
            .build();
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
                item.patch.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .insert("default".into(), RefOr::T(error.clone()));
                if path.starts_with("/ctrl/") {
                    // No token (the default) or the configured bearer token.
                    operation.security = Some(vec![
                        SecurityRequirement::default(),
                        SecurityRequirement::new(BEARER, Vec::<String>::new()),
                    ]);
                }
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON, built once.
fn document() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot encode the OpenAPI document: {e}\"}}")
        })
    })
}

fn document_response() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

/// `GET /ctrl/openapi.json`: this document.
#[utoipa::path(get, path = "/ctrl/openapi.json", tag = "ctrl", responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
pub async fn openapi_ctrl_get() -> Response {
    document_response()
}

/// `GET /pub/openapi.json`: this document.
#[utoipa::path(get, path = "/pub/openapi.json", tag = "pub", responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
pub async fn openapi_pub_get() -> Response {
    document_response()
}
