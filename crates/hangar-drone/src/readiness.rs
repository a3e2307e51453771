//! Readiness probe: a backend is `ready` once an HTTP request to its address gets any HTTP response
//! (any status). Shared by all executors.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Delay between attempts during the first [`FAST_PHASE`]; after it the delay doubles from here up
/// to [`MAX_INTERVAL`]. A local process is often listening a few milliseconds after it starts, and a
/// refused connect to it costs microseconds, so probing each millisecond at first is cheap and finds
/// it within a millisecond (a 2 ms interval doubling from the start found a ~4 ms start at 6 ms,
/// hangar-bench `spawn`). Doubling afterwards keeps slow starters cheap to probe.
const FAST_INTERVAL: Duration = Duration::from_millis(1);
const FAST_PHASE: Duration = Duration::from_millis(25);
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// One attempt (connect, write, read the status line) may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the backend did not answer HTTP on {address} within {timeout:?}")]
pub struct ReadinessTimeout {
    pub address: SocketAddr,
    pub timeout: Duration,
}

/// Probes `address` until it answers HTTP or `timeout` passes.
pub async fn wait_ready(address: SocketAddr, timeout: Duration) -> Result<(), ReadinessTimeout> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut interval = FAST_INTERVAL;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        if let Ok(true) = tokio::time::timeout_at(attempt_deadline, answers_http(address)).await {
            return Ok(());
        }
        let next = Instant::now() + interval;
        if next >= deadline {
            return Err(ReadinessTimeout { address, timeout });
        }
        tokio::time::sleep_until(next).await;
        if started.elapsed() >= FAST_PHASE {
            interval = (interval * 2).min(MAX_INTERVAL);
        }
    }
}

/// One attempt: `GET /` and check that the answer starts like an HTTP response.
async fn answers_http(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return false;
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nUser-Agent: hangar-drone\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await.is_ok() && &head == b"HTTP/"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn ready_once_http_answers() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                // The first connection answers garbage, the second answers HTTP.
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(b"garbage").await;
                drop(s);
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
            });
            wait_ready(address, Duration::from_secs(5)).await.unwrap();
            server.await.unwrap();
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn times_out_when_nothing_listens() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            drop(listener);
            let err = wait_ready(address, Duration::from_millis(200))
                .await
                .unwrap_err();
            assert_eq!(err.address, address);
        })
        .await
        .unwrap();
    }
}
