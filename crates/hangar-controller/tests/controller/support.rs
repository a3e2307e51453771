//! Test harness: a controller on 127.0.0.1:0 over an in-memory SQLite store, fake drones and proxies
//! speaking the real protocol over real WebSockets, and polling helpers (no sleeps).

use futures_util::{SinkExt, StreamExt};
use hangar_controller::{AppState, ControllerConfig, ControllerHandle};
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::api::ConnectResponse;
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{
    ActionMessage, BackendAction, ControllerToDrone, ControllerToProxy, DroneToController, Hello,
    HelloResponse, NodeHello, ProxyToController, RouteInfo,
};
use hangar_types::token::ConnectionToken;
use hangar_types::{
    BackendId, BackendState, ControllerName, DroneName, Millis, ProxyName, TerminationKind,
    TerminationReason, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const CLUSTER: &str = "localhost:9090";
/// Every test body runs under this timeout.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(40);
/// Longest wait for one expected message or condition.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs a test body with [`TEST_TIMEOUT`].
pub async fn timed<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("test timed out");
}

/// Runs `test` with [`TEST_TIMEOUT`] against a controller started by [`TestController::start`], and
/// shuts that controller down after it.
pub async fn with_controller(test: impl AsyncFnOnce(&TestController)) {
    with_controller_config(TestController::config(), test).await
}

/// [`with_controller`] with a controller started with `config`.
pub async fn with_controller_config(
    config: ControllerConfig,
    test: impl AsyncFnOnce(&TestController),
) {
    timed(async {
        let ctl = TestController::start_with(config).await;
        test(&ctl).await;
        ctl.shutdown().await;
    })
    .await
}

/// Polls `check` until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    hangar_test_support::eventually_within(WAIT, what, check).await
}

pub struct TestController {
    pub handle: Option<ControllerHandle>,
    pub http: reqwest::Client,
    pub base: String,
    pub ws_base: String,
    pub bearer: Option<String>,
    pub name: ControllerName,
    pub store: Arc<dyn Store>,
    /// The SQLite store behind `store`, for its clock hooks (`None` on PostgreSQL).
    pub sqlite: Option<Arc<SqliteStore>>,
}

impl TestController {
    pub async fn start() -> TestController {
        Self::start_with(Self::config()).await
    }

    /// The configuration of [`TestController::start`]: defaults, with [`CLUSTER`] the default cluster.
    pub fn config() -> ControllerConfig {
        ControllerConfig {
            default_cluster: Some(CLUSTER.parse().unwrap()),
            ..Default::default()
        }
    }

    pub async fn start_with(config: ControllerConfig) -> TestController {
        let sqlite = Arc::new(SqliteStore::in_memory().await.unwrap());
        let mut ctl = Self::start_on(config, sqlite.clone()).await;
        ctl.sqlite = Some(sqlite);
        ctl
    }

    /// A controller on `store` (e.g. one of several sharing a PostgreSQL database).
    pub async fn start_on(config: ControllerConfig, store: Arc<dyn Store>) -> TestController {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bearer = config.bearer_token.clone();
        let name = config.name.clone();
        let handle = hangar_controller::start(config, store.clone(), listener)
            .await
            .unwrap();
        let addr = handle.local_addr();
        TestController {
            handle: Some(handle),
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            bearer,
            name,
            store,
            sqlite: None,
        }
    }

