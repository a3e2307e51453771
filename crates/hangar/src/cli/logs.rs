//! `hangar logs`: a backend's output as its drone kept it (`GET /ctrl/b/{backend}/logs`).

use super::Output;
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use hangar_client::ControllerClient;
use hangar_types::logs::{LogLine, LogReadEnd, LogReadItem, LogSince, LogStream};
use hangar_types::BackendId;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The backend id.
    pub backend: BackendId,
    /// Keep printing new lines until the backend ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the last N lines kept (at most 10000).
    #[arg(long)]
    pub tail: Option<u32>,
    /// Only lines written since then: a duration ago (`90s`, `10m`, `2h`, `1d`), an RFC 3339 time
    /// (`2024-12-05T12:00:00Z`) or milliseconds since the epoch.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<String>,
    /// Prefix each line with its time (milliseconds since the epoch, drone clock).
    #[arg(long, short = 't')]
    pub timestamps: bool,
}

fn parse_since(s: &str) -> Result<String, String> {
    s.parse::<LogSince>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Prints the lines: stdout lines on stdout, stderr lines on stderr (as `docker logs`), or every
/// line as its JSON object with `--json`. A read that ended early (its drone's session dropped, a
/// follow cut before its backend ended) is an error: its reason on stderr, exit status 1.
pub async fn run(
    client: &ControllerClient,
    args: LogsArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let response = client
        .backend_logs(&args.backend, args.since.as_deref(), args.tail, args.follow)
        .await
        .with_context(|| format!("reading the logs of backend {}", args.backend))?;
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    let mut end = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the log stream")?;
        pending.extend_from_slice(&chunk);
        while let Some(newline) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=newline).collect();
            let item: LogReadItem = serde_json::from_slice(&raw).with_context(|| {
                format!("decoding a log line: {}", String::from_utf8_lossy(&raw))
            })?;
            match item {
                LogReadItem::Line(line) => print(&line, &args, out)?,
                LogReadItem::End(read_end) => {
                    if out.json {
                        out.json_line(&read_end)?;
                    }
                    end = Some(read_end);
                }
            }
        }
    }
    check_end(end.as_ref(), args.follow)?;
    Ok(ExitCode::SUCCESS)
}

/// A read is complete when it ended normally: a follow with `backend_ended`, another read with no
/// end line or `backend_ended`.
fn check_end(end: Option<&LogReadEnd>, follow: bool) -> anyhow::Result<()> {
    match end {
        Some(end) if end.is_normal() => Ok(()),
        Some(end) => {
            let reason = serde_json::to_value(end.end).unwrap_or_default();
            let reason = reason.as_str().unwrap_or("unknown");
            match &end.message {
                Some(message) => anyhow::bail!("The log read ended early ({reason}): {message}"),
                None => anyhow::bail!("The log read ended early ({reason})"),
            }
        }
        None if follow => anyhow::bail!(
            "The log stream was cut before the backend ended (the controller went away?)"
        ),
        None => Ok(()),
    }
}

fn print(line: &LogLine, args: &LogsArgs, out: Output) -> anyhow::Result<()> {
    if out.json {
        return out.json_line(line);
    }
    let text = if args.timestamps {
        format!("{} {}", line.time.0, line.line)
    } else {
        line.line.clone()
    };
    match line.stream {
        LogStream::Stdout => say!("{text}"),
        LogStream::Stderr => eprintln!("{text}"),
    }
    Ok(())
}

/// For `hangar status`: the last lines a failed backend wrote to stderr, printed under its status.
pub async fn print_error_lines(client: &ControllerClient, backend: &BackendId) {
    // Best effort: the status is already printed; an unreachable drone just means no lines.
    let Ok(events) = client.backend_events(backend).await else {
        return;
    };
    let Some(lines) = events.error_lines.filter(|l| !l.is_empty()) else {
        return;
    };
    say!("Last error lines:");
    for line in lines {
        say!("  {}", line.line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::logs::LogReadEndKind;

    #[test]
    fn only_a_normal_end_succeeds() {
        let end = |end, message: Option<&str>| LogReadEnd {
            end,
            message: message.map(str::to_string),
        };
        let ended = end(LogReadEndKind::BackendEnded, None);
        assert!(check_end(Some(&ended), true).is_ok());
        assert!(check_end(None, false).is_ok());
        let cut = check_end(None, true).unwrap_err().to_string();
        assert!(cut.contains("cut"), "{cut}");
        let dropped = end(LogReadEndKind::DroneDisconnected, Some("session ended"));
        let error = check_end(Some(&dropped), true).unwrap_err().to_string();
        assert_eq!(
            error,
            "The log read ended early (drone_disconnected): session ended"
        );
        assert!(check_end(Some(&dropped), false).is_err());
    }
}
