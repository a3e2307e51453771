//! One run: a fresh database, the cluster, the load, the seeded faults (overlapping ones combined),
//! the wait for convergence after the last heal, and the checker's verdict.

use crate::cluster::{Cluster, ClusterConfig};
use crate::history::{check, History, LiveSnapshot, Violation};
use crate::load::{
    lock, run_load_loop, LoadLoop, LoadTarget, LoopKind, Recorded, DOCKER_KEY_PREFIX, RUN_VAR,
};
use crate::postgres::PostgresServer;
use crate::schedule::{draw, Shape, Step};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The promised bound from the last heal to convergence. A killed drone's backends are
/// recovered from its state file when it restarts; the bound leaves room for a key lease
/// (60 s) held by a backend that a fault stopped.
pub const CONVERGENCE_BOUND: Duration = Duration::from_secs(90);

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub shape: Shape,
    pub keys: usize,
    /// Promise: after the last heal, the system converges within this.
    pub convergence_bound: Duration,
    /// The harness's own PostgreSQL server; a fresh database is made in it for every run.
    pub postgres: Arc<PostgresServer>,
    pub hangar: PathBuf,
    pub test_backend: PathBuf,
    /// `hangar-chaos` itself (its `shim` command relays in front of every backend).
    pub shim: PathBuf,
}

/// What a run found.
#[derive(Debug)]
pub struct RunReport {
    pub seed: u64,
    pub schedule: Vec<Step>,
    pub history: History,
    pub violations: Vec<Violation>,
    /// From the last heal to convergence.
    pub recovery: Option<Duration>,
    pub faults_by_kind: BTreeMap<&'static str, usize>,
    /// The components' logs of a run with violations (kept; removed otherwise).
    pub kept_logs: Option<PathBuf>,
}

impl RunReport {
    /// One line: the seed, faults, what the load saw (answers per key) and the verdict.
    pub fn summary(&self) -> String {
        let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &self.history.answers {
            *per_key.entry(a.key.as_str()).or_insert(0) += 1;
        }
        format!(
            "seed {}: {} faults {:?}, {} connects, answers per key {per_key:?}, recovery {:?}, {} violations",
            self.seed,
            self.schedule.len(),
            self.faults_by_kind,
            self.history.connects.len(),
            self.recovery,
            self.violations.len()
        )
    }

    /// Seed, schedule and the offending history, for replaying a failed run.
    pub fn explain(&self) -> String {
        let mut text = format!(
            "seed {} (replay: cargo run -p hangar-chaos -- --seed {})\nschedule:\n",
            self.seed, self.seed
        );
        for s in &self.schedule {
            text.push_str(&format!(
                "  at {:?} for {:?}: {:?}\n",
                s.at, s.duration, s.fault
            ));
        }
        text.push_str("violations:\n");
        for v in &self.violations {
            text.push_str(&format!("  {v:?}\n"));
        }
        let keys: Vec<&str> = self
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::TwoWriters { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        for a in self
            .history
            .answers
            .iter()
            .filter(|a| keys.contains(&a.key.as_str()))
        {
            text.push_str(&format!("  answer {a:?}\n"));
        }
        text.push_str(&format!(
            "final live sets: {:?}\n",
            self.history.final_snapshot
        ));
        if let Some(logs) = &self.kept_logs {
            text.push_str(&format!("component logs: {}\n", logs.display()));
        }
        text
    }
}

/// A fresh database on the server, dropped by [`drop_database`].
async fn create_database(server: &str) -> anyhow::Result<(url::Url, String)> {
    let name = format!("hangar_chaos_{}", random_id());
    let pool = sqlx::PgPool::connect(server)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await?;
    pool.close().await;
    let mut url = url::Url::parse(server)?;
    url.set_path(&format!("/{name}"));
    Ok((url, name))
}

async fn drop_database(server: &str, name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(server).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&pool)
            .await;
        pool.close().await;
    }
}

