//! Black-box tests of Plane's operator habits through the `hangar` binary: `hangar controller
//! --forward-auth` with a real auth service, a drone reaching it with `http://TOKEN@host`, every
//! `hangar admin` command checked for Plane's exact output lines, Plane's own admin requests sent
//! raw, and the `db-cli` commands (`list-nodes`, `termination-candidates`, `events`).

#![allow(clippy::unwrap_used)]

use axum::http::{HeaderMap, StatusCode};
use hangar_tests::{eventually, free_port};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const CLUSTER: &str = "localhost:9999";
const DRONE: &str = "dr-parity";

/// `hangar` with no `HANGAR_*` variable of the test's environment.
fn hangar() -> Command {
    hangar_test_support::clean_command(env!("CARGO_BIN_EXE_hangar"))
}

/// `GET {base}{path}` with the token the auth service admits answers 200.
async fn assert_admitted(http: &reqwest::Client, base: &str, path: &str) {
    let resp = http
        .get(format!("{base}{path}"))
        .bearer_auth("good")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An auth service that admits `Authorization: Bearer good` (401 `nope` otherwise), and with
/// `admit_sockets` also the node sockets (what `hangar dev`'s own drone and proxy need).
async fn auth_service(admit_sockets: bool) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| async move {
        let socket = headers
            .get("x-original-path")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.ends_with("-socket"));
        if headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer good")
            || (admit_sockets && socket)
        {
            (StatusCode::OK, "")
        } else {
            (StatusCode::UNAUTHORIZED, "nope")
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

struct Cluster {
    _dir: tempfile::TempDir,
    controller: Child,
    drone: Child,
    /// `http://good@127.0.0.1:<port>`: passes the forward auth.
    url: String,
    /// Without credentials: refused by the forward auth.
    bare_url: String,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth_service(false).await;
        let port = free_port().await;
        let controller = hangar()
            .args(["controller", "--port", &port.to_string()])
            .args(["--default-cluster", CLUSTER])
            .arg("--db")
            .arg(dir.path().join("hangar.db"))
            .env(
                "HANGAR_FORWARD_AUTH",
                format!("http://127.0.0.1:{auth}/check"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://good@127.0.0.1:{port}");
        let drone = hangar()
            .args(["drone", "--controller-url", &url, "--cluster", CLUSTER])
            .args(["--name", DRONE, "--executor", "process"])
            .arg("--state-file")
            .arg(dir.path().join("drone.db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let cluster = Cluster {
            _dir: dir,
            controller,
            drone,
            url,
            bare_url: format!("http://127.0.0.1:{port}"),
        };
        cluster.wait_for_drone().await;
        cluster
    }

    /// `hangar <command> --controller <url> <rest of args>` (the client flags belong to the client
    /// commands).
    async fn run(&self, url: &str, args: &[&str]) -> Output {
        let (command, rest) = args.split_first().expect("a command");
        timeout(
            STEP_TIMEOUT,
            hangar()
                .arg(command)
                .arg("--controller")
                .arg(url)
                .args(rest)
                .output(),
        )
        .await
        .expect("command timed out")
        .unwrap()
    }

    async fn admin(&self, args: &[&str]) -> (Output, Vec<String>) {
        let out = self.run(&self.url, &[&["admin"][..], args].concat()).await;
        let lines = text(&out.stdout).lines().map(String::from).collect();
        (out, lines)
    }

    async fn wait_for_drone(&self) {
        eventually("the drone to be ready", || async {
            let (out, lines) = self.admin(&["cluster-state", CLUSTER]).await;
            (out.status.success() && lines.iter().any(|l| l == "    Ready: true")).then_some(())
        })
        .await;
    }
}

/// `Status: <status> at YYYY-MM-DD HH:MM:SS[.mmm] UTC`; returns the status.
fn status_line(line: &str) -> &str {
    let rest = line.strip_prefix("Status: ").expect(line);
    let (status, time) = rest.split_once(" at ").expect(line);
    let time = time.strip_suffix(" UTC").expect(line);
    let (date, clock) = time.split_once(' ').expect(line);
    assert_eq!(date.len(), 10, "{line}");
    assert!(clock.len() == 8 || clock.len() == 12, "{line}");
    status
}

/// Returns the id of the backend it created and terminated.
async fn connect_and_terminate(cluster: &Cluster) -> String {
    let backend = hangar_tests::test_backend();
    let backend = backend.to_str().unwrap();
    let (out, lines) = cluster
        .admin(&["connect", "--command", backend, "--key", "parity"])
        .await;
    assert!(out.status.success(), "{lines:?} {}", text(&out.stderr));
    let id = lines[0]
        .strip_prefix("Created backend: ")
        .expect(&lines[0])
        .to_string();
    assert!(
        lines[1].starts_with(&format!("URL: http://{CLUSTER}/")),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("Status URL: http://127.0.0.1:"),
        "{lines:?}"
    );
    assert_eq!(lines[3], format!("Drone: {DRONE}"));
    let statuses: Vec<&str> = lines[4..].iter().map(|l| status_line(l)).collect();
    assert_eq!(statuses.first(), Some(&"scheduled"), "{lines:?}");
    assert_eq!(statuses.last(), Some(&"ready"), "{lines:?}");

    // Same key: reused, no drone line; --immediate prints no status.
    let (_, lines) = cluster
        .admin(&[
            "connect",
            "--command",
            backend,
            "--key",
            "parity",
            "--immediate",
        ])
        .await;
    assert_eq!(lines[0], format!("Reusing backend: {id}"));
    assert_eq!(lines.len(), 3, "{lines:?}");

    // backend-status follows until terminated, while terminate does its own following.
    let follower = hangar()
        .args(["admin", "--controller", &cluster.url, "backend-status", &id])
        .output();
    let follower = tokio::spawn(follower);
    let (out, lines) = cluster.admin(&["terminate", "--backend", &id]).await;
    assert!(out.status.success(), "{lines:?}");
    assert_eq!(lines[0], format!("Sent termination signal {id}"));
    assert_eq!(lines.last().map(|l| status_line(l)), Some("terminated"));
    let followed = timeout(STEP_TIMEOUT, follower)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let followed = text(&followed.stdout);
    let last = followed.lines().last().unwrap();
    assert_eq!(status_line(last), "terminated", "{followed}");
    id
}

async fn errors_drain_status_and_cluster_state(cluster: &Cluster) {
    let (out, _) = cluster
        .admin(&["terminate", "nosuchbackend", "--immediate"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[0], "API returned error status:", "{err}");
    assert_eq!(lines[1], "    Message: Backend does not exist");
    assert_eq!(lines[2], "    HTTP status: 404 Not Found");
    let id = lines[3]
        .strip_prefix("    Error ID for correlating with logs: ")
        .expect(&err);
    assert_eq!(id.len(), 14);

    let (_, lines) = cluster.admin(&["status"]).await;
    assert_eq!(lines[0], "Status: ok");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(lines[1], format!("Version: {version} (client: {version})"));
    assert!(lines[2].starts_with("Hash: "), "{lines:?}");

    let (_, lines) = cluster.admin(&["cluster-state", CLUSTER]).await;
    assert_eq!(lines[0], "Drones:");
    assert_eq!(lines[1], format!("  {DRONE}"));
    assert_eq!(lines[2], format!("    Plane version: {version}"));
    assert!(lines[4].starts_with("    Controller: co-"), "{lines:?}");
    assert!(lines.contains(&"    Draining: false".to_string()));
    assert!(lines.contains(&"Proxies:".to_string()));

    let drain = ["drain", "--cluster", CLUSTER, "--drone", DRONE];
    let (_, lines) = cluster.admin(&drain).await;
    assert_eq!(lines, [format!("Drone {DRONE} draining initiated.")]);
    let (_, lines) = cluster.admin(&drain).await;
    assert_eq!(lines, [format!("Drone {DRONE} was already draining.")]);

    // Without the token the forward auth refuses, and the client says so as Plane's does.
    let out = cluster.run(&cluster.bare_url, &["admin", "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "Unexpected status code from API server: 401 Unauthorized"
    );
    // Plane requires --image.
    let out = cluster
        .run(&cluster.url, &["admin", "connect", "--key", "x"])
        .await;
    assert_eq!(out.status.code(), Some(2));
}

async fn db_cli_commands(cluster: &Cluster, backend: &str) {
    let out = cluster.run(&cluster.url, &["list-nodes"]).await;
    let listed = text(&out.stdout);
    let line = listed.lines().find(|l| l.contains(DRONE)).expect(&listed);
    assert!(line.starts_with("Connected to co-"), "{line}");
    assert!(
        line.contains(&format!(" {CLUSTER} {DRONE} Plane=")),
        "{line}"
    );
    let args = [
        "termination-candidates",
        "--cluster",
        CLUSTER,
        "--drone",
        DRONE,
    ];
    let out = cluster.run(&cluster.url, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "", "no backend is due");
    let args = [
        "termination-candidates",
        "--cluster",
        CLUSTER,
        "--drone",
        "dr-gone",
    ];
    let out = cluster.run(&cluster.url, &args).await;
    assert_eq!(
        text(&out.stdout).trim(),
        format!("No such drone: dr-gone on {CLUSTER}")
    );

    // `events` prints the bus; terminating the (terminated) backend again with Plane's `admin
    // terminate` (which, as Plane's, does not check) queues an action.
    let mut events = hangar()
        .args(["events", "--controller", &cluster.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        // Repeated until the stream (opened concurrently) has seen one.
        let out = cluster
            .run(
                &cluster.url,
                &["admin", "terminate", backend, "--immediate"],
            )
            .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        if let Ok(Ok(Some(line))) = timeout(Duration::from_millis(500), lines.next_line()).await {
            let fields: Vec<&str> = line.splitn(6, ' ').collect();
            assert_eq!(fields[2], "UTC", "{line}");
            assert_eq!(fields[3], "<None>", "{line}");
            assert!(
                fields[4].parse::<i64>().is_ok(),
                "the drone's node id: {line}"
            );
            assert!(fields[5].starts_with("backend_action {"), "{line}");
            assert!(fields[5].contains(backend), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no event printed");
    }
    events.kill().await.unwrap();
}

/// Plane's own admin requests, sent as Plane sends them, are understood.
async fn plane_requests(cluster: &Cluster) {
    let http = reqwest::Client::new();
    let base = &cluster.bare_url;
    let connect = serde_json::json!({
        "key": {"name": "plane-admin", "namespace": "", "tag": ""},
        "spawn_config": {"id": null, "cluster": CLUSTER, "pool": "",
            "executable": {"image": "ghcr.io/jamsocket/demo-image-drop-four", "pull_policy": null,
                "credentials": null, "env": {}, "resource_limits": {"cpu_period": null,
                "cpu_period_percent": null, "cpu_time_limit": null, "memory_limit_bytes": null,
                "disk_limit_bytes": null}, "mount": null, "network_name": null},
            "lifetime_limit_seconds": null, "max_idle_seconds": 500, "use_static_token": false,
            "subdomain": null},
        "user": null, "auth": {}
    });
    let resp = http
        .post(format!("{base}/ctrl/connect"))
        .bearer_auth("good")
        .json(&connect)
        .send()
        .await
        .unwrap();
    // Understood (not a 400): no drone offers containers (and the only one drains).
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["kind"], "NoDroneAvailable");
    for path in [
        "/ctrl/status".to_string(),
        format!("/ctrl/c/{CLUSTER}/state"),
    ] {
        assert_admitted(&http, base, &path).await;
    }
    let resp = http
        .post(format!("{base}/ctrl/c/{CLUSTER}/d/{DRONE}/drain"))
        .bearer_auth("good")
        .json(&serde_json::Value::Null)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), r#"{"updated":false}"#);
}

/// Once the drone is gone, `list-nodes` leaves it out and `list-nodes --all` shows it disconnected.
async fn detached_nodes_only_with_all(cluster: &Cluster) {
    eventually("the killed drone to leave list-nodes", || async {
        let out = cluster
            .run(&cluster.url, &["list-nodes", "--cluster", CLUSTER])
            .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        (!text(&out.stdout).contains(DRONE)).then_some(())
    })
    .await;
    let args = ["list-nodes", "--cluster", CLUSTER, "--all"];
    let out = cluster.run(&cluster.url, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    let line = listed.lines().find(|l| l.contains(DRONE)).expect(&listed);
    assert!(
        line.starts_with(&format!("Disconnected {CLUSTER} {DRONE} Plane=")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plane_admin_and_db_cli_habits_through_forward_auth() {
    timeout(TEST_TIMEOUT, async {
        let mut cluster = Cluster::start().await;
        let backend = connect_and_terminate(&cluster).await;
        db_cli_commands(&cluster, &backend).await;
        errors_drain_status_and_cluster_state(&cluster).await;
        plane_requests(&cluster).await;
        cluster.drone.kill().await.unwrap();
        detached_nodes_only_with_all(&cluster).await;
        cluster.controller.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_forward_auth_guards_ctrl_dashboard_and_metrics() {
    timeout(TEST_TIMEOUT, async {
        let auth = auth_service(true).await;
        let (port, proxy_port) = (free_port().await, free_port().await);
        let _dev = hangar()
            .args(["dev", "--in-memory", "--controller-port", &port.to_string()])
            .args(["--proxy-port", &proxy_port.to_string()])
            .args([
                "--proxy-metrics-addr",
                "127.0.0.1:0",
                "--drone-metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--forward-auth", &format!("http://127.0.0.1:{auth}/check")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        // The dev drone gets through the auth service (it admits sockets) and registers.
        let state_url = format!("{base}/ctrl/c/localhost:{proxy_port}/state");
        eventually("the dev drone to register", || async {
            let resp = http.get(&state_url).bearer_auth("good").send().await.ok()?;
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            body["drones"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
                .then_some(())
        })
        .await;
        for path in [
            "/ctrl/status",
            "/dashboard",
            "/ctrl/dashboard/state",
            "/metrics",
        ] {
            let resp = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(resp.status(), 401, "{path}");
            assert_eq!(resp.text().await.unwrap(), "nope", "{path}");
            assert_admitted(&http, &base, path).await;
        }
        let resp = http.get(format!("{base}/pub/health")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    })
    .await
    .expect("test timed out");
}
