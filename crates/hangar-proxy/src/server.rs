//! The accept loops: serve every client connection with HTTP/1.1 and HTTP/2 (prior knowledge, or
//! ALPN `h2` over TLS) auto-detection and upgrade support, within the configured limits, and drain
//! gracefully when asked to stop. One loop per listener: the plain HTTP port, the HTTPS port (TLS
//! handshake first, bounded by `header_read_timeout`), or HTTPS mode's redirecting HTTP port.
//!
//! Limits enforced here: `max_connections` (a semaphore permit per connection, held by upgraded
//! tunnels too; over the limit a connection gets a minimal `503` and is closed), request head size
//! and count (hyper answers `431`), `header_read_timeout` (hyper for each HTTP/1.1 request head, and
//! here for the first request of any connection, which also covers the protocol detection hyper
//! does before HTTP/1.1 starts), and `idle_timeout`.

use crate::activity::{ActivityIo, ConnectionActivity};
use crate::config::{ProxyConfig, DEFAULT_MAX_HEADERS};
use crate::headers::{apply_general_headers, forwarded_for_value};
use crate::service::handle_request;
use crate::signal::Signals;
use crate::upstream::KeptConnection;
use crate::ProxyState;
use http::{header, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most this many over-limit connections are being answered at once; beyond that they are
/// closed without an answer, so a flood cannot make the rejections themselves a resource problem.
const MAX_REJECTING: usize = 64;
/// How long answering an over-limit connection may take (write the `503`, then wait for the
/// client to close so that closing does not reset the connection before the client read it).
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// Body of the over-limit response.
const OVER_LIMIT_BODY: &str = "the proxy is at its connection limit; try again later\n";

/// What a listener serves.
#[derive(Clone)]
pub(crate) enum ListenerKind {
    /// The proxy service over plain HTTP (HTTP-only mode).
    Http,
    /// The proxy service over TLS (HTTPS mode's HTTPS port).
    Https(TlsAcceptor),
    /// HTTPS mode's HTTP port: redirects to HTTPS, ACME HTTP-01 answers and `/ready`.
    Redirect,
}

/// How a client connection reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerRole {
    Http,
    Https,
    Redirect,
}

/// A client connection, as the request pipeline sees it.
pub(crate) struct ClientConnection {
    pub(crate) peer: SocketAddr,
    /// `x-forwarded-for` for this connection's requests: the peer's address (an IPv4 address
    /// mapped into IPv6 as the IPv4 address).
    pub(crate) forwarded_for: HeaderValue,
    pub(crate) activity: Arc<ConnectionActivity>,
    pub(crate) role: ListenerRole,
    /// The backend connection this client connection's plain requests go to, once it has one.
    pub(crate) kept_upstream: KeptConnection,
    /// One of the `max_connections` permits; released when the connection and every tunnel
    /// upgraded from it have ended.
    _slot: OwnedSemaphorePermit,
}

/// Accepts connections for connection worker `worker` (`workers.rs`) until `drain` fires; then stops
/// accepting (the listener is closed, so new connections are refused), tells open connections to
/// close after their current exchange and waits up to `shutdown_grace` for them. Upgraded tunnels
/// are not waited for here.
pub(crate) async fn run_accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    state: Arc<ProxyState>,
    worker: usize,
    drain: CancellationToken,
) {
    let builder = Arc::new(connection_builder(&state.config));
    let connections = TaskTracker::new();
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let mut at_limit = false;
    loop {
        let accepted = tokio::select! {
            _ = drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "Could not accept a connection");
                tokio::select! {
                    _ = drain.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(accepted) = state.accepted_per_worker.get(worker) {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let slot = match state.connection_slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !at_limit {
                    at_limit = true;
                    tracing::warn!(
                        limit = state.config.max_connections,
                        "Connection limit reached; rejecting new connections"
                    );
                }
                // Over TLS a plain-text answer would be garbage to the client: just close.
                if matches!(kind, ListenerKind::Https(_)) {
                    continue;
                }
                if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                    let cancel = state.cancel.clone();
                    let response = over_limit_response(&state.server_header);
                    state.tasks.spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = reject(stream, &response) => {}
                        }
                        drop(permit);
                    });
                }
                continue;
            }
        };
        if at_limit {
            at_limit = false;
            tracing::info!("Accepting connections again");
        }
        let client = Accepted { stream, peer, slot };
        let task = serve_client(
            state.clone(),
            builder.clone(),
            client,
            kind.clone(),
            drain.clone(),
        );
        state.tasks.spawn(connections.track_future(task));
    }
    drop(listener);
    connections.close();
    let grace = state.config.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "Connections still open after the shutdown grace period; dropping them"
        );
    }
}

/// A connection just accepted, with its permit.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
}

