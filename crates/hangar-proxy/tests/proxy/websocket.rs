//! WebSocket forwarding and the connection counts it produces: negotiation, large, fragmented and
//! compressed messages, control frames, every way a tunnel can end, and shutdown.

use crate::raw::{
    read_frame, read_response, wait_closed, ws_request, RawResponse, RawWsBackend, WS_KEY,
};
use crate::support::{eventually, with_env, with_routed, Answer, Env};
use futures_util::{SinkExt, StreamExt};
use hangar_test_support::ws_frame;
use hangar_types::protocol::{ControllerToProxy, RouteInfo};
use hangar_types::BackendId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
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

/// A route for `backend` to the test upstream, and a WebSocket opened to it through the proxy.
async fn open_ws(env: &Env, backend: &str) -> (RouteInfo, Ws) {
    let route = env.route(backend);
    let token = env.token_for(&route);
    let (ws, _) = connect(env, &format!("/{token}/ws"), None).await;
    (route, ws)
}

/// Sends `text` and expects it echoed.
async fn echo_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_data(ws).await, Message::text(text));
}

/// Closes like a browser (closing handshake, then the TCP connection) and waits until the proxy
/// counts no connection to the backend.
/// Runs `test` under [`with_env`] with a WebSocket open through the proxy to the upstream as
/// `backend` ([`open_ws`]).
async fn with_ws(backend: &str, test: impl AsyncFnOnce(Env, RouteInfo, Ws)) {
    with_env(async |env| {
        let (route, ws) = open_ws(&env, backend).await;
        test(env, route, ws).await;
    })
    .await;
}

/// Runs `test` under [`with_env`] with a [`RawWsBackend`] started.
async fn with_raw_backend(test: impl AsyncFnOnce(Env, RawWsBackend)) {
    with_env(async |env| test(env, RawWsBackend::start().await).await).await;
}

async fn close_ws(env: &Env, mut ws: Ws, backend: &BackendId) {
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    wait_open_connections(env, backend, 0).await;
}

/// Writes one raw frame.
async fn send_frame(stream: &mut TcpStream, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let frame = ws_frame(first, payload, mask);
    stream.write_all(&frame).await.unwrap();
}

