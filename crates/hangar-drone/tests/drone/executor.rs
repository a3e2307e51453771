//! The process executor on its own: environment, signals, exit codes, leftovers.

use crate::probe::{
    self, exit_3_after, expect_exit_3, get_json, signal, soft_ignored_then_hard,
    soft_stop_then_signal_again, wait_for_log,
};
use hangar_drone::executor::{
    BackendSpec, Executor, ExecutorError, ProcessExecutor, Reattached, Started,
};
use hangar_test_support::{eventually_within, IGNORING_SIGTERM};
use hangar_types::executable::{Executable, ProcessExecutable};
use hangar_types::TerminationKind;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::time::Duration;
use tokio::time::timeout;

/// How long a backend's child may take to start, or to die once killed.
const LEFTOVER_WAIT: Duration = Duration::from_secs(10);

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn spec(command: Vec<String>, env: &[(&str, &str)]) -> BackendSpec {
    probe::spec(Executable::Process(ProcessExecutable {
        command,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cwd: None,
    }))
}

fn backend_spec(env: &[(&str, &str)]) -> BackendSpec {
    probe::spec(hangar_test_support::process_executable(env))
}

fn process_executor() -> ProcessExecutor {
    ProcessExecutor::new(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Runs `test` with [`TEST_TIMEOUT`] on a process executor, and shuts the executor down after it.
async fn with_executor(test: impl AsyncFnOnce(&ProcessExecutor)) {
    let executor = process_executor();
    timeout(TEST_TIMEOUT, async {
        test(&executor).await;
        executor.shutdown().await;
    })
    .await
    .unwrap();
}

/// [`with_executor`] with the test backend started from [`backend_spec`]`(env)`.
async fn with_started(
    env: &[(&str, &str)],
    test: impl AsyncFnOnce(&ProcessExecutor, &BackendSpec, &Started),
) {
    with_executor(async |executor| {
        let spec = backend_spec(env);
        let started = executor.start(&spec).await.unwrap();
        test(executor, &spec, &started).await;
    })
    .await;
}

#[tokio::test]
async fn backend_gets_its_environment_and_stops_on_sigterm() {
    with_executor(environment_and_sigterm).await
}

async fn environment_and_sigterm(executor: &ProcessExecutor) {
    let spec = backend_spec(&[("GREETING", "hello"), ("PORT", "1")]);
    executor.prepare(&spec).await.unwrap();
    let started = executor.start(&spec).await.unwrap();
    assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let env = get_json(started.address, "/env").await;
    // The backend program itself, a child of this process.
    let pid = started.backend.record()["pid"].as_u64().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        std::fs::canonicalize(crate::test_backend::path()).unwrap()
    );
    assert_eq!(parent_of(pid), Some(std::process::id()));
    assert_eq!(env["GREETING"], "hello");
    // The contract's PORT wins over the user's.
    assert_eq!(env["PORT"], started.address.port().to_string());
    assert_eq!(env["SESSION_BACKEND_ID"], spec.id.as_str());
    assert_eq!(env["SESSION_BACKEND_KEY"], "room-1");
    assert_eq!(env["SESSION_BACKEND_FENCING_TOKEN"], "1234");
    let token = spec.static_token.as_ref().unwrap().as_str();
    assert_eq!(env["SESSION_BACKEND_STATIC_TOKEN"], token);
    assert!(started.backend.record()["pid"].as_u64().is_some());
    wait_for_log(&started, "listening on").await;

    soft_stop_then_signal_again(&started).await;
    wait_for_log(&started, "got SIGTERM").await;
}

/// The parent pid of `pid` (`/proc/<pid>/stat`, field 4).
fn parent_of(pid: u64) -> Option<u32> {
    crate::proc_stat_fields(pid)?.get(1)?.parse().ok()
}

#[tokio::test]
async fn ignored_sigterm_needs_sigkill() {
    with_started(IGNORING_SIGTERM, async |_, _, started| {
        assert_eq!(soft_ignored_then_hard(started).await, Some(128 + 9));
    })
    .await
}

#[tokio::test]
async fn exit_code_of_a_backend_that_exits_by_itself() {
    with_started(&exit_3_after("100"), async |_, _, started| {
        expect_exit_3(started).await;
    })
    .await
}

#[tokio::test]
async fn signal_exit_of_a_shell_and_its_children() {
    with_executor(async |executor| {
        // The shell's child `sleep` is in the backend's process group and dies with it.
        let script = "sleep 1000 & echo child $!; wait";
        let spec = spec(vec!["sh".into(), "-c".into(), script.into()], &[]);
        let started = executor.start(&spec).await.unwrap();
        wait_for_log(&started, "child ").await;
        let child: i32 = started
            .backend
            .recent_logs()
            .iter()
            .find_map(|l| l.strip_prefix("child ").and_then(|p| p.trim().parse().ok()))
            .unwrap();
        signal(&started, TerminationKind::Hard).await;
        assert_eq!(started.backend.exited().await, Some(137));
        eventually_within(
            LEFTOVER_WAIT,
            "the backend's child to be killed",
            || async {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), None).is_ok()
                    && !is_zombie(child);
                (!alive).then_some(())
            },
        )
        .await;
    })
    .await
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[tokio::test]
async fn missing_program_is_a_clear_error() {
    with_executor(async |executor| {
        let spec = spec(vec!["/nonexistent/prog".into()], &[]);
        let err = executor.prepare(&spec).await.unwrap_err();
        assert!(matches!(err, ExecutorError::ProgramNotFound { .. }));
        assert_eq!(
            err.to_string(),
            "cannot start `/nonexistent/prog`: No such file or directory"
        );
        assert!(executor.start(&spec).await.is_err());
        let docker = BackendSpec {
            executable: Executable::from_json(&serde_json::json!({"image": "x"})).unwrap(),
            ..spec
        };
        assert!(matches!(
            executor.prepare(&docker).await,
            Err(ExecutorError::WrongKind(_))
        ));
    })
    .await
}

