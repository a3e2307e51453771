//! A minimal controller for drone tests: accepts drone sockets, answers `Hello` with `Welcome`, and
//! hands each connection to the test, which reads what the drone sends and sends what it likes.
//! Dropping a [`FakeConnection`] cuts the TCP connection without a close handshake.

use futures_util::{SinkExt, StreamExt};
use hangar_types::protocol::{
    ActionMessage, BackendAction, ControllerToDrone, DroneToController, Hello, HelloResponse,
    KeyDeadlines,
};
use hangar_types::{ActionId, BackendId, BackendState, ControllerName, Millis};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

/// How long a test waits for the drone's next message.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);

pub struct FakeController {
    url: Url,
    connections: mpsc::Receiver<FakeConnection>,
    accept: JoinHandle<()>,
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

pub struct FakeConnection {
    pub hello: Hello,
    /// Request path of the WebSocket upgrade.
    pub path: String,
    incoming: mpsc::UnboundedReceiver<DroneToController>,
    outgoing: mpsc::UnboundedSender<ControllerToDrone>,
    /// Messages read ahead while looking for an action ack.
    pending: VecDeque<DroneToController>,
    /// Action acks seen so far.
    acks: Vec<ActionId>,
    /// Ids of every backend event received.
    events: Vec<i64>,
    /// The newest event [`FakeConnection::next_event`] returned: older ones arriving later are the
    /// drone's resends of unacked events, which a controller records idempotently and these skip.
    delivered_up_to: i64,
}

impl FakeController {
    pub async fn start() -> FakeController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (tx, connections) = mpsc::channel(16);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, tx.clone()));
            }
        });
        FakeController {
            url,
            connections,
            accept,
        }
    }

    pub fn url(&self) -> Url {
        self.url.clone()
    }

    /// The next drone connection (after its handshake).
    pub async fn next_connection(&mut self) -> FakeConnection {
        tokio::time::timeout(RECV_TIMEOUT, self.connections.recv())
            .await
            .expect("no drone connected")
            .expect("accept loop ended")
    }
}

async fn serve(stream: tokio::net::TcpStream, connections: mpsc::Sender<FakeConnection>) {
    let mut path = String::new();
    // The error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let hello: Hello = match ws.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).unwrap(),
        _ => return,
    };
    let welcome = HelloResponse::welcome(ControllerName::random());
    let welcome = serde_json::to_string(&welcome).unwrap();
    if ws.send(Message::text(welcome)).await.is_err() {
        return;
    }
    let (to_test, incoming) = mpsc::unbounded_channel();
    let (outgoing, mut from_test) = mpsc::unbounded_channel();
    let connection = FakeConnection {
        hello,
        path,
        incoming,
        outgoing,
        pending: VecDeque::new(),
        acks: Vec::new(),
        events: Vec::new(),
        delivered_up_to: 0,
    };
    if connections.send(connection).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let message = serde_json::from_str(text.as_str()).unwrap();
                    if to_test.send(message).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
            message = from_test.recv() => match message {
                Some(message) => {
                    let text = serde_json::to_string(&message).unwrap();
                    if ws.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                // The test dropped the connection: cut it.
                None => return,
            },
        }
    }
}

impl FakeConnection {
    pub fn send(&self, message: ControllerToDrone) {
        self.outgoing.send(message).unwrap();
    }

    /// Answers the drone's `RenewKey` for `backend`; `None` refuses the renewal.
    pub fn answer_renewal(&self, backend: &BackendId, deadlines: Option<KeyDeadlines>) {
        self.send(ControllerToDrone::RenewKeyResponse {
            backend: backend.clone(),
            deadlines,
        });
    }

    pub fn send_action(&self, backend: &BackendId, action: BackendAction) -> ActionId {
        let action_id = ActionId::random();
        self.send(ControllerToDrone::Action(ActionMessage {
            action_id: action_id.clone(),
            backend_id: backend.clone(),
            action,
        }));
        action_id
    }

    /// The next message, heartbeats included; `None` when the drone closed the connection.
    pub async fn recv(&mut self) -> Option<DroneToController> {
        let message = tokio::time::timeout(RECV_TIMEOUT, self.incoming.recv())
            .await
            .expect("the drone sent nothing");
        if let Some(DroneToController::BackendEvent { event_id, .. }) = &message {
            self.events.push(*event_id);
        }
        message
    }

    /// Shuts the drone down like a live controller would see it: every event received (before and
    /// during the shutdown) is acked, until the drone closes the connection.
    pub async fn shutdown_drone(mut self, drone: hangar_drone::DroneHandle) {
        let shutdown = tokio::spawn(drone.shutdown());
        for event_id in std::mem::take(&mut self.events) {
            self.ack(event_id);
        }
        while let Some(message) = self.recv().await {
            if let DroneToController::BackendEvent { event_id, .. } = message {
                self.ack(event_id);
            }
        }
        shutdown.await.unwrap();
    }

    /// The next message that is neither a heartbeat nor an action ack (acks are remembered for
    /// [`FakeConnection::wait_ack`]).
    pub async fn next(&mut self) -> DroneToController {
        if let Some(message) = self.pending.pop_front() {
            return message;
        }
        loop {
            match self.recv().await.expect("connection closed") {
                DroneToController::Heartbeat { .. } => {}
                DroneToController::AckAction { action_id } => self.acks.push(action_id),
                other => return other,
            }
        }
    }

    /// Waits until the drone acked `action` (now or earlier), keeping other messages for later.
    pub async fn wait_ack(&mut self, action: &ActionId) {
        self.wait_acks(action, 1).await;
    }

    /// Waits until the drone acked `action` `count` times in all.
    pub async fn wait_acks(&mut self, action: &ActionId, count: usize) {
        while self.ack_count(action) < count {
            match self.recv().await.expect("connection closed") {
                DroneToController::Heartbeat { .. } => {}
                DroneToController::AckAction { action_id } => self.acks.push(action_id),
                other => self.pending.push_back(other),
            }
        }
    }

    /// How many times the drone acked `action` so far.
    pub fn ack_count(&self, action: &ActionId) -> usize {
        self.acks.iter().filter(|a| *a == action).count()
    }

    /// The next backend event not seen before on this connection (other messages, and resends of
    /// events already returned, are skipped).
    pub async fn next_event(&mut self) -> Event {
        loop {
            let event = self.next_sent_event().await;
            if event.event_id > self.delivered_up_to {
                self.delivered_up_to = event.event_id;
                return event;
            }
        }
    }

    /// The next backend event as sent, a resend included (other messages are skipped).
    pub async fn next_sent_event(&mut self) -> Event {
        loop {
            if let DroneToController::BackendEvent {
                event_id,
                backend_id,
                state,
                timestamp,
            } = self.next().await
            {
                return Event {
                    event_id,
                    backend_id,
                    state,
                    timestamp,
                };
            }
        }
    }

    /// Backend events until (and including) the first `terminated` one.
    pub async fn events_until_terminated(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let event = self.next_event().await;
            let done = matches!(event.state, BackendState::Terminated { .. });
            events.push(event);
            if done {
                return events;
            }
        }
    }

    pub fn ack(&self, event_id: i64) {
        self.send(ControllerToDrone::AckEvent { event_id });
    }

    /// Waits for the connection to be closed by the drone, skipping whatever it still sends.
    pub async fn closed(&mut self) {
        while self.recv().await.is_some() {}
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: i64,
    pub backend_id: BackendId,
    pub state: BackendState,
    #[allow(dead_code)]
    pub timestamp: Millis,
}
