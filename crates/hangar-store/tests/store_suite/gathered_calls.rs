//! Store suite cases of calls the store gathers and answers together (drone reports, scheduler reads):
//! concurrent calls each get the answer they would get alone. Run against every store, like `suite`.

use crate::suite::{acquire, cluster, new_backend, ready_drone};
use crate::Harness;
use hangar_store::*;
use hangar_types::executable::ExecutorKind;
use hangar_types::timing::UNHEALTHY_AFTER;
use hangar_types::{BackendState, BackendStatus};
use std::net::SocketAddr;
use std::sync::Arc;

/// Calls `case` on every store of the suite.
macro_rules! gathered_tests {
    ($($case:ident),* $(,)?) => {
        mod sqlite_memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::run_case(crate::sqlite_memory, super::$case).await;
            })*
        }
        mod sqlite_file {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::run_case(crate::sqlite_file, super::$case).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::run_case(crate::postgres::harness, super::$case).await;
            })*
        }
    };
}

gathered_tests!(
    concurrent_drone_reports_are_answered_each,
    concurrent_scheduler_reads_are_answered_each,
);

const DRONES: usize = 8;

fn addr() -> SocketAddr {
    "10.0.0.7:31000".parse().unwrap()
}

/// Eight drones report at once, each acking its first backend's spawn and (ignored) the next drone's
/// second, and sending states for both of its backends, one of them stale. Each call gets the
/// outcomes of its own states, in order; acks of another drone's actions change nothing.
async fn concurrent_drone_reports_are_answered_each(h: Harness) {
    let store = h.store.clone();
    let mut drones = Vec::new();
    for d in 0..DRONES {
        let drone = ready_drone(&*store, &format!("dr-{d}"), "").await;
        let (first, second) = (
            new_backend(drone, &format!("k{d}a")),
            new_backend(drone, &format!("k{d}b")),
        );
        let (_, first_spawn) = acquire(&*store, first.clone()).await;
        let (_, second_spawn) = acquire(&*store, second.clone()).await;
        drones.push((drone, first.id, first_spawn, second.id, second_spawn));
    }
    let ready = BackendState::Ready { address: addr() };
    let mut calls = tokio::task::JoinSet::new();
    for (d, (drone, first, first_spawn, second, _)) in drones.iter().enumerate() {
        let next_second_spawn = drones[(d + 1) % DRONES].4.action_id.clone();
        let acks = vec![first_spawn.action_id.clone(), next_second_spawn];
        let states = vec![
            (first.clone(), BackendState::Loading),
            (second.clone(), BackendState::Starting),
            (first.clone(), BackendState::Starting),
            (first.clone(), ready.clone()),
            (second.clone(), BackendState::Loading),
        ];
        let (store, drone) = (store.clone(), *drone);
        calls.spawn(async move {
            let updates = store
                .record_drone_reports(drone, &acks, &states)
                .await
                .unwrap();
            (d, updates)
        });
    }
    let mut answered = Vec::new();
    while let Some(call) = calls.join_next().await {
        let (d, updates) = call.unwrap();
        let outcomes: Vec<bool> = updates
            .iter()
            .map(|u| matches!(u, StateUpdate::Applied { .. }))
            .collect();
        assert_eq!(outcomes, [true, true, true, true, false], "drone {d}");
        assert_eq!(updates[4], StateUpdate::Stale, "drone {d}");
        answered.push(d);
    }
    assert_eq!(answered.len(), DRONES);
    for (drone, first, _, second, second_spawn) in &drones {
        assert_eq!(
            store.backend(first).await.unwrap().unwrap().state,
            ready.clone()
        );
        assert_eq!(
            store.backend(second).await.unwrap().unwrap().state.status(),
            BackendStatus::Starting
        );
        // Its own second spawn was acked by no one (the next drone's ack of it was ignored).
        assert_eq!(
            store.pending_actions(*drone, 10).await.unwrap(),
            vec![second_spawn.clone()]
        );
        assert_eq!(store.backend_history(first).await.unwrap().len(), 4);
    }
}

/// Concurrent scheduler reads of two queries each get what a read alone gets, and a read made after a
/// spawn committed counts it.
async fn concurrent_scheduler_reads_are_answered_each(h: Harness) {
    let store = h.store.clone();
    let busy = ready_drone(&*store, "dr-busy", "").await;
    ready_drone(&*store, "dr-idle", "").await;
    ready_drone(&*store, "dr-gpu", "gpu").await;
    acquire(&*store, new_backend(busy, "k1")).await;
    let query = |pool: &str| DroneQuery {
        cluster: cluster(),
        pool: pool.to_string(),
        executor: ExecutorKind::Process,
        max_heartbeat_age: UNHEALTHY_AFTER,
    };
    let alone = [
        store.schedulable_drones(&query("")).await.unwrap(),
        store.schedulable_drones(&query("gpu")).await.unwrap(),
    ];
    assert_eq!((alone[0].len(), alone[1].len()), (2, 1));
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (store, query) = (
            Arc::clone(&store),
            query(if i % 2 == 0 { "" } else { "gpu" }),
        );
        reads.spawn(async move { (i % 2, store.schedulable_drones(&query).await.unwrap()) });
    }
    while let Some(read) = reads.join_next().await {
        let (which, found) = read.unwrap();
        assert_eq!(found, alone[which]);
    }
    acquire(&*store, new_backend(busy, "k2")).await;
    let counts: Vec<(NodeId, i64)> = store
        .schedulable_drones(&query(""))
        .await
        .unwrap()
        .iter()
        .map(|c| (c.id, c.backend_count))
        .filter(|(id, _)| *id == busy)
        .collect();
    assert_eq!(counts, [(busy, 2)]);
}
