//! Black-box tests of the `hangar` binary's process lifecycle and observability: backends never
//! outlive their drone (`ps`; Docker containers: the drone's watchdog, else the next drone), a second stop signal skips the grace period, a standalone drone keeps
//! its name in its state file (and re-adopts its containers under it), and every component's metrics
//! carry the build and process series.
//!
//! Each test starts the real binary as child processes and talks to them over HTTP only.

#![allow(clippy::unwrap_used)]

use hangar_client::ControllerClient;
use hangar_test_support::docker::{docker, docker_ready, TestRun};
use hangar_test_support::{
    eventually, free_port, process_executable, with_timeout, IGNORING_SIGTERM,
};
use hangar_types::api::ConnectRequest;
use hangar_types::executable::Executable;
use hangar_types::{BackendId, BackendStatus, ClusterName, DroneName, NodeName};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Longest wait for a process to exit after it was told to.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// One `hangar` process, its output (stdout and stderr) in a file printed when a test fails. Killed
/// when dropped.
struct Hangar {
    child: Child,
    log: PathBuf,
}

impl Hangar {
    /// `hangar dev --in-memory` for [`CLUSTER`], its controller on `port`, the proxy on a free port.
    fn dev_in_memory(dir: &Path, port: u16, proxy_metrics: &str, drone_metrics: &str) -> Hangar {
        let port = port.to_string();
        let proxy_port = free_port().to_string();
        Hangar::start(
            dir,
            "dev",
            &[
                "dev",
                "--in-memory",
                "--controller-port",
                &port,
                "--proxy-port",
                &proxy_port,
                "--cluster",
                CLUSTER,
                "--proxy-metrics-addr",
                proxy_metrics,
                "--drone-metrics-addr",
                drone_metrics,
            ],
        )
    }

    /// `hangar <args>` with no `HANGAR_*` variable from the test's environment.
    fn start(dir: &Path, label: &str, args: &[&str]) -> Hangar {
        let log = dir.join(format!("{label}-{}.log", free_port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_hangar"));
        for (name, _) in std::env::vars() {
            if name.starts_with("HANGAR_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Hangar { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("already reaped")
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal);
    }

    async fn exited(&mut self) -> ExitStatus {
        tokio::time::timeout(EXIT_WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running:\n{}", self.output()))
            .unwrap()
    }

    /// Waits until the output contains `text`.
    async fn logged(&self, text: &str) {
        eventually(&format!("the log line {text:?}"), || async {
            self.output().contains(text).then_some(())
        })
        .await;
    }
}

impl Drop for Hangar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.output());
        }
    }
}

/// A running `hangar controller` and a client of it.
struct Controller {
    _process: Hangar,
    client: ControllerClient,
    url: String,
}

/// Runs `test` with [`TEST_TIMEOUT`] against `hangar controller` on a SQLite file in a temporary
/// directory (passed too).
async fn with_controller_in_tempdir(test: impl AsyncFnOnce(&Path, &Controller)) {
    with_timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(dir.path()).await;
        test(dir.path(), &controller).await;
    })
    .await;
}

/// The arguments of a drone running `executor` backends and keeping its state in `state`.
fn state_file_args<'a>(executor: &'a str, state: &'a Path) -> [&'a str; 4] {
    let state = state.to_str().unwrap();
    ["--executor", executor, "--state-file", state]
}

