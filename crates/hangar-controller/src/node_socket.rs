//! The transport shared by drone, proxy and DNS sessions: the `Hello`/`HelloResponse` handshake, a writer loop
//! fed by a bounded queue of JSON text frames, and a reader that hands the session's handler the messages
//! received, in batches.
//!
//! Dead peers are detected on both paths: the writer pings every [`SESSION_PING_INTERVAL`], and the
//! reader gives up after [`NODE_SILENCE_LIMIT`] without any frame (pongs included). A Close frame ends
//! the session at once (Plane noticed it only on its next send, quirk 10).

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hangar_store::{NodeId, Registration, SessionId, Store, StoreResult};
use hangar_types::protocol::{Hello, HelloResponse};
use hangar_types::timing::{NODE_SILENCE_LIMIT, SESSION_PING_INTERVAL};
use hangar_types::{ControllerName, PROTOCOL_VERSION, VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames queued for one node. When full, producers wait: a slow node slows down only its own session
/// (its reader stops reading, so TCP pushes back on the node; the event subscription may lag and then
/// resyncs from the store).
pub const OUTBOUND_CAPACITY: usize = 1024;
/// How long a node may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a session may spend handling one batch of messages from its node ([`run_reader`]). A store
/// call whose request was lost on the way to PostgreSQL (a black-holed link) never returns; without
/// this bound it would stall every later message of the session. Past it the session ends and the node
/// reconnects to a fresh one. Far above any healthy handling time (a failing store answers within its
/// acquire timeout).
pub const HANDLE_DEADLINE: Duration = Duration::from_secs(30);

/// Reads the node's `Hello`. `Err` carries the reason to send in `Refused`.
pub async fn read_hello(socket: &mut WebSocket) -> Result<Hello, String> {
    let hello: Hello = read_first_frame(socket, "Hello").await?;
    check_protocol(hello.protocol)?;
    Ok(hello)
}

/// Reads the first JSON text frame of a session as a `what` (e.g. `Hello`, `DnsHello`) within
/// [`HELLO_TIMEOUT`]. `Err` carries the reason to send in `Refused`.
pub async fn read_first_frame<H: DeserializeOwned>(
    socket: &mut WebSocket,
    what: &str,
) -> Result<H, String> {
    let first_text = async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(format!("the first frame must be a JSON text `{what}`"))
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    return Err(format!("connection closed before `{what}`"))
                }
            }
        }
    };
    let text = tokio::time::timeout(HELLO_TIMEOUT, first_text)
        .await
        .map_err(|_| format!("no `{what}` within {} s", HELLO_TIMEOUT.as_secs()))??;
    serde_json::from_str(&text).map_err(|e| format!("invalid `{what}`: {e}"))
}

/// Refuses peers that speak another protocol version.
pub fn check_protocol(protocol: u32) -> Result<(), String> {
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: node speaks {protocol}, controller speaks {PROTOCOL_VERSION}"
        ));
    }
    Ok(())
}

/// Sends `Refused { reason }` and closes the socket.
pub async fn refuse(mut socket: WebSocket, reason: String) {
    tracing::warn!(%reason, "Refusing node session");
    if let Some(text) = encode(&HelloResponse::Refused { reason }) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::POLICY,
            reason: Utf8Bytes::from_static("refused"),
        })))
        .await;
}

/// The node and session a registration of the node `kind` (`drone`, `proxy`) gave; `Err` carries the
/// reason to send in `Refused`.
pub fn registered(
    registration: StoreResult<Registration>,
    kind: &str,
    name: &(dyn std::fmt::Display + Sync),
) -> Result<(NodeId, SessionId), String> {
    match registration {
        Ok(Registration::Registered { node, session }) => Ok((node, session)),
        Ok(Registration::Refused { reason }) => Err(reason),
        Err(e) => {
            tracing::error!(node = %name, kind, error = %e, "Failed to register node");
            Err(format!(
                "the controller could not register the {kind}; retry later"
            ))
        }
    }
}

/// Detaches the node of kind `kind` (`drone`, `proxy`) from `session`, only if that is still its
/// current session, and logs that it left.
pub async fn disconnected(
    store: &dyn Store,
    kind: &str,
    name: &(dyn std::fmt::Display + Sync),
    node: NodeId,
    session: SessionId,
) {
    if let Err(e) = store.node_disconnected(node, session).await {
        tracing::warn!(node = %name, kind, error = %e, "Failed to mark node disconnected");
    }
    tracing::info!(node = %name, kind, "Node disconnected");
}

