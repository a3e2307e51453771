//! Starting backend processes that die with the drone, however the drone dies (SIGKILL included).
//!
//! Each child asks the kernel for SIGKILL when its parent goes away (`PR_SET_PDEATHSIG`), before
//! the backend program runs. Linux sends that signal when the *thread* that created the child
//! exits, not the process: a child created on a tokio blocking-pool thread (which exits after a few
//! idle seconds), or on a worker that `block_in_place` retired, would be killed while the drone runs
//! on. So every child is created on one dedicated thread that lives as long as the process
//! ([`Spawn::start`] hands the command over and waits for the child); the signal then fires exactly
//! when the drone process ends. A child whose parent died before the request took effect exits at
//! once instead of running unparented.
//!
//! Two ways to set the signal, same guarantees: through the [`exec_wrapper`] (a `posix_spawn` of a
//! small program that sets it and `execve`s the backend; used when the process installed it), else
//! in a `pre_exec` hook, which makes std `fork` the whole drone (slower: see `exec_wrapper`).
//!
//! Limit: the signal reaches the backend's main process. Grandchildren it started are killed with
//! its process group when the drone stops the backend, but not when the drone itself is killed.

use super::exec_wrapper;
use std::path::Path;
use std::sync::mpsc;
use std::sync::OnceLock;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// A backend's command, ready to be configured (environment, directory, stdio) and started.
pub struct Spawn {
    command: Command,
    /// Whether the command is the exec wrapper (else the `pre_exec` hook sets the signal).
    wrapped: bool,
}

impl Spawn {
    /// Runs `program` with `argv` (`argv[0]` first), through `wrapper` (see [`exec_wrapper`]) when
    /// given.
    pub fn new(program: &Path, argv: &[String], wrapper: Option<&Path>) -> Self {
        let Some(wrapper) = wrapper else {
            let mut command = Command::new(program);
            if let Some(argv0) = argv.first() {
                command.arg0(argv0);
            }
            command.args(argv.iter().skip(1));
            return Spawn {
                command,
                wrapped: false,
            };
        };
        let mut command = Command::new(wrapper);
        command.args(exec_wrapper::wrapper_args(
            std::process::id(),
            program,
            argv,
        ));
        Spawn {
            command,
            wrapped: true,
        }
    }

    /// The command, to set what the backend gets besides its arguments.
    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Starts the command on the spawner thread; resolves to the child.
    pub async fn start(self) -> std::io::Result<Child> {
        let Spawn {
            mut command,
            wrapped,
        } = self;
        if !wrapped {
            set_parent_death_signal_before_exec(&mut command);
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            command,
            runtime: tokio::runtime::Handle::current(),
            reply,
        };
        spawner()
            .send(request)
            .map_err(|_| std::io::Error::other("the process spawner thread is gone"))?;
        answer
            .await
            .map_err(|_| std::io::Error::other("the process spawner thread dropped the request"))?
    }
}

fn set_parent_death_signal_before_exec(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before `exec`, where only async-signal-safe
    // calls are allowed: `prctl` and `getppid` are plain system calls that neither allocate nor
    // take locks, and the error path builds an `io::Error` from an errno (no allocation).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The drone may have died between `fork` and `prctl`: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// One child to create: the command, the runtime that will own the child, and where the answer goes.
struct Request {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<std::io::Result<Child>>,
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
        mut command,
        runtime,
        reply,
    } in requests
    {
        // The child's pipes and exit watcher register with the caller's runtime.
        let _entered = runtime.enter();
        let _ = reply.send(command.spawn());
    }
}
