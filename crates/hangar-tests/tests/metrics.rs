//! Prometheus metrics end to end: a controller, a process drone and a proxy with its metrics
//! listener; connects and proxied requests, then both `/metrics` endpoints scraped over HTTP and
//! their samples parsed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_proxy::ProxyConfig;
use hangar_test_support::prometheus::parse_exposition;
use hangar_tests::{eventually, within, TestEnv};
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::net::TcpListener;

struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn fetch(http: &reqwest::Client, url: &str) -> Scrape {
        let response = http.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Scrape(parse_exposition(&response.text().await.unwrap()))
    }

    /// Checks each `(series, value)`.
    fn assert_values(&self, expected: &[(&str, f64)]) {
        for (series, value) in expected {
            assert_eq!(self.get(series), *value, "{series}");
        }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:?}", self.0.keys()))
    }
}

/// Starts the environment's proxy on the cluster port with a metrics listener on a free port.
async fn start_proxy_with_metrics(env: &mut TestEnv) -> SocketAddr {
    let port = env.cluster.port().unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let config = ProxyConfig {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..ProxyConfig::new(env.controller_url(), env.cluster.clone())
    };
    let proxy = hangar_proxy::start(config, listener).await.unwrap();
    eventually("proxy to connect", || async {
        proxy.is_ready().then_some(())
    })
    .await;
    let addr = proxy.metrics_addr().expect("metrics listener bound");
    assert_ne!(addr.port(), 0);
    env.proxy = Some(proxy);
    addr
}

#[tokio::test]
async fn connects_and_proxied_requests_are_counted() {
    within(async {
        let mut env = TestEnv::controller_only(false).await;
        env.add_drone(|_| {}).await;
        let metrics_addr = start_proxy_with_metrics(&mut env).await;
        let proxy_metrics = format!("http://{metrics_addr}/metrics");
        let controller_metrics = format!("{}metrics", env.controller_url());

        let request = env.connect_request("metrics-1", &[]);
        let created = env.connect_ready(&request).await;
        assert!(created.spawned);
        let reused = env.connect(&request).await;
        assert!(!reused.spawned);
        assert_eq!(reused.backend_id, created.backend_id);

        // Two requests with one token: the first asks the controller, the second hits the cache.
        for _ in 0..2 {
            let response = env.get(&created.url).await;
            assert_eq!(response.status(), 200);
            assert_eq!(
                response.text().await.unwrap(),
                "hello from hangar-test-backend"
            );
        }
        // The public port does not serve metrics: `/metrics` is a token path like any other.
        let public = env.get(format!("http://{}/metrics", env.cluster)).await;
        assert_eq!(public.status(), 410);
        assert!(!public.text().await.unwrap().contains("hangar_proxy_"));
        // And the metrics listener serves nothing else.
        let other = env.get(format!("http://{metrics_addr}/other")).await;
        assert_eq!(other.status(), 404);

        let c = Scrape::fetch(&env.http, &controller_metrics).await;
        c.assert_values(&[
            (r#"hangar_connect_requests_total{outcome="created"}"#, 1.0),
            (r#"hangar_connect_requests_total{outcome="reused"}"#, 1.0),
            (r#"hangar_connect_requests_total{outcome="error"}"#, 0.0),
            ("hangar_connect_duration_seconds_count", 2.0),
            (r#"hangar_node_sessions{kind="drone"}"#, 1.0),
            (r#"hangar_node_sessions{kind="proxy"}"#, 1.0),
            (r#"hangar_node_sessions{kind="dns"}"#, 0.0),
            (r#"hangar_backend_state_changes_total{status="ready"}"#, 1.0),
        ]);

        let p = Scrape::fetch(&env.http, &proxy_metrics).await;
        p.assert_values(&[
            (r#"hangar_proxy_requests_total{code_class="2xx"}"#, 2.0),
            (r#"hangar_proxy_requests_total{code_class="4xx"}"#, 1.0),
            (r#"hangar_proxy_requests_total{code_class="5xx"}"#, 0.0),
            ("hangar_proxy_request_duration_seconds_count", 3.0),
            (r#"hangar_proxy_route_cache_total{result="hit"}"#, 1.0),
            // The backend's token and the `metrics` token.
            (r#"hangar_proxy_route_cache_total{result="miss"}"#, 2.0),
            (r#"hangar_proxy_route_cache_total{result="coalesced"}"#, 0.0),
            ("hangar_proxy_upstream_errors_total", 0.0),
            ("hangar_proxy_websockets_open", 0.0),
        ]);
        let open = p.get("hangar_proxy_open_connections");
        assert!((0.0..=3.0).contains(&open), "{open}");
        env.shutdown().await;
    })
    .await;
}