fn random_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..10)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Runs one schedule end to end.
pub async fn run_once(config: &RunConfig) -> anyhow::Result<RunReport> {
    let schedule = draw(config.seed, &config.shape);
    let server = config.postgres.url();
    let (database_url, database) = create_database(&server).await?;
    let dir = tempfile::tempdir()?;
    let run_id = random_id();
    let migrate = tokio::process::Command::new(&config.hangar)
        .args(["migrate", "--db", database_url.as_str()])
        .output()
        .await?;
    anyhow::ensure!(
        migrate.status.success(),
        "hangar migrate failed: {migrate:?}"
    );
    let cluster = Cluster::start(ClusterConfig {
        hangar: config.hangar.clone(),
        test_backend: config.test_backend.clone(),
        shim: config.shim.clone(),
        postgres: config.postgres.clone(),
        database_url,
        controllers: config.shape.controllers,
        drones: config.shape.drones,
        docker_drones: config.shape.docker_drones,
        proxies: config.shape.proxies,
        dir: dir.path().to_path_buf(),
        run_id: run_id.clone(),
    })
    .await?;
    let cluster = Arc::new(AsyncMutex::new(cluster));
    let outcome = drive(config, &schedule, cluster.clone(), run_id).await;
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.into_inner().shutdown().await;
    }
    // A fault may have left the server stopped only if the run failed midway; start it for the next.
    let _ = config.postgres.start_server().await;
    drop_database(&server, &database).await;
    let history = outcome?;
    let violations = check(
        &history,
        u64::try_from(config.convergence_bound.as_millis()).unwrap_or(u64::MAX),
    );
    let recovery = match (history.faults_healed_ms, history.converged_ms) {
        (Some(h), Some(c)) => Some(Duration::from_millis(c.saturating_sub(h))),
        _ => None,
    };
    let mut faults_by_kind = BTreeMap::new();
    for s in &schedule {
        *faults_by_kind.entry(s.fault.kind()).or_insert(0) += 1;
    }
    // Traced runs keep their logs too, to read where a long recovery went.
    let kept_logs = (!violations.is_empty() || tracing_enabled()).then(|| dir.keep());
    if tracing_enabled() {
        if let Some(logs) = &kept_logs {
            eprintln!("logs kept in {}", logs.display());
        }
    }
    Ok(RunReport {
        seed: config.seed,
        schedule,
        history,
        violations,
        recovery,
        faults_by_kind,
        kept_logs,
    })
}

/// Waits for the system, runs load and faults, then waits for convergence.
async fn drive(
    config: &RunConfig,
    schedule: &[Step],
    cluster: Arc<AsyncMutex<Cluster>>,
    run_id: String,
) -> anyhow::Result<History> {
    let (controllers, target) = {
        let c = cluster.lock().await;
        let (command, shim_env) = c.backend_command();
        let mut env: serde_json::Map<String, serde_json::Value> = shim_env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        env.insert(RUN_VAR.into(), run_id.into());
        let target = LoadTarget {
            http: reqwest::Client::new(),
            cluster: c.cluster(),
            proxies: c.proxy_addrs(),
            next_proxy: Default::default(),
            command,
            env,
            origin: Instant::now(),
        };
        (c.controller_urls(), target)
    };
    let mut keys: Vec<String> = (0..config.keys).map(|k| format!("chaos-key-{k}")).collect();
    if config.shape.docker_drones > 0 {
        keys.push(format!("{DOCKER_KEY_PREFIX}0"));
    }
    // Ready: every key served through every controller before faults begin.
    converge(
        &target,
        &controllers,
        &keys,
        &cluster,
        Duration::from_secs(60),
    )
    .await
    .map_err(|last| anyhow::anyhow!("the cluster never became ready: {last:?}"))?;
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Requests for every key through every controller; one WebSocket per key, the keys dealt out
    // over the controllers.
    let requests = controllers.iter().enumerate().flat_map(|(i, url)| {
        keys.iter().map(move |key| LoadLoop {
            kind: LoopKind::Requests,
            controller: (i, url.clone()),
            key: key.clone(),
        })
    });
    let websockets = keys.iter().enumerate().map(|(k, key)| {
        let i = k % controllers.len();
        LoadLoop {
            kind: LoopKind::WebSocket,
            controller: (i, controllers[i].clone()),
            key: key.clone(),
        }
    });
    for spec in requests.chain(websockets) {
        tasks.spawn(run_load_loop(
            target.clone(),
            spec,
            recorded.clone(),
            stop.clone(),
        ));
    }
    let faults = TaskTracker::new();
    for step in schedule.iter().cloned() {
        let cluster = cluster.clone();
        let target = target.clone();
        faults.spawn(async move {
            tokio::time::sleep(step.at).await;
            let _ = cluster.lock().await.inject(step.fault).await;
            trace_fault(&target, "injected", &step.fault);
            tokio::time::sleep(step.duration).await;
            let _ = cluster.lock().await.heal(step.fault).await;
            trace_fault(&target, "healed", &step.fault);
        });
    }
    faults.close();
    faults.wait().await;
    let faults_healed_ms = target.elapsed_ms();
    let converged = converge(
        &target,
        &controllers,
        &keys,
        &cluster,
        config.convergence_bound,
    )
    .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let recorded = std::mem::take(&mut *lock(&recorded));
    let (converged_ms, final_snapshot) = match converged {
        Ok(snapshot) => (Some(snapshot.at_ms), snapshot),
        Err(snapshot) => (None, snapshot),
    };
    Ok(History {
        answers: recorded.answers,
        connects: recorded.connects,
        faults_healed_ms: Some(faults_healed_ms),
        converged_ms,
        final_snapshot,
    })
}

