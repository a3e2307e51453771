//! Client commands: thin wrappers over [`hangar_client::ControllerClient`] that print results for
//! people (text) or programs (`--json`: one JSON document per command, one JSON object per line for
//! the streaming commands). Every client command takes the same connection and output flags
//! ([`ClientArgs`]). Errors from the API are printed as `Error: <message> (<kind>, error id <id>)`,
//! or with `--json` as `{"error": {…}}` on stderr, and give a non-zero exit code ([`exit`]).

pub mod admin;
pub mod backend;
pub mod cluster;
pub mod connect;
pub mod docs;
pub mod inspect;
pub mod list;
pub mod logs;
pub mod operator;
pub mod warm_pool;

use anyhow::Context;
use clap::Args;
use hangar_client::status_stream::StatusStream;
use hangar_client::{ClientError, ControllerClient};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;
use url::Url;

/// Default controller URL of the client commands (where `hangar dev` listens by default).
pub const DEFAULT_CONTROLLER_URL: &str = "http://127.0.0.1:8080";

/// Exit statuses of every command besides 0 for success (all listed in `hangar --help`).
pub mod exit {
    /// It failed; the message on stderr says why.
    pub const ERROR: u8 = 1;
    /// Bad flags or arguments (clap's usage errors).
    pub const USAGE: u8 = 2;
    /// A wait ran out: the controller did not answer within `--timeout`, or `connect
    /// --timeout-seconds` passed before the backend was ready. The number `timeout(1)` uses.
    pub const TIMEOUT: u8 = 124;
}

/// The exit statuses as `hangar --help` lists them.
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 success; 1 error (the message says what failed); \
2 usage error (bad flags or arguments); 124 timeout (the controller did not answer within --timeout, \
or `connect --timeout-seconds` passed).";

/// How to reach the controller: taken by every client command, `hangar admin` included.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Controller URL, `http(s)://[TOKEN@]host:port` (a bearer token as the URL's username);
    /// `host:port` alone means `http://host:port`.
    #[arg(
        long,
        global = true,
        env = "HANGAR_CONTROLLER_URL",
        default_value = DEFAULT_CONTROLLER_URL,
        value_parser = parse_controller_url,
        value_name = "URL"
    )]
    pub controller: Url,
    /// Seconds to wait for each answer of the controller (connecting included); then the command
    /// fails with exit status 124. Streams (`--follow`, `events`) are not limited.
    #[arg(
        long,
        global = true,
        env = "HANGAR_CLIENT_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
}

/// `--json`, for the commands that print results.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print one JSON document on stdout (streaming commands: `status --follow` and `events` print
    /// one JSON object per line); errors go to stderr as `{"error": {"kind": …, "message": …}}`
    /// (API errors also with `id` and `status`).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The flags every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A client command: the common [`ClientArgs`] and the command's own arguments.
#[derive(Debug, Args)]
pub struct Client<T: Args> {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub args: T,
}

/// A client command without arguments of its own.
#[derive(Debug, Args)]
pub struct NoArgs {}

impl ConnectionArgs {
    /// The API client, with `--timeout` on each call.
    pub fn client(&self) -> anyhow::Result<ControllerClient> {
        Ok(ControllerClient::new(self.controller.clone())
            .context("invalid --controller URL")?
            .with_request_timeout(Duration::from_secs(self.timeout)))
    }
}

impl ClientArgs {
    pub fn output(&self) -> Output {
        Output {
            json: self.output.json,
        }
    }
}

impl<T: Args> Client<T> {
    /// Runs `command` with the API client of `--controller`/`--timeout`, the command's arguments
    /// and `--json`.
    pub async fn run(
        self,
        command: impl AsyncFnOnce(&ControllerClient, T, Output) -> anyhow::Result<ExitCode>,
    ) -> anyhow::Result<ExitCode> {
        let client = self.client.connection.client()?;
        command(&client, self.args, self.client.output()).await
    }
}

