//! `hangar logs`: a backend's output as its drone kept it (`GET /ctrl/b/{backend}/logs`).

use super::Output;
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use hangar_client::ControllerClient;
use hangar_types::logs::{LogLine, LogSince, LogStream};
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
    /// Only lines written since then: a duration ago (`90s`, `10m`, `2h`, `1d`) or milliseconds since
    /// the epoch.
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
/// line as its JSON object with `--json`.
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
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the log stream")?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let line: LogLine = serde_json::from_slice(&raw).with_context(|| {
                format!("decoding a log line: {}", String::from_utf8_lossy(&raw))
            })?;
            print(&line, &args, out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
