//! Errors of the request pipeline and the responses the proxy generates for them: a status code and
//! a short plain-text body saying what happened.

use crate::headers::{HostMismatch, InvalidUserHeader};
use crate::route_cache::GoneReason;
use bytes::Bytes;
use hangar_types::{error_chain, BackendId};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the proxy returns.
pub(crate) type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Whose fault an error is, which decides how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The request is wrong (bad path, token, host).
    Client,
    /// The backend (or the controller that manages it) failed or is slow.
    Backend,
    /// Hangar itself is broken or not connected.
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no connection token in the request path")]
    MissingToken,
    #[error("the request path cannot be forwarded")]
    InvalidPath,
    #[error("no root redirect is configured")]
    NoRootRedirect,
    #[error("missing or invalid Host header")]
    MissingHost,
    #[error("no ACME challenge answer for this token")]
    UnknownChallenge,
    #[error("unknown or expired token")]
    UnknownToken,
    #[error("backend has terminated")]
    BackendTerminated,
    #[error("token was revoked")]
    TokenRevoked,
    #[error(transparent)]
    Host(#[from] HostMismatch),
    #[error("timed out waiting for the backend to become ready")]
    RouteWaitTimeout,
    #[error("the proxy is not connected to a controller")]
    ControllerUnavailable,
    #[error("could not reach the backend")]
    Upstream {
        backend: BackendId,
        #[source]
        source: BoxError,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        limit: u64,
        /// Set when the body was being forwarded to this backend.
        backend: Option<BackendId>,
    },
    #[error("the route for this token is invalid")]
    InvalidRoute {
        backend: BackendId,
        #[source]
        source: InvalidUserHeader,
    },
}

impl ProxyError {
    pub(crate) fn gone(reason: GoneReason) -> Self {
        match reason {
            GoneReason::Unknown => ProxyError::UnknownToken,
            GoneReason::BackendRemoved => ProxyError::BackendTerminated,
            GoneReason::Revoked => ProxyError::TokenRevoked,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingToken
            | ProxyError::InvalidPath
            | ProxyError::NoRootRedirect
            | ProxyError::MissingHost => StatusCode::BAD_REQUEST,
            ProxyError::UnknownToken | ProxyError::BackendTerminated | ProxyError::TokenRevoked => {
                StatusCode::GONE
            }
            ProxyError::Host(_) => StatusCode::FORBIDDEN,
            ProxyError::UnknownChallenge => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RouteWaitTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ControllerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::InvalidRoute { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn fault(&self) -> Fault {
        match self {
            ProxyError::MissingToken
            | ProxyError::InvalidPath
            | ProxyError::NoRootRedirect
            | ProxyError::MissingHost
            | ProxyError::UnknownChallenge
            | ProxyError::UnknownToken
            | ProxyError::BackendTerminated
            | ProxyError::TokenRevoked
            | ProxyError::Host(_)
            | ProxyError::BodyTooLarge { .. } => Fault::Client,
            ProxyError::RouteWaitTimeout | ProxyError::Upstream { .. } => Fault::Backend,
            ProxyError::ControllerUnavailable | ProxyError::InvalidRoute { .. } => Fault::Proxy,
        }
    }

    /// The backend the request was forwarded to, for errors of proxied requests.
    pub(crate) fn backend(&self) -> Option<&BackendId> {
        match self {
            ProxyError::Upstream { backend, .. } | ProxyError::InvalidRoute { backend, .. } => {
                Some(backend)
            }
            ProxyError::BodyTooLarge { backend, .. } => backend.as_ref(),
            ProxyError::MissingToken
            | ProxyError::InvalidPath
            | ProxyError::NoRootRedirect
            | ProxyError::MissingHost
            | ProxyError::UnknownChallenge
            | ProxyError::UnknownToken
            | ProxyError::BackendTerminated
            | ProxyError::TokenRevoked
            | ProxyError::Host(_)
            | ProxyError::RouteWaitTimeout
            | ProxyError::ControllerUnavailable => None,
        }
    }

    /// The response for this error, with a short plain-text body; logs it by fault.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let error = error_chain(&self);
        match self.fault() {
            Fault::Client => tracing::debug!(%error, "Rejected a request"),
            Fault::Backend => tracing::info!(%error, "Request failed on the backend side"),
            Fault::Proxy => tracing::warn!(%error, "Request failed in the proxy"),
        }
        let mut response = text_response(self.status(), &format!("{self}\n"));
        if let Some(backend) = self.backend() {
            let value = crate::headers::backend_id_value(backend);
            crate::headers::set_backend_id(response.headers_mut(), &value);
        }
        response
    }
}

pub(crate) fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty_response(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(Bytes::new()));
    *response.status_mut() = status;
    response
}

pub(crate) fn text_response(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(text.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
