//! Starting backend processes that die with the drone, however the drone dies (SIGKILL included).
//!
//! Each child asks the kernel for SIGKILL when its parent goes away (`PR_SET_PDEATHSIG`), before
//! the backend program runs ([`vfork`]: a `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does,
//! with that one step added). Linux sends that signal when the *thread* that created the child
//! exits, not the process: a child created on a tokio blocking-pool thread (which exits after a few
//! idle seconds), or on a worker that `block_in_place` retired, would be killed while the drone runs
//! on. So every child is created on one dedicated thread that lives as long as the process
//! ([`Spawn::start`] hands the request over and waits for the pid); the signal then fires exactly
//! when the drone process ends. A child whose parent died before the request took effect exits at
//! once instead of running unparented.
//!
//! Limit: the signal reaches the backend's main process. Grandchildren it started are killed with
//! its process group when the drone stops the backend, but not when the drone itself is killed.

mod vfork;

use nix::libc::pid_t;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::mpsc;
use std::sync::OnceLock;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// A backend process to start: in a process group of its own, stdin from `/dev/null`, stdout and
/// stderr to pipes.
pub struct Spawn<'a> {
    /// The resolved program.
    pub program: &'a Path,
    /// `argv[0]` first (`program` when empty).
    pub argv: &'a [String],
    /// The whole environment of the backend.
    pub env: BTreeMap<OsString, OsString>,
    pub cwd: Option<&'a Path>,
}

impl Spawn<'_> {
    /// Starts the process on the spawner thread; resolves once it runs the program. An error names
    /// the step that failed (a program that cannot be executed, a directory that does not exist).
    pub async fn start(self) -> io::Result<BackendChild> {
        let image = self.image()?;
        let (stdout, stdout_w) = vfork::pipe()?;
        let (stderr, stderr_w) = vfork::pipe()?;
        let stdio = vfork::Stdio {
            stdin: std::fs::File::open("/dev/null")?.into(),
            stdout: stdout_w,
            stderr: stderr_w,
        };
        let (reply, answer) = oneshot::channel();
        spawner()
            .send(Request {
                image,
                stdio,
                reply,
            })
            .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
        // The child's ends of the pipes were closed on the spawner thread once it ran the program.
        let (pid, pidfd) = answer
            .await
            .map_err(|_| io::Error::other("the process spawner thread dropped the request"))??;
        let mut child = BackendChild {
            pid: Pid::from_raw(pid),
            exit: None,
            wakeups: Wakeups::None,
            stdout: None,
            stderr: None,
        };
        // From here on, an error drops `child`, which kills and reaps the process.
        child.wakeups = Wakeups::new(pidfd)?;
        child.stdout = Some(pipe::Receiver::from_owned_fd(stdout)?);
        child.stderr = Some(pipe::Receiver::from_owned_fd(stderr)?);
        Ok(child)
    }

    fn image(&self) -> io::Result<vfork::Image> {
        // Relative to the drone's directory, not the backend's `cwd`.
        let program = std::path::absolute(self.program)?;
        let argv0 = match self.argv.first() {
            Some(argv0) => OsStr::new(argv0),
            None => program.as_os_str(),
        };
        let argv = std::iter::once(argv0)
            .chain(self.argv.iter().skip(1).map(OsStr::new))
            .map(|arg| c_string(arg.as_bytes().to_vec()))
            .collect::<io::Result<_>>()?;
        let envp = self
            .env
            .iter()
            .map(|(name, value)| {
                if name.is_empty() || name.as_bytes().contains(&b'=') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid environment variable name {name:?}"),
                    ));
                }
                let mut entry = name.clone();
                entry.push("=");
                entry.push(value);
                c_string(entry.into_vec())
            })
            .collect::<io::Result<_>>()?;
        Ok(vfork::Image {
            program: c_string(program.into_os_string().into_vec())?,
            argv,
            envp,
            cwd: self
                .cwd
                .map(|cwd| c_string(cwd.as_os_str().as_bytes().to_vec()))
                .transpose()?,
        })
    }
}

fn c_string(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A started backend process: its pid (also its process group), its output pipes and its exit.
/// Dropped before it was reaped (only when the runtime goes away mid-wait), it is killed.
pub struct BackendChild {
    pid: Pid,
    /// The exit code once reaped: the status, or 128 + the signal that ended it.
    exit: Option<i32>,
    wakeups: Wakeups,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// What wakes a wait for the exit.
enum Wakeups {
    /// Readable once the process exited.
    Pidfd(AsyncFd<OwnedFd>),
    /// Kernels before 5.3 have no pidfd: every SIGCHLD of the drone.
    ChildSignals(tokio::signal::unix::Signal),
    /// Only while [`Spawn::start`] builds the child.
    None,
}

impl Wakeups {
    fn new(pidfd: Option<OwnedFd>) -> io::Result<Self> {
        Ok(match pidfd {
            // Deprecated for types whose descriptor may change under it; an `OwnedFd` cannot
            // (the replacement, `register_with_interest`, is `unsafe` for that reason alone).
            #[allow(deprecated)]
            Some(fd) => Wakeups::Pidfd(AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?),
            None => Wakeups::ChildSignals(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::child(),
            )?),
        })
    }
}

impl BackendChild {
    pub fn id(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// The exit code if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<i32>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        self.exit = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::Exited(_, code) => Some(code),
            WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
            _ => None,
        };
        Ok(self.exit)
    }

    /// Waits for the exit (reaping the process).
    pub async fn wait(&mut self) -> io::Result<i32> {
        loop {
            if let Some(code) = self.try_wait()? {
                return Ok(code);
            }
            match &mut self.wakeups {
                Wakeups::Pidfd(fd) => fd.readable().await?.clear_ready(),
                Wakeups::ChildSignals(signals) => {
                    signals.recv().await;
                }
                Wakeups::None => return Err(io::Error::other("the child is not set up")),
            }
        }
    }
}

impl Drop for BackendChild {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Not reaped, so the pid is still this child's. Reaped now if it is already gone; else
            // it stays a zombie until the drone exits (only at runtime teardown).
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.try_wait();
        }
    }
}

/// One child to create, and where its pid (and pidfd, when the kernel has them) goes.
struct Request {
    image: vfork::Image,
    stdio: vfork::Stdio,
    reply: oneshot::Sender<io::Result<(pid_t, Option<OwnedFd>)>>,
}

/// The spawner thread's queue, started on first use. The thread never exits: its sender is static.
fn spawner() -> &'static mpsc::Sender<Request> {
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("hangar-spawner".into())
            .spawn(move || run_spawner(requests));
        if let Err(e) = started {
            // Requests then fail with "the spawner thread is gone" (the receiver was dropped).
            tracing::error!(error = %e, "Cannot start the process spawner thread");
        }
        sender
    })
}

fn run_spawner(requests: mpsc::Receiver<Request>) {
    for Request {
        image,
        stdio,
        reply,
    } in requests
    {
        let started = vfork::spawn(&image, &stdio).map(|pid| {
            // Without a pidfd (old kernel, or out of descriptors) the exit is seen on SIGCHLD.
            (pid, vfork::pidfd_open(pid).ok())
        });
        // The child's copies of stdin, stdout and stderr are closed before the answer, so that
        // the output pipes end when the backend's copies close.
        drop(stdio);
        if let Err(Ok((pid, _))) = reply.send(started) {
            // The caller is gone (cancelled): nobody will watch this child.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
    }
}
