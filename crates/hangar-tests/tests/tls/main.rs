//! HTTPS with certificates from an ACME CA (Pebble), end to end: a real controller, drone, Hangar's DNS
//! responder and proxies with HTTPS listeners. DNS-01 goes through the controller's certificate lease
//! and TXT value and Hangar's DNS responder; HTTP-01 through the proxy's HTTP port. Clients trust only
//! Pebble's issuing root and check which certificate (serial) the proxy serves.

// Test fixtures outside `#[test]` functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pebble;
mod support;

use futures_util::{SinkExt, StreamExt};
use hangar_proxy::{AcmeChallenge, AcmeConfig, CertSource, EabConfig};
use hangar_tests::TestEnv;
use pebble::{Pebble, PebbleOptions};
use std::net::SocketAddr;
use std::time::Duration;
use support::{
    acme_config, client_config, https_get, peer_serial, read_cert_file, start_dns, start_tls_proxy,
    tls_connect, wait_for_acme_certificate, with_timeout,
};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CLUSTER: &str = "plane.test";

/// Runs a test that needs Pebble with [`with_timeout`]; skips it where Pebble is not installed.
async fn with_pebble(test: impl std::future::Future<Output = ()>) {
    if pebble::available() {
        with_timeout(test).await;
    }
}

/// A controller and a drone for `cluster`.
async fn env_for(cluster: &str) -> TestEnv {
    let mut env = TestEnv::controller_only(false).await;
    env.cluster = cluster.parse().unwrap();
    env.add_drone(|_| {}).await;
    env
}

/// What a DNS-01 test runs: a controller and a drone for [`CLUSTER`], Hangar's DNS responder asking
/// that controller, and Pebble resolving through the responder.
struct Dns01 {
    env: TestEnv,
    dns: hangar_dns::DnsHandle,
    pebble: Pebble,
}

impl Dns01 {
    /// Starts it all; `options` adjusts Pebble's (its DNS server is set here).
    async fn start(options: PebbleOptions) -> Dns01 {
        let env = env_for(CLUSTER).await;
        let dns = start_dns(env.controller_url()).await;
        let pebble = Pebble::start(PebbleOptions {
            dns_server: Some(dns.local_addr()),
            ..options
        })
        .await;
        Dns01 { env, dns, pebble }
    }

    /// The serial of the certificate `addr` serves for [`CLUSTER`] to a client trusting only Pebble's
    /// root and offering `alpn`.
    async fn served_serial(&self, addr: SocketAddr, alpn: &[u8]) -> String {
        let root = self.pebble.issuing_root().await;
        let tls = tls_connect(addr, CLUSTER, client_config(&root, &[alpn]))
            .await
            .unwrap();
        peer_serial(&tls)
    }

    async fn shutdown(self) {
        self.pebble.stop().await;
        self.dns.shutdown().await;
        self.env.shutdown().await;
    }
}

/// Runs `test` with [`with_pebble`] against a started [`Dns01`] (`options` adjusts Pebble's), and
/// shuts it down after it.
async fn with_dns01(options: PebbleOptions, test: impl AsyncFnOnce(&Dns01)) {
    with_pebble(async {
        let world = Dns01::start(options).await;
        test(&world).await;
        world.shutdown().await;
    })
    .await;
}

/// ACME over DNS-01 with Pebble's external account `kid-1`.
fn acme_with_eab(pebble: &Pebble, hmac_key: &str) -> AcmeConfig {
    let mut acme = acme_config(pebble, AcmeChallenge::Dns01);
    acme.eab = Some(EabConfig {
        key_id: "kid-1".into(),
        hmac_key: hmac_key.into(),
    });
    acme
}

