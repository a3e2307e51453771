//! HTTPS: certificates from files (JSON and PEM, reloaded on change, bad files ignored) and from the
//! controller, the redirecting HTTP port with ACME HTTP-01 answers and `/ready`, HTTP/1.1 and h2 over
//! TLS (ALPN), and WebSockets over TLS. Clients trust a test CA made with rcgen and check which
//! certificate (serial) the proxy served.

use crate::support::{eventually, with_timeout, Answer, FakeController, Upstream};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hangar_proxy::{CertSource, ProxyConfig, ProxyHandle, ProxyListeners};
use hangar_test_support::tls::TestCa;
use hangar_types::protocol::{ControllerToProxy, ProxyToController, RouteInfo};
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::ClusterName;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DnType, SerialNumber};
use rustls::pki_types::ServerName;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CLUSTER: &str = "plane.test";

/// The test CA, issuing leaves for the cluster.
struct ClusterCa(TestCa);

/// A certificate chain and key as PEM, with the leaf's serial (lowercase hex).
struct Issued {
    cert_pem: String,
    key_pem: String,
    serial: String,
}

impl ClusterCa {
    fn new() -> ClusterCa {
        ClusterCa(TestCa::new("Hangar test CA"))
    }

    /// A leaf for the cluster and its wildcard, valid for `days`, with serial `serial`.
    fn issue(&self, serial: u64, days: i64) -> Issued {
        let mut params =
            CertificateParams::new(vec![CLUSTER.to_string(), format!("*.{CLUSTER}")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, CLUSTER);
        params.serial_number = Some(SerialNumber::from(serial));
        let leaf = self.0.issue(params, days);
        Issued {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            serial: format!("{serial:x}"),
        }
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.0.client_config(alpn)
    }
}

fn json_file(issued: &Issued) -> String {
    serde_json::json!({"cert": issued.cert_pem, "key": issued.key_pem}).to_string()
}

/// A proxy of cluster `plane.test` with HTTP and HTTPS listeners, a fake controller and an upstream.
struct TlsEnv {
    controller: FakeController,
    upstream: Upstream,
    proxy: ProxyHandle,
    ca: ClusterCa,
    dir: tempfile::TempDir,
}

impl TlsEnv {
    /// Starts with `files` written into a fresh directory first; `adjust` sees the directory.
    async fn start(
        ca: ClusterCa,
        files: &[(&str, String)],
        adjust: impl FnOnce(&mut ProxyConfig, &std::path::Path),
    ) -> anyhow::Result<TlsEnv> {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let controller = FakeController::start().await;
        let upstream = Upstream::start().await;
        let cluster: ClusterName = CLUSTER.parse().unwrap();
        let mut config = ProxyConfig::new(controller.url(), cluster);
        config.cert_reload_interval = std::time::Duration::from_millis(100);
        adjust(&mut config, dir.path());
        let listeners = ProxyListeners {
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            https: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        };
        let proxy = hangar_proxy::start_with_listeners(config, listeners).await?;
        eventually("proxy connected", || async { proxy.is_ready() }).await;
        Ok(TlsEnv {
            controller,
            upstream,
            proxy,
            ca,
            dir,
        })
    }

