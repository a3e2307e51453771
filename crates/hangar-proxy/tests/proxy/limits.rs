//! Limits and timeouts against misbehaving clients: head size and count, body size, slow and idle
//! clients, and the connection limit.

use crate::raw::{read_response, send_raw, wait_closed, ws_request};
use crate::support::{eventually, with_timeout, Env};
use bytes::Bytes;
use hangar_proxy::ProxyConfig;
use hangar_types::token::ConnectionToken;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long a connection the proxy should close may take to be closed.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

async fn assert_closed_soon(stream: &mut TcpStream, what: &str) {
    tokio::time::timeout(CLOSE_DEADLINE, wait_closed(stream))
        .await
        .unwrap_or_else(|_| panic!("the proxy did not close {what}"));
}

fn get(path: &str, host: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n{headers}\r\n")
}

/// An env whose proxy configuration `adjust` changes, a token for `backend`, and the proxy's
/// address.
async fn env_with(
    adjust: impl FnOnce(&mut ProxyConfig),
    backend: &str,
) -> (Env, ConnectionToken, SocketAddr) {
    let env = Env::start_with(adjust).await;
    let token = env.token_for(&env.route(backend));
    let addr = env.proxy.local_addr();
    (env, token, addr)
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    with_timeout(async {
        let (env, token, addr) = env_with(|c| c.max_headers = 10, "b-heads").await;
        let path = format!("/{token}/");
        let host = env.cluster.as_str();

        let headers = |n: usize| (0..n).map(|i| format!("x-h{i}: v\r\n")).collect::<String>();
        let value = |len: usize| format!("x-big: {}\r\n", "a".repeat(len));
        for (case, extra, expected) in [
            // host + connection + 8 = 10 headers pass; 11 do not.
            ("10 headers", headers(8), 200),
            ("11 headers", headers(9), 431),
            // One header just under the 64 KiB default passes, one over it does not.
            ("a 60 kB header", value(60_000), 200),
            ("a 70 kB header", value(70_000), 431),
        ] {
            let response = send_raw(addr, get(&path, host, &extra).as_bytes())
                .await
                .unwrap();
            assert_eq!(response.status, expected, "{case}");
        }
        // So does an absurdly long URI.
        let long = format!("/{token}/{}", "u".repeat(100_000));
        let response = send_raw(addr, get(&long, host, "").as_bytes())
            .await
            .unwrap();
        assert!(matches!(response.status, 414 | 431), "{}", response.head);
    })
    .await
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    with_timeout(async {
        let env = Env::start_with(|c| c.max_request_body_bytes = 1024).await;
        let (route, token) = env.routed("b-body");
        let addr = env.proxy.local_addr();
        let host = env.cluster.as_str();
        let post = |extra: &str| {
            format!(
                "POST /{token}/consume HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n{extra}\r\n"
            )
        };

        // Bodies up to the limit reach the backend whole.
        for len in [1000, 1024] {
            let mut request = post(&format!("content-length: {len}\r\n")).into_bytes();
            request.extend(vec![b'x'; len]);
            let response = send_raw(addr, &request).await.unwrap();
            assert_eq!(response.status, 200);
            assert_eq!(response.body, len.to_string().as_bytes());
        }
        // A declared length over the limit is refused before anything is forwarded.
        let response = send_raw(addr, post("content-length: 1025\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(response.status, 413);
        assert!(response.header("x-plane-backend-id").is_none());
        assert!(String::from_utf8_lossy(&response.body).contains("larger than the limit"));

        // A chunked body is cut off once it grows past the limit.
        let mut request = post("transfer-encoding: chunked\r\n").into_bytes();
        for _ in 0..3 {
            request.extend_from_slice(b"200\r\n");
            request.extend(vec![b'y'; 0x200]);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let response = send_raw(addr, &request).await.unwrap();
        assert_eq!(response.status, 413);
        assert_eq!(response.header("x-plane-backend-id"), Some("b-body"));

        // The same through reqwest, with a streamed body.
        let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'z'; 400])));
        let response = env
            .request(reqwest::Method::POST, &format!("/{token}/consume"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        eventually("the exchanges are closed", || async {
            env.proxy
                .connection_counts(&route.backend_id)
                .is_some_and(|c| c.open_connections == 0)
        })
        .await;
    })
    .await
}

/// An env whose proxy allows `header_read_ms` for a request head and `idle_ms` between requests, a
/// token for `backend`, and the proxy's address.
async fn env_with_timeouts(
    header_read_ms: u64,
    idle_ms: u64,
    backend: &str,
) -> (Env, ConnectionToken, SocketAddr) {
    let timeouts = |c: &mut ProxyConfig| {
        c.header_read_timeout = Duration::from_millis(header_read_ms);
        c.idle_timeout = Duration::from_millis(idle_ms);
    };
    env_with(timeouts, backend).await
}

#[tokio::test]
async fn slow_request_heads_are_dropped() {
    with_timeout(async {
        // Heads must arrive within 300 ms; idle connections may stay.
        let (env, token, addr) = env_with_timeouts(300, 600_000, "b-slowloris").await;

        // A client that connects and never sends anything.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert_closed_soon(&mut silent, "a silent connection").await;

        // A client that starts a request head and never finishes it.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET /x HTTP/1.1\r\nhost: a\r\nx-slow:")
            .await
            .unwrap();
        assert_closed_soon(&mut partial, "an unfinished request head").await;

        // The same on a kept-alive connection after a complete exchange (hyper's own timer).
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /{token}/ HTTP/1.1\r\nhost: {}\r\n\r\n", env.cluster);
        kept.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut kept).await.unwrap().status, 200);
        kept.write_all(b"GET /x HTTP/1.1\r\nhost:").await.unwrap();
        assert_closed_soon(&mut kept, "an unfinished second request head").await;
    })
    .await
}

