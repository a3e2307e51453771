//! `hangar mark-lost` and `hangar prevent-renew`: the operator's tools for drones that are gone and keys
//! that must run out (Plane's `db-cli mark-backend-lost --drone` and `db-cli prevent-renew`), over the
//! controller's API instead of a database connection.

use super::Output;
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_types::{BackendId, ClusterName, DroneName};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct MarkLostArgs {
    /// The cluster (`host[:port]`).
    pub cluster: ClusterName,
    /// The drone (`dr-…`) that is gone for good.
    pub drone: DroneName,
}

#[derive(Debug, Args)]
pub struct PreventRenewArgs {
    /// The backend whose key lease must run out.
    pub backend: BackendId,
}

/// Records every backend of the drone that is not terminated as terminated (`lost`), freeing their
/// keys at once. Only for a drone that is really gone: a drone that is merely cut off keeps running its
/// backends until its key deadlines, while their keys may already be taken elsewhere.
pub async fn mark_lost(
    client: &ControllerClient,
    args: MarkLostArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let result = client
        .mark_lost(&args.cluster, &args.drone)
        .await
        .with_context(|| format!("marking drone {} lost", args.drone))?;
    out.finish(&result, |result| {
        if result.backends.is_empty() {
            say!("Drone {} marked lost; it had no live backends.", args.drone);
        } else {
            say!(
                "Drone {} marked lost; backends recorded as lost:",
                args.drone
            );
            for backend in &result.backends {
                say!("  {backend}");
            }
        }
    })
}

/// Stops the renewals of a backend's key lease: its drone terminates it by its key deadlines and the
/// key expires.
pub async fn prevent_renew(
    client: &ControllerClient,
    args: PreventRenewArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    client
        .prevent_renew(&args.backend)
        .await
        .with_context(|| format!("blocking key renewals of backend {}", args.backend))?;
    let result = serde_json::json!({"backend_id": args.backend, "renewals": "blocked"});
    out.finish(&result, |_| {
        say!(
            "Key renewals of backend {} blocked; its drone will terminate it by its key deadlines.",
            args.backend
        )
    })
}
