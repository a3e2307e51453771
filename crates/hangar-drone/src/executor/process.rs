//! The process executor: runs `executable.command` as a local child process (for `hangar dev` and
//! trusted workloads).
//!
//! Each backend gets a free port in `PORT` and the backend-contract variables, runs in its own process
//! group (signals go to the whole group, and the group is killed once the main process exits, so no
//! grandchild outlives its backend), and has its stdout/stderr logged at debug level, kept (last
//! [`LOG_LINES`] lines) and, with a [`LogWriter`], captured line by line into the drone's log store. A
//! backend dies with the drone process however it ends, SIGKILL included ([`spawner`]: the
//! parent-death signal, set in a `posix_spawn`-like child of the drone). Child processes cannot be re-adopted by a restarted drone: `reattach` kills
//! what is left (when the recorded pid still names the same process) and reports the backend gone.
//! Variables starting with `HANGAR_` (which may carry drone credentials) are not passed on.

use super::log_lines::{LineSplitter, RecentLines};
use super::{BackendSpec, Executor, ExecutorError, Reattached, RunningBackend, Started};
use crate::log_store::LogWriter;
use async_trait::async_trait;
use hangar_types::executable::{Executable, ExecutorKind, ProcessExecutable};
use hangar_types::logs::LogStream;
use hangar_types::{BackendId, TerminationKind};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use spawner::BackendChild;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use super::log_lines::LOG_LINES;

mod spawner;

pub struct ProcessExecutor {
    ip: IpAddr,
    tracker: TaskTracker,
    /// Fired at shutdown: every still-running child is killed and log readers stop.
    cancel: CancellationToken,
    logs: Option<LogWriter>,
}

impl ProcessExecutor {
    /// Backends are reported at `ip:<port>`.
    pub fn new(ip: IpAddr) -> Self {
        ProcessExecutor {
            ip,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            logs: None,
        }
    }

    /// Captures every backend's output into `logs`.
    pub fn with_log_writer(mut self, logs: LogWriter) -> Self {
        self.logs = Some(logs);
        self
    }
}

/// What is stored to recognise a leftover process after a drone restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    /// Start time of the process in clock ticks since boot (`/proc/<pid>/stat`), so a recycled pid is
    /// never mistaken for the backend.
    start_time: Option<u64>,
}

fn process_executable(spec: &BackendSpec) -> Result<&ProcessExecutable, ExecutorError> {
    match &spec.executable {
        Executable::Process(p) => Ok(p),
        other => Err(ExecutorError::WrongKind(other.kind())),
    }
}

