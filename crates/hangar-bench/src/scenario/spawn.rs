//! `spawn`: N sequential cold spawns, one new key each.
//!
//! - `connect_to_ready`: from sending `POST /ctrl/connect` to seeing `ready` on the backend's status
//!   stream (the stream is opened as soon as the connect call returns; it replays history).
//! - `connect_to_first_response`: from the same instant to the first successful `GET` through the proxy
//!   (sent right after the connect call returns; the proxy holds it until the backend is ready).
//! - `connect_call`: how long the connect call itself took.
//! - `recorded_until_<status>`: where the time goes — store-clock milliseconds (1 ms resolution) from
//!   the previous recorded state to `<status>` (`loading` counts from `scheduled`).
//! - baseline `direct_start_to_http`: starting the same backend directly (process: spawn the binary;
//!   Docker: create + start through the Docker API from this process, with bollard as the drone does,
//!   publishing the port on 127.0.0.1, then one inspect for the port) and probing it as the drone does
//!   (connect, `GET /`, any HTTP answer counts) every millisecond until it answers — the floor.
//! - Docker only, `docker_cli_start_to_http`: the same through the `docker` CLI (`docker run -d -p
//!   127.0.0.1::8080`, `docker port`), for comparison with the numbers of earlier runs.
//!
//! Baseline and Hangar runs alternate so drift affects both alike; one untimed warm-up of each comes
//! first. Each backend is terminated (and awaited) before the next spawn, so every spawn is cold.

use super::{run_id, test_backend_executable, BenchOptions};
use crate::child::ChildProcess;
use crate::http_load::answers_http;
use crate::report::{Report, Unit};
use crate::system::{free_port, StoreKind, System, SystemConfig, WAIT};
use anyhow::Context;
use hangar_types::executable::{Executable, ExecutorKind};
use hangar_types::{BackendId, BackendStatus};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Spawns per run by default (`--executor docker`: [`DEFAULT_N_DOCKER`]). A process spawn takes a
/// few milliseconds; at 20 per run the ratio had a standard deviation of 0.13 across runs on a noisy
/// 2-core machine, at 60 half that, for about 0.3 s more per run.
pub const DEFAULT_N: usize = 60;
/// Docker spawns per run by default: each takes a few hundred milliseconds.
pub const DEFAULT_N_DOCKER: usize = 20;
/// The image `scripts/build-test-image.sh` builds.
pub const DOCKER_IMAGE: &str = "hangar-test-backend:latest";
/// How often the baseline probes a freshly started backend.
const BASELINE_PROBE_INTERVAL: Duration = Duration::from_millis(1);

struct SpawnSample {
    connect_call: Duration,
    to_ready: Duration,
    to_first_response: Duration,
    /// Store-clock milliseconds between consecutive recorded states, `scheduled` → … → `ready`.
    phases: Vec<(BackendStatus, f64)>,
}

/// How the backend is started directly, for the baseline.
enum Direct {
    Process(PathBuf),
    /// Through the Docker API; containers carry [`BENCH_LABEL`] with the run id.
    Docker {
        docker: bollard::Docker,
        run: String,
    },
}

