//! Creating a backend process as `posix_spawn` does, plus the parent-death signal: the drone's one
//! module of `unsafe` code.
//!
//! `clone(CLONE_VM | CLONE_VFORK)` starts the child in the drone's memory, on a small stack of its
//! own, and suspends the calling thread until the child has called `execve` or exited. Nothing is
//! copied, so the cost does not grow with the drone: a `fork` copies the page tables of the whole
//! process (3.6 ms of a cold spawn on a loaded 2-core machine), and `posix_spawn` of an exec wrapper
//! pays for loading a second large executable (~1.5 ms). Only a process can ask for its own
//! parent-death signal, which is why std's `posix_spawn` is not enough.
//!
//! The price: until its `execve`, the child shares the memory of a multi-threaded process. Safety
//! argument, kept by every line below:
//! - everything the child reads (C strings, the pointer arrays, descriptors, the parent's pid) is
//!   prepared by [`spawn`] before `clone` and lives in its frame, which stays put: the thread that
//!   owns it is suspended until the child is gone from the shared memory (exec'd or exited);
//! - the child allocates nothing, takes no lock, cannot panic, and makes only async-signal-safe
//!   calls (thin libc wrappers of system calls: `sigaction`, `sigprocmask`, `dup2`, `setpgid`,
//!   `chdir`, `prctl`, `getppid`, `execve`, `_exit`); it writes to shared memory only the atomic
//!   [`ChildArgs::error`] and `errno` of the suspended thread;
//! - no signal handler runs in the child: [`spawn`] blocks every signal around `clone`, and the
//!   child resets every handled signal to its default before unblocking (the handlers are the
//!   drone's; its signal table is the child's own copy, as `CLONE_SIGHAND` is not set);
//! - the descriptor table is the child's own copy (no `CLONE_FILES`): its `dup2`s do not touch the
//!   drone's, and every descriptor of the drone is close-on-exec (Rust, tokio and SQLite open them
//!   so), so the backend gets exactly 0, 1 and 2.

#![allow(unsafe_code)]

use nix::libc::{self, c_char, c_int, c_void, pid_t};
use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

/// Exit status of a child that could not become the backend (as a shell's "cannot execute"); the
/// parent reaps it and reports the error itself.
const CANNOT_EXEC: c_int = 127;

/// The child's stack. It runs one small function and the libc wrappers it calls; `posix_spawn`
/// uses 32 KiB plus the size of the arguments, which it copies there (this child does not).
const STACK_SIZE: usize = 64 * 1024;

/// Highest signal number on Linux (`_NSIG - 1`).
const LAST_SIGNAL: c_int = 64;

/// What the child becomes, as C strings.
pub struct Image {
    /// An absolute path, or relative to the drone's directory when `cwd` is `None`.
    pub program: CString,
    /// `argv[0]` first.
    pub argv: Vec<CString>,
    /// `NAME=value` entries: the whole environment of the backend.
    pub envp: Vec<CString>,
    pub cwd: Option<CString>,
}

/// The descriptors that become the child's 0, 1 and 2 (the caller's copies stay open).
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The child's whole input, in the frame of [`spawn`].
struct ChildArgs {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// Null: stay in the drone's directory.
    cwd: *const c_char,
    /// Source descriptors of 0, 1 and 2, each at least 3 so that no `dup2` overwrites another.
    stdio: [RawFd; 3],
    /// The drone's pid: if the child's parent is another process by the time the parent-death
    /// signal is set, the drone is gone and no signal will come.
    parent: pid_t,
    /// `errno` of the step that failed; 0 while none did (and after a successful `execve`).
    error: AtomicI32,
}

