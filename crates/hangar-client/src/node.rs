//! Node side of a drone/proxy session with the controller: open the WebSocket, exchange
//! `Hello`/`HelloResponse`, then send and receive typed JSON text frames. Reconnecting is the caller's
//! loop (with [`crate::backoff::Backoff`]); this module handles one connection.

use crate::http::{ClientError, ControllerClient};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hangar_types::protocol::HelloResponse;
use hangar_types::ControllerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the controller may take to answer the handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    ClientError::WebSocket(Box::new(e))
}

/// An established session: `S` is what this node sends, `R` what it receives.
pub struct NodeSocket<S, R> {
    ws: Ws,
    controller: ControllerName,
    _types: PhantomData<fn(S) -> R>,
}

impl<S: Serialize, R: DeserializeOwned> NodeSocket<S, R> {
    /// Connects to `path` (e.g. `/ctrl/c/<cluster>/drone-socket`) and performs the handshake: sends
    /// `hello` ([`hangar_types::protocol::Hello`] for drones and proxies,
    /// [`hangar_types::protocol::DnsHello`] for DNS responders) and expects a [`HelloResponse`].
    pub async fn connect<H: Serialize>(
        client: &ControllerClient,
        path: &str,
        hello: &H,
    ) -> Result<Self, ClientError> {
        let mut url = client.url(path)?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .map_err(|_| ClientError::InvalidUrl(url.to_string()))?;
        let mut req = url.as_str().into_client_request().map_err(ws_err)?;
        if let Some(token) = client.bearer() {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                ClientError::InvalidUrl("bearer token is not a valid header".into())
            })?;
            req.headers_mut().insert("authorization", value);
        }
        // `disable_nagle`: the session is small frames both ways (events, acks); with Nagle each
        // second frame waits for the controller's delayed ACK (~40 ms, measured by hangar-bench).
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
            .await
            .map_err(ws_err)?;
        let hello =
            serde_json::to_string(hello).map_err(|e| ClientError::Handshake(e.to_string()))?;
        ws.send(Message::text(hello)).await.map_err(ws_err)?;
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, next_text(&mut ws))
            .await
            .map_err(|_| ClientError::Handshake("controller did not answer the handshake".into()))?
            .ok_or_else(|| ClientError::Handshake("connection closed during handshake".into()))?
            .map_err(ws_err)?;
        match serde_json::from_str::<HelloResponse>(&answer) {
            Ok(HelloResponse::Welcome { controller, .. }) => Ok(NodeSocket {
                ws,
                controller,
                _types: PhantomData,
            }),
            Ok(HelloResponse::Refused { reason }) => Err(ClientError::Handshake(format!(
                "controller refused the session: {reason}"
            ))),
            Err(e) => Err(ClientError::Handshake(format!(
                "unexpected handshake answer: {e}"
            ))),
        }
    }

    /// The controller this session is attached to.
    pub fn controller(&self) -> &ControllerName {
        &self.controller
    }

    pub async fn send(&mut self, msg: &S) -> Result<(), ClientError> {
        send_json(&mut self.ws, msg).await
    }

    /// The next message; `None` when the connection is closed or broken. Unparseable frames are
    /// logged and skipped.
    pub async fn recv(&mut self) -> Option<R> {
        recv_json(&mut self.ws).await
    }

    /// Splits into independently usable halves (e.g. a writer task and a reader loop).
    pub fn split(self) -> (NodeSender<S>, NodeReceiver<R>) {
        let (sink, stream) = self.ws.split();
        (
            NodeSender {
                sink,
                _types: PhantomData,
            },
            NodeReceiver {
                stream,
                _types: PhantomData,
            },
        )
    }
}

pub struct NodeSender<S> {
    sink: SplitSink<Ws, Message>,
    _types: PhantomData<fn(S)>,
}

impl<S: Serialize> NodeSender<S> {
    pub async fn send(&mut self, msg: &S) -> Result<(), ClientError> {
        let text = serde_json::to_string(msg)
            .map_err(|e| ClientError::Handshake(format!("cannot encode message: {e}")))?;
        self.sink.send(Message::text(text)).await.map_err(ws_err)
    }

    /// Sends a normal close frame.
    pub async fn close(mut self) {
        let _ = self.sink.close().await;
    }
}

pub struct NodeReceiver<R> {
    stream: SplitStream<Ws>,
    _types: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> NodeReceiver<R> {
    /// As [`NodeSocket::recv`].
    pub async fn recv(&mut self) -> Option<R> {
        loop {
            let text = next_text(&mut self.stream).await?.ok()?;
            match serde_json::from_str(&text) {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "Skipping unparseable message from controller")
                }
            }
        }
    }
}

async fn send_json<S: Serialize>(ws: &mut Ws, msg: &S) -> Result<(), ClientError> {
    let text = serde_json::to_string(msg)
        .map_err(|e| ClientError::Handshake(format!("cannot encode message: {e}")))?;
    ws.send(Message::text(text)).await.map_err(ws_err)
}

async fn recv_json<R: DeserializeOwned>(ws: &mut Ws) -> Option<R> {
    loop {
        let text = next_text(ws).await?.ok()?;
        match serde_json::from_str(&text) {
            Ok(m) => return Some(m),
            Err(e) => tracing::warn!(error = %e, "Skipping unparseable message from controller"),
        }
    }
}

/// Next text frame; pings/pongs/binary frames are skipped. `None` on close or end of stream.
async fn next_text<St>(ws: &mut St) -> Option<Result<String, tokio_tungstenite::tungstenite::Error>>
where
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(Ok(t.to_string())),
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(e) => return Some(Err(e)),
        }
    }
}
