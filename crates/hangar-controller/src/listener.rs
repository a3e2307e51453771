//! The API listener's accept loop: serves the router over HTTP/1.1 and HTTP/2 (auto-detected, with
//! upgrades, so the node WebSockets keep working) within the configured limits, and drains when the
//! controller stops.
//!
//! Limits enforced here (see [`ControllerConfig`]): `max_connections` (a semaphore permit per
//! connection, owned by its socket, so that a WebSocket upgraded from it keeps holding the permit
//! after hyper hands the socket to the WebSocket handler); the request head size (hyper answers `431`
//! when an incomplete head fills its read buffer); `header_read_timeout` (hyper for every HTTP/1.1
//! request head, and here for the first request of any connection, which also covers the protocol
//! detection before HTTP/1.1 starts and HTTP/2 connections that never send a request); and
//! `idle_timeout` (no request started for that long: closed gracefully).
//!
//! Before this loop the controller used `axum::serve`, which sets no timer, so hyper's header
//! timeout never ran and a client sending its head a byte at a time held a connection forever.

use crate::config::ControllerConfig;
use axum::Router;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most this many over-limit connections are answered at once; beyond that they are closed
/// without an answer, so that a flood cannot make the rejections a resource problem themselves.
const MAX_REJECTING: usize = 64;
/// How long answering an over-limit connection may take (the `503`, then waiting for the client to
/// close, so that closing does not reset the connection before the client read the answer).
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// How long a stopping controller waits for open HTTP connections to finish their exchange.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The complete answer to a connection over `max_connections`.
const OVER_LIMIT_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\ncontent-length: 107\r\nconnection: close\r\nretry-after: 1\r\n\r\n\
{\"id\":\"connection-limit\",\"kind\":\"TooManyConnections\",\"message\":\"the controller is at its connection limit\"}";

/// The limits the accept loop enforces, taken from [`ControllerConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

impl ListenerLimits {
    pub(crate) fn from_config(config: &ControllerConfig) -> Self {
        ListenerLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
            max_header_bytes: config.max_header_bytes,
        }
    }
}

/// Accepts connections on `listener` and serves `app` on them until `cancel` fires; then stops
/// accepting, asks open connections to close after their current exchange and waits up to
/// [`SHUTDOWN_GRACE`] for them.
pub(crate) async fn run_api_listener(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    cancel: CancellationToken,
) {
    let builder = Arc::new(connection_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let connections = TaskTracker::new();
    let mut at_limit = false;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::warn!(%error, "Could not accept a connection");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // No Nagle: node sessions and status streams are many small frames, and Nagle plus the
        // peer's delayed ACK would hold each second one back ~40 ms (measured by hangar-bench `spawn`).
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !at_limit {
                at_limit = true;
                tracing::warn!(
                    limit = limits.max_connections,
                    "Connection limit reached; rejecting new connections"
                );
            }
            if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                connections.spawn(async move {
                    reject(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        if at_limit {
            at_limit = false;
            tracing::info!("Accepting connections again");
        }
        let connection = serve_connection(
            builder.clone(),
            stream,
            app.clone(),
            limits,
            (slot, cancel.clone()),
        );
        connections.spawn(connection);
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("Connections still open after the shutdown grace period; dropping them");
    }
}

/// The hyper connection builder with the configured limits.
fn connection_builder(limits: &ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 when an incomplete request head fills the read buffer, so the buffer
        // limit is the head size limit (its builder has no separate option). It also bounds the
        // write buffer, which only adds back-pressure.
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// When a connection was accepted and when its last request started.
struct RequestClock {
    origin: Instant,
    /// Milliseconds after `origin` at which the last request started; `u64::MAX` before the first.
    last_start_ms: AtomicU64,
}

impl RequestClock {
    fn new() -> Arc<Self> {
        Arc::new(RequestClock {
            origin: Instant::now(),
            last_start_ms: AtomicU64::new(u64::MAX),
        })
    }

    fn request_started(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_start_ms.store(ms, Ordering::Relaxed);
    }

    fn had_request(&self) -> bool {
        self.last_start_ms.load(Ordering::Relaxed) != u64::MAX
    }

    /// Completes once no request has started for `timeout` (counting from the accept).
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = match self.last_start_ms.load(Ordering::Relaxed) {
                u64::MAX => self.origin,
                ms => self.origin + Duration::from_millis(ms),
            };
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Serves one connection until it ends (or is upgraded and handed to its WebSocket handler).
///
/// Drops the connection when no request started within `header_read_timeout` of the accept or
/// [`SHUTDOWN_GRACE`] after `cancel`; closes it gracefully once idle or when `cancel` fires.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    app: Router,
    limits: ListenerLimits,
    (slot, cancel): (OwnedSemaphorePermit, CancellationToken),
) {
    let clock = RequestClock::new();
    let service_clock = clock.clone();
    let service = service_fn(move |request| {
        service_clock.request_started();
        app.clone().oneshot(request)
    });
    let stream = SlotStream {
        stream,
        _slot: slot,
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let first_request = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(first_request);
    let hard_stop = async {
        cancel.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::pin!(hard_stop);
    let mut first_checked = false;
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = &mut hard_stop => return,
            _ = &mut first_request, if !first_checked => {
                first_checked = true;
                if !clock.had_request() {
                    tracing::debug!("No request head in time; dropping the connection");
                    return;
                }
            }
            _ = cancel.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = clock.idle(limits.idle_timeout), if !closing => {
                tracing::debug!("Closing an idle connection");
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "API connection ended with an error");
    }
}

/// A client socket holding its connection's `max_connections` permit, released when the socket
/// closes, whether hyper or a WebSocket handler owns it then.
struct SlotStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for SlotStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlotStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Answers an over-limit connection with `503` and closes it (bounded by [`REJECT_LINGER`]).
async fn reject(mut stream: TcpStream) {
    let answer = async {
        stream.write_all(OVER_LIMIT_RESPONSE).await?;
        stream.shutdown().await?;
        // Discard what the client sends until it closes: closing with unread data would reset
        // the connection, and the client could lose the answer.
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REJECT_LINGER, answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_limit_response_has_the_right_length() {
        let text = std::str::from_utf8(OVER_LIMIT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["kind"], "TooManyConnections");
    }
}