#[async_trait]
impl Executor for ProcessExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }

    fn backends_outlive_drone(&self) -> bool {
        false
    }

    /// A child dies with the drone however the drone ends (the parent-death signal is set before
    /// the backend program runs), `prepare` only looks the program up, its pid is written with
    /// `waiting`, and `reattach` is `remove`: a restarted drone has nothing to act on for a backend
    /// that was starting and reports it `lost` whether its last written state is `scheduled`,
    /// `loading` or `starting`.
    fn start_must_be_recorded_first(&self) -> bool {
        false
    }

    async fn prepare(&self, spec: &BackendSpec) -> Result<(), ExecutorError> {
        resolve_program(process_executable(spec)?).map(drop)
    }

    async fn start(&self, spec: &BackendSpec) -> Result<Started, ExecutorError> {
        let exe = process_executable(spec)?;
        let program = resolve_program(exe)?;
        let port = free_port()?;
        let spawn = spawner::Spawn {
            program: &program,
            argv: &exe.command,
            env: backend_env(exe, spec, port),
            cwd: exe.cwd.as_deref().map(Path::new),
        };
        let mut child = spawn.start().await.map_err(|source| ExecutorError::Spawn {
            program: exe.command.first().cloned().unwrap_or_default(),
            source,
        })?;
        let pid = child.id();
        let record = ProcessRecord {
            pid,
            start_time: process_start_time(pid),
        };
        let logs = RecentLines::default();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let reader = self.log_reader(spec, LogStream::Stdout, &logs);
            readers.push(
                self.tracker
                    .spawn(reader.run(out, self.cancel.child_token())),
            );
        }
        if let Some(err) = child.stderr.take() {
            let reader = self.log_reader(spec, LogStream::Stderr, &logs);
            readers.push(
                self.tracker
                    .spawn(reader.run(err, self.cancel.child_token())),
            );
        }
        let (signals, signals_rx) = mpsc::channel(4);
        let (exit_tx, exit) = watch::channel(None);
        let output = Output {
            readers,
            logs: self.logs.clone(),
        };
        self.tracker.spawn(run_process(
            child,
            spec.id.clone(),
            (signals_rx, exit_tx),
            output,
            self.cancel.child_token(),
        ));
        tracing::debug!(backend = %spec.id, pid, port, program = %program.display(), "Started backend process");
        Ok(Started {
            address: SocketAddr::new(self.ip, port),
            backend: Box::new(RunningProcess {
                record,
                signals,
                exit,
                logs,
            }),
        })
    }

    async fn reattach(
        &self,
        backend: &BackendId,
        record: Option<&serde_json::Value>,
    ) -> Result<Reattached, ExecutorError> {
        self.remove(backend, record).await?;
        Ok(Reattached::Gone)
    }

    async fn remove(
        &self,
        backend: &BackendId,
        record: Option<&serde_json::Value>,
    ) -> Result<(), ExecutorError> {
        let Some(record) =
            record.and_then(|r| serde_json::from_value::<ProcessRecord>(r.clone()).ok())
        else {
            return Ok(());
        };
        let same_process =
            record.start_time.is_some() && process_start_time(record.pid) == record.start_time;
        if !same_process {
            // Its main process is gone, but processes it started may live on in its group: a drone
            // killed with SIGKILL takes only its direct children along (the parent-death signal).
            let killed = kill_group_leftovers(backend, record.pid);
            tracing::debug!(%backend, pid = record.pid, killed, "Leftover backend process is already gone");
            return Ok(());
        }
        tracing::info!(%backend, pid = record.pid, "Killing leftover backend process group");
        match killpg(pid_of(record.pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(ExecutorError::Signal(e)),
        }
    }

    async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl ProcessExecutor {
    fn log_reader(&self, spec: &BackendSpec, stream: LogStream, lines: &RecentLines) -> LogReader {
        LogReader {
            backend: spec.id.clone(),
            stream,
            lines: lines.clone(),
            store: self.logs.clone(),
        }
    }
}

struct RunningProcess {
    record: ProcessRecord,
    signals: mpsc::Sender<Signal>,
    /// `None` while running; `Some(exit code)` once exited.
    exit: watch::Receiver<Option<Option<i32>>>,
    logs: RecentLines,
}

#[async_trait]
impl RunningBackend for RunningProcess {
    fn record(&self) -> serde_json::Value {
        serde_json::to_value(self.record).unwrap_or(serde_json::Value::Null)
    }

    async fn terminate(&self, kind: TerminationKind) -> Result<(), ExecutorError> {
        let signal = match kind {
            TerminationKind::Soft => Signal::SIGTERM,
            TerminationKind::Hard => Signal::SIGKILL,
        };
        // A closed channel means the process has exited: nothing left to signal.
        let _ = self.signals.send(signal).await;
        Ok(())
    }

    async fn exited(&self) -> Option<i32> {
        let mut exit = self.exit.clone();
        // An error means the watcher is gone without a result (only at executor shutdown).
        let code = exit
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|code| *code);
        code.flatten()
    }

    fn recent_logs(&self) -> Vec<String> {
        self.logs.snapshot()
    }
}