/// `--controller` values: an http(s) URL, or `host:port` meaning `http://host:port`.
pub fn parse_controller_url(s: &str) -> Result<Url, String> {
    let s = s.trim();
    let text = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let url = Url::parse(&text).map_err(|e| {
        format!("{e}: write the controller as http://HOST:PORT (or https://HOST), e.g. http://127.0.0.1:8080")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be http or https, not {:?}: write the controller as http://HOST:PORT",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host: write the controller as http://HOST:PORT".into());
    }
    Ok(url)
}

/// A wait that ran out (exit status [`exit::TIMEOUT`]).
#[derive(Debug, thiserror::Error)]
#[error("{what} within {seconds} s")]
pub struct TimedOut {
    /// What did not happen, e.g. "the controller did not answer".
    pub what: String,
    pub seconds: u64,
}

/// How client commands print their results.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints one JSON document on one line (with `--json`, a command's only output, or one line of
    /// a streaming command's output).
    pub fn json_line<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let line = serde_json::to_string(value).context("encoding JSON output")?;
        say!("{line}");
        Ok(())
    }

    /// Ends a command that succeeded with `result`: prints it as one JSON document with `--json`,
    /// else as `human` writes it.
    pub fn finish<T: Serialize>(
        &self,
        result: &T,
        human: impl FnOnce(&T),
    ) -> anyhow::Result<ExitCode> {
        if self.json {
            self.json_line(result)?;
        } else {
            human(result);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Writes one line to stdout. Unlike `println!`, a reader that went away (`hangar status … | head -1`)
/// ends the program quietly with the shell's SIGPIPE status (141) instead of a panic.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            eprintln!("Error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` for command output, through [`print_line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// The message printed for a failed command. An API error anywhere in the chain is shown in the
/// `Error: <message> (<kind>, error id <id>)` form.
pub fn describe_error(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        if let Some(ClientError::Api { error, .. }) = cause.downcast_ref::<ClientError>() {
            let hint = err
                .downcast_ref::<Hint>()
                .map_or_else(String::new, |h| format!("{h}: "));
            return format!(
                "Error: {hint}{} ({:?}, error id {})",
                error.message, error.kind, error.id
            );
        }
    }
    // Error types often repeat their source's text in their own message; print each text once.
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    format!("Error: {text}")
}

/// What to do about an API error, in words: the outermost context of an error, printed before the
/// controller's message (`err.context(Hint(…))`).
#[derive(Debug)]
pub struct Hint(pub String);

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether the error is a wait that ran out: `--timeout` on a controller call, or a [`TimedOut`].
pub fn is_timeout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<TimedOut>().is_some()
            || cause
                .downcast_ref::<ClientError>()
                .is_some_and(ClientError::is_timeout)
    })
}

/// The `{"error": {…}}` document printed on stderr for a failed command with `--json`: Plane's
/// `{id, kind, message}` (plus the HTTP `status`) for API errors, `{kind, message}` otherwise
/// (`kind` is `Timeout` or `Error`).
pub fn error_json(err: &anyhow::Error) -> serde_json::Value {
    for cause in err.chain() {
        if let Some(ClientError::Api { status, error }) = cause.downcast_ref::<ClientError>() {
            let message = match err.downcast_ref::<Hint>() {
                Some(hint) => format!("{hint}: {}", error.message),
                None => error.message.clone(),
            };
            return serde_json::json!({"error": {
                "id": error.id, "kind": error.kind, "message": message,
                "status": status.as_u16(),
            }});
        }
    }
    let kind = if is_timeout(err) { "Timeout" } else { "Error" };
    let message = describe_error(err);
    let message = message.strip_prefix("Error: ").unwrap_or(&message);
    serde_json::json!({"error": {"kind": kind, "message": message}})
}

/// Prints a failed command's error on stderr (text, or JSON with `--json`) and returns its exit status.
pub fn report_failure(err: &anyhow::Error, json: bool) -> ExitCode {
    if json {
        eprintln!("{}", error_json(err));
    } else if is_timeout(err) && !err.chain().any(|c| c.downcast_ref::<TimedOut>().is_some()) {
        eprintln!("{} (the limit is --timeout SECONDS)", describe_error(err));
    } else {
        eprintln!("{}", describe_error(err));
    }
    ExitCode::from(if is_timeout(err) {
        exit::TIMEOUT
    } else {
        exit::ERROR
    })
}

