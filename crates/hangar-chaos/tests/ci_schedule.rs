//! The CI schedules against real processes: two short randomized fault schedules, a fixed seed and a
//! random one (printed, for replay with `cargo run -p hangar-chaos -- --seed <seed>`), and one
//! schedule that freezes a drone past the key lease (seed 5001 of `--long-pause`, which once let a lost
//! backend answer beside its successor). Needs PostgreSQL's server binaries (the harness runs a server
//! of its own, which faults stop); without them the tests pass vacuously outside CI (`CI` unset).

use hangar_chaos::postgres::PostgresServer;
use hangar_chaos::run::{run_once, RunConfig, CONVERGENCE_BOUND};
use hangar_chaos::schedule::Shape;
use std::sync::Arc;
use std::time::Duration;

/// The runs of one test together stay well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(400);
const FIXED_SEED: u64 = 17;
const LONG_PAUSE_SEED: u64 = 5001;

/// A PostgreSQL server and the configuration of a CI-sized run (`None` outside CI without the
/// server binaries).
async fn ci_config(long_pause: bool) -> Option<RunConfig> {
    let postgres = match PostgresServer::start().await {
        Ok(server) => Arc::new(server),
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "a PostgreSQL server of the harness's own is required in CI: {error:#}"
            );
            return None;
        }
    };
    // Under CI the Docker engine and the test image are there (`.ci/run` builds it).
    let docker_drones = usize::from(hangar_chaos::cluster::docker_ready().await);
    assert!(
        docker_drones == 1 || std::env::var_os("CI").is_none(),
        "the Docker drone needs the engine and {} in CI",
        hangar_chaos::cluster::DOCKER_IMAGE
    );
    Some(RunConfig {
        seed: FIXED_SEED,
        shape: Shape {
            controllers: 2,
            drones: 3,
            docker_drones,
            proxies: 2,
            faults: if long_pause { 4 } else { 5 },
            window: Duration::from_secs(12),
            max_fault: Duration::from_secs(5),
            long_pause,
        },
        // The long-pause schedule as `cargo run -p hangar-chaos -- --long-pause …` ran it (3 keys).
        keys: if long_pause { 3 } else { 2 },
        convergence_bound: CONVERGENCE_BOUND,
        postgres,
        hangar: hangar_chaos::workspace_binary("hangar").expect("hangar binary"),
        test_backend: hangar_chaos::workspace_binary("hangar-test-backend")
            .expect("hangar-test-backend binary"),
        shim: env!("CARGO_BIN_EXE_hangar-chaos").into(),
    })
}

/// Runs `seeds` one after the other; every run must keep every promise and see answers.
async fn run_seeds(mut config: RunConfig, seeds: &[u64]) {
    let postgres = config.postgres.clone();
    let outcome = tokio::time::timeout(TEST_TIMEOUT, async {
        for &seed in seeds {
            config.seed = seed;
            let report = run_once(&config)
                .await
                .expect("the run could not be set up");
            println!("{}", report.summary());
            assert!(report.violations.is_empty(), "{}", report.explain());
            assert!(
                !report.history.answers.is_empty(),
                "the load never got an answer: the run proved nothing"
            );
        }
    })
    .await;
    postgres.stop().await;
    outcome.expect("the CI schedule timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_randomized_schedules_keep_every_promise() {
    let Some(config) = ci_config(false).await else {
        return;
    };
    let random_seed: u64 = rand::random();
    println!("hangar-chaos CI schedule: seeds {FIXED_SEED} and {random_seed}");
    run_seeds(config, &[FIXED_SEED, random_seed]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_frozen_past_its_key_lease_never_leaves_two_writers() {
    let Some(config) = ci_config(true).await else {
        return;
    };
    run_seeds(config, &[LONG_PAUSE_SEED]).await;
}