/// The drone's environment without its `HANGAR_*` variables, then the executable's, then the
/// backend contract's (a later one wins).
fn backend_env(
    exe: &ProcessExecutable,
    spec: &BackendSpec,
    port: u16,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(name, _)| !name.to_string_lossy().starts_with("HANGAR_"))
        .collect();
    let own = exe.env.iter().map(|(k, v)| (k.as_str(), v.clone()));
    for (name, value) in own.chain(spec.contract_env(port)) {
        env.insert(name.into(), value.into());
    }
    env
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// How often the exit watcher double-checks whether the child exited.
const EXIT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// After the exit, how long the output readers get to capture what is left in the pipes (a process
/// that left the group may hold them open forever).
const OUTPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A backend's output readers and where its lines are kept.
struct Output {
    readers: Vec<tokio::task::JoinHandle<()>>,
    logs: Option<LogWriter>,
}

/// Owns the child: signals it on request and reaps it. Signalling and reaping in one task means a
/// signal is never sent to a reaped (possibly recycled) pid. Once it exited and its output is
/// captured, its log ends and the exit is reported.
async fn run_process(
    mut child: BackendChild,
    backend: BackendId,
    (mut signals, exit): (mpsc::Receiver<Signal>, watch::Sender<Option<Option<i32>>>),
    output: Output,
    cancel: CancellationToken,
) {
    let group = pid_of(child.id());
    let signal_group = |signal: Signal| match killpg(group, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(%backend, %signal, error = %e, "Failed to signal backend"),
    };
    // `wait` is woken by SIGCHLD; the periodic `try_wait` is a backstop for a missed wakeup (seen
    // when many runtimes in one process reap children concurrently, as in the test suite).
    let mut backstop = tokio::time::interval(EXIT_POLL_INTERVAL);
    backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = backstop.tick() => match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(e),
            },
            Some(signal) = signals.recv() => signal_group(signal),
            _ = cancel.cancelled() => {
                signal_group(Signal::SIGKILL);
                break child.wait().await;
            }
        }
    };
    // Whatever the main process left behind in its group goes with it.
    signal_group(Signal::SIGKILL);
    let code = match status {
        Ok(code) => Some(code),
        Err(e) => {
            tracing::warn!(%backend, error = %e, "Failed to wait for backend process");
            None
        }
    };
    tracing::debug!(%backend, ?code, "Backend process exited");
    let drained = futures_util::future::join_all(output.readers);
    if tokio::time::timeout(OUTPUT_DRAIN, drained).await.is_err() {
        tracing::debug!(%backend, "Backend output still open after its exit; not waiting for it");
    }
    if let Some(logs) = &output.logs {
        logs.end(&backend).await;
    }
    exit.send_replace(Some(code));
}

/// Copies one output stream of a backend into the log, the recent-lines buffer and the log store
/// (one batch per read from the pipe).
struct LogReader {
    backend: BackendId,
    stream: LogStream,
    lines: RecentLines,
    store: Option<LogWriter>,
}

impl LogReader {
    async fn run(self, mut pipe: impl AsyncRead + Unpin, cancel: CancellationToken) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut splitter = LineSplitter::default();
        let mut batch = Vec::new();
        loop {
            let n = tokio::select! {
                _ = cancel.cancelled() => break,
                n = pipe.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
            };
            splitter.feed(&buf[..n], |line| batch.push((self.stream, line)));
            self.keep(&mut batch).await;
        }
        batch.extend(splitter.finish().map(|line| (self.stream, line)));
        self.keep(&mut batch).await;
    }

    async fn keep(&self, batch: &mut Vec<(LogStream, String)>) {
        for (_, line) in batch.iter() {
            tracing::debug!(backend = %self.backend, stream = %self.stream, "{line}");
            self.lines.push(line.clone());
        }
        match &self.store {
            Some(store) => store.append(&self.backend, std::mem::take(batch)).await,
            None => batch.clear(),
        }
    }
}

