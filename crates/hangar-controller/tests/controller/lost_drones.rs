//! Lost drones and the operator routes: a silent drone's backends become terminated/lost once their
//! lease expired, mark-lost, prevent-renew, and a drone session taken over by a reconnect.

use crate::support::*;
use hangar_types::protocol::{ControllerToDrone, DroneToController, KeyDeadlines};
use hangar_types::timing::{KEY_LEASE, UNHEALTHY_AFTER};
use hangar_types::{BackendId, DroneName, Millis, TerminationKind, TerminationReason};
use serde_json::{json, Value};
use std::time::Duration;

async fn wait_for_status(ctl: &TestController, backend: &BackendId, status: &str) -> Value {
    eventually(&format!("backend {backend} {status}"), || async {
        let body = ctl.status(backend).await;
        (body["status"] == status).then_some(body)
    })
    .await
}

#[tokio::test]
async fn silent_drone_backends_become_lost_and_the_key_spawns_elsewhere() {
    with_drone_proxy_and_backend("room", async |ctl, mut old, mut proxy, connected| {
        let backend = connected.backend_id.clone();
        assert_eq!(connected.drone.as_ref(), Some(&old.name));
        old.make_ready(&backend).await;
        assert!(proxy.route(&connected.token).await.is_some());

        // Before its lease expires, a silent drone's backend is not touched.
        ctl.advance_clock(UNHEALTHY_AFTER + Duration::from_secs(1))
            .await;
        let swept = hangar_controller::lost::sweep_lost_backends(ctl.store.as_ref())
            .await
            .unwrap();
        assert!(swept.is_empty(), "{swept:?}");
        assert_eq!(ctl.status(&backend).await["status"], "ready");

        // The drone stays silent and the lease runs out on the store clock.
        ctl.advance_clock(KEY_LEASE).await;
        // One sweep records it (the background loop may have been first).
        hangar_controller::lost::sweep_lost_backends(ctl.store.as_ref())
            .await
            .unwrap();
        let status = ctl.status(&backend).await;
        assert_eq!(status["status"], "terminated", "{status}");
        assert_eq!(status["termination_reason"], "lost");
        assert_eq!(
            status["message"],
            format!("drone {} stopped reporting", old.name)
        );
        proxy.expect_removed(&backend).await;
        assert!(proxy.route(&connected.token).await.is_none());
        assert!(
            hangar_controller::lost::sweep_lost_backends(ctl.store.as_ref())
                .await
                .unwrap()
                .is_empty(),
            "a second sweep changes nothing"
        );

        // The key is free: a connect spawns a new backend on the healthy drone.
        let mut fresh = FakeDrone::connect(ctl).await;
        let again = ctl.connect(&connect_body(Some("room"))).await;
        assert!(again.spawned);
        assert_ne!(again.backend_id, backend);
        assert_eq!(again.drone.as_ref(), Some(&fresh.name));
        fresh.expect_spawn(&again.backend_id).await;
    })
    .await
}

#[tokio::test]
async fn lost_backend_sweep_runs_in_the_background() {
    with_scheduled_backend("bg", async |ctl, mut drone, backend| {
        drone.expect_spawn(&backend).await;
        // The drone goes away for good.
        drop(drone);
        ctl.advance_clock(KEY_LEASE + Duration::from_secs(1)).await;
        let status = wait_for_status(ctl, &backend, "terminated").await;
        assert_eq!(status["termination_reason"], "lost");
    })
    .await
}

#[tokio::test]
async fn mark_lost_tells_proxies_and_the_drone() {
    with_proxy_and_ready_backend("marked", async |ctl, mut drone, mut proxy, connected| {
        let backend = connected.backend_id.clone();
        assert!(proxy.route(&connected.token).await.is_some());

        let response = ctl
            .post(
                &format!("/ctrl/c/{CLUSTER}/d/{}/mark-lost", drone.name),
                &json!(null),
            )
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"backends": [backend.as_str()]}));
        proxy.expect_removed(&backend).await;
        // If the drone is in fact alive, it is told to kill the backend.
        drone
            .expect_terminate(&backend, TerminationKind::Hard, TerminationReason::Lost)
            .await;
        let status = ctl.status(&backend).await;
        assert_eq!(status["status"], "terminated");
        assert_eq!(status["termination_reason"], "lost");

        // An unknown drone, and a name that is no drone name.
        for (drone, status) in [("dr-nobody", 404), ("not-a-drone", 400)] {
            let path = format!("/ctrl/c/{CLUSTER}/d/{drone}/mark-lost");
            let response = ctl.post(&path, &json!(null)).await;
            assert_eq!(response.status(), status, "{drone}");
        }
    })
    .await
}

/// Sends `RenewKey` and returns the answer's deadlines.
async fn renew(drone: &mut FakeDrone, backend: &BackendId) -> Option<KeyDeadlines> {
    drone
        .send(&DroneToController::RenewKey {
            backend: backend.clone(),
            local_time: Millis(7_000),
        })
        .await;
    let mut seen = Vec::new();
    drone
        .ws
        .recv_until(&mut seen, |m: &ControllerToDrone| match m {
            ControllerToDrone::RenewKeyResponse {
                backend: b,
                deadlines,
            } if b == backend => Some(*deadlines),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn prevent_renew_makes_the_next_renewal_fail() {
    with_scheduled_backend("blocked", async |ctl, mut drone, backend| {
        drone.expect_spawn(&backend).await;
        assert!(renew(&mut drone, &backend).await.is_some());
        let response = ctl
            .post(&format!("/ctrl/b/{backend}/prevent-renew"), &json!(null))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(renew(&mut drone, &backend).await, None);
        let response = ctl
            .post("/ctrl/b/nosuchbackend/prevent-renew", &json!(null))
            .await;
        assert_eq!(response.status(), 404);
    })
    .await
}

#[tokio::test]
async fn a_live_drone_session_is_taken_over_by_a_reconnect() {
    with_controller(async |ctl| {
        let name = DroneName::random();
        let _first = FakeDrone::connect_as(ctl, name.clone()).await;
        // Same name while the first session is live and heartbeating: welcomed (a reconnect).
        let mut second = FakeDrone::connect_as(ctl, name.clone()).await;
        let backend = ctl.connect(&connect_body(Some("taken"))).await.backend_id;
        second.expect_spawn(&backend).await;
        let state = ctl.cluster_state().await;
        let drones = state["drones"].as_array().unwrap();
        assert_eq!(drones.len(), 1, "one node per name: {state}");
        assert_eq!(drones[0]["node"]["name"]["Drone"], name.as_str());
    })
    .await
}
