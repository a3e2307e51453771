//! The Docker executor: one container per backend, named `hangar-<backend id>` and labelled
//! `dev.hangar.backend=<id>` and `dev.hangar.drone=<drone>` so a restarted drone finds it again.
//!
//! `prepare` pulls per `pull_policy` ([`image`]); `start` creates and starts the container
//! ([`container_body`]: environment, published port, limits, mount, network, GPUs, runtime, logging,
//! hardened defaults: never privileged, `no-new-privileges`, `NET_RAW` dropped), learns its address
//! and follows it ([`running`]: exit watcher, log follower, metrics). Containers outlive the drone: at
//! shutdown they keep running and the next run re-adopts them (`reattach`), reports the ones that
//! stopped meanwhile with their exit code, and removes orphans ([`cleanup`]). Exited containers are
//! removed by their watcher once their exit code, `OOMKilled` and last log lines are read.

mod cleanup;
mod container_body;
mod drone_process;
mod image;
mod metrics;
mod mount;
mod running;

pub use cleanup::{remove_containers_of_process, CLEANUP_INTERVAL};
pub use container_body::CONTAINER_PORT;
pub use drone_process::{DroneProcess, DRONE_PROCESS_LABEL};
pub use metrics::MetricsSink;
pub use mount::{MountError, CONTAINER_DATA_DIR};

use super::{BackendSpec, Executor, ExecutorError, Reattached, Started};
use crate::config::DockerLogConfig;
use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, RemoveContainerOptions, StartContainerOptions,
};
use bollard::Docker;
use container_body::{container_body, ContainerPlan, CONTAINER_PORT_KEY};
use hangar_types::executable::{DockerExecutable, Executable, ExecutorKind};
use hangar_types::{BackendId, DroneName};
use running::{ContainerRecord, Followers, RunningContainer};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Label holding the backend id; every Hangar container has it.
pub const BACKEND_LABEL: &str = "dev.hangar.backend";
/// Label holding the name of the drone that started the container.
pub const DRONE_LABEL: &str = "dev.hangar.drone";
/// Container names are this prefix plus the backend id.
pub const CONTAINER_PREFIX: &str = "hangar-";

/// How often, and how far apart, the published port is read after the start (Docker may publish
/// it a moment after `start` returns).
const ADDRESS_ATTEMPTS: u32 = 3;
const ADDRESS_RETRY: Duration = Duration::from_millis(100);
/// How long [`DockerExecutor::engine_reachable`] waits for an answer.
const ENGINE_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The drone-level settings of the Docker executor (from `DroneConfig`).
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// Put on every container (`dev.hangar.drone`), to find this drone's containers after a restart.
    pub drone: DroneName,
    /// Where proxies reach this drone; published ports listen on it.
    pub ip: IpAddr,
    /// Host directory under which `executable.mount` directories live; mounts are refused without.
    pub mount_base: Option<PathBuf>,
    /// Docker runtime for every container (e.g. `runsc` for gVisor); Docker's default when `None`.
    pub runtime: Option<String>,
    /// Docker log driver configuration for every container; Docker's default when `None`.
    pub log_config: Option<DockerLogConfig>,
    /// Stopped Hangar containers are removed once created longer ago than this.
    pub cleanup_min_age: Duration,
}

/// The name of a backend's container.
pub fn container_name(backend: &BackendId) -> String {
    format!("{CONTAINER_PREFIX}{backend}")
}

#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
    settings: Arc<DockerSettings>,
    /// Whether the storage driver supports `StorageOpt.size` (`disk_limit_bytes`).
    storage_opt_supported: bool,
    metrics: MetricsSink,
    stats_permits: Arc<Semaphore>,
    /// Names of containers this executor is starting or following; the cleanup leaves them alone.
    tracked: Arc<Mutex<HashSet<String>>>,
    tracker: TaskTracker,
    /// Fired at shutdown: watchers, log followers, samplers and the cleanup stop.
    cancel: CancellationToken,
    /// Where container output is captured, when set.
    logs: Option<crate::log_store::LogWriter>,
    /// This process, labelled on every container, when the containers die with it
    /// ([`DockerExecutor::ephemeral`]).
    process: Option<Arc<DroneProcess>>,
    /// Pulls in flight per image: concurrent spawns of one image (a warm pool filling) share one.
    pulls: Arc<image::ImagePulls>,
}

