//! Proxy sessions over real WebSockets: route requests (ready, pending, unknown), removal notices,
//! keepalives and revocations.

use crate::support::*;
use hangar_types::protocol::{ControllerToProxy, ProxyToController};
use hangar_types::timing::KEY_LEASE;
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendState, BackendStatus, TerminationKind, TerminationReason};
use serde_json::json;
use std::time::Duration;

/// Asks for the route of `token` and returns once the request is waiting: requests are handled in
/// order, so when the answer to a later request arrives, the first one is pending.
async fn request_pending_route(proxy: &mut FakeProxy, token: &ConnectionToken) {
    proxy
        .send(&ProxyToController::RouteRequest {
            token: token.clone(),
        })
        .await;
    assert_eq!(
        proxy
            .route(&ConnectionToken::from_path_segment("other"))
            .await,
        None
    );
}

#[tokio::test]
async fn unknown_token_gets_no_route() {
    with_controller(async |ctl| {
        let mut proxy = FakeProxy::connect(ctl).await;
        let token = ConnectionToken::from_path_segment("nope");
        assert_eq!(proxy.route(&token).await, None);
        // Garbage does not end the session.
        proxy.ws.send_raw("{]").await;
        assert_eq!(proxy.route(&token).await, None);
    })
    .await
}

#[tokio::test]
async fn pending_route_is_answered_when_the_backend_is_ready() {
    with_drone_proxy_and_backend("p", async |_, mut drone, mut proxy, connected| {
        request_pending_route(&mut proxy, &connected.token).await;
        assert!(
            proxy.seen.is_empty(),
            "answered too early: {:?}",
            proxy.seen
        );

        drone.make_ready(&connected.backend_id).await;
        let info = proxy
            .wait_route(&connected.token)
            .await
            .expect("a route once ready");
        assert_eq!(info.backend_id, connected.backend_id);
        assert_eq!(info.address, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(info.user.as_deref(), Some("alice"));
        assert_eq!(info.secret_token, connected.secret_token.clone().unwrap());
        assert_eq!(info.user_data.unwrap()["role"], "tester");

        // Ready now: answered at once.
        assert!(proxy.route(&connected.token).await.is_some());
    })
    .await
}

/// `hangar_route_lookups_total{answer}` as this controller's `/metrics` reports it.
async fn route_lookups(ctl: &TestController, answer: &str) -> f64 {
    let text = ctl.get("/metrics").await.text().await.unwrap();
    let prefix = format!("hangar_route_lookups_total{{answer=\"{answer}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no route lookup series for {answer}:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_pending_route_is_looked_up_again_only_once_the_backend_may_be_ready() {
    with_drone_proxy_and_backend("once", async |ctl, mut drone, mut proxy, connected| {
        request_pending_route(&mut proxy, &connected.token).await;
        assert_eq!(route_lookups(ctl, "pending").await, 1.0);
        // `loading`, `starting` and `waiting` cannot give the token a route: no lookup for them;
        // `ready` does.
        drone.make_ready(&connected.backend_id).await;
        assert!(proxy.wait_route(&connected.token).await.is_some());
        assert_eq!(route_lookups(ctl, "pending").await, 1.0);
        assert_eq!(route_lookups(ctl, "route").await, 1.0);
        assert_eq!(route_lookups(ctl, "error").await, 0.0);
    })
    .await
}

#[tokio::test]
async fn pending_route_gets_none_when_the_backend_terminates() {
    with_drone_proxy_and_backend("dies", async |_, mut drone, mut proxy, connected| {
        request_pending_route(&mut proxy, &connected.token).await;
        drone
            .report(
                1,
                &connected.backend_id,
                BackendState::Terminated {
                    last_status: BackendStatus::Scheduled,
                    termination: None,
                    reason: Some(TerminationReason::InternalError),
                    exit_code: None,
                    message: Some("could not start".into()),
                    oom_killed: false,
                },
            )
            .await;
        assert_eq!(proxy.wait_route(&connected.token).await, None);
    })
    .await
}

#[tokio::test]
async fn terminating_backend_is_removed_from_proxies() {
    with_proxy_and_ready_backend("rm", async |_, mut drone, mut proxy, connected| {
        assert!(proxy.route(&connected.token).await.is_some());

        drone
            .report(
                2,
                &connected.backend_id,
                BackendState::Terminating {
                    last_status: BackendStatus::Ready,
                    termination: TerminationKind::Soft,
                    reason: TerminationReason::External,
                },
            )
            .await;
        proxy.expect_removed(&connected.backend_id).await;
        assert_eq!(proxy.route(&connected.token).await, None);

        drone
            .report(3, &connected.backend_id, soft_terminated_state(0))
            .await;
        proxy.expect_removed(&connected.backend_id).await;

        // A keepalive for a gone backend is answered with a removal too.
        proxy.seen.clear();
        proxy
            .send(&ProxyToController::KeepAlive {
                backend: connected.backend_id.clone(),
                connected: false,
            })
            .await;
        proxy.expect_removed(&connected.backend_id).await;
    })
    .await
}

#[tokio::test]
async fn revoke_pushes_tokens_revoked_to_proxies() {
    with_drone_proxy_and_backend("rev", async |ctl, _drone, mut proxy, connected| {
        let response = ctl
            .post(
                "/ctrl/revoke",
                &json!({"backend_id": connected.backend_id, "user": "alice"}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let (tokens, holder) = proxy
            .expect(|m| match m {
                ControllerToProxy::TokensRevoked { tokens, holder } => {
                    Some((tokens.clone(), holder.clone()))
                }
                _ => None,
            })
            .await;
        assert_eq!(tokens, vec![connected.token.clone()]);
        let holder = holder.expect("the revocation names its holder");
        assert_eq!(
            (holder.backend.as_str(), holder.user.as_str()),
            (connected.backend_id.as_str(), "alice")
        );
        assert_eq!(proxy.route(&connected.token).await, None);
    })
    .await
}

/// A route carries how long its backend's key lease still runs, and so does the answer to every
/// keepalive: a proxy cut off from the controllers must stop using the route before the key can go to
/// another backend. A ready backend whose lease has run out has no route.
#[tokio::test]
async fn routes_and_keepalive_answers_carry_the_key_lease() {
    with_proxy_and_ready_backend("lease", async |ctl, _drone, mut proxy, connected| {
        let route = proxy.route(&connected.token).await.expect("a route");
        let left = route
            .lease_remaining()
            .expect("a keyed backend's route is bounded");
        assert!(left <= KEY_LEASE && left > KEY_LEASE / 2, "{left:?}");

        proxy
            .send(&ProxyToController::KeepAlive {
                backend: connected.backend_id.clone(),
                connected: true,
            })
            .await;
        let remaining_ms = proxy
            .expect(|m| match m {
                ControllerToProxy::KeyLease {
                    backend,
                    remaining_ms,
                } if *backend == connected.backend_id => Some(*remaining_ms),
                _ => None,
            })
            .await;
        let remaining = Duration::from_millis(remaining_ms);
        assert!(
            remaining <= KEY_LEASE && remaining > KEY_LEASE / 2,
            "{remaining:?}"
        );

        ctl.advance_clock(KEY_LEASE + Duration::from_secs(1)).await;
        assert_eq!(proxy.route(&connected.token).await, None);
    })
    .await
}
