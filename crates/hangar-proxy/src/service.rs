//! The request pipeline (Plane §7.2): `/ready`, `/`, token extraction, route lookup (waiting while the
//! backend starts), host and subdomain checks, header rewriting, forwarding (HTTP or upgrade), and the
//! general headers on every response.
//!
//! Must not: buffer bodies (they stream both ways), wait without a bound (route lookups end after
//! `route_wait_timeout`, upstream connects after `upstream_connect_timeout`), or panic on anything
//! a client sends (every malformed input is an error response).

use crate::body_limit::{LimitedBody, Tripped};
use crate::error::{empty_response, full_body, ProxyBody, ProxyError};
use crate::headers::{
    apply_general_headers, check_host, is_upgrade_request, is_websocket_upgrade, set_backend_id,
    set_backend_request_headers, PreparedRoute,
};
use crate::route_cache::{LookupError, Route};
use crate::server::{ClientConnection, ListenerRole};
use crate::upgrade::Tunnel;
use crate::ProxyState;
use bytes::Bytes;
use hangar_types::token::ConnectionToken;
use http::header::{HOST, LOCATION};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// A request waiting for its route gives up (503) once the proxy has had no controller connection
/// for this long in a row, instead of waiting the whole `route_wait_timeout` for an answer that
/// cannot come.
const CONTROLLER_WAIT: Duration = Duration::from_secs(30);

/// Longest token looked up; real tokens are 43 characters (45 for static ones).
const MAX_TOKEN_LEN: usize = 256;

/// Handles one request from `client`. Never fails: errors become responses. The exchange counts
/// as in progress on the client connection until the response body is finished or dropped.
pub(crate) async fn handle_request(
    state: Arc<ProxyState>,
    client: Arc<ClientConnection>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let exchange = client.activity.begin_exchange();
    let started = std::time::Instant::now();
    let mut response = match route_request(&state, &client, req).await {
        Ok(response) => response,
        Err(e) => {
            if matches!(e, ProxyError::Upstream { .. }) {
                state.metrics.record_upstream_error();
            }
            e.into_response()
        }
    };
    state
        .metrics
        .record_request(response.status(), started.elapsed());
    apply_general_headers(response.headers_mut(), &state.server_header);
    response.map(|body| {
        GuardedBody {
            inner: body,
            _guard: exchange,
        }
        .boxed()
    })
}

async fn route_request(
    state: &ProxyState,
    client: &Arc<ClientConnection>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if client.role == ListenerRole::Redirect {
        return crate::redirect::handle_http_request(state, &req);
    }
    match req.uri().path() {
        "/ready" => return Ok(crate::redirect::ready_response(state)),
        "/" => return root_redirect(state),
        _ => {}
    }
    let limit = state.config.max_request_body_bytes;
    if !is_upgrade_request(req.headers()) && req.body().size_hint().lower() > limit {
        return Err(ProxyError::BodyTooLarge {
            limit,
            backend: None,
        });
    }
    let target = TokenPath::parse(req.uri())?;
    if !is_plausible_token(target.token.as_str()) {
        // Cannot have been issued: answer like an unknown token without asking the controller.
        return Err(ProxyError::UnknownToken);
    }
    let route = match lookup_route(state, &target.token).await? {
        Route::Found(route) => route,
        Route::Gone(reason) => return Err(ProxyError::gone(reason)),
    };
    let host = request_host(&req).ok_or(ProxyError::MissingHost)?;
    check_host(host, &route)?;
    forward(state, client, req, &route, target).await
}

/// Whether `token` could be a token the controller issued: base64url characters and the `.` of
/// static tokens, of a sane length. Anything else (percent-escapes, huge segments) is not looked up.
fn is_plausible_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Looks the token up, waiting at most `route_wait_timeout`, and giving up earlier when the proxy
/// is without a controller connection for [`CONTROLLER_WAIT`] in a row.
async fn lookup_route(state: &ProxyState, token: &ConnectionToken) -> Result<Route, ProxyError> {
    // Most requests: no waiting, so no need to watch the controller connection.
    if let Some(route) = state.route_cache.cached(token) {
        return Ok(route);
    }
    let lookup = state
        .route_cache
        .lookup(token, state.config.route_wait_timeout);
    let disconnected = disconnected_for(state.connected.subscribe(), CONTROLLER_WAIT);
    tokio::select! {
        found = lookup => match found {
            Ok(route) => Ok(route),
            Err(LookupError::TimedOut) if state.is_connected() => Err(ProxyError::RouteWaitTimeout),
            Err(LookupError::TimedOut | LookupError::Abandoned) => {
                Err(ProxyError::ControllerUnavailable)
            }
        },
        () = disconnected => Err(ProxyError::ControllerUnavailable),
    }
}