/// Marks a container as followed until dropped.
pub struct Tracked {
    set: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.name);
    }
}

fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    match set.lock() {
        Ok(set) => set,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl DockerExecutor {
    /// Connects to the local Docker engine (`DOCKER_HOST` or the default socket), agrees on an API
    /// version, and starts the periodic cleanup. Metrics samples go to `metrics`.
    pub async fn connect(
        settings: DockerSettings,
        metrics: MetricsSink,
    ) -> Result<DockerExecutor, ExecutorError> {
        let docker = Docker::connect_with_defaults().map_err(ExecutorError::DockerUnavailable)?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(ExecutorError::DockerUnavailable)?;
        let info = docker
            .info()
            .await
            .map_err(ExecutorError::DockerUnavailable)?;
        let storage_opt_supported = storage_opt_supported(
            info.driver.as_deref().unwrap_or(""),
            info.driver_status.as_deref().unwrap_or(&[]),
        );
        tracing::info!(
            version = info.server_version.as_deref().unwrap_or("unknown"),
            api = docker.client_version().to_string(),
            storage_driver = info.driver.as_deref().unwrap_or("unknown"),
            "Connected to Docker"
        );
        let executor = DockerExecutor {
            docker,
            settings: Arc::new(settings),
            storage_opt_supported,
            metrics,
            stats_permits: Arc::new(Semaphore::new(metrics::MAX_CONCURRENT_STATS)),
            tracked: Arc::new(Mutex::new(HashSet::new())),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            logs: None,
            process: None,
            pulls: Arc::default(),
        };
        executor.tracker.spawn(cleanup::run_cleanup(
            executor.clone(),
            executor.cancel.child_token(),
        ));
        Ok(executor)
    }

    /// Image pulls this executor started (concurrent spawns sharing one pull count it once).
    pub fn image_pulls(&self) -> u64 {
        self.pulls.started()
    }

    /// Captures every container's output into `logs`.
    pub fn with_log_writer(mut self, logs: crate::log_store::LogWriter) -> Self {
        self.logs = Some(logs);
        self
    }

    /// For a drone without a state file: labels every container with this process
    /// ([`DRONE_PROCESS_LABEL`]), so that once the process is gone (SIGKILL included) the next drone
    /// of this machine removes what it left. Does nothing where `/proc` cannot name the process.
    pub fn ephemeral(mut self) -> Self {
        self.process = DroneProcess::current().map(Arc::new);
        self
    }

    /// Whether a Docker engine answers at the default address within a few seconds (for
    /// `hangar dev`).
    pub async fn engine_reachable() -> bool {
        let Ok(docker) = Docker::connect_with_defaults() else {
            return false;
        };
        let ping = async {
            let docker = docker.negotiate_version().await?;
            docker.ping().await
        };
        matches!(
            tokio::time::timeout(ENGINE_PING_TIMEOUT, ping).await,
            Ok(Ok(_))
        )
    }

    fn track(&self, name: &str) -> Tracked {
        lock(&self.tracked).insert(name.to_string());
        Tracked {
            set: self.tracked.clone(),
            name: name.to_string(),
        }
    }

    fn is_tracked(&self, name: &str) -> bool {
        lock(&self.tracked).contains(name)
    }

    fn followers(&self) -> Followers<'_> {
        Followers {
            tracker: &self.tracker,
            cancel: &self.cancel,
            metrics: self.metrics.clone(),
            stats_permits: self.stats_permits.clone(),
            logs: self.logs.clone(),
        }
    }

    async fn inspect(&self, name: &str) -> Result<ContainerInspectResponse, DockerError> {
        self.docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
    }

    /// Where proxies reach a running container: the published port on the drone's address, or the
    /// container's address on its named network.
    async fn address(
        &self,
        name: &str,
        network: Option<&str>,
    ) -> Result<SocketAddr, ExecutorError> {
        let no_address = |reason: String| ExecutorError::NoAddress {
            container: name.to_string(),
            reason,
        };
        let mut attempt = 1;
        loop {
            let info = self
                .inspect(name)
                .await
                .map_err(|source| ExecutorError::Docker {
                    action: "inspect the container",
                    source,
                })?;
            let found = match network {
                Some(network) => network_address(&info, network),
                None => published_port(&info).map(|port| SocketAddr::new(self.settings.ip, port)),
            };
            match found {
                Some(address) => return Ok(address),
                None if attempt < ADDRESS_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(ADDRESS_RETRY).await;
                }
                None => {
                    return Err(no_address(match network {
                        Some(network) => format!("it has no address on network {network}"),
                        None => format!("port {CONTAINER_PORT_KEY} is not published"),
                    }))
                }
            }
        }
    }

    /// `docker rm -f` of a container that may not exist.
    async fn remove_container(&self, name: &str) -> Result<(), ExecutorError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(ExecutorError::Docker {
                action: "remove the container",
                source,
            }),
        }
    }

    /// Creates and starts the container; on failure nothing is left behind.
    async fn create_and_start(
        &self,
        spec: &BackendSpec,
        exe: &DockerExecutable,
        name: &str,
    ) -> Result<String, ExecutorError> {
        let data_dir = mount::prepare_mount(
            exe.mount.as_ref(),
            &spec.key,
            self.settings.mount_base.as_deref(),
        )
        .await?;
        let body = container_body(&ContainerPlan {
            spec,
            exe,
            drone: &self.settings.drone,
            process: self.process.as_deref(),
            ip: self.settings.ip,
            data_dir,
            runtime: self.settings.runtime.clone(),
            log_config: self.settings.log_config.clone(),
            storage_opt_supported: self.storage_opt_supported,
        });
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|source| ExecutorError::Docker {
                action: "create the container",
                source,
            })?;
        if let Err(source) = self
            .docker
            .start_container(name, None::<StartContainerOptions>)
            .await
        {
            self.discard(spec, name).await;
            return Err(ExecutorError::Docker {
                action: "start the container",
                source,
            });
        }
        Ok(created.id)
    }

    /// Removes a container that failed to start (its output kept first), logging rather than
    /// failing.
    async fn discard(&self, spec: &BackendSpec, name: &str) {
        if let Some(store) = &self.logs {
            let capture = running::LogFollow {
                docker: self.docker.clone(),
                container: name.to_string(),
                backend: spec.id.clone(),
                recent: Default::default(),
                store: Some(store.clone()),
                follow: false,
            };
            capture.run(self.cancel.child_token()).await;
            store.end(&spec.id).await;
        }
        if let Err(e) = self.remove_container(name).await {
            tracing::warn!(backend = %spec.id, error = %e, "Cannot remove the failed container");
        }
    }
}

