//! CPU and memory of each running container: a one-shot Docker stats request every
//! [`BACKEND_METRICS_INTERVAL`] (the first at once), sent to the controller as
//! `DroneToController::BackendMetrics`. Best effort: a sample that cannot be taken or queued is
//! dropped; at most [`MAX_CONCURRENT_STATS`] stats requests run at a time across all containers.

use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::StatsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use hangar_types::protocol::DroneToController;
use hangar_types::timing::BACKEND_METRICS_INTERVAL;
use hangar_types::BackendId;
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Stats requests in flight at once, across all containers of the drone.
pub const MAX_CONCURRENT_STATS: usize = 8;

/// Where samples go: the drone's metrics queue (bounded; a full queue drops the sample).
pub type MetricsSink = mpsc::Sender<DroneToController>;

/// The cumulative CPU counters of the previous sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCounters {
    container_ns: u64,
    system_ns: u64,
}

/// One sample, or `None` when the stats lack memory figures (the container is not running).
/// CPU figures are deltas since `previous` (0 without one, or when a counter went backwards).
pub fn sample(
    backend: &BackendId,
    stats: &ContainerStatsResponse,
    previous: Option<CpuCounters>,
) -> Option<(DroneToController, Option<CpuCounters>)> {
    let memory = stats.memory_stats.as_ref()?;
    let usage = memory.usage?;
    let cpu = stats.cpu_stats.as_ref();
    let counters = cpu.and_then(|cpu| {
        Some(CpuCounters {
            container_ns: cpu.cpu_usage.as_ref()?.total_usage?,
            system_ns: cpu.system_cpu_usage?,
        })
    });
    let (cpu_used_ns, sys_cpu_ns) = match (previous, counters) {
        (Some(before), Some(now)) => (
            now.container_ns.checked_sub(before.container_ns),
            now.system_ns.checked_sub(before.system_ns),
        ),
        _ => (Some(0), Some(0)),
    };
    let (cpu_used_ns, sys_cpu_ns) = match (cpu_used_ns, sys_cpu_ns) {
        (Some(used), Some(sys)) => (used, sys),
        // A counter went backwards (the container restarted its cgroup): start over.
        _ => (0, 0),
    };
    let metrics = DroneToController::BackendMetrics {
        backend_id: backend.clone(),
        mem_used: usage.saturating_sub(reclaimable_cache(memory.stats.as_ref(), usage)),
        mem_limit: memory.limit.unwrap_or(0),
        cpu_used_ns,
        sys_cpu_ns,
    };
    Some((metrics, counters))
}

/// Page cache the kernel can drop, as `docker stats` subtracts it (cgroup v1 reports
/// `total_inactive_file`, v2 `inactive_file`).
fn reclaimable_cache(stats: Option<&std::collections::HashMap<String, u64>>, usage: u64) -> u64 {
    let Some(stats) = stats else { return 0 };
    ["total_inactive_file", "inactive_file"]
        .iter()
        .find_map(|k| stats.get(*k).copied().filter(|v| *v < usage))
        .unwrap_or(0)
}

/// Samples one container.
pub struct Sampler {
    pub docker: Docker,
    pub container: String,
    pub backend: BackendId,
    pub sink: MetricsSink,
    /// Shared by every sampler: bounds the stats requests in flight.
    pub permits: Arc<Semaphore>,
}

/// Samples until `cancel` fires (the container's exit, or the drone's shutdown).
pub async fn run_metrics(sampler: Sampler, cancel: CancellationToken) {
    let Sampler {
        docker,
        container,
        backend,
        sink,
        permits,
    } = sampler;
    let mut ticks = hangar_types::ticks::every(BACKEND_METRICS_INTERVAL, &cancel);
    let mut previous = None;
    while ticks.next().await {
        let stats = tokio::select! {
            _ = cancel.cancelled() => return,
            stats = one_shot_stats(&docker, &container, &permits) => stats,
        };
        let stats = match stats {
            Ok(Some(stats)) => stats,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(%backend, error = %e, "Cannot read container stats");
                continue;
            }
        };
        match sample(&backend, &stats, previous) {
            Some((message, counters)) => {
                previous = counters;
                if sink.try_send(message).is_err() {
                    tracing::debug!(%backend, "Dropping a metrics sample: queue full or closed");
                }
            }
            None => tracing::debug!(%backend, "Container stats without memory figures"),
        }
    }
}

async fn one_shot_stats(
    docker: &Docker,
    container: &str,
    permits: &Semaphore,
) -> Result<Option<ContainerStatsResponse>, bollard::errors::Error> {
    // The semaphore is never closed; a failed acquire just means no permit.
    let _permit = permits.acquire().await.ok();
    let options = StatsOptions {
        stream: false,
        one_shot: true,
    };
    docker
        .stats(container, Some(options))
        .next()
        .await
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerCpuStats, ContainerCpuUsage, ContainerMemoryStats};
    use std::collections::HashMap;

    fn stats(
        usage: u64,
        inactive: &[(&str, u64)],
        cpu: u64,
        system: u64,
    ) -> ContainerStatsResponse {
        ContainerStatsResponse {
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(usage),
                limit: Some(1000),
                stats: Some(
                    inactive
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v))
                        .collect::<HashMap<_, _>>(),
                ),
                ..Default::default()
            }),
            cpu_stats: Some(ContainerCpuStats {
                cpu_usage: Some(ContainerCpuUsage {
                    total_usage: Some(cpu),
                    ..Default::default()
                }),
                system_cpu_usage: Some(system),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn figures(m: &DroneToController) -> (u64, u64, u64, u64) {
        match m {
            DroneToController::BackendMetrics {
                mem_used,
                mem_limit,
                cpu_used_ns,
                sys_cpu_ns,
                ..
            } => (*mem_used, *mem_limit, *cpu_used_ns, *sys_cpu_ns),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn memory_excludes_reclaimable_cache_and_cpu_is_a_delta() {
        let id: BackendId = "ba-x".parse().unwrap();
        // cgroup v1 first, then v2; a cache figure above the usage is ignored.
        let (m, first) = sample(
            &id,
            &stats(500, &[("total_inactive_file", 100)], 10, 1000),
            None,
        )
        .unwrap();
        assert_eq!(figures(&m), (400, 1000, 0, 0));
        let (m, second) =
            sample(&id, &stats(300, &[("inactive_file", 50)], 25, 1600), first).unwrap();
        assert_eq!(figures(&m), (250, 1000, 15, 600));
        let (m, _) = sample(
            &id,
            &stats(300, &[("inactive_file", 900)], 30, 2000),
            second,
        )
        .unwrap();
        assert_eq!(figures(&m).0, 300);
        // A counter going backwards starts over instead of underflowing.
        let (m, _) = sample(&id, &stats(300, &[], 1, 2000), second).unwrap();
        assert_eq!(figures(&m), (300, 1000, 0, 0));
        // No memory figures: no sample.
        assert!(sample(&id, &ContainerStatsResponse::default(), None).is_none());
    }
}
