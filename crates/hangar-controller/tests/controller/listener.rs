//! The API listener's limits, over real sockets: a client dribbling its request head is cut while
//! others keep being answered, the connection cap answers 503 until a slot frees, oversize heads get
//! 431. (WebSockets and status streams through the same listener are covered by the other modules.)

use crate::support::{eventually, with_controller_config, TestController, WAIT};
use hangar_controller::ControllerConfig;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs `test` with [`with_controller_config`] against a controller with [`TestController::config`]
/// changed by `adjust`, passing the address its API listens on.
async fn with_listener(
    adjust: impl FnOnce(&mut ControllerConfig),
    test: impl AsyncFnOnce(SocketAddr),
) {
    let mut config = TestController::config();
    adjust(&mut config);
    with_controller_config(config, async |ctl| test(ctl.local_addr()).await).await
}

/// Sends `request` on a fresh connection and returns everything read until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    // The server may reset after answering (unread request bytes); keep what arrived.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

const HEALTH: &[u8] = b"GET /pub/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// Whether the server has closed (or reset) `stream`; `false` while it is still open.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn a_client_dribbling_its_request_head_is_cut_while_others_are_answered() {
    let limit = |c: &mut ControllerConfig| c.header_read_timeout = Duration::from_millis(500);
    with_listener(limit, async |addr| {
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /pub/health HTTP/1.1\r\n")
                .await
                .unwrap();
            slow.push(stream);
        }
        // One byte per round, every connection, until the server has cut them all; each round
        // also checks that an ordinary request is answered meanwhile.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut answered = 0;
        loop {
            let mut open = 0;
            for stream in slow.iter_mut() {
                if closed_by_server(stream).await || stream.write_all(b"x").await.is_err() {
                    continue;
                }
                open += 1;
            }
            let answer = exchange(addr, HEALTH).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            answered += 1;
            if open == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} dribbling connections still open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answered > 0);
    })
    .await
}

#[tokio::test]
async fn a_keep_alive_connection_that_sends_nothing_more_is_cut() {
    let limit = |c: &mut ControllerConfig| c.header_read_timeout = Duration::from_millis(300);
    with_listener(limit, async |addr| {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /pub/health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        // Then a second head that never completes.
        stream.write_all(b"GET /pub/health HT").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection stayed open");
    })
    .await
}

#[tokio::test]
async fn connections_over_the_cap_get_503_until_a_slot_frees() {
    let limit = |c: &mut ControllerConfig| c.max_connections = 3;
    with_listener(limit, async |addr| {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The three are accepted in order, so the fourth is over the cap once they all are.
        let answer = eventually("a connection over the cap to be refused", || async {
            let answer = exchange(addr, HEALTH).await;
            answer.starts_with("HTTP/1.1 503").then_some(answer)
        })
        .await;
        assert!(answer.contains("TooManyConnections"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        held.pop();
        eventually("a freed slot to be used", || async {
            exchange(addr, HEALTH)
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn oversize_request_heads_get_431_and_normal_ones_pass() {
    let limit = |c: &mut ControllerConfig| c.max_header_bytes = 8192;
    with_listener(limit, async |addr| {
        let big = format!(
            "GET /pub/health HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\nconnection: close\r\n\r\n",
            "a".repeat(20_000)
        );
        let answer = exchange(addr, big.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let many = format!(
            "GET /pub/health HTTP/1.1\r\nhost: x\r\n{}connection: close\r\n\r\n",
            "x-h: 1\r\n".repeat(150)
        );
        let answer = exchange(addr, many.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let normal = format!(
            "GET /pub/health HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\nconnection: close\r\n\r\n",
            "a".repeat(4000)
        );
        let answer = exchange(addr, normal.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    })
    .await
}
