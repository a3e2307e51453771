//! `cargo run -p hangar-chaos -- [--runs N] [--seed S] [--faults F]`: runs N seeded fault schedules
//! (seeds S, S+1, …; random S when absent) against real Hangar processes and prints the figures:
//! faults by kind, violations, recovery time p50/p99. Needs `HANGAR_TEST_POSTGRES_URL`.

use anyhow::Context;
use clap::Parser;
use hangar_chaos::run::{run_once, RunConfig};
use hangar_chaos::schedule::Shape;
use std::collections::BTreeMap;
use std::process::ExitCode;
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
    /// Longest fault in seconds (above 60, a pause outlives the key lease).
    #[arg(long, default_value_t = 8)]
    max_fault: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let postgres_url = std::env::var("HANGAR_TEST_POSTGRES_URL")
        .context("HANGAR_TEST_POSTGRES_URL must name a PostgreSQL server")?;
    let first = args.seed.unwrap_or_else(rand::random);
    let mut config = RunConfig {
        seed: first,
        shape: Shape {
            controllers: 2,
            drones: 3,
            faults: args.faults,
            window: Duration::from_secs(args.window),
            max_fault: Duration::from_secs(args.max_fault),
        },
        keys: 3,
        convergence_bound: hangar_chaos::run::CONVERGENCE_BOUND,
        postgres_url,
        hangar: hangar_chaos::workspace_binary("hangar")?,
        test_backend: hangar_chaos::workspace_binary("hangar-test-backend")?,
    };
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut recoveries = Vec::new();
    let mut failed = 0;
    for i in 0..args.runs {
        config.seed = first.wrapping_add(i);
        let report = run_once(&config).await?;
        for (kind, n) in &report.faults_by_kind {
            *kinds.entry(kind).or_insert(0) += n;
        }
        recoveries.extend(report.recovery);
        println!(
            "run {i} seed {}: {} faults, {} answers, {} connects, recovery {:?}, {} violations",
            report.seed,
            report.schedule.len(),
            report.history.answers.len(),
            report.history.connects.len(),
            report.recovery,
            report.violations.len()
        );
        if !report.violations.is_empty() {
            failed += 1;
            println!("{}", report.explain());
        }
    }
    recoveries.sort();
    let pct = |p: usize| recoveries.get((recoveries.len().saturating_sub(1)) * p / 100);
    println!("runs {}, runs with violations {failed}", args.runs);
    println!("faults by kind: {kinds:?}");
    println!("recovery p50 {:?}, p99 {:?}", pct(50), pct(99));
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
