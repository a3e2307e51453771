//! Node side of a drone/proxy session with the controller: open the WebSocket, exchange
//! `Hello`/`HelloResponse`, then send and receive typed JSON text frames; and the reconnect loop every
//! node runs around its connections ([`Reconnecting`], with [`crate::backoff::Backoff`]).

use crate::backoff::Backoff;
use crate::http::{ClientError, ControllerClient};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hangar_types::protocol::HelloResponse;
use hangar_types::timing::CONTROLLER_SILENCE_LIMIT;
use hangar_types::ControllerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long opening the WebSocket (TCP connect and HTTP upgrade) may take, and then again how long the
/// controller may take to answer the `Hello`. Without the first bound, an upgrade request lost on the
/// way (a black-holed link, a controller that accepts but never answers) held the node until the
/// kernel or the controller gave up: 30 s to minutes without a session.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn ws_err(e: WsError) -> ClientError {
    ClientError::WebSocket(Box::new(e))
}

/// An established session: `S` is what this node sends, `R` what it receives.
pub struct NodeSocket<S, R> {
    ws: Ws,
    controller: ControllerName,
    /// [`CONTROLLER_SILENCE_LIMIT`], shorter in tests.
    silence_limit: Duration,
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
        let opening = tokio_tungstenite::connect_async_with_config(req, None, true);
        let (mut ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, opening)
            .await
            .map_err(|_| {
                ClientError::Handshake("the controller did not open the WebSocket in time".into())
            })?
            .map_err(ws_err)?;
        let hello =
            serde_json::to_string(hello).map_err(|e| ClientError::Handshake(e.to_string()))?;
        ws.send(Message::text(hello)).await.map_err(ws_err)?;
        let answer = next_text(&mut ws, HANDSHAKE_TIMEOUT)
            .await
            .ok_or_else(|| {
                ClientError::Handshake(
                    "the controller closed the connection or did not answer the handshake in time"
                        .into(),
                )
            })?
            .map_err(ws_err)?;
        match serde_json::from_str::<HelloResponse>(&answer) {
            Ok(HelloResponse::Welcome { controller, .. }) => Ok(NodeSocket {
                ws,
                controller,
                silence_limit: CONTROLLER_SILENCE_LIMIT,
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
        recv_json(&mut self.ws, self.silence_limit).await
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
                silence_limit: self.silence_limit,
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
        send_json(&mut self.sink, msg).await
    }

    /// Sends a normal close frame.
    pub async fn close(mut self) {
        let _ = self.sink.close().await;
    }
}

pub struct NodeReceiver<R> {
    stream: SplitStream<Ws>,
    silence_limit: Duration,
    _types: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> NodeReceiver<R> {
    /// As [`NodeSocket::recv`].
    pub async fn recv(&mut self) -> Option<R> {
        recv_json(&mut self.stream, self.silence_limit).await
    }
}

/// Sends `msg` as a JSON text frame on the whole socket or its sending half.
async fn send_json<Si, S>(sink: &mut Si, msg: &S) -> Result<(), ClientError>
where
    Si: Sink<Message, Error = WsError> + Unpin,
    S: Serialize,
{
    let text = serde_json::to_string(msg)
        .map_err(|e| ClientError::Handshake(format!("cannot encode message: {e}")))?;
    sink.send(Message::text(text)).await.map_err(ws_err)
}

/// The next parseable JSON text frame of the whole socket or its receiving half.
async fn recv_json<St, R>(ws: &mut St, silence_limit: Duration) -> Option<R>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
    R: DeserializeOwned,
{
    loop {
        let text = next_text(ws, silence_limit).await?.ok()?;
        match serde_json::from_str(&text) {
            Ok(m) => return Some(m),
            Err(e) => tracing::warn!(error = %e, "Skipping unparseable message from controller"),
        }
    }
}

/// Next text frame; pings/pongs/binary frames are skipped. `None` on close, end of stream, or when no
/// frame at all came for `silence_limit` ([`CONTROLLER_SILENCE_LIMIT`] in a session: a controller or
/// link gone silent; without the limit a session whose packets are dropped would wait for the kernel
/// to give up, many minutes).
async fn next_text<St>(ws: &mut St, silence_limit: Duration) -> Option<Result<String, WsError>>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        let Ok(frame) = tokio::time::timeout(silence_limit, ws.next()).await else {
            tracing::warn!(
                "Nothing from the controller for {} ms; giving the session up",
                silence_limit.as_millis()
            );
            return None;
        };
        match frame? {
            Ok(Message::Text(t)) => return Some(Ok(t.to_string())),
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(e) => return Some(Err(e)),
        }
    }
}

/// How one connection of a node session ended: what [`Reconnecting::ended`] does next.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The session's token fired: the node is shutting down, the session ends.
    Cancelled,
    /// Closed on purpose to connect again at once, without backoff (the proxy's periodic rebalance
    /// across controllers).
    Rebalance,
    /// The controller closed the connection; connect again after the backoff.
    Closed,
    /// Sending failed; connect again after the backoff.
    SendFailed(ClientError),
}

/// The reconnect loop of a node session with the controller, until `cancel` fires:
///
/// ```text
/// let mut session = Reconnecting::new(&client, &path, &hello, &cancel);
/// while let Some((socket, generation)) = session.connect().await {
///     let end = run_connection(socket, generation).await;
///     if !session.ended(end).await {
///         break;
///     }
/// }
/// ```
pub struct Reconnecting<'a, H> {
    client: &'a ControllerClient,
    path: &'a str,
    hello: &'a H,
    cancel: &'a CancellationToken,
    backoff: Backoff,
    generation: u64,
}