/// Starts `image` as a child of the calling thread, in a process group of its own, with `stdio` as
/// its 0, 1 and 2 and SIGKILL as its parent-death signal. Returns its pid once it runs the program,
/// or the error of the step that failed (that child is reaped). The signal is sent when the calling
/// *thread* exits: call it from a thread that lives as long as the process.
pub fn spawn(image: &Image, stdio: &Stdio) -> io::Result<pid_t> {
    let argv = null_terminated(&image.argv);
    let envp = null_terminated(&image.envp);
    // Descriptors below 3 could be overwritten by an earlier `dup2` in the child (a drone started
    // with a closed stdin, say): those are duplicated to 3 or above (`try_clone`: F_DUPFD_CLOEXEC).
    let mut copies = Vec::new();
    let mut source = |fd: &OwnedFd| -> io::Result<RawFd> {
        if fd.as_raw_fd() >= 3 {
            return Ok(fd.as_raw_fd());
        }
        let copy = fd.try_clone()?;
        let raw = copy.as_raw_fd();
        copies.push(copy);
        Ok(raw)
    };
    let fds = [
        source(&stdio.stdin)?,
        source(&stdio.stdout)?,
        source(&stdio.stderr)?,
    ];
    let args = ChildArgs {
        program: image.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: image.cwd.as_ref().map_or(ptr::null(), |cwd| cwd.as_ptr()),
        stdio: fds,
        // SAFETY: a system call without arguments.
        parent: unsafe { libc::getpid() },
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; STACK_SIZE];
    // The stack grows down from its end, which the ABI wants 16-byte aligned.
    let top = stack.as_mut_ptr().wrapping_add(STACK_SIZE);
    let top = top.wrapping_sub(top as usize % 16).cast::<c_void>();

    let pid = {
        let _blocked = BlockedSignals::new()?;
        // SAFETY: see the module's safety argument. `top` is the end of `stack`, which, like
        // `args` and everything its pointers name, outlives the child's use of it: with
        // CLONE_VFORK `clone` returns only once the child has exec'd or exited.
        let pid = unsafe {
            libc::clone(
                run_child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                ptr::from_ref(&args).cast_mut().cast::<c_void>(),
            )
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        pid
    };
    drop((stack, copies));
    match args.error.load(Ordering::SeqCst) {
        0 => Ok(pid),
        errno => {
            reap(pid);
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

/// A pidfd of `pid` (Linux 5.3 and later; close-on-exec), which becomes readable when it exits.
/// `pid` must be an unreaped child of this process, so that it cannot name another process.
pub fn pidfd_open(pid: pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a system call with two integer arguments; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pipe, both ends close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: `pipe2` writes two descriptors into the array it is given, or fails.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `items` as the null-terminated pointer array `execve` takes (pointing into `items`).
fn null_terminated(items: &[CString]) -> Vec<*const c_char> {
    items
        .iter()
        .map(|item| item.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Waits for a child that has exited (it ran `_exit` before `clone` returned).
fn reap(pid: pid_t) {
    loop {
        // SAFETY: a system call on our own child; a null status pointer is allowed.
        let r = unsafe { libc::waitpid(pid, ptr::null_mut(), 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Every signal blocked for the calling thread while it lives; the previous mask comes back on drop.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn new() -> io::Result<Self> {
        let mut all = MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigfillset` initialises `all`; `pthread_sigmask` reads it and initialises `old`
        // (it returns an error number instead of setting errno).
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            let r = libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(BlockedSignals(old.assume_init()))
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores a mask `pthread_sigmask` returned.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, ptr::null_mut());
        }
    }
}

/// The child, on its own stack in the drone's memory: becomes the backend or exits.
extern "C" fn run_child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive while its thread is suspended in `clone`.
    let args = unsafe { &*arg.cast::<ChildArgs>() };
    // SAFETY: the steps follow the module's safety argument; `become_backend` returns only on error.
    let errno = unsafe { become_backend(args) };
    args.error.store(
        if errno == 0 { libc::EINVAL } else { errno },
        Ordering::SeqCst,
    );
    // SAFETY: ends the child only (its own thread group); no atexit handler runs.
    unsafe { libc::_exit(CANNOT_EXEC) }
}

/// Sets the child up and runs `execve`; returns the `errno` of the step that failed.
///
/// # Safety
/// Only in the child of [`spawn`] (shared memory, see the module's safety argument).
unsafe fn become_backend(args: &ChildArgs) -> c_int {
    let errno = || nix::errno::Errno::last_raw();
    reset_signal_handlers();
    for (target, fd) in (0..).zip(args.stdio) {
        // `fd` is at least 3, so it is never `target` (and `dup2` clears close-on-exec on `target`).
        if libc::dup2(fd, target) < 0 {
            return errno();
        }
    }
    if libc::setpgid(0, 0) < 0 {
        return errno();
    }
    if !args.cwd.is_null() && libc::chdir(args.cwd) < 0 {
        return errno();
    }
    if libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    ) < 0
    {
        return errno();
    }
    // The drone may have died before the request took effect: then no signal will come.
    if libc::getppid() != args.parent {
        return libc::ESRCH;
    }
    let mut none = MaybeUninit::<libc::sigset_t>::uninit();
    libc::sigemptyset(none.as_mut_ptr());
    if libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), ptr::null_mut()) < 0 {
        return errno();
    }
    libc::execve(args.program, args.argv, args.envp);
    errno()
}

/// Resets every signal with a handler to its default action, and SIGPIPE (which the Rust runtime
/// ignores) too, as std does for its children; other ignored signals stay ignored.
///
/// # Safety
/// Only in the child of [`spawn`], with every signal blocked.
unsafe fn reset_signal_handlers() {
    for signal in 1..=LAST_SIGNAL {
        let mut old = MaybeUninit::<libc::sigaction>::zeroed();
        // Signals libc reserves for itself, SIGKILL and SIGSTOP fail or stay default: skipped.
        if libc::sigaction(signal, ptr::null(), old.as_mut_ptr()) != 0 {
            continue;
        }
        let handler = old.assume_init_ref().sa_sigaction;
        let handled = handler != libc::SIG_DFL && handler != libc::SIG_IGN;
        if handled || (signal == libc::SIGPIPE && handler == libc::SIG_IGN) {
            // All zero: SIG_DFL, no flags, empty mask.
            let default = MaybeUninit::<libc::sigaction>::zeroed();
            libc::sigaction(signal, default.as_ptr(), ptr::null_mut());
        }
    }
}