/// A node's socket after `Welcome`: the queue its session sends on, the session's token (every loop
/// of the session stops when it fires) and the socket itself, which [`WelcomedSocket::run`] drives.
pub struct Welcomed<T> {
    pub sender: NodeSender<T>,
    pub cancel: CancellationToken,
    pub socket: WelcomedSocket,
}

/// The halves of a welcomed node's socket and the receiving end of its outbound queue.
pub struct WelcomedSocket {
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    rx: mpsc::Receiver<String>,
}

/// Sends `Welcome`, then splits the socket and creates the session's outbound queue and its token (a
/// child of `parent`). `None` when `Welcome` cannot be sent.
pub async fn welcome<T>(
    mut socket: WebSocket,
    controller: &ControllerName,
    parent: &CancellationToken,
) -> Option<Welcomed<T>> {
    let welcome = HelloResponse::Welcome {
        protocol: PROTOCOL_VERSION,
        version: VERSION.to_string(),
        controller: controller.clone(),
    };
    if let Some(text) = encode(&welcome) {
        socket.send(Message::Text(text.into())).await.ok()?;
    }
    let (sink, stream) = socket.split();
    let (sender, rx) = outbound();
    Some(Welcomed {
        sender,
        cancel: parent.child_token(),
        socket: WelcomedSocket { sink, stream, rx },
    })
}

impl WelcomedSocket {
    /// Runs the session until all of it has ended: the writer ([`run_socket_writer`]), the reader
    /// handing the node's messages to `handle` ([`run_reader`]) and the session's own `work`. Either
    /// loop ending cancels `cancel`.
    pub async fn run<T, F, Fut>(
        self,
        cancel: &CancellationToken,
        node: &(dyn std::fmt::Display + Sync),
        handle: F,
        work: impl std::future::Future<Output = ()>,
    ) where
        T: DeserializeOwned,
        F: FnMut(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<(), SessionClosed>>,
    {
        tokio::join!(
            run_socket_writer(self.sink, self.rx, cancel.clone()),
            run_reader(self.stream, cancel, node, handle),
            work,
        );
    }
}

fn encode<T: Serialize>(msg: &T) -> Option<String> {
    match serde_json::to_string(msg) {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::error!(error = %e, "Failed to encode a message for a node");
            None
        }
    }
}

/// The node went away or the session is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node session closed")]
pub struct SessionClosed;

/// Typed handle to a session's outbound queue.
pub struct NodeSender<T> {
    tx: mpsc::Sender<String>,
    _messages: PhantomData<fn(T)>,
}

impl<T> Clone for NodeSender<T> {
    fn clone(&self) -> Self {
        NodeSender {
            tx: self.tx.clone(),
            _messages: PhantomData,
        }
    }
}

impl<T: Serialize> NodeSender<T> {
    /// Queues one message (waits while the queue is full).
    pub async fn send(&self, msg: &T) -> Result<(), SessionClosed> {
        match encode(msg) {
            Some(text) => self.tx.send(text).await.map_err(|_| SessionClosed),
            None => Ok(()),
        }
    }

    /// Queues `msg` without waiting; fails when the socket's queue is full or the session is gone.
    pub fn try_send(&self, msg: &T) -> Result<(), SessionClosed> {
        match encode(msg) {
            Some(text) => self.tx.try_send(text).map_err(|_| SessionClosed),
            None => Ok(()),
        }
    }
}

/// A node session's outbound queue and the receiving end for [`run_socket_writer`].
fn outbound<T>() -> (NodeSender<T>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    (
        NodeSender {
            tx,
            _messages: PhantomData,
        },
        rx,
    )
}

/// Writes queued frames and periodic pings until the session is cancelled or a write fails; then
/// closes the socket and cancels the session.
pub async fn run_socket_writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<String>,
    cancel: CancellationToken,
) {
    let mut ping = tokio::time::interval(SESSION_PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break,
            text = rx.recv() => match text {
                Some(text) => Message::Text(text.into()),
                None => break,
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        if let Err(e) = sink.send(message).await {
            tracing::debug!(error = %e, "Write to node failed");
            break;
        }
    }
    cancel.cancel();
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::AWAY,
            reason: Utf8Bytes::from_static("controller closing session"),
        })))
        .await;
}