fn docker_executable(spec: &BackendSpec) -> Result<&DockerExecutable, ExecutorError> {
    match &spec.executable {
        Executable::Docker(d) => Ok(d),
        other => Err(ExecutorError::WrongKind(other.kind())),
    }
}

#[async_trait]
impl Executor for DockerExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Docker
    }

    fn backends_outlive_drone(&self) -> bool {
        true
    }

    async fn prepare(&self, spec: &BackendSpec) -> Result<(), ExecutorError> {
        self.prepare_image(docker_executable(spec)?).await
    }

    async fn start(&self, spec: &BackendSpec) -> Result<Started, ExecutorError> {
        let exe = docker_executable(spec)?;
        let name = container_name(&spec.id);
        let tracked = self.track(&name);
        let id = self.create_and_start(spec, exe, &name).await?;
        let address = match self.address(&name, exe.network_name.as_deref()).await {
            Ok(address) => address,
            Err(e) => {
                self.discard(spec, &name).await;
                return Err(e);
            }
        };
        tracing::debug!(backend = %spec.id, container = %name, %address, "Started container");
        let record = ContainerRecord {
            container: name,
            id: Some(id),
        };
        let running =
            RunningContainer::follow(&self.docker, record, &spec.id, tracked, self.followers());
        Ok(Started {
            address,
            backend: Box::new(running),
        })
    }

    async fn reattach(
        &self,
        backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<Reattached, ExecutorError> {
        // The name is all that is needed; the record only confirms it.
        let name = container_name(backend);
        let info = match self.inspect(&name).await {
            Ok(info) => info,
            Err(e) if is_not_found(&e) => return Ok(Reattached::Gone),
            Err(source) => {
                return Err(ExecutorError::Docker {
                    action: "inspect the container",
                    source,
                })
            }
        };
        let state = info.state.clone().unwrap_or_default();
        if state.running.unwrap_or(false) {
            let tracked = self.track(&name);
            let network = named_network(&info);
            let address = self.address(&name, network.as_deref()).await?;
            let record = ContainerRecord {
                container: name,
                id: info.id.clone(),
            };
            let running =
                RunningContainer::follow(&self.docker, record, backend, tracked, self.followers());
            return Ok(Reattached::Running(Started {
                address,
                backend: Box::new(running),
            }));
        }
        // It stopped while the drone was away (or never started): report how, then remove it.
        let started = state
            .started_at
            .as_deref()
            .is_some_and(|t| !t.starts_with("0001-"));
        let exit_code = if started {
            state.exit_code.and_then(|c| i32::try_from(c).ok())
        } else {
            None
        };
        let oom_killed = state.oom_killed.unwrap_or(false);
        if let Ok(lines) = running::last_log_lines(&self.docker, &name).await {
            for line in lines {
                tracing::debug!(%backend, "{line}");
            }
        }
        self.remove_container(&name).await?;
        Ok(Reattached::Exited {
            exit_code,
            oom_killed,
        })
    }

    async fn remove(
        &self,
        backend: &BackendId,
        _record: Option<&serde_json::Value>,
    ) -> Result<(), ExecutorError> {
        self.remove_container(&container_name(backend)).await
    }

    async fn remove_orphans(&self, supervised: &[BackendId]) -> Result<usize, ExecutorError> {
        let orphans = self.remove_orphan_containers(supervised).await?;
        Ok(orphans + self.remove_containers_of_gone_drones().await?)
    }

    async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The host port Docker published for the container port.
fn published_port(info: &ContainerInspectResponse) -> Option<u16> {
    let ports = info.network_settings.as_ref()?.ports.as_ref()?;
    ports
        .get(CONTAINER_PORT_KEY)?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

/// The container's address on `network`, at the container port.
fn network_address(info: &ContainerInspectResponse, network: &str) -> Option<SocketAddr> {
    let networks = info.network_settings.as_ref()?.networks.as_ref()?;
    let ip: IpAddr = networks.get(network)?.ip_address.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, CONTAINER_PORT))
}

