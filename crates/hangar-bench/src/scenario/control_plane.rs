//! `control-plane`: one controller with D simulated drones ([`crate::fake_drone`]) and B backends, so
//! only Hangar's control path (API, store, node sessions) is measured.
//!
//! 1. Spawn burst: B connects for new keys from C concurrent clients. `connect_call` is each call's
//!    latency (baseline: `GET /pub/health` with the same C, an API round trip with one `select 1`);
//!    `connect_to_ready` runs from sending the call until the controller acknowledges the simulated
//!    drone's `ready` event (stored by then) — under this load it is mostly queueing; `spawns_per_s` is
//!    B over the time from the first call to the last acknowledged `ready`.
//! 2. Memory: `rss_…` is this process's resident memory, which holds the controller, the simulated
//!    drones and the clients (nothing else runs here): before the drones connect, with them, and after
//!    B backends.
//! 3. Steady state: CPU time (user + system, `/proc/self/stat`) of this process over a window in which
//!    the D drones heartbeat and B backends stay up, as a percentage of one core; and the background
//!    rate of SQL statements in that window.
//! 4. One at a time: M more connects, sequentially. `connect_to_ready_unloaded` (baseline: sequential
//!    health calls) and `statements_per_connect`: SQL statements sqlx executed (see
//!    [`crate::sql_statements`]: counted from sqlx's own per-statement events, on SQLite and
//!    PostgreSQL alike) from the first call until all M are `ready`, minus the background rate, over M.

use super::{closed_loop, on_load_thread, run_id, BenchOptions};
use crate::fake_drone::{FakeDrone, ReadyReport};
use crate::process_usage::{cpu_time, rss_bytes, Pid};
use crate::report::{Report, Unit};
use crate::sql_statements::Counting;
use crate::system::{eventually, StoreKind, System, SystemConfig, WAIT};
use anyhow::Context;
use hangar_client::ControllerClient;
use hangar_types::executable::Executable;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_BACKENDS: usize = 1000;
pub const DEFAULT_DRONES: usize = 10;
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const DEFAULT_STEADY_SECONDS: u64 = 10;
/// Most connects of the one-at-a-time phase.
const SEQUENTIAL_CONNECTS: usize = 50;

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let backends = options.n.unwrap_or(DEFAULT_BACKENDS).max(1);
    let drones = options.drones.unwrap_or(DEFAULT_DRONES).max(1);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let steady = Duration::from_secs(options.steady_seconds.unwrap_or(DEFAULT_STEADY_SECONDS));
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let mut report = Report::new("control-plane");
    report.param("backends", backends);
    report.param("drones", drones);
    report.param("concurrency", concurrency);
    report.param("steady_seconds", steady.as_secs());
    report.param("store", store.as_str());
    crate::sql_statements::install_tracing();

    let rss_empty = rss_bytes(Pid::This)?;
    let config = SystemConfig {
        drones: 0,
        proxy: false,
        ..SystemConfig::new(store)
    };
    let system = System::start(&config).await?;
    let plan = Plan {
        backends,
        drones,
        concurrency,
        steady,
    };
    let measured = measure(&system, &plan, &mut report).await;
    system.shutdown().await;
    measured?;
    report.add_value(
        "rss_before_controller",
        Unit::Mebibytes,
        rss_empty as f64 / (1024.0 * 1024.0),
        None,
    );
    Ok(report)
}

struct Plan {
    backends: usize,
    drones: usize,
    concurrency: usize,
    steady: Duration,
}

async fn measure(system: &System, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut fakes = tokio::task::JoinSet::new();
    let rss_no_drones = rss_bytes(Pid::This)?;
    for _ in 0..plan.drones {
        let drone = FakeDrone::connect(&system.client, &system.cluster).await?;
        fakes.spawn(drone.run(ready_tx.clone(), cancel.child_token()));
    }
    let expected = plan.drones;
    eventually("the simulated drones to register", WAIT, || async {
        let state = system.client.cluster_state(&system.cluster).await.ok()?;
        let live = state
            .drones
            .iter()
            .filter(|d| d.last_heartbeat_age.is_some())
            .count();
        (live >= expected).then_some(())
    })
    .await?;
    let rss_drones = rss_bytes(Pid::This)?;
    let result = measure_with_drones(system, plan, &mut ready_rx, report).await;
    cancel.cancel();
    while let Some(joined) = fakes.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report.note(format!("a simulated drone failed: {e:#}")),
            Err(e) => report.note(format!("a simulated drone panicked: {e}")),
        }
    }
    let rss_backends = result?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.add_value(
        "rss_idle_controller",
        Unit::Mebibytes,
        mib(rss_no_drones),
        None,
    );
    report.add_value("rss_with_drones", Unit::Mebibytes, mib(rss_drones), None);
    report.add_value(
        "rss_with_backends",
        Unit::Mebibytes,
        mib(rss_backends),
        Some("rss_with_drones"),
    );
    report.add_value(
        "rss_per_backend",
        Unit::Kibibytes,
        rss_backends.saturating_sub(rss_drones) as f64 / 1024.0 / plan.backends as f64,
        None,
    );
    Ok(())
}

