//! Scale-out: several controllers sharing one PostgreSQL database, with drones and a proxy attached to
//! different controllers, real backend processes (the `hangar-test-backend` binary) and real sockets.
//!
//! Each test runs on a fresh database (`HANGAR_TEST_POSTGRES_URL`; skipped without it outside CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use hangar_client::node::NodeSocket;
use hangar_client::ControllerClient;
use hangar_test_support::IGNORING_SIGTERM;
use hangar_tests::witness::DroneWitness;
use hangar_tests::{
    assert_api_error, eventually, with_postgres, with_postgres_pair, within, TestEnv, WAIT,
};
use hangar_types::api::{ApiErrorKind, ConnectRequest, ConnectResponse, RevokeRequest};
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{ControllerToDrone, DroneToController, Hello, NodeHello};
use hangar_types::timing::{KeyTiming, UNHEALTHY_AFTER};
use hangar_types::{
    BackendState, BackendStatus, DroneName, Millis, TerminationKind, TerminationReason,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn in_pool(env: &TestEnv, key: &str, pool: &str) -> ConnectRequest {
    let mut req = env.connect_request(key, &[]);
    req.spawn_config.as_mut().unwrap().pool = pool.to_string();
    req
}

/// Connects to key `key` in pool `pool` once a drone of that pool takes the backend (`what`).
async fn connect_in_pool(env: &TestEnv, key: &str, pool: &str, what: &str) -> ConnectResponse {
    let req = in_pool(env, key, pool);
    eventually(what, || async { env.client.connect(&req).await.ok() }).await
}

async fn get_text(env: &TestEnv, url: &str) -> (u16, String) {
    let resp = env.get(url).await;
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Whether something accepts TCP connections at `addr` (the backend process is alive).
async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_serve_one_cluster() {
    within(with_postgres_pair(1, async |env| {
        let (a, b) = (env.client_at(0), env.client_at(1));

        // Either controller finds the backend the other one created.
        let req = env.connect_request("shared", &[]);
        let first = a.connect(&req).await.unwrap();
        let again = b.connect(&req).await.unwrap();
        assert!(first.spawned && !again.spawned);
        assert_eq!(first.backend_id, again.backend_id);
        // A spawn scheduled by B reaches the drone attached to A.
        let other = b
            .connect(&env.connect_request("scheduled-by-b", &[]))
            .await
            .unwrap();
        assert!(other.spawned);
        env.ready_at(0, &other.backend_id).await;
        env.ready_at(1, &first.backend_id).await;

        // The proxy attached to B routes tokens issued by either controller.
        for url in [&first.url, &again.url, &other.url] {
            let (status, body) = get_text(env, url).await;
            assert_eq!(status, 200, "{url}: {body}");
            assert_eq!(body, "hello from hangar-test-backend");
        }

        // Idle termination: requested through B, swept by A (which holds the drone's session).
        let mut idle = env.connect_request("idle", &[]);
        idle.spawn_config.as_mut().unwrap().max_idle_seconds = Some(1);
        let resp = b.connect(&idle).await.unwrap();
        env.ready_at(1, &resp.backend_id).await;
        let done = env
            .wait_for_status_at(1, &resp.backend_id, BackendStatus::Terminated)
            .await;
        assert_eq!(done.termination_reason, Some(TerminationReason::Swept));
        let next = a.connect(&idle).await.unwrap();
        assert!(next.spawned, "the key was released");
        assert_ne!(next.backend_id, resp.backend_id);
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connects_for_one_key_get_one_backend() {
    within(with_postgres(2, async |env| {
        env.add_drone_on(0, |_| {}).await;
        env.add_drone_on(1, |_| {}).await;
        let req = env.connect_request("contended", &[]);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let client = env.client_at(i % 2);
            let req = req.clone();
            tasks.spawn(async move { client.connect(&req).await });
        }
        let mut ids = HashSet::new();
        let mut spawned = 0;
        while let Some(joined) = tasks.join_next().await {
            let resp = joined
                .unwrap()
                .unwrap_or_else(|e| panic!("a connect failed: {e}"));
            spawned += usize::from(resp.spawned);
            ids.insert(resp.backend_id);
        }
        assert_eq!(ids.len(), 1, "one backend for the key: {ids:?}");
        assert_eq!(spawned, 1, "exactly one connect spawned it");
        let id = ids.into_iter().next().unwrap();
        env.ready_at(1, &id).await;
    }))
    .await;
}

/// Short key timing: drones renew every 2 s, soft-terminate after 9 s and hard-terminate after 11 s
/// without a renewal; the lease lasts 14 s on the database clock. (The deadline base can be a heartbeat
/// interval old at spawn; renewal at once fixes that, so soft must leave room for it.)
const SHORT_KEYS: KeyTiming = KeyTiming {
    renew_after: Duration::from_secs(2),
    soft_terminate_after: Duration::from_secs(9),
    hard_terminate_after: Duration::from_secs(11),
    lease: Duration::from_secs(14),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_drone_stops_its_backend_before_the_key_moves() {
    within(async {
        let Some(mut env) = TestEnv::postgres_with(2, SHORT_KEYS).await else {
            return;
        };
        // A long grace, so that the hard deadline, not the grace period, ends the stubborn backend.
        let cut_off = env
            .add_drone_on(0, |c| c.soft_terminate_grace = Duration::from_secs(60))
            .await;
        let req = env.connect_request("fenced", IGNORING_SIGTERM);
        let old = env.client_at(0).connect(&req).await.unwrap();
        assert_eq!(old.drone.as_ref(), Some(env.drones[cut_off].name()));
        env.ready_at(1, &old.backend_id).await;
        let store = env.store_at(1);
        let old_row = store.backend(&old.backend_id).await.unwrap().unwrap();
        let BackendState::Ready { address } = old_row.state else {
            panic!("not ready: {:?}", old_row.state)
        };
        let takeover = env.add_drone_on(1, |_| {}).await;

        // Partition: controller A goes away for good; a witness that answers nothing takes its
        // address, so the drone stays connected to something that never renews its key.
        let a_addr = env.controller_addr_at(0);
        env.stop_controller_at(0).await;
        let witness = DroneWitness::start(TcpListener::bind(a_addr).await.unwrap());
        let b = env.client_at(1);
        assert!(accepts(address).await, "the drone waits for its deadlines");

        // Connects through B get the old backend while its lease holds, a new one once it expired on
        // the database clock — and by then the old process is gone.
        let mut reused = 0;
        let deadline = Instant::now() + WAIT;
        let new = loop {
            let old_alive = accepts(address).await;
            let resp = b.connect(&req).await.unwrap();
            if resp.backend_id != old.backend_id {
                assert!(!old_alive, "the key moved while the old backend still ran");
                break resp;
            }
            reused += 1;
            assert!(Instant::now() < deadline, "the key never moved");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(reused > 0, "the lease kept the key while it was valid");
        assert!(new.spawned);
        assert_eq!(new.drone.as_ref(), Some(env.drones[takeover].name()));
        let new_row = store.backend(&new.backend_id).await.unwrap().unwrap();
        assert!(
            new_row.fencing_token > old_row.fencing_token,
            "fencing token {} after {}",
            new_row.fencing_token,
            old_row.fencing_token
        );
        let ready = env.ready_at(1, &new.backend_id).await;

        // The drone's own account: it asked to renew, then soft- and hard-terminated by its deadlines,
        // and the old backend was terminated before the new one was ready.
        let events = eventually("the cut-off drone's termination events", || async {
            let events = witness.backend_events(&old.backend_id);
            events
                .iter()
                .any(|(s, _)| s.status() == BackendStatus::Terminated)
                .then_some(events)
        })
        .await;
        let at = |status: BackendStatus| {
            events
                .iter()
                .find(|(s, _)| s.status() == status)
                .cloned()
                .unwrap_or_else(|| panic!("no {status} event in {events:?}"))
        };
        let (soft, soft_at) = at(BackendStatus::Terminating);
        let (hard, hard_at) = at(BackendStatus::HardTerminating);
        let (gone, gone_at) = at(BackendStatus::Terminated);
        assert!(
            matches!(
                soft,
                BackendState::Terminating {
                    termination: TerminationKind::Soft,
                    reason: TerminationReason::KeyExpired,
                    ..
                }
            ),
            "{soft:?}"
        );
        assert!(
            matches!(
                hard,
                BackendState::HardTerminating {
                    reason: TerminationReason::KeyExpired,
                    ..
                }
            ),
            "{hard:?}"
        );
        assert!(
            matches!(
                gone,
                BackendState::Terminated {
                    exit_code: Some(137),
                    ..
                }
            ),
            "killed: {gone:?}"
        );
        assert!(soft_at < hard_at && hard_at <= gone_at, "{events:?}");
        assert!(
            gone_at < ready.time,
            "old terminated at {gone_at:?}, new ready at {:?}",
            ready.time
        );
        assert!(witness.renewals(&old.backend_id) > 0, "it tried to renew");

        // Controller B records the vanished backend as lost once its lease is over.
        let lost = env
            .wait_for_status_at(1, &old.backend_id, BackendStatus::Terminated)
            .await;
        assert_eq!(lost.termination_reason, Some(TerminationReason::Lost));
        witness.shutdown().await;
        env.shutdown().await;
    })
    .await;
}

/// A drone speaking the protocol by hand, so a test decides when it heartbeats.
struct FakeDrone {
    name: DroneName,
    socket: NodeSocket<DroneToController, ControllerToDrone>,
}

impl FakeDrone {
    async fn connect(client: &ControllerClient, env: &TestEnv, pool: &str) -> FakeDrone {
        let name = DroneName::random();
        let hello = Hello::new(NodeHello::Drone {
            name: name.clone(),
            pool: pool.to_string(),
            executors: vec![ExecutorKind::Process],
        });
        let path = format!("/ctrl/c/{}/drone-socket", env.cluster);
        let socket = NodeSocket::connect(client, &path, &hello).await.unwrap();
        FakeDrone { name, socket }
    }

    async fn heartbeat(&mut self) {
        let beat = DroneToController::Heartbeat {
            local_time: Millis::now(),
        };
        self.socket.send(&beat).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drone_that_stops_heartbeating_is_not_scheduled() {
    within(with_postgres(1, async |env| {
        env.add_drone_on(0, |_| {}).await;
        let mut fake = FakeDrone::connect(&env.client, env, "silent").await;
        fake.heartbeat().await;
        let what = "the fake drone to be schedulable";
        let first = connect_in_pool(env, "silent-1", "silent", what).await;
        assert_eq!(first.drone.as_ref(), Some(&fake.name));

        // The fake drone says nothing more while the store clock moves past the unhealthy threshold.
        env.advance_clock(UNHEALTHY_AFTER + Duration::from_secs(1));
        // The real drone and the controller heartbeat again on their own and are schedulable again…
        let mut attempt = 0;
        eventually("the heartbeating drone to be schedulable again", || {
            attempt += 1;
            let req = env.connect_request(&format!("healthy-{attempt}"), &[]);
            let client = env.client.clone();
            async move { client.connect(&req).await.ok() }
        })
        .await;
        // …the silent one is not.
        assert_api_error(
            env.client
                .connect(&in_pool(env, "silent-2", "silent"))
                .await,
            503,
            ApiErrorKind::NoDroneAvailable,
        );
        // One heartbeat makes it schedulable again.
        fake.heartbeat().await;
        let what = "the fake drone to be schedulable after a heartbeat";
        let back = connect_in_pool(env, "silent-3", "silent", what).await;
        assert_eq!(back.drone.as_ref(), Some(&fake.name));
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_pools_decide_placement() {
    within(with_postgres(2, async |env| {
        let first = env.add_drone_on(0, |_| {}).await;
        let second = env.add_drone_on(1, |_| {}).await;
        let gpu = env.add_drone_on(1, |c| c.pool = "gpu".into()).await;
        let name = |i: usize| env.drones[i].name().clone();

        // Pools: a backend of a pool runs on that pool's drone; a pool without drones gets 503.
        let on_gpu = env
            .client_at(0)
            .connect(&in_pool(env, "gpu-1", "gpu"))
            .await
            .unwrap();
        assert_eq!(on_gpu.drone, Some(name(gpu)));
        env.ready_at(0, &on_gpu.backend_id).await;
        assert_api_error(
            env.client_at(1)
                .connect(&in_pool(env, "tpu-1", "tpu"))
                .await,
            503,
            ApiErrorKind::NoDroneAvailable,
        );
        for i in 0..4 {
            let resp = env.connect_at(i % 2, &format!("default-{i}")).await;
            let drone = resp.drone.unwrap();
            assert!(drone == name(first) || drone == name(second), "{drone}");
        }

        // Drain (through the controller the drone is not attached to): no new backends on it.
        let drained = env
            .client_at(1)
            .drain(&env.cluster, &name(first))
            .await
            .unwrap();
        assert!(drained.updated);
        for i in 0..6 {
            let resp = env.connect_at(i % 2, &format!("after-drain-{i}")).await;
            assert_eq!(resp.drone, Some(name(second)), "connect {i}");
        }
        assert!(
            !env.client_at(0)
                .drain(&env.cluster, &name(first))
                .await
                .unwrap()
                .updated
        );
        env.client_at(0)
            .drain(&env.cluster, &name(second))
            .await
            .unwrap();
        assert_api_error(
            env.client_at(0)
                .connect(&env.connect_request("nowhere", &[]))
                .await,
            503,
            ApiErrorKind::NoDroneAvailable,
        );
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_a_proxy_on_another_controller() {
    within(with_postgres_pair(1, async |env| {
        let alice = env.connect_at(0, "revoked").await;
        let mut as_bob = env.connect_request("revoked", &[]);
        as_bob.user = Some("bob".into());
        let bob = env.client_at(1).connect(&as_bob).await.unwrap();
        assert_eq!(alice.backend_id, bob.backend_id);
        env.ready_at(1, &alice.backend_id).await;
        assert_eq!(get_text(env, &alice.url).await.0, 200);
        assert_eq!(get_text(env, &bob.url).await.0, 200);

        env.client_at(0)
            .revoke(&RevokeRequest {
                backend_id: alice.backend_id.clone(),
                user: "alice".into(),
            })
            .await
            .unwrap();
        let (status, body) = eventually("the revoked token to be refused", || async {
            let (status, body) = get_text(env, &alice.url).await;
            (status != 200).then_some((status, body))
        })
        .await;
        assert_eq!(status, 410, "{body}");
        assert_eq!(
            get_text(env, &bob.url).await.0,
            200,
            "bob's token still works"
        );
    }))
    .await;
}

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `text` and expects it echoed.
async fn echo(ws: &mut WebSocket, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_keeps_websockets_and_nodes_come_back() {
    within(with_postgres_pair(0, async |env| {
        let resp = env.connect_ready_at(0, 1, "ws-restart").await;
        let mut ws = hangar_tests::open_ws(&resp.url).await;
        echo(&mut ws, "before").await;

        env.stop_controller_at(0).await;
        echo(&mut ws, "while the controller is down").await;
        env.restart_controller_at(0).await;
        echo(&mut ws, "after the restart").await;

        // Drone and proxy reattach by themselves; new backends start and are reachable again.
        let mut attempt = 0;
        let fresh = eventually("a connect to succeed after the restart", || {
            attempt += 1;
            let req = env.connect_request(&format!("after-restart-{attempt}"), &[]);
            let client = env.client_at(1);
            async move { client.connect(&req).await.ok() }
        })
        .await;
        env.ready_at(1, &fresh.backend_id).await;
        let (status, body) = eventually("the proxy to route again", || async {
            let got = get_text(env, &fresh.url).await;
            (got.0 == 200).then_some(got)
        })
        .await;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from hangar-test-backend")
        );
        assert!(env.drones[0].is_connected());
        assert!(env.proxy().is_ready());
        echo(&mut ws, "at the end").await;
    }))
    .await;
}
