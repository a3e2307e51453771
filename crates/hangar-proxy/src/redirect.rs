//! The HTTP port when the proxy serves HTTPS (Plane §7.10): every request gets `301` to
//! `https://<host without port><path and query>` (the HTTPS port is not added: in production it is
//! 443). Two paths are answered here instead, which is where Hangar differs from Plane:
//! `/.well-known/acme-challenge/<token>` (ACME HTTP-01 answers, which the ACME server fetches over
//! plain HTTP on port 80) and `/ready` (so load balancer health checks work on either port).

use crate::error::{empty_response, text_response, ProxyBody, ProxyError};
use crate::ProxyState;
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode, Uri};

/// Path prefix of ACME HTTP-01 challenge answers (RFC 8555 §8.3).
pub(crate) const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Answers a request on the HTTP port in HTTPS mode.
pub(crate) fn handle_http_request<B>(
    state: &ProxyState,
    req: &Request<B>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let path = req.uri().path();
    if path == "/ready" {
        return Ok(ready_response(state));
    }
    if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PREFIX) {
        return challenge_response(state, token);
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .ok_or(ProxyError::MissingHost)?;
    let location = https_location(&host, req.uri()).ok_or(ProxyError::MissingHost)?;
    let mut response = empty_response(StatusCode::MOVED_PERMANENTLY);
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

/// `/ready`: 200 while the controller connection is up, 503 otherwise (Plane §7.13).
pub(crate) fn ready_response(state: &ProxyState) -> Response<ProxyBody> {
    let status = if state.is_connected() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    empty_response(status)
}

fn challenge_response(state: &ProxyState, token: &str) -> Result<Response<ProxyBody>, ProxyError> {
    let answer = state
        .tls
        .challenge(token)
        .ok_or(ProxyError::UnknownChallenge)?;
    Ok(text_response(StatusCode::OK, &answer))
}

/// `https://<host without port><path>[?query]`, or `None` when `host` is not a valid authority.
fn https_location(host: &str, uri: &Uri) -> Option<HeaderValue> {
    let authority: http::uri::Authority = host.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path_and_query = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        "/"
    };
    HeaderValue::from_str(&format!("https://{host}{path_and_query}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: &str, uri: &str) -> Option<String> {
        https_location(host, &uri.parse().unwrap()).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn locations_keep_path_and_query_and_drop_the_port() {
        for (host, uri, expected) in [
            ("foo.bar.baz", "/", Some("https://foo.bar.baz/")),
            (
                "foo.bar.baz:8080",
                "/abc/123",
                Some("https://foo.bar.baz/abc/123"),
            ),
            (
                "foo.bar.baz",
                "/abc?a=1&b=2",
                Some("https://foo.bar.baz/abc?a=1&b=2"),
            ),
            ("foo.bar.baz", "/?a=1", Some("https://foo.bar.baz/?a=1")),
            ("[::1]:80", "/x", Some("https://[::1]/x")),
            (
                "foo.bar.baz",
                "http://other/abs?q",
                Some("https://foo.bar.baz/abs?q"),
            ),
            ("", "/", None),
            ("user@evil.test", "/", None),
            ("bad host", "/", None),
            ("foo.bar.baz", "*", Some("https://foo.bar.baz/")),
        ] {
            assert_eq!(location(host, uri).as_deref(), expected, "{host} {uri}");
        }
    }
}
