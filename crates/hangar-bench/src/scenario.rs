//! The scenarios and their options. Each scenario module documents what it measures and against which
//! baseline; [`run`] dispatches and fills in the ratios.

pub mod control_plane;
pub mod proxy_http;
pub mod proxy_ws;
pub mod reconnect;
pub mod spawn;
pub mod spawn_warm;

use crate::report::{Metric, Report};
use crate::system::StoreKind;
use anyhow::Context;
use hangar_types::executable::{Executable, ExecutorKind};
use std::future::Future;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Spawn,
    Reconnect,
    ProxyHttp,
    ProxyWs,
    ControlPlane,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Spawn,
        Scenario::Reconnect,
        Scenario::ProxyHttp,
        Scenario::ProxyWs,
        Scenario::ControlPlane,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Spawn => "spawn",
            Scenario::Reconnect => "reconnect",
            Scenario::ProxyHttp => "proxy-http",
            Scenario::ProxyWs => "proxy-ws",
            Scenario::ControlPlane => "control-plane",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown scenario {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Sizes and choices; `None` means the scenario's default (sized to finish in a few minutes on two
/// cores).
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Samples: spawns (`spawn`), calls (`reconnect`), requests per target (`proxy-http`), WebSocket
    /// connections (`proxy-ws`), backends (`control-plane`).
    pub n: Option<usize>,
    /// Concurrent clients (connections for the proxy scenarios).
    pub concurrency: Option<usize>,
    /// The controller's store; `reconnect` runs both stores when not given.
    pub store: Option<StoreKind>,
    /// Executor of the `spawn` scenario (default: process).
    pub executor: Option<ExecutorKind>,
    /// Simulated drones of `control-plane`.
    pub drones: Option<usize>,
    /// Round trips per WebSocket in `proxy-ws`.
    pub round_trips: Option<usize>,
    /// `proxy-http`: the N requests of each target are sent in this many rounds, the targets taking
    /// turns round by round, so a machine that speeds up or slows down during the run moves every
    /// target alike.
    pub rounds: Option<usize>,
    /// Idle WebSockets held open for the memory reading of `proxy-ws`.
    pub idle_tunnels: Option<usize>,
    /// Length of the steady-state CPU window of `control-plane`, in seconds.
    pub steady_seconds: Option<u64>,
    /// `spawn` and `proxy-http` run a second time with a test backend writing this many lines a
    /// second (`logging_*` metrics, compared with the same metric of the quiet run).
    pub backend_logs_per_s: Option<u32>,
    /// `spawn` measures warm-pool claims instead ([`spawn_warm`]).
    pub warm: bool,
}

tokio::task_local! {
    /// Extra environment of every test backend the scenario running in this task starts (the
    /// logging run of `--backend-logs-per-s`), so the scenarios need no parameter for it.
    static BACKEND_ENV: Vec<(String, String)>;
}

/// Runs one scenario (twice for `--backend-logs-per-s`) and computes the ratios of its report.
pub async fn run(scenario: Scenario, options: &BenchOptions) -> anyhow::Result<Report> {
    let mut report = run_once(scenario, options).await?;
    let logs_per_s = options
        .backend_logs_per_s
        .filter(|_| matches!(scenario, Scenario::Spawn | Scenario::ProxyHttp));
    if let Some(rate) = logs_per_s {
        let env = vec![("TEST_BACKEND_LOG_LINES_PER_S".to_string(), rate.to_string())];
        let logging = BACKEND_ENV.scope(env, run_once(scenario, options)).await?;
        add_logging_run(&mut report, logging, rate);
    }
    report.compute_ratios();
    Ok(report)
}

/// The metrics of the run whose backends logged, as `logging_<name>` with the quiet run's `<name>`
/// as their baseline.
fn add_logging_run(report: &mut Report, logging: Report, rate: u32) {
    report.param("backend_logs_per_s", rate);
    for metric in logging.metrics {
        report.metrics.push(Metric {
            name: format!("logging_{}", metric.name),
            baseline: Some(metric.name),
            ratio: None,
            ..metric
        });
    }
    for note in logging.notes {
        report.note(format!("logging run: {note}"));
    }
    report.note(format!(
        "logging_*: the same scenario run again with backends writing {rate} lines/s to stdout \
         (captured by the drone); ratio = logging / quiet, target ≤ 1.05 for times, ≥ 0.95 for rates"
    ));
}

async fn run_once(scenario: Scenario, options: &BenchOptions) -> anyhow::Result<Report> {
    let report = match scenario {
        Scenario::Spawn if options.warm => spawn_warm::run(options).await,
        Scenario::Spawn => spawn::run(options).await,
        Scenario::Reconnect => reconnect::run(options).await,
        Scenario::ProxyHttp => proxy_http::run(options).await,
        Scenario::ProxyWs => proxy_ws::run(options).await,
        Scenario::ControlPlane => control_plane::run(options).await,
    }
    .with_context(|| format!("scenario {} failed", scenario.as_str()))?;
    Ok(report)
}

/// The test backend as a process executable, with `env`.
fn test_backend_executable(env: &[(&str, &str)]) -> anyhow::Result<Executable> {
    let binary = crate::binaries::test_backend()?;
    let extra = BACKEND_ENV.try_with(Clone::clone).unwrap_or_default();
    let env: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .chain(extra.into_iter().map(|(k, v)| (k, v.into())))
        .collect();
    serde_json::from_value(serde_json::json!({
        "command": [binary.to_string_lossy()],
        "env": env,
    }))
    .context("building the test backend executable")
}

/// Runs `make()`'s future on a fresh thread with a current-thread runtime of its own: load generators
/// run there so they do not share worker threads with the in-process system.
async fn on_load_thread<T, F, Fut>(make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the load thread's runtime")?;
        runtime.block_on(make())
    })
    .await
    .context("load thread failed")?
}

/// A run id for key names, so reruns against a reused database never collide.
fn run_id() -> String {
    hangar_types::names::random_string()
}

/// Calls `call(i)` for every `i` in `0..n` from `concurrency` loops that each start the next call as
/// soon as their previous one returns; records the latency of each successful call.
async fn closed_loop<F, Fut>(n: usize, concurrency: usize, call: F) -> crate::http_load::LoadOutcome
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let started = std::time::Instant::now();
    let loops = (0..concurrency.max(1)).map(|_| async {
        let mut latencies = Vec::new();
        let mut errors = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let sent = std::time::Instant::now();
            match call(i).await {
                Ok(()) => latencies.push(sent.elapsed()),
                Err(e) => errors.push(e),
            }
        }
        (latencies, errors)
    });
    let results = futures_util::future::join_all(loops).await;
    let mut outcome = crate::http_load::LoadOutcome {
        elapsed: started.elapsed(),
        ..Default::default()
    };
    for (latencies, errors) in results {
        outcome.latencies.extend(latencies);
        outcome.errors += errors.len();
        if let Some(e) = errors.first() {
            tracing::warn!(error = format!("{e:#}"), "A call failed");
        }
    }
    outcome
}
