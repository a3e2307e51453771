//! A pool whose backends cannot start does not spin: each start waits an exponential backoff after
//! the last failed one, and the listing shows the failures in a row.

use super::*;
use hangar_controller::warm_pool::fill_backoff;
use hangar_store::BackendFilter;
use hangar_tests::shell_executable;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pool_backs_off_exponentially() {
    let env = TestEnv::start().await;
    within(async {
        let failing = WarmPoolConfig {
            executable: shell_executable("exit 3"),
            ..config(1, &[])
        };
        env.client
            .put_warm_pool(&name("f"), &failing)
            .await
            .unwrap();
        let listed = eventually("three failed starts in a row", || async {
            pool(&env, "f").await.filter(|p| p.failed_starts >= 3)
        })
        .await;
        assert_eq!(listed.ready, 0);
        // Every backend of the test is one of the pool's starts; each start waited the backoff of
        // the failures before it (both times from the store's clock).
        let filter = BackendFilter {
            limit: 100,
            ..BackendFilter::default()
        };
        let mut starts: Vec<i64> = env
            .store
            .list_backends(&filter)
            .await
            .unwrap()
            .iter()
            .map(|b| b.created_at.0)
            .collect();
        starts.sort_unstable();
        assert!(starts.len() >= 3, "{starts:?}");
        for (failed, pair) in starts.windows(2).enumerate() {
            let gap = u128::try_from(pair[1] - pair[0]).unwrap();
            let wait = fill_backoff(failed as u64 + 1).as_millis();
            assert!(
                gap >= wait,
                "start {} came {gap} ms after the previous one, backoff {wait} ms: {starts:?}",
                failed + 1
            );
        }
        // A working executable resets the count.
        env.client
            .put_warm_pool(&name("f"), &config(1, &[]))
            .await
            .unwrap();
        let p = wait_counts(&env, "f", 1, 0).await;
        assert_eq!(p.failed_starts, 0);
    })
    .await;
    env.shutdown().await;
}
