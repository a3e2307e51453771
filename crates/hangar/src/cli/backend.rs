//! `hangar status`, `hangar terminate` and `hangar revoke`: commands about one backend.

use super::admin::plane_time;
use super::{describe_status, follow_status, Follow, Output};
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_types::api::{BackendDetails, RevokeRequest};
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The backend id.
    pub backend: BackendId,
    /// Keep printing each status (with its time) until the backend is terminated; with --json, one
    /// status object per line.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// The backend id.
    pub backend: BackendId,
    /// Kill at once (SIGKILL) instead of SIGTERM followed by SIGKILL after a grace period.
    #[arg(long)]
    pub hard: bool,
    /// Follow the status until the backend is terminated.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The backend id.
    pub backend: BackendId,
    /// Every connection token of this user for the backend is revoked.
    #[arg(long)]
    pub user: String,
}

/// The text of `hangar status`: the current status first (`Status: ready`), then the backend's key,
/// cluster and drone, then every status with the time it was recorded.
pub fn render_details(details: &BackendDetails) -> String {
    let b = &details.backend;
    let current = details
        .history
        .last()
        .map_or_else(|| b.status.to_string(), describe_status);
    let mut key = format!("{}", b.key.name);
    if !b.key.namespace.is_empty() {
        key.push_str(&format!(" (namespace {:?})", b.key.namespace));
    }
    if !b.key.tag.is_empty() {
        key.push_str(&format!(" (tag {:?})", b.key.tag));
    }
    let mut text = format!(
        "Status: {current}\nBackend: {}\nKey: {key}\nCluster: {}\nDrone: {}\nCreated: {}\nHistory:\n",
        b.id,
        b.cluster,
        b.drone,
        plane_time(b.created_at)
    );
    for entry in &details.history {
        text.push_str(&format!(
            "  {}  {}\n",
            plane_time(entry.time),
            describe_status(entry)
        ));
    }
    text
}

pub async fn status(
    client: &ControllerClient,
    args: StatusArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    // Asked first even when following: the status stream of an unknown backend is silently empty,
    // while this answers 404.
    let details = client
        .backend_details(&args.backend)
        .await
        .with_context(|| format!("reading the status of backend {}", args.backend))?;
    if !args.follow {
        if out.json {
            out.json_line(&details)?;
        } else {
            print!("{}", render_details(&details));
            if details.backend.status == BackendStatus::Terminated {
                super::logs::print_error_lines(client, &args.backend).await;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let b = &details.backend;
    if !out.json {
        say!("Backend: {}", b.id);
        say!("Key: {}", b.key.name);
        say!("Drone: {}", b.drone);
    }
    // JSON lines: one status entry per line, the history first.
    let follow = Follow {
        print_from: BackendStatus::Scheduled,
        json_each: true,
        with_time: true,
    };
    follow_status(client, &args.backend, out, follow, |s| {
        s == BackendStatus::Terminated
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// What `terminate --json` prints: the request sent and, with `--wait`, the final status.
#[derive(Debug, serde::Serialize)]
struct TerminateOutput<'a> {
    backend_id: &'a BackendId,
    termination: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_status: Option<BackendStatusEntry>,
}

/// Terminates a backend. An already terminated backend is an error (exit status 1), as `kubectl
/// delete` of an object that is gone: the message says so and when it ended.
pub async fn terminate(
    client: &ControllerClient,
    args: TerminateArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let kind = if args.hard { "hard" } else { "soft" };
    let current = client
        .backend_status(&args.backend)
        .await
        .with_context(|| format!("reading the status of backend {}", args.backend))?;
    if current.status == BackendStatus::Terminated {
        anyhow::bail!(
            "backend {} is already terminated (since {}: {})",
            args.backend,
            plane_time(current.time),
            describe_status(&current)
        );
    }
    if args.hard {
        client.hard_terminate(&args.backend).await
    } else {
        client.soft_terminate(&args.backend).await
    }
    .with_context(|| format!("terminating backend {}", args.backend))?;
    if !out.json {
        say!("Sent {kind} termination to backend {}", args.backend);
    }
    let mut final_status = None;
    if args.wait {
        // The stream replays the whole history; only the termination is news here.
        let follow = Follow {
            print_from: BackendStatus::Terminating,
            json_each: false,
            with_time: false,
        };
        let entry = follow_status(client, &args.backend, out, follow, |s| {
            s == BackendStatus::Terminated
        })
        .await?;
        final_status = Some(entry);
    }
    if out.json {
        out.json_line(&TerminateOutput {
            backend_id: &args.backend,
            termination: kind,
            final_status,
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(
    client: &ControllerClient,
    args: RevokeArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let req = RevokeRequest {
        backend_id: args.backend.clone(),
        user: args.user.clone(),
    };
    client
        .revoke(&req)
        .await
        .with_context(|| format!("revoking tokens of backend {}", args.backend))?;
    out.finish(&req, |req| {
        say!(
            "Revoked the tokens of user {:?} for backend {}",
            req.user,
            req.backend_id
        )
    })
}
