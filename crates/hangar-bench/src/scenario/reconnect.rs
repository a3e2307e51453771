//! `reconnect`: get-or-create calls (`POST /ctrl/connect`) for keys whose backends are already running,
//! from C concurrent clients, N calls in all — the warm path every page load of an app takes. Each
//! call looks the key up, reuses its backend and issues a fresh connection token.
//!
//! Metrics per store (`sqlite_…`, `postgres_…`): the latency of each call and the sustained calls per
//! second. Baseline: `GET /pub/health` on the same controller with the same N and C (an HTTP round
//! trip plus one `select 1` on the store), i.e. the floor for any API call that touches the store.
//!
//! Runs on SQLite and, when `HANGAR_TEST_POSTGRES_URL` is set, on a fresh PostgreSQL database, unless
//! `--store` picks one. The clients run on a thread of their own.

use super::{closed_loop, on_load_thread, run_id, test_backend_executable, BenchOptions};
use crate::postgres_db;
use crate::report::{Report, Unit};
use crate::system::{StoreKind, System, SystemConfig};
use anyhow::Context;
use hangar_client::ControllerClient;
use hangar_types::api::ConnectRequest;
use hangar_types::BackendStatus;
use std::sync::Arc;

pub const DEFAULT_N: usize = 3000;
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Most distinct keys (running backends) the calls cycle through.
const MAX_KEYS: usize = 8;
/// Untimed calls before each measurement.
const WARM_UP_CALLS: usize = 50;

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let n = options.n.unwrap_or(DEFAULT_N);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let mut report = Report::new("reconnect");
    report.param("n", n);
    report.param("concurrency", concurrency);
    let stores = match options.store {
        Some(store) => vec![store],
        None if postgres_db::server_url().is_some() => vec![StoreKind::Sqlite, StoreKind::Postgres],
        None => {
            report.note(format!(
                "PostgreSQL skipped: set {} to a server URL to include it",
                postgres_db::URL_VAR
            ));
            vec![StoreKind::Sqlite]
        }
    };
    report.param(
        "stores",
        stores.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    for store in stores {
        let config = SystemConfig {
            proxy: false,
            ..SystemConfig::new(store)
        };
        let system = System::start(&config).await?;
        let measured = measure(&system, n, concurrency).await;
        system.shutdown().await;
        let (reconnect, health) = measured.with_context(|| format!("on {}", store.as_str()))?;
        let s = store.as_str();
        let base = format!("{s}_health");
        report.add_millis(&base, &health.latencies, None);
        report.add_millis(&format!("{s}_reconnect"), &reconnect.latencies, Some(&base));
        let base_rate = format!("{s}_health_calls_per_s");
        report.add_value(&base_rate, Unit::PerSecond, health.per_second(), None);
        report.add_value(
            &format!("{s}_reconnect_calls_per_s"),
            Unit::PerSecond,
            reconnect.per_second(),
            Some(&base_rate),
        );
        for (what, errors) in [("reconnect", reconnect.errors), ("health", health.errors)] {
            if errors > 0 {
                report.note(format!("{s}: {errors} {what} calls failed"));
            }
        }
    }
    Ok(report)
}

async fn measure(
    system: &System,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(crate::http_load::LoadOutcome, crate::http_load::LoadOutcome)> {
    let run = run_id();
    let executable = test_backend_executable(&[])?;
    let keys = concurrency.min(MAX_KEYS);
    let mut requests = Vec::with_capacity(keys);
    for i in 0..keys {
        let request =
            system.connect_request(&format!("reconnect-{run}-{i}"), executable.clone())?;
        let response = system.client.connect(&request).await?;
        system
            .wait_for_status(&response.backend_id, BackendStatus::Ready)
            .await?;
        requests.push(request);
    }
    let requests = Arc::new(requests);
    let url = system.controller_url();
    on_load_thread(move || async move {
        // A client of this thread's runtime (its connection pool lives here).
        let client = ControllerClient::new(url).context("controller client")?;
        let connect = |i: usize| {
            let (client, requests) = (client.clone(), requests.clone());
            async move { reconnect_once(&client, &requests[i % requests.len()]).await }
        };
        let health = |_| {
            let client = client.clone();
            async move {
                client.health().await.context("health call")?;
                Ok(())
            }
        };
        closed_loop(WARM_UP_CALLS, concurrency, connect).await;
        let reconnect = closed_loop(n, concurrency, connect).await;
        closed_loop(WARM_UP_CALLS, concurrency, health).await;
        let health = closed_loop(n, concurrency, health).await;
        Ok((reconnect, health))
    })
    .await
}

async fn reconnect_once(client: &ControllerClient, request: &ConnectRequest) -> anyhow::Result<()> {
    let response = client.connect(request).await.context("connect call")?;
    anyhow::ensure!(
        !response.spawned && response.status == BackendStatus::Ready,
        "expected the running backend to be reused, got {:?} (spawned: {})",
        response.status,
        response.spawned
    );
    Ok(())
}
