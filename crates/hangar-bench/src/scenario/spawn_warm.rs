//! `spawn --warm`: claims of warm-pool backends beside cold spawns and reconnects of the same run, one
//! call at a time (process, or Docker with `--executor docker`).
//!
//! - `reconnect`: a connect for a key whose backend (just claimed) runs — the baseline: a claim
//!   should cost about as much as this lookup.
//! - `claim_connect_to_ready`: a connect that claims a ready backend of a pool without `claim_path`;
//!   it answers `ready`, so the call is connect→ready.
//! - `claim_hook_connect_to_ready`: the same with `claim_path` (the test backend's `POST /claim`),
//!   i.e. plus the drone's hook round trip.
//! - `claim_connect_to_first_response`: from sending the claiming connect to the first 2xx through
//!   the proxy.
//! - `cold_connect_to_ready`: a connect that spawns cold (no pool matches), to `ready` on the status
//!   stream.
//!
//! Before each claim the pool is refilled (untimed), so every claim finds a ready backend; each
//! claimed or cold backend is terminated (and awaited) before the next sample.

use super::spawn::{docker_available, first_success, DOCKER_IMAGE};
use super::{run_id, test_backend_executable, BenchOptions};
use crate::report::Report;
use crate::system::{eventually, StoreKind, System, SystemConfig, WAIT};
use anyhow::Context;
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::warm_pool::WarmPoolConfig;
use hangar_types::{BackendId, BackendStatus, WarmPoolName};
use std::time::{Duration, Instant};

/// Unclaimed backends kept by the benchmark's pool.
const POOL_SIZE: u32 = 2;

#[derive(Default)]
struct Samples {
    reconnect: Vec<Duration>,
    claim: Vec<Duration>,
    claim_hook: Vec<Duration>,
    claim_first_response: Vec<Duration>,
    cold: Vec<Duration>,
}

/// Claims (and cold spawns) per run by default.
const DEFAULT_N: usize = 20;

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let n = options.n.unwrap_or(DEFAULT_N);
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let executor = options.executor.unwrap_or(ExecutorKind::Process);
    let mut report = Report::new("spawn");
    report.param("warm", true);
    report.param("n", n);
    report.param("store", store.as_str());
    report.param("executor", executor.to_string());
    report.param("pool_size", POOL_SIZE);
    let executable: Executable = match executor {
        ExecutorKind::Process => test_backend_executable(&[])?,
        ExecutorKind::Docker => {
            if let Err(reason) = docker_available().await {
                report.note(format!("docker warm spawn skipped: {reason}"));
                return Ok(report);
            }
            serde_json::from_value(serde_json::json!({
                "image": DOCKER_IMAGE,
                "pull_policy": "Never",
            }))
            .context("building the docker executable")?
        }
        ExecutorKind::Socket => anyhow::bail!("the spawn benchmark cannot use a socket executor"),
    };
    let config = SystemConfig {
        executor,
        ..SystemConfig::new(store)
    };
    let system = System::start(&config).await?;
    let measured = measure(&system, &executable, n).await;
    system.shutdown().await;
    let s = measured?;
    report.add_millis("reconnect", &s.reconnect, None);
    report.add_millis("claim_connect_to_ready", &s.claim, Some("reconnect"));
    report.add_millis(
        "claim_hook_connect_to_ready",
        &s.claim_hook,
        Some("reconnect"),
    );
    report.add_millis(
        "claim_connect_to_first_response",
        &s.claim_first_response,
        Some("reconnect"),
    );
    report.add_millis("cold_connect_to_ready", &s.cold, Some("reconnect"));
    Ok(report)
}

async fn measure(system: &System, executable: &Executable, n: usize) -> anyhow::Result<Samples> {
    let http = reqwest::Client::new();
    let run = run_id();
    let pool: WarmPoolName = "bench".parse().context("pool name")?;
    let mut pool_config = WarmPoolConfig {
        cluster: Some(system.cluster.clone()),
        pool: String::new(),
        size: POOL_SIZE,
        executable: executable.clone(),
        max_age_seconds: None,
        claim_path: None,
    };
    let mut s = Samples::default();
    for hook in [false, true] {
        pool_config.claim_path = hook.then(|| "/claim".to_string());
        system.client.put_warm_pool(&pool, &pool_config).await?;
        // One untimed warm-up claim, then the samples.
        for i in 0..=n {
            wait_full(system, &pool).await?;
            let key = format!("warm-{run}-{hook}-{i}");
            let request = system.connect_request(&key, executable.clone())?;
            let started = Instant::now();
            let response = system.client.connect(&request).await?;
            let call = started.elapsed();
            anyhow::ensure!(
                response.warm && response.status == BackendStatus::Ready,
                "key {key} was not claimed: {response:?}"
            );
            first_success(&http, &response.url).await?;
            let first_response = started.elapsed();
            let started = Instant::now();
            let again = system.client.connect(&request).await?;
            let reconnect = started.elapsed();
            anyhow::ensure!(!again.spawned, "key {key} was not reused");
            if i > 0 {
                match hook {
                    false => {
                        s.claim.push(call);
                        s.claim_first_response.push(first_response);
                    }
                    true => s.claim_hook.push(call),
                }
                s.reconnect.push(reconnect);
            }
            terminate(system, &response.backend_id).await?;
        }
    }
    system.client.delete_warm_pool(&pool).await?;
    for i in 0..=n {
        let key = format!("cold-{run}-{i}");
        let request = system.connect_request(&key, executable.clone())?;
        let started = Instant::now();
        let response = system.client.connect(&request).await?;
        anyhow::ensure!(
            !response.warm,
            "key {key} was claimed after the pool was deleted"
        );
        system
            .wait_for_status(&response.backend_id, BackendStatus::Ready)
            .await?;
        if i > 0 {
            s.cold.push(started.elapsed());
        }
        terminate(system, &response.backend_id).await?;
    }
    Ok(s)
}

/// Waits until the pool has all its backends ready.
async fn wait_full(system: &System, pool: &WarmPoolName) -> anyhow::Result<()> {
    eventually("the warm pool to be full", WAIT, || async {
        let list = system.client.warm_pools().await.ok()?;
        let p = list.pools.into_iter().find(|p| &p.name == pool)?;
        (p.ready == u64::from(p.size)).then_some(())
    })
    .await
}

async fn terminate(system: &System, backend: &BackendId) -> anyhow::Result<()> {
    system
        .client
        .soft_terminate(backend)
        .await
        .context("terminating the backend")?;
    system
        .wait_for_status(backend, BackendStatus::Terminated)
        .await?;
    Ok(())
}