/// Label of the baseline's containers (value: the run id), so a leftover can be found and removed.
const BENCH_LABEL: &str = "hangar-bench-run";

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let executor = options.executor.unwrap_or(ExecutorKind::Process);
    let n = options.n.unwrap_or(match executor {
        ExecutorKind::Process => DEFAULT_N,
        _ => DEFAULT_N_DOCKER,
    });
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let mut report = Report::new("spawn");
    report.param("n", n);
    report.param("store", store.as_str());
    report.param("executor", executor.to_string());

    let (executable, direct) = match executor {
        ExecutorKind::Process => (
            test_backend_executable(&[])?,
            Direct::Process(crate::binaries::test_backend()?),
        ),
        ExecutorKind::Docker => {
            if let Err(reason) = docker_available().await {
                report.note(format!("docker spawn skipped: {reason}"));
                eprintln!("hangar-bench: docker spawn skipped: {reason}");
                return Ok(report);
            }
            let executable = serde_json::from_value(serde_json::json!({
                "image": DOCKER_IMAGE,
                "pull_policy": "Never",
            }))
            .context("building the docker executable")?;
            let docker =
                bollard::Docker::connect_with_defaults().context("connecting to the Docker API")?;
            (
                executable,
                Direct::Docker {
                    docker,
                    run: run_id(),
                },
            )
        }
        // Never parsed from the command line: a socket executor needs an external program.
        ExecutorKind::Socket => anyhow::bail!("the spawn benchmark cannot use a socket executor"),
    };

    let config = SystemConfig {
        executor,
        ..SystemConfig::new(store)
    };
    let system = match System::start(&config).await {
        Ok(system) => system,
        // The drone could not offer Docker (not built in, or no usable engine): say why and skip.
        Err(e) if executor == ExecutorKind::Docker => {
            let reason = format!("a drone with the Docker executor could not start ({e:#})");
            report.note(format!("docker spawn skipped: {reason}"));
            eprintln!("hangar-bench: docker spawn skipped: {reason}");
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let measured = measure(&system, &executable, &direct, n).await;
    system.shutdown().await;
    let Measured {
        samples,
        baseline,
        docker_cli,
    } = measured?;

    report.add_millis("direct_start_to_http", &baseline, None);
    if !docker_cli.is_empty() {
        report.add_millis(
            "docker_cli_start_to_http",
            &docker_cli,
            Some("direct_start_to_http"),
        );
    }
    let pick = |f: fn(&SpawnSample) -> Duration| samples.iter().map(f).collect::<Vec<_>>();
    report.add_millis(
        "connect_to_ready",
        &pick(|s| s.to_ready),
        Some("direct_start_to_http"),
    );
    report.add_millis(
        "connect_to_first_response",
        &pick(|s| s.to_first_response),
        Some("direct_start_to_http"),
    );
    report.add_millis("connect_call", &pick(|s| s.connect_call), None);
    for status in [
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
    ] {
        let values: Vec<f64> = samples
            .iter()
            .flat_map(|s| {
                s.phases
                    .iter()
                    .filter(|(st, _)| *st == status)
                    .map(|(_, ms)| *ms)
            })
            .collect();
        report.add(
            &format!("recorded_until_{status}"),
            Unit::Milliseconds,
            &values,
            None,
        );
    }
    report.note(format!(
        "the baseline probes every {BASELINE_PROBE_INTERVAL:?}; the drone's probe backs off \
         exponentially (hangar-drone readiness.rs)"
    ));
    Ok(report)
}

async fn measure(
    system: &System,
    executable: &Executable,
    direct: &Direct,
    n: usize,
) -> anyhow::Result<Measured> {
    let http = reqwest::Client::new();
    let run = run_id();
    // Warm-up (page cache, first connections): not recorded.
    start_directly(direct).await.context("baseline warm-up")?;
    spawn_once(system, &http, executable, &format!("spawn-{run}-warmup"))
        .await
        .context("warm-up spawn")?;
    let mut measured = Measured::default();
    for i in 0..n {
        measured.baseline.push(start_directly(direct).await?);
        if matches!(direct, Direct::Docker { .. }) {
            measured.docker_cli.push(docker_cli_start().await?);
        }
        measured
            .samples
            .push(spawn_once(system, &http, executable, &format!("spawn-{run}-{i}")).await?);
    }
    Ok(measured)
}

#[derive(Default)]
struct Measured {
    samples: Vec<SpawnSample>,
    /// `direct_start_to_http`.
    baseline: Vec<Duration>,
    /// `docker_cli_start_to_http` (Docker only).
    docker_cli: Vec<Duration>,
}

/// One cold spawn through Hangar; terminates the backend afterwards (untimed).
async fn spawn_once(
    system: &System,
    http: &reqwest::Client,
    executable: &Executable,
    key: &str,
) -> anyhow::Result<SpawnSample> {
    let request = system.connect_request(key, executable.clone())?;
    let started = Instant::now();
    let response = system
        .client
        .connect(&request)
        .await
        .context("connect call failed")?;
    let connect_call = started.elapsed();
    anyhow::ensure!(response.spawned, "key {key} reused a backend");
    let backend = response.backend_id.clone();
    let ready = async {
        let entry = system
            .wait_for_status(&backend, BackendStatus::Ready)
            .await?;
        anyhow::ensure!(
            entry.status == BackendStatus::Ready,
            "backend {backend} did not become ready: {entry:?}"
        );
        anyhow::Ok(started.elapsed())
    };
    let first_response = async {
        first_success(http, &response.url).await?;
        anyhow::Ok(started.elapsed())
    };
    let (to_ready, to_first_response) = tokio::join!(ready, first_response);
    let sample = SpawnSample {
        connect_call,
        to_ready: to_ready?,
        to_first_response: to_first_response?,
        phases: phases(system, &backend).await?,
    };
    system
        .client
        .soft_terminate(&backend)
        .await
        .context("terminating the backend")?;
    system
        .wait_for_status(&backend, BackendStatus::Terminated)
        .await?;
    Ok(sample)
}

/// How long each state lasted before the next one was recorded (store clock), up to `ready`.
async fn phases(system: &System, backend: &BackendId) -> anyhow::Result<Vec<(BackendStatus, f64)>> {
    let history = system
        .store
        .backend_history(backend)
        .await
        .context("reading the backend's history")?;
    Ok(history
        .windows(2)
        .filter(|w| w[1].0.status() <= BackendStatus::Ready)
        .map(|w| (w[1].0.status(), (w[1].1 .0 - w[0].1 .0) as f64))
        .collect())
}

/// GETs `url` until a 2xx answer (the proxy holds the request while the backend starts; anything else
/// is retried), within [`WAIT`].
pub(super) async fn first_success(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let outcome = http.get(url).send().await;
        if let Ok(response) = &outcome {
            if response.status().is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no successful response from {url} within {WAIT:?} (last: {outcome:?})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the backend directly and probes it until it answers; returns the time that took.
async fn start_directly(direct: &Direct) -> anyhow::Result<Duration> {
    match direct {
        Direct::Process(binary) => {
            let port = free_port().await?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let started = Instant::now();
            let mut command = tokio::process::Command::new(binary);
            command.env("PORT", port.to_string());
            let mut child = ChildProcess::spawn("the test backend", command)?;
            let probed = probe_until_answers(addr).await;
            let elapsed = started.elapsed();
            child.stop().await;
            probed?;
            Ok(elapsed)
        }
        Direct::Docker { docker, run } => {
            let name = format!("hangar-bench-{run}-{}", hangar_types::token::random_token());
            let started = Instant::now();
            let result = async {
                let addr = docker_api_start(docker, &name, run).await?;
                probe_until_answers(addr).await?;
                Ok(started.elapsed())
            }
            .await;
            let remove = bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            let _ = docker.remove_container(&name, Some(remove)).await;
            result
        }
    }
}

/// Creates and starts the test image through the Docker API (as the drone's executor does: the port
/// published on 127.0.0.1 at a port Docker picks) and returns the published address.
async fn docker_api_start(
    docker: &bollard::Docker,
    name: &str,
    run: &str,
) -> anyhow::Result<SocketAddr> {
    use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
    use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions};
    use std::collections::HashMap;
    const PORT: &str = "8080/tcp";
    let binding = PortBinding {
        host_ip: Some("127.0.0.1".to_string()),
        host_port: Some(String::new()),
    };
    let body = ContainerCreateBody {
        image: Some(DOCKER_IMAGE.to_string()),
        env: Some(vec!["PORT=8080".to_string()]),
        labels: Some(HashMap::from([(BENCH_LABEL.to_string(), run.to_string())])),
        exposed_ports: Some(HashMap::from([(PORT.to_string(), HashMap::new())])),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(PORT.to_string(), Some(vec![binding]))])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(name.to_string()),
        ..Default::default()
    };
    docker
        .create_container(Some(options), body)
        .await
        .context("creating the container")?;
    docker
        .start_container(
            name,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .context("starting the container")?;
    let info = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .context("inspecting the container")?;
    let port = info
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|ports| ports.get(PORT).cloned().flatten())
        .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
        .and_then(|p| p.parse::<u16>().ok())
        .context("the container's port is not published")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The baseline of earlier runs: `docker run` and `docker port` through the CLI, then the same probe.
async fn docker_cli_start() -> anyhow::Result<Duration> {
    let started = Instant::now();
    let id = docker(&["run", "-d", "--rm", "-p", "127.0.0.1::8080", DOCKER_IMAGE]).await?;
    let result = async {
        let port = docker(&["port", &id, "8080/tcp"]).await?;
        let addr = port
            .lines()
            .find_map(|l| {
                l.trim()
                    .parse::<SocketAddr>()
                    .ok()
                    .filter(SocketAddr::is_ipv4)
            })
            .with_context(|| format!("unexpected `docker port` output {port:?}"))?;
        probe_until_answers(addr).await?;
        Ok(started.elapsed())
    }
    .await;
    let _ = docker(&["rm", "-f", &id]).await;
    result
}

async fn probe_until_answers(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !answers_http(addr).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr} did not answer HTTP within {WAIT:?}"
        );
        tokio::time::sleep(BASELINE_PROBE_INTERVAL).await;
    }
    Ok(())
}

/// Runs `docker args…` and returns its trimmed stdout.
async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .context("running docker")?;
    anyhow::ensure!(
        output.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Why Docker spawns cannot be measured here, if they cannot.
pub(super) async fn docker_available() -> Result<(), String> {
    docker(&["version", "--format", "{{.Server.Version}}"])
        .await
        .map_err(|e| format!("no usable Docker daemon ({e:#})"))?;
    docker(&["image", "inspect", "--format", "{{.Id}}", DOCKER_IMAGE])
        .await
        .map_err(|_| {
            format!("image {DOCKER_IMAGE} is missing; build it with scripts/build-test-image.sh")
        })?;
    Ok(())
}