#[tokio::test]
async fn leftover_process_is_killed_by_its_record() {
    with_started(IGNORING_SIGTERM, async |executor, spec, started| {
        let record = started.backend.record();
        // A record whose pid names another process (a recycled pid) is left alone.
        let stranger = serde_json::json!({"pid": std::process::id(), "start_time": 1});
        executor.remove(&spec.id, Some(&stranger)).await.unwrap();
        executor.remove(&spec.id, None).await.unwrap();
        get_json(started.address, "/env").await;
        // A restarted drone cannot re-adopt it: the process is killed and nothing is returned.
        let other = process_executor();
        let adopted = other.reattach(&spec.id, Some(&record)).await.unwrap();
        assert!(matches!(adopted, Reattached::Gone));
        assert_eq!(started.backend.exited().await, Some(137));
        other.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_kills_running_backends() {
    timeout(TEST_TIMEOUT, async {
        let executor = process_executor();
        let spec = backend_spec(IGNORING_SIGTERM);
        let started = executor.start(&spec).await.unwrap();
        get_json(started.address, "/env").await;
        executor.shutdown().await;
        assert_eq!(started.backend.exited().await, Some(137));
    })
    .await
    .unwrap();
}

/// State (`/proc/<pid>/stat`, field 3) and process group (field 5) of `pid`; `None` when gone.
fn state_and_group(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let group = rest.nth(1)?.parse().ok()?;
    Some((state, group))
}

/// A drone killed with SIGKILL takes its backends' main processes along (parent-death signal), not
/// what they started: the restarted drone kills those through the record's process group.
#[tokio::test]
async fn leftovers_of_a_dead_backends_group_are_killed_by_its_record() {
    timeout(TEST_TIMEOUT, async {
        let spec = backend_spec(&[]);
        // A backend whose main process started a child, as the drone would have started it.
        let mut main = std::process::Command::new("sh")
            .args(["-c", "sleep 600 & wait"])
            .env("SESSION_BACKEND_ID", spec.id.to_string())
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pgid = main.id();
        let start_time = std::fs::read_to_string(format!("/proc/{pgid}/stat")).unwrap();
        let start_time: u64 = start_time[start_time.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        let child = eventually_within(LEFTOVER_WAIT, "the backend's child to start", || async {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .find(|pid| *pid != pgid && state_and_group(*pid).map(|(_, g)| g) == Some(pgid))
        })
        .await;
        // The drone (and with it the main process) dies; the child lives on in the group.
        main.kill().unwrap();
        main.wait().unwrap();
        assert!(matches!(state_and_group(child), Some((s, _)) if s != 'Z'));

        // Another backend's record with this group id is not this backend's: nothing is killed.
        let record = serde_json::json!({"pid": pgid, "start_time": start_time});
        let stranger = process_executor();
        stranger
            .remove(&probe::spec(spec.executable.clone()).id, Some(&record))
            .await
            .unwrap();
        assert!(matches!(state_and_group(child), Some((s, _)) if s != 'Z'));

        let restarted = process_executor();
        let adopted = restarted.reattach(&spec.id, Some(&record)).await.unwrap();
        assert!(matches!(adopted, Reattached::Gone));
        eventually_within(LEFTOVER_WAIT, "the leftover child to be killed", || async {
            (!matches!(state_and_group(child), Some((s, _)) if s != 'Z')).then_some(())
        })
        .await;
        stranger.shutdown().await;
        restarted.shutdown().await;
    })
    .await
    .unwrap();
}
