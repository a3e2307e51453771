//! `hangar-test-backend`: the session backend that Hangar's tests spawn.
//!
//! It serves HTTP and WebSocket on `0.0.0.0:$PORT` (see [`routes`]) and lets a test script its
//! lifecycle through environment variables, so one binary covers slow starts, never-ready
//! backends, backends that exit by themselves and backends that ignore SIGTERM:
//!
//! | Variable                      | Meaning                                                        |
//! |-------------------------------|----------------------------------------------------------------|
//! | `PORT`                        | Port to listen on (default 8080; 0 picks a free port).         |
//! | `TEST_BACKEND_READY_DELAY_MS` | Milliseconds to wait before binding (default 0).               |
//! | `TEST_BACKEND_NEVER_LISTEN`   | `1`: never bind, run until signalled.                          |
//! | `TEST_BACKEND_EXIT_CODE`      | Exit by itself with this code (default 0 if only the delay is set). |
//! | `TEST_BACKEND_EXIT_AFTER_MS`  | ...after this many milliseconds (default 0 if only the code is set). |
//! | `TEST_BACKEND_SIGTERM`        | `exit` (default), `ignore`, or `slow:<ms>` (wait, then exit 0). |
//! | `TEST_BACKEND_LOG_LINES_PER_S` | Write this many lines a second to stdout (default 0; for benchmarks of log capture). |
//! | `TEST_BACKEND_CLAIM`          | Answer to `POST /claim`: `ok` (204, default), `status:<code>`, or `hang`. |
//!
//! Routes (see [`routes`]) include `GET /env`, `POST /echo`, `POST /exit/<code>`, `GET /ws` (echo),
//! `POST /alloc/<mb>` (allocate and touch that many MiB, for out-of-memory tests) and
//! `POST /write/<name>` (write the body to `$HANGAR_DATA_DIR/<name>`, for mount tests), and
//! `POST /claim` / `GET /claim` (record and show warm-pool claim hooks).
//!
//! Lines the tests wait for are printed to stdout and flushed at once: `listening on <addr>`,
//! `got SIGTERM` and `exiting with code <n>`.
//!
//! It must run from a `FROM scratch` image, so it reads no files and resolves no names.

mod routes;

use std::future::pending;
use std::io::Write;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

/// How long an `/exit/<code>` request waits before exiting, so its 200 response gets written.
const EXIT_REQUEST_GRACE: Duration = Duration::from_millis(50);

/// Exit code for a configuration or startup failure of the backend itself.
const STARTUP_FAILURE: i32 = 2;

/// What the backend does on SIGTERM (`TEST_BACKEND_SIGTERM`).
#[derive(Debug, Clone, Copy)]
enum SigtermMode {
    /// `exit`: exit 0 at once.
    Exit,
    /// `ignore`: keep running, so the supervisor has to SIGKILL.
    Ignore,
    /// `slow:<ms>`: keep serving for this long, then exit 0.
    Slow(Duration),
}

impl FromStr for SigtermMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "exit" => Ok(Self::Exit),
            "ignore" => Ok(Self::Ignore),
            _ => value
                .strip_prefix("slow:")
                .and_then(|ms| ms.parse().ok())
                .map(|ms| Self::Slow(Duration::from_millis(ms)))
                .ok_or_else(|| "expected `exit`, `ignore` or `slow:<ms>`".to_owned()),
        }
    }
}

/// Exiting by itself after a delay (`TEST_BACKEND_EXIT_CODE`, `TEST_BACKEND_EXIT_AFTER_MS`).
#[derive(Debug, Clone, Copy)]
struct SelfExit {
    code: i32,
    after: Duration,
}

/// Everything the environment configures; see the crate docs for the variables.
#[derive(Debug)]
struct BackendConfig {
    port: u16,
    ready_delay: Duration,
    never_listen: bool,
    self_exit: Option<SelfExit>,
    on_sigterm: SigtermMode,
    log_lines_per_s: u32,
}

impl BackendConfig {
    fn from_env() -> Result<Self, String> {
        let exit_code: Option<i32> = env_parse("TEST_BACKEND_EXIT_CODE")?;
        let exit_after_ms: Option<u64> = env_parse("TEST_BACKEND_EXIT_AFTER_MS")?;
        let self_exit = (exit_code.is_some() || exit_after_ms.is_some()).then(|| SelfExit {
            code: exit_code.unwrap_or(0),
            after: Duration::from_millis(exit_after_ms.unwrap_or(0)),
        });
        let never_listen = match env_parse::<String>("TEST_BACKEND_NEVER_LISTEN")?.as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(format!(
                    "TEST_BACKEND_NEVER_LISTEN={other:?}: expected `1` or `0`"
                ))
            }
        };
        Ok(Self {
            port: env_parse("PORT")?.unwrap_or(8080),
            ready_delay: Duration::from_millis(
                env_parse("TEST_BACKEND_READY_DELAY_MS")?.unwrap_or(0),
            ),
            never_listen,
            self_exit,
            on_sigterm: env_parse("TEST_BACKEND_SIGTERM")?.unwrap_or(SigtermMode::Exit),
            log_lines_per_s: env_parse("TEST_BACKEND_LOG_LINES_PER_S")?.unwrap_or(0),
        })
    }
}

