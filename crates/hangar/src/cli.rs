//! Client commands: thin wrappers over [`hangar_client::ControllerClient`] that print results for
//! people (text) or programs (`--json`, one JSON value per line). Errors from the API are printed as
//! `Error: <message> (<kind>, error id <id>)` and give a non-zero exit code.

pub mod admin;
pub mod backend;
pub mod cluster;
pub mod connect;
pub mod inspect;
pub mod logs;
pub mod operator;

use anyhow::Context;
use hangar_client::status_stream::StatusStream;
use hangar_client::{ClientError, ControllerClient};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus};
use serde::Serialize;
use std::process::ExitCode;
use url::Url;

/// How client commands print their results.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints one JSON line.
    pub fn json_line<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let line = serde_json::to_string(value).context("encoding JSON output")?;
        say!("{line}");
        Ok(())
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

pub fn client(controller: &Url) -> anyhow::Result<ControllerClient> {
    ControllerClient::new(controller.clone()).context("invalid --controller URL")
}

/// The message printed for a failed command. An API error anywhere in the chain is shown in the
/// `Error: <message> (<kind>, error id <id>)` form.
pub fn describe_error(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        if let Some(ClientError::Api { error, .. }) = cause.downcast_ref::<ClientError>() {
            return format!(
                "Error: {} ({:?}, error id {})",
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
                say!("Status: {}", describe_status(&entry));
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