#[tokio::test]
async fn dns01_certificate_serves_https_and_wss_to_a_backend() {
    with_dns01(PebbleOptions::default(), async |world| {
        let (env, pebble) = (&world.env, &world.pebble);
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("cert.json");
        let proxy = start_tls_proxy(env, None, |c| {
            c.cert_path = Some(cert_path.clone());
            c.acme = Some(acme_config(pebble, AcmeChallenge::Dns01));
        })
        .await;

        let serial = wait_for_acme_certificate(&proxy, pebble, None).await;
        let info = proxy.certificate().unwrap();
        assert_eq!(info.source, CertSource::Acme);
        assert!(info.covers("plane.test") && info.covers("anything.plane.test"));
        assert_eq!(proxy.acme_orders(), 1);
        assert_eq!(pebble.orders(), 1);
        // Saved for restarts: the certificate file and the ACME account.
        let saved = read_cert_file(&cert_path).await;
        assert!(saved["cert"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert!(saved["key"].as_str().unwrap().contains("PRIVATE KEY"));
        assert!(dir.path().join("cert.json.acme-account.json").exists());

        // A client trusting only Pebble's root reaches a backend over HTTPS…
        let root = pebble.issuing_root().await;
        let https = proxy.https_addr().unwrap();
        let resp = env
            .connect_ready(&env.connect_request("tls-dns", &[]))
            .await;
        let url: url::Url = resp.url.parse().unwrap();
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some(CLUSTER));
        let tls = tls_connect(https, CLUSTER, client_config(&root, &[b"http/1.1"]))
            .await
            .unwrap();
        assert_eq!(peer_serial(&tls), serial);
        let (status, body) = https_get(tls, CLUSTER, url.path()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

        // …and over WSS.
        let tls = tls_connect(https, CLUSTER, client_config(&root, &[b"http/1.1"]))
            .await
            .unwrap();
        let request = format!("wss://{CLUSTER}{}ws", url.path())
            .into_client_request()
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
        ws.send(Message::text("hello over wss")).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("hello over wss")
        );
        ws.close(None).await.unwrap();

        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn two_proxies_of_a_cluster_order_once_and_serve_the_same_certificate() {
    with_dns01(PebbleOptions::default(), async |world| {
        let (env, pebble) = (&world.env, &world.pebble);
        let dir = tempfile::tempdir().unwrap();
        let mut proxies = Vec::new();
        for name in ["a.json", "b.json"] {
            let path = dir.path().join(name);
            proxies.push(
                start_tls_proxy(env, None, |c| {
                    c.cert_path = Some(path);
                    c.acme = Some(acme_config(pebble, AcmeChallenge::Dns01));
                })
                .await,
            );
        }
        let a = wait_for_acme_certificate(&proxies[0], pebble, None).await;
        let b = wait_for_acme_certificate(&proxies[1], pebble, None).await;
        assert_eq!(a, b, "both proxies serve the cluster's one certificate");
        let orders: u64 = proxies.iter().map(|p| p.acme_orders()).sum();
        assert_eq!(orders, 1, "only the lease holder orders");
        assert_eq!(pebble.orders(), 1, "Pebble saw one order");
        let sources: Vec<CertSource> = proxies
            .iter()
            .map(|p| p.certificate().unwrap().source)
            .collect();
        assert!(sources.contains(&CertSource::Acme) && sources.contains(&CertSource::Controller));
        // The proxy that did not order keeps the shared certificate in its file too.
        for name in ["a.json", "b.json"] {
            let path = dir.path().join(name);
            hangar_tests::eventually("the certificate file to be written", || async {
                path.exists().then_some(())
            })
            .await;
        }
        for proxy in &proxies {
            let served = world.served_serial(proxy.https_addr().unwrap(), b"h2");
            assert_eq!(served.await, a);
        }

        for proxy in proxies {
            proxy.shutdown().await;
        }
    })
    .await;
}

#[tokio::test]
async fn certificates_close_to_expiry_are_renewed() {
    // Certificates live 20 s and are renewed with 15 s left: about 5 s after each issuance.
    let options = PebbleOptions {
        validity_seconds: Some(20),
        ..PebbleOptions::default()
    };
    with_dns01(options, async |world| {
        let (env, pebble) = (&world.env, &world.pebble);
        let proxy = start_tls_proxy(env, None, |c| {
            c.renew_before = Duration::from_secs(15);
            c.acme = Some(acme_config(pebble, AcmeChallenge::Dns01));
        })
        .await;
        let first = wait_for_acme_certificate(&proxy, pebble, None).await;
        let lifetime = {
            let info = proxy.certificate().unwrap();
            info.not_after.duration_since(info.not_before).unwrap()
        };
        assert!(lifetime <= Duration::from_secs(30), "{lifetime:?}");
        let second = wait_for_acme_certificate(&proxy, pebble, Some(&first)).await;
        assert_ne!(first, second);
        assert!(proxy.acme_orders() >= 2);
        let served = world.served_serial(proxy.https_addr().unwrap(), b"http/1.1");
        assert_ne!(served.await, first, "the renewed certificate is served");

        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn external_account_binding_and_a_restart_from_the_saved_file() {
    let hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let options = PebbleOptions {
        eab: Some(("kid-1".into(), hmac_key.into())),
        // 40 days: not due with the default 30-day margin, due with a 60-day one (below).
        validity_seconds: Some(40 * 86400),
        ..PebbleOptions::default()
    };
    with_dns01(options, async |world| {
        let (env, pebble) = (&world.env, &world.pebble);
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("cert.json");
        let proxy = start_tls_proxy(env, None, |c| {
            c.cert_path = Some(cert_path.clone());
            c.acme = Some(acme_with_eab(pebble, hmac_key));
        })
        .await;
        let serial = wait_for_acme_certificate(&proxy, pebble, None).await;
        // The proxy serves a new certificate first and writes the file right after.
        hangar_tests::eventually("the certificate file to be written", || async {
            cert_path.exists().then_some(())
        })
        .await;
        proxy.shutdown().await;

        // A proxy without ACME serves the saved file.
        let restarted = start_tls_proxy(env, None, |c| {
            c.cert_path = Some(cert_path.clone());
        })
        .await;
        let info = restarted.certificate().unwrap();
        assert_eq!(info.serial, serial);
        assert_eq!(info.source, CertSource::File);
        let served = world.served_serial(restarted.https_addr().unwrap(), b"http/1.1");
        assert_eq!(served.await, serial);
        restarted.shutdown().await;

        // A restart with ACME reuses the saved account: made to renew at once (a 60-day margin), it
        // orders without creating another account.
        assert_eq!(pebble.account_requests(), 1);
        let renewing = start_tls_proxy(env, None, |c| {
            c.cert_path = Some(cert_path.clone());
            c.renew_before = Duration::from_secs(60 * 86400);
            c.acme = Some(acme_with_eab(pebble, hmac_key));
        })
        .await;
        wait_for_acme_certificate(&renewing, pebble, Some(&serial)).await;
        assert_eq!(pebble.account_requests(), 1, "the saved account was reused");

        renewing.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn http01_certificate_via_the_http_port() {
    with_pebble(async {
        // Pebble must reach the proxy's HTTP port by the cluster's name: `localhost`.
        let cluster = "localhost";
        let env = env_for(cluster).await;
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pebble = Pebble::start(PebbleOptions {
            http_port: Some(http.local_addr().unwrap().port()),
            ..PebbleOptions::default()
        })
        .await;
        let proxy = start_tls_proxy(&env, Some(http), |c| {
            c.acme = Some(acme_config(&pebble, AcmeChallenge::Http01));
        })
        .await;
        let serial = wait_for_acme_certificate(&proxy, &pebble, None).await;
        let info = proxy.certificate().unwrap();
        assert_eq!(info.names, vec!["localhost".to_string()]);

        let root = pebble.issuing_root().await;
        let resp = env
            .connect_ready(&env.connect_request("tls-http01", &[]))
            .await;
        let url: url::Url = resp.url.parse().unwrap();
        let tls = tls_connect(
            proxy.https_addr().unwrap(),
            cluster,
            client_config(&root, &[b"http/1.1"]),
        )
        .await
        .unwrap();
        assert_eq!(peer_serial(&tls), serial);
        let (status, _) = https_get(tls, cluster, url.path()).await;
        assert_eq!(status, 200);

        proxy.shutdown().await;
        pebble.stop().await;
        env.shutdown().await;
    })
    .await;
}
