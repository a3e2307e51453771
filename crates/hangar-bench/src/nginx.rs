//! nginx as a reference reverse proxy for `proxy-http` and `proxy-ws`: when `nginx` is on `PATH`, a
//! temporary configuration proxies a loopback port to the backend, and nginx runs in the foreground as
//! a child until [`Nginx::stop`].
//!
//! One configuration serves both scenarios, as nginx's documentation sets them up: plain requests go
//! over upstream keep-alive connections (the `Connection` header to the backend is empty), and a
//! request with an `Upgrade` header is forwarded with `Connection: upgrade`, so a WebSocket handshake
//! becomes a tunnel of its own (an upgraded connection never returns to the keep-alive pool).

use crate::child::ChildProcess;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `nginx` on `PATH`, if any.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// `worker_connections` when the caller holds few connections open (`proxy-http`'s setting).
const MIN_WORKER_CONNECTIONS: usize = 4096;
/// Connections a worker may need beside the tunnels (keep-alive connections, a warm-up).
const SPARE_CONNECTIONS: usize = 512;

/// `worker_connections` for `client_connections` client connections open at once. Each may be a
/// WebSocket, which holds a client and a backend connection, and all may land on one worker (nginx
/// does not balance accepts), so every worker gets room for all of them.
fn worker_connections(client_connections: usize) -> usize {
    (2 * client_connections + SPARE_CONNECTIONS).max(MIN_WORKER_CONNECTIONS)
}

pub struct Nginx {
    child: ChildProcess,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts `binary` listening on `port` and proxying to `upstream`, with one worker per CPU and
    /// room for `client_connections` client connections open at once; waits until it answers.
    pub async fn start(
        binary: &PathBuf,
        port: u16,
        upstream: SocketAddr,
        client_connections: usize,
    ) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("hangar-bench-nginx-")
            .tempdir()
            .context("creating nginx's directory")?;
        let prefix = dir.path().display().to_string();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let worker_connections = worker_connections(client_connections);
        let conf = format!(
            r#"daemon off;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream backend {{
        server {upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    keepalive_requests 1000000;
    # Empty for plain requests, which keeps their upstream connection alive; "upgrade" when the
    # client asks for an upgrade.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            # A tunnel may be idle for a whole run; the defaults (60 s) would close it.
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            send_timeout 3600s;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let child = ChildProcess::spawn("nginx", command)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let started =
            crate::system::eventually("nginx to answer", Duration::from_secs(20), || async {
                crate::http_load::answers_http(addr).await.then_some(())
            })
            .await;
        if let Err(e) = started {
            let log =
                std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default();
            nginx.child.stop().await;
            return Err(e.context(format!("nginx did not start; its error log: {log}")));
        }
        Ok(nginx)
    }

    /// The master's process id (its workers are its children).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id()
    }

    /// The last lines of nginx's error log (why requests failed, if they did).
    pub fn error_log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self._dir.path().join("error.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops nginx (SIGTERM: the master stops its workers) and waits for it.
    pub async fn stop(mut self) {
        self.child.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_load::{run_http_load, HttpTarget};
    use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
    use axum::serve::ListenerExt;
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn every_worker_has_room_for_all_tunnels() {
        assert_eq!(worker_connections(16), MIN_WORKER_CONNECTIONS);
        assert_eq!(worker_connections(5000), 10_000 + SPARE_CONNECTIONS);
    }

    async fn echo(mut socket: WebSocket) {
        while let Some(Ok(message)) = socket.recv().await {
            if let AxumMessage::Text(_) = message {
                if socket.send(message).await.is_err() {
                    return;
                }
            }
        }
    }

    /// An upstream serving `GET /` and a WebSocket echo at `/ws`, counting the connections it accepts.
    async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/ws",
                axum::routing::get(|ws: WebSocketUpgrade| async { ws.on_upgrade(echo) }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, accepted, server)
    }

    /// Without nginx on `PATH` there is nothing to check (the scenarios skip nginx too).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_requests_reuse_upstream_connections_and_websockets_upgrade() {
        let Some(binary) = find() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "nginx is not on PATH; under CI this test needs it"
            );
            eprintln!("nginx is not on PATH; nothing to check");
            return;
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            let (upstream, accepted, server) = counting_upstream().await;
            let port = crate::system::free_port().await.unwrap();
            let nginx = Nginx::start(&binary, port, upstream, 4).await.unwrap();

            let before = accepted.load(Ordering::SeqCst);
            let target = HttpTarget {
                addr: nginx.addr,
                host: nginx.addr.to_string(),
                path: "/".into(),
            };
            let outcome = run_http_load(&target, 200, 4).await.unwrap();
            assert_eq!((outcome.latencies.len(), outcome.errors), (200, 0));
            // With upstream keep-alive, at most a few connections per worker; without, one per
            // request.
            let opened = accepted.load(Ordering::SeqCst) - before;
            assert!(
                opened <= 16,
                "{opened} upstream connections for 200 requests"
            );

            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", nginx.addr))
                .await
                .unwrap_or_else(|e| panic!("{e}; nginx: {}", nginx.error_log_tail(5)));
            for text in ["one", "two"] {
                ws.send(Message::text(text)).await.unwrap();
                let echoed = ws.next().await.unwrap().unwrap();
                assert_eq!(echoed, Message::text(text));
            }
            ws.close(None).await.unwrap();
            nginx.stop().await;
            server.abort();
        })
        .await
        .unwrap();
    }
}
