//! `hangar status`, `hangar terminate` and `hangar revoke`: commands about one backend.

use super::{describe_status, follow_status, Follow, Output};
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_types::api::RevokeRequest;
use hangar_types::{BackendId, BackendStatus};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The backend id.
    pub backend: BackendId,
    /// Keep printing each new status until the backend is terminated.
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

pub async fn status(
    client: &ControllerClient,
    args: StatusArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    // Asked first even when following: the status stream of an unknown backend is silently empty,
    // while this answers 404.
    let entry = client
        .backend_status(&args.backend)
        .await
        .with_context(|| format!("reading the status of backend {}", args.backend))?;
    if !args.follow {
        if out.json {
            out.json_line(&entry)?;
        } else {
            say!("Status: {}", describe_status(&entry));
            if entry.status == BackendStatus::Terminated {
                super::logs::print_error_lines(client, &args.backend).await;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let follow = Follow {
        print_from: BackendStatus::Scheduled,
        json_each: true,
    };
    follow_status(client, &args.backend, out, follow, |s| {
        s == BackendStatus::Terminated
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn terminate(
    client: &ControllerClient,
    args: TerminateArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let kind = if args.hard { "hard" } else { "soft" };
    if args.hard {
        client.hard_terminate(&args.backend).await
    } else {
        client.soft_terminate(&args.backend).await
    }
    .with_context(|| format!("terminating backend {}", args.backend))?;
    if out.json {
        out.json_line(&serde_json::json!({"backend_id": args.backend, "termination": kind}))?;
    } else {
        say!("Sent {kind} termination to backend {}", args.backend);
    }
    if args.wait {
        // The stream replays the whole history; only the termination is news here.
        let follow = Follow {
            print_from: BackendStatus::Terminating,
            json_each: false,
        };
        let entry = follow_status(client, &args.backend, out, follow, |s| {
            s == BackendStatus::Terminated
        })
        .await?;
        if out.json {
            out.json_line(&entry)?;
        }
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
    if out.json {
        out.json_line(&req)?;
    } else {
        say!(
            "Revoked the tokens of user {:?} for backend {}",
            args.user,
            args.backend
        );
    }
    Ok(ExitCode::SUCCESS)
}
