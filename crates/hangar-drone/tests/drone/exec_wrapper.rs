//! The exec wrapper on its own: the parent-death signal it sets survives into the backend, and it
//! refuses to start a backend whose drone is already gone.

use hangar_drone::exec_wrapper::{CANNOT_EXEC, MODE_ARG};
use hangar_test_support::eventually_within;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The wrapper as a program of its own (the `hangar` binary is its own wrapper).
pub const WRAPPER: &str = env!("CARGO_BIN_EXE_hangar-exec-wrapper");

/// How long a process may take to exec, or to die once signalled.
const WAIT: Duration = Duration::from_secs(10);

/// The wrapper's command that runs `argv` as a child of the process `drone`.
fn wrapped(drone: u32, argv: &[&str]) -> Command {
    let program = Command::new("sh")
        .args(["-c", &format!("command -v {}", argv[0])])
        .output()
        .unwrap();
    let program = String::from_utf8(program.stdout).unwrap();
    let mut command = Command::new(WRAPPER);
    command
        .arg(MODE_ARG)
        .arg(drone.to_string())
        .arg(program.trim())
        .args(argv);
    command
}

/// The command name of `pid` (`/proc/<pid>/comm`), once it is `name`.
async fn wait_for_comm(pid: u32, name: &str) {
    eventually_within(WAIT, &format!("process {pid} to run {name}"), || async {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(())
    })
    .await;
}

/// Waits for `child` to exit (without blocking the runtime).
async fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    eventually_within(WAIT, "the process to exit", || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await
}

/// Linux sends the parent-death signal when the *thread* that created the child exits: a backend
/// started through the wrapper from a thread that then ends is killed, which proves the wrapper
/// set the signal and that it survived the `execve` into the backend.
#[tokio::test]
async fn backend_is_killed_when_its_creating_thread_ends() {
    let drone = std::process::id();
    let spawned = std::thread::spawn(move || {
        let child = wrapped(drone, &["sleep", "600"]).spawn().unwrap();
        // The wrapper has set the signal once it has become `sleep`.
        let pid = child.id();
        let deadline = std::time::Instant::now() + WAIT;
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() != "sleep")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    });
    let mut child = tokio::task::spawn_blocking(move || spawned.join().unwrap())
        .await
        .unwrap();
    assert_eq!(exit_status(&mut child).await.signal(), Some(9));
}

/// The same backend started from a thread that lives on keeps running: the kill above is the
/// thread's exit, not something the wrapper does by itself.
#[tokio::test]
async fn backend_of_a_living_thread_keeps_running() {
    let mut child = wrapped(std::process::id(), &["sleep", "600"])
        .spawn()
        .unwrap();
    wait_for_comm(child.id(), "sleep").await;
    assert_eq!(child.try_wait().unwrap(), None);
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
}

/// A wrapper whose parent is not the drone that asked for it (the drone died before the request
/// took effect) exits at once without starting the backend.
#[tokio::test]
async fn backend_of_a_drone_that_is_gone_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let script = format!("touch {}", marker.display());
    // Pid 1 is never this test's process.
    let mut child = wrapped(1, &["sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_status(&mut child).await;
    assert_eq!(status.code(), Some(CANNOT_EXEC));
    assert!(!marker.exists());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the drone that started this backend is gone"),
        "{stderr}"
    );
}

/// A program the wrapper cannot execute is reported on stderr with the wrapper's exit status.
#[tokio::test]
async fn unexecutable_backend_is_a_clear_error() {
    let output = Command::new(WRAPPER)
        .args([MODE_ARG, &std::process::id().to_string()])
        .args(["/nonexistent/prog", "prog"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(CANNOT_EXEC));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot start the backend: No such file or directory"),
        "{stderr}"
    );
}
