//! The CI schedule: two short randomized fault schedules against real processes, a fixed seed and
//! a random one (printed, for replay with `cargo run -p hangar-chaos -- --seed <seed>`). Needs
//! `HANGAR_TEST_POSTGRES_URL`; without it the test passes vacuously outside CI (`CI` unset).

use hangar_chaos::run::{run_once, RunConfig, CONVERGENCE_BOUND};
use hangar_chaos::schedule::Shape;
use std::time::Duration;

/// Both runs together stay well inside this.
const TEST_TIMEOUT: Duration = Duration::from_secs(400);
const FIXED_SEED: u64 = 17;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_randomized_schedules_keep_every_promise() {
    let Ok(postgres_url) = std::env::var("HANGAR_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "HANGAR_TEST_POSTGRES_URL is required in CI"
        );
        return;
    };
    let random_seed: u64 = rand::random();
    println!("hangar-chaos CI schedule: seeds {FIXED_SEED} and {random_seed}");
    let mut config = RunConfig {
        seed: FIXED_SEED,
        shape: Shape {
            controllers: 2,
            drones: 3,
            faults: 5,
            window: Duration::from_secs(12),
            max_fault: Duration::from_secs(5),
        },
        keys: 2,
        convergence_bound: CONVERGENCE_BOUND,
        postgres_url,
        hangar: hangar_chaos::workspace_binary("hangar").expect("hangar binary"),
        test_backend: hangar_chaos::workspace_binary("hangar-test-backend")
            .expect("hangar-test-backend binary"),
    };
    tokio::time::timeout(TEST_TIMEOUT, async {
        for seed in [FIXED_SEED, random_seed] {
            config.seed = seed;
            let report = run_once(&config)
                .await
                .expect("the run could not be set up");
            println!(
                "seed {seed}: {} faults {:?}, {} answers, {} connects, recovery {:?}",
                report.schedule.len(),
                report.faults_by_kind,
                report.history.answers.len(),
                report.history.connects.len(),
                report.recovery
            );
            assert!(report.violations.is_empty(), "{}", report.explain());
            assert!(
                !report.history.answers.is_empty(),
                "the load never got an answer: the run proved nothing"
            );
        }
    })
    .await
    .expect("the CI schedule timed out");
}
