//! Containers nobody follows any more: this drone's stopped containers older than the configured age
//! (removed every [`CLEANUP_INTERVAL`]), at startup this drone's containers that belong to no
//! supervised backend (orphans: the controller believes them terminated or never heard of them),
//! and, at startup and every interval, the containers of ephemeral drones of this machine whose
//! process is gone ([`super::drone_process`]: `hangar dev --in-memory` killed with SIGKILL).
//!
//! [`remove_containers_of_process`] serves a watchdog process that outlives its drone.
//!
//! Otherwise only containers labelled with this drone's name are touched: another drone sharing the
//! Docker engine may still want to read a stopped container's exit code when it restarts.

use super::{
    error_message, is_not_found, DockerExecutor, DroneProcess, BACKEND_LABEL, DRONE_LABEL,
    DRONE_PROCESS_LABEL,
};
use crate::executor::ExecutorError;
use bollard::models::ContainerSummary;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use bollard::Docker;
use hangar_types::BackendId;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// How often stopped containers are looked for (plane-api.md §6.3.8).
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);

impl DockerExecutor {
    /// Removes this drone's stopped containers created more than `cleanup_min_age` ago that this
    /// executor is not following. Returns how many were removed.
    pub async fn remove_stopped_containers(&self) -> Result<usize, ExecutorError> {
        let filters = HashMap::from([
            ("label".to_string(), vec![self.drone_label()]),
            (
                "status".to_string(),
                vec!["exited".into(), "dead".into(), "created".into()],
            ),
        ]);
        let cutoff = SystemTime::now()
            .checked_sub(self.settings.cleanup_min_age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut removed = 0;
        for container in list(&self.docker, filters).await? {
            let Some(name) = container_name(&container) else {
                continue;
            };
            let old_enough = container.created.is_some_and(|created| created <= cutoff);
            if !old_enough || self.is_tracked(&name) {
                continue;
            }
            if force_remove(&self.docker, &name).await {
                tracing::info!(container = %name, "Removed stopped container");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes every container of this drone whose backend is not in `supervised`.
    pub(super) async fn remove_orphan_containers(
        &self,
        supervised: &[BackendId],
    ) -> Result<usize, ExecutorError> {
        let filters = HashMap::from([("label".to_string(), vec![self.drone_label()])]);
        let mut removed = 0;
        for container in list(&self.docker, filters).await? {
            let Some(name) = container_name(&container) else {
                continue;
            };
            let backend = container
                .labels
                .as_ref()
                .and_then(|l| l.get(BACKEND_LABEL))
                .and_then(|id| id.parse::<BackendId>().ok());
            if backend.is_some_and(|b| supervised.contains(&b)) {
                continue;
            }
            if force_remove(&self.docker, &name).await {
                tracing::info!(container = %name, "Removed orphan container");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the containers of ephemeral drones whose process is proven gone (any drone name:
    /// nothing can re-adopt them). Returns how many were removed.
    pub async fn remove_containers_of_gone_drones(&self) -> Result<usize, ExecutorError> {
        let Some(here) = DroneProcess::current() else {
            return Ok(0);
        };
        let filters = HashMap::from([("label".to_string(), vec![DRONE_PROCESS_LABEL.to_string()])]);
        let mut removed = 0;
        for container in list(&self.docker, filters).await? {
            let Some(name) = container_name(&container) else {
                continue;
            };
            let labels = container.labels.unwrap_or_default();
            let gone = labels
                .get(DRONE_PROCESS_LABEL)
                .and_then(|process| process.parse::<DroneProcess>().ok())
                .is_some_and(|process| process.is_gone(&here));
            if !gone || self.is_tracked(&name) {
                continue;
            }
            if force_remove(&self.docker, &name).await {
                let drone = labels.get(DRONE_LABEL).map_or("", String::as_str);
                tracing::info!(container = %name, drone, "Removed a container of a drone whose process is gone");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The label filter that selects this drone's containers.
    fn drone_label(&self) -> String {
        format!("{DRONE_LABEL}={}", self.settings.drone)
    }
}

/// Removes every container labelled with `process` (whatever its state), through the local Docker
/// engine: what a watchdog does once the ephemeral drone `process` is gone. Returns how many.
pub async fn remove_containers_of_process(process: &DroneProcess) -> Result<usize, ExecutorError> {
    let docker = Docker::connect_with_defaults().map_err(ExecutorError::DockerUnavailable)?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(ExecutorError::DockerUnavailable)?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{DRONE_PROCESS_LABEL}={process}")],
    )]);
    let mut removed = 0;
    for container in list(&docker, filters).await? {
        let Some(name) = container_name(&container) else {
            continue;
        };
        if force_remove(&docker, &name).await {
            tracing::info!(container = %name, "Removed a container of a drone whose process is gone");
            removed += 1;
        }
    }
    Ok(removed)
}

async fn list(
    docker: &Docker,
    filters: HashMap<String, Vec<String>>,
) -> Result<Vec<ContainerSummary>, ExecutorError> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .map_err(|source| ExecutorError::Docker {
            action: "list containers",
            source,
        })
}

/// `docker rm -f`; `true` when it removed something.
async fn force_remove(docker: &Docker, name: &str) -> bool {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => true,
        Err(e) if is_not_found(&e) => false,
        Err(e) => {
            tracing::warn!(container = %name, error = %error_message(&e), "Cannot remove container");
            false
        }
    }
}

/// The container's name without Docker's leading `/`.
fn container_name(container: &ContainerSummary) -> Option<String> {
    let name = container.names.as_ref()?.first()?;
    Some(name.trim_start_matches('/').to_string())
}

/// Removes stopped containers and those of gone drones every [`CLEANUP_INTERVAL`] (the first pass
/// one interval after the start, so the startup recovery reads the exit codes of stopped containers
/// first).
pub async fn run_cleanup(executor: DockerExecutor, cancel: CancellationToken) {
    let start = tokio::time::Instant::now() + CLEANUP_INTERVAL;
    let mut ticks = hangar_types::ticks::every_from(start, CLEANUP_INTERVAL, &cancel);
    while ticks.next().await {
        let removed = tokio::select! {
            _ = cancel.cancelled() => return,
            removed = executor.remove_stopped_containers() => removed,
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "Failed to clean up stopped containers");
        }
        let removed = tokio::select! {
            _ = cancel.cancelled() => return,
            removed = executor.remove_containers_of_gone_drones() => removed,
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "Failed to remove the containers of gone drones");
        }
    }
}
