//! The kept connection's exchange against a scripted backend on a real socket: what it sends, how
//! it reads each kind of response body, and when the connection goes back for the next request.

use super::*;
use crate::error::full_body;
use bytes::Bytes;
use http::{StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A backend that accepts one connection and, for each scripted answer, reads one request (head,
/// and a body of its `content-length` or up to the chunked end) and writes the answer's pieces as
/// separate writes. Each request's bytes are reported. With `close`, it closes after the script.
async fn backend(
    answers: Vec<Vec<&'static [u8]>>,
    close: bool,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        for pieces in answers {
            let request = read_request(&mut socket, &mut buf).await;
            let _ = tx.send(request);
            for piece in pieces {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        }
        if !close {
            // Stay open until the client closes.
            let mut rest = [0u8; 64];
            while socket.read(&mut rest).await.is_ok_and(|n| n > 0) {}
        }
    });
    (addr, rx)
}

async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_string();
            let lower = head.to_ascii_lowercase();
            let body_end = if let Some(i) = lower.find("content-length: ") {
                let n: usize = lower[i + 16..]
                    .split("\r\n")
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                Some(end + 4 + n)
            } else if lower.contains("transfer-encoding: chunked") {
                find(&buf[end + 4..], b"0\r\n\r\n").map(|i| end + 4 + i + 5)
            } else {
                Some(end + 4)
            };
            if let Some(body_end) = body_end.filter(|e| *e <= buf.len()) {
                let request = String::from_utf8_lossy(&buf[..body_end]).to_string();
                buf.drain(..body_end);
                return request;
            }
        }
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0, "client closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn get(path: &str) -> Request<ProxyBody> {
    Request::get(path)
        .header("host", "backend")
        .body(full_body(Bytes::new()))
        .unwrap()
}

async fn connect(addr: SocketAddr) -> KeptStream {
    KeptStream::new(TcpStream::connect(addr).await.unwrap())
}

/// The connection back in `slot`, if the response put it there.
fn taken(slot: &Slot, addr: SocketAddr) -> Option<KeptStream> {
    match &mut *super::super::lock(slot) {
        super::super::Kept::Open(a, stream) if *a == addr => stream.take(),
        _ => None,
    }
}

async fn exchange(
    conn: KeptStream,
    req: Request<ProxyBody>,
    slot: &Slot,
    addr: SocketAddr,
) -> Response<KeptBody> {
    match tokio::time::timeout(TIMEOUT, conn.exchange(req, slot.clone(), addr)).await {
        Ok(Ok(response)) => response,
        Ok(Err(ExchangeError::Unsent(_, e) | ExchangeError::Failed(e))) => {
            panic!("exchange failed: {e}")
        }
        Err(_) => panic!("exchange timed out"),
    }
}

async fn collect(body: KeptBody) -> (Bytes, Option<HeaderMap>) {
    let collected = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .expect("body timed out")
        .expect("body failed");
    let trailers = collected.trailers().cloned();
    (collected.to_bytes(), trailers)
}

#[tokio::test]
async fn content_length_responses_reuse_the_connection() {
    let (addr, mut requests) = backend(
        vec![
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhel",
                b"lo",
            ],
            vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"],
        ],
        false,
    )
    .await;
    let slot = Slot::default();
    let response = exchange(connect(addr).await, get("/a?b=1"), &slot, addr).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-a"], "1");
    assert_eq!(response.body().size_hint().exact(), Some(5));
    assert!(
        taken(&slot, addr).is_none(),
        "back before its body was read"
    );
    let (body, _) = collect(response.into_body()).await;
    assert_eq!(body, "hello");
    assert_eq!(
        requests.recv().await.unwrap(),
        "GET /a?b=1 HTTP/1.1\r\nhost: backend\r\n\r\n"
    );
    let conn = taken(&slot, addr).expect("the connection went back");
    assert!(conn.is_usable());
    let response = exchange(conn, get("/second"), &slot, addr).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.body().is_end_stream());
    assert!(taken(&slot, addr).is_some(), "an empty body ends at once");
    assert!(requests.recv().await.unwrap().starts_with("GET /second "));
}