#[tokio::test]
async fn idle_connections_are_closed() {
    with_timeout(async {
        // Idle connections close after 300 ms; heads may take long.
        let (env, token, addr) = env_with_timeouts(600_000, 300, "b-idle").await;

        // HTTP/1.1 keep-alive: closed once idle after its exchange.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /{token}/ HTTP/1.1\r\nhost: {}\r\n\r\n", env.cluster);
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut stream).await.unwrap();
        assert_eq!(response.status, 200);
        assert_ne!(response.header("connection"), Some("close"));
        assert_closed_soon(&mut stream, "an idle keep-alive connection").await;

        // HTTP/2: the connection ends (GOAWAY) once idle.
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::get(format!("http://{}/{token}/", env.cluster))
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
        tokio::time::timeout(CLOSE_DEADLINE, connection)
            .await
            .expect("the idle HTTP/2 connection is closed")
            .unwrap()
            .unwrap();
        eventually("no client connections", || async {
            env.proxy.open_client_connections() == 0
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_tunnels_count() {
    with_timeout(async {
        let (env, token, addr) = env_with(|c| c.max_connections = 2, "b-limit").await;

        // A WebSocket tunnel keeps its slot after the HTTP exchange that opened it.
        let url = format!("ws://{addr}/{token}/ws");
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        request
            .headers_mut()
            .insert("host", env.cluster.as_str().parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        // And so does an open (idle) connection.
        let idle = TcpStream::connect(addr).await.unwrap();
        eventually("two client connections", || async {
            env.proxy.open_client_connections() == 2
        })
        .await;

        // The third gets a short 503 and is closed.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let request = ws_request(&format!("/{token}/ws"), env.cluster.as_str(), &[]);
        third.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut third).await.expect("a 503");
        assert_eq!(response.status, 503);
        assert_eq!(response.header("connection"), Some("close"));
        assert!(response
            .header("server")
            .is_some_and(|s| s.starts_with("Hangar/")));
        assert!(String::from_utf8_lossy(&response.body).contains("connection limit"));
        assert_closed_soon(&mut third, "the rejected connection").await;
        assert_eq!(env.proxy.open_client_connections(), 2);

        // Closing the tunnel frees its slot.
        drop(ws);
        eventually("one client connection", || async {
            env.proxy.open_client_connections() == 1
        })
        .await;
        let response = send_raw(addr, get("/ready", "x", "").as_bytes())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        drop(idle);
        eventually("no client connections", || async {
            env.proxy.open_client_connections() == 0
        })
        .await;
    })
    .await
}
