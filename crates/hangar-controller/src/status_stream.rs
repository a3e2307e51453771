//! `GET /pub/b/{backend}/status-stream`: a backend's status history, then its live changes, as
//! Server-Sent Events (plane-api.md §2.4.8).
//!
//! Invariants: statuses are emitted in strictly increasing order (the overlap between history and live
//! events, and anything at or before `Last-Event-ID`, is skipped); the subscription is taken before the
//! history is read, so nothing falls in between; a lagging subscription re-reads the history instead of
//! ending the stream (Plane quirk 11). The stream never ends by itself, only when the client goes away
//! or the controller shuts down.

use crate::api::AppState;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use hangar_store::{Store, StoreEvent};
use hangar_types::timing::SSE_KEEPALIVE;
use hangar_types::{BackendId, BackendState, BackendStatus, Millis};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Events buffered between the stream task and the HTTP response. When full, the task waits (a slow
/// client slows only its own stream; the event bus then lags and the task resyncs from history).
const STREAM_BUFFER: usize = 16;

/// Starts the stream task and returns the SSE response body.
pub fn open(
    state: &AppState,
    backend: BackendId,
    resume_after: Option<BackendStatus>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // Subscribe before the task reads the history, so no state falls between the two.
    let events = state.store.events().subscribe();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let stream = StatusStream {
        store: state.store.clone(),
        backend,
        last: resume_after,
        tx,
        cancel: state.cancel.child_token(),
    };
    state.tracker.spawn(stream.run_status_stream(events));
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
}

struct StatusStream {
    store: Arc<dyn Store>,
    backend: BackendId,
    /// Last status sent (or resumed after); only later statuses are sent.
    last: Option<BackendStatus>,
    tx: mpsc::Sender<Event>,
    cancel: CancellationToken,
}

impl StatusStream {
    async fn run_status_stream(mut self, mut events: broadcast::Receiver<StoreEvent>) {
        if self.replay_history().await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.tx.closed() => return,
                event = events.recv() => event,
            };
            let sent = match event {
                Ok(StoreEvent::BackendState {
                    backend,
                    state,
                    time,
                }) if backend == self.backend => self.send(&state, time).await,
                Ok(_) => Ok(()),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(backend = %self.backend, missed, "Status stream lagged, re-reading history");
                    self.replay_history().await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// Sends every recorded state after `last`. `Err` ends the stream (the client reconnects with
    /// `Last-Event-ID`).
    async fn replay_history(&mut self) -> Result<(), StreamEnded> {
        let history = match self.store.backend_history(&self.backend).await {
            Ok(history) => history,
            Err(e) => {
                tracing::warn!(backend = %self.backend, error = %e, "Failed to read backend history for status stream");
                return Err(StreamEnded);
            }
        };
        for (state, time) in history {
            self.send(&state, time).await?;
        }
        Ok(())
    }

    /// Sends one state unless its status is not after the last one sent.
    async fn send(&mut self, state: &BackendState, time: Millis) -> Result<(), StreamEnded> {
        let status = state.status();
        if self.last.is_some_and(|last| status <= last) {
            return Ok(());
        }
        let entry = state.to_status_entry(time);
        let data = match serde_json::to_string(&entry) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(backend = %self.backend, error = %e, "Failed to encode status entry");
                return Ok(());
            }
        };
        let event = Event::default().data(data).id(status.as_str());
        tokio::select! {
            _ = self.cancel.cancelled() => return Err(StreamEnded),
            sent = self.tx.send(event) => sent.map_err(|_| StreamEnded)?,
        }
        self.last = Some(status);
        Ok(())
    }
}

/// The client went away, the controller is shutting down, or the store failed.
struct StreamEnded;
