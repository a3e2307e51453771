//! What Hangar's tests share, so that no test file carries its own copy: the `hangar-test-backend`
//! binary ([`test_backend`], [`process_executable`]), waiting for a condition with a deadline instead
//! of sleeping ([`eventually`], [`with_timeout`]), test logging ([`init_tracing`]), Docker and
//! per-test labelled containers ([`docker::TestRun`]), a fresh PostgreSQL database per test
//! ([`postgres::TestDatabase`]), child processes of black-box tests ([`clean_command`],
//! [`free_port`]), raw WebSocket frames ([`ws_frame`]), scraped metrics ([`prometheus::parse_exposition`]), TLS clients
//! ([`tls::client_config`]) and the pieces of fake peers ([`served::Served`],
//! [`handshake::read_hello`]).
//!
//! **Boundary:** a dev-dependency only; no normal crate may depend on it. It starts no Hangar
//! component itself, so that every crate's tests can use it (the components' own harnesses, such as
//! `hangar-tests`' `TestEnv`, build on it).

// Test support: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

pub mod docker;
pub mod handshake;
pub mod postgres;
pub mod prometheus;
pub mod served;
pub mod tls;

use hangar_types::executable::{Executable, ProcessExecutable};
use hangar_types::{BackendState, BackendStatus, TerminationKind, TerminationReason};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Longest [`eventually`] waits for its condition.
pub const WAIT: Duration = Duration::from_secs(45);

/// How often [`eventually`] checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// Logs to the test output, filtered by `RUST_LOG` (default: warnings); installed once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Runs `test`, failing it when it takes longer than `limit`.
pub async fn with_timeout<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .expect("test timed out")
}

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

/// Polls `check` until it returns `Some`, failing the test after `limit` (for suites whose whole
/// test timeout is shorter than [`WAIT`], so that a failure names what it waited for).
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Path of the `hangar-test-backend` binary, built once per test process (a no-op when it is up to
/// date, as in CI, which builds it first).
pub fn test_backend() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "hangar-test-backend"])
            .current_dir(&workspace)
            .status()
            .expect("cannot run cargo to build hangar-test-backend");
        assert!(status.success(), "building hangar-test-backend failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let binary = target.join("debug/hangar-test-backend");
        assert!(binary.exists(), "{} is missing", binary.display());
        binary
    })
}

/// A process executable running the test backend with `env` (its `TEST_BACKEND_*` switches).
pub fn process_executable(env: &[(&str, &str)]) -> Executable {
    Executable::Process(ProcessExecutable {
        command: vec![test_backend().to_string_lossy().into_owned()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cwd: None,
    })
}

/// The environment of a test backend that ignores SIGTERM (it ends only when killed).
pub const IGNORING_SIGTERM: &[(&str, &str)] = &[("TEST_BACKEND_SIGTERM", "ignore")];

/// The terminal state of a backend that left no message and was not killed for memory.
pub fn terminated_state(
    last_status: BackendStatus,
    termination: Option<TerminationKind>,
    reason: Option<TerminationReason>,
    exit_code: Option<i32>,
) -> BackendState {
    BackendState::Terminated {
        last_status,
        termination,
        reason,
        exit_code,
        message: None,
        oom_killed: false,
    }
}

/// The terminal state of a ready backend the controller asked to stop softly, which exited with
/// `exit_code`.
pub fn soft_terminated_state(exit_code: i32) -> BackendState {
    terminated_state(
        BackendStatus::Ready,
        Some(TerminationKind::Soft),
        Some(TerminationReason::External),
        Some(exit_code),
    )
}

/// A TCP port that was free a moment ago on 127.0.0.1, for a child process to bind (in-process
/// components bind port 0 instead).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command running `binary` (a black-box test's `env!("CARGO_BIN_EXE_…")`) with no `HANGAR_*`
/// variable of the test's environment, so that only what a test sets explicitly configures the
/// child; killed when dropped.
pub fn clean_command(binary: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary);
    for (name, _) in std::env::vars() {
        if name.starts_with("HANGAR_") {
            cmd.env_remove(name);
        }
    }
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `cmd` to its end and returns its output, failing the test after `limit`.
pub async fn output_within(
    limit: Duration,
    cmd: &mut tokio::process::Command,
) -> std::process::Output {
    with_timeout(limit, cmd.output())
        .await
        .expect("the command could not run")
}

/// One WebSocket frame: `first` is the first header byte (FIN, RSV bits, opcode); masked with
/// `mask` when given (client → server).
pub fn ws_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut frame = vec![first];
    let len = payload.len();
    if len < 126 {
        frame.push(mask_bit | len as u8);
    } else if len <= usize::from(u16::MAX) {
        frame.push(mask_bit | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(mask_bit | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}
