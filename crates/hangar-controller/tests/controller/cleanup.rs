//! The cleanup loop: batches until a short one, and old terminated backends deleted on schedule.

use crate::support::*;
use hangar_controller::cleanup::{cleanup_pass, CLEANUP_BATCH};
use hangar_controller::ControllerConfig;
use hangar_store::NewToken;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::BackendStatus;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_pass_runs_batches_until_one_is_short() {
    // The background loop's first pass comes after a random part of a day: not during this test.
    let config = ControllerConfig {
        cleanup_interval: Duration::from_secs(24 * 3600),
        ..TestController::config()
    };
    with_controller_config(config, async |ctl| {
        let (mut drone, backend) = FakeDrone::with_backend(ctl, "tokens").await;
        drone.expect_spawn(&backend).await;
        let expiring = 2 * CLEANUP_BATCH + 50;
        for _ in 0..expiring {
            ctl.store
                .insert_token(NewToken {
                    token: ConnectionToken::random(),
                    backend: backend.clone(),
                    secret: SecretToken::random(),
                    user: None,
                    auth: serde_json::Map::new(),
                    lifetime: Duration::from_secs(1),
                })
                .await
                .unwrap();
        }
        ctl.advance_clock(Duration::from_secs(10)).await;
        let deleted = cleanup_pass(ctl.store.as_ref(), None, &CancellationToken::new())
            .await
            .unwrap();
        // Every expired token in one pass, and nothing else (the connect's own token lasts an hour).
        assert_eq!(deleted, u64::from(expiring));
        let again = cleanup_pass(ctl.store.as_ref(), None, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(again, 0);
    })
    .await
}

#[tokio::test]
async fn the_loop_deletes_old_terminated_backends() {
    let config = ControllerConfig {
        cleanup_min_age_days: Some(1),
        cleanup_interval: Duration::from_secs(1),
        ..TestController::config()
    };
    with_controller_config(config, async |ctl| {
        let mut drone = FakeDrone::connect(ctl).await;
        let old = ctl.connect(&connect_body(Some("old"))).await.backend_id;
        let live = ctl.connect(&connect_body(Some("live"))).await.backend_id;
        drone.expect_spawn(&old).await;
        let terminated = terminated_state(BackendStatus::Scheduled, None, None, Some(0));
        drone.report(1, &old, terminated).await;
        ctl.advance_clock(Duration::from_secs(2 * 24 * 3600)).await;
        eventually("old backend deleted", || async {
            let response = ctl.get(&format!("/pub/b/{old}/status")).await;
            (response.status() == 404).then_some(())
        })
        .await;
        // Not terminated: kept, however old.
        assert_eq!(ctl.status(&live).await["status"], "scheduled");
    })
    .await
}
