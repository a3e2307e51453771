//! A controller started while its PostgreSQL server cannot be reached waits for it instead of
//! exiting: it retries with capped exponential backoff, logging every failure, and meanwhile answers
//! every HTTP request on its port with `503` in Plane's error shape, so health checks and load
//! balancers see an unhealthy controller rather than a refused connection. Errors that waiting cannot
//! fix (a wrong password, an unknown database, a failed migration, a SQLite file) still end the
//! process at once.
//!
//! Must not: serve anything but the `503` before the store is open; keep the port once the
//! controller takes it over.

use super::{Database, DatabaseKind, OpenStore};
use crate::shutdown::StopSignals;
use anyhow::Context;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hangar_client::backoff::Backoff;
use hangar_controller::ControllerConfig;
use hangar_store::StoreError;
use hangar_types::api::{ApiError, ApiErrorKind};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest one attempt to open the store may take: connecting is bounded by the store (10 s), but
/// migrating over a link that swallows packets is not.
const OPEN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the `503` responder may take to finish the requests it is answering when the store opens.
const RESPONDER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the store `db` names, waiting while its server is unreachable (see the module docs). Returns
/// the store and `listener`, or `None` when a stop signal arrived first.
pub async fn open_store_waiting(
    db: &Database,
    listener: TcpListener,
    config: &ControllerConfig,
    signals: &mut StopSignals,
) -> anyhow::Result<Option<(OpenStore, TcpListener)>> {
    let mut responder: Option<Responder> = None;
    let mut backoff = Backoff::default();
    let opened = loop {
        let attempt = tokio::select! {
            signal = signals.recv() => {
                crate::shutdown::announce(signal);
                break None;
            }
            attempt = tokio::time::timeout(OPEN_ATTEMPT_TIMEOUT, OpenStore::open(db)) => attempt,
        };
        let error = match attempt {
            Ok(Ok(store)) => break Some(store),
            Ok(Err(error)) if worth_waiting(db, &error) => error,
            Ok(Err(error)) => return Err(error),
            Err(_) => anyhow::anyhow!(
                "opening the database {} took longer than {} s",
                db.display(),
                OPEN_ATTEMPT_TIMEOUT.as_secs()
            ),
        };
        if responder.is_none() {
            responder = Some(Responder::start(&listener, config)?);
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            error = format!("{error:#}"),
            retry_in_ms = delay.as_millis(),
            "Cannot reach the database; waiting for it (health checks get 503 meanwhile)"
        );
        tokio::select! {
            signal = signals.recv() => {
                crate::shutdown::announce(signal);
                break None;
            }
            () = tokio::time::sleep(delay) => {}
        }
    };
    if let Some(responder) = responder {
        responder.stop().await;
        if opened.is_some() {
            tracing::info!(db = %db.display(), "Reached the database");
        }
    }
    Ok(opened.map(|store| (store, listener)))
}

/// Whether `error` may go away by itself: the server is down, starting, or cannot be reached.
fn worth_waiting(db: &Database, error: &anyhow::Error) -> bool {
    db.kind == DatabaseKind::Postgres
        && error
            .chain()
            .find_map(|e| e.downcast_ref::<StoreError>())
            .is_some_and(StoreError::is_retryable)
}

/// Answers every request with `503` on a second handle of the controller's listening socket, with
/// the controller's own listener limits ([`hangar_controller::serve_with_limits`]).
struct Responder {
    stop: CancellationToken,
    served: JoinHandle<()>,
}

impl Responder {
    fn start(listener: &TcpListener, config: &ControllerConfig) -> anyhow::Result<Responder> {
        let second = second_handle(listener).context("sharing the listening socket")?;
        let stop = CancellationToken::new();
        let app = Router::new().fallback(unavailable);
        let served = tokio::spawn({
            let (config, stop) = (config.clone(), stop.clone());
            async move { hangar_controller::serve_with_limits(second, app, &config, stop).await }
        });
        Ok(Responder { stop, served })
    }

    /// Stops accepting at once (the responder drops its handle of the socket), then waits a little
    /// for the requests being answered; slower connections end by the listener's own timeouts.
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(RESPONDER_STOP_TIMEOUT, self.served).await;
    }
}

/// A second tokio listener on the same socket (a duplicated descriptor).
fn second_handle(listener: &TcpListener) -> std::io::Result<TcpListener> {
    let fd = std::os::fd::AsFd::as_fd(listener).try_clone_to_owned()?;
    let std_listener = std::net::TcpListener::from(fd);
    std_listener.set_nonblocking(true)?;
    TcpListener::from_std(std_listener)
}

async fn unavailable() -> Response {
    let body = ApiError {
        id: hangar_types::token::random_token(),
        kind: ApiErrorKind::DatabaseError,
        message: "The controller is waiting for its database.".to_string(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}
