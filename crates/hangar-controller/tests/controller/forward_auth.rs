//! Forward auth (plane-api.md §2.5 and Plane's `forward_auth.rs` tests) against a real auth service
//! on a port-0 listener, over http and https (a self-signed certificate made with rcgen).
//!
//! The auth service's rules: `x-deny` present → 403 with a JSON body; `Bearer good` or
//! `Bearer test` → 200; `Bearer login` → 302 to a login page; `Bearer slow` → never answers;
//! anything else → 401 with `www-authenticate` and body `nope`. It records every side request.

use crate::support::{timed, TestController, CLUSTER};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hangar_controller::ControllerConfig;
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Seen = Arc<Mutex<Vec<(Method, HeaderMap)>>>;

struct AuthService {
    addr: SocketAddr,
    seen: Seen,
    _server: tokio::task::JoinHandle<()>,
}

fn auth_app(seen: Seen) -> axum::Router {
    axum::Router::new().fallback(move |method: Method, headers: HeaderMap| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((method, headers.clone()));
            decide(&headers).await
        }
    })
}

/// `GET /ctrl/status` with a good token and `x-deny`, which the auth service refuses.
async fn get_status_denied(ctl: &TestController) -> reqwest::Response {
    ctl.http
        .get(format!("{}/ctrl/status", ctl.base))
        .header("authorization", "Bearer good")
        .header("x-deny", "1")
        .send()
        .await
        .unwrap()
}

async fn decide(headers: &HeaderMap) -> Response {
    if headers.contains_key("x-deny") {
        return (
            StatusCode::FORBIDDEN,
            [("content-type", "application/json")],
            r#"{"why":"x-deny"}"#,
        )
            .into_response();
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match auth {
        "Bearer good" | "Bearer test" => StatusCode::OK.into_response(),
        "Bearer login" => (StatusCode::FOUND, [("location", "/login")]).into_response(),
        "Bearer slow" => std::future::pending().await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer realm=\"test\"")],
            "nope",
        )
            .into_response(),
    }
}

impl AuthService {
    async fn http() -> AuthService {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let app = auth_app(seen.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        AuthService {
            addr,
            seen,
            _server: server,
        }
    }

    /// Over TLS with a fresh self-signed certificate for `localhost`; returns its PEM too.
    async fn https() -> (AuthService, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_pem = certified.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let listener = TlsListener {
            tcp: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        };
        let addr = listener.tcp.local_addr().unwrap();
        let seen = Seen::default();
        let app = auth_app(seen.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let service = AuthService {
            addr,
            seen,
            _server: server,
        };
        (service, cert_pem)
    }

    fn url(&self, scheme: &str) -> url::Url {
        let host = if scheme == "https" {
            format!("localhost:{}", self.addr.port())
        } else {
            self.addr.to_string()
        };
        format!("{scheme}://{host}/check").parse().unwrap()
    }

    fn last(&self) -> (Method, HeaderMap) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no side request")
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// TLS on top of a TCP listener for `axum::serve`; failed handshakes are skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

async fn controller(forward_auth: url::Url, bearer: Option<&str>) -> TestController {
    TestController::start_with(ControllerConfig {
        default_cluster: Some(CLUSTER.parse().unwrap()),
        forward_auth: Some(forward_auth),
        bearer_token: bearer.map(String::from),
        ..Default::default()
    })
    .await
}

/// Runs `test` with [`timed`] against an http auth service and a controller using it (and requiring
/// `bearer`, when given), and shuts the controller down after it.
async fn with_auth(bearer: Option<&str>, test: impl AsyncFnOnce(&AuthService, &TestController)) {
    timed(async {
        let auth = AuthService::http().await;
        let ctl = controller(auth.url("http"), bearer).await;
        test(&auth, &ctl).await;
        ctl.shutdown().await;
    })
    .await
}

/// `GET path` with an optional `Authorization` header value.
async fn get(ctl: &TestController, path: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = ctl.http.get(format!("{}{path}", ctl.base));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn forward_auth_rejects_accepts_and_passes_denials_on() {
    with_auth(None, async |_, ctl| {
        // Rejected: the auth service's own answer, not an ApiError.
        let resp = get(ctl, "/ctrl/status", None).await;
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"test\"");
        assert_eq!(resp.text().await.unwrap(), "nope");
        // Accepted.
        let resp = get(ctl, "/ctrl/status", Some("Bearer good")).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], "ok");
        // Any other answer is returned as it is; a redirect is not followed.
        let resp = get_status_denied(ctl).await;
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.text().await.unwrap(), r#"{"why":"x-deny"}"#);
        let no_redirects = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let resp = no_redirects
            .get(format!("{}/ctrl/status", ctl.base))
            .header("authorization", "Bearer login")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302);
        assert_eq!(resp.headers()["location"], "/login");
    })
    .await
}