/// Phases 1, 3 and 4 (see the module docs); returns the RSS after the spawn burst.
async fn measure_with_drones(
    system: &System,
    plan: &Plan,
    ready_rx: &mut mpsc::UnboundedReceiver<ReadyReport>,
    report: &mut Report,
) -> anyhow::Result<u64> {
    let run = run_id();
    // Never executed: the drones are simulated.
    let executable: Executable = serde_json::from_value(serde_json::json!({"command": ["true"]}))
        .context("building the executable")?;

    // 1. Spawn burst.
    let burst = connect_burst(
        system,
        &executable,
        &format!("cp-{run}"),
        plan.backends,
        plan.concurrency,
    )
    .await?;
    let ready = collect_ready(ready_rx, &burst.sent_at).await?;
    let last_ready = ready
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or(burst.started);
    let to_ready: Vec<Duration> = ready
        .iter()
        .map(|(sent, at)| at.duration_since(*sent))
        .collect();
    let rss_backends = rss_bytes(Pid::This)?;
    report.add_millis("connect_call", &burst.outcome.latencies, Some("health"));
    report.add_millis("connect_to_ready", &to_ready, None);
    report.add_value(
        "spawns_per_s",
        Unit::PerSecond,
        plan.backends as f64 / last_ready.duration_since(burst.started).as_secs_f64(),
        None,
    );
    if burst.outcome.errors > 0 {
        report.note(format!("{} connect calls failed", burst.outcome.errors));
    }
    let health = health_calls(system, plan.backends, plan.concurrency).await?;
    report.add_millis("health", &health.latencies, None);

    // 3. Steady state (also the background rate of statements).
    let counting = Counting::start();
    let cpu_before = cpu_time(Pid::This)?;
    let window_start = Instant::now();
    tokio::time::sleep(plan.steady).await;
    let window = window_start.elapsed();
    let cpu = cpu_time(Pid::This)?.saturating_sub(cpu_before);
    report.add_value(
        "steady_cpu",
        Unit::Percent,
        cpu.as_secs_f64() / window.as_secs_f64() * 100.0,
        None,
    );
    let background = match counting {
        Ok(counting) => Some(counting.stop() as f64 / window.as_secs_f64()),
        Err(e) => {
            report.note(format!("statements not counted: {e}"));
            None
        }
    };
    if let Some(rate) = background {
        report.add_value("steady_statements_per_s", Unit::PerSecond, rate, None);
    }

    // 4. One at a time: unloaded latency and statements per connect.
    let m = plan.backends.min(SEQUENTIAL_CONNECTS);
    let counting = Counting::start().ok();
    let started = Instant::now();
    let one_by_one = connect_burst(system, &executable, &format!("cps-{run}"), m, 1).await?;
    let ready = collect_ready(ready_rx, &one_by_one.sent_at).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if let (Some(counting), Some(rate)) = (counting, background) {
        let statements = counting.stop() as f64 - rate * elapsed;
        report.add_value(
            "statements_per_connect",
            Unit::Count,
            statements / m as f64,
            None,
        );
    }
    let to_ready: Vec<Duration> = ready
        .iter()
        .map(|(sent, at)| at.duration_since(*sent))
        .collect();
    report.add_millis(
        "connect_to_ready_unloaded",
        &to_ready,
        Some("health_unloaded"),
    );
    let health = health_calls(system, m, 1).await?;
    report.add_millis("health_unloaded", &health.latencies, None);
    Ok(rss_backends)
}

/// `n` health calls from `concurrency` clients on a load thread.
async fn health_calls(
    system: &System,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<crate::http_load::LoadOutcome> {
    let url = system.controller_url();
    on_load_thread(move || async move {
        let client = ControllerClient::new(url).context("controller client")?;
        Ok(closed_loop(n, concurrency, |_| {
            let client = client.clone();
            async move {
                client.health().await.context("health call")?;
                Ok(())
            }
        })
        .await)
    })
    .await
}

struct Burst {
    started: Instant,
    /// When each key's connect call was sent.
    sent_at: HashMap<String, Instant>,
    outcome: crate::http_load::LoadOutcome,
}

/// `n` connects for keys `<prefix>-<i>` from `concurrency` clients (in this runtime: the fake drones'
/// acknowledgement times must be comparable with the send times).
async fn connect_burst(
    system: &System,
    executable: &Executable,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Burst> {
    let requests = (0..n)
        .map(|i| system.connect_request(&format!("{prefix}-{i}"), executable.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sent_at = Arc::new(Mutex::new(HashMap::with_capacity(n)));
    let started = Instant::now();
    let outcome = closed_loop(n, concurrency, |i| {
        let (client, request, sent_at) = (&system.client, &requests[i], sent_at.clone());
        async move {
            let sent = Instant::now();
            let response = client.connect(request).await.context("connect call")?;
            anyhow::ensure!(response.spawned, "connect did not spawn");
            // Only successful calls are waited for.
            sent_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(format!("{prefix}-{i}"), sent);
            Ok(())
        }
    })
    .await;
    let sent_at = std::mem::take(&mut *sent_at.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Burst {
        started,
        sent_at,
        outcome,
    })
}

/// Waits for a `ready` report of every key in `sent_at`; returns (sent, ready) instants.
async fn collect_ready(
    ready_rx: &mut mpsc::UnboundedReceiver<ReadyReport>,
    sent_at: &HashMap<String, Instant>,
) -> anyhow::Result<Vec<(Instant, Instant)>> {
    let mut out = Vec::with_capacity(sent_at.len());
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < sent_at.len() {
        let report = tokio::time::timeout_at(deadline, ready_rx.recv())
            .await
            .with_context(|| {
                format!(
                    "only {} of {} backends became ready within {WAIT:?}",
                    out.len(),
                    sent_at.len()
                )
            })?
            .context("every simulated drone stopped")?;
        if let Some(sent) = sent_at.get(&report.key) {
            out.push((*sent, report.at));
        }
    }
    Ok(out)
}
