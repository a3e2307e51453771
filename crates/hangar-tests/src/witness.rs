//! [`DroneWitness`]: a stand-in for a controller that cannot reach its database. It accepts drone
//! sockets, completes the handshake, records every message drones send and answers none of them: key
//! renewals get no answer and events are never acknowledged, so a drone attached to it is cut off from
//! the store while a test can still see what it does on its own (its events carry the drone's own
//! timestamps).

use futures_util::{SinkExt, StreamExt};
use hangar_types::protocol::{DroneToController, Hello, HelloResponse};
use hangar_types::{BackendId, BackendState, ControllerName, Millis};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the witness has seen, shared with its session tasks.
#[derive(Default)]
struct Seen {
    hellos: Vec<Hello>,
    messages: Vec<DroneToController>,
}

pub struct DroneWitness {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl DroneWitness {
    /// Serves drone sockets on `listener` until [`DroneWitness::shutdown`].
    pub fn start(listener: TcpListener) -> DroneWitness {
        let addr = listener.local_addr().expect("listener address");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(run_accept(
            listener,
            seen.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        DroneWitness {
            addr,
            seen,
            cancel,
            tracker,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handshakes completed so far.
    pub fn sessions(&self) -> usize {
        self.seen.lock().expect("witness lock").hellos.len()
    }

    /// Every message received, in arrival order (replays included).
    pub fn messages(&self) -> Vec<DroneToController> {
        self.seen.lock().expect("witness lock").messages.clone()
    }

    /// The states the drone reported for `backend` with the drone's timestamps, each event once
    /// (replayed events are deduplicated by event id), in event order.
    pub fn backend_events(&self, backend: &BackendId) -> Vec<(BackendState, Millis)> {
        let mut events: Vec<(i64, BackendState, Millis)> = Vec::new();
        for message in self.messages() {
            if let DroneToController::BackendEvent {
                event_id,
                backend_id,
                state,
                timestamp,
            } = message
            {
                if &backend_id == backend && !events.iter().any(|(id, ..)| *id == event_id) {
                    events.push((event_id, state, timestamp));
                }
            }
        }
        events.sort_by_key(|(id, ..)| *id);
        events.into_iter().map(|(_, s, t)| (s, t)).collect()
    }

    /// How many key renewals were asked for `backend`.
    pub fn renewals(&self, backend: &BackendId) -> usize {
        self.messages()
            .iter()
            .filter(|m| matches!(m, DroneToController::RenewKey { backend: b, .. } if b == backend))
            .count()
    }

    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn run_accept(
    listener: TcpListener,
    seen: Arc<Mutex<Seen>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        tracker.spawn(run_witness_session(stream, seen.clone(), cancel.clone()));
    }
}

/// One drone connection: handshake, then record until the drone or the witness goes away.
async fn run_witness_session(stream: TcpStream, seen: Arc<Mutex<Seen>>, cancel: CancellationToken) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let hello = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<Hello>(&text) {
                Ok(hello) => break hello,
                Err(_) => return,
            },
            Some(Ok(_)) => continue,
            _ => return,
        }
    };
    let welcome = HelloResponse::welcome(ControllerName::random());
    let text = serde_json::to_string(&welcome).expect("welcome encodes");
    if ws.send(Message::text(text)).await.is_err() {
        return;
    }
    seen.lock().expect("witness lock").hellos.push(hello);
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return,
            frame = ws.next() => frame,
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                if let Ok(message) = serde_json::from_str::<DroneToController>(&text) {
                    seen.lock().expect("witness lock").messages.push(message);
                }
            }
            Some(Ok(_)) => {}
            _ => return,
        }
    }
}
