//! The controller's side of a node socket's handshake, for fake controllers built on axum: read the
//! node's hello, answer `Welcome` ([`welcome`] does both).

use axum::extract::ws::{Message, WebSocket};
use hangar_types::protocol::HelloResponse;
use hangar_types::ControllerName;
use serde::de::DeserializeOwned;
use std::sync::Mutex;

/// Reads the node's hello into `hellos` and answers `Welcome`; false when the socket went away first.
pub async fn welcome<H: DeserializeOwned>(socket: &mut WebSocket, hellos: &Mutex<Vec<H>>) -> bool {
    let Some(hello) = read_hello(socket).await else {
        return false;
    };
    hellos.lock().unwrap().push(hello);
    send_welcome(socket).await
}

/// The node's first message, its hello; `None` when the socket closed before it.
pub async fn read_hello<H: DeserializeOwned>(socket: &mut WebSocket) -> Option<H> {
    let Some(Ok(Message::Text(text))) = socket.recv().await else {
        return None;
    };
    Some(serde_json::from_str(text.as_str()).expect("the node sends a valid hello"))
}

/// Answers the hello with `Welcome` from a random controller; false when the socket is gone.
pub async fn send_welcome(socket: &mut WebSocket) -> bool {
    let welcome = serde_json::to_string(&HelloResponse::welcome(ControllerName::random())).unwrap();
    socket.send(Message::Text(welcome.into())).await.is_ok()
}