#[tokio::test]
async fn forward_auth_forwards_method_path_headers_and_bearer_token() {
    with_auth(None, async |auth, ctl| {
        get(ctl, "/ctrl/status?x=1", Some("Bearer good")).await;
        let (method, headers) = auth.last();
        assert_eq!(method, Method::GET);
        assert_eq!(headers["x-original-path"], "/status");
        assert_eq!(headers["x-original-uri"], "/ctrl/status?x=1");
        assert_eq!(headers["authorization"], "Bearer good");
        assert_eq!(
            headers["x-forwarded-host"],
            ctl.base.trim_start_matches("http://")
        );

        // POST keeps its method; the body is not sent.
        let resp = ctl
            .http
            .post(format!("{}/ctrl/b/nosuchbackend/soft-terminate", ctl.base))
            .header("authorization", "Bearer good")
            .header("x-custom", "kept")
            .json(&Value::Null)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let (method, headers) = auth.last();
        assert_eq!(method, Method::POST);
        assert_eq!(
            headers["x-original-path"],
            "/b/nosuchbackend/soft-terminate"
        );
        assert_eq!(headers["x-custom"], "kept");
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers.get("content-length").is_none_or(|v| v == "0"));

        // A client using `http://test@host/` (basic auth user name): `Bearer test` (Plane's test).
        let resp = ctl
            .http
            .get(format!("{}/ctrl/status", ctl.base))
            .basic_auth("test", None::<&str>)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(auth.last().1["authorization"], "Bearer test");
    })
    .await
}

#[tokio::test]
async fn forward_auth_guards_websocket_routes() {
    with_auth(None, async |auth, ctl| {
        let paths = [
            format!("/ctrl/c/{CLUSTER}/drone-socket?pool=gpu"),
            format!("/ctrl/c/{CLUSTER}/proxy-socket"),
            "/ctrl/dns-socket".to_string(),
        ];
        for path in &paths {
            let url = format!("{}{path}", ctl.ws_base);
            let err = tokio_tungstenite::connect_async(url.as_str())
                .await
                .expect_err("upgrade without credentials");
            match err {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    assert_eq!(resp.status(), 401, "{path}")
                }
                other => panic!("{path}: unexpected {other}"),
            }
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("authorization", "Bearer good".parse().unwrap());
            let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
            assert_eq!(response.status(), 101, "{path}");
            drop(ws);
            let (_, headers) = auth.last();
            let expected = path.trim_start_matches("/ctrl").split('?').next().unwrap();
            assert_eq!(headers["x-original-path"], expected);
            assert!(headers.contains_key("sec-websocket-key"), "{path}");
            assert!(headers.get("upgrade").is_none(), "{path}");
        }
    })
    .await
}

#[tokio::test]
async fn forward_auth_composes_with_the_bearer_token() {
    with_auth(Some("good"), async |auth, ctl| {
        assert_eq!(
            get(ctl, "/ctrl/status", Some("Bearer good")).await.status(),
            200
        );
        // The auth service admits `test`, the bearer check does not; no side request is made.
        let before = auth.count();
        let resp = get(ctl, "/ctrl/status", Some("Bearer test")).await;
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["kind"], "Unauthorized");
        assert_eq!(auth.count(), before);
        // The bearer token is right but the auth service says no.
        let resp = get_status_denied(ctl).await;
        assert_eq!(resp.status(), 403);
    })
    .await
}

