//! `cargo run -p hangar-chaos -- [--runs N] [--seed S] [--faults F]`: runs N seeded fault schedules
//! (seeds S, S+1, …; random S when absent) against real Hangar processes and prints the figures:
//! faults by kind, violations, recovery time p50/p99. Needs PostgreSQL's server binaries (`initdb`,
//! `pg_ctl`): the harness runs a server of its own so that it can stop it.
//!
//! `hangar-chaos shim` is not for people: the drones start it in front of every backend (the proxy ↔
//! backend fault relay, `shim.rs`).

use clap::Parser;
use hangar_chaos::postgres::PostgresServer;
use hangar_chaos::run::{run_once, RunConfig};
use hangar_chaos::schedule::Shape;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "hangar-chaos")]
struct Args {
    /// Schedules to run.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Seed of the first schedule; random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Faults per schedule.
    #[arg(long, default_value_t = 8)]
    faults: usize,
    /// Window in seconds in which faults start.
    #[arg(long, default_value_t = 20)]
    window: u64,
    /// Drones with the Docker executor beside the 3 process drones (default: 1 where the engine,
    /// the test image and root are there, else 0).
    #[arg(long)]
    docker_drones: Option<usize>,
    /// Longest fault in seconds (above 60, a pause outlives the key lease).
    #[arg(long, default_value_t = 8)]
    max_fault: u64,
    /// Also freeze one drone per schedule for longer than the 60 s key lease (65–75 s).
    #[arg(long)]
    long_pause: bool,
    /// Schedules run at once, each worker with a PostgreSQL server of its own.
    #[arg(long, default_value_t = 1)]
    jobs: u64,
}

/// What the workers found, together.
#[derive(Default)]
struct Totals {
    kinds: BTreeMap<&'static str, usize>,
    recoveries: Vec<Duration>,
    failed: u64,
    not_started: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    if std::env::args().nth(1).as_deref() == Some("shim") {
        return hangar_chaos::shim::run().await;
    }
    let args = Arc::new(Args::parse());
    let first = args.seed.unwrap_or_else(rand::random);
    let docker_drones = match args.docker_drones {
        Some(n) => n,
        None => usize::from(hangar_chaos::cluster::docker_ready().await),
    };
    println!(
        "hangar-chaos: {} schedules from seed {first}, {} at once, {docker_drones} Docker drone(s)",
        args.runs, args.jobs
    );
    let shape = Shape {
        controllers: 2,
        drones: 3,
        docker_drones,
        proxies: 2,
        faults: args.faults,
        window: Duration::from_secs(args.window),
        max_fault: Duration::from_secs(args.max_fault),
        long_pause: args.long_pause,
    };
    let next = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.jobs.max(1) {
        let (next, totals) = (next.clone(), totals.clone());
        let runs = args.runs;
        workers.spawn(async move {
            let postgres = Arc::new(PostgresServer::start().await?);
            let config = RunConfig {
                seed: first,
                shape,
                keys: 3,
                convergence_bound: hangar_chaos::run::CONVERGENCE_BOUND,
                postgres: postgres.clone(),
                hangar: hangar_chaos::workspace_binary("hangar")?,
                test_backend: hangar_chaos::workspace_binary("hangar-test-backend")?,
                shim: std::env::current_exe()?,
            };
            let outcome = worker(config, runs, &next, &totals).await;
            postgres.stop().await;
            outcome
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let mut totals = std::mem::take(&mut *totals.lock().unwrap_or_else(|p| p.into_inner()));
    totals.recoveries.sort();
    let r = &totals.recoveries;
    let pct = |p: usize| r.get((r.len().saturating_sub(1)) * p / 100);
    println!(
        "runs {}, runs with violations {}, runs that could not start {}",
        args.runs, totals.failed, totals.not_started
    );
    println!("faults by kind: {:?}", totals.kinds);
    println!("recovery p50 {:?}, p99 {:?}", pct(50), pct(99));
    Ok(if totals.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs schedules (seeds `config.seed + i`) until `runs` have been taken by all workers.
async fn worker(
    mut config: RunConfig,
    runs: u64,
    next: &AtomicU64,
    totals: &Mutex<Totals>,
) -> anyhow::Result<()> {
    let first = config.seed;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= runs {
            return Ok(());
        }
        config.seed = first.wrapping_add(i);
        // A run that could not even start (e.g. the cluster never became ready on an overloaded
        // machine) proves nothing either way: counted and reported, and the next one starts.
        let report = match run_once(&config).await {
            Ok(report) => report,
            Err(error) => {
                println!("run {i} seed {}: not started: {error:#}", config.seed);
                totals.lock().unwrap_or_else(|p| p.into_inner()).not_started += 1;
                continue;
            }
        };
        println!("run {i} {}", report.summary());
        if !report.violations.is_empty() {
            println!("{}", report.explain());
        }
        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, n) in &report.faults_by_kind {
            *t.kinds.entry(kind).or_insert(0) += n;
        }
        t.recoveries.extend(report.recovery);
        t.failed += u64::from(!report.violations.is_empty());
    }
}
