//! Several connection workers: connections are spread over all of them, each worker's connections
//! are served, and a graceful shutdown drains every worker.

use crate::support::{eventually, with_timeout, Env};

/// Connections opened at once; with two workers the chance that `SO_REUSEPORT` puts them all on one
/// socket is 2^-31.
const CONNECTIONS: usize = 32;

#[tokio::test]
async fn connections_spread_over_workers_and_shutdown_drains_every_worker() {
    with_timeout(async {
        let env = Env::start_with(|config| config.workers = 2).await;
        assert_eq!(env.proxy.monitor().accepted_per_worker().len(), 2);
        let (_, token) = env.routed("b-workers");
        let mut requests = Vec::new();
        for _ in 0..CONNECTIONS {
            // A client of its own per request: one connection each.
            let client = reqwest::Client::new();
            let request = client
                .get(env.url(&format!("/{token}/slow")))
                .header("host", env.cluster.as_str());
            requests.push(tokio::spawn(request.send()));
        }
        {
            let mut started = env.upstream.slow_started.lock().await;
            for _ in 0..CONNECTIONS {
                started
                    .recv()
                    .await
                    .expect("a slow request reached the backend");
            }
        }
        let accepted = env.proxy.monitor().accepted_per_worker();
        assert_eq!(
            accepted.iter().sum::<u64>(),
            CONNECTIONS as u64,
            "{accepted:?}"
        );
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");

        let addr = env.proxy.local_addr();
        let draining = env.begin_shutdown();
        // Both workers' sockets are closed: every new connection is refused.
        eventually("new connections are refused", || async {
            for _ in 0..8 {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(!draining.shutdown.is_finished());
        assert_eq!(draining.monitor.open_client_connections(), CONNECTIONS);
        draining.upstream.slow_gate.notify_waiters();
        for request in requests {
            let response = request.await.unwrap().unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await.unwrap(), "done");
        }
        draining.shutdown.await.unwrap();
        assert_eq!(draining.monitor.open_client_connections(), 0);
    })
    .await
}

#[tokio::test]
async fn one_worker_serves_everything() {
    with_timeout(async {
        let env = Env::start_with(|config| config.workers = 1).await;
        let (_, token) = env.routed("b-one-worker");
        for _ in 0..3 {
            let client = reqwest::Client::new();
            let response = client
                .get(env.url(&format!("/{token}/x")))
                .header("host", env.cluster.as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        assert_eq!(env.proxy.monitor().accepted_per_worker(), vec![3]);
        env.proxy.shutdown().await;
    })
    .await
}
