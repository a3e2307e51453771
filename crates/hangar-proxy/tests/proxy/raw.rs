//! Byte-level test tools: raw HTTP/1.1 requests and responses, WebSocket frames, and a raw
//! WebSocket backend whose every byte the test controls.

use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The `Sec-WebSocket-Key` raw clients send.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads a message head up to and including the blank line; `None` on end of stream or error
/// before it is complete. Reads byte by byte so nothing after the head is consumed.
pub async fn read_head<R: AsyncRead + Unpin>(stream: &mut R) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Reads one response (head and `Content-Length` body); `None` when the connection ends first.
pub async fn read_response<R: AsyncRead + Unpin>(stream: &mut R) -> Option<RawResponse> {
    let head = read_head(stream).await?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let length: usize = response
        .header("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    response.body = vec![0u8; length];
    stream.read_exact(&mut response.body).await.ok()?;
    Some(response)
}

/// Sends `request` on a new connection and reads the response; `None` when the proxy closed the
/// connection without one. Write errors are ignored (the proxy may answer and close early).
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    read_response(&mut stream).await
}

/// Reads until the peer closes the connection (end of stream or reset), discarding data.
pub async fn wait_closed<R: AsyncRead + Unpin>(stream: &mut R) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Reads one frame: its first header byte and its (unmasked) payload.
pub async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await.ok()?;
    let len = match header[1] & 0x7F {
        126 => u64::from(stream.read_u16().await.ok()?),
        127 => stream.read_u64().await.ok()?,
        short => u64::from(short),
    };
    let mask = if header[1] & 0x80 != 0 {
        let mut mask = [0u8; 4];
        stream.read_exact(&mut mask).await.ok()?;
        Some(mask)
    } else {
        None
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    stream.read_exact(&mut payload).await.ok()?;
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((header[0], payload))
}

/// A WebSocket handshake request for `path` with `Host: host` and extra header lines.
pub fn ws_request(path: &str, host: &str, extra: &[&str]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: {WS_KEY}\r\n"
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// A backend that accepts WebSocket handshakes with raw sockets.
pub struct RawWsBackend {
    listener: TcpListener,
}

impl RawWsBackend {
    pub async fn start() -> RawWsBackend {
        RawWsBackend {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Accepts one connection and completes the handshake, adding `extra` header lines to the
    /// `101`; returns the socket and the request head the backend received.
    pub async fn accept(&self, extra: &[&str]) -> (TcpStream, String) {
        let (mut stream, _) = self.listener.accept().await.unwrap();
        let head = read_head(&mut stream).await.expect("a handshake request");
        let key = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_string())
            })
            .expect("a sec-websocket-key");
        let mut response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        for line in extra {
            response.push_str(line);
            response.push_str("\r\n");
        }
        response.push_str("\r\n");
        stream.write_all(response.as_bytes()).await.unwrap();
        (stream, head)
    }
}
