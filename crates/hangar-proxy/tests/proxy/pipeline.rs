//! The request pipeline: `/ready`, `/`, token paths, header rewriting, host checks, errors, bodies,
//! HTTP/2.

use crate::support::{
    assert_general_headers, eventually, with_env, with_routed, with_timeout, Env, FakeController,
};
use bytes::Bytes;
use hangar_proxy::ProxyConfig;
use hangar_types::token::{ConnectionToken, SecretToken};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn ready_is_503_until_connected_then_200() {
    with_timeout(async {
        // The controller's port is bound but not served yet: the proxy cannot finish its handshake.
        let controller_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let controller_url = format!("http://{}/", controller_listener.local_addr().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ProxyConfig::new(
            controller_url.parse().unwrap(),
            "localhost:1".parse().unwrap(),
        );
        let name = config.name.clone();
        let proxy = hangar_proxy::start(config, listener).await.unwrap();
        let http = reqwest::Client::new();
        let ready = format!("http://{}/ready", proxy.local_addr());
        let response = http.get(&ready).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_general_headers(&response);
        assert!(!proxy.is_ready());

        let controller = FakeController::serve(controller_listener);
        eventually("/ready answers 200", || async {
            http.get(&ready).send().await.unwrap().status() == 200
        })
        .await;
        assert!(proxy.is_ready());
        let hello = &controller.hellos()[0];
        assert_eq!(hello.protocol, hangar_types::PROTOCOL_VERSION);
        assert_eq!(
            hello.node,
            hangar_types::protocol::NodeHello::Proxy { name }
        );
        // Any method and host.
        let response = http
            .post(&ready)
            .header("host", "elsewhere")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.bytes().await.unwrap().is_empty());

        // Losing the controller makes the proxy unready until it reconnects.
        controller.drop_sessions();
        drop(controller);
        eventually("/ready answers 503", || async {
            http.get(&ready).send().await.unwrap().status() == 503
        })
        .await;
        proxy.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn root_redirects_when_configured() {
    with_timeout(async {
        let env = Env::start_with(|c| {
            c.root_redirect_url = Some("https://example.com/home".parse().unwrap())
        })
        .await;
        let response = env.get("/").send().await.unwrap();
        assert_eq!(response.status(), 301);
        assert_eq!(response.headers()["location"], "https://example.com/home");
        assert_general_headers(&response);
    })
    .await
}

/// What a test expects of a response body.
type BodyCheck = fn(&str) -> bool;

/// The root without a redirect, an empty token and an unknown token: a 4xx with the general
/// headers and no backend id; the root and the unknown token say why.
#[tokio::test]
async fn requests_without_a_known_token_are_4xx_with_general_headers() {
    with_env(async |env| {
        let rows: [(&str, u16, BodyCheck); 3] = [
            ("/", 400, |body| body.contains("no root redirect")),
            ("//x", 400, |_| true),
            ("/not-a-token/x", 410, |body| {
                body == "unknown or expired token\n"
            }),
        ];
        for (path, status, body_ok) in rows {
            let response = env.get(path).send().await.unwrap();
            assert_eq!(response.status(), status, "{path}");
            assert_general_headers(&response);
            assert!(response.headers().get("x-plane-backend-id").is_none());
            let body = response.text().await.unwrap();
            assert!(body_ok(&body), "{path}: {body}");
        }
    })
    .await
}

#[tokio::test]
async fn dynamic_token_is_stripped_from_the_path() {
    with_routed("b-dyn", async |env, _, token| {
        for (path, expected) in [
            (format!("/{token}"), "/"),
            (format!("/{token}/"), "/"),
            (format!("/{token}/a/b?x=1&y=2"), "/a/b?x=1&y=2"),
            (format!("/{token}?q=1"), "/?q=1"),
        ] {
            let seen = env.echo(&path).await;
            assert_eq!(seen["path_and_query"], expected, "for {path}");
        }
    })
    .await
}

#[tokio::test]
async fn static_token_keeps_the_path() {
    with_env(async |env| {
        let mut route = env.route("b-static");
        route.user = None;
        route.user_data = None;
        route.secret_token = SecretToken::empty();
        let token = ConnectionToken::random_static();
        env.controller
            .set_answer(&token, crate::support::Answer::Route(route));
        let seen = env.echo(&format!("/{token}/foo?q=1")).await;
        assert_eq!(seen["path_and_query"], format!("/{token}/foo?q=1"));
        let headers = &seen["headers"];
        assert!(headers.get("x-verified-username").is_none());
        assert!(headers.get("x-verified-user-data").is_none());
        assert_eq!(headers["x-verified-secret"][0], "");
        assert_eq!(headers["x-verified-path"][0], format!("/{token}/foo"));
    })
    .await
}

#[tokio::test]
async fn verified_headers_are_set_and_spoofed_ones_stripped() {
    with_routed("b-verified", async |env, _, token| {
        let sent = [
            ("x-verified-blah", "spoofed"),
            ("x-verified-username", "mallory"),
            ("x-custom", "kept"),
            ("cookie", "session=abc"),
            ("authorization", "Bearer xyz"),
        ];
        let path = format!("/{token}/some/path?x=1");
        let response = env.get_with_headers(&path, &sent).await;
        assert_eq!(response.status(), 200);
        let seen: Value = response.json().await.unwrap();
        let headers = &seen["headers"];
        assert!(headers.get("x-verified-blah").is_none());
        assert_eq!(headers["x-verified-username"], serde_json::json!(["alice"]));
        let user_data: Value =
            serde_json::from_str(headers["x-verified-user-data"][0].as_str().unwrap()).unwrap();
        assert_eq!(
            user_data,
            serde_json::json!({"access": "readonly", "email": "a@example.com"})
        );
        assert_eq!(
            headers["x-verified-path"],
            serde_json::json!([format!("/{token}/some/path")])
        );
        assert_eq!(headers["x-verified-backend"][0], "b-verified");
        assert_eq!(headers["x-verified-secret"][0], "the-secret");
        assert_eq!(headers["x-custom"][0], "kept");
        assert_eq!(headers["cookie"][0], "session=abc");
        assert_eq!(headers["authorization"][0], "Bearer xyz");
        assert_eq!(headers["host"], serde_json::json!([env.cluster.as_str()]));
    })
    .await
}

#[tokio::test]
async fn forwarded_headers_are_set() {
    with_routed("b-fwd", async |env, _, token| {
        let path = format!("/{token}/");
        let sent = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ];
        let response = env.get_with_headers(&path, &sent).await;
        let seen: Value = response.json().await.unwrap();
        let forwarded = ["x-forwarded-for", "x-forwarded-proto"].map(|h| &seen["headers"][h]);
        assert_eq!(forwarded, [&json!(["127.0.0.1"]), &json!(["http"])]);
    })
    .await
}

#[tokio::test]
async fn proxied_responses_carry_backend_id_and_general_headers() {
    with_routed("b-ids", async |env, _, token| {
        let response = env.get(&format!("/{token}/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-plane-backend-id"], "b-ids");
        assert_eq!(response.headers()["x-hangar-backend-id"], "b-ids");
        assert_general_headers(&response);

        // A backend that sets its own CORS header keeps it; `server` is always ours.
        let response = env
            .get(&format!("/{token}/own-headers"))
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://example.com"
        );
        assert!(headers.get("access-control-allow-methods").is_none());
        assert!(headers.get("access-control-allow-headers").is_none());
        assert!(headers["server"].to_str().unwrap().starts_with("Hangar/"));
        assert_eq!(response.text().await.unwrap(), "own");
    })
    .await
}

#[tokio::test]
async fn subdomains_must_match() {
    with_env(async |env| {
        let mut route = env.route("b-sub");
        route.subdomain = Some("sub".into());
        let token = env.token_for(&route);
        let path = format!("/{token}/");
        let status = |host: String| {
            let request = env.get_with_host(&path, &host);
            async move { request.send().await.unwrap().status() }
        };
        assert_eq!(status(format!("sub.{}", env.cluster)).await, 200);
        assert_eq!(status(env.cluster.to_string()).await, 403);
        assert_eq!(status(format!("other.{}", env.cluster)).await, 403);

        // A route without subdomain accepts any subdomain of the cluster.
        let token = env.token_for(&env.route("b-nosub"));
        let response = env
            .get_with_host(&format!("/{token}/"), &format!("anything.{}", env.cluster))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    })
    .await
}

#[tokio::test]
async fn host_outside_the_cluster_is_403() {
    with_routed("b-host", async |env, _, token| {
        let response = env
            .get_with_host(&format!("/{token}/"), "example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        assert_general_headers(&response);
    })
    .await
}

#[tokio::test]
async fn missing_host_is_400() {
    with_routed("b-nohost", async |env, _, token| {
        let mut stream = TcpStream::connect(env.proxy.local_addr()).await.unwrap();
        let request = format!("GET /{token}/ HTTP/1.1\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    })
    .await
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_backend_id() {
    with_env(async |env| {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut route = env.route("b-down");
        route.address = closed.local_addr().unwrap();
        drop(closed);
        let token = env.token_for(&route);
        let response = env.get(&format!("/{token}/")).send().await.unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["x-plane-backend-id"], "b-down");
        assert_general_headers(&response);
        assert_eq!(
            response.text().await.unwrap(),
            "could not reach the backend\n"
        );
    })
    .await
}

#[tokio::test]
async fn bodies_stream_in_both_directions() {
    with_routed("b-stream", async |env, _, token| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
        });
        tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
        let mut response = env
            .request(reqwest::Method::POST, &format!("/{token}/duplex"))
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // The first chunk comes back while the request body is still open: nothing buffers the
        // whole body in either direction.
        let mut received = Vec::new();
        while received.len() < b"first chunk".len() {
            let chunk = response.chunk().await.unwrap().expect("echoed chunk");
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received, b"first chunk");
        let big = Bytes::from(vec![7u8; 1024 * 1024]);
        tx.send(big.clone()).await.unwrap();
        drop(tx);
        let rest = response.bytes().await.unwrap();
        assert_eq!(rest, big);
    })
    .await
}

#[tokio::test]
async fn http2_prior_knowledge_clients_work() {
    with_routed("b-h2", async |env, _, token| {
        let stream = TcpStream::connect(env.proxy.local_addr()).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::get(format!("http://{}/{token}/h2?x=1", env.cluster))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.headers()["x-plane-backend-id"], "b-h2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let seen: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["path_and_query"], "/h2?x=1");
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["headers"]["host"][0], env.cluster.as_str());
    })
    .await
}

/// A keep-alive client connection's plain requests after its first go over one backend connection
/// it keeps (the first goes through the shared pool), with the same rewriting as any request.
#[tokio::test]
async fn keep_alive_requests_reuse_one_kept_backend_connection() {
    with_env(async |env| {
        let (_, token) = env.routed("kept");
        // reqwest sends sequential requests over its one idle connection.
        let mut peers = Vec::new();
        for i in 0..6 {
            let echo = env.echo(&format!("/{token}/n{i}?q={i}")).await;
            assert_eq!(echo["path_and_query"], format!("/n{i}?q={i}"));
            assert_eq!(
                echo["headers"]["x-verified-backend"],
                serde_json::json!(["kept"])
            );
            assert_eq!(
                echo["headers"]["x-verified-username"],
                serde_json::json!(["alice"])
            );
            peers.push(echo["peer"].as_str().unwrap().to_string());
        }
        // The first through the pool, the rest on the connection kept from the second on.
        assert_ne!(peers[0], peers[1]);
        assert!(peers[2..].iter().all(|p| *p == peers[1]), "{peers:?}");
        assert_eq!(env.proxy.open_client_connections(), 1);
    })
    .await
}