/// Completes once `connected` has been `false` for `limit` without interruption.
/// Never completes when the sender is gone (the proxy is stopping; other timeouts apply).
async fn disconnected_for(mut connected: watch::Receiver<bool>, limit: Duration) {
    loop {
        // The `Ref`s returned by `wait_for` are dropped at once: they must not live across awaits.
        let went_down = connected.wait_for(|up| !*up).await.is_ok();
        if !went_down {
            return std::future::pending().await;
        }
        let came_back = tokio::time::timeout(limit, connected.wait_for(|up| *up))
            .await
            .map(|r| r.is_ok());
        match came_back {
            Err(_elapsed) => return,
            Ok(true) => continue,
            Ok(false) => return std::future::pending().await,
        }
    }
}

fn root_redirect(state: &ProxyState) -> Result<Response<ProxyBody>, ProxyError> {
    let location = state
        .config
        .root_redirect_url
        .as_ref()
        .and_then(|url| HeaderValue::from_str(url.as_str()).ok())
        .ok_or(ProxyError::NoRootRedirect)?;
    let mut response = empty_response(StatusCode::MOVED_PERMANENTLY);
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

/// The `Host` header, or for HTTP/2 requests without one, the `:authority`.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    match req.headers().get(HOST) {
        Some(value) => value.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// The token and the paths derived from a request URI (Plane §7.3).
#[derive(Debug, PartialEq, Eq)]
struct TokenPath {
    token: ConnectionToken,
    /// Path and query to request from the backend.
    forward: String,
    /// The request's path including the token, without the query (`x-verified-path`).
    original_path: String,
}

impl TokenPath {
    /// Dynamic tokens are cut from the path (`/<tok>` and `/<tok>/` become `/`); static tokens
    /// (`s.` prefix) keep the path unchanged so the backend can build absolute links.
    fn parse(uri: &Uri) -> Result<TokenPath, ProxyError> {
        let path = uri.path();
        let rest = path.strip_prefix('/').ok_or(ProxyError::MissingToken)?;
        let (token, after) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if token.is_empty() {
            return Err(ProxyError::MissingToken);
        }
        let token = ConnectionToken::from_path_segment(token);
        let mut forward = if token.is_static() {
            path.to_string()
        } else if after.is_empty() {
            "/".to_string()
        } else {
            after.to_string()
        };
        if let Some(query) = uri.query() {
            forward.push('?');
            forward.push_str(query);
        }
        Ok(TokenPath {
            token,
            forward,
            original_path: path.to_string(),
        })
    }
}

async fn forward(
    state: &ProxyState,
    client: &Arc<ClientConnection>,
    mut req: Request<Incoming>,
    route: &PreparedRoute,
    target: TokenPath,
) -> Result<Response<ProxyBody>, ProxyError> {
    let backend = &route.backend_id;
    let upgrade = is_upgrade_request(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // An HTTP/2 client multiplexes: its requests do not queue behind each other's kept connection.
    let multiplexed = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();

    let https = client.role == ListenerRole::Https;
    set_backend_request_headers(
        &mut parts.headers,
        route,
        &target.original_path,
        &client.forwarded_for,
        https,
    )
    .map_err(|source| ProxyError::InvalidRoute {
        backend: backend.clone(),
        source,
    })?;
    if !parts.headers.contains_key(HOST) {
        // HTTP/2 clients send `:authority` instead; HTTP/1.1 backends need a Host header.
        if let Some(authority) = parts.uri.authority() {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, value);
            }
        }
    }
    // Origin form: the kept connection sends it as is, the pool is given the backend's address.
    let path = PathAndQuery::try_from(target.forward).map_err(|_| ProxyError::InvalidPath)?;
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    let limit = state.config.max_request_body_bytes;
    let (body, tripped) = if upgrade {
        (full_body(Bytes::new()), Tripped::default())
    } else {
        let (body, tripped) = LimitedBody::new(body, limit);
        (body.boxed(), tripped)
    };

    let guard = state.tracker.open(backend);
    let request = Request::from_parts(parts, body);
    let sent = if upgrade || multiplexed {
        state.upstream.send_pooled(route.address, request).await
    } else {
        (state.upstream)
            .send(&client.kept_upstream, route.address, request)
            .await
    };
    let mut response = sent.map_err(|source| {
        if tripped.is_tripped() {
            ProxyError::BodyTooLarge {
                limit,
                backend: Some(backend.clone()),
            }
        } else {
            ProxyError::Upstream {
                backend: backend.clone(),
                source,
            }
        }
    })?;

    let mut response = match client_upgrade {
        Some(client_upgrade) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let tunnel = Tunnel {
                client: client_upgrade,
                backend: hyper::upgrade::on(&mut response),
                websocket: is_websocket_upgrade(response.headers()),
                guard,
                connection: client.clone(),
            };
            let run =
                crate::upgrade::run_tunnel(tunnel, state.going_away.clone(), state.cancel.clone());
            state.tasks.spawn(state.tunnels.track_future(run));
            response.map(|_| full_body(Bytes::new()))
        }
        _ => response.map(|body| {
            GuardedBody {
                inner: body,
                _guard: guard,
            }
            .boxed()
        }),
    };
    set_backend_id(response.headers_mut(), route.backend_id_value());
    Ok(response)
}