/// Serves one accepted connection: the TLS handshake first on the HTTPS listener (bounded by
/// `header_read_timeout`, like a request head), then HTTP.
async fn serve_client(
    state: Arc<ProxyState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    accepted: Accepted,
    kind: ListenerKind,
    drain: CancellationToken,
) {
    let Accepted { stream, peer, slot } = accepted;
    let activity = ConnectionActivity::new();
    let io = ActivityIo::new(stream, activity.clone());
    let (role, acceptor) = match kind {
        ListenerKind::Http => (ListenerRole::Http, None),
        ListenerKind::Redirect => (ListenerRole::Redirect, None),
        ListenerKind::Https(acceptor) => (ListenerRole::Https, Some(acceptor)),
    };
    let client = Arc::new(ClientConnection {
        peer,
        forwarded_for: forwarded_for_value(peer.ip().to_canonical()),
        activity: activity.clone(),
        role,
        kept_upstream: KeptConnection::default(),
        _slot: slot,
    });
    let Some(acceptor) = acceptor else {
        return serve_http(state, &builder, io, client, drain).await;
    };
    let handshake = tokio::time::timeout(state.config.header_read_timeout, acceptor.accept(io));
    let tls = tokio::select! {
        _ = state.cancel.cancelled() => return,
        _ = drain.cancelled() => return,
        tls = handshake => tls,
    };
    match tls {
        Ok(Ok(tls)) => serve_http(state, &builder, tls, client, drain).await,
        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "No TLS handshake in time; dropping the connection"),
    }
}

/// Serves HTTP/1.1 or HTTP/2 (detected from the first bytes; ALPN only tells the client which to
/// send) on `io` until the connection ends.
///
/// Not an `async fn`: the future is built and boxed here, where its types are concrete, because the
/// compiler cannot prove an `async fn` over hyper's generic connection `Send` (its error bounds are
/// checked with erased lifetimes).
fn serve_http<I>(
    state: Arc<ProxyState>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    client: Arc<ClientConnection>,
    drain: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = client.activity.clone();
    let peer = client.peer;
    let service_state = state.clone();
    let service = service_fn(move |req| {
        let state = service_state.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle_request(state, client, req).await) }
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    Box::pin(run_connection(state, connection, activity, drain, peer))
}

/// The hyper connection builder with the configured limits.
fn connection_builder(config: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // hyper answers 431 when an incomplete request head fills the read buffer, so the buffer
        // limit is the head size limit (its public builder has no separate option). It also bounds
        // the write buffer, which only adds back-pressure.
        .max_buf_size(config.max_header_bytes);
    // A non-default count makes hyper allocate the header array on the heap for every request.
    if config.max_headers != DEFAULT_MAX_HEADERS {
        http1.max_headers(config.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Drives one client connection until it ends: closes it gracefully (after the exchange in
/// progress) on `drain` or once idle, and drops it when no request head arrived within
/// `header_read_timeout` of accepting it, or on the hard stop.
///
/// The signals are polled only when they fire, not on each of the connection's wake-ups
/// ([`Signals`]).
async fn run_connection<C>(
    state: Arc<ProxyState>,
    connection: C,
    activity: Arc<ConnectionActivity>,
    drain: CancellationToken,
    peer: SocketAddr,
) where
    C: GracefulConnection,
    C::Error: Display,
{
    enum Signal {
        Stop,
        FirstRequestDue,
        Drain,
        Idle,
    }
    let mut signals = Signals::new();
    signals.push(async {
        state.cancel.cancelled().await;
        Signal::Stop
    });
    signals.push(async {
        tokio::time::sleep(state.config.header_read_timeout).await;
        Signal::FirstRequestDue
    });
    signals.push(async {
        drain.cancelled().await;
        Signal::Drain
    });
    signals.push(async {
        activity.idle(state.config.idle_timeout).await;
        Signal::Idle
    });
    let mut closing = false;
    tokio::pin!(connection);
    let result = loop {
        let signal = tokio::select! {
            biased;
            result = connection.as_mut() => break result,
            signal = signals.next() => signal,
        };
        match signal {
            Signal::Stop => return,
            Signal::FirstRequestDue => {
                if !activity.had_exchange() {
                    tracing::debug!(%peer, "No request head in time; dropping the connection");
                    return;
                }
            }
            Signal::Drain | Signal::Idle if !closing => {
                if matches!(signal, Signal::Idle) {
                    tracing::debug!(%peer, "Closing an idle client connection");
                }
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            // Already closing: the other of the two changes nothing.
            Signal::Drain | Signal::Idle => {}
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "Client connection ended with an error");
    }
}

/// The complete HTTP/1.1 response for a connection over the limit.
fn over_limit_response(server: &HeaderValue) -> Vec<u8> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(OVER_LIMIT_BODY.len()),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    apply_general_headers(&mut headers, server);
    let mut response = b"HTTP/1.1 503 Service Unavailable\r\n".to_vec();
    for (name, value) in &headers {
        response.extend_from_slice(name.as_str().as_bytes());
        response.extend_from_slice(b": ");
        response.extend_from_slice(value.as_bytes());
        response.extend_from_slice(b"\r\n");
    }
    response.extend_from_slice(b"\r\n");
    response.extend_from_slice(OVER_LIMIT_BODY.as_bytes());
    response
}

/// Answers an over-limit connection with `response` and closes it (bounded by [`REJECT_LINGER`]).
async fn reject(mut stream: TcpStream, response: &[u8]) {
    let answer = async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        // Discard what the client sends until it closes; closing with unread data would reset the
        // connection, and the client could lose the response.
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REJECT_LINGER, answer).await;
}
