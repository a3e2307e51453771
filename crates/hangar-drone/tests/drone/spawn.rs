//! How the process executor creates a backend: what the process gets from the drone (descriptors,
//! signal mask and dispositions, process group), how a failed `execve` is reported, and that the
//! backend dies with a drone process killed with SIGKILL.

use crate::{probe, proc_stat_fields};
use hangar_drone::executor::{BackendSpec, Executor, ExecutorError, ProcessExecutor};
use hangar_test_support::eventually_within;
use hangar_types::executable::{Executable, ProcessExecutable};
use hangar_types::TerminationKind;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio::time::timeout;

/// SIGPIPE's number on Linux.
const SIGPIPE: u32 = 13;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a process may take to die once its drone is killed.
const WAIT: Duration = Duration::from_secs(10);

/// Set for the copy of this test binary that plays the drone in
/// [`backend_dies_with_a_sigkilled_drone_process`].
const DRONE_PROCESS: &str = "DRONE_TEST_PLAY_DRONE_PROCESS";

fn spec(command: &[&str], cwd: Option<&str>) -> BackendSpec {
    probe::spec(Executable::Process(ProcessExecutable {
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: cwd.map(str::to_string),
    }))
}

fn executor() -> ProcessExecutor {
    ProcessExecutor::new(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// This process's descriptors without close-on-exec (`/proc/self/fdinfo`, octal `flags`).
fn inherited_fds() -> Vec<u32> {
    const O_CLOEXEC: u32 = 0o2000000;
    std::fs::read_dir("/proc/self/fdinfo")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
            (flags & O_CLOEXEC == 0).then_some(fd)
        })
        .collect()
}

/// `name:` line of `/proc/<pid>/status`, its value.
fn status_field(pid: u64, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap();
    line.trim().to_string()
}

/// The backend gets `/dev/null` and two pipes as 0, 1 and 2 and no other descriptor of the drone,
/// no blocked signal (the spawner blocks them all around `clone`), SIGPIPE at its default (the
/// Rust runtime of the drone ignores it), and a process group of its own.
#[tokio::test]
async fn backend_gets_stdio_only_default_signals_and_its_own_group() {
    timeout(TEST_TIMEOUT, async {
        let executor = executor();
        // Descriptors this process has open that a careless spawn would pass on.
        let _held = std::fs::File::open("/proc/self/status").unwrap();
        let started = executor
            .start(&spec(&["sleep", "600"], None))
            .await
            .unwrap();
        let pid = started.backend.record()["pid"].as_u64().unwrap();
        // `start` returns once the program runs: no waiting for the `execve`.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.ends_with("sleep"), "{exe:?}");

        // The exec is done, so every descriptor of the drone that could leak is open now and stays
        // open; one that is gone between the listing and its `readlink` is the program's own (`sleep`
        // opens and closes locale files as it starts), so it is passed over.
        let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let fd = e.file_name().to_str().unwrap().parse().unwrap();
                match std::fs::read_link(e.path()) {
                    Ok(target) => Some((fd, target.to_string_lossy().into_owned())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => panic!("readlink of fd {fd}: {e}"),
                }
            })
            .collect();
        fds.sort();
        assert_eq!(fds[0], (0, "/dev/null".to_string()));
        assert!(fds[1].0 == 1 && fds[1].1.starts_with("pipe:"), "{fds:?}");
        assert!(fds[2].0 == 2 && fds[2].1.starts_with("pipe:"), "{fds:?}");
        // Beyond those, only what this process itself inherited without close-on-exec (cargo's
        // jobserver pipe, say), which any child of it gets.
        let inherited = inherited_fds();
        for (fd, target) in &fds[3..] {
            assert!(inherited.contains(fd), "fd {fd} ({target}) leaked: {fds:?}");
        }
        assert_eq!(status_field(pid, "SigBlk"), "0000000000000000");
        let ignored = u64::from_str_radix(&status_field(pid, "SigIgn"), 16).unwrap();
        assert_eq!(ignored & (1 << (SIGPIPE - 1)), 0, "SigIgn {ignored:x}");
        let group: u64 = proc_stat_fields(pid).unwrap()[2].parse().unwrap();
        assert_eq!(group, pid);

        started
            .backend
            .terminate(TerminationKind::Hard)
            .await
            .unwrap();
        assert_eq!(started.backend.exited().await, Some(137));
        executor.shutdown().await;
    })
    .await
    .unwrap();
}

/// A file that passes the executable check but that the kernel cannot run: `start` fails with the
/// `execve` error, as it would for a program started directly.
#[tokio::test]
async fn unexecutable_program_is_a_start_error() {
    timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("not-a-program");
        std::fs::write(&program, [0u8; 64]).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let executor = executor();
        let spec = spec(&[program.to_str().unwrap()], None);
        let error = executor.start(&spec).await.err().unwrap();
        assert!(
            matches!(&error, ExecutorError::Spawn { source, .. } if source.raw_os_error() == Some(8)),
            "{error}"
        );
        assert!(error.to_string().contains("Exec format error"), "{error}");
        executor.shutdown().await;
    })
    .await
    .unwrap();
}

/// A working directory that does not exist fails the start, before the program runs.
#[tokio::test]
async fn missing_working_directory_is_a_start_error() {
    timeout(TEST_TIMEOUT, async {
        let executor = executor();
        let spec = spec(&["/bin/sh", "-c", "exit 0"], Some("/nonexistent/dir"));
        let error = executor.start(&spec).await.err().unwrap();
        assert!(
            matches!(&error, ExecutorError::Spawn { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound),
            "{error}"
        );
        executor.shutdown().await;
    })
    .await
    .unwrap();
}

/// The drone side of [`backend_dies_with_a_sigkilled_drone_process`]: run only in the copy of this
/// binary that test starts; starts a backend, prints its pid, and waits to be killed.
#[tokio::test]
#[ignore = "the drone process of backend_dies_with_a_sigkilled_drone_process"]
async fn play_drone_process() {
    if std::env::var_os(DRONE_PROCESS).is_none() {
        return;
    }
    let executor = executor();
    let started = executor
        .start(&spec(&["sleep", "600"], None))
        .await
        .unwrap();
    println!("backend pid {}", started.backend.record()["pid"]);
    std::future::pending::<()>().await;
}

/// State of `pid` (`/proc/<pid>/stat`, field 3): `None` once it is gone.
fn state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// A drone process killed with SIGKILL takes its backend along (the parent-death signal set in
/// the child before `execve`).
#[tokio::test]
async fn backend_dies_with_a_sigkilled_drone_process() {
    timeout(TEST_TIMEOUT, async {
        let mut drone = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "spawn::play_drone_process", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(DRONE_PROCESS, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = drone.stdout.take().unwrap();
        let backend = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                // After libtest's "test … ... " on the same line.
                .find_map(|line| {
                    line.split("backend pid ")
                        .nth(1)?
                        .trim()
                        .parse::<u32>()
                        .ok()
                })
        })
        .await
        .unwrap()
        .expect("the drone process printed its backend's pid");
        assert!(matches!(state(backend), Some(s) if s != 'Z'));
        drone.kill().unwrap();
        drone.wait().unwrap();
        eventually_within(WAIT, "the backend to die with its drone", || async {
            // Gone, or a zombie of an init that does not reap.
            matches!(state(backend), None | Some('Z')).then_some(())
        })
        .await;
    })
    .await
    .unwrap();
}
