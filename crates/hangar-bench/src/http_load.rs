//! A small closed-loop HTTP/1.1 load generator: `concurrency` keep-alive connections, each sending the
//! next GET as soon as the previous response body is read, until `requests` responses are in. Scenarios
//! run it on a thread of its own, so it does not share worker threads with the in-process system it
//! measures.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Where to send GETs.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOutcome {
    /// One per successful (2xx) response.
    pub latencies: Vec<Duration>,
    /// Non-2xx responses and failed requests.
    pub errors: usize,
    pub elapsed: Duration,
}

impl LoadOutcome {
    /// Successful responses per second of wall time.
    pub fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Sends `requests` GETs over `concurrency` connections.
pub async fn run_http_load(
    target: &HttpTarget,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<LoadOutcome> {
    let remaining = AtomicUsize::new(requests);
    let started = Instant::now();
    let workers = (0..concurrency.max(1)).map(|_| run_connection(target, &remaining));
    let results = futures_util::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let mut outcome = LoadOutcome {
        elapsed,
        ..LoadOutcome::default()
    };
    for result in results {
        let (latencies, errors) = result?;
        outcome.latencies.extend(latencies);
        outcome.errors += errors;
    }
    Ok(outcome)
}

/// One keep-alive connection taking requests from the shared budget; reconnects after an error.
async fn run_connection(
    target: &HttpTarget,
    remaining: &AtomicUsize,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut latencies = Vec::new();
    let mut errors = 0;
    'connection: while remaining.load(Ordering::Relaxed) > 0 {
        let stream = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // Owns `sender`: dropping it when the loop ends lets the connection future finish.
        let requests = async {
            let mut sender = sender;
            while take_one(remaining) {
                let request = http::Request::get(target.path.as_str())
                    .header(http::header::HOST, target.host.as_str())
                    .body(Empty::<Bytes>::new())
                    .context("building a request")?;
                let sent = Instant::now();
                let (ok, closing) = match sender.send_request(request).await {
                    Ok(response) => {
                        let success = response.status().is_success();
                        // The server ends keep-alive after this response (nginx does every
                        // `keepalive_requests`): not an error, but this connection is done.
                        let closing = response
                            .headers()
                            .get(http::header::CONNECTION)
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                        (
                            response.into_body().collect().await.is_ok() && success,
                            closing,
                        )
                    }
                    Err(_) => (false, true),
                };
                if ok {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
                if closing {
                    return anyhow::Ok(false);
                }
            }
            Ok(true)
        };
        let (done, _) = tokio::join!(requests, conn);
        if done? {
            break 'connection;
        }
    }
    Ok((latencies, errors))
}

fn take_one(remaining: &AtomicUsize) -> bool {
    remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// One readiness probe attempt, as the drone's probe does it: any HTTP response to `GET /` counts.
pub async fn answers_http(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await.is_ok() && &head == b"HTTP/"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_responses_and_errors() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "ok" }));
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let target = |path: &str| HttpTarget {
                addr,
                host: "x".into(),
                path: path.into(),
            };
            let ok = run_http_load(&target("/ok"), 50, 4).await.unwrap();
            assert_eq!((ok.latencies.len(), ok.errors), (50, 0));
            assert!(ok.per_second() > 0.0);
            let missing = run_http_load(&target("/missing"), 5, 2).await.unwrap();
            assert_eq!((missing.latencies.len(), missing.errors), (0, 5));
            assert!(answers_http(addr).await);
            server.abort();
        })
        .await
        .unwrap();
    }
}
