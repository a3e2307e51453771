//! Two controllers sharing one PostgreSQL database: a drone on one, a proxy and the API client on the
//! other, everything relayed through the store's event bus.

use crate::status_stream::SseReader;
use crate::support::*;
use crate::tls::lease;
use hangar_controller::ControllerConfig;
use hangar_store::postgres::PostgresStore;
use hangar_types::protocol::{ControllerToProxy, ProxyToController};
use hangar_types::{BackendState, BackendStatus, TerminationKind, TerminationReason};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

fn config() -> ControllerConfig {
    ControllerConfig {
        default_cluster: Some(CLUSTER.parse().unwrap()),
        ..Default::default()
    }
}

/// Runs `test` with two controllers, A and B, each on its own pool of one fresh PostgreSQL database;
/// then shuts both down and drops the database, also when the test fails (it runs in a task).
async fn with_two_controllers<F, Fut>(test: F)
where
    F: FnOnce(TestController, TestController) -> Fut + Send + 'static,
    Fut: Future<Output = (TestController, TestController)> + Send,
{
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let url = db.url().to_string();
    let outcome = tokio::spawn(timed(async move {
        let store_a = Arc::new(PostgresStore::connect(&url).await.unwrap());
        let store_b = Arc::new(PostgresStore::connect(&url).await.unwrap());
        let a = TestController::start_on(config(), store_a.clone()).await;
        let b = TestController::start_on(config(), store_b.clone()).await;
        let (a, b) = test(a, b).await;
        a.shutdown().await;
        b.shutdown().await;
        store_a.close().await;
        store_b.close().await;
    }))
    .await;
    db.drop_database().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drone_on_one_controller_proxy_on_another() {
    with_two_controllers(|a, b| async move {
        let mut drone = FakeDrone::connect(&a).await;
        let mut proxy = FakeProxy::connect(&b).await;

        // Connect through B: B schedules on the drone attached to A, and A delivers the spawn.
        let connected = b.connect(&connect_body(Some("shared"))).await;
        let backend = connected.backend_id.clone();
        assert_eq!(connected.drone.as_ref(), Some(&drone.name));
        let mut stream = SseReader::open(&b, &backend, None).await;
        assert_eq!(stream.next().await.1["status"], "scheduled");

        // The proxy on B asks for the route while the backend is not ready.
        proxy
            .send(&ProxyToController::RouteRequest {
                token: connected.token.clone(),
            })
            .await;
        // The drone on A reports its way to ready; B answers the proxy's pending request.
        drone.make_ready(&backend).await;
        let route = proxy
            .expect(|m| match m {
                ControllerToProxy::RouteResponse { token, route } if *token == connected.token => {
                    Some(route.clone())
                }
                _ => None,
            })
            .await
            .expect("a route once the backend is ready");
        assert_eq!(route.backend_id, backend);
        assert_eq!(route.address, "127.0.0.1:4000".parse().unwrap());
        // B's status stream shows every state the drone reported through A.
        for status in ["loading", "starting", "waiting", "ready"] {
            assert_eq!(stream.next().await.1["status"], status);
        }

        // A soft terminate through B reaches the drone on A.
        let response = b
            .post(&format!("/ctrl/b/{backend}/soft-terminate"), &json!(null))
            .await;
        assert_eq!(response.status(), 200);
        drone
            .expect_terminate(&backend, TerminationKind::Soft, TerminationReason::External)
            .await;
        drone
            .report(
                2001,
                &backend,
                BackendState::Terminating {
                    last_status: BackendStatus::Ready,
                    termination: TerminationKind::Soft,
                    reason: TerminationReason::External,
                },
            )
            .await;
        assert_eq!(stream.next().await.1["status"], "terminating");
        proxy
            .expect(|m| {
                matches!(m, ControllerToProxy::BackendRemoved { backend: b, .. } if *b == backend)
                    .then_some(())
            })
            .await;
        (a, b)
    })
    .await;
}

/// Certificates and challenges set through one controller reach the proxies of the other; TXT values
/// set through one are answered by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_state_is_shared_between_controllers() {
    with_two_controllers(|a, b| async move {
        let mut on_a = FakeProxy::connect(&a).await;
        let mut on_b = FakeProxy::connect(&b).await;

        let accepted = lease(&mut on_a).await;
        assert!(accepted);
        let accepted = lease(&mut on_b).await;
        assert!(!accepted, "one lease per cluster across controllers");

        on_a.send(&ProxyToController::SetHttpChallenge {
            token: "tok".into(),
            key_authorization: Some("tok.thumb".into()),
        })
        .await;
        let challenge = on_b
            .expect(|m| matches!(m, ControllerToProxy::HttpChallenge { .. }).then(|| m.clone()))
            .await;
        assert_eq!(
            challenge,
            ControllerToProxy::HttpChallenge {
                token: "tok".into(),
                key_authorization: Some("tok.thumb".into())
            }
        );
        let cert = format!("-----BEGIN CERTIFICATE-----\n{}\n", "A".repeat(30_000));
        on_a.send(&ProxyToController::StoreCertificate {
            cert_pem: cert.clone(),
            key_pem: "-----BEGIN PRIVATE KEY-----\n".into(),
        })
        .await;
        let pushed = on_b
            .expect(|m| match m {
                ControllerToProxy::Certificate { cert_pem, .. } => Some(cert_pem.clone()),
                _ => None,
            })
            .await;
        assert_eq!(pushed, cert);
        (a, b)
    })
    .await;
}