/// A response body that holds `G` (a backend connection or a client exchange counted as open)
/// until it is finished or dropped (the client went away).
struct GuardedBody<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> Body for GuardedBody<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<TokenPath, ProxyError> {
        TokenPath::parse(&uri.parse().unwrap())
    }

    fn forward_of(uri: &str) -> String {
        parse(uri).unwrap().forward
    }

    #[test]
    fn dynamic_token_is_cut_from_the_path() {
        let p = parse("/abc123/a/b?x=1").unwrap();
        assert_eq!(p.token.as_str(), "abc123");
        assert_eq!(p.forward, "/a/b?x=1");
        assert_eq!(p.original_path, "/abc123/a/b");
        assert_eq!(forward_of("/abc123"), "/");
        assert_eq!(forward_of("/abc123/"), "/");
        assert_eq!(forward_of("/abc123?x=1&y"), "/?x=1&y");
        assert_eq!(forward_of("/abc123/?x=1"), "/?x=1");
        assert_eq!(forward_of("/abc123//double"), "//double");
    }

    #[test]
    fn static_token_keeps_the_path() {
        let p = parse("/s.abc/foobar?q=2").unwrap();
        assert!(p.token.is_static());
        assert_eq!(p.forward, "/s.abc/foobar?q=2");
        assert_eq!(p.original_path, "/s.abc/foobar");
        assert_eq!(forward_of("/s.abc"), "/s.abc");
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_give_up_after_a_continuous_disconnection() {
        // Virtual time: this test spans 110 s of it.
        tokio::time::timeout(Duration::from_secs(600), async {
            let limit = Duration::from_secs(30);
            let (tx, rx) = watch::channel(false);
            let start = tokio::time::Instant::now();
            let waiting = tokio::spawn(disconnected_for(rx, limit));
            // Reconnects within the limit restart the count.
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send_replace(true);
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert!(!waiting.is_finished());
            tx.send_replace(false);
            tokio::time::sleep(Duration::from_secs(20)).await;
            assert!(!waiting.is_finished());
            waiting.await.unwrap();
            assert_eq!(start.elapsed(), Duration::from_secs(110));
        })
        .await
        .expect("test timed out");
    }

    #[test]
    fn implausible_tokens_are_not_looked_up() {
        assert!(is_plausible_token(&ConnectionToken::random().to_string()));
        assert!(is_plausible_token(
            &ConnectionToken::random_static().to_string()
        ));
        assert!(is_plausible_token("not-a-token"));
        for bad in ["", "%41bc", "a b", "tok\u{e9}n", "a/b", &"x".repeat(257)] {
            assert!(!is_plausible_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn empty_token_is_rejected() {
        assert!(matches!(parse("//x"), Err(ProxyError::MissingToken)));
        assert!(matches!(parse("*"), Err(ProxyError::MissingToken)));
        assert!(matches!(
            parse("http://host:1//x?y"),
            Err(ProxyError::MissingToken)
        ));
        assert_eq!(forward_of("http://host:1/tok/x?y"), "/x?y");
    }
}
