//! The HTTP edge's error type. Every handler returns `Result<_, ApiError>`; [`ApiError`] turns into
//! Plane's error body `{id, kind, message}` with one exhaustive match, and logs the error with its id
//! (error level with the whole source chain for 5xx, warn for 4xx) so operators can correlate.

use crate::api::forward_auth::ForwardAuthError;
use crate::connect::ConnectError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hangar_store::StoreError;
use hangar_types::api::{self, ApiErrorKind};
use hangar_types::error_chain;
use hangar_types::names::random_string;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid body, path or query.
    #[error("{0}")]
    InvalidRequest(String),
    /// Missing or wrong `Content-Type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("Request body is larger than {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("Invalid cluster name")]
    InvalidClusterName,
    /// A missing row; the message names what is missing ("Backend does not exist").
    #[error("{0}")]
    NotFound(&'static str),
    #[error("Missing or invalid bearer token.")]
    Unauthorized,
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The forward-auth service gave no usable answer (502, or 504 when it was too slow).
    #[error(transparent)]
    ForwardAuth(#[from] ForwardAuthError),
    /// The backend's drone is connected to no controller (503, with the backend's last known status).
    #[error("{}", crate::api::logs_unreachable_message(*.status))]
    DroneUnreachable { status: hangar_types::BackendStatus },
    /// A store failure; `message` is what the client sees ("Database error").
    #[error("{message}")]
    Store {
        message: &'static str,
        #[source]
        source: StoreError,
    },
}

impl ApiError {
    /// A store failure reported to the client as `message`.
    pub fn store(message: &'static str) -> impl FnOnce(StoreError) -> ApiError {
        move |source| ApiError::Store { message, source }
    }

    /// What a store read found: `404` with `missing` when nothing, a `Database error` when the read
    /// failed.
    pub fn found<T>(
        read: Result<Option<T>, StoreError>,
        missing: &'static str,
    ) -> Result<T, ApiError> {
        read.map_err(ApiError::store("Database error"))?
            .ok_or(ApiError::NotFound(missing))
    }

    /// What a store write reported: `404` with `missing` when it applied to nothing, a `Database
    /// error` when the write failed.
    pub fn applied(write: Result<bool, StoreError>, missing: &'static str) -> Result<(), ApiError> {
        if write.map_err(ApiError::store("Database error"))? {
            Ok(())
        } else {
            Err(ApiError::NotFound(missing))
        }
    }

    /// The Plane error kind of the response.
    pub fn kind(&self) -> ApiErrorKind {
        self.status_and_kind().1
    }

    fn status_and_kind(&self) -> (StatusCode, ApiErrorKind) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, ApiErrorKind::InvalidRequest),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ApiErrorKind::InvalidRequest,
            ),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, ApiErrorKind::InvalidRequest)
            }
            ApiError::InvalidClusterName => {
                (StatusCode::BAD_REQUEST, ApiErrorKind::InvalidClusterName)
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, ApiErrorKind::NotFound),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, ApiErrorKind::Unauthorized),
            ApiError::Connect(e) => connect_status_and_kind(e),
            ApiError::ForwardAuth(e) => (e.status(), ApiErrorKind::Other),
            ApiError::DroneUnreachable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ApiErrorKind::DroneUnreachable,
            ),
            ApiError::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, ApiErrorKind::Other),
        }
    }
}

fn connect_status_and_kind(e: &ConnectError) -> (StatusCode, ApiErrorKind) {
    match e {
        ConnectError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, ApiErrorKind::InvalidRequest),
        ConnectError::TagMismatch | ConnectError::BackendShuttingDown { .. } => {
            (StatusCode::CONFLICT, ApiErrorKind::KeyHeld)
        }
        ConnectError::FailedToRemoveKey => (StatusCode::CONFLICT, ApiErrorKind::FailedToRemoveKey),
        // Plane answers 500 here; kept, since it only happens after three lost races in a row.
        ConnectError::FailedToAcquireKey => (
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiErrorKind::FailedToAcquireKey,
        ),
        ConnectError::BackendIdTaken(_) => (StatusCode::CONFLICT, ApiErrorKind::FailedToAcquireKey),
        ConnectError::NoSpawnConfig => (StatusCode::CONFLICT, ApiErrorKind::KeyUnheldNoSpawnConfig),
        ConnectError::NoClusterProvided => {
            (StatusCode::BAD_REQUEST, ApiErrorKind::NoClusterProvided)
        }
        // Deviation from Plane (500): no capacity is a 503, so clients and load balancers retry.
        ConnectError::NoDroneAvailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorKind::NoDroneAvailable,
        ),
        ConnectError::WarmClaimUnanswered(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorKind::DroneUnreachable,
        ),
        ConnectError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, ApiErrorKind::Other),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        let id = random_string();
        if status.is_server_error() {
            tracing::error!(error_id = %id, ?kind, error = %error_chain(&self), "Request failed");
        } else {
            tracing::warn!(error_id = %id, ?kind, error = %self, "Request refused");
        }
        let body = api::ApiError {
            id,
            kind,
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