/// Most frames one batch of [`run_reader`] takes: the one it waited for and those already received
/// behind it.
pub const READ_BATCH: usize = 64;

/// Hands the messages from the node to `handle`, in order, until the session is cancelled, [`next_text`]
/// ends it or `handle` fails; then cancels the session. A batch is the frame the reader waited for and
/// the frames already received behind it (at most [`READ_BATCH`], never waiting for more), so a
/// handler can do the work of many messages at once. Frames that do not parse as a `T` are logged and
/// skipped.
pub async fn run_reader<T, F, Fut>(
    mut stream: SplitStream<WebSocket>,
    cancel: &CancellationToken,
    node: &(dyn std::fmt::Display + Sync),
    mut handle: F,
) where
    T: DeserializeOwned,
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<(), SessionClosed>>,
{
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            text = next_text(&mut stream) => match text {
                Some(text) => text,
                None => break,
            },
        };
        let mut batch = Vec::new();
        push_parsed(&mut batch, &first, node);
        let mut ended = false;
        for _ in 1..READ_BATCH {
            // Only frames already received: never waits.
            match next_text(&mut stream).now_or_never() {
                Some(Some(text)) => push_parsed(&mut batch, &text, node),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() && within_deadline(node, handle(batch)).await.is_err() {
            break;
        }
        if ended {
            break;
        }
    }
    cancel.cancel();
}

fn push_parsed<T: DeserializeOwned>(
    batch: &mut Vec<T>,
    text: &str,
    node: &(dyn std::fmt::Display + Sync),
) {
    match serde_json::from_str(text) {
        Ok(message) => batch.push(message),
        Err(e) => tracing::warn!(%node, error = %e, "Skipping unparseable frame from node"),
    }
}

/// Awaits the handling of one batch, at most [`HANDLE_DEADLINE`]; past it the session is closed.
async fn within_deadline(
    node: &(dyn std::fmt::Display + Sync),
    handling: impl std::future::Future<Output = Result<(), SessionClosed>>,
) -> Result<(), SessionClosed> {
    within(HANDLE_DEADLINE, node, handling).await
}

async fn within(
    deadline: Duration,
    node: &(dyn std::fmt::Display + Sync),
    handling: impl std::future::Future<Output = Result<(), SessionClosed>>,
) -> Result<(), SessionClosed> {
    match tokio::time::timeout(deadline, handling).await {
        Ok(handled) => handled,
        Err(_) => {
            tracing::error!(%node, deadline_ms = deadline.as_millis(),
                "Handling a message from the node did not finish in time (a store call that never \
                 returns?); ending the session so that the node reconnects");
            Err(SessionClosed)
        }
    }
}

/// The next text frame from the node; `None` when the node closed the connection, a read failed, or
/// nothing arrived for [`NODE_SILENCE_LIMIT`]. Binary frames are skipped.
async fn next_text(stream: &mut SplitStream<WebSocket>) -> Option<Utf8Bytes> {
    loop {
        let frame = match tokio::time::timeout(NODE_SILENCE_LIMIT, stream.next()).await {
            Ok(frame) => frame,
            Err(_) => {
                tracing::warn!(
                    "Node silent for {} s, ending session",
                    NODE_SILENCE_LIMIT.as_secs()
                );
                return None;
            }
        };
        match frame {
            Some(Ok(Message::Text(text))) => return Some(text),
            Some(Ok(Message::Binary(_))) => {
                tracing::warn!("Ignoring a binary frame from a node");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => return None,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "Read from node failed");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[tokio::test]
    async fn a_handler_that_never_returns_closes_the_session_at_the_deadline() {
        let deadline = Duration::from_millis(50);
        let stuck = within(deadline, &"dr-test", std::future::pending()).await;
        assert_eq!(stuck, Err(SessionClosed));
        let quick = within(deadline, &"dr-test", async { Ok(()) }).await;
        assert_eq!(quick, Ok(()));
        let closed = within(deadline, &"dr-test", async { Err(SessionClosed) }).await;
        assert_eq!(closed, Err(SessionClosed));
    }
}