/// Finds the program as the child would: a path with a `/` (relative to `cwd`), else a search of the
/// `PATH` the child gets.
fn resolve_program(exe: &ProcessExecutable) -> Result<PathBuf, ExecutorError> {
    let program = exe.command.first().map(String::as_str).unwrap_or_default();
    let not_found = || ExecutorError::ProgramNotFound {
        program: program.to_string(),
    };
    if program.is_empty() {
        return Err(not_found());
    }
    if program.contains('/') {
        let path = match &exe.cwd {
            Some(cwd) if !Path::new(program).is_absolute() => Path::new(cwd).join(program),
            _ => PathBuf::from(program),
        };
        return match std::fs::metadata(&path) {
            Err(_) => Err(not_found()),
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(path),
            Ok(_) => Err(ExecutorError::ProgramNotExecutable {
                program: program.to_string(),
            }),
        };
    }
    let search = match exe.env.get("PATH") {
        Some(path) => Some(std::ffi::OsString::from(path)),
        None => std::env::var_os("PATH"),
    };
    let search = search.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(not_found)
}

/// A port that is free right now (bound on all interfaces, then released for the backend).
fn free_port() -> Result<u16, ExecutorError> {
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
        .map_err(ExecutorError::NoFreePort)?;
    Ok(listener
        .local_addr()
        .map_err(ExecutorError::NoFreePort)?
        .port())
}

/// Kills the processes left in `backend`'s process group `pgid` after its main process is gone.
/// Only those whose environment names the backend: a group id reused by an unrelated process is
/// never touched. Returns how many were signalled.
fn kill_group_leftovers(backend: &BackendId, pgid: u32) -> usize {
    let marker = format!("SESSION_BACKEND_ID={backend}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = crate::parsed_file_name::<u32>(&entry) else {
            continue;
        };
        if process_group(pid) != Some(pgid) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            continue;
        }
        if nix::sys::signal::kill(pid_of(pid), Signal::SIGKILL).is_ok() {
            tracing::info!(%backend, pid, "Killed a leftover process of the backend's group");
            killed += 1;
        }
    }
    killed
}

/// The process group of `pid` (`/proc/<pid>/stat`, field 5).
fn process_group(pid: u32) -> Option<u32> {
    stat_field(pid, 5)
}

/// Start time (clock ticks after boot) of a live process (`/proc/<pid>/stat`, field 22; Linux only).
fn process_start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, for a field after the command name.
fn stat_field<T: std::str::FromStr>(pid: u32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after the last `)`,
    // which start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn exe(command: &[&str], cwd: Option<&str>) -> ProcessExecutable {
        ProcessExecutable {
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: cwd.map(str::to_string),
        }
    }

    #[test]
    fn programs_are_resolved_like_the_child_would() {
        assert!(resolve_program(&exe(&["sh"], None)).is_ok());
        assert!(resolve_program(&exe(&["/bin/sh"], None)).is_ok());
        assert!(resolve_program(&exe(&["./sh"], Some("/bin"))).is_ok());
        let err = resolve_program(&exe(&["no-such-program-xyz"], None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot start `no-such-program-xyz`: No such file or directory"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = resolve_program(&exe(&[file.to_str().unwrap()], None)).unwrap_err();
        assert!(matches!(err, ExecutorError::ProgramNotExecutable { .. }));
        let err = resolve_program(&exe(&[dir.path().to_str().unwrap()], None)).unwrap_err();
        assert!(matches!(err, ExecutorError::ProgramNotExecutable { .. }));
        let mut with_path = exe(&["sh"], None);
        with_path.env.insert("PATH".into(), "/nonexistent".into());
        assert!(resolve_program(&with_path).is_err());
    }

    #[test]
    fn own_start_time_is_readable() {
        if Path::new("/proc/self/stat").exists() {
            assert!(process_start_time(std::process::id()).is_some());
        }
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