/// `HANGAR_CHAOS_TRACE=1`: prints when each fault was injected and healed and (in [`converge`]) what
/// convergence waits for, and keeps the components' logs, to see where a long recovery goes.
fn tracing_enabled() -> bool {
    std::env::var_os("HANGAR_CHAOS_TRACE").is_some()
}

fn trace_fault(target: &LoadTarget, what: &str, fault: &impl std::fmt::Debug) {
    if tracing_enabled() {
        eprintln!("at {} ms: {what} {fault:?}", target.elapsed_ms());
    }
}

/// Polls until every key connects through every controller, is answered through every proxy by the
/// backend the connect named, and the live sets agree; `Err` with the last snapshot after `bound`.
async fn converge(
    target: &LoadTarget,
    controllers: &[String],
    keys: &[String],
    cluster: &AsyncMutex<Cluster>,
    bound: Duration,
) -> Result<LiveSnapshot, LiveSnapshot> {
    let deadline = Instant::now() + bound;
    let mut last = LiveSnapshot::default();
    let trace = tracing_enabled();
    let mut traced = String::new();
    loop {
        // A component that exited on its own (e.g. a controller started while its database link was
        // down) is started again, as its supervisor would.
        match cluster.lock().await.restart_exited() {
            Ok(exited) => {
                for component in exited {
                    eprintln!("restarted a component that had exited on its own: {component}");
                }
            }
            Err(error) => eprintln!("cannot restart an exited component: {error:#}"),
        }
        match serves_every_key(target, controllers, keys).await {
            Ok(()) => {
                let c = cluster.lock().await;
                let at_ms = target.elapsed_ms();
                let reported = c.reported_live().await.unwrap_or_default();
                last = LiveSnapshot {
                    at_ms,
                    reported,
                    running: c.running_backends(),
                    waiting_for: String::new(),
                };
                if last.reported == last.running {
                    return Ok(last);
                }
                last.waiting_for = "the live sets to agree".into();
            }
            Err(waiting_for) => last.waiting_for = waiting_for,
        }
        if trace && last.waiting_for != traced {
            eprintln!(
                "at {} ms: convergence waits for {}",
                target.elapsed_ms(),
                last.waiting_for
            );
            traced = last.waiting_for.clone();
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `Err` says what is not served yet.
async fn serves_every_key(
    target: &LoadTarget,
    controllers: &[String],
    keys: &[String],
) -> Result<(), String> {
    for controller in controllers {
        for key in keys {
            let (outcome, got) = target.connect(controller, key).await;
            let Some((backend, url)) = got else {
                return Err(format!("connect {key} via {controller}: {outcome:?}"));
            };
            for proxy in &target.proxies {
                match target.request_via(key, &url, *proxy).await {
                    Some(answer) if answer.backend == backend => {}
                    other => {
                        return Err(format!(
                            "{key} via proxy {proxy}: wanted {backend}, got {other:?}"
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}