/// The user-named network of a container (`None` for Docker's default bridge).
fn named_network(info: &ContainerInspectResponse) -> Option<String> {
    let mode = info.host_config.as_ref()?.network_mode.as_deref()?;
    (!matches!(mode, "" | "default" | "bridge")).then(|| mode.to_string())
}

/// Whether `StorageOpt.size` works with this storage driver (overlay2 only on xfs).
fn storage_opt_supported(driver: &str, status: &[Vec<String>]) -> bool {
    match driver {
        "devicemapper" | "btrfs" | "zfs" | "windowsfilter" => true,
        "overlay2" => status.iter().any(|kv| {
            kv.first().map(String::as_str) == Some("Backing Filesystem")
                && kv.get(1).map(String::as_str) == Some("xfs")
        }),
        _ => false,
    }
}

/// HTTP 404 from Docker.
pub(crate) fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// 404 (no such container) or 409 (not running): nothing to act on.
pub(crate) fn is_gone(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }
    )
}

/// Docker's own message for an error it answered, else the error's description.
pub(crate) fn error_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_drivers_that_limit_disk() {
        assert!(storage_opt_supported("btrfs", &[]));
        assert!(!storage_opt_supported("fuse-overlayfs", &[]));
        assert!(!storage_opt_supported("overlay2", &[]));
        let xfs = vec![vec!["Backing Filesystem".to_string(), "xfs".to_string()]];
        assert!(storage_opt_supported("overlay2", &xfs));
    }

    #[test]
    fn container_names_and_errors() {
        let id: BackendId = "abc-1".parse().unwrap();
        assert_eq!(container_name(&id), "hangar-abc-1");
        let e = DockerError::DockerResponseServerError {
            status_code: 404,
            message: "No such container: x".into(),
        };
        assert!(is_not_found(&e) && is_gone(&e));
        assert_eq!(error_message(&e), "No such container: x");
        let conflict = DockerError::DockerResponseServerError {
            status_code: 409,
            message: "is not running".into(),
        };
        assert!(!is_not_found(&conflict) && is_gone(&conflict));
    }
}
