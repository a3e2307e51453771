//! Black-box test of the `hangar` binary: `hangar dev` started as a child process, driven only
//! through the CLI (`connect`, `status`, `terminate`) and HTTP (the proxy and `/pub/health`).

// Helpers outside `#[test]` functions are test code too: a panic there is a test failure.
#![allow(clippy::unwrap_used)]

use hangar_test_support::free_port;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

/// Upper bound for the whole scenario (includes building the test backend when it is missing).
const TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Upper bound for one wait inside the scenario.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn hangar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hangar")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// `target/debug/hangar-test-backend`, built with cargo when missing.
async fn test_backend() -> PathBuf {
    let path = Path::new(hangar_bin()).with_file_name("hangar-test-backend");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "hangar-test-backend"])
            .current_dir(workspace_root())
            .status()
            .await
            .expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p hangar-test-backend failed"
        );
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A running `hangar dev`, killed when dropped (also when the test fails), with its output in a
/// file that is printed if the test panics.
struct DevProcess {
    child: Child,
    log: PathBuf,
    controller: String,
}

impl DevProcess {
    fn start(controller_port: u16, proxy_port: u16) -> DevProcess {
        let log = std::env::temp_dir().join(format!(
            "hangar-dev-blackbox-{}-{controller_port}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(hangar_bin())
            .args([
                "dev",
                "--in-memory",
                "--controller-port",
                &controller_port.to_string(),
                "--proxy-port",
                &proxy_port.to_string(),
                // Any free ports: the defaults 9091 and 9092 may be taken on a shared machine.
                "--proxy-metrics-addr",
                "127.0.0.1:0",
                "--drone-metrics-addr",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("starting hangar dev");
        DevProcess {
            child,
            log,
            controller: format!("http://127.0.0.1:{controller_port}"),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the controller answers `/pub/health` and the banner (printed once the drone has
    /// registered) is out.
    async fn wait_until_up(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("hangar dev exited early with {status}");
            }
            let healthy = match http
                .get(format!("{}/pub/health", self.controller))
                .send()
                .await
            {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            if healthy && self.output().contains("Hangar dev is running") {
                return;
            }
            assert!(Instant::now() < deadline, "hangar dev did not come up");
            tokio::time::sleep(POLL).await;
        }
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("hangar dev already reaped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- hangar dev output ----\n{}", self.output());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

struct CliOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `hangar <args> --controller <controller>` to completion.
async fn hangar(controller: &str, args: &[&str]) -> CliOutput {
    let out = timeout(
        STEP_TIMEOUT,
        Command::new(hangar_bin())
            .args(args)
            .args(["--controller", controller])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("hangar {args:?} did not finish"))
    .unwrap();
    CliOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The value after `prefix` on the first line that starts with it.
fn line_value<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
        .trim()
}

/// `hangar connect --key <key> --command <backend>`; returns (backend id, URL).
async fn connect(dev: &DevProcess, key: &str, backend: &Path, verb: &str) -> (String, String) {
    let command = format!("'{}'", backend.display());
    let out = hangar(
        &dev.controller,
        &["connect", "--key", key, "--command", &command],
    )
    .await;
    assert!(
        out.success,
        "connect failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    let id = line_value(&out.stdout, &format!("{verb} backend: ")).to_string();
    let url = line_value(&out.stdout, "URL: ").to_string();
    assert!(
        out.stdout.lines().any(|l| l == "Status: ready"),
        "connect did not reach ready:\n{}",
        out.stdout
    );
    (id, url)
}

/// The backend's own port, read from its environment through the proxy.
async fn backend_port(url: &str) -> u16 {
    let env: serde_json::Value = reqwest::get(format!("{url}env"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    env["PORT"].as_str().unwrap().parse().unwrap()
}

/// Polls until nothing accepts connections on 127.0.0.1:`port`.
async fn wait_port_closed(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STEP_TIMEOUT;
    while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn backend_status(dev: &DevProcess, id: &str) -> serde_json::Value {
    let out = hangar(&dev.controller, &["status", id, "--json"]).await;
    assert!(out.success, "status failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap()
}

async fn scenario(dev: &mut DevProcess) {
    let backend = test_backend().await;
    dev.wait_until_up().await;
    // Logs go to a file here, not a terminal: plain text, no ANSI colour codes.
    let output = dev.output();
    assert!(output.contains(" INFO "), "no info log line: {output}");
    assert!(
        !output.contains('\u{1b}'),
        "colour codes in a file: {output:?}"
    );
    let banner = dev.output();
    assert!(banner.contains(&dev.controller), "{banner}");
    assert!(banner.contains("hangar connect"), "{banner}");

    // Create, then reach the backend through the proxy.
    let (id, url) = connect(dev, "k1", &backend, "Created").await;
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello from hangar-test-backend");
    let port = backend_port(&url).await;

    // Same key: same backend.
    let (again, _) = connect(dev, "k1", &backend, "Reusing").await;
    assert_eq!(again, id);
    assert_eq!(backend_status(dev, &id).await["status"], "ready");

    // Terminate, and see it terminated and its process gone.
    let out = hangar(&dev.controller, &["terminate", &id]).await;
    assert!(out.success, "terminate failed: {}", out.stderr);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let status = backend_status(dev, &id).await;
        if status["status"] == "terminated" {
            assert_eq!(status["termination_reason"], "external", "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend not terminated: {status}"
        );
        tokio::time::sleep(POLL).await;
    }
    wait_port_closed(port).await;

    // Its output, kept after the exit.
    let out = hangar(&dev.controller, &["logs", &id]).await;
    assert!(out.success, "logs failed: {}", out.stderr);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("listening on ")),
        "{}",
        out.stdout
    );
    let out = hangar(&dev.controller, &["logs", "--tail", "1", &id]).await;
    assert_eq!(out.stdout.trim(), "exiting with code 0", "{}", out.stderr);

    // The drone's metrics, at the address the banner prints: one spawn, one exit.
    let metrics_line = line_value(&banner, "  Metrics:");
    let drone_metrics = metrics_line
        .split(", ")
        .find_map(|part| part.strip_prefix("drone "))
        .unwrap_or_else(|| panic!("no drone metrics in {metrics_line:?}"));
    let text = reqwest::get(drone_metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\nhangar_drone_spawns_total 1\n"), "{text}");
    assert!(
        text.contains("\nhangar_drone_backend_exits_total{reason=\"external\"} 1\n"),
        "{text}"
    );

    // A backend that crashes at startup: `hangar status` shows why.
    let crash = "sh -c 'echo starting; echo \"fatal: no config\" >&2; exit 3'";
    let out = hangar(
        &dev.controller,
        &["connect", "--key", "crash", "--command", crash],
    )
    .await;
    let crashed = line_value(&out.stdout, "Created backend: ").to_string();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while backend_status(dev, &crashed).await["status"] != "terminated" {
        assert!(Instant::now() < deadline, "crashing backend not terminated");
        tokio::time::sleep(POLL).await;
    }
    let out = hangar(&dev.controller, &["status", &crashed]).await;
    assert!(out.success, "status failed: {}", out.stderr);
    assert!(
        out.stdout.contains("exit code 3")
            && out
                .stdout
                .contains("Last error lines:\n  fatal: no config\n"),
        "{}",
        out.stdout
    );

    // API errors are reported with kind and error id, and a non-zero exit code.
    let out = hangar(&dev.controller, &["status", "nosuchbackend"]).await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("(NotFound, error id "),
        "unexpected error output: {}",
        out.stderr
    );

    // A backend still running when `hangar dev` stops is terminated with it.
    let (_, url2) = connect(dev, "k2", &backend, "Created").await;
    let port2 = backend_port(&url2).await;
    dev.sigterm();
    let status = timeout(STEP_TIMEOUT, dev.child.wait())
        .await
        .expect("hangar dev did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "hangar dev exited with {status}");
    wait_port_closed(port2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_connect_status_terminate_and_stops_cleanly() {
    let mut dev = DevProcess::start(free_port(), free_port());
    if timeout(TEST_TIMEOUT, scenario(&mut dev)).await.is_err() {
        panic!("scenario timed out");
    }
}

/// `--log-format json` writes one JSON object per log line on stderr.
#[tokio::test]
async fn json_log_format_writes_one_object_per_line() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let db = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(hangar_bin())
        .args(["controller", "--log-format", "json", "--host", "127.0.0.1"])
        .args(["--port", &free_port().to_string()])
        .arg("--db")
        .arg(db.path())
        .env_remove("HANGAR_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = timeout(STEP_TIMEOUT, lines.next_line())
        .await
        .expect("no log line from the controller")
        .unwrap()
        .expect("stderr closed without a log line");
    let entry: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert!(entry["level"].is_string(), "{entry}");
    assert!(entry["fields"]["message"].is_string(), "{entry}");
    child.start_kill().unwrap();
}

#[tokio::test]
async fn dev_refuses_a_busy_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = timeout(
        STEP_TIMEOUT,
        Command::new(hangar_bin())
            .args([
                "dev",
                "--in-memory",
                "--controller-port",
                &port.to_string(),
                "--proxy-port",
                &free_port().to_string(),
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("hangar dev did not exit")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already in use") && stderr.contains("--controller-port"),
        "{stderr}"
    );
}

/// A reader that went away (`hangar version | head -0`) ends the command quietly with the shell's
/// SIGPIPE status instead of a panic message.
#[test]
fn closed_stdout_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(hangar_bin())
        .arg("version")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