/// One human-readable line for a status entry: `ready`, or
/// `terminated (reason: swept, soft, exit code 0): message`.
pub fn describe_status(entry: &BackendStatusEntry) -> String {
    let mut details = Vec::new();
    if let Some(reason) = entry.termination_reason {
        details.push(format!("reason: {reason}"));
    }
    if let Some(kind) = entry.termination_kind {
        details.push(
            match kind {
                hangar_types::TerminationKind::Soft => "soft",
                hangar_types::TerminationKind::Hard => "hard",
            }
            .to_string(),
        );
    }
    if let Some(code) = entry.exit_code {
        details.push(format!("exit code {code}"));
    } else if entry.exit_error == Some(true) {
        details.push("exit error".to_string());
    }
    let mut line = entry.status.to_string();
    if !details.is_empty() {
        line.push_str(&format!(" ({})", details.join(", ")));
    }
    if let Some(message) = &entry.message {
        line.push_str(&format!(": {message}"));
    }
    line
}

/// What [`follow_status`] prints for each status it sees.
#[derive(Debug, Clone, Copy)]
pub struct Follow {
    /// Statuses before this one (replayed history) are not printed.
    pub print_from: BackendStatus,
    /// With `--json`, print every entry as a JSON line (otherwise the caller prints the last one).
    pub json_each: bool,
    /// Text lines say when each status was recorded (`Status: ready at 2024-06-10 12:34:56 UTC`).
    pub with_time: bool,
}

/// Follows the status stream of `backend`, printing statuses as `Status: …` lines (or JSON lines, see
/// [`Follow`]), until `stop(status)` holds. Returns the final entry.
pub async fn follow_status(
    client: &ControllerClient,
    backend: &BackendId,
    out: Output,
    follow: Follow,
    stop: impl Fn(BackendStatus) -> bool,
) -> anyhow::Result<BackendStatusEntry> {
    let mut stream = StatusStream::new(client.clone(), backend.clone());
    loop {
        let entry = stream
            .next()
            .await
            .with_context(|| format!("following the status of backend {backend}"))?;
        if entry.status >= follow.print_from {
            if !out.json {
                if follow.with_time {
                    say!(
                        "Status: {} at {}",
                        describe_status(&entry),
                        admin::plane_time(entry.time)
                    );
                } else {
                    say!("Status: {}", describe_status(&entry));
                }
            } else if follow.json_each {
                out.json_line(&entry)?;
            }
        }
        if stop(entry.status) {
            return Ok(entry);
        }
    }
}

pub fn version(out: Output) -> ExitCode {
    if out.json {
        say!(
            "{}",
            serde_json::json!({"version": hangar_types::VERSION, "protocol": hangar_types::PROTOCOL_VERSION})
        );
    } else {
        say!("hangar {}", hangar_types::VERSION);
        say!("protocol version {}", hangar_types::PROTOCOL_VERSION);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::api::{ApiError, ApiErrorKind};
    use hangar_types::{Millis, TerminationKind, TerminationReason};

    #[test]
    fn api_errors_are_described_with_kind_and_id() {
        let err = anyhow::Error::new(ClientError::Api {
            status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
            error: ApiError {
                id: "e-1".into(),
                kind: ApiErrorKind::NoDroneAvailable,
                message: "No active drone available.".into(),
            },
        })
        .context("connect request failed");
        assert_eq!(
            describe_error(&err),
            "Error: No active drone available. (NoDroneAvailable, error id e-1)"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe_error(&err), "Error: outer: inner");
        let err = anyhow::anyhow!("refused")
            .context("cannot reach: refused")
            .context("connect failed");
        assert_eq!(
            describe_error(&err),
            "Error: connect failed: cannot reach: refused"
        );
    }

    #[test]
    fn statuses_are_described() {
        let mut e = BackendStatusEntry {
            status: BackendStatus::Ready,
            termination_reason: None,
            termination_kind: None,
            exit_error: None,
            exit_code: None,
            message: None,
            oom_killed: None,
            time: Millis(0),
        };
        assert_eq!(describe_status(&e), "ready");
        e.status = BackendStatus::Terminated;
        e.termination_reason = Some(TerminationReason::StartupTimeout);
        e.termination_kind = Some(TerminationKind::Soft);
        e.exit_code = Some(3);
        e.message = Some("did not listen".into());
        assert_eq!(
            describe_status(&e),
            "terminated (reason: startuptimeout, soft, exit code 3): did not listen"
        );
    }
}