/// Reads one raw frame, which must be `first` with `payload`.
async fn expect_frame(stream: &mut TcpStream, first: u8, payload: &[u8]) {
    assert_eq!(read_frame(stream).await, Some((first, payload.to_vec())));
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    with_routed("b-ws", async |env, route, token| {
        let (mut ws, response) = connect(&env, &format!("/{token}/ws"), None).await;
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        assert_eq!(response.headers()["x-plane-backend-id"], "b-ws");
        assert!(response.headers()["server"]
            .to_str()
            .unwrap()
            .starts_with("Hangar/"));

        echo_text(&mut ws, "hello").await;
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

        close_ws(&env, ws, &route.backend_id).await;
        eventually("a keepalive for the WebSocket's backend", || async {
            env.controller.keepalives(&route.backend_id) >= 1
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn firefox_style_connection_header_upgrades() {
    with_routed("b-firefox", async |env, route, token| {
        let (mut ws, response) =
            connect(&env, &format!("/{token}/ws"), Some("keep-alive, Upgrade")).await;
        assert_eq!(response.status(), 101);
        echo_text(&mut ws, "from firefox").await;
        wait_open_connections(&env, &route.backend_id, 1).await;
        close_ws(&env, ws, &route.backend_id).await;
    })
    .await
}

#[tokio::test]
async fn client_vanishing_without_close_frame_closes_the_tunnel() {
    with_ws("b-vanish", async |env, route, mut ws| {
        echo_text(&mut ws, "ping").await;
        // A second tunnel to the same backend stays open throughout.
        let token = env.token_for(&route);
        let (mut other, _) = connect(&env, &format!("/{token}/ws"), None).await;
        wait_open_connections(&env, &route.backend_id, 2).await;
        drop(ws);
        wait_open_connections(&env, &route.backend_id, 1).await;
        echo_text(&mut other, "still here").await;
        drop(other);
        wait_open_connections(&env, &route.backend_id, 0).await;
        eventually("no tunnels", || async { env.proxy.open_tunnels() == 0 }).await;
    })
    .await
}

#[tokio::test]
async fn a_terminated_backend_loses_its_tunnels_a_terminating_one_keeps_them() {
    with_routed("b-sever", async |env, route, token| {
        let (mut ws, _) = connect(&env, &format!("/{token}/ws"), None).await;
        wait_open_connections(&env, &route.backend_id, 1).await;
        // Terminating (soft, grace period): new requests are refused, the open tunnel stays.
        env.remove_terminating(&route, &token).await;
        echo_text(&mut ws, "still here while terminating").await;
        // Terminated (e.g. lost to a key takeover while its process may still run): cut at once.
        env.controller.push(ControllerToProxy::BackendRemoved {
            backend: route.backend_id.clone(),
            terminated: true,
        });
        wait_open_connections(&env, &route.backend_id, 0).await;
        let after = ws.send(Message::text("after")).await;
        let next = ws.next().await;
        assert!(
            after.is_err() || !matches!(next, Some(Ok(Message::Text(_)))),
            "the tunnel answered after its backend was terminated: {next:?}"
        );
    })
    .await
}

#[tokio::test]
async fn upstream_closing_first_closes_the_tunnel() {
    with_ws("b-upclose", async |env, route, mut ws| {
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

/// Connects a raw client through the proxy to a [`RawWsBackend`] for `backend`; returns the client
/// socket, its `101` response, the backend's socket and the handshake request it received.
async fn raw_tunnel(
    env: &Env,
    backend: &RawWsBackend,
    backend_id: &str,
    client_headers: &[&str],
    backend_headers: &[&str],
) -> (TcpStream, RawResponse, TcpStream, String) {
    let mut route = env.route(backend_id);
    route.address = backend.addr();
    let token = env.token_for(&route);
    let mut client = TcpStream::connect(env.proxy.local_addr()).await.unwrap();
    let request = ws_request(
        &format!("/{token}/raw"),
        env.cluster.as_str(),
        client_headers,
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let (upstream, head) = backend.accept(backend_headers).await;
    let response = read_response(&mut client)
        .await
        .expect("a handshake response");
    assert_eq!(response.status, 101, "{}", response.head);
    (client, response, upstream, head)
}

/// [`raw_tunnel`] without extra headers: the client's socket and the backend's.
async fn plain_raw_tunnel(
    env: &Env,
    backend: &RawWsBackend,
    backend_id: &str,
) -> (TcpStream, TcpStream) {
    let (client, _, upstream, _) = raw_tunnel(env, backend, backend_id, &[], &[]).await;
    (client, upstream)
}

fn has_header_line(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|line| {
        line.split_once(':')
            .is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case(name) && v.trim() == value)
    })
}

#[tokio::test]
async fn subprotocol_and_permessage_deflate_are_negotiated_end_to_end() {
    with_raw_backend(async |env, backend| {
        let (mut client, response, mut upstream, request) = raw_tunnel(
            &env,
            &backend,
            "b-deflate",
            &[
                "sec-websocket-protocol: chat, superchat",
                "sec-websocket-extensions: permessage-deflate; client_max_window_bits",
            ],
            &[
                "sec-websocket-protocol: superchat",
                "sec-websocket-extensions: permessage-deflate; server_no_context_takeover",
            ],
        )
        .await;
        // The backend sees the client's offer; the client sees the backend's choice.
        assert!(has_header_line(
            &request,
            "sec-websocket-protocol",
            "chat, superchat"
        ));
        assert!(has_header_line(
            &request,
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits"
        ));
        assert!(has_header_line(&request, "sec-websocket-key", WS_KEY));
        assert_eq!(response.header("sec-websocket-protocol"), Some("superchat"));
        assert_eq!(
            response.header("sec-websocket-extensions"),
            Some("permessage-deflate; server_no_context_takeover")
        );
        let accept = derive_accept_key(WS_KEY.as_bytes());
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(accept.as_str())
        );
        assert_eq!(response.header("x-plane-backend-id"), Some("b-deflate"));

        // "Hello" compressed (RFC 7692 §7.2.3.1), in frames with RSV1 set: passed unchanged.
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        send_frame(&mut client, 0xC1, &hello, mask).await;
        expect_frame(&mut upstream, 0xC1, &hello).await;
        send_frame(&mut upstream, 0xC1, &hello, None).await;
        expect_frame(&mut client, 0xC1, &hello).await;
        // A fragmented compressed message: RSV1 on the first fragment only.
        let mut fragments = ws_frame(0x41, &hello[..3], mask);
        fragments.extend(ws_frame(0x80, &hello[3..], mask));
        client.write_all(&fragments).await.unwrap();
        expect_frame(&mut upstream, 0x41, &hello[..3]).await;
        expect_frame(&mut upstream, 0x80, &hello[3..]).await;

        // Closing handshake, client first.
        let close = 1000u16.to_be_bytes();
        send_frame(&mut client, 0x88, &close, mask).await;
        expect_frame(&mut upstream, 0x88, &close).await;
        send_frame(&mut upstream, 0x88, &close, None).await;
        drop(upstream);
        expect_frame(&mut client, 0x88, &close).await;
        wait_closed(&mut client).await;
        drop(client);
        wait_open_connections(&env, &"b-deflate".parse().unwrap(), 0).await;
    })
    .await
}

#[tokio::test]
async fn large_and_fragmented_messages_pass_through() {
    with_ws("b-large", async |env, route, mut ws| {
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert!(next_data(&mut ws).await == Message::binary(big));

        // A text message in three fragments with a ping between them.
        let text =
            |s: &str, opcode, fin| Message::Frame(Frame::message(s.to_string(), opcode, fin));
        ws.send(text("Hello, ", OpCode::Data(Data::Text), false))
            .await
            .unwrap();
        ws.send(Message::Ping("between".into())).await.unwrap();
        ws.send(text("fragmented ", OpCode::Data(Data::Continue), false))
            .await
            .unwrap();
        ws.send(text("world", OpCode::Data(Data::Continue), true))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            Message::text("Hello, fragmented world")
        );

        // A 9 MiB binary message in three 3 MiB fragments.
        let part: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
        for (opcode, fin) in [
            (OpCode::Data(Data::Binary), false),
            (OpCode::Data(Data::Continue), false),
            (OpCode::Data(Data::Continue), true),
        ] {
            ws.send(Message::Frame(Frame::message(part.clone(), opcode, fin)))
                .await
                .unwrap();
        }
        let Message::Binary(echoed) = next_data(&mut ws).await else {
            panic!("expected a binary message");
        };
        assert_eq!(echoed.len(), 3 * part.len());
        assert!(echoed
            .chunks(part.len())
            .all(|chunk| chunk == part.as_slice()));

        close_ws(&env, ws, &route.backend_id).await;
    })
    .await
}

#[tokio::test]
async fn pings_and_pongs_pass_both_ways() {
    with_ws("b-ping", async |env, route, mut ws| {
        // The client pings; the backend's pong comes back with the same payload.
        ws.send(Message::Ping("from-client".into())).await.unwrap();
        let pong = ws.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong("from-client".into()));
        // The backend pings; the client answers (tungstenite does it while reading) and the
        // backend reports the pong it got.
        ws.send(Message::text("ping-me")).await.unwrap();
        let ping = ws.next().await.unwrap().unwrap();
        assert_eq!(ping, Message::Ping("from-backend".into()));
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("pong:from-backend")
        );
        drop(ws);
        wait_open_connections(&env, &route.backend_id, 0).await;
    })
    .await
}

#[tokio::test]
async fn upstream_severed_mid_frame_closes_the_client() {
    with_raw_backend(async |env, backend| {
        let (mut client, mut upstream) = plain_raw_tunnel(&env, &backend, "b-severed").await;
        let backend_id: BackendId = "b-severed".parse().unwrap();
        wait_open_connections(&env, &backend_id, 1).await;

        // Half of a frame reaches the client, then the backend's socket is reset.
        let frame = ws_frame(0x82, &[7u8; 1000], None);
        upstream.write_all(&frame[..500]).await.unwrap();
        let mut half = vec![0u8; 500];
        client.read_exact(&mut half).await.unwrap();
        assert_eq!(half, &frame[..500]);
        upstream.set_zero_linger().unwrap();
        drop(upstream);

        // The proxy closes the client's connection and forgets the tunnel.
        wait_closed(&mut client).await;
        drop(client);
        wait_open_connections(&env, &backend_id, 0).await;
        eventually("no tunnels", || async { env.proxy.open_tunnels() == 0 }).await;
    })
    .await
}

#[tokio::test]
async fn shutdown_closes_tunnels_with_going_away_at_frame_boundaries() {
    with_raw_backend(async |env, backend| {
        // Tunnel A: raw both ends, so the test sees every byte.
        let (mut client_a, mut upstream_a) = plain_raw_tunnel(&env, &backend, "b-away-raw").await;
        // Tunnel B: a WebSocket library client and backend.
        let route_b = env.route("b-away-lib");
        let token_b = env.token_for(&route_b);
        let (mut ws_b, _) = connect(&env, &format!("/{token_b}/ws"), None).await;
        echo_text(&mut ws_b, "before").await;
        assert_eq!(env.proxy.open_tunnels(), 2);

        // The backend of A is in the middle of a 100 KiB frame when the shutdown starts.
        let payload: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
        let frame = ws_frame(0x82, &payload, None);
        let half = frame.len() / 2;
        upstream_a.write_all(&frame[..half]).await.unwrap();
        let mut received = vec![0u8; half];
        client_a.read_exact(&mut received).await.unwrap();

        let draining = env.begin_shutdown();

        // A's backend gets a (masked) close 1001 from the proxy, then sends the rest of its frame
        // and one more frame.
        expect_frame(&mut upstream_a, 0x88, &[0x03, 0xE9]).await;
        let mut rest = frame[half..].to_vec();
        rest.extend(ws_frame(0x81, b"too late", None));
        upstream_a.write_all(&rest).await.unwrap();
        wait_closed(&mut upstream_a).await;

        // A's client gets the whole frame, then an unmasked close 1001, then end of stream.
        let mut received = vec![0u8; frame.len() - half];
        client_a.read_exact(&mut received).await.unwrap();
        assert_eq!(received, &frame[half..]);
        expect_frame(&mut client_a, 0x88, &[0x03, 0xE9]).await;
        send_frame(&mut client_a, 0x88, &[0x03, 0xE9], Some([9, 9, 9, 9])).await;
        wait_closed(&mut client_a).await;

        // B's client library sees a proper close with code 1001.
        let close = loop {
            match ws_b.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
        while let Some(Ok(_)) = ws_b.next().await {}
        drop(ws_b);

        draining.shutdown.await.unwrap();
        assert_eq!(draining.monitor.open_tunnels(), 0);
        assert_eq!(draining.monitor.open_client_connections(), 0);
        for backend in ["b-away-raw", "b-away-lib"] {
            let open = draining
                .monitor
                .connection_counts(&backend.parse().unwrap())
                .map_or(0, |c| c.open_connections);
            assert_eq!(open, 0, "{backend}");
        }
    })
    .await
}

/// A proxy that cannot get its route's key lease confirmed (cut off from the controllers, or the
/// drone stopped renewing) stops routing to the backend once the lease the route was resolved under
/// has run out: the open tunnel closes and the next request asks the controller again. Another
/// backend may hold the key by then.
#[tokio::test]
async fn an_unconfirmed_key_lease_ends_the_route_and_its_tunnels() {
    with_env(async |env| {
        let mut route = env.route("b-lease");
        // The route is used for 2 s: the proxy stops `ROUTE_LEASE_MARGIN` before the lease's end.
        let lease = hangar_types::timing::ROUTE_LEASE_MARGIN + std::time::Duration::from_secs(2);
        route.lease_remaining_ms = Some(u64::try_from(lease.as_millis()).unwrap());
        let token = env.token_for(&route);
        let (mut ws, _) = connect(&env, &format!("/{token}/ws"), None).await;
        // The fake controller never answers keepalives with `KeyLease`.
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        eventually("no open connections to the backend", || async {
            env.proxy
                .connection_counts(&route.backend_id)
                .is_none_or(|c| c.open_connections == 0)
        })
        .await;
        let asked = env.controller.route_requests(&token);
        env.controller.set_answer(&token, Answer::NoRoute);
        assert_eq!(env.status_of(&format!("/{token}/")).await, 410);
        assert_eq!(env.controller.route_requests(&token), asked + 1);
    })
    .await
}
