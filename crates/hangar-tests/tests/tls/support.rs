//! Fixtures of the TLS tests: a test CA (rcgen), a TLS client that connects to a proxy's HTTPS port
//! with SNI and `Host` set to the cluster and reports the certificate it got, Hangar's DNS responder,
//! and proxies with HTTPS and ACME against Pebble.

use crate::pebble::Pebble;
use bytes::Bytes;
use hangar_dns::{DnsConfig, DnsHandle};
use hangar_proxy::{AcmeChallenge, AcmeConfig, ProxyConfig, ProxyHandle, ProxyListeners};
use hangar_tests::TestEnv;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::CertificateParams;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::client::TlsStream;

/// Upper bound of every TLS test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn with_timeout<F: std::future::Future>(body: F) -> F::Output {
    hangar_test_support::with_timeout(TEST_TIMEOUT, body).await
}

pub use hangar_test_support::tls::{Issued, TestCa};

/// A leaf for `names` and `ips` from `ca`, valid for `days`.
pub fn issue(ca: &TestCa, names: &[String], ips: &[&str], days: i64) -> Issued {
    let mut params = CertificateParams::new(names.to_vec()).unwrap();
    for ip in ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(ip.parse().unwrap()));
    }
    ca.issue(params, days)
}

/// A TLS client trusting only the roots in `root_pem`, offering `alpn`.
pub fn client_config(root_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    hangar_test_support::tls::client_config(roots, alpn)
}

/// Connects to `addr` with TLS, SNI `host`.
pub async fn tls_connect(
    addr: SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Serial (lowercase hex) of the leaf certificate the server presented.
pub fn peer_serial(tls: &TlsStream<TcpStream>) -> String {
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
    leaf.tbs_certificate.serial.to_str_radix(16)
}

/// `GET https://<host><path>` over `tls` with HTTP/1.1; returns status and body.
pub async fn https_get(tls: TlsStream<TcpStream>, host: &str, path: &str) -> (u16, Bytes) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("https://{host}{path}"))
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Hangar's DNS responder on a free port (UDP and TCP), answering from the controller.
pub async fn start_dns(controller_url: url::Url) -> DnsHandle {
    let mut config = DnsConfig::new(controller_url, None);
    config.host = "127.0.0.1".parse().unwrap();
    // The same port for UDP and TCP (resolvers fall back to TCP on the UDP port).
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            config.port = port;
            return hangar_dns::start_with_controller(config, udp, tcp)
                .await
                .unwrap();
        }
    }
    panic!("no free port for the DNS responder");
}

/// ACME settings for Pebble: fast retries, no waits.
pub fn acme_config(pebble: &Pebble, challenge: AcmeChallenge) -> AcmeConfig {
    let mut acme = AcmeConfig::new(pebble.directory_url.clone(), "ops@plane.test".into());
    acme.challenge = challenge;
    acme.ca_cert_path = Some(pebble.ca_cert_path.clone());
    acme.challenge_wait = Duration::ZERO;
    acme.retry_initial = Duration::from_millis(500);
    acme.retry_max = Duration::from_secs(2);
    acme.lease_retry = Duration::from_secs(1);
    acme.order_timeout = Duration::from_secs(60);
    acme
}

/// Starts a proxy of `env`'s cluster with HTTP and HTTPS listeners on free ports (or `http` for the
/// HTTP port) and `adjust`ed configuration; waits until it is connected.
pub async fn start_tls_proxy(
    env: &TestEnv,
    http: Option<TcpListener>,
    adjust: impl FnOnce(&mut ProxyConfig),
) -> ProxyHandle {
    let mut config = ProxyConfig::new(env.controller_url(), env.cluster.clone());
    adjust(&mut config);
    let http = match http {
        Some(listener) => listener,
        None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let listeners = ProxyListeners {
        http,
        https: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    };
    let proxy = hangar_proxy::start_with_listeners(config, listeners)
        .await
        .unwrap();
    hangar_tests::eventually("proxy to connect", || async {
        proxy.is_ready().then_some(())
    })
    .await;
    proxy
}

/// Waits until `proxy` serves an ACME certificate different from `previous` (by serial) and returns
/// its serial. Shows Pebble's log when it does not happen.
pub async fn wait_for_acme_certificate(
    proxy: &ProxyHandle,
    pebble: &Pebble,
    previous: Option<&str>,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(info) = proxy.certificate() {
            if Some(info.serial.as_str()) != previous {
                return info.serial;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate from Pebble within 60 s; Pebble's log:\n{}",
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON certificate file a proxy wrote. A proxy serves a new certificate first and writes the
/// file right after (atomically, by rename), so this waits for the file to appear.
pub async fn read_cert_file(path: &Path) -> serde_json::Value {
    let text = hangar_tests::eventually("the certificate file to be written", || async {
        std::fs::read_to_string(path).ok()
    })
    .await;
    serde_json::from_str(&text).unwrap()
}
