//! Test fixtures: a fake controller (answers the proxy session from a table the test controls and
//! records what the proxy sends), a real upstream backend (HTTP echo, slow and streaming endpoints,
//! WebSocket echo) and an `Env` that starts both plus a proxy on port 0.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use hangar_proxy::{ProxyConfig, ProxyHandle};
use hangar_test_support::handshake::welcome;
use hangar_test_support::served::Served;
use hangar_types::protocol::{ControllerToProxy, Hello, ProxyToController, RouteInfo};
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, ClusterName};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Upper bound for every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one `eventually` condition.
const EVENTUALLY_DEADLINE: Duration = Duration::from_secs(20);

/// Runs a test body with [`TEST_TIMEOUT`].
pub async fn with_timeout<F: Future>(body: F) -> F::Output {
    hangar_test_support::with_timeout(TEST_TIMEOUT, body).await
}

/// Polls `condition` until it holds; panics with `what` after a deadline.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    hangar_test_support::eventually_within(EVENTUALLY_DEADLINE, what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Fake controller
// ---------------------------------------------------------------------------------------------

/// How the fake controller answers a `RouteRequest` for a token.
#[derive(Clone)]
pub enum Answer {
    Route(RouteInfo),
    /// Answer `None` (unknown token).
    NoRoute,
    /// Do not answer until the test calls [`FakeController::release`].
    Hold,
}

#[derive(Default)]
struct ControllerInner {
    answers: Mutex<HashMap<String, Answer>>,
    route_requests: Mutex<Vec<ConnectionToken>>,
    keepalives: Mutex<Vec<BackendId>>,
    /// Certificate messages from the proxy, in arrival order.
    tls_messages: Mutex<Vec<ProxyToController>>,
    hellos: Mutex<Vec<Hello>>,
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<ControllerToProxy>>>,
    next_session: Mutex<u64>,
    kill: Mutex<CancellationToken>,
}

pub struct FakeController {
    pub addr: SocketAddr,
    inner: Arc<ControllerInner>,
    /// Serves the proxy socket until the fake is dropped.
    _served: Served,
}

impl FakeController {
    pub async fn start() -> FakeController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        FakeController::serve(listener)
    }

    /// Serves the proxy socket on an already bound listener.
    pub fn serve(listener: TcpListener) -> FakeController {
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(ControllerInner::default());
        let app = Router::new()
            .route("/ctrl/c/{cluster}/proxy-socket", get(proxy_socket))
            .with_state(inner.clone());
        FakeController {
            addr,
            inner,
            _served: Served::start(listener, app),
        }
    }

    pub fn url(&self) -> url::Url {
        format!("http://{}/", self.addr).parse().unwrap()
    }

    pub fn set_answer(&self, token: &ConnectionToken, answer: Answer) {
        self.inner
            .answers
            .lock()
            .unwrap()
            .insert(token.as_str().to_string(), answer);
    }

    /// Sets the answer for `token` and sends it to every connected proxy.
    pub fn release(&self, token: &ConnectionToken, route: Option<RouteInfo>) {
        let answer = match &route {
            Some(r) => Answer::Route(r.clone()),
            None => Answer::NoRoute,
        };
        self.set_answer(token, answer);
        self.push(ControllerToProxy::RouteResponse {
            token: token.clone(),
            route,
        });
    }

    /// Sends a message to every connected proxy.
    pub fn push(&self, message: ControllerToProxy) {
        for tx in self.inner.sessions.lock().unwrap().values() {
            let _ = tx.send(message.clone());
        }
    }

    /// How many `RouteRequest`s arrived for `token`.
    pub fn route_requests(&self, token: &ConnectionToken) -> usize {
        self.inner
            .route_requests
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == token)
            .count()
    }

    pub fn keepalives(&self, backend: &BackendId) -> usize {
        self.inner
            .keepalives
            .lock()
            .unwrap()
            .iter()
            .filter(|b| *b == backend)
            .count()
    }

    pub fn sessions(&self) -> usize {
        self.inner.sessions.lock().unwrap().len()
    }

    /// The certificate messages the proxy sent (lease, TXT, HTTP-01, certificates).
    pub fn tls_messages(&self) -> Vec<ProxyToController> {
        self.inner.tls_messages.lock().unwrap().clone()
    }

    pub fn hellos(&self) -> Vec<Hello> {
        self.inner.hellos.lock().unwrap().clone()
    }

    /// Drops every proxy session (the proxies will reconnect).
    pub fn drop_sessions(&self) {
        let mut kill = self.inner.kill.lock().unwrap();
        kill.cancel();
        *kill = CancellationToken::new();
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.drop_sessions();
    }
}

async fn proxy_socket(ws: WebSocketUpgrade, State(inner): State<Arc<ControllerInner>>) -> Response {
    ws.on_upgrade(move |socket| run_fake_session(inner, socket))
}

