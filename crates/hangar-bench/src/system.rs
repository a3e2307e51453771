//! The system under measurement, started in this process on loopback: a controller on a fresh SQLite
//! or PostgreSQL store, process (or Docker) drones and optionally a proxy — the same wiring as the
//! integration tests' `TestEnv`, with the store chosen by the scenario.

use crate::postgres_db::{self, FreshDatabase};
use anyhow::Context;
use hangar_client::status_stream::StatusStream;
use hangar_client::ControllerClient;
use hangar_controller::{ControllerConfig, ControllerHandle};
use hangar_drone::{DroneConfig, DroneHandle};
use hangar_proxy::{ProxyConfig, ProxyHandle};
use hangar_store::postgres::PostgresStore;
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::api::{ConnectRequest, KeyConfig, SpawnConfig};
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus, ClusterName};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Upper bound for one wait for the system (a drone registering, a backend becoming ready).
pub const WAIT: Duration = Duration::from_secs(60);

/// Which store the controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A fresh SQLite file in a temporary directory (the embedded default).
    Sqlite,
    /// A fresh database on the server named by `HANGAR_TEST_POSTGRES_URL`.
    Postgres,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    pub store: StoreKind,
    /// Real drones (in this process) offering `executor`.
    pub drones: usize,
    pub executor: ExecutorKind,
    /// Start an in-process proxy (its port is the cluster's port).
    pub proxy: bool,
    /// Use this cluster port instead of a fresh one (a proxy started elsewhere will listen there).
    pub cluster_port: Option<u16>,
}

impl SystemConfig {
    pub fn new(store: StoreKind) -> SystemConfig {
        SystemConfig {
            store,
            drones: 1,
            executor: ExecutorKind::Process,
            proxy: true,
            cluster_port: None,
        }
    }
}

/// The concrete store, to close it (stop its background tasks) before its files or database go away.
enum StoreCloser {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PostgresStore>),
}

pub struct System {
    pub cluster: ClusterName,
    pub store: Arc<dyn Store>,
    pub client: ControllerClient,
    controller: ControllerHandle,
    drones: Vec<DroneHandle>,
    proxy: Option<ProxyHandle>,
    closer: StoreCloser,
    database: Option<FreshDatabase>,
    /// Keeps the SQLite directory (the SQLite store deletes only its own in-memory directories).
    _dir: tempfile::TempDir,
}

impl System {
    pub async fn start(config: &SystemConfig) -> anyhow::Result<System> {
        let dir = tempfile::Builder::new()
            .prefix("hangar-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        let proxy_listener = match (config.proxy, config.cluster_port) {
            (true, port) => Some(bind_loopback(port.unwrap_or(0)).await?),
            (false, _) => None,
        };
        let cluster_port = match (&proxy_listener, config.cluster_port) {
            (Some(l), _) => l.local_addr().context("proxy listener address")?.port(),
            (None, Some(port)) => port,
            (None, None) => free_port().await?,
        };
        let cluster: ClusterName = format!("localhost:{cluster_port}")
            .parse()
            .context("building the cluster name")?;

        let (store, closer, database) = match config.store {
            StoreKind::Sqlite => {
                let store = Arc::new(
                    SqliteStore::open(&dir.path().join("hangar.db"))
                        .await
                        .context("opening the SQLite store")?,
                );
                (
                    store.clone() as Arc<dyn Store>,
                    StoreCloser::Sqlite(store),
                    None,
                )
            }
            StoreKind::Postgres => {
                let server = postgres_db::server_url()
                    .with_context(|| format!("--store postgres needs {}", postgres_db::URL_VAR))?;
                let db = FreshDatabase::create(&server).await?;
                let store = match PostgresStore::connect(&db.url).await {
                    Ok(store) => Arc::new(store),
                    Err(e) => {
                        db.drop_database().await;
                        return Err(e).context("connecting the PostgreSQL store");
                    }
                };
                (
                    store.clone() as Arc<dyn Store>,
                    StoreCloser::Postgres(store),
                    Some(db),
                )
            }
        };

        let listener = bind_loopback(0).await?;
        let controller_config = ControllerConfig {
            default_cluster: Some(cluster.clone()),
            ..ControllerConfig::default()
        };
        let controller = hangar_controller::start(controller_config, store.clone(), listener)
            .await
            .context("starting the controller")?;
        let client = ControllerClient::new(controller.url()).context("controller client")?;
        let mut system = System {
            cluster,
            store,
            client,
            controller,
            drones: Vec::new(),
            proxy: None,
            closer,
            database,
            _dir: dir,
        };
        // Whatever fails from here on, what was started is stopped again.
        match system.start_nodes(config, proxy_listener).await {
            Ok(()) => Ok(system),
            Err(e) => {
                system.shutdown().await;
                Err(e)
            }
        }
    }