/// Reads and parses one variable; unset and empty both mean "not configured".
fn env_parse<T>(name: &str) -> Result<Option<T>, String>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => value
            .parse()
            .map(Some)
            .map_err(|error| format!("{name}={value:?}: {error}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// Prints a line to stdout and flushes it, because tests read stdout through a pipe.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout must not stop the backend: it would change the behaviour under test.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

#[tokio::main]
async fn main() {
    let config = BackendConfig::from_env().unwrap_or_else(|error| {
        eprintln!("hangar-test-backend: {error}");
        std::process::exit(STARTUP_FAILURE);
    });
    // Installed before the ready delay, so a backend that is still starting obeys SIGTERM too.
    let sigterm = signal(SignalKind::terminate()).unwrap_or_else(|error| {
        eprintln!("hangar-test-backend: cannot install the SIGTERM handler: {error}");
        std::process::exit(STARTUP_FAILURE);
    });
    if config.log_lines_per_s > 0 {
        start_log_lines(config.log_lines_per_s);
    }
    // Capacity 1 and `try_send`: the first exit request wins, later ones are dropped.
    let (exit_requests, exit_requests_rx) = mpsc::channel(1);

    // Each branch keeps running while the others wait (a slow SIGTERM still serves requests);
    // the first to finish decides the exit code.
    let code = tokio::select! {
        code = run_sigterm(sigterm, config.on_sigterm) => code,
        code = run_self_exit(config.self_exit) => code,
        code = run_exit_requests(exit_requests_rx) => code,
        error = run_server(&config, exit_requests) => {
            eprintln!("hangar-test-backend: {error}");
            STARTUP_FAILURE
        }
    };
    say(&format!("exiting with code {code}"));
    std::process::exit(code);
}

/// Writes `per_s` lines a second to stdout from a thread of its own (so a slow reader of the pipe
/// blocks only that thread), in bursts every 10 ms; a writer that fell more than a second behind
/// skips ahead rather than bursting.
fn start_log_lines(per_s: u32) {
    const TICK: Duration = Duration::from_millis(10);
    let spawned = std::thread::Builder::new()
        .name("log-lines".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let mut written: u64 = 0;
            let mut buf = String::new();
            loop {
                let due = (started.elapsed().as_secs_f64() * f64::from(per_s)) as u64;
                written = written.max(due.saturating_sub(u64::from(per_s)));
                buf.clear();
                while written < due {
                    use std::fmt::Write as _;
                    let _ = writeln!(
                        buf,
                        "log line {written}: the quick brown fox jumps over the lazy dog"
                    );
                    written += 1;
                }
                if !buf.is_empty() {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout
                        .write_all(buf.as_bytes())
                        .and_then(|()| stdout.flush());
                }
                std::thread::sleep(TICK);
            }
        });
    if let Err(error) = spawned {
        eprintln!("hangar-test-backend: cannot start the log line thread: {error}");
    }
}

/// Binds (after the configured delay) and serves until the server fails.
async fn run_server(config: &BackendConfig, exit_requests: mpsc::Sender<i32>) -> String {
    tokio::time::sleep(config.ready_delay).await;
    if config.never_listen {
        return pending().await;
    }
    let addr = SocketAddr::from(([0, 0, 0, 0], config.port));
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => return format!("cannot bind {addr}: {error}"),
    };
    match listener.local_addr() {
        Ok(local) => say(&format!("listening on {local}")),
        Err(error) => return format!("cannot read the bound address: {error}"),
    }
    match axum::serve(listener, routes::router(exit_requests)).await {
        Ok(()) => "server stopped".to_owned(),
        Err(error) => format!("server failed: {error}"),
    }
}

/// Resolves to the exit code once SIGTERM should end the process; never, for `ignore`.
async fn run_sigterm(mut sigterm: Signal, mode: SigtermMode) -> i32 {
    while sigterm.recv().await.is_some() {
        say("got SIGTERM");
        match mode {
            SigtermMode::Exit => return 0,
            SigtermMode::Ignore => {}
            SigtermMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                return 0;
            }
        }
    }
    pending().await
}

async fn run_self_exit(self_exit: Option<SelfExit>) -> i32 {
    let Some(SelfExit { code, after }) = self_exit else {
        return pending().await;
    };
    tokio::time::sleep(after).await;
    code
}

async fn run_exit_requests(mut requests: mpsc::Receiver<i32>) -> i32 {
    // `None` means the server is gone; its own branch reports that.
    let Some(code) = requests.recv().await else {
        return pending().await;
    };
    tokio::time::sleep(EXIT_REQUEST_GRACE).await;
    code
}