impl<'a, H: Serialize> Reconnecting<'a, H> {
    /// Connects to `path` with `hello`.
    pub fn new(
        client: &'a ControllerClient,
        path: &'a str,
        hello: &'a H,
        cancel: &'a CancellationToken,
    ) -> Self {
        Reconnecting {
            client,
            path,
            hello,
            cancel,
            backoff: Backoff::default(),
            generation: 0,
        }
    }

    /// The next connection with its generation (1 for the first, then counting up); `None` once the
    /// token fires. A failed attempt is logged and tried again after the backoff.
    pub async fn connect<S: Serialize, R: DeserializeOwned>(
        &mut self,
    ) -> Option<(NodeSocket<S, R>, u64)> {
        loop {
            let connected = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                c = NodeSocket::connect(self.client, self.path, self.hello) => c,
            };
            match connected {
                Ok(socket) => {
                    self.backoff.connected();
                    self.generation += 1;
                    tracing::info!(controller = %socket.controller(), "Connected to the controller");
                    return Some((socket, self.generation));
                }
                Err(error) => tracing::warn!(%error, "Could not connect to the controller"),
            }
            if !self.wait_backoff().await {
                return None;
            }
        }
    }

    /// Takes how a connection ended: `false` when the session ends (the token fired); otherwise logs
    /// it and, unless it was a rebalance, waits for the backoff before the next [`Self::connect`].
    pub async fn ended(&mut self, end: ConnectionEnd) -> bool {
        match end {
            ConnectionEnd::Cancelled => return false,
            ConnectionEnd::Rebalance => {
                tracing::info!("Reconnecting to the controller (periodic rebalance)");
                return true;
            }
            ConnectionEnd::Closed => tracing::warn!("Lost the controller connection; reconnecting"),
            ConnectionEnd::SendFailed(error) => {
                tracing::warn!(%error, "Lost the controller connection; reconnecting")
            }
        }
        self.wait_backoff().await
    }

    /// Waits for the backoff; `false` when the token fires first.
    async fn wait_backoff(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.backoff.wait() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::protocol::{ControllerToProxy, ProxyToController};

    /// A peer that accepts connections and reads them, but never answers: the node gives up after
    /// [`HANDSHAKE_TIMEOUT`] instead of waiting for the peer (the clock is paused, so this takes no
    /// real time; without the bound the test would hang until its own timeout).
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_the_upgrade_fails_the_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                held.push(socket);
            }
        });
        let client = ControllerClient::new(format!("http://{addr}/").parse().unwrap()).unwrap();
        let connect =
            NodeSocket::<ProxyToController, ControllerToProxy>::connect(&client, "/ws", &"hello");
        let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, connect).await;
        match outcome {
            Ok(Err(ClientError::Handshake(reason))) => {
                assert!(reason.contains("in time"), "{reason}")
            }
            Ok(Err(other)) => panic!("unexpected error: {other}"),
            Ok(Ok(_)) => panic!("connected to a peer that never answered"),
            Err(_) => panic!(
                "the connect was still waiting after {:?}",
                HANDSHAKE_TIMEOUT * 3
            ),
        }
        silent.abort();
    }

    /// A controller that welcomes the node, then only pings every `ping` (not at all when `None`)
    /// for `quiet`, then sends one message and holds the connection open. Returns its address.
    async fn controller_then_quiet(
        ping: Option<Duration>,
        quiet: Duration,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
            let _hello = ws.next().await;
            let welcome = HelloResponse::welcome("co-test".parse().unwrap());
            let welcome = serde_json::to_string(&welcome).unwrap();
            ws.send(Message::text(welcome)).await.unwrap();
            let until = tokio::time::Instant::now() + quiet;
            if let Some(every) = ping {
                while tokio::time::Instant::now() + every < until {
                    tokio::time::sleep(every).await;
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep_until(until).await;
            let lease = ControllerToProxy::KeyLease {
                backend: "b-1".parse().unwrap(),
                remaining_ms: 1,
            };
            let _ = ws
                .send(Message::text(serde_json::to_string(&lease).unwrap()))
                .await;
            tokio::time::sleep(quiet * 10).await;
        });
        addr
    }

    /// A session whose silence limit is `limit` (a session's is [`CONTROLLER_SILENCE_LIMIT`]).
    async fn session_with(
        addr: std::net::SocketAddr,
        limit: Duration,
    ) -> NodeReceiver<ControllerToProxy> {
        let client = ControllerClient::new(format!("http://{addr}/").parse().unwrap()).unwrap();
        let mut socket =
            NodeSocket::<ProxyToController, ControllerToProxy>::connect(&client, "/ws", &"hello")
                .await
                .unwrap();
        assert_eq!(socket.silence_limit, CONTROLLER_SILENCE_LIMIT);
        socket.silence_limit = limit;
        socket.split().1
    }

    /// Real time, scaled down: a 1 s limit, pings every 100 ms (the ratio leaves a loaded machine
    /// ten times the ping interval before the limit).
    #[tokio::test]
    async fn a_session_silent_for_the_limit_is_given_up_and_pings_keep_it() {
        let limit = Duration::from_secs(1);
        // Pinged for three times the limit: the session stays and gets the message.
        let pinged = controller_then_quiet(Some(limit / 10), limit * 3).await;
        let mut pinged = session_with(pinged, limit).await;
        assert!(matches!(
            pinged.recv().await,
            Some(ControllerToProxy::KeyLease { .. })
        ));
        // Not a frame for twice the limit: the session ends (`None`) before the message.
        let silent = controller_then_quiet(None, limit * 2).await;
        let mut silent = session_with(silent, limit).await;
        assert!(silent.recv().await.is_none());
    }
}