#[tokio::test]
async fn chunked_responses_are_decoded_across_reads_with_their_trailers() {
    let (addr, _requests) = backend(
        vec![
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nab",
                b"cd\r\n3;ext=1\r",
                b"\nefg\r\n0\r\nx-sum: 7\r\n",
                b"\r\n",
            ],
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"],
        ],
        false,
    )
    .await;
    let slot = Slot::default();
    let response = exchange(connect(addr).await, get("/"), &slot, addr).await;
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let (body, trailers) = collect(response.into_body()).await;
    assert_eq!(body, "abcdefg");
    assert_eq!(trailers.expect("trailers")["x-sum"], "7");
    let conn = taken(&slot, addr).expect("the connection went back");
    let response = exchange(conn, get("/"), &slot, addr).await;
    let (body, trailers) = collect(response.into_body()).await;
    assert!(body.is_empty() && trailers.is_none());
    assert!(taken(&slot, addr).is_some());
}

#[tokio::test]
async fn a_body_without_length_runs_to_the_close_and_the_connection_is_not_kept() {
    let (addr, _requests) =
        backend(vec![vec![b"HTTP/1.0 200 OK\r\n\r\nall of ", b"it"]], true).await;
    let slot = Slot::default();
    let response = exchange(connect(addr).await, get("/"), &slot, addr).await;
    assert_eq!(response.version(), Version::HTTP_10);
    let (body, _) = collect(response.into_body()).await;
    assert_eq!(body, "all of it");
    assert!(taken(&slot, addr).is_none());
}

#[tokio::test]
async fn head_responses_and_informational_ones_have_no_body() {
    let (addr, _requests) = backend(
        vec![
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"],
            vec![b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"],
            vec![b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"],
        ],
        false,
    )
    .await;
    let slot = Slot::default();
    let head = Request::head("/").body(full_body(Bytes::new())).unwrap();
    let response = exchange(connect(addr).await, head, &slot, addr).await;
    assert_eq!(response.headers()["content-length"], "1000");
    assert!(response.body().is_end_stream());
    let conn = taken(&slot, addr).expect("kept after a HEAD");
    let response = exchange(conn, get("/"), &slot, addr).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(!response.headers().contains_key("link"));
    let conn = taken(&slot, addr).expect("kept after a 204");
    let response = exchange(conn, get("/"), &slot, addr).await;
    let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
    assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine Thanks"[..]));
    let (body, _) = collect(response.into_body()).await;
    assert_eq!(body, "ok");
    assert!(taken(&slot, addr).is_none(), "the backend said close");
}

#[tokio::test]
async fn request_bodies_are_framed_as_hyper_frames_them() {
    let (addr, mut requests) = backend(
        vec![
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
        ],
        false,
    )
    .await;
    let slot = Slot::default();
    // A body of known size gets its content-length.
    let post = Request::post("/p")
        .body(full_body(Bytes::from_static(b"12345")))
        .unwrap();
    exchange(connect(addr).await, post, &slot, addr).await;
    assert_eq!(
        requests.recv().await.unwrap(),
        "POST /p HTTP/1.1\r\ncontent-length: 5\r\n\r\n12345"
    );
    // A body of unknown size is sent chunked.
    let frames = futures_util::stream::iter(vec![
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab"))),
        Ok(Frame::data(Bytes::from_static(b"cde"))),
    ]);
    let post = Request::put("/q")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap();
    let conn = taken(&slot, addr).unwrap();
    exchange(conn, post, &slot, addr).await;
    assert_eq!(
        requests.recv().await.unwrap(),
        "PUT /q HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    );
    // An empty body sends neither header, and drops a transfer-encoding.
    let empty = Request::delete("/r")
        .header("transfer-encoding", "chunked")
        .body(full_body(Bytes::new()))
        .unwrap();
    let conn = taken(&slot, addr).unwrap();
    exchange(conn, empty, &slot, addr).await;
    assert_eq!(requests.recv().await.unwrap(), "DELETE /r HTTP/1.1\r\n\r\n");
    // With both, transfer-encoding wins and the content-length is not sent.
    let frames = futures_util::stream::iter(vec![Ok::<_, BoxError>(Frame::data(
        Bytes::from_static(b"xyz"),
    ))]);
    let both = Request::post("/s")
        .header("content-length", "3")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap();
    let conn = taken(&slot, addr).unwrap();
    exchange(conn, both, &slot, addr).await;
    assert_eq!(
        requests.recv().await.unwrap(),
        "POST /s HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n"
    );
}

#[tokio::test]
async fn a_backend_closing_without_answer_is_retried_only_when_that_is_safe() {
    // The backend reads each request and closes without a byte of answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            read_request(&mut socket, &mut buf).await;
        }
    });
    let slot = Slot::default();
    let outcome = connect(addr)
        .await
        .exchange(get("/"), slot.clone(), addr)
        .await;
    assert!(
        matches!(outcome, Err(ExchangeError::Unsent(..))),
        "a GET is sent again"
    );
    let post = Request::post("/").body(full_body(Bytes::new())).unwrap();
    let outcome = connect(addr).await.exchange(post, slot.clone(), addr).await;
    assert!(
        matches!(outcome, Err(ExchangeError::Failed(_))),
        "a POST is not"
    );
}

