//! WebSocket forwarding and the connection counts it produces.

use crate::support::{eventually, with_timeout, Env};
use futures_util::{SinkExt, StreamExt};
use hangar_types::BackendId;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the proxy asking for the `chat` subprotocol; `connection` overrides
/// the `Connection` header.
async fn connect(
    env: &Env,
    path: &str,
    connection: Option<&str>,
) -> (Ws, Response<Option<Vec<u8>>>) {
    let url = format!("ws://{}{path}", env.proxy.local_addr());
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("host", env.cluster.as_str().parse().unwrap());
    headers.insert("sec-websocket-protocol", "chat".parse().unwrap());
    if let Some(connection) = connection {
        headers.insert("connection", connection.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap()
}

async fn next_data(ws: &mut Ws) -> Message {
    loop {
        match ws.next().await.expect("stream open").expect("no error") {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

async fn wait_open_connections(env: &Env, backend: &BackendId, open: usize) {
    eventually(&format!("{open} open connections to {backend}"), || async {
        env.proxy
            .connection_counts(backend)
            .is_some_and(|c| c.open_connections == open)
    })
    .await;
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    with_timeout(async {
        let env = Env::start().await;
        let route = env.route("b-ws");
        let token = env.token_for(&route);
        let (mut ws, response) = connect(&env, &format!("/{token}/ws"), None).await;
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        assert_eq!(response.headers()["x-plane-backend-id"], "b-ws");
        assert!(response.headers()["server"]
            .to_str()
            .unwrap()
            .starts_with("Hangar/"));

        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("hello"));
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            Message::binary(vec![0u8, 1, 2, 255])
        );
        let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::binary(big));

        let counts = env.proxy.connection_counts(&route.backend_id).unwrap();
        assert_eq!(counts.open_connections, 1);
        assert!(counts.recent_activity);

        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        // Like a browser, close the TCP connection after the closing handshake.
        drop(ws);
        wait_open_connections(&env, &route.backend_id, 0).await;
        eventually("a keepalive for the WebSocket's backend", || async {
            env.controller.keepalives(&route.backend_id) >= 1
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn firefox_style_connection_header_upgrades() {
    with_timeout(async {
        let env = Env::start().await;
        let route = env.route("b-firefox");
        let token = env.token_for(&route);
        let (mut ws, response) =
            connect(&env, &format!("/{token}/ws"), Some("keep-alive, Upgrade")).await;
        assert_eq!(response.status(), 101);
        ws.send(Message::text("from firefox")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("from firefox"));
        wait_open_connections(&env, &route.backend_id, 1).await;
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        // Like a browser, close the TCP connection after the closing handshake.
        drop(ws);
        wait_open_connections(&env, &route.backend_id, 0).await;
    })
    .await
}

#[tokio::test]
async fn client_vanishing_without_close_frame_closes_the_tunnel() {
    with_timeout(async {
        let env = Env::start().await;
        let route = env.route("b-vanish");
        let token = env.token_for(&route);
        let (mut ws, _) = connect(&env, &format!("/{token}/ws"), None).await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("ping"));
        // A second tunnel to the same backend stays open throughout.
        let (mut other, _) = connect(&env, &format!("/{token}/ws"), None).await;
        wait_open_connections(&env, &route.backend_id, 2).await;
        drop(ws);
        wait_open_connections(&env, &route.backend_id, 1).await;
        other.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_data(&mut other).await, Message::text("still here"));
    })
    .await
}

#[tokio::test]
async fn upstream_closing_first_closes_the_tunnel() {
    with_timeout(async {
        let env = Env::start().await;
        let route = env.route("b-upclose");
        let token = env.token_for(&route);
        let (mut ws, _) = connect(&env, &format!("/{token}/ws"), None).await;
        wait_open_connections(&env, &route.backend_id, 1).await;
        ws.send(Message::text("close-me")).await.unwrap();
        assert!(matches!(next_data(&mut ws).await, Message::Close(_)));
        // The client keeps its TCP connection open; the proxy still ends the tunnel (after the
        // half-close linger).
        wait_open_connections(&env, &route.backend_id, 0).await;
        drop(ws);
    })
    .await
}
