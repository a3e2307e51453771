//! Plane's forward auth (`--forward-auth URL`, plane-api.md §2.5): before a `/ctrl/*` request (node
//! sockets included), the dashboard page or `/metrics` is handled, the controller asks an auth service.
//!
//! The side request has the original method, the original end-to-end headers, no body, and:
//! - `x-original-path`: the request path without its `/ctrl` prefix (`/status` for `/ctrl/status`),
//!   exactly as Plane sends it, so auth services written for Plane keep matching on it; paths outside
//!   `/ctrl` (`/metrics`, `/dashboard`) are sent whole;
//! - `x-original-uri`: the whole original path and query (Hangar; nginx's `auth_request` habit);
//! - `x-forwarded-host`: the original `Host`; the side request's own `Host` is the auth service's
//!   (Plane copied the original `Host`, which breaks virtual hosting behind TLS);
//! - `authorization: Bearer TOKEN` when the client sent HTTP basic auth with username `TOKEN` and no
//!   password (what `curl http://TOKEN@host` does); a bearer header is passed on as it is.
//!
//! A 2xx answer lets the request through. Any other answer (401, 403, a 302 to a login page…) is
//! returned to the client as it is: status, end-to-end headers and body (at most
//! [`MAX_DENIAL_BODY`]); redirects are never followed. Plane answered every denial with a bare 401.
//! An auth service that cannot be reached gives 502, one that does not answer within
//! `forward_auth_timeout` gives 504, both in Plane's `{id, kind, message}` shape; the message says
//! what failed, and the URL and cause are logged under the error id (never sent to a client that has
//! not been authorized).

use crate::api::AppState;
use crate::config::{redacted_url, ConfigError, ControllerConfig};
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use std::time::Duration;
use url::Url;

/// Largest body of a denial that is passed on to the client; a larger one gives 502.
pub const MAX_DENIAL_BODY: usize = 64 * 1024;

/// Headers that belong to one connection (RFC 9110 §7.6.1) or describe a body that the side request
/// does not carry: never copied between the client, the auth service and back.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

/// Why the auth service gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardAuthError {
    #[error("The forward-auth service could not be reached.")]
    Unreachable(#[source] CalloutError),
    #[error("The forward-auth service did not answer within {timeout_ms} ms.")]
    TimedOut { timeout_ms: u128 },
    #[error("The forward-auth service's denial is larger than {MAX_DENIAL_BODY} bytes.")]
    DenialTooLarge,
}

impl ForwardAuthError {
    /// 502 when the service failed, 504 when it was too slow.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardAuthError::Unreachable(_) | ForwardAuthError::DenialTooLarge => {
                StatusCode::BAD_GATEWAY
            }
            ForwardAuthError::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// The failed side request, for the log (its URL with any password redacted).
#[derive(Debug, thiserror::Error)]
#[error("request to {url} failed")]
pub struct CalloutError {
    url: String,
    #[source]
    source: reqwest::Error,
}

/// The configured auth service and the HTTP client that calls it.
#[derive(Debug)]
pub struct ForwardAuth {
    url: Url,
    client: reqwest::Client,
    timeout: Duration,
}

/// What the auth service decided.
pub enum Verdict {
    Allow,
    /// The auth service's answer, to return to the client.
    Deny(Response),
}

impl ForwardAuth {
    /// `None` when `forward_auth` is not configured. Reads `forward_auth_ca_cert`.
    pub fn from_config(config: &ControllerConfig) -> Result<Option<ForwardAuth>, ConfigError> {
        let Some(url) = &config.forward_auth else {
            return Ok(None);
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // A redirect is the auth service's answer to the client (e.g. to a login page).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &config.forward_auth_ca_cert {
            let ca_error = |reason: String| ConfigError::ForwardAuthCaCert {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no PEM certificate in it".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| ConfigError::ForwardAuthCaCert {
                path: "(built-in roots)".into(),
                reason: e.to_string(),
            })?;
        Ok(Some(ForwardAuth {
            url: url.clone(),
            client,
            timeout: config.forward_auth_timeout,
        }))
    }