#[tokio::test]
async fn forward_auth_guards_dashboard_and_metrics_but_never_pub() {
    with_auth(None, async |auth, ctl| {
        for path in [
            "/dashboard",
            "/dashboard/dashboard.js",
            "/ctrl/dashboard/state",
            "/metrics",
        ] {
            assert_eq!(get(ctl, path, None).await.status(), 401, "{path}");
            assert_eq!(
                get(ctl, path, Some("Bearer good")).await.status(),
                200,
                "{path}"
            );
            assert_eq!(
                auth.last().1["x-original-path"],
                path.trim_start_matches("/ctrl")
            );
        }
        let before = auth.count();
        assert_eq!(get(ctl, "/pub/health", None).await.status(), 200);
        assert_eq!(
            get(ctl, "/pub/b/nosuchbackend/status", None).await.status(),
            404
        );
        assert_eq!(auth.count(), before, "/pub is never checked");
    })
    .await
}

fn pem_file(pem: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(pem.as_bytes()).unwrap();
    file
}

#[tokio::test]
async fn forward_auth_over_https_with_a_trusted_ca_certificate() {
    timed(async {
        let (auth, cert_pem) = AuthService::https().await;
        let ca = pem_file(&cert_pem);
        let ctl = TestController::start_with(ControllerConfig {
            forward_auth: Some(auth.url("https")),
            forward_auth_ca_cert: Some(ca.path().to_path_buf()),
            ..Default::default()
        })
        .await;
        assert_eq!(
            get(&ctl, "/ctrl/status", Some("Bearer good"))
                .await
                .status(),
            200
        );
        assert_eq!(get(&ctl, "/ctrl/status", None).await.status(), 401);
        assert_eq!(auth.last().1["x-original-path"], "/status");
        ctl.shutdown().await;

        // Without the CA certificate the self-signed service is not trusted: 502.
        let ctl = controller(auth.url("https"), None).await;
        let resp = get(&ctl, "/ctrl/status", Some("Bearer good")).await;
        assert_eq!(resp.status(), 502);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["kind"], "Other");
        ctl.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unreachable_or_slow_auth_service_gives_a_plane_shaped_error() {
    timed(async {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: url::Url = format!("http://{}/check", closed.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(closed);
        let ctl = controller(url, None).await;
        let resp = get(&ctl, "/ctrl/status", Some("Bearer good")).await;
        assert_eq!(resp.status(), 502);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["kind"], "Other");
        assert_eq!(
            body["message"],
            "The forward-auth service could not be reached."
        );
        assert_eq!(body["id"].as_str().unwrap().len(), 14);
        ctl.shutdown().await;

        let auth = AuthService::http().await;
        let ctl = TestController::start_with(ControllerConfig {
            forward_auth: Some(auth.url("http")),
            forward_auth_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let resp = get(&ctl, "/ctrl/status", Some("Bearer slow")).await;
        assert_eq!(resp.status(), 504);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["message"],
            "The forward-auth service did not answer within 300 ms."
        );
        ctl.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_bad_ca_certificate_file_is_a_config_error() {
    timed(async {
        let not_pem = pem_file("hello");
        let config = ControllerConfig {
            forward_auth: Some("https://localhost:1/".parse().unwrap()),
            forward_auth_ca_cert: Some(not_pem.path().to_path_buf()),
            ..Default::default()
        };
        let store = Arc::new(
            hangar_store::sqlite::SqliteStore::in_memory()
                .await
                .unwrap(),
        );
        let err = hangar_controller::AppState::new(config, store, "127.0.0.1:1".parse().unwrap())
            .err()
            .expect("a file without certificates is refused");
        assert!(err.to_string().contains("forward_auth_ca_cert"), "{err}");
    })
    .await
}
