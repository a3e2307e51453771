//! Test harness for tests that span Hangar's components: [`TestEnv`] starts controllers, drones (process
//! executor) and a proxy in this process on port 0, and offers helpers that wait for conditions with a
//! deadline instead of sleeping.
//!
//! Two backings: one controller on SQLite ([`TestEnv::start`], [`TestEnv::controller_only`]), or any
//! number of controllers sharing a fresh PostgreSQL database ([`TestEnv::postgres`], see [`postgres`]),
//! each with its own store connection, as separate controller processes would have. Drones and the
//! proxy choose the controller they attach to ([`TestEnv::add_drone_on`], [`TestEnv::start_proxy_on`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod witness;

use anyhow::Context;
use hangar_client::status_stream::StatusStream;
use hangar_client::ControllerClient;
use hangar_controller::{ControllerConfig, ControllerHandle};
use hangar_drone::{DroneConfig, DroneHandle};
use hangar_proxy::{ProxyConfig, ProxyHandle};
use hangar_store::postgres::PostgresStore;
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::api::{ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::state::BackendStatusEntry;
use hangar_types::timing::KeyTiming;
use hangar_types::{BackendId, BackendStatus, ClusterName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use hangar_test_support::{eventually, postgres, WAIT};

/// Installs a test log subscriber once (`RUST_LOG` controls it).
pub fn init_logging() {
    hangar_test_support::init_tracing();
}

/// Path of the `hangar-test-backend` binary, built once.
pub fn test_backend() -> PathBuf {
    hangar_test_support::test_backend().to_path_buf()
}

/// A process executable running the test backend with extra env.
pub fn backend_executable(env: &[(&str, &str)]) -> Executable {
    hangar_test_support::process_executable(env)
}

/// A process executable running `script` in `sh`, with `$BACKEND` the test backend binary.
pub fn shell_executable(script: &str) -> Executable {
    let vars = [("BACKEND".to_string(), test_backend().display().to_string())];
    Executable::Process(hangar_types::executable::ProcessExecutable {
        command: vec!["sh".into(), "-c".into(), script.into()],
        env: vars.into_iter().collect(),
        cwd: None,
    })
}

/// A WebSocket client connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the backend's `/ws` under `backend_url` (a connect response's `url`).
pub async fn open_ws(backend_url: &str) -> Ws {
    let ws_url = format!("{}ws", backend_url.replacen("http://", "ws://", 1));
    let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .unwrap();
    ws
}

/// Sends `text` on the test backend's echo socket and expects it back.
pub async fn ws_echo(ws: &mut Ws, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), text);
}

/// The longest a test of this crate may take.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `test`, failing it after [`TEST_TIMEOUT`].
pub async fn within<T>(test: impl std::future::Future<Output = T>) -> T {
    hangar_test_support::with_timeout(TEST_TIMEOUT, test).await
}

/// Runs `test` against a started [`TestEnv`] ([`TestEnv::start`]) and shuts the environment down
/// after it.
pub async fn with_env<T>(test: impl AsyncFnOnce(&mut TestEnv) -> T) -> T {
    let mut env = TestEnv::start().await;
    let result = test(&mut env).await;
    env.shutdown().await;
    result
}

/// Runs `test` against `controllers` controllers on a fresh PostgreSQL database
/// ([`TestEnv::postgres`]) and shuts them down after it; does nothing when no PostgreSQL is
/// configured.
pub async fn with_postgres(controllers: usize, test: impl AsyncFnOnce(&mut TestEnv)) {
    let Some(mut env) = TestEnv::postgres(controllers).await else {
        return;
    };
    test(&mut env).await;
    env.shutdown().await;
}

/// [`with_postgres`] with two controllers, a drone attached to controller 0 and the proxy to
/// controller `proxy_on`.
pub async fn with_postgres_pair(proxy_on: usize, test: impl AsyncFnOnce(&mut TestEnv)) {
    with_postgres(2, async |env| {
        env.add_drone_on(0, |_| {}).await;
        env.start_proxy_on(proxy_on).await;
        test(env).await;
    })
    .await;
}

/// Fails unless `result` is an API error with `status` and `kind`.
pub fn assert_api_error<T: std::fmt::Debug>(
    result: Result<T, hangar_client::ClientError>,
    status: u16,
    kind: hangar_types::api::ApiErrorKind,
) {
    match result {
        Err(hangar_client::ClientError::Api { status: got, error }) => {
            assert_eq!(got.as_u16(), status, "{error}");
            assert_eq!(error.kind, kind, "{error}");
        }
        other => panic!("expected a {status} {kind:?}, got {other:?}"),
    }
}

/// Where the controllers keep their state.
enum Backing {
    SqliteMemory,
    SqliteFile(PathBuf),
    Postgres {
        db: postgres::TestDatabase,
        key_timing: KeyTiming,
    },
}

