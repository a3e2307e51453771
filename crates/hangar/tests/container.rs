//! The container image (`Dockerfile`) and the compose file (`compose.yaml`), end to end on the local
//! Docker engine:
//!
//! - the image, built by `scripts/build-image.sh` (the Dockerfile's `prebuilt` target around a static
//!   binary, nothing pulled), runs as a non-root user, and its default command, `hangar dev`, serves
//!   a connect through its proxy;
//! - `compose.yaml` with that image brings up two controllers, a Docker drone and a proxy, and a
//!   backend connected through one controller is served by the proxy attached to the other. There is
//!   no PostgreSQL image here, so the `postgres` service is left out (`up --no-deps`) and the
//!   controllers use a fresh database on `HANGAR_TEST_POSTGRES_URL`, reached through a relay on the
//!   Docker bridge's gateway address.
//!
//! Skipped without Docker (or PostgreSQL) outside CI, failing under CI, as the Docker executor tests
//! are. Every container, image and network is labelled with the test's run and removed afterwards.

#![allow(clippy::unwrap_used)]

use hangar_test_support::docker::{docker, docker_ready, TestRun, TEST_IMAGE, TEST_RUN_LABEL};
use hangar_test_support::postgres::TestDatabase;
use hangar_test_support::{eventually, eventually_within, free_port, with_timeout};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Whole test, image build excluded (that is cargo's and Docker's, run before).
const TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the containers may take to come up (migrations, the drone's first session) before a
/// connect succeeds.
const STARTUP: Duration = Duration::from_secs(150);
/// The body of the test backend's `/`.
const HELLO: &str = "hello from hangar-test-backend";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `hangar` image of one test, removed when dropped.
struct TestImage {
    tag: String,
}

impl TestImage {
    /// Builds it as the README says (`scripts/build-image.sh`), from a static binary of the `dev`
    /// profile (CI builds it before the tests; otherwise this builds it once), or of the profile
    /// named by `HANGAR_TEST_IMAGE_PROFILE` (e.g. `release`, to reuse a release build).
    fn build(run: &TestRun) -> TestImage {
        let tag = format!("hangar-test-image:{}", run.id);
        let profile = std::env::var("HANGAR_TEST_IMAGE_PROFILE").unwrap_or_else(|_| "dev".into());
        let status = Command::new("bash")
            .arg(repo().join("scripts/build-image.sh"))
            .env("IMAGE", &tag)
            .env("PROFILE", profile)
            .env("LABEL", run.label())
            .status()
            .expect("cannot run scripts/build-image.sh");
        assert!(status.success(), "scripts/build-image.sh failed");
        TestImage { tag }
    }

    fn inspect(&self, format: &str) -> String {
        docker(&["image", "inspect", "--format", format, &self.tag]).unwrap()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        // A container still using the image would keep it.
        let filter = format!("ancestor={}", self.tag);
        if let Ok(containers) = docker(&["ps", "-aq", "--filter", &filter]) {
            for container in containers.lines() {
                let _ = docker(&["rm", "--force", container]);
            }
        }
        let _ = docker(&["rmi", "--force", &self.tag]);
    }
}

/// The static test backend, copied out of its image into `dir`.
fn static_test_backend(run: &TestRun, dir: &Path) -> PathBuf {
    let container =
        docker(&["create", "--label", &run.label(), TEST_IMAGE]).expect("docker create");
    let path = dir.join("hangar-test-backend");
    let copied = docker(&[
        "cp",
        &format!("{container}:/hangar-test-backend"),
        &path.to_string_lossy(),
    ]);
    let _ = docker(&["rm", &container]);
    copied.expect("docker cp of the test backend");
    path
}

/// The host address a published container port is bound to, e.g. `127.0.0.1:49153`.
fn published(container: &str, port: &str) -> SocketAddr {
    let out = docker(&["port", container, port]).unwrap();
    let line = out.lines().next().expect("port is published");
    line.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// `POST /ctrl/connect` until a drone has registered and the connect succeeds.
async fn connect(client: &reqwest::Client, controller: SocketAddr, body: &Value) -> Value {
    let url = format!("http://{controller}/ctrl/connect");
    eventually_within(STARTUP, "a successful connect", || async {
        let response = client.post(&url).json(body).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<Value>().await.ok()
    })
    .await
}

/// `GET` the connect response's URL through the proxy listening at `proxy` (the URL names the
/// cluster, which the test's host does not resolve), with the cluster as `Host`.
async fn through_proxy(
    client: &reqwest::Client,
    proxy: SocketAddr,
    connected: &Value,
) -> (u16, String) {
    let url = url::Url::parse(connected["url"].as_str().unwrap()).unwrap();
    let host = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let response = client
        .get(format!("http://{proxy}{}", url.path()))
        .header(reqwest::header::HOST, host)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn image_runs_hangar_dev_as_non_root_and_serves_a_connect() {
    if !docker_ready() {
        return;
    }
    let run = TestRun::new();
    let image = TestImage::build(&run);
    assert_eq!(image.inspect("{{.Config.User}}"), "65532:65532");
    assert_eq!(
        image.inspect("{{json .Config.Entrypoint}}"),
        r#"["/usr/local/bin/hangar"]"#
    );
    let dir = tempfile::tempdir().unwrap();
    let backend = static_test_backend(&run, dir.path());
    let name = format!("hangar-image-{}", run.id);
    docker(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--label",
        &run.label(),
        "--publish",
        "127.0.0.1::8080",
        "--publish",
        "127.0.0.1::9090",
        "--volume",
        &format!(
            "{}:/usr/local/bin/hangar-test-backend:ro",
            backend.display()
        ),
        &image.tag,
    ])
    .expect("docker run of the image");
    let (controller, proxy) = (published(&name, "8080/tcp"), published(&name, "9090/tcp"));
    let client = reqwest::Client::new();

    with_timeout(TEST_TIMEOUT, async {
        let body = json!({
            "key": {"name": "image-test"},
            "spawn_config": {"executable": {"command": ["/usr/local/bin/hangar-test-backend"]}},
        });
        let connected = connect(&client, controller, &body).await;
        let (status, text) = through_proxy(&client, proxy, &connected).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(HELLO), "{text}");
        // Every process of the container, the backend included, runs as the image's user.
        let top = docker(&["top", &name, "-eo", "pid,uid,comm"]).unwrap();
        let uids: Vec<&str> = top
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(1))
            .collect();
        assert!(uids.len() >= 2, "hangar and its backend: {top}");
        assert!(uids.iter().all(|uid| *uid == "65532"), "{top}");
    })
    .await;
    let logs = docker(&["logs", &name]).unwrap_or_default();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Forwards TCP connections from `listen` (an address containers reach) to `target`, for as long as
/// the test's runtime lives.
async fn relay(listen: IpAddr, target: String) -> SocketAddr {
    let listener = TcpListener::bind((listen, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target.as_str()).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// One `docker compose` project, taken down (volumes included) when dropped.
struct ComposeProject {
    name: String,
    env: Vec<(String, String)>,
}

impl ComposeProject {
    /// `docker-compose` (1.29) when installed, else `docker compose`.
    fn command(&self) -> Command {
        let mut cmd = if Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            Command::new("docker-compose")
        } else {
            let mut cmd = Command::new("docker");
            cmd.arg("compose");
            cmd
        };
        cmd.current_dir(repo())
            .args(["--file", "compose.yaml", "--project-name", &self.name])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.command().args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "compose {args:?}: {text}");
        text
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.command().args(["logs", "--no-color"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self
            .command()
            .args(["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .output();
    }
}

/// The host's address on Docker's default bridge: its `Gateway`, or when the engine does not
/// report one, the first address of its subnet (where Docker puts it).
fn bridge_gateway() -> IpAddr {
    let config = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{json .IPAM.Config}}",
    ])
    .unwrap();
    let config: Value = serde_json::from_str(&config).unwrap();
    if let Some(gateway) = config[0]["Gateway"].as_str().filter(|g| !g.is_empty()) {
        return gateway.parse().unwrap();
    }
    let subnet = config[0]["Subnet"]
        .as_str()
        .expect("the bridge has a subnet");
    let network: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    IpAddr::V4(std::net::Ipv4Addr::from(u32::from(network) + 1))
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_file_serves_a_connect_across_two_controllers() {
    if !docker_ready() {
        return;
    }
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let run = TestRun::new();
    let image = TestImage::build(&run);
    // Containers reach the host at the default bridge's gateway; the test's PostgreSQL listens on
    // loopback only, hence the relay.
    let gateway = bridge_gateway();
    let mut db_url = url::Url::parse(db.url()).unwrap();
    let server = format!(
        "{}:{}",
        db_url.host_str().unwrap(),
        db_url.port().unwrap_or(5432)
    );
    let relayed = relay(gateway, server).await;
    db_url.set_ip_host(gateway).unwrap();
    db_url.set_port(Some(relayed.port())).unwrap();

    let (c1, c2, proxy_port) = (free_port(), free_port(), free_port());
    let cluster = format!("localhost:{proxy_port}");
    let project = ComposeProject {
        name: format!("hangar-{}", run.id),
        env: [
            ("HANGAR_IMAGE", image.tag.clone()),
            ("HANGAR_DATABASE_URL", db_url.to_string()),
            ("HANGAR_CLUSTER", cluster.clone()),
            ("HANGAR_CONTROLLER1_PORT", c1.to_string()),
            ("HANGAR_CONTROLLER2_PORT", c2.to_string()),
            ("HANGAR_PROXY_PORT", proxy_port.to_string()),
            ("HANGAR_DRONE_IP", gateway.to_string()),
            ("HANGAR_DRONE_NAME", format!("dr-{}", run.id)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };
    project.run(&[
        "up",
        "--detach",
        "--no-deps",
        "controller1",
        "controller2",
        "drone",
        "proxy",
    ]);
    let controller1 = SocketAddr::from(([127, 0, 0, 1], c1));
    let controller2 = SocketAddr::from(([127, 0, 0, 1], c2));
    let proxy = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    let client = reqwest::Client::new();

    with_timeout(TEST_TIMEOUT, async {
        let body = json!({
            "key": {"name": "compose-test"},
            "spawn_config": {"executable": {
                "image": TEST_IMAGE,
                "pull_policy": "IfNotPresent",
                "labels": {TEST_RUN_LABEL: run.id},
            }},
        });
        let connected = connect(&client, controller1, &body).await;
        let backend = connected["backend_id"].as_str().unwrap().to_string();
        // The drone (attached to controller 1) runs it; the proxy (attached to controller 2) serves it.
        let (status, text) = through_proxy(&client, proxy, &connected).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(HELLO), "{text}");
        // The compose services run the image built with the run's label too: count the drone's
        // backend containers only (the drone labels them `dev.hangar.backend`).
        let backends = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label={}", run.label()),
            "--filter",
            "label=dev.hangar.backend",
        ])
        .unwrap_or_default();
        assert_eq!(backends.lines().count(), 1, "one backend container");
        // The same key through the other controller reuses the backend (one shared database).
        let again = connect(&client, controller2, &body).await;
        assert_eq!(again["backend_id"].as_str(), Some(backend.as_str()));
        let (status, _) = through_proxy(&client, proxy, &again).await;
        assert_eq!(status, 200);
        let terminate = format!("http://{controller2}/ctrl/b/{backend}/hard-terminate");
        let response = client.post(&terminate).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let status_url = format!("http://{controller1}/pub/b/{backend}/status");
        eventually("the backend terminated", || async {
            let status: Value = client
                .get(&status_url)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (status["status"] == "terminated").then_some(())
        })
        .await;
    })
    .await;
    drop(project);
    drop(image);
    db.drop_database().await;
}