    /// Starts with one certificate (serial `serial`, valid for `days`) in the file `cert.json`;
    /// `adjust` changes the configuration further.
    async fn start_with_cert_file(
        serial: u64,
        days: i64,
        adjust: impl FnOnce(&mut ProxyConfig),
    ) -> (TlsEnv, Issued) {
        let ca = ClusterCa::new();
        let issued = ca.issue(serial, days);
        let env = TlsEnv::start(ca, &[("cert.json", json_file(&issued))], |c, dir| {
            c.cert_path = Some(dir.join("cert.json"));
            adjust(c);
        })
        .await
        .unwrap();
        (env, issued)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn https_addr(&self) -> SocketAddr {
        self.proxy.https_addr().unwrap()
    }

    fn route(&self) -> RouteInfo {
        RouteInfo {
            backend_id: "tls-backend".parse().unwrap(),
            address: self.upstream.addr,
            secret_token: SecretToken::new("the-secret".into()),
            cluster: CLUSTER.parse().unwrap(),
            user: Some("alice".into()),
            user_data: None,
            subdomain: None,
            lease_remaining_ms: None,
        }
    }

    /// A token routed to the upstream, and a TLS connection to the HTTPS port offering `alpn`.
    async fn routed_tls(&self, alpn: &[&[u8]]) -> (ConnectionToken, TlsStream<TcpStream>) {
        (self.token(), self.tls(alpn).await.unwrap())
    }

    fn token(&self) -> ConnectionToken {
        let token = ConnectionToken::random();
        self.controller
            .set_answer(&token, Answer::Route(self.route()));
        token
    }

    /// Opens a TLS connection to the HTTPS port (SNI `plane.test`) offering `alpn`.
    async fn tls(&self, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
        tls_connect(self.https_addr(), self.ca.client_config(alpn)).await
    }

    /// The serial of the certificate a new handshake gets, or `None` when the handshake fails.
    async fn served_serial(&self) -> Option<String> {
        let tls = self.tls(&[b"http/1.1"]).await.ok()?;
        Some(peer_serial(&tls))
    }

    async fn wait_for_serial(&self, serial: &str) {
        eventually(&format!("certificate {serial} served"), || async {
            self.served_serial().await.as_deref() == Some(serial)
        })
        .await;
    }
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(CLUSTER).unwrap();
    connector.connect(name, tcp).await
}

fn peer_serial(tls: &TlsStream<TcpStream>) -> String {
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
    leaf.tbs_certificate.serial.to_str_radix(16)
}

/// Runs `test` with [`with_timeout`] against a proxy serving one certificate (serial `serial`, valid
/// for 60 days) from a file.
async fn with_cert_file(serial: u64, test: impl AsyncFnOnce(TlsEnv, Issued)) {
    with_timeout(async {
        let (env, issued) = TlsEnv::start_with_cert_file(serial, 60, |_| {}).await;
        test(env, issued).await;
    })
    .await;
}

/// `GET path` over `tls` with HTTP/1.1 or (when ALPN chose it) HTTP/2, expecting 200; returns the
/// HTTP version and what the upstream echoed.
async fn get_echo(tls: TlsStream<TcpStream>, path: &str) -> (http::Version, Value) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let uri = format!("https://{CLUSTER}{path}");
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(uri)
            .header("host", CLUSTER)
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.send_request(request).await.unwrap()
    };
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(parts.status, 200, "{body:?}");
    (version, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn json_cert_file_is_served_and_requests_are_forwarded_as_https() {
    with_cert_file(0x1001, async |env, issued| {
        let info = env.proxy.certificate().unwrap();
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.source, CertSource::File);
        assert!(info.covers("plane.test") && info.covers("x.plane.test"));

        let (token, tls) = env.routed_tls(&[b"http/1.1"]).await;
        assert_eq!(peer_serial(&tls), issued.serial);
        let (version, echo) = get_echo(tls, &format!("/{token}/hello?x=1")).await;
        assert_eq!(version, http::Version::HTTP_11);
        assert_eq!(echo["path_and_query"], "/hello?x=1");
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
        assert_eq!(echo["headers"]["x-verified-username"][0], "alice");
    })
    .await;
}

#[tokio::test]
async fn pem_cert_files_combined_or_with_a_separate_key() {
    with_timeout(async {
        let ca = ClusterCa::new();
        let issued = ca.issue(0x2002, 60);
        let combined = format!("{}{}", issued.cert_pem, issued.key_pem);
        let env = TlsEnv::start(ca, &[("both.pem", combined)], |c, dir| {
            c.cert_path = Some(dir.join("both.pem"));
        })
        .await
        .unwrap();
        assert_eq!(env.served_serial().await.as_deref(), Some("2002"));

        let ca = ClusterCa::new();
        let issued = ca.issue(0x2003, 60);
        let files = [("cert.pem", issued.cert_pem), ("key.pem", issued.key_pem)];
        let env = TlsEnv::start(ca, &files, |c, dir| {
            c.cert_path = Some(dir.join("cert.pem"));
            c.key_path = Some(dir.join("key.pem"));
        })
        .await
        .unwrap();
        assert_eq!(env.served_serial().await.as_deref(), Some("2003"));
    })
    .await;
}

#[tokio::test]
async fn replaced_cert_file_is_served_without_restart_and_bad_files_are_ignored() {
    with_cert_file(0x3001, async |env, _| {
        let second = env.ca.issue(0x3002, 90);
        assert_eq!(env.served_serial().await.as_deref(), Some("3001"));
        // An open connection keeps working across the swap.
        let open = env.tls(&[b"http/1.1"]).await.unwrap();

        std::fs::write(env.path("cert.json"), json_file(&second)).unwrap();
        env.wait_for_serial("3002").await;
        assert_eq!(env.proxy.certificate().unwrap().serial, "3002");
        let token = env.token();
        get_echo(open, &format!("/{token}/")).await;

        // A broken file (the key of another certificate) is reported and changes nothing.
        let other = env.ca.issue(0x3003, 90);
        let broken = serde_json::json!({"cert": other.cert_pem, "key": second.key_pem});
        std::fs::write(env.path("cert.json"), broken.to_string()).unwrap();
        eventually("the broken file to be reported", || async {
            env.proxy.monitor().certificate_file_errors() == 1
        })
        .await;
        assert_eq!(env.served_serial().await.as_deref(), Some("3002"));
        // Garbage too.
        std::fs::write(env.path("cert.json"), "{ not json").unwrap();
        eventually("the garbage file to be reported", || async {
            env.proxy.monitor().certificate_file_errors() == 2
        })
        .await;
        assert_eq!(env.served_serial().await.as_deref(), Some("3002"));
        // A good file afterwards is picked up again.
        std::fs::write(env.path("cert.json"), json_file(&other)).unwrap();
        env.wait_for_serial("3003").await;
    })
    .await;
}

#[tokio::test]
async fn missing_cert_file_without_acme_is_a_startup_error() {
    with_timeout(async {
        let result = TlsEnv::start(ClusterCa::new(), &[], |c, dir| {
            c.cert_path = Some(dir.join("missing.json"));
        })
        .await;
        let error = format!("{:#}", result.err().expect("start must fail"));
        assert!(
            error.contains("cannot load the certificate file") && error.contains("missing.json"),
            "{error}"
        );
    })
    .await;
}

#[tokio::test]
async fn http_port_redirects_and_answers_ready_and_acme_challenges() {
    with_cert_file(0x4001, async |env, _| {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let base = format!("http://{}", env.proxy.local_addr());
        let get = |path: &str, host: &str| http.get(format!("{base}{path}")).header("host", host);

        for (path, location) in [
            ("/", "https://plane.test/"),
            ("/abc/123", "https://plane.test/abc/123"),
            ("/abc?a=1&b=2", "https://plane.test/abc?a=1&b=2"),
        ] {
            let response = get(path, "plane.test:8080").send().await.unwrap();
            assert_eq!(response.status(), 301, "{path}");
            assert_eq!(response.headers()["location"], location, "{path}");
            crate::support::assert_general_headers(&response);
        }
        let ready = get("/ready", "plane.test").send().await.unwrap();
        assert_eq!(ready.status(), 200);

        let path = "/.well-known/acme-challenge/tok-123";
        assert_eq!(get(path, "plane.test").send().await.unwrap().status(), 404);
        env.controller.push(ControllerToProxy::HttpChallenge {
            token: "tok-123".into(),
            key_authorization: Some("tok-123.thumb".into()),
        });
        eventually("the challenge answer to be served", || async {
            let response = get(path, "plane.test").send().await.unwrap();
            response.status() == 200 && response.text().await.unwrap() == "tok-123.thumb"
        })
        .await;
        env.controller.push(ControllerToProxy::HttpChallenge {
            token: "tok-123".into(),
            key_authorization: None,
        });
        eventually("the challenge answer to be withdrawn", || async {
            get(path, "plane.test").send().await.unwrap().status() == 404
        })
        .await;

        // No Host header at all (HTTP/1.0): 400.
        let mut raw = TcpStream::connect(env.proxy.local_addr()).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        raw.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn h2_is_negotiated_with_alpn() {
    with_cert_file(0x5001, async |env, _| {
        let (token, tls) = env.routed_tls(&[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (version, echo) = get_echo(tls, &format!("/{token}/two")).await;
        assert_eq!(version, http::Version::HTTP_2);
        assert_eq!(echo["path"], "/two");
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
        // The backend is spoken to with HTTP/1.1 whatever the client used.
        assert_eq!(echo["version"], "HTTP/1.1");

        let tls = env.tls(&[b"http/1.1"]).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    })
    .await;
}

#[tokio::test]
async fn websockets_work_over_tls() {
    with_cert_file(0x6001, async |env, _| {
        let (token, tls) = env.routed_tls(&[b"http/1.1"]).await;
        let request = format!("wss://{CLUSTER}/{token}/ws")
            .into_client_request()
            .unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
        assert_eq!(response.status(), 101);
        ws.send(Message::text("over tls")).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text("over tls"));
        let backend = env.route().backend_id;
        eventually("the tunnel to be counted", || async {
            env.proxy
                .connection_counts(&backend)
                .is_some_and(|c| c.open_connections == 1)
        })
        .await;
        ws.close(None).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn certificates_from_the_controller_are_served_unless_older() {
    with_timeout(async {
        let ca = ClusterCa::new();
        // No certificate source at all: handshakes fail until the controller sends one.
        let env = TlsEnv::start(ca, &[], |_, _| {}).await.unwrap();
        assert!(env.tls(&[b"http/1.1"]).await.is_err());

        let shared = env.ca.issue(0x7001, 60);
        env.controller.push(ControllerToProxy::Certificate {
            cert_pem: shared.cert_pem.clone(),
            key_pem: shared.key_pem.clone(),
        });
        env.wait_for_serial("7001").await;
        assert_eq!(
            env.proxy.certificate().unwrap().source,
            CertSource::Controller
        );

        // One that expires earlier, and one that cannot be served, are ignored. Messages are
        // applied in order, so once a challenge answer sent after them is served, they were seen.
        let older = env.ca.issue(0x7002, 30);
        env.controller.push(ControllerToProxy::Certificate {
            cert_pem: older.cert_pem,
            key_pem: older.key_pem,
        });
        env.controller.push(ControllerToProxy::Certificate {
            cert_pem: "-----BEGIN CERTIFICATE-----\ngarbage\n".into(),
            key_pem: shared.key_pem,
        });
        env.controller.push(ControllerToProxy::HttpChallenge {
            token: "marker".into(),
            key_authorization: Some("marker.x".into()),
        });
        let marker = format!(
            "http://{}/.well-known/acme-challenge/marker",
            env.proxy.local_addr()
        );
        eventually("the marker to be served", || async {
            reqwest::get(&marker).await.unwrap().status() == 200
        })
        .await;
        assert_eq!(env.served_serial().await.as_deref(), Some("7001"));
        assert_eq!(env.proxy.certificate().unwrap().serial, "7001");

        let newer = env.ca.issue(0x7003, 90);
        env.controller.push(ControllerToProxy::Certificate {
            cert_pem: newer.cert_pem,
            key_pem: newer.key_pem,
        });
        env.wait_for_serial("7003").await;
        // Without ACME the proxy never asks the controller for a lease or stores certificates.
        assert!(env.controller.tls_messages().is_empty());
    })
    .await;
}

#[tokio::test]
async fn failed_acme_orders_keep_the_current_certificate_and_retry() {
    with_timeout(async {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let directory = format!("https://{}/dir", closed.local_addr().unwrap());
        drop(closed);
        // Due for renewal (10 days left, renewal 30 days before expiry), but the ACME server is
        // unreachable: every attempt fails.
        let (env, _) = TlsEnv::start_with_cert_file(0x8001, 10, |c| {
            let mut acme =
                hangar_proxy::AcmeConfig::new(directory.parse().unwrap(), "ops@plane.test".into());
            acme.retry_initial = std::time::Duration::from_millis(100);
            acme.retry_max = std::time::Duration::from_millis(200);
            c.acme = Some(acme);
        })
        .await;
        eventually("three failed attempts", || async {
            env.proxy.monitor().acme_failures() >= 3
        })
        .await;
        assert_eq!(env.proxy.acme_orders(), 0, "no account, so no order");
        assert_eq!(env.served_serial().await.as_deref(), Some("8001"));
        assert_eq!(env.proxy.certificate().unwrap().source, CertSource::File);
        // Each attempt took the cluster's lease and gave it back.
        let messages = env.controller.tls_messages();
        let count =
            |wanted: fn(&ProxyToController) -> bool| messages.iter().filter(|m| wanted(m)).count();
        let leases = count(|m| matches!(m, ProxyToController::CertLeaseRequest));
        let releases = count(|m| matches!(m, ProxyToController::ReleaseCertLease));
        let stored = count(|m| matches!(m, ProxyToController::StoreCertificate { .. }));
        assert!(leases >= 3, "{messages:?}");
        assert!(releases >= 2, "{messages:?}");
        assert_eq!(stored, 0, "{messages:?}");
    })
    .await;
}
