//! Test harness for tests that span Hangar's components: [`TestEnv`] starts a controller (SQLite store),
//! drones (process executor) and a proxy in this process on port 0, and offers helpers that wait for
//! conditions with a deadline instead of sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context;
use hangar_client::status_stream::StatusStream;
use hangar_client::ControllerClient;
use hangar_controller::{ControllerConfig, ControllerHandle};
use hangar_drone::{DroneConfig, DroneHandle};
use hangar_proxy::{ProxyConfig, ProxyHandle};
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::api::{ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus, ClusterName};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio::net::TcpListener;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(45);

/// Installs a test log subscriber once (`RUST_LOG` controls it).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Path of the `hangar-test-backend` binary, built once if missing.
pub fn test_backend() -> PathBuf {
    static BUILD: Once = Once::new();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let binary = target.join("debug/hangar-test-backend");
    BUILD.call_once(|| {
        if !binary.exists() {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "-p", "hangar-test-backend"])
                .status()
                .expect("cannot run cargo to build hangar-test-backend");
            assert!(status.success(), "building hangar-test-backend failed");
        }
    });
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

/// Polls `f` until it returns `Some`, failing the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process executable running the test backend with extra env.
pub fn backend_executable(env: &[(&str, &str)]) -> Executable {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    serde_json::from_value(serde_json::json!({
        "command": [test_backend().to_string_lossy()],
        "env": env,
    }))
    .unwrap()
}

pub struct TestEnv {
    pub cluster: ClusterName,
    pub store: Arc<dyn Store>,
    pub client: ControllerClient,
    controller: Option<ControllerHandle>,
    controller_addr: SocketAddr,
    db_path: Option<PathBuf>,
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = free_port().await;
        let cluster: ClusterName = format!("localhost:{proxy_port}").parse().unwrap();
        let db_path = file_store.then(|| dir.path().join("hangar.db"));
        let store: Arc<dyn Store> = match &db_path {
            Some(p) => Arc::new(SqliteStore::open(p).await.unwrap()),
            None => Arc::new(SqliteStore::in_memory().await.unwrap()),
        };
        let controller_addr = listener.local_addr().unwrap();
        let controller = start_controller(store.clone(), listener, &cluster).await;
        let client = ControllerClient::new(controller.url()).unwrap();
        TestEnv {
            cluster,
            store,
            client,
            controller: Some(controller),
            controller_addr,
            db_path,
            drones: Vec::new(),
            proxy: None,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn controller_url(&self) -> url::Url {
        format!("http://{}/", self.controller_addr).parse().unwrap()
    }

    /// Starts a process drone; `tweak` adjusts its config. Waits until it can take backends.
    pub async fn add_drone(&mut self, tweak: impl FnOnce(&mut DroneConfig)) -> usize {
        let mut config = DroneConfig::new(self.controller_url(), self.cluster.clone());
        config.executors = vec![ExecutorKind::Process];
        config.soft_terminate_grace = Duration::from_secs(2);
        tweak(&mut config);
        let name = config.name.clone();
        let drone = hangar_drone::start(config).await.unwrap();
        self.drones.push(drone);
        let client = self.client.clone();
        let cluster = self.cluster.clone();
        eventually("drone to register and heartbeat", || {
            let client = client.clone();
            let cluster = cluster.clone();
            let name = name.clone();
            async move {
                let state = client.cluster_state(&cluster).await.ok()?;
                state
                    .drones
                    .iter()
                    .any(|d| {
                        d.node.name.as_str() == name.as_str() && d.last_heartbeat_age.is_some()
                    })
                    .then_some(())
            }
        })
        .await;
        self.drones.len() - 1
    }

    /// Starts the proxy on the cluster's port and waits until it is connected.
    pub async fn start_proxy(&mut self) {
        let port = self.cluster.port().unwrap();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let config = ProxyConfig::new(self.controller_url(), self.cluster.clone());
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

    /// Stops the controller (drones and proxy keep running and start reconnecting).
    pub async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }

    /// Starts a new controller on the same address and store file.
    pub async fn restart_controller(&mut self) {
        self.stop_controller().await;
        let path = self.db_path.clone().expect("restart needs a file store");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
        let listener = TcpListener::bind(self.controller_addr).await.unwrap();
        self.store = store.clone();
        self.controller = Some(start_controller(store, listener, &self.cluster).await);
    }

    /// A connect request for `key` running the test backend with `env`.
    pub fn connect_request(&self, key: &str, env: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest {
            key: Some(KeyConfig {
                name: key.parse().unwrap(),
                namespace: String::new(),
                tag: String::new(),
            }),
            spawn_config: Some(SpawnConfig {
                id: None,
                cluster: Some(self.cluster.clone()),
                pool: String::new(),
                executable: backend_executable(env),
                lifetime_limit_seconds: None,
                max_idle_seconds: None,
                use_static_token: false,
                subdomain: None,
            }),
            user: Some("alice".into()),
            auth: serde_json::json!({"role": "editor"})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    pub async fn connect(&self, req: &ConnectRequest) -> ConnectResponse {
        self.client.connect(req).await.unwrap()
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
        let mut stream = StatusStream::new(self.client.clone(), backend.clone());
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
        self.stop_controller().await;
    }
}

async fn start_controller(
    store: Arc<dyn Store>,
    listener: TcpListener,
    cluster: &ClusterName,
) -> ControllerHandle {
    let config = ControllerConfig {
        default_cluster: Some(cluster.clone()),
        ..ControllerConfig::default()
    };
    hangar_controller::start(config, store, listener)
        .await
        .unwrap()
}

/// A port that was free a moment ago.
pub async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}
