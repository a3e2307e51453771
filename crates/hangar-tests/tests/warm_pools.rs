//! Warm pools end to end: a controller (SQLite, or two on PostgreSQL), process drones running the real
//! `hangar-test-backend`, and the proxy. Pools are set through the API; claims happen on
//! `POST /ctrl/connect`; every wait is an `eventually` with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_store::UnclaimedBackend;
use hangar_tests::{assert_api_error, backend_executable, eventually, within, TestEnv};
use hangar_types::api::{ApiErrorKind, ConnectResponse};
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig};
use hangar_types::{BackendId, BackendStatus, WarmPoolName};
use std::collections::HashSet;

#[path = "warm_pools/claim_hook.rs"]
mod claim_hook;
#[path = "warm_pools/fill_backoff.rs"]
mod fill_backoff;

fn name(s: &str) -> WarmPoolName {
    s.parse().unwrap()
}

/// A pool of the test backend with `env` (a connect made by `TestEnv::connect_request` with the same
/// env runs an equal executable).
fn config(size: u32, env: &[(&str, &str)]) -> WarmPoolConfig {
    WarmPoolConfig {
        cluster: None,
        pool: String::new(),
        size,
        executable: backend_executable(env),
        max_age_seconds: None,
        claim_path: None,
    }
}

async fn pool(env: &TestEnv, pool: &str) -> Option<WarmPool> {
    let list = env.client.warm_pools().await.unwrap();
    list.pools.into_iter().find(|p| p.name.as_str() == pool)
}

/// Waits until the pool lists `ready` ready and `starting` starting unclaimed backends.
async fn wait_counts(env: &TestEnv, name: &str, ready: u64, starting: u64) -> WarmPool {
    eventually(
        &format!("warm pool {name}: {ready} ready, {starting} starting"),
        || async {
            let p = pool(env, name).await?;
            (p.ready == ready && p.starting == starting).then_some(p)
        },
    )
    .await
}

/// Puts the pool `pool` with `config` and waits until all its `size` backends are ready.
async fn put_and_fill(env: &TestEnv, pool: &str, config: WarmPoolConfig) {
    env.client
        .put_warm_pool(&name(pool), &config)
        .await
        .unwrap();
    wait_counts(env, pool, u64::from(config.size), 0).await;
}

/// The unclaimed backends as the store lists them (terminating ones excluded).
async fn unclaimed(env: &TestEnv) -> Vec<UnclaimedBackend> {
    env.store.unclaimed_backends().await.unwrap()
}

async fn connect(env: &TestEnv, key: &str, backend_env: &[(&str, &str)]) -> ConnectResponse {
    env.connect(&env.connect_request(key, backend_env)).await
}

