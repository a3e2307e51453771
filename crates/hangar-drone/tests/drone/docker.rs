//! The Docker executor against the real Docker engine: on its own ([`executor`]) and inside whole
//! drones ([`session`]). Every container and network a test creates carries its test-run label and is
//! removed when the test ends ([`run::TestRun`]).

mod executor;
mod run;
mod session;

use hangar_drone::executor::{BackendSpec, DockerExecutor, DockerSettings, Executor};
use hangar_types::executable::{DockerExecutable, Executable};
use hangar_types::protocol::DroneToController;
use hangar_types::DroneName;
use run::TestRun;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
use crate::probe::WAIT;

/// Runs a Docker test with a timeout; skips it (or, under CI, fails it) without Docker.
async fn docker_test(test: impl Future<Output = ()>) {
    if !run::docker_ready() {
        return;
    }
    crate::init_tracing();
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

/// Runs `test` as a [`docker_test`] with a test run.
async fn with_run(test: impl AsyncFnOnce(&TestRun)) {
    docker_test(async { test(&TestRun::new()).await }).await;
}

/// [`with_run`] with a Docker executor for a fresh drone name (its metrics dropped), shut down after
/// `test`.
async fn with_executor(test: impl AsyncFnOnce(&TestRun, &DockerExecutor)) {
    with_run(async |run| {
        let (executor, _metrics) = executor(None).await;
        test(run, &executor).await;
        executor.shutdown().await;
    })
    .await;
}

/// [`with_run`] with the first executor of a fresh drone name, for a test that restarts that drone
/// ([`executor_for`] it again); `test` shuts the executor down itself.
async fn with_first_executor(test: impl AsyncFnOnce(&TestRun, &DroneName, DockerExecutor)) {
    with_run(async |run| {
        let drone = DroneName::random();
        let (first, _metrics) = executor_for(&drone, None).await;
        test(run, &drone, first).await;
    })
    .await;
}

fn settings(drone: &DroneName, mount_base: Option<PathBuf>) -> DockerSettings {
    DockerSettings {
        drone: drone.clone(),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        mount_base,
        runtime: None,
        log_config: None,
        cleanup_min_age: Duration::ZERO,
    }
}

/// A Docker executor for a fresh drone name, and the receiving end of its metrics.
async fn executor(
    mount_base: Option<PathBuf>,
) -> (DockerExecutor, mpsc::Receiver<DroneToController>) {
    executor_for(&DroneName::random(), mount_base).await
}

async fn executor_for(
    drone: &DroneName,
    mount_base: Option<PathBuf>,
) -> (DockerExecutor, mpsc::Receiver<DroneToController>) {
    let (metrics, metrics_rx) = mpsc::channel(64);
    let executor = DockerExecutor::connect(settings(drone, mount_base), metrics)
        .await
        .unwrap();
    (executor, metrics_rx)
}

fn spec(exe: DockerExecutable) -> BackendSpec {
    crate::probe::spec(Executable::Docker(Box::new(exe)))
}

/// Polls until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a container with this name exists (running or not).
fn container_exists(name: &str) -> bool {
    run::docker(&["inspect", "--format", "{{.Id}}", name]).is_ok()
}