/// `hangar controller` on a SQLite file in `dir`.
async fn controller(dir: &Path) -> Controller {
    let port = free_port();
    let db = dir.join("hangar.db");
    let process = Hangar::start(
        dir,
        "controller",
        &[
            "controller",
            "--port",
            &port.to_string(),
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/");
    let client = ControllerClient::new(url.parse().unwrap()).unwrap();
    eventually("the controller to answer", || async {
        client.health().await.ok()
    })
    .await;
    Controller {
        _process: process,
        client,
        url,
    }
}

const CLUSTER: &str = "localhost:9";

/// `hangar drone` attached to `controller`, with `extra` arguments.
fn drone(dir: &Path, controller: &Controller, extra: &[&str]) -> Hangar {
    let mut args = vec![
        "drone",
        "--controller-url",
        &controller.url,
        "--cluster",
        CLUSTER,
    ];
    args.extend_from_slice(extra);
    Hangar::start(dir, "drone", &args)
}

/// The names of the drones connected to the controller right now.
async fn connected_drones(client: &ControllerClient) -> Vec<DroneName> {
    let cluster: ClusterName = CLUSTER.parse().unwrap();
    let state = client.cluster_state(&cluster).await.unwrap();
    state
        .drones
        .iter()
        .filter(|d| d.ready)
        .filter_map(|d| match &d.node.name {
            NodeName::Drone(name) => Some(name.clone()),
            NodeName::Proxy(_) => None,
        })
        .collect()
}

/// Connects a backend of key `key` running `executable` and waits until it is ready.
async fn ready_backend(client: &ControllerClient, key: &str, executable: Executable) -> BackendId {
    let request: ConnectRequest = serde_json::from_value(serde_json::json!({
        "key": {"name": key},
        "spawn_config": {"cluster": CLUSTER, "executable": executable},
    }))
    .unwrap();
    // The drone may not have registered yet: no drone available until it has.
    let response = eventually("a connect to succeed", || async {
        client.connect(&request).await.ok()
    })
    .await;
    let id = response.backend_id;
    wait_status(client, &id, BackendStatus::Ready).await;
    id
}

async fn wait_status(client: &ControllerClient, id: &BackendId, status: BackendStatus) {
    eventually(&format!("backend {id} to be {status}"), || async {
        let entry = client.backend_status(id).await.ok()?;
        (entry.status == status).then_some(())
    })
    .await;
}

/// Pids of the `hangar-test-backend` processes whose parent is `parent`, from `ps`.
fn backend_children(parent: u32) -> Vec<u32> {
    children(parent, "hangar-test-backend")
}

/// Pids of the processes whose parent is `parent` and whose command line contains `needle`.
fn children(parent: u32, needle: &str) -> Vec<u32> {
    let out = std::process::Command::new("ps")
        .args(["-o", "pid=,args=", "--ppid", &parent.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn kill(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Whether `ps` shows `pid` as a live process (a zombie waiting to be reaped is dead).
fn alive(pid: u32) -> bool {
    let out = std::process::Command::new("ps")
        .args(["-o", "stat=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&out.stdout);
    let stat = stat.trim();
    !stat.is_empty() && !stat.starts_with('Z')
}

async fn wait_gone(pid: u32) {
    eventually(&format!("backend process {pid} to be gone"), || async {
        (!alive(pid)).then_some(())
    })
    .await;
}

/// `hangar dev --in-memory`, the tour's own mode, killed with SIGKILL: its backend processes die
/// with it instead of running on as orphans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_die_with_a_sigkilled_dev() {
    with_timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut dev = Hangar::dev_in_memory(dir.path(), port, "127.0.0.1:0", "127.0.0.1:0");
        let url = format!("http://127.0.0.1:{port}/").parse().unwrap();
        let client = ControllerClient::new(url).unwrap();
        ready_backend(&client, "a", process_executable(&[])).await;
        ready_backend(&client, "b", process_executable(&[])).await;
        let backends = backend_children(dev.pid());
        assert_eq!(backends.len(), 2, "backends of dev: {backends:?}");
        assert!(backends.iter().all(|pid| alive(*pid)));

        dev.signal(Signal::SIGKILL);
        dev.exited().await;
        for pid in backends {
            wait_gone(pid).await;
        }
    })
    .await;
}

/// A drone configured with a one-hour grace period, whose backend ignores SIGTERM: the first SIGTERM
/// starts the graceful stop, the second kills the backend at once and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_skips_the_grace_period() {
    with_controller_in_tempdir(async |dir, controller| {
        let config = dir.join("drone.toml");
        std::fs::write(&config, "soft_terminate_grace = 3600000\n").unwrap();
        let mut drone = drone(
            dir,
            controller,
            &[
                "--executor",
                "process",
                "--config",
                config.to_str().unwrap(),
            ],
        );
        let id = ready_backend(
            &controller.client,
            "stubborn",
            process_executable(IGNORING_SIGTERM),
        )
        .await;
        let backends = backend_children(drone.pid());
        assert_eq!(backends.len(), 1, "backends of the drone: {backends:?}");

        drone.signal(Signal::SIGTERM);
        drone
            .logged("send SIGINT or SIGTERM again to skip the grace period")
            .await;
        // The backend got its SIGTERM (and ignores it): the grace period runs.
        wait_status(&controller.client, &id, BackendStatus::Terminating).await;
        assert!(alive(backends[0]));

        drone.signal(Signal::SIGTERM);
        let status = drone.exited().await;
        assert!(status.success(), "drone exited with {status}");
        let output = drone.output();
        assert!(
            output.contains("Second stop signal: skipping the grace period"),
            "{output}"
        );
        wait_gone(backends[0]).await;
        wait_status(&controller.client, &id, BackendStatus::Terminated).await;
    })
    .await;
}

/// A drone with a state file and no `--name` comes back under the same name after a restart, and
/// refuses another name for that state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_drone_keeps_its_name_in_its_state_file() {
    with_controller_in_tempdir(async |dir, controller| {
        let state = dir.join("drone-state.db");
        let args = state_file_args("process", &state);

        let mut first = drone(dir, controller, &args);
        let name = eventually("the drone to register", || async {
            connected_drones(&controller.client).await.pop()
        })
        .await;
        first.signal(Signal::SIGTERM);
        assert!(first.exited().await.success(), "{}", first.output());

        let second = drone(dir, controller, &args);
        eventually("the restarted drone to register", || async {
            connected_drones(&controller.client)
                .await
                .contains(&name)
                .then_some(())
        })
        .await;
        second
            .logged("Using the drone name kept in the state file")
            .await;
        drop(second);

        let other = "dr-someoneelse";
        let mut renamed = drone(dir, controller, &[&args[..], &["--name", other]].concat());
        let status = renamed.exited().await;
        let output = renamed.output();
        assert!(!status.success(), "{output}");
        assert!(
            output.contains(&format!("belongs to drone {name}, not {other}")),
            "{output}"
        );
    })
    .await;
}

/// A Docker drone with a state file, SIGKILLed and restarted without `--name`, re-adopts its running
/// container: the backend stays ready in the same container and can still be terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_docker_drone_readopts_its_container_under_its_kept_name() {
    if !docker_ready() {
        return;
    }
    let run = TestRun::new();
    with_controller_in_tempdir(async |dir, controller| {
        let state = dir.join("drone-state.db");
        let args = state_file_args("docker", &state);

        let mut first = drone(dir, controller, &args);
        let executable = Executable::Docker(Box::new(run.executable(&[])));
        let id = ready_backend(&controller.client, "boxed", executable).await;
        let container = format!("hangar-{id}");
        let inspect =
            |container: &str| docker(&["inspect", "-f", "{{.Id}} {{.State.Running}}", container]);
        let before = inspect(&container).unwrap();
        assert!(before.ends_with(" true"), "{before}");

        first.signal(Signal::SIGKILL);
        first.exited().await;
        let second = drone(dir, controller, &args);
        second
            .logged("Using the drone name kept in the state file")
            .await;
        eventually("the drone to come back", || async {
            (connected_drones(&controller.client).await.len() == 1).then_some(())
        })
        .await;
        assert_eq!(
            inspect(&container).unwrap(),
            before,
            "the same container runs on"
        );
        assert_eq!(
            controller.client.backend_status(&id).await.unwrap().status,
            BackendStatus::Ready
        );

        controller.client.hard_terminate(&id).await.unwrap();
        wait_status(&controller.client, &id, BackendStatus::Terminated).await;
        drop(second);
    })
    .await;
}

/// `hangar dev --in-memory` with Docker backends, killed with SIGKILL: its watchdog removes its
/// container at once; and when the watchdog was killed too, the next `hangar dev` of the machine
/// (another drone name) removes the container it left when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_sigkilled_dev_do_not_outlive_it() {
    if !docker_ready() {
        return;
    }
    with_timeout(TEST_TIMEOUT, async {
        let run = TestRun::new();
        let dir = tempfile::tempdir().unwrap();
        let running = |container: &str| docker(&["inspect", "-f", "{{.State.Running}}", container]);
        let boxed_dev = || async {
            let port = free_port();
            let dev = Hangar::dev_in_memory(dir.path(), port, "127.0.0.1:0", "127.0.0.1:0");
            let url = format!("http://127.0.0.1:{port}/").parse().unwrap();
            let client = ControllerClient::new(url).unwrap();
            let executable = Executable::Docker(Box::new(run.executable(&[])));
            let id = ready_backend(&client, "boxed", executable).await;
            let container = format!("hangar-{id}");
            assert_eq!(running(&container).unwrap(), "true");
            let watchdogs = children(dev.pid(), "container-watchdog");
            assert_eq!(watchdogs.len(), 1, "watchdogs of dev: {watchdogs:?}");
            (dev, container, watchdogs[0])
        };

        // Dev and its watchdog killed: the container runs on until the next dev starts, which
        // removes it before its drone registers. (Any drone of this machine removes it at its
        // start or at its periodic cleanup: a drone of a test running alongside may come first.)
        let (mut first, left, watchdog) = boxed_dev().await;
        kill(watchdog, Signal::SIGKILL);
        wait_gone(watchdog).await;
        first.signal(Signal::SIGKILL);
        first.exited().await;
        let (mut second, container, watchdog) = boxed_dev().await;
        assert!(running(&left).is_err(), "{left} is still there");

        // Dev killed alone: its watchdog removes the container and exits.
        second.signal(Signal::SIGKILL);
        second.exited().await;
        eventually("the watchdog to remove the container", || async {
            running(&container).is_err().then_some(())
        })
        .await;
        wait_gone(watchdog).await;
        assert!(run.containers().is_empty(), "{:?}", run.containers());
    })
    .await;
}

/// What the build script bakes in: 8 hex digits of the checkout's commit, or "unknown" without git.
fn expected_git_hash() -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=8", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "unknown".to_string(),
    }
}

