//! The exec wrapper: how a backend process gets its parent-death signal without the drone forking.
//!
//! Only a process can ask for its own parent-death signal (`PR_SET_PDEATHSIG`). Asking between
//! `fork` and `exec` (a `pre_exec` hook) makes std `fork` the whole drone: the page tables of a
//! large multi-threaded process are copied and the TLBs of the other cores shot down, 3.6 ms of a
//! cold spawn on a loaded 2-core machine. Without a hook std uses `posix_spawn`, a vfork that
//! shares the drone's memory until the `exec`. So the drone spawns this wrapper, hook-less: a binary
//! that called [`init`] first thing in its `main`, started as
//! `<exe> __hangar-exec-backend <drone pid> <program> <argv0> [args...]`. The wrapper asks for
//! SIGKILL when its parent dies, exits at once when its parent is no longer the drone (the drone
//! died before the request took effect), and `execve`s the backend. The backend keeps the wrapper's
//! pid, process group, environment, working directory and pipes, and the signal survives the
//! `execve` (Linux clears it only for set-user-ID, set-group-ID or file-capability programs).

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The first argument that selects the wrapper mode.
pub const MODE_ARG: &str = "__hangar-exec-backend";

/// Exit status of a wrapper that could not become the backend (as a shell's "cannot execute").
pub const CANNOT_EXEC: i32 = 127;

/// The executable of this process, once [`init`] found it is not the wrapper itself.
static WRAPPER: OnceLock<PathBuf> = OnceLock::new();

/// Call first thing in `main`, before any thread, runtime or logging starts. Started as the wrapper,
/// this process becomes the backend (or exits with [`CANNOT_EXEC`]) and the call never returns;
/// otherwise process backends of this process are started through its own executable from now on.
/// A process that never calls it forks its backends instead (slower, same guarantees).
pub fn init() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(MODE_ARG)) {
        let error = exec_backend(args);
        eprintln!("hangar: cannot start the backend: {error}");
        std::process::exit(CANNOT_EXEC);
    }
    // The running executable even when its file was replaced or deleted since (an upgrade).
    let _ = WRAPPER.set(PathBuf::from("/proc/self/exe"));
}

/// The wrapper set up by [`init`], if any.
pub(super) fn installed() -> Option<&'static Path> {
    WRAPPER.get().map(PathBuf::as_path)
}

/// The arguments after `wrapper` that run `program` with `argv` (`argv[0]` first; `program`
/// itself when empty) as a child of the process `drone`.
pub(super) fn wrapper_args<'a>(
    drone: u32,
    program: &'a Path,
    argv: &'a [String],
) -> impl Iterator<Item = OsString> + 'a {
    let argv0 = argv
        .first()
        .map_or_else(|| program.as_os_str().to_owned(), OsString::from);
    [
        OsString::from(MODE_ARG),
        OsString::from(drone.to_string()),
        program.as_os_str().to_owned(),
        argv0,
    ]
    .into_iter()
    .chain(argv.iter().skip(1).map(OsString::from))
}

/// Sets the parent-death signal and replaces this process with the backend; returns only on error.
fn exec_backend(mut args: impl Iterator<Item = OsString>) -> std::io::Error {
    let usage = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("usage: {MODE_ARG} <drone pid> <program> <argv0> [args...]"),
        )
    };
    let drone = args
        .next()
        .and_then(|pid| pid.to_str()?.parse::<i32>().ok());
    let (Some(drone), Some(program), Some(argv0)) = (drone, args.next(), args.next()) else {
        return usage();
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return e.into();
    }
    // The drone may have died before the request took effect: then no signal will come.
    if nix::unistd::getppid() != Pid::from_raw(drone) {
        return std::io::Error::other("the drone that started this backend is gone");
    }
    std::process::Command::new(program)
        .arg0(argv0)
        .args(args)
        .exec()
}