/// Fill, claim, refill, reuse, non-matching executable, resize, fallback to cold, executable change and
/// delete, on one controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_claim_refill_resize_change_delete() {
    let env = TestEnv::start().await;
    within(async {
        let client = &env.client;
        let put = client
            .put_warm_pool(&name("p"), &config(2, &[]))
            .await
            .unwrap();
        assert_eq!((put.size, put.claimed), (2, 0));
        assert_eq!(put.cluster, env.cluster);
        wait_counts(&env, "p", 2, 0).await;
        let warm: HashSet<BackendId> = unclaimed(&env).await.into_iter().map(|u| u.id).collect();

        // A claim: ready at once, a warm backend, reachable through the proxy.
        let claimed = connect(&env, "k1", &[]).await;
        assert!(claimed.warm && claimed.spawned, "{claimed:?}");
        assert_eq!(claimed.status, BackendStatus::Ready);
        assert!(warm.contains(&claimed.backend_id));
        let seen = env.backend_env(&claimed.url).await;
        assert!(seen.is_object(), "{seen}");
        let p = wait_counts(&env, "p", 2, 0).await;
        assert_eq!(p.claimed, 1);
        // Counted in the metrics and the dashboard's JSON.
        let metrics = env.controller_url().join("metrics").unwrap();
        eventually("warm pool series", || async {
            let text = env
                .http
                .get(metrics.clone())
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (text.contains(r#"hangar_warm_claims_total{pool="p",outcome="claimed"} 1"#)
                && text.contains(r#"hangar_warm_pool_backends{pool="p",status="ready"} 2"#))
            .then_some(())
        })
        .await;
        let dashboard = env.controller_url().join("ctrl/dashboard/state").unwrap();
        let state = env.get_json(dashboard).await;
        let listed = &state["warm_pools"][0];
        assert_eq!(
            (&listed["name"], &listed["ready"], &listed["claimed"]),
            (
                &serde_json::json!("p"),
                &serde_json::json!(2),
                &serde_json::json!(1)
            ),
            "{state}"
        );
        assert!(!unclaimed(&env)
            .await
            .iter()
            .any(|u| u.id == claimed.backend_id));

        // The key is held by the claimed backend now: a second connect reuses it.
        let again = connect(&env, "k1", &[]).await;
        assert_eq!(again.backend_id, claimed.backend_id);
        assert!(!again.warm && !again.spawned);

        // Another executable spawns cold.
        let cold = connect(&env, "k2", &[("OTHER", "1")]).await;
        assert!(!cold.warm && cold.spawned);
        assert_eq!(cold.status, BackendStatus::Scheduled);
        env.wait_for_status(&cold.backend_id, BackendStatus::Ready)
            .await;

        // Resize to 0: the unclaimed backends go, the claimed one lives on; connects spawn cold.
        let before: Vec<BackendId> = unclaimed(&env).await.into_iter().map(|u| u.id).collect();
        put_and_fill(&env, "p", config(0, &[])).await;
        for id in &before {
            env.terminated(id).await;
        }
        let empty = connect(&env, "k3", &[]).await;
        assert!(!empty.warm && empty.spawned);
        env.wait_for_status(&empty.backend_id, BackendStatus::Ready)
            .await;
        let status = client.backend_status(&claimed.backend_id).await.unwrap();
        assert_eq!(status.status, BackendStatus::Ready);

        // A new executable: backends of the old one are never claimed; the new one's are.
        put_and_fill(&env, "p", config(1, &[])).await;
        let old = unclaimed(&env).await;
        put_and_fill(&env, "p", config(1, &[("VERSION", "2")])).await;
        for u in &old {
            env.terminated(&u.id).await;
        }
        let plain = connect(&env, "k4", &[]).await;
        assert!(!plain.warm);
        let changed = connect(&env, "k5", &[("VERSION", "2")]).await;
        assert!(changed.warm, "{changed:?}");
        let seen = env.backend_env(&changed.url).await;
        assert_eq!(seen["VERSION"], "2", "{seen}");

        // Delete: gone from the list, unclaimed backends terminated, claimed ones live on.
        wait_counts(&env, "p", 1, 0).await;
        let left = unclaimed(&env).await;
        assert_eq!(left.len(), 1);
        let deleted = client.delete_warm_pool(&name("p")).await.unwrap();
        assert_eq!(deleted.name.as_str(), "p");
        assert!(pool(&env, "p").await.is_none());
        env.terminated(&left[0].id).await;
        assert!(unclaimed(&env).await.is_empty());
        assert!(client.delete_warm_pool(&name("p")).await.is_err());
        let status = client.backend_status(&changed.backend_id).await.unwrap();
        assert_eq!(status.status, BackendStatus::Ready);
    })
    .await;
    env.shutdown().await;
}

/// Bad input gets Plane's error shape with a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused() {
    let env = TestEnv::controller_only(false).await;
    within(async {
        let url = env.controller_url();
        let put = |path: &str, body: serde_json::Value| {
            let url = url.join(path).unwrap();
            let http = env.http.clone();
            async move {
                let resp = http.put(url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<serde_json::Value>().await.unwrap())
            }
        };
        let exe = serde_json::to_value(backend_executable(&[])).unwrap();
        for (path, body) in [
            (
                "ctrl/warm-pools/p",
                serde_json::json!({"size": -1, "executable": exe}),
            ),
            (
                "ctrl/warm-pools/p",
                serde_json::json!({"size": 1, "executable": exe, "clustr": "x"}),
            ),
            (
                "ctrl/warm-pools/p",
                serde_json::json!({"size": 100000, "executable": exe}),
            ),
            (
                "ctrl/warm-pools/p",
                serde_json::json!({"size": 1, "executable": exe, "max_age_seconds": 0}),
            ),
            (
                "ctrl/warm-pools/p",
                serde_json::json!({"size": 1, "executable": {"nope": 1}}),
            ),
            (
                "ctrl/warm-pools/Bad%20Name",
                serde_json::json!({"size": 1, "executable": exe}),
            ),
        ] {
            let (status, error) = put(path, body.clone()).await;
            assert_eq!(status, 400, "{body} → {error}");
            assert_eq!(error["kind"], "InvalidRequest", "{error}");
            assert!(
                error["id"].is_string() && error["message"].is_string(),
                "{error}"
            );
        }
        assert_api_error(
            env.client
                .put_warm_pool(
                    &name("p"),
                    &WarmPoolConfig {
                        claim_path: Some("no-slash".into()),
                        ..config(1, &[])
                    },
                )
                .await,
            400,
            ApiErrorKind::InvalidRequest,
        );
        let resp = env.get(url.join("ctrl/warm-pools/none").unwrap()).await;
        assert_eq!(resp.status().as_u16(), 404);
        assert!(env.client.warm_pools().await.unwrap().pools.is_empty());
    })
    .await;
    env.shutdown().await;
}

/// Unclaimed backends are replaced after `max_age_seconds` and moved off a draining drone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_and_drain_replace_unclaimed_backends() {
    let mut env = TestEnv::start().await;
    env.add_drone(|_| {}).await;
    within(async {
        let client = &env.client;
        put_and_fill(&env, "p", config(2, &[])).await;
        let first = unclaimed(&env).await;

        // Drain the drone of the first backend: its backends move to the other drone.
        let row = env.store.backend(&first[0].id).await.unwrap().unwrap();
        client.drain(&env.cluster, &row.drone).await.unwrap();
        env.terminated(&first[0].id).await;
        eventually("every unclaimed backend off the draining drone", || async {
            let now = unclaimed(&env).await;
            let mut off = now.len() == 2;
            for u in &now {
                let b = env.store.backend(&u.id).await.ok()??;
                off &= b.drone != row.drone && !u.drone_draining;
            }
            off.then_some(())
        })
        .await;
        wait_counts(&env, "p", 2, 0).await;

        // A max age: every unclaimed backend is replaced once it is older.
        let before: Vec<BackendId> = unclaimed(&env).await.into_iter().map(|u| u.id).collect();
        let mut aged = config(2, &[]);
        aged.max_age_seconds = Some(1);
        client.put_warm_pool(&name("p"), &aged).await.unwrap();
        for id in &before {
            env.terminated(id).await;
        }
        eventually("replacements for the aged backends", || async {
            let now = unclaimed(&env).await;
            now.iter()
                .all(|u| !before.contains(&u.id))
                .then_some(())
                .filter(|_| !now.is_empty())
        })
        .await;
    })
    .await;
    env.shutdown().await;
}

