//! The CI schedule: two short randomized fault schedules against real processes, a fixed seed and
//! a random one (printed, for replay with `cargo run -p hangar-chaos -- --seed <seed>`). Needs
//! PostgreSQL's server binaries (the harness runs a server of its own, which faults stop); without
//! them the test passes vacuously outside CI (`CI` unset).

use hangar_chaos::postgres::PostgresServer;
use hangar_chaos::run::{run_once, RunConfig, CONVERGENCE_BOUND};
use hangar_chaos::schedule::Shape;
use std::sync::Arc;
use std::time::Duration;

/// Both runs together stay well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(400);
const FIXED_SEED: u64 = 17;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_randomized_schedules_keep_every_promise() {
    let postgres = match PostgresServer::start().await {
        Ok(server) => Arc::new(server),
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "a PostgreSQL server of the harness's own is required in CI: {error:#}"
            );
            return;
        }
    };
    // Under CI the Docker engine and the test image are there (`.ci/run` builds it).
    let docker_drones = usize::from(hangar_chaos::cluster::docker_ready().await);
    assert!(
        docker_drones == 1 || std::env::var_os("CI").is_none(),
        "the Docker drone needs the engine and {} in CI",
        hangar_chaos::cluster::DOCKER_IMAGE
    );
    let random_seed: u64 = rand::random();
    println!("hangar-chaos CI schedule: seeds {FIXED_SEED} and {random_seed}");
    let mut config = RunConfig {
        seed: FIXED_SEED,
        shape: Shape {
            controllers: 2,
            drones: 3,
            docker_drones,
            proxies: 2,
            faults: 5,
            window: Duration::from_secs(12),
            max_fault: Duration::from_secs(5),
            long_pause: false,
        },
        keys: 2,
        convergence_bound: CONVERGENCE_BOUND,
        postgres: postgres.clone(),
        hangar: hangar_chaos::workspace_binary("hangar").expect("hangar binary"),
        test_backend: hangar_chaos::workspace_binary("hangar-test-backend")
            .expect("hangar-test-backend binary"),
        shim: env!("CARGO_BIN_EXE_hangar-chaos").into(),
    };
    let outcome = tokio::time::timeout(TEST_TIMEOUT, async {
        for seed in [FIXED_SEED, random_seed] {
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