    async fn start_nodes(
        &mut self,
        config: &SystemConfig,
        proxy_listener: Option<TcpListener>,
    ) -> anyhow::Result<()> {
        for _ in 0..config.drones {
            self.add_drone(config.executor).await?;
        }
        if let Some(listener) = proxy_listener {
            let proxy_config = ProxyConfig::new(self.controller_url(), self.cluster.clone());
            let proxy = hangar_proxy::start(proxy_config, listener)
                .await
                .context("starting the proxy")?;
            let connected = eventually("the proxy to connect", WAIT, || async {
                proxy.is_ready().then_some(())
            })
            .await;
            self.proxy = Some(proxy);
            connected?;
        }
        Ok(())
    }

    pub fn controller_url(&self) -> url::Url {
        self.controller.url()
    }

    pub fn database(&self) -> Option<&FreshDatabase> {
        self.database.as_ref()
    }

    async fn add_drone(&mut self, executor: ExecutorKind) -> anyhow::Result<()> {
        let mut config = DroneConfig::new(self.controller_url(), self.cluster.clone());
        config.executors = vec![executor];
        config.soft_terminate_grace = Duration::from_secs(2);
        let name = config.name.clone();
        let drone = hangar_drone::start(config)
            .await
            .with_context(|| format!("starting a drone with the {executor} executor"))?;
        self.drones.push(drone);
        let client = self.client.clone();
        let cluster = self.cluster.clone();
        eventually("the drone to register", WAIT, || {
            let (client, cluster, name) = (client.clone(), cluster.clone(), name.clone());
            async move {
                let state = client.cluster_state(&cluster).await.ok()?;
                state.drone_heartbeating(&name).then_some(())
            }
        })
        .await
    }

    /// A connect request for `key` with no idle or lifetime limit.
    pub fn connect_request(
        &self,
        key: &str,
        executable: Executable,
    ) -> anyhow::Result<ConnectRequest> {
        Ok(ConnectRequest {
            key: Some(KeyConfig::named(
                key.parse()
                    .with_context(|| format!("invalid key {key:?}"))?,
            )),
            spawn_config: Some(SpawnConfig {
                cluster: Some(self.cluster.clone()),
                ..SpawnConfig::new(executable)
            }),
            user: Some("bench".into()),
            auth: serde_json::Map::new(),
        })
    }

    /// Follows the status stream until the backend reaches `status` or later.
    pub async fn wait_for_status(
        &self,
        backend: &BackendId,
        status: BackendStatus,
    ) -> anyhow::Result<BackendStatusEntry> {
        wait_for_status(&self.client, backend, status).await
    }

    /// The address the backend's drone reported (where the proxy forwards to).
    pub async fn backend_address(&self, backend: &BackendId) -> anyhow::Result<SocketAddr> {
        let row = self
            .store
            .backend(backend)
            .await
            .context("reading the backend")?
            .with_context(|| format!("backend {backend} not found"))?;
        row.state
            .address()
            .with_context(|| format!("backend {backend} has no address ({})", row.state.status()))
    }

    pub async fn shutdown(mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.shutdown().await;
        }
        for drone in self.drones.drain(..) {
            drone.shutdown().await;
        }
        self.controller.shutdown().await;
        match &self.closer {
            StoreCloser::Sqlite(store) => store.close().await,
            StoreCloser::Postgres(store) => store.close().await,
        }
        if let Some(db) = self.database.take() {
            db.drop_database().await;
        }
    }
}

/// Follows a backend's status stream until it reaches `status` or later (within [`WAIT`]).
pub async fn wait_for_status(
    client: &ControllerClient,
    backend: &BackendId,
    status: BackendStatus,
) -> anyhow::Result<BackendStatusEntry> {
    let mut stream = StatusStream::new(client.clone(), backend.clone());
    tokio::time::timeout(WAIT, async {
        loop {
            let entry = stream.next().await.context("status stream failed")?;
            if entry.status >= status {
                return Ok(entry);
            }
        }
    })
    .await
    .with_context(|| format!("backend {backend} did not reach {status} within {WAIT:?}"))?
}

/// Polls `f` every 20 ms until it returns `Some`, failing after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn bind_loopback(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))
}

/// A loopback port that was free a moment ago.
pub async fn free_port() -> anyhow::Result<u16> {
    let listener = bind_loopback(0).await?;
    Ok(listener.local_addr().context("listener address")?.port())
}
