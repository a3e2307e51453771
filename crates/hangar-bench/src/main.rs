//! `hangar-bench <scenario> [--n N] [--concurrency C] [--store sqlite|postgres] [--warm] [--out FILE]`: runs one
//! benchmark scenario (or `all`), prints a table and optionally writes the JSON report. See
//! `BENCHMARKS.md` at the repository root.

use anyhow::Context;
use clap::Parser;
use hangar_bench::{BenchOptions, Report, Scenario, StoreKind};
use hangar_types::executable::ExecutorKind;
use std::path::PathBuf;
use std::process::ExitCode;

/// The shipped `hangar` binary's allocator: the controller, drone and store that scenarios run in
/// this process allocate as they do there (the baselines of the same run use it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "hangar-bench",
    about = "Measure Hangar against baselines in the same run: spawn, reconnect, proxy-http, proxy-ws, control-plane"
)]
struct Args {
    /// spawn | reconnect | proxy-http | proxy-ws | control-plane | all
    scenario: String,
    /// Samples: spawns, calls, requests per target, WebSockets or backends (scenario default when absent).
    #[arg(long)]
    n: Option<usize>,
    /// Concurrent clients or connections.
    #[arg(long)]
    concurrency: Option<usize>,
    /// The controller's store (`reconnect` runs both when absent and HANGAR_TEST_POSTGRES_URL is set).
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Executor for `spawn`: process or docker.
    #[arg(long, value_parser = parse_executor)]
    executor: Option<ExecutorKind>,
    /// `spawn`: measure warm-pool claims (with and without a claim hook) beside cold spawns and
    /// reconnects of the same run.
    #[arg(long)]
    warm: bool,
    /// Simulated drones for `control-plane`.
    #[arg(long)]
    drones: Option<usize>,
    /// Round trips per WebSocket for `proxy-ws`.
    #[arg(long)]
    round_trips: Option<usize>,
    /// `proxy-http`: send each target's N requests in this many rounds, the targets taking turns
    /// (default 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Idle WebSockets `proxy-ws` holds open for its memory reading (default 5000).
    #[arg(long)]
    idle_tunnels: Option<usize>,
    /// Steady-state window of `control-plane`, in seconds.
    #[arg(long)]
    steady_seconds: Option<u64>,
    /// `spawn` and `proxy-http`: run again with a test backend that writes this many lines a second
    /// to stdout, and report that run's metrics as `logging_*` beside the quiet run's (the ratio is
    /// the cost of log capture; target ≤ 5 % slower).
    #[arg(long)]
    backend_logs_per_s: Option<u32>,
    /// Write the JSON report here (an array of reports for `all`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_executor(s: &str) -> Result<ExecutorKind, String> {
    match s {
        "process" => Ok(ExecutorKind::Process),
        "docker" => Ok(ExecutorKind::Docker),
        other => Err(format!(
            "unknown executor {other:?}: expected process or docker"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    hangar_bench::sql_statements::install_tracing();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hangar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let scenarios = if args.scenario == "all" {
        Scenario::ALL.to_vec()
    } else {
        vec![args
            .scenario
            .parse::<Scenario>()
            .map_err(anyhow::Error::msg)?]
    };
    let options = BenchOptions {
        n: args.n,
        concurrency: args.concurrency,
        store: args.store,
        executor: args.executor,
        drones: args.drones,
        round_trips: args.round_trips,
        rounds: args.rounds,
        idle_tunnels: args.idle_tunnels,
        steady_seconds: args.steady_seconds,
        backend_logs_per_s: args.backend_logs_per_s,
        warm: args.warm,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let mut reports: Vec<Report> = Vec::new();
    for scenario in scenarios {
        eprintln!("hangar-bench: running {}", scenario.as_str());
        let report = runtime.block_on(hangar_bench::run(scenario, &options))?;
        println!("{}", report.table());
        reports.push(report);
    }
    if let Some(path) = &args.out {
        let json = if reports.len() == 1 {
            serde_json::to_string_pretty(&reports[0])
        } else {
            serde_json::to_string_pretty(&reports)
        }
        .context("encoding the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("hangar-bench: wrote {}", path.display());
    }
    Ok(())
}