#[tokio::test]
async fn an_idle_connection_the_backend_closed_is_not_used() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conn = connect(addr).await;
    let (socket, _) = listener.accept().await.unwrap();
    assert!(conn.is_usable());
    drop(socket);
    // The runtime learns of the close from its next poll of the socket's readiness.
    let closed = tokio::time::timeout(TIMEOUT, async {
        while conn.is_usable() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the close was never noticed");
}

#[tokio::test]
async fn malformed_responses_are_errors() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"not http at all\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ] {
        let (addr, _requests) = backend(vec![vec![answer]], false).await;
        let outcome = connect(addr)
            .await
            .exchange(get("/"), Slot::default(), addr)
            .await;
        assert!(
            matches!(outcome, Err(ExchangeError::Failed(_))),
            "{}",
            String::from_utf8_lossy(answer)
        );
    }
    let huge: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx: {}\r\n\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (addr, _requests) = backend(vec![vec![huge]], false).await;
    let outcome = connect(addr)
        .await
        .exchange(get("/"), Slot::default(), addr)
        .await;
    assert!(matches!(outcome, Err(ExchangeError::Failed(_))));
    // A bad chunk size fails the body, and the connection is not kept.
    let (addr, _requests) = backend(
        vec![vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ]],
        false,
    )
    .await;
    let slot = Slot::default();
    let response = exchange(connect(addr).await, get("/"), &slot, addr).await;
    assert!(response.into_body().collect().await.is_err());
    assert!(taken(&slot, addr).is_none());
}

#[tokio::test]
async fn an_answer_before_the_whole_body_is_returned_and_the_connection_dropped() {
    // The backend reads the head only, refuses the upload and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while find(&buf, b"\r\n\r\n").is_none() {
            let n = socket.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig")
            .await
            .unwrap();
        // Stop reading without closing (for longer than the exchange may take): the upload stalls
        // once the socket buffers are full, so only an exchange that reads while it writes passes.
        tokio::time::sleep(TIMEOUT * 6).await;
    });
    // Larger than the socket buffers of both ends, so the write cannot complete.
    let upload = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
    let post = Request::post("/upload").body(full_body(upload)).unwrap();
    let slot = Slot::default();
    let response = exchange(connect(addr).await, post, &slot, addr).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (body, _) = collect(response.into_body()).await;
    assert_eq!(body, "big");
    assert!(taken(&slot, addr).is_none());
}
