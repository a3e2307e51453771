//! Route lookups through the controller session: waiting for starting backends, coalescing,
//! invalidation, reconnects, keepalives, and graceful shutdown.

use crate::support::{eventually, with_env, with_routed, with_timeout, Answer, Env};
use hangar_types::protocol::ControllerToProxy;
use hangar_types::token::ConnectionToken;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn request_waits_for_a_starting_backend() {
    with_env(async |env| {
        let token = ConnectionToken::random();
        env.controller.set_answer(&token, Answer::Hold);
        let request = env.get(&format!("/{token}/hello")).send();
        let pending = tokio::spawn(request);
        eventually("the proxy asked for the route", || async {
            env.controller.route_requests(&token) == 1
        })
        .await;
        eventually("the request waits", || async {
            env.proxy.waiting_requests() == 1
        })
        .await;
        assert!(!pending.is_finished());
        env.controller
            .release(&token, Some(env.route("b-slowstart")));
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        let seen: serde_json::Value = response.json().await.unwrap();
        assert_eq!(seen["path"], "/hello");
        assert_eq!(env.proxy.waiting_requests(), 0);
    })
    .await
}

#[tokio::test]
async fn route_wait_timeout_gives_504() {
    with_timeout(async {
        let env = Env::start_with(|c| c.route_wait_timeout = Duration::from_millis(200)).await;
        let token = ConnectionToken::random();
        env.controller.set_answer(&token, Answer::Hold);
        let response = env.get(&format!("/{token}/")).send().await.unwrap();
        assert_eq!(response.status(), 504);
        assert!(response.text().await.unwrap().contains("timed out"));
        assert_eq!(env.proxy.waiting_requests(), 0);
    })
    .await
}

#[tokio::test]
async fn concurrent_first_requests_share_one_route_request() {
    with_timeout(async {
        let env = Arc::new(Env::start().await);
        let token = ConnectionToken::random();
        env.controller.set_answer(&token, Answer::Hold);
        let requests: Vec<_> = (0..100)
            .map(|i| {
                let env = env.clone();
                let path = format!("/{token}/r{i}");
                tokio::spawn(async move { env.get(&path).send().await.unwrap().status() })
            })
            .collect();
        eventually("all 100 requests wait for the route", || async {
            env.proxy.waiting_requests() == 100
        })
        .await;
        assert_eq!(env.controller.route_requests(&token), 1);
        env.controller.release(&token, Some(env.route("b-herd")));
        for request in requests {
            assert_eq!(request.await.unwrap(), 200);
        }
        assert_eq!(env.controller.route_requests(&token), 1);
    })
    .await
}

#[tokio::test]
async fn backend_removed_makes_later_requests_410() {
    with_routed("b-removed", async |env, route, token| {
        let other = env.token_for(&env.route("b-kept"));
        env.echo(&format!("/{token}/")).await;
        env.echo(&format!("/{other}/")).await;
        env.controller.set_answer(&token, Answer::NoRoute);
        env.remove_terminating(&route, &token).await;
        let response = env.get(&format!("/{token}/")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "backend has terminated\n");
        // Other backends are unaffected, and the route came from the cache (one request only).
        env.echo(&format!("/{other}/")).await;
        assert_eq!(env.controller.route_requests(&other), 1);
    })
    .await
}

#[tokio::test]
async fn revoked_tokens_get_410() {
    with_routed("b-revoke", async |env, route, token| {
        let sibling = env.token_for(&route);
        env.echo(&format!("/{token}/")).await;
        env.echo(&format!("/{sibling}/")).await;
        env.controller.set_answer(&token, Answer::NoRoute);
        env.controller.push(ControllerToProxy::TokensRevoked {
            tokens: vec![token.clone()],
            holder: None,
        });
        eventually("requests with the revoked token get 410", || async {
            env.status_of(&format!("/{token}/")).await == 410
        })
        .await;
        // Another token for the same backend still works, from the cache.
        env.echo(&format!("/{sibling}/")).await;
        assert_eq!(env.controller.route_requests(&sibling), 1);
    })
    .await
}

#[tokio::test]
async fn outstanding_route_requests_are_resent_after_a_reconnect() {
    with_env(async |env| {
        let token = ConnectionToken::random();
        env.controller.set_answer(&token, Answer::Hold);
        let pending = tokio::spawn(env.get(&format!("/{token}/")).send());
        eventually("first route request", || async {
            env.controller.route_requests(&token) == 1
        })
        .await;
        env.controller.drop_sessions();
        eventually(
            "the request is sent again on the new connection",
            || async {
                env.controller.route_requests(&token) == 2 && env.controller.sessions() == 1
            },
        )
        .await;
        assert!(env.proxy.is_ready());
        env.controller
            .release(&token, Some(env.route("b-reconnect")));
        assert_eq!(pending.await.unwrap().unwrap().status(), 200);
    })
    .await
}

#[tokio::test]
async fn first_request_sends_a_keepalive_and_counts_settle() {
    with_routed("b-keepalive", async |env, route, token| {
        assert_eq!(env.proxy.connection_counts(&route.backend_id), None);
        env.echo(&format!("/{token}/")).await;
        eventually("keepalive at the controller", || async {
            env.controller.keepalives(&route.backend_id) >= 1
        })
        .await;
        eventually("the finished request is no longer open", || async {
            env.proxy
                .connection_counts(&route.backend_id)
                .is_some_and(|c| c.open_connections == 0 && c.recent_activity)
        })
        .await;
        // At most two keepalives for the first request: one when it was seen (connected) and one when
        // its connection closed, if the first one had said "connected". More requests within the
        // interval add none.
        env.echo(&format!("/{token}/again")).await;
        let sent = env.controller.keepalives(&route.backend_id);
        assert!((1..=2).contains(&sent), "{sent} keepalives");
    })
    .await
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    with_routed("b-shutdown", async |env, _, token| {
        let addr = env.proxy.local_addr();
        let request = tokio::spawn(env.get(&format!("/{token}/slow")).send());
        env.upstream
            .slow_started
            .lock()
            .await
            .recv()
            .await
            .expect("the slow request reached the backend");

        let draining = env.begin_shutdown();
        eventually("new connections are refused", || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await;
        assert!(!draining.shutdown.is_finished());
        draining.upstream.slow_gate.notify_one();
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "done");
        draining.shutdown.await.unwrap();
    })
    .await
}
