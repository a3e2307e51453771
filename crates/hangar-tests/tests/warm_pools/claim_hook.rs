//! Claim hooks (`claim_path`): the backend learns its key, fencing token, id and the connect's env
//! before the first proxied request; a refused or unanswered hook kills the backend and the connect
//! spawns cold; a drone restart in the middle of a hook never leaves a backend claimed twice.

use super::*;
use hangar_client::ClientError;
use hangar_types::BackendState;

/// A pool of `size` test backends with `env` whose claim hook is `POST /claim`.
fn hooked(size: u32, env: &[(&str, &str)]) -> WarmPoolConfig {
    WarmPoolConfig {
        claim_path: Some("/claim".into()),
        ..config(size, env)
    }
}

/// The `POST /claim` bodies a backend recorded, asked directly (not through the proxy).
async fn recorded_claims(env: &TestEnv, backend: &BackendId) -> Option<Vec<serde_json::Value>> {
    let row = env.store.backend(backend).await.ok()??;
    let BackendState::Ready { address } = row.state else {
        return None;
    };
    let url = format!("http://{address}/claim");
    env.http.get(url).send().await.ok()?.json().await.ok()
}

/// Fails unless the controller's metrics count `n` claims from pool `pool` with `outcome`.
async fn assert_claims(env: &TestEnv, pool: &str, outcome: &str, n: u32) {
    let url = env.controller_url().join("metrics").unwrap();
    let text = env.get(url).await.text().await.unwrap();
    let series = format!(r#"hangar_warm_claims_total{{pool="{pool}",outcome="{outcome}"}} {n}"#);
    assert!(text.contains(&series), "{series} in {text}");
}

/// A refused hook (non-2xx, then a timeout): that backend is terminated and the connect spawns
/// cold; then an accepting hook: the backend got its identity and the connect's env before the
/// first proxied request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_hook_refused_then_accepted() {
    let env = TestEnv::start().await;
    within(async {
        for (round, answer) in ["status:503", "hang"].into_iter().enumerate() {
            let pool_env = [("TEST_BACKEND_CLAIM", answer)];
            put_and_fill(&env, "h", hooked(1, &pool_env)).await;
            // The previous executable's backend, if any, is retired by the next fill pass.
            let warm = eventually("one unclaimed backend", || async {
                let now = unclaimed(&env).await;
                (now.len() == 1).then(|| now[0].id.clone())
            })
            .await;
            // The connect's env differs from the pool's: with a hook it still claims.
            let key = format!("refused-{round}");
            let cold = connect(&env, &key, &[("SECRET", "s1")]).await;
            assert!(!cold.warm && cold.spawned, "{answer}: {cold:?}");
            assert_ne!(cold.backend_id, warm);
            assert_eq!(cold.status, BackendStatus::Scheduled);
            let end = env.terminated(&warm).await;
            assert_eq!(end.status, BackendStatus::Terminated);
            env.wait_for_status(&cold.backend_id, BackendStatus::Ready)
                .await;
            let seen = env.backend_env(&cold.url).await;
            assert_eq!(seen["SECRET"], "s1", "{seen}");
            assert_eq!(seen["SESSION_BACKEND_KEY"], key.as_str(), "{seen}");
            let row = env.store.backend(&cold.backend_id).await.unwrap().unwrap();
            assert_eq!(row.key.name.as_str(), key);
        }
        assert_claims(&env, "h", "hook_refused", 2).await;

        put_and_fill(&env, "h", hooked(1, &[])).await;
        let claimed = connect(&env, "accepted", &[("SECRET", "s2")]).await;
        assert!(claimed.warm && claimed.spawned, "{claimed:?}");
        assert_eq!(claimed.status, BackendStatus::Ready);
        // The first request through the proxy finds the claim already delivered.
        let resp = env.get(format!("{}claim", claimed.url)).await;
        assert_eq!(resp.status(), 200);
        let claims: serde_json::Value = resp.json().await.unwrap();
        let claims = claims
            .as_array()
            .unwrap_or_else(|| panic!("{claims}"))
            .clone();
        assert_eq!(claims.len(), 1, "{claims:?}");
        let row = env
            .store
            .backend(&claimed.backend_id)
            .await
            .unwrap()
            .unwrap();
        let body = &claims[0];
        assert_eq!(body["backend_id"], claimed.backend_id.as_str(), "{body}");
        assert_eq!(body["key"]["name"], "accepted", "{body}");
        assert_eq!(body["fencing_token"], row.fencing_token, "{body}");
        assert!(body["static_token"].is_null(), "{body}");
        assert_eq!(body["env"], serde_json::json!({"SECRET": "s2"}), "{body}");
        assert_claims(&env, "h", "claimed", 1).await;
        // Without a hook, a different env never claims: the backend would run with an env the
        // connect did not ask for.
        put_and_fill(&env, "h", config(1, &[])).await;
        let other = connect(&env, "other-env", &[("SECRET", "s3")]).await;
        assert!(!other.warm, "{other:?}");
    })
    .await;
    env.shutdown().await;
}

