//! A small load test: many WebSockets and HTTP requests through one proxy at the same time, with
//! every echo checked and exact connection accounting. No timing assertions.

use crate::support::{eventually, with_env};
use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WEBSOCKETS: usize = 200;
const MESSAGES_PER_WEBSOCKET: usize = 20;
const HTTP_REQUESTS: usize = 2000;
const HTTP_CONCURRENCY: usize = 32;

/// One WebSocket client: connects, waits until every client is connected, exchanges its messages,
/// closes. Waits at both barriers even when connecting failed, so one failure cannot hang the rest.
async fn run_websocket(
    url: String,
    host: String,
    id: usize,
    connected: Arc<Barrier>,
    go: Arc<Barrier>,
) -> anyhow::Result<()> {
    let connecting = async {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert("host", host.parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok::<_, anyhow::Error>(ws)
    };
    let ws = connecting.await;
    connected.wait().await;
    go.wait().await;
    let mut ws = ws.with_context(|| format!("websocket {id} did not connect"))?;
    for m in 0..MESSAGES_PER_WEBSOCKET {
        let text = format!("websocket {id} message {m}");
        ws.send(Message::text(text.clone())).await?;
        let echo = loop {
            match ws.next().await.context("stream ended")?? {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => break other,
            }
        };
        ensure!(
            echo == Message::text(text.clone()),
            "websocket {id}: got {echo:?} for {text:?}"
        );
    }
    ws.close(None).await?;
    while let Some(message) = ws.next().await {
        if let Err(error) = message {
            bail!("websocket {id} failed while closing: {error}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_websockets_and_requests_at_once() {
    with_env(async |env| {
        let ws_route = env.route("b-load-ws");
        let ws_token = env.token_for(&ws_route);
        let http_route = env.route("b-load-http");
        let http_token = env.token_for(&http_route);

        let connected = Arc::new(Barrier::new(WEBSOCKETS + 1));
        let go = Arc::new(Barrier::new(WEBSOCKETS + 1));
        let mut sockets = JoinSet::new();
        for id in 0..WEBSOCKETS {
            let url = format!("ws://{}/{ws_token}/ws", env.proxy.local_addr());
            let host = env.cluster.to_string();
            sockets.spawn(run_websocket(url, host, id, connected.clone(), go.clone()));
        }
        connected.wait().await;
        // Every tunnel is open and counted, exactly.
        let counts = env.proxy.connection_counts(&ws_route.backend_id).unwrap();
        assert_eq!(counts.open_connections, WEBSOCKETS);
        assert_eq!(env.proxy.open_tunnels(), WEBSOCKETS);
        go.wait().await;

        // Meanwhile, HTTP requests from a bounded number of concurrent clients.
        let http = reqwest::Client::new();
        let requests = futures_util::stream::iter(0..HTTP_REQUESTS).map(|i| {
            let request = http
                .get(env.url(&format!("/{http_token}/req/{i}?n={i}")))
                .header("host", env.cluster.as_str());
            async move {
                let response = request.send().await?;
                ensure!(
                    response.status() == 200,
                    "request {i}: {}",
                    response.status()
                );
                let seen: serde_json::Value = response.json().await?;
                let expected = format!("/req/{i}?n={i}");
                ensure!(
                    seen["path_and_query"] == expected,
                    "request {i}: saw {seen}"
                );
                Ok::<_, anyhow::Error>(())
            }
        });
        let http_errors: Vec<anyhow::Error> = requests
            .buffer_unordered(HTTP_CONCURRENCY)
            .filter_map(|result| async move { result.err() })
            .collect()
            .await;
        let mut ws_errors = Vec::new();
        while let Some(joined) = sockets.join_next().await {
            if let Err(error) = joined.unwrap() {
                ws_errors.push(error);
            }
        }
        assert!(http_errors.is_empty(), "HTTP errors: {http_errors:?}");
        assert!(ws_errors.is_empty(), "WebSocket errors: {ws_errors:?}");

        // Exact accounting afterwards: nothing open, keepalives sent for both backends.
        drop(http);
        for backend in [&ws_route.backend_id, &http_route.backend_id] {
            eventually(&format!("no open connections to {backend}"), || async {
                env.proxy
                    .connection_counts(backend)
                    .is_some_and(|c| c.open_connections == 0)
            })
            .await;
            eventually(&format!("a keepalive for {backend}"), || async {
                env.controller.keepalives(backend) >= 1
            })
            .await;
        }
        assert_eq!(env.proxy.open_tunnels(), 0);
        eventually("no client connections", || async {
            env.proxy.open_client_connections() == 0
        })
        .await;
    })
    .await
}
