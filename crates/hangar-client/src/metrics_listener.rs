//! The metrics listener of the node components (drone, proxy): `GET /metrics` in the Prometheus text
//! format on a separate, optional address, never on a port end users reach.
//!
//! Owns: the accept loop, the HTTP/1.1 connection limits (request-head timeout, no keep-alive) and the
//! response (404 for other paths, 405 for other methods, 500 when encoding fails). It does not know
//! any series: the caller passes a scrape function that renders them. It lives here because both the
//! drone and the proxy depend on this crate, and `hangar-types` may not do IO.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Content type of the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest a metrics client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Binds the metrics listener if `addr` is configured, returning it with its address (port 0 resolved).
/// Components bind it before anything runs, so a busy port fails their start.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<(TcpListener, SocketAddr)>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let bound = async {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    bound.await.map(Some).map_err(|e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })
}

/// Serves `GET /metrics` on `listener` (HTTP/1.1) until `cancel` fires; connections run on `tasks`.
/// `scrape` renders the series each time they are requested.
pub async fn run_metrics_listener<F, Fut>(
    listener: TcpListener,
    scrape: F,
    tasks: TaskTracker,
    cancel: CancellationToken,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<String, std::fmt::Error>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "Could not accept a metrics connection");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_RETRY) => continue,
                }
            }
        };
        let scrape = scrape.clone();
        let service = service_fn(move |req| {
            let scrape = scrape.clone();
            async move { Ok::<_, Infallible>(metrics_response(&req, scrape).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "Metrics connection ended with an error");
                    }
                }
            }
        });
    }
}

async fn metrics_response<F, Fut>(req: &Request<Incoming>, scrape: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<String, std::fmt::Error>>,
{
    const PLAIN: &str = "text/plain; charset=utf-8";
    let (status, content_type, body) = if req.uri().path() != "/metrics" {
        (StatusCode::NOT_FOUND, PLAIN, "not found\n".to_string())
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "use GET\n".to_string(),
        )
    } else {
        match scrape().await {
            Ok(text) => (StatusCode::OK, CONTENT_TYPE, text),
            Err(error) => {
                tracing::error!(%error, "Failed to encode metrics");
                let body = "failed to encode metrics\n".to_string();
                (StatusCode::INTERNAL_SERVER_ERROR, PLAIN, body)
            }
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn serves_metrics_only_on_get_metrics_and_stops_on_cancel() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let scrapes = Arc::new(AtomicU64::new(0));
            let counted = scrapes.clone();
            let scrape = move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok(format!("scrapes_total {n}\n")) }
            };
            let (tasks, cancel) = (TaskTracker::new(), CancellationToken::new());
            let run = tokio::spawn(run_metrics_listener(
                listener,
                scrape,
                tasks.clone(),
                cancel.clone(),
            ));
            let http = reqwest::Client::new();

            let ok = http.get(format!("{base}/metrics")).send().await.unwrap();
            assert_eq!(ok.status(), 200);
            assert_eq!(ok.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
            assert_eq!(ok.text().await.unwrap(), "scrapes_total 1\n");
            let other = http.get(format!("{base}/other")).send().await.unwrap();
            assert_eq!(other.status(), 404);
            let post = http.post(format!("{base}/metrics")).send().await.unwrap();
            assert_eq!(post.status(), 405);
            assert_eq!(scrapes.load(Ordering::SeqCst), 1, "only GET scrapes");

            cancel.cancel();
            run.await.unwrap();
            tasks.close();
            tasks.wait().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_failed_encoding_is_a_server_error() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/metrics", listener.local_addr().unwrap());
            let (tasks, cancel) = (TaskTracker::new(), CancellationToken::new());
            let scrape = || async { Err(std::fmt::Error) };
            let run = tokio::spawn(run_metrics_listener(
                listener,
                scrape,
                tasks.clone(),
                cancel.clone(),
            ));
            let response = reqwest::get(url).await.unwrap();
            assert_eq!(response.status(), 500);
            cancel.cancel();
            run.await.unwrap();
        })
        .await
        .expect("test timed out");
    }
}