    /// The address the controller's API listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.handle
            .as_ref()
            .expect("the controller runs")
            .local_addr()
    }

    /// Moves the SQLite store clock forward, then records the controller's heartbeat as its heartbeat
    /// loop would within seconds (so its drones stay schedulable).
    pub async fn advance_clock(&self, d: Duration) {
        self.sqlite
            .as_ref()
            .expect("clock hooks need the SQLite store")
            .advance_clock(d);
        self.store
            .controller_heartbeat(&self.name, true)
            .await
            .unwrap();
    }

    pub async fn shutdown(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.bearer {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.authorized(self.http.post(format!("{}{path}", self.base)))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` without the bearer token the harness otherwise sends.
    pub async fn get_without_bearer(&self, path: &str) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        self.http.get(url).send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.authorized(self.http.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap()
    }

    /// `GET /ctrl/c/{CLUSTER}/state` as JSON.
    pub async fn cluster_state(&self) -> Value {
        self.get(&format!("/ctrl/c/{CLUSTER}/state"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// `POST /ctrl/connect`, expecting 200.
    pub async fn connect(&self, body: &Value) -> ConnectResponse {
        let response = self.post("/ctrl/connect", body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "connect failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn status(&self, backend: &BackendId) -> Value {
        let response = self.get(&format!("/pub/b/{backend}/status")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn ws_connect(&self, path: &str) -> Ws {
        let mut request = format!("{}{path}", self.ws_base)
            .into_client_request()
            .unwrap();
        if let Some(token) = &self.bearer {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Ws(ws)
    }
}

/// A connect body for a process backend with `key` (no key when `None`).
pub fn connect_body(key: Option<&str>) -> Value {
    let mut body = json!({
        "spawn_config": {"executable": {"command": ["sleep", "100"]}},
        "user": "alice",
        "auth": {"role": "tester"}
    });
    if let Some(key) = key {
        body["key"] = json!({"name": key});
    }
    body
}

pub struct Ws(pub WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Ws {
    pub async fn send<T: Serialize>(&mut self, msg: &T) {
        let text = serde_json::to_string(msg).unwrap();
        self.0.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.0.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next JSON text frame, or `None` when the socket closed. Fails after [`WAIT`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Option<T> {
        let next = async {
            loop {
                match self.0.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return Some(serde_json::from_str(text.as_str()).unwrap())
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(WAIT, next)
            .await
            .expect("timed out waiting for a frame")
    }

    /// Reads frames until one maps to `Some` through `pick`; other frames go to `skipped`.
    pub async fn recv_until<T: DeserializeOwned, R>(
        &mut self,
        skipped: &mut Vec<T>,
        mut pick: impl FnMut(&T) -> Option<R>,
    ) -> R {
        loop {
            let msg: T = self.recv().await.expect("socket closed while waiting");
            if let Some(r) = pick(&msg) {
                return r;
            }
            skipped.push(msg);
        }
    }

    pub async fn hello(&mut self, node: NodeHello) -> HelloResponse {
        self.send(&Hello {
            protocol: PROTOCOL_VERSION,
            version: "test".into(),
            node,
        })
        .await;
        self.recv().await.expect("no hello response")
    }
}

pub struct FakeDrone {
    pub name: DroneName,
    pub ws: Ws,
    /// Frames received while waiting for something else.
    pub seen: Vec<ControllerToDrone>,
}

impl FakeDrone {
    /// Connects, completes the handshake, sends a heartbeat and waits until the drone is schedulable.
    pub async fn connect(ctl: &TestController) -> FakeDrone {
        Self::connect_as(ctl, DroneName::random()).await
    }

    pub async fn connect_as(ctl: &TestController, name: DroneName) -> FakeDrone {
        let mut ws = ctl
            .ws_connect(&format!("/ctrl/c/{CLUSTER}/drone-socket"))
            .await;
        let answer = ws
            .hello(NodeHello::Drone {
                name: name.clone(),
                pool: String::new(),
                executors: vec![ExecutorKind::Process],
            })
            .await;
        assert!(
            matches!(answer, HelloResponse::Welcome { .. }),
            "{answer:?}"
        );
        let mut drone = FakeDrone {
            name,
            ws,
            seen: Vec::new(),
        };
        drone
            .send(&DroneToController::Heartbeat {
                local_time: Millis::now(),
            })
            .await;
        let name = drone.name.clone();
        eventually("drone heartbeat recorded", || async {
            let state = ctl.cluster_state().await;
            state["drones"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| {
                    d["node"]["name"]["Drone"] == name.as_str()
                        && !d["last_heartbeat_age"].is_null()
                })
                .then_some(())
        })
        .await;
        drone
    }

    /// A drone connected to `ctl`, and a backend for `key` scheduled on it (its spawn not read yet).
    pub async fn with_backend(ctl: &TestController, key: &str) -> (FakeDrone, BackendId) {
        let drone = Self::connect(ctl).await;
        let backend = ctl.connect(&connect_body(Some(key))).await.backend_id;
        (drone, backend)
    }

    pub async fn send(&mut self, msg: &DroneToController) {
        self.ws.send(msg).await;
    }

    /// Waits for an action for `backend` matching `pick`.
    pub async fn expect_action(
        &mut self,
        backend: &BackendId,
        pick: impl Fn(&BackendAction) -> bool,
    ) -> ActionMessage {
        let mut seen = std::mem::take(&mut self.seen);
        let action = self
            .ws
            .recv_until(&mut seen, |m: &ControllerToDrone| match m {
                ControllerToDrone::Action(a) if &a.backend_id == backend && pick(&a.action) => {
                    Some(a.clone())
                }
                _ => None,
            })
            .await;
        self.seen = seen;
        action
    }

    /// Waits for a `Terminate` of `kind` for `reason` for `backend`.
    pub async fn expect_terminate(
        &mut self,
        backend: &BackendId,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> ActionMessage {
        self.expect_action(backend, |a| {
            matches!(a, BackendAction::Terminate { kind: k, reason: r } if *k == kind && *r == reason)
        })
        .await
    }

    pub async fn expect_spawn(&mut self, backend: &BackendId) -> ActionMessage {
        self.expect_action(backend, |a| matches!(a, BackendAction::Spawn { .. }))
            .await
    }

    /// Reports `state` and waits for the controller's ack.
    pub async fn report(&mut self, event_id: i64, backend: &BackendId, state: BackendState) {
        self.send(&DroneToController::BackendEvent {
            event_id,
            backend_id: backend.clone(),
            state,
            timestamp: Millis::now(),
        })
        .await;
        let mut seen = std::mem::take(&mut self.seen);
        self.ws
            .recv_until(&mut seen, |m: &ControllerToDrone| {
                matches!(m, ControllerToDrone::AckEvent { event_id: id } if *id == event_id)
                    .then_some(())
            })
            .await;
        self.seen = seen;
    }

    /// Drives a backend from `scheduled` to `ready` (acking its spawn).
    pub async fn make_ready(&mut self, backend: &BackendId) {
        let spawn = self.expect_spawn(backend).await;
        self.send(&DroneToController::AckAction {
            action_id: spawn.action_id,
        })
        .await;
        let address = "127.0.0.1:4000".parse().unwrap();
        self.report(1001, backend, BackendState::Loading).await;
        self.report(1002, backend, BackendState::Starting).await;
        self.report(1003, backend, BackendState::Waiting { address })
            .await;
        self.report(1004, backend, BackendState::Ready { address })
            .await;
    }
}

/// Runs `test` under [`with_controller`] with a drone connected.
pub async fn with_drone(test: impl AsyncFnOnce(&TestController, FakeDrone)) {
    with_controller(async |ctl| test(ctl, FakeDrone::connect(ctl).await).await).await
}

/// Runs `test` under [`with_controller`] with a drone connected and a backend for `key` scheduled on
/// it (its spawn not read yet).
pub async fn with_scheduled_backend(
    key: &str,
    test: impl AsyncFnOnce(&TestController, FakeDrone, BackendId),
) {
    with_controller(async |ctl| {
        let (drone, backend) = FakeDrone::with_backend(ctl, key).await;
        test(ctl, drone, backend).await;
    })
    .await
}

/// Runs `test` under [`with_controller`] with a drone and a proxy connected, and a backend for `key`
/// scheduled on the drone (the connect's answer).
pub async fn with_drone_proxy_and_backend(
    key: &str,
    test: impl AsyncFnOnce(&TestController, FakeDrone, FakeProxy, ConnectResponse),
) {
    with_drone(async |ctl, drone| {
        let proxy = FakeProxy::connect(ctl).await;
        let connected = ctl.connect(&connect_body(Some(key))).await;
        test(ctl, drone, proxy, connected).await;
    })
    .await
}

/// [`with_drone_proxy_and_backend`], with the backend made ready first.
pub async fn with_proxy_and_ready_backend(
    key: &str,
    test: impl AsyncFnOnce(&TestController, FakeDrone, FakeProxy, ConnectResponse),
) {
    with_drone_proxy_and_backend(key, async |ctl, mut drone, proxy, connected| {
        drone.make_ready(&connected.backend_id).await;
        test(ctl, drone, proxy, connected).await;
    })
    .await
}

/// The router of a controller with `config` whose own address is `addr`, on an in-memory store; and
/// that store (for handler tests with `oneshot`, no listener).
pub async fn router_on_memory(
    config: &ControllerConfig,
    addr: &str,
) -> (axum::Router, Arc<SqliteStore>) {
    let store = Arc::new(SqliteStore::in_memory().await.unwrap());
    let state = AppState::new(config.clone(), store.clone(), addr.parse().unwrap()).unwrap();
    (hangar_controller::router(state), store)
}

/// Runs `test` under [`with_controller`] with a drone connected and a backend for `key` made ready
/// on it.
pub async fn with_ready_backend(
    key: &str,
    test: impl AsyncFnOnce(&TestController, FakeDrone, BackendId),
) {
    with_controller(async |ctl| {
        let (mut drone, backend) = FakeDrone::with_backend(ctl, key).await;
        drone.make_ready(&backend).await;
        test(ctl, drone, backend).await;
    })
    .await
}

pub struct FakeProxy {
    pub ws: Ws,
    pub seen: Vec<ControllerToProxy>,
}

impl FakeProxy {
    pub async fn connect(ctl: &TestController) -> FakeProxy {
        Self::connect_in(ctl, CLUSTER).await
    }

    /// A proxy of `cluster`.
    pub async fn connect_in(ctl: &TestController, cluster: &str) -> FakeProxy {
        let mut ws = ctl
            .ws_connect(&format!("/ctrl/c/{cluster}/proxy-socket"))
            .await;
        let answer = ws
            .hello(NodeHello::Proxy {
                name: ProxyName::random(),
            })
            .await;
        assert!(
            matches!(answer, HelloResponse::Welcome { .. }),
            "{answer:?}"
        );
        FakeProxy {
            ws,
            seen: Vec::new(),
        }
    }

    pub async fn send(&mut self, msg: &ProxyToController) {
        self.ws.send(msg).await;
    }

    /// Asks for the route of `token` and returns the answer.
    pub async fn route(&mut self, token: &ConnectionToken) -> Option<RouteInfo> {
        let token = token.clone();
        self.send(&ProxyToController::RouteRequest {
            token: token.clone(),
        })
        .await;
        self.wait_route(&token).await
    }

    /// Waits for the answer to a route request for `token`.
    pub async fn wait_route(&mut self, token: &ConnectionToken) -> Option<RouteInfo> {
        self.expect(|m| match m {
            ControllerToProxy::RouteResponse { token: t, route } if t == token => {
                Some(route.clone())
            }
            _ => None,
        })
        .await
    }

    /// Waits for the notice that `backend` is gone.
    pub async fn expect_removed(&mut self, backend: &BackendId) {
        self.expect(|m| {
            matches!(m, ControllerToProxy::BackendRemoved { backend: b, .. } if b == backend)
                .then_some(())
        })
        .await
    }

    pub async fn expect<R>(&mut self, pick: impl FnMut(&ControllerToProxy) -> Option<R>) -> R {
        let mut seen = std::mem::take(&mut self.seen);
        let r = self.ws.recv_until(&mut seen, pick).await;
        self.seen = seen;
        r
    }
}

pub use hangar_test_support::postgres::TestDatabase;
pub use hangar_test_support::{soft_terminated_state, terminated_state};