/// One controller of the environment: its address survives restarts.
struct ControllerSlot {
    addr: SocketAddr,
    handle: Option<ControllerHandle>,
    store: Arc<dyn Store>,
    /// The same store as `store` when on PostgreSQL (for its test hooks and `close`).
    postgres: Option<Arc<PostgresStore>>,
}

pub struct TestEnv {
    pub cluster: ClusterName,
    /// The store of controller 0.
    pub store: Arc<dyn Store>,
    /// A client of controller 0.
    pub client: ControllerClient,
    controllers: Vec<ControllerSlot>,
    backing: Backing,
    pub drones: Vec<DroneHandle>,
    pub proxy: Option<ProxyHandle>,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl TestEnv {
    /// Controller (in-memory store) + one process drone + proxy.
    pub async fn start() -> TestEnv {
        let mut env = TestEnv::controller_only(false).await;
        env.add_drone(|_| {}).await;
        env.start_proxy().await;
        env
    }

    /// A controller on a file-backed store (so it can be restarted), no drones or proxy yet.
    pub async fn controller_only(file_store: bool) -> TestEnv {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let backing = match file_store {
            true => Backing::SqliteFile(dir.path().join("hangar.db")),
            false => Backing::SqliteMemory,
        };
        TestEnv::with_controllers(backing, 1, dir).await
    }

    /// `controllers` controllers sharing a fresh PostgreSQL database (each with its own store
    /// connection), no drones or proxy yet. `None` when PostgreSQL tests are skipped (see
    /// [`postgres::server_url`]).
    pub async fn postgres(controllers: usize) -> Option<TestEnv> {
        TestEnv::postgres_with(controllers, KeyTiming::DEFAULT).await
    }

    /// As [`TestEnv::postgres`], with shortened key deadlines and lease (`key_timing` must be ordered),
    /// for tests of partitioned drones.
    pub async fn postgres_with(controllers: usize, key_timing: KeyTiming) -> Option<TestEnv> {
        assert!(controllers >= 1, "at least one controller");
        assert!(key_timing.is_ordered(), "unordered {key_timing:?}");
        init_logging();
        let db = postgres::TestDatabase::create().await?;
        let dir = tempfile::tempdir().unwrap();
        let backing = Backing::Postgres { db, key_timing };
        Some(TestEnv::with_controllers(backing, controllers, dir).await)
    }

    async fn with_controllers(backing: Backing, count: usize, dir: tempfile::TempDir) -> TestEnv {
        let proxy_port = free_port().await;
        let cluster: ClusterName = format!("localhost:{proxy_port}").parse().unwrap();
        let mut controllers = Vec::new();
        for _ in 0..count {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            controllers.push(ControllerSlot::start(&backing, listener, &cluster).await);
        }
        let store = controllers[0].store.clone();
        let client = ControllerClient::new(controller_url_of(controllers[0].addr)).unwrap();
        TestEnv {
            cluster,
            store,
            client,
            controllers,
            backing,
            drones: Vec::new(),
            proxy: None,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn controller_url(&self) -> url::Url {
        self.controller_url_at(0)
    }

    /// URL of controller `i` (stable across its restarts).
    pub fn controller_url_at(&self, i: usize) -> url::Url {
        controller_url_of(self.controllers[i].addr)
    }

    /// Address of controller `i` (stable across its restarts).
    pub fn controller_addr_at(&self, i: usize) -> SocketAddr {
        self.controllers[i].addr
    }

    /// A client of controller `i`.
    pub fn client_at(&self, i: usize) -> ControllerClient {
        ControllerClient::new(self.controller_url_at(i)).unwrap()
    }

    /// The store of controller `i`.
    pub fn store_at(&self, i: usize) -> Arc<dyn Store> {
        self.controllers[i].store.clone()
    }

    /// How many controllers the environment has (running or stopped).
    pub fn controller_count(&self) -> usize {
        self.controllers.len()
    }

    /// Moves the store clock of every controller forward by `d` (PostgreSQL only), so heartbeats and
    /// leases age without waiting. Nodes' next heartbeats are recorded at the advanced time.
    pub fn advance_clock(&self, d: Duration) {
        for slot in &self.controllers {
            slot.postgres
                .as_ref()
                .expect("advance_clock needs the PostgreSQL backing")
                .advance_clock(d);
        }
    }

    /// Starts a process drone attached to controller 0; `tweak` adjusts its config. Waits until it can
    /// take backends.
    pub async fn add_drone(&mut self, tweak: impl FnOnce(&mut DroneConfig)) -> usize {
        self.add_drone_on(0, tweak).await
    }

    /// Starts a process drone named `name` keeping its state in `state_file`; calling it again after
    /// that drone's shutdown restarts the same drone.
    pub async fn add_drone_with_state(
        &mut self,
        state_file: &std::path::Path,
        name: &hangar_types::DroneName,
    ) -> usize {
        let (state_file, name) = (state_file.to_path_buf(), name.clone());
        self.add_drone(move |c| {
            c.state_file = Some(state_file);
            c.name = name;
        })
        .await
    }

    /// Starts a process drone attached to controller `controller`; `tweak` adjusts its config. Waits
    /// until it can take backends (its heartbeat is visible through that controller).
    pub async fn add_drone_on(
        &mut self,
        controller: usize,
        tweak: impl FnOnce(&mut DroneConfig),
    ) -> usize {
        let mut config = DroneConfig::new(self.controller_url_at(controller), self.cluster.clone());
        config.executors = vec![ExecutorKind::Process];
        config.soft_terminate_grace = Duration::from_secs(2);
        tweak(&mut config);
        let name = config.name.clone();
        let drone = hangar_drone::start(config).await.unwrap();
        self.drones.push(drone);
        let client = self.client_at(controller);
        let cluster = self.cluster.clone();
        eventually("drone to register and heartbeat", || {
            let client = client.clone();
            let cluster = cluster.clone();
            let name = name.clone();
            async move {
                let state = client.cluster_state(&cluster).await.ok()?;
                state.drone_heartbeating(&name).then_some(())
            }
        })
        .await;
        self.drones.len() - 1
    }

    /// Starts the proxy on the cluster's port and waits until it is connected.
    pub async fn start_proxy(&mut self) {
        self.start_proxy_on(0).await;
    }

    /// Starts the proxy on the cluster's port, attached to controller `controller`, and waits until it
    /// is connected.
    pub async fn start_proxy_on(&mut self, controller: usize) {
        let port = self.cluster.port().unwrap();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let config = ProxyConfig::new(self.controller_url_at(controller), self.cluster.clone());
        let proxy = hangar_proxy::start(config, listener).await.unwrap();
        eventually("proxy to connect", || async {
            proxy.is_ready().then_some(())
        })
        .await;
        self.proxy = Some(proxy);
    }

    pub fn proxy(&self) -> &ProxyHandle {
        self.proxy.as_ref().expect("proxy not started")
    }

    /// Stops controller 0 (drones and proxy keep running and start reconnecting).
    pub async fn stop_controller(&mut self) {
        self.stop_controller_at(0).await;
    }

    /// Stops controller `i` and closes its store connection; nodes attached to it start reconnecting.
    pub async fn stop_controller_at(&mut self, i: usize) {
        let slot = &mut self.controllers[i];
        if let Some(c) = slot.handle.take() {
            c.shutdown().await;
            if let Some(pg) = &slot.postgres {
                pg.close().await;
            }
        }
    }

    /// Starts a new controller on the same address and store file.
    pub async fn restart_controller(&mut self) {
        self.restart_controller_at(0).await;
    }

    /// Stops controller `i` (if running) and starts a new one on the same address with a new store
    /// connection (same file or database).
    pub async fn restart_controller_at(&mut self, i: usize) {
        assert!(
            !matches!(self.backing, Backing::SqliteMemory),
            "restart needs a file store or PostgreSQL"
        );
        self.stop_controller_at(i).await;
        let listener = TcpListener::bind(self.controllers[i].addr).await.unwrap();
        self.controllers[i] = ControllerSlot::start(&self.backing, listener, &self.cluster).await;
        if i == 0 {
            self.store = self.controllers[0].store.clone();
        }
    }

    /// A connect request for `key` running the test backend with `env`.
    pub fn connect_request(&self, key: &str, env: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest {
            key: Some(KeyConfig::named(key.parse().unwrap())),
            spawn_config: Some(SpawnConfig {
                cluster: Some(self.cluster.clone()),
                ..SpawnConfig::new(backend_executable(env))
            }),
            user: Some("alice".into()),
            auth: serde_json::json!({"role": "editor"})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    /// `GET url` with the environment's HTTP client; fails the test when no response comes.
    pub async fn get(&self, url: impl reqwest::IntoUrl) -> reqwest::Response {
        self.http.get(url).send().await.unwrap()
    }

    /// `POST url` (empty body) with the environment's HTTP client.
    pub async fn post(&self, url: impl reqwest::IntoUrl) -> reqwest::Response {
        self.http.post(url).send().await.unwrap()
    }

    /// `GET url`, expecting a JSON body.
    pub async fn get_json(&self, url: impl reqwest::IntoUrl) -> serde_json::Value {
        self.get(url).await.json().await.unwrap()
    }

    pub async fn connect(&self, req: &ConnectRequest) -> ConnectResponse {
        self.client.connect(req).await.unwrap()
    }

    /// Connects to key `key` (see [`TestEnv::connect_request`]) through controller `controller`.
    pub async fn connect_at(&self, controller: usize, key: &str) -> ConnectResponse {
        let req = self.connect_request(key, &[]);
        self.client_at(controller).connect(&req).await.unwrap()
    }

    /// Connects to key `key` through controller `connect_via` and waits until the backend is ready as
    /// seen through controller `ready_via`.
    pub async fn connect_ready_at(
        &self,
        connect_via: usize,
        ready_via: usize,
        key: &str,
    ) -> ConnectResponse {
        let resp = self.connect_at(connect_via, key).await;
        self.ready_at(ready_via, &resp.backend_id).await;
        resp
    }

    /// The environment the backend behind `url` (a connect's token URL) sees, from the test backend's
    /// `GET /env`, through the proxy.
    pub async fn backend_env(&self, url: &str) -> serde_json::Value {
        let resp = self.get(format!("{url}env")).await;
        assert_eq!(resp.status(), 200, "GET {url}env");
        resp.json().await.unwrap()
    }

    /// Connects and waits until the backend is ready.
    pub async fn connect_ready(&self, req: &ConnectRequest) -> ConnectResponse {
        let resp = self.connect(req).await;
        self.wait_for_status(&resp.backend_id, BackendStatus::Ready)
            .await;
        resp
    }

    /// Waits (via the status stream) until the backend reaches `status` or later; returns that entry.
    pub async fn wait_for_status(
        &self,
        backend: &BackendId,
        status: BackendStatus,
    ) -> BackendStatusEntry {
        self.wait_for_status_at(0, backend, status).await
    }

    /// Waits until the backend has terminated; returns its final entry.
    pub async fn terminated(&self, backend: &BackendId) -> BackendStatusEntry {
        self.wait_for_status(backend, BackendStatus::Terminated)
            .await
    }

    /// Asks controller 0 to soft-terminate the backend and waits until it has terminated.
    pub async fn soft_terminated(&self, backend: &BackendId) -> BackendStatusEntry {
        self.client.soft_terminate(backend).await.unwrap();
        self.terminated(backend).await
    }

    /// Waits, following controller `controller`'s status stream, until the backend is ready.
    pub async fn ready_at(&self, controller: usize, backend: &BackendId) -> BackendStatusEntry {
        self.wait_for_status_at(controller, backend, BackendStatus::Ready)
            .await
    }

    /// As [`TestEnv::wait_for_status`], following the status stream of controller `controller`.
    pub async fn wait_for_status_at(
        &self,
        controller: usize,
        backend: &BackendId,
        status: BackendStatus,
    ) -> BackendStatusEntry {
        let mut stream = StatusStream::new(self.client_at(controller), backend.clone());
        tokio::time::timeout(WAIT, async {
            loop {
                let entry = stream.next().await.unwrap();
                if entry.status >= status {
                    return entry;
                }
            }
        })
        .await
        .with_context(|| format!("backend {backend} did not reach {status}"))
        .unwrap()
    }

    pub async fn shutdown(mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
        for d in self.drones.drain(..) {
            d.shutdown().await;
        }
        for i in 0..self.controllers.len() {
            self.stop_controller_at(i).await;
        }
        if let Backing::Postgres { db, .. } = self.backing {
            db.drop_database().await;
        }
    }
}

impl ControllerSlot {
    /// Opens a store on `backing` (a new connection for PostgreSQL) and starts a controller on it.
    async fn start(backing: &Backing, listener: TcpListener, cluster: &ClusterName) -> Self {
        let mut config = ControllerConfig {
            default_cluster: Some(cluster.clone()),
            ..ControllerConfig::default()
        };
        let (store, postgres): (Arc<dyn Store>, _) = match backing {
            Backing::SqliteMemory => (Arc::new(SqliteStore::in_memory().await.unwrap()), None),
            Backing::SqliteFile(path) => (Arc::new(SqliteStore::open(path).await.unwrap()), None),
            Backing::Postgres { db, key_timing } => {
                let pg = Arc::new(PostgresStore::connect(db.url()).await.unwrap());
                pg.set_key_lease(key_timing.lease);
                config.key_timing = *key_timing;
                (pg.clone(), Some(pg))
            }
        };
        let addr = listener.local_addr().unwrap();
        let handle = hangar_controller::start(config, store.clone(), listener)
            .await
            .unwrap();
        ControllerSlot {
            addr,
            handle: Some(handle),
            store,
            postgres,
        }
    }
}

fn controller_url_of(addr: SocketAddr) -> url::Url {
    format!("http://{addr}/").parse().unwrap()
}

/// A port that was free a moment ago.
pub async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}