    /// Asks the auth service about a request with this method, URI and headers.
    pub async fn check(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Verdict, ForwardAuthError> {
        let request = self
            .client
            .request(method.clone(), self.url.clone())
            .headers(side_request_headers(uri, headers));
        let answer = async {
            let response = request.send().await.map_err(|e| self.unreachable(e))?;
            if response.status().is_success() {
                return Ok(Verdict::Allow);
            }
            self.denial(response).await.map(Verdict::Deny)
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .unwrap_or(Err(ForwardAuthError::TimedOut {
                timeout_ms: self.timeout.as_millis(),
            }))
    }

    fn unreachable(&self, source: reqwest::Error) -> ForwardAuthError {
        ForwardAuthError::Unreachable(CalloutError {
            url: redacted_url(&self.url),
            source: source.without_url(),
        })
    }

    /// The denial returned to the client: the auth service's status, end-to-end headers and body.
    async fn denial(&self, mut response: reqwest::Response) -> Result<Response, ForwardAuthError> {
        let status = response.status();
        let mut headers = response.headers().clone();
        strip_hop_by_hop(&mut headers);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.unreachable(e))? {
            if body.len() + chunk.len() > MAX_DENIAL_BODY {
                return Err(ForwardAuthError::DenialTooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let mut denial = Response::new(Body::from(body));
        *denial.status_mut() = status;
        *denial.headers_mut() = headers;
        Ok(denial)
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// `x-original-path` as Plane sends it: the path under `/ctrl` (`/status`), other paths whole.
fn original_path(path: &str) -> &str {
    match path.strip_prefix("/ctrl") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path,
    }
}

/// The token of `Authorization: Basic base64(TOKEN:)` (a URL's user name without a password).
pub(crate) fn basic_auth_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    (!user.is_empty() && password.is_empty()).then(|| user.to_string())
}

fn side_request_headers(uri: &Uri, original: &HeaderMap) -> HeaderMap {
    let mut headers = original.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::EXPECT);
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Some(token) = basic_auth_user(original) {
        if let Ok(value) = HeaderValue::try_from(format!("Bearer {token}")) {
            headers.insert(header::AUTHORIZATION, value);
        }
    }
    let path = uri.path();
    // Both come from a parsed URI, so they are valid header values; a failure only drops the header.
    if let Ok(value) = HeaderValue::try_from(original_path(path)) {
        headers.insert(HeaderName::from_static("x-original-path"), value);
    }
    let path_and_query = uri.path_and_query().map_or(path, |pq| pq.as_str());
    if let Ok(value) = HeaderValue::try_from(path_and_query) {
        headers.insert(HeaderName::from_static("x-original-uri"), value);
    }
    headers
}

/// The middleware: lets the request through when forward auth is off or the auth service answers
/// 2xx; otherwise answers with the denial or the error.
pub async fn require_forward_auth(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(auth) = state.forward_auth.as_deref() else {
        return next.run(req).await;
    };
    match auth.check(req.method(), req.uri(), req.headers()).await {
        Ok(Verdict::Allow) => next.run(req).await,
        Ok(Verdict::Deny(denial)) => {
            tracing::debug!(status = %denial.status(), path = %req.uri().path(), "Forward auth denied a request");
            denial
        }
        Err(e) => ApiError::ForwardAuth(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_path_drops_only_the_ctrl_prefix() {
        assert_eq!(original_path("/ctrl/status"), "/status");
        assert_eq!(
            original_path("/ctrl/c/plane.test/drone-socket"),
            "/c/plane.test/drone-socket"
        );
        assert_eq!(original_path("/ctrl"), "");
        assert_eq!(original_path("/ctrlx/a"), "/ctrlx/a");
        assert_eq!(original_path("/metrics"), "/metrics");
        assert_eq!(original_path("/dashboard"), "/dashboard");
    }

    #[test]
    fn side_request_headers_follow_plane_and_drop_hop_by_hop_ones() {
        let mut original = HeaderMap::new();
        original.insert(header::HOST, HeaderValue::from_static("ctrl:8080"));
        original.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-hop"),
        );
        original.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        original.insert("x-hop", HeaderValue::from_static("1"));
        original.insert("sec-websocket-key", HeaderValue::from_static("abc"));
        original.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        original.insert("x-custom", HeaderValue::from_static("kept"));
        // `curl http://tok@host/` sends basic auth with an empty password.
        original.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dG9rOg=="),
        );
        let uri: Uri = "/ctrl/c/x/drone-socket?pool=gpu".parse().unwrap();
        let h = side_request_headers(&uri, &original);
        assert_eq!(h["x-original-path"], "/c/x/drone-socket");
        assert_eq!(h["x-original-uri"], "/ctrl/c/x/drone-socket?pool=gpu");
        assert_eq!(h["x-forwarded-host"], "ctrl:8080");
        assert_eq!(h[header::AUTHORIZATION], "Bearer tok");
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h["sec-websocket-key"], "abc");
        for gone in ["host", "connection", "upgrade", "x-hop", "content-length"] {
            assert!(h.get(gone).is_none(), "{gone} was copied");
        }
    }

    #[test]
    fn only_password_less_basic_auth_becomes_a_bearer_token() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            basic_auth_user(&h)
        };
        assert_eq!(with("Basic dG9rOg==").as_deref(), Some("tok"));
        assert_eq!(with("Basic dXNlcjpwdw=="), None); // user:pw
        assert_eq!(with("Bearer tok"), None);
        assert_eq!(with("Basic !!!"), None);
    }
}
