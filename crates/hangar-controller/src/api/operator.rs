//! Read-only operator views that Plane has only in `db-cli` (which needs database access), served
//! over the API instead: the sweeper's termination candidates of a drone, and the live event bus.
//! They only read: nothing here changes a backend, a key or a node.

use crate::api::nodes::{parse_cluster, parse_drone};
use crate::api::{ApiPath, AppState};
use crate::error::ApiError;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use hangar_store::StoreEvent;
use hangar_types::api::{BusEvent, SweepReason, TerminationCandidate, TerminationCandidates};
use hangar_types::timing::SSE_KEEPALIVE;
use hangar_types::{ClusterName, DroneName, Millis};
use serde_json::json;
use std::convert::Infallible;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Events buffered between the bus task and one `/ctrl/events` response. When full, the task waits;
/// the bus then lags, and the client is told how many events it missed.
const EVENTS_BUFFER: usize = 64;

/// `GET /ctrl/c/{cluster}/d/{drone}/termination-candidates`: the backends the sweeper would
/// terminate now, with the limit each one passed (404 for an unknown drone).
#[utoipa::path(get, path = "/ctrl/c/{cluster}/d/{drone}/termination-candidates", tag = "ctrl", params(("cluster" = ClusterName, Path, description = "Cluster"), ("drone" = DroneName, Path, description = "Drone")), responses((status = 200, description = "Backends the sweeper would terminate now", body = TerminationCandidates)))]
pub async fn termination_candidates_get(
    State(state): State<AppState>,
    ApiPath((cluster, drone)): ApiPath<(String, String)>,
) -> Result<Json<TerminationCandidates>, ApiError> {
    let cluster = parse_cluster(&cluster)?;
    let drone = parse_drone(&drone)?;
    let store = &state.store;
    let attached = store.drone_attachment(&cluster, &drone).await;
    let attachment = ApiError::found(attached, "Drone does not exist")?;
    let now = store
        .now()
        .await
        .map_err(ApiError::store("Database error"))?;
    let ids = store
        .sweep_candidates(attachment.node)
        .await
        .map_err(ApiError::store("Database error"))?;
    let mut candidates = Vec::with_capacity(ids.len());
    for id in ids {
        // A backend deleted meanwhile (cleanup) is simply no longer a candidate.
        let Some(row) = store
            .backend(&id)
            .await
            .map_err(ApiError::store("Database error"))?
        else {
            continue;
        };
        let lifetime_passed = row
            .lifetime_limit_seconds
            .is_some_and(|limit| now.0 - row.created_at.0 >= i64::from(limit) * 1000);
        candidates.push(TerminationCandidate {
            backend_id: row.id,
            status: row.state.status(),
            reason: if lifetime_passed {
                SweepReason::Lifetime
            } else {
                SweepReason::Idle
            },
            created_at: row.created_at,
            status_time: row.state_time,
            max_idle_seconds: row.max_idle_seconds,
            lifetime_limit_seconds: row.lifetime_limit_seconds,
        });
    }
    Ok(Json(TerminationCandidates { now, candidates }))
}

/// `GET /ctrl/events`: every event of the store's bus from now on (all controllers sharing a
/// PostgreSQL store), as Server-Sent Events whose data is a [`BusEvent`]. Private keys and secrets
/// (certificate keys, challenge answers, revoked tokens) are left out of the payloads.
#[utoipa::path(get, path = "/ctrl/events", tag = "ctrl", responses((status = 200, description = "Server-Sent Events of the controllers' event bus", content_type = "text/event-stream", body = BusEvent)))]
pub async fn events_get(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = state.store.events().subscribe();
    let (tx, rx) = mpsc::channel(EVENTS_BUFFER);
    state
        .tracker
        .spawn(run_event_stream(events, tx, state.cancel.child_token()));
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
}

async fn run_event_stream(
    mut events: broadcast::Receiver<StoreEvent>,
    tx: mpsc::Sender<Event>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            event = events.recv() => event,
        };
        let bus_event = match event {
            Ok(event) => bus_event(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => BusEvent {
                time: Millis::now(),
                kind: "lagged".into(),
                key: None,
                payload: json!({ "missed": missed }),
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let data = match serde_json::to_string(&bus_event) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(error = %e, "Failed to encode a bus event");
                continue;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            sent = tx.send(Event::default().data(data)) => if sent.is_err() { return },
        }
    }
}

/// The wire form of a store event (kinds and keys as in Plane's event table).
fn bus_event(event: StoreEvent) -> BusEvent {
    let (time, kind, key, payload) = match event {
        StoreEvent::BackendState {
            backend,
            state,
            time,
        } => (
            Some(time),
            "backend_state",
            Some(backend.to_string()),
            to_json(&state),
        ),
        StoreEvent::Action { drone, action } => (
            None,
            "backend_action",
            Some(drone.to_string()),
            to_json(&action),
        ),
        StoreEvent::TokensRevoked { tokens, .. } => (
            None,
            "tokens_revoked",
            None,
            json!({ "count": tokens.len() }),
        ),
        StoreEvent::HttpChallenge {
            cluster,
            token,
            key_authorization,
        } => (
            None,
            "http_challenge",
            Some(cluster.to_string()),
            json!({ "token": token, "set": key_authorization.is_some() }),
        ),
        StoreEvent::Certificate(cert) => (
            Some(cert.stored_at),
            "certificate",
            Some(cert.cluster.to_string()),
            json!({ "stored_at": cert.stored_at }),
        ),
    };
    BusEvent {
        time: time.unwrap_or_else(Millis::now),
        kind: kind.into(),
        key,
        payload,
    }
}

/// A payload as JSON (`null` in the impossible case that a protocol type does not serialize).
fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}
