//! The accept loop: serves every client connection with HTTP/1.1 and HTTP/2 (prior knowledge)
//! auto-detection and upgrade support, and drains gracefully when asked to stop.

use crate::service::handle_request;
use crate::ProxyState;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections until `drain` fires; then stops accepting (the listener is closed, so new
/// connections are refused), tells open connections to close after their current exchange and waits
/// up to `shutdown_grace` for them. Upgraded tunnels are not waited for here.
pub(crate) async fn run_accept_loop(
    listener: TcpListener,
    state: Arc<ProxyState>,
    drain: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let service_state = state.clone();
        let service = service_fn(move |req| {
            let state = service_state.clone();
            async move { Ok::<_, Infallible>(handle_request(state, peer, req).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let cancel = state.cancel.clone();
        state.tasks.spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "Client connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => {}
            }
        });
    }
    drop(listener);
    let grace = state.config.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "Connections still open after the shutdown grace period; dropping them"
        );
    }
}