/// The drone restarts while a claim hook is in flight (the backend never answers it): the connect
/// fails or spawns cold, the backend is terminated, nothing is claimed twice, the pool refills and
/// counts right, and the key gets a new backend afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drone_restart_during_a_claim_hook() {
    let mut env = TestEnv::controller_only(false).await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("drone.db");
    let drone_name: hangar_types::DroneName = "dr-warm-restart".parse().unwrap();
    env.add_drone_with_state(&state_file, &drone_name).await;
    env.start_proxy().await;
    within(async {
        let pool_env = [("TEST_BACKEND_CLAIM", "hang")];
        put_and_fill(&env, "r", hooked(2, &pool_env)).await;
        let before: Vec<BackendId> = unclaimed(&env).await.into_iter().map(|u| u.id).collect();
        let client = env.client.clone();
        let req = env.connect_request("restart", &[]);
        let connect = tokio::spawn(async move { client.connect(&req).await });
        // The hook reached one backend (it records the claim, then never answers).
        let hooked_backend = eventually("a backend to get the claim hook", || async {
            for id in &before {
                if recorded_claims(&env, id)
                    .await
                    .is_some_and(|c| !c.is_empty())
                {
                    return Some(id.clone());
                }
            }
            None
        })
        .await;
        env.drones.remove(0).shutdown().await;
        env.add_drone_with_state(&state_file, &drone_name).await;
        let answer = connect.await.unwrap();
        match &answer {
            Ok(resp) => assert!(!resp.warm && resp.backend_id != hooked_backend, "{resp:?}"),
            Err(ClientError::Api { status, error }) => {
                assert_eq!(status.as_u16(), 503, "{error}");
                // Which one depends on how the hook ends as the drone stops: its session closes
                // with the hook unanswered (`DroneUnreachable`), or the stopping drone reports the
                // hook failed and the cold spawn finds no drone until the new one is up
                // (`NoDroneAvailable`).
                assert!(
                    matches!(
                        error.kind,
                        ApiErrorKind::DroneUnreachable | ApiErrorKind::NoDroneAvailable
                    ),
                    "{error}"
                );
            }
            Err(e) => panic!("unexpected connect error {e}"),
        }
        env.terminated(&hooked_backend).await;
        // Claimed once: never listed unclaimed again; the pool refills to its size.
        let p = wait_counts(&env, "r", 2, 0).await;
        assert_eq!(p.claimed, 1);
        assert!(!unclaimed(&env).await.iter().any(|u| u.id == hooked_backend));
        let row = env.store.backend(&hooked_backend).await.unwrap().unwrap();
        assert_eq!(row.key.name.as_str(), "restart");
        // The key is free again: a connect gets a backend that is not the hooked one.
        if answer.is_err() {
            let mut req = env.connect_request("restart", &[]);
            req.spawn_config.as_mut().unwrap().executable = backend_executable(&[("X", "1")]);
            let again = env.connect(&req).await;
            assert_ne!(again.backend_id, hooked_backend);
        }
    })
    .await;
    env.shutdown().await;
}