/// Two controllers on one PostgreSQL database, a pool of 10 and 50 concurrent connects split across
/// them: every connect gets exactly one backend, no warm backend is claimed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_race_for_claims() {
    let Some(mut env) = TestEnv::postgres(2).await else {
        return;
    };
    env.add_drone_on(0, |_| {}).await;
    env.add_drone_on(1, |_| {}).await;
    env.start_proxy().await;
    within(async {
        put_and_fill(&env, "p", config(10, &[])).await;
        let connects = (0..50).map(|i| {
            let client = env.client_at(i % 2);
            let request = env.connect_request(&format!("race-{i}"), &[]);
            tokio::spawn(async move { client.connect(&request).await.unwrap() })
        });
        let mut responses = Vec::new();
        for task in connects.collect::<Vec<_>>() {
            responses.push(task.await.unwrap());
        }
        let ids: HashSet<&BackendId> = responses.iter().map(|r| &r.backend_id).collect();
        assert_eq!(ids.len(), 50, "each connect gets its own backend");
        let warm: Vec<&ConnectResponse> = responses.iter().filter(|r| r.warm).collect();
        assert!(warm.len() >= 10, "only {} claims", warm.len());
        for r in &warm {
            assert_eq!(r.status, BackendStatus::Ready);
            let row = env.store.backend(&r.backend_id).await.unwrap().unwrap();
            assert_eq!(
                row.key.name.as_str(),
                format!(
                    "race-{}",
                    responses
                        .iter()
                        .position(|x| x.backend_id == r.backend_id)
                        .unwrap()
                )
            );
        }
        let p = pool(&env, "p").await.unwrap();
        assert_eq!(p.claimed, warm.len() as u64);
        // Each claimed backend serves its key through the proxy.
        for r in warm.iter().take(3) {
            assert!(env.backend_env(&r.url).await.is_object());
        }
    })
    .await;
    env.shutdown().await;
}

/// A warm pool of containers (the `hangar-test-backend:latest` image): filled, claimed through a
/// connect with the same executable, served through the proxy, refilled, and its unclaimed containers
/// removed when the pool is deleted. Skipped without Docker, except under CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_warm_pool() {
    use hangar_test_support::docker::{docker_ready, TestRun};
    use hangar_types::executable::{Executable, ExecutorKind};
    if !docker_ready() {
        return;
    }
    let run = TestRun::new();
    let mut env = TestEnv::controller_only(false).await;
    env.add_drone(|c| c.executors = vec![ExecutorKind::Docker, ExecutorKind::Process])
        .await;
    env.start_proxy().await;
    within(async {
        let never_pull = serde_json::json!({"pull_policy": "Never"});
        let executable = Executable::Docker(Box::new(
            run.executable_with(&[("GREETING", "warm")], never_pull),
        ));
        let mut pool_config = config(2, &[]);
        pool_config.executable = executable.clone();
        env.client
            .put_warm_pool(&name("d"), &pool_config)
            .await
            .unwrap();
        wait_counts(&env, "d", 2, 0).await;
        assert_eq!(run.containers().len(), 2);

        let mut req = env.connect_request("docker-warm", &[]);
        req.spawn_config.as_mut().unwrap().executable = executable;
        let resp = env.connect(&req).await;
        assert!(resp.warm && resp.status == BackendStatus::Ready, "{resp:?}");
        let body = env.get(&resp.url).await;
        assert_eq!(body.status(), 200);
        let vars = env.backend_env(&resp.url).await;
        assert_eq!(vars["GREETING"], "warm");
        assert_eq!(vars["SESSION_BACKEND_ID"], resp.backend_id.as_str());

        wait_counts(&env, "d", 2, 0).await;
        assert_eq!(run.containers().len(), 3);
        let left = unclaimed(&env).await;
        env.client.delete_warm_pool(&name("d")).await.unwrap();
        for u in &left {
            env.terminated(&u.id).await;
        }
        eventually("unclaimed containers removed", || async {
            (run.containers().len() == 1).then_some(())
        })
        .await;
        env.soft_terminated(&resp.backend_id).await;
    })
    .await;
    env.shutdown().await;
}