async fn run_fake_session(inner: Arc<ControllerInner>, mut socket: WebSocket) {
    if !welcome(&mut socket, &inner.hellos).await {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut next = inner.next_session.lock().unwrap();
        *next += 1;
        *next
    };
    inner.sessions.lock().unwrap().insert(id, tx.clone());
    let kill = inner.kill.lock().unwrap().clone();
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let message: ProxyToController =
                        serde_json::from_str(text.as_str()).expect("proxy sends valid messages");
                    handle_proxy_message(&inner, &tx, message);
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            outgoing = rx.recv() => {
                let Some(message) = outgoing else { break };
                let text = serde_json::to_string(&message).unwrap();
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            _ = kill.cancelled() => break,
        }
    }
    inner.sessions.lock().unwrap().remove(&id);
}

fn handle_proxy_message(
    inner: &ControllerInner,
    tx: &mpsc::UnboundedSender<ControllerToProxy>,
    message: ProxyToController,
) {
    match message {
        ProxyToController::RouteRequest { token } => {
            inner.route_requests.lock().unwrap().push(token.clone());
            let answer = inner.answers.lock().unwrap().get(token.as_str()).cloned();
            let route = match answer {
                Some(Answer::Hold) => return,
                Some(Answer::Route(route)) => Some(route),
                Some(Answer::NoRoute) | None => None,
            };
            let _ = tx.send(ControllerToProxy::RouteResponse { token, route });
        }
        ProxyToController::KeepAlive { backend, .. } => {
            inner.keepalives.lock().unwrap().push(backend);
        }
        // Every certificate request is granted: this controller has one proxy.
        other => {
            let answer = match &other {
                ProxyToController::CertLeaseRequest => {
                    Some(ControllerToProxy::CertLeaseResponse { accepted: true })
                }
                ProxyToController::SetTxtRecord { .. } => {
                    Some(ControllerToProxy::SetTxtRecordResponse { accepted: true })
                }
                _ => None,
            };
            inner.tls_messages.lock().unwrap().push(other);
            if let Some(answer) = answer {
                let _ = tx.send(answer);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream backend
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct UpstreamState {
    slow_started: mpsc::UnboundedSender<()>,
    slow_gate: Arc<Notify>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// One message per request that reached `/slow`.
    pub slow_started: tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>,
    /// Lets waiting `/slow` requests answer.
    pub slow_gate: Arc<Notify>,
    /// Serves until the upstream is dropped.
    _served: Served,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let slow_gate = Arc::new(Notify::new());
        let state = UpstreamState {
            slow_started: tx,
            slow_gate: slow_gate.clone(),
        };
        let app = Router::new()
            .route("/ws", any(ws_echo))
            .route("/slow", get(slow))
            .route("/duplex", post(duplex))
            .route("/consume", post(consume))
            .route("/own-headers", get(own_headers))
            .fallback(echo)
            .with_state(state);
        Upstream {
            addr,
            slow_started: tokio::sync::Mutex::new(rx),
            slow_gate,
            _served: Served::start(listener, app),
        }
    }
}

/// Describes the request as the backend saw it, and the connection it came on (`peer`).
async fn echo(ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Json<Value> {
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    Json(json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "path_and_query": req.uri().path_and_query().map(|p| p.as_str()),
        "version": format!("{:?}", req.version()),
        "headers": headers,
        "peer": peer.to_string(),
    }))
}

async fn slow(State(state): State<UpstreamState>) -> &'static str {
    let gate = state.slow_gate.notified();
    let _ = state.slow_started.send(());
    gate.await;
    "done"
}

/// Streams the request body back as the response body, chunk by chunk.
async fn duplex(req: Request) -> Response {
    let stream = req.into_body().into_data_stream();
    axum::body::Body::from_stream(stream).into_response()
}

/// Reads the whole request body before answering with its length.
async fn consume(body: axum::body::Bytes) -> String {
    body.len().to_string()
}

async fn own_headers() -> Response {
    (
        [
            ("access-control-allow-origin", "https://example.com"),
            ("server", "upstream/1.0"),
        ],
        "own",
    )
        .into_response()
}

async fn ws_echo(upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols(["chat"])
        .on_upgrade(|mut socket| async move {
            while let Some(Ok(message)) = socket.recv().await {
                match message {
                    Message::Text(text) if text.as_str() == "close-me" => {
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    Message::Text(text) if text.as_str() == "ping-me" => {
                        let ping = Message::Ping(axum::body::Bytes::from_static(b"from-backend"));
                        if socket.send(ping).await.is_err() {
                            return;
                        }
                    }
                    // Report the client's answer to our ping as a text message.
                    Message::Pong(payload) => {
                        let text = format!("pong:{}", String::from_utf8_lossy(&payload));
                        if socket.send(Message::text(text)).await.is_err() {
                            return;
                        }
                    }
                    Message::Text(_) | Message::Binary(_) => {
                        if socket.send(message).await.is_err() {
                            return;
                        }
                    }
                    // The library queued its close reply; send it before dropping the socket.
                    Message::Close(_) => {
                        let _ = futures_util::SinkExt::flush(&mut socket).await;
                        return;
                    }
                    Message::Ping(_) => {}
                }
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Runs `test` with [`with_timeout`] against a started [`Env`].
pub async fn with_env(test: impl AsyncFnOnce(Env)) {
    with_timeout(async { test(Env::start().await).await }).await;
}

/// Runs `test` with [`with_timeout`] against a started [`Env`] with a route for `backend` and a token
/// resolving to it ([`Env::routed`]).
pub async fn with_routed(backend: &str, test: impl AsyncFnOnce(Env, RouteInfo, ConnectionToken)) {
    with_env(async |env| {
        let (route, token) = env.routed(backend);
        test(env, route, token).await;
    })
    .await;
}

/// An [`Env`] whose proxy is shutting down gracefully.
pub struct Draining {
    /// The shutdown: it finishes once the open connections are done.
    pub shutdown: tokio::task::JoinHandle<()>,
    /// The proxy's counters, readable while it drains.
    pub monitor: hangar_proxy::ProxyMonitor,
    /// Kept running until the test drops this.
    _controller: FakeController,
    pub upstream: Upstream,
}

pub struct Env {
    pub controller: FakeController,
    pub upstream: Upstream,
    pub proxy: ProxyHandle,
    /// `localhost:<proxy port>`: the cluster of every route and the default `Host` of requests.
    pub cluster: ClusterName,
    pub http: reqwest::Client,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(|_| {}).await
    }

    /// Starts an environment, letting the test adjust the proxy configuration; waits until the proxy
    /// is connected to the fake controller.
    pub async fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Env {
        let controller = FakeController::start().await;
        let upstream = Upstream::start().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cluster: ClusterName = format!("localhost:{port}").parse().unwrap();
        let mut config = ProxyConfig::new(controller.url(), cluster.clone());
        adjust(&mut config);
        let proxy = hangar_proxy::start(config, listener).await.unwrap();
        eventually("proxy connected", || async { proxy.is_ready() }).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Env {
            controller,
            upstream,
            proxy,
            cluster,
            http,
        }
    }

    /// Starts a graceful shutdown of the proxy (in a task); the fake controller and the upstream keep
    /// running while the proxy drains.
    pub fn begin_shutdown(self) -> Draining {
        let monitor = self.proxy.monitor();
        Draining {
            shutdown: tokio::spawn(self.proxy.shutdown()),
            monitor,
            _controller: self.controller,
            upstream: self.upstream,
        }
    }

    /// A route to the upstream for `backend` in this environment's cluster, with a user and auth data.
    pub fn route(&self, backend: &str) -> RouteInfo {
        RouteInfo {
            backend_id: backend.parse().unwrap(),
            address: self.upstream.addr,
            secret_token: SecretToken::new("the-secret".into()),
            cluster: self.cluster.clone(),
            user: Some("alice".into()),
            user_data: Some(
                serde_json::from_value(json!({"access": "readonly", "email": "a@example.com"}))
                    .unwrap(),
            ),
            subdomain: None,
            lease_remaining_ms: None,
        }
    }

    /// A fresh dynamic token the fake controller resolves to `route`.
    pub fn token_for(&self, route: &RouteInfo) -> ConnectionToken {
        let token = ConnectionToken::random();
        self.controller
            .set_answer(&token, Answer::Route(route.clone()));
        token
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.local_addr())
    }

    /// A request to the proxy with `Host: localhost:<port>`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("host", self.cluster.as_str())
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    /// GETs `path` with the extra `headers` and returns the answer.
    pub async fn get_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// A GET with the given `Host` header (instead of the cluster).
    pub fn get_with_host(&self, path: &str, host: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).header("host", host)
    }

    /// GETs `path` and returns the status of the answer.
    pub async fn status_of(&self, path: &str) -> u16 {
        self.get(path).send().await.unwrap().status().as_u16()
    }

    /// Tells the proxy that `route`'s backend is terminating (soft) and waits until requests with
    /// `token` get 410.
    pub async fn remove_terminating(&self, route: &RouteInfo, token: &ConnectionToken) {
        self.controller.push(ControllerToProxy::BackendRemoved {
            backend: route.backend_id.clone(),
            terminated: false,
        });
        eventually("requests for the removed backend get 410", || async {
            self.status_of(&format!("/{token}/")).await == 410
        })
        .await;
    }

    /// A route for `backend` (see [`Env::route`]) and a fresh token resolving to it.
    pub fn routed(&self, backend: &str) -> (RouteInfo, ConnectionToken) {
        let route = self.route(backend);
        let token = self.token_for(&route);
        (route, token)
    }

    /// GETs `path` and returns the backend's description of the request.
    pub async fn echo(&self, path: &str) -> Value {
        let response = self.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }
}

/// Checks the headers every proxy response carries.
pub fn assert_general_headers(response: &reqwest::Response) {
    let headers = response.headers();
    let server = headers["server"].to_str().unwrap();
    assert!(server.starts_with("Hangar/"), "server header {server:?}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(headers["access-control-allow-methods"], "*");
    assert_eq!(headers["access-control-allow-headers"], "*, Authorization");
}