/// The value of the series `name` (exactly, labels included) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.text().await.unwrap()
}

/// Every component of `hangar dev` reports `hangar_build_info` with the real git hash and the
/// process series; the controller counts backends by cluster and status, reports the hash in
/// `/ctrl/status`, and sends `/` to the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_report_build_process_and_backend_metrics() {
    with_timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (proxy_metrics, drone_metrics) = (free_port(), free_port());
        let _dev = Hangar::dev_in_memory(
            dir.path(),
            port,
            &format!("127.0.0.1:{proxy_metrics}"),
            &format!("127.0.0.1:{drone_metrics}"),
        );
        let base = format!("http://127.0.0.1:{port}");
        let client = ControllerClient::new(format!("{base}/").parse().unwrap()).unwrap();
        ready_backend(&client, "counted", process_executable(&[])).await;

        let hash = expected_git_hash();
        assert_eq!(client.status().await.unwrap().hash, hash);
        let build_info = format!(
            "hangar_build_info{{version=\"{}\",git_hash=\"{hash}\"}}",
            hangar_types::VERSION
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        for url in [
            format!("{base}/metrics"),
            format!("http://127.0.0.1:{drone_metrics}/metrics"),
            format!("http://127.0.0.1:{proxy_metrics}/metrics"),
        ] {
            let page = scrape(&url).await;
            assert_eq!(sample(&page, &build_info), Some(1.0), "{url}:\n{page}");
            // All three run in the one `hangar dev` process, started within the test's time.
            let started = sample(&page, "process_start_time_seconds").unwrap();
            assert!(
                started <= now && started > now - TEST_TIMEOUT.as_secs_f64(),
                "{url}: {started}"
            );
            let resident = sample(&page, "process_resident_memory_bytes").unwrap();
            assert!(resident > 1e6, "{url}: {resident}");
            assert!(sample(&page, "process_virtual_memory_bytes").unwrap() >= resident);
            let fds = sample(&page, "process_open_fds").unwrap();
            assert!(
                fds >= 3.0 && fds <= sample(&page, "process_max_fds").unwrap(),
                "{url}: {fds}"
            );
            assert!(
                sample(&page, "process_cpu_seconds_total").unwrap() > 0.0,
                "{url}"
            );
        }

        // The backend gauge is recounted periodically: wait for the ready backend to show.
        let ready = format!("hangar_backends{{cluster=\"{CLUSTER}\",status=\"ready\"}}");
        let scheduled = format!("hangar_backends{{cluster=\"{CLUSTER}\",status=\"scheduled\"}}");
        let page = eventually("the ready backend to be counted", || async {
            let page = scrape(&format!("{base}/metrics")).await;
            (sample(&page, &ready) == Some(1.0)).then_some(page)
        })
        .await;
        assert_eq!(sample(&page, &scheduled), Some(0.0), "{page}");

        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let root = http.get(format!("{base}/")).send().await.unwrap();
        assert!(root.status().is_redirection(), "{}", root.status());
        assert_eq!(root.headers()["location"], "/dashboard");
    })
    .await;
}
