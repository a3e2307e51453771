//! `hangar list-nodes`, `hangar termination-candidates` and `hangar events`: the read-only operator
//! commands of Plane's `db-cli`, over the controller's API instead of a database connection, with
//! `db-cli`'s output lines (plain text, no colours; `--json` prints JSON lines instead).

use super::admin::plane_time;
use super::{ConnectionArgs, Output, TimedOut};
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use hangar_client::status_stream::SseParser;
use hangar_client::{ClientError, ControllerClient};
use hangar_types::api::{BusEvent, ClusterState, NodeState, SweepReason};
use hangar_types::{ClusterName, DroneName};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ListNodesArgs {
    /// Only nodes of this cluster.
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Also the nodes no controller holds now (`Disconnected …`), as Plane's `db-cli list-nodes --all`.
    /// Without `--cluster`, the clusters listed are those with an attached node.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct TerminationCandidatesArgs {
    #[arg(long)]
    pub cluster: ClusterName,
    #[arg(long)]
    pub drone: DroneName,
}

/// `Connected to <controller> <cluster> <node> Plane=<version>@<hash>` per connected drone and proxy.
pub async fn list_nodes(
    client: &ControllerClient,
    args: ListNodesArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let mut clusters: Vec<(ClusterName, ClusterState)> = match &args.cluster {
        Some(cluster) => vec![(
            cluster.clone(),
            client
                .cluster_state(cluster)
                .await
                .with_context(|| format!("reading the state of cluster {cluster}"))?,
        )],
        None => client.clusters().await.context("listing the clusters")?,
    };
    if args.all {
        for (cluster, state) in &mut clusters {
            *state = client
                .cluster_state_with_detached(cluster)
                .await
                .with_context(|| format!("reading the nodes of cluster {cluster}"))?;
        }
    }
    let mut listed = Vec::new();
    for (cluster, state) in &clusters {
        let nodes = state
            .drones
            .iter()
            .map(|d| &d.node)
            .chain(state.proxies.iter());
        for node in nodes {
            if out.json {
                listed.push(serde_json::json!({"cluster": cluster, "node": node}));
            } else {
                say!("{}", node_line(cluster, node));
            }
        }
    }
    if out.json {
        out.json_line(&listed)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn node_line(cluster: &ClusterName, node: &NodeState) -> String {
    let connected = match &node.controller {
        Some(controller) => format!("Connected to {controller}"),
        None => "Disconnected".to_string(),
    };
    format!(
        "{connected} {cluster} {} Plane={}@{}",
        node.name, node.plane_version, node.plane_hash
    )
}

/// One line per backend the sweeper would terminate now, saying which limit it passed.
pub async fn termination_candidates(
    client: &ControllerClient,
    args: TerminationCandidatesArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let answer = match client
        .termination_candidates(&args.cluster, &args.drone)
        .await
    {
        Ok(answer) => answer,
        // `db-cli`'s answer; with --json, the error document instead.
        Err(e @ ClientError::Api { status, .. }) if status.as_u16() == 404 && out.json => {
            return Err(e).context("reading the termination candidates");
        }
        Err(ClientError::Api { status, .. }) if status.as_u16() == 404 => {
            say!("No such drone: {} on {}", args.drone, args.cluster);
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).context("reading the termination candidates"),
    };
    if out.json {
        out.json_line(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    for c in &answer.candidates {
        match (c.reason, c.lifetime_limit_seconds) {
            (SweepReason::Lifetime, Some(limit)) => {
                let expiration = hangar_types::Millis(c.created_at.0 + i64::from(limit) * 1000);
                say!(
                    "{} is alive past expiration time {}",
                    c.backend_id,
                    plane_time(expiration)
                );
            }
            _ => say!(
                "{} is a candidate for termination (status {} since {}, max idle {} seconds)",
                c.backend_id,
                c.status,
                plane_time(c.status_time),
                c.max_idle_seconds
                    .map_or_else(|| "-".to_string(), |s| s.to_string())
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints every event of the controllers' event bus as it happens (`<time> <None> <key> <kind>
/// <payload>`, as `db-cli events`; with `--json` one event object per line), until interrupted or the
/// controller goes away. Only opening the stream is limited by `--timeout`.
pub async fn events(connection: &ConnectionArgs, out: Output) -> anyhow::Result<ExitCode> {
    let client = connection.client()?;
    let opening = tokio::time::timeout(Duration::from_secs(connection.timeout), client.events());
    let response = opening
        .await
        .map_err(|_| TimedOut {
            what: "the controller did not open the event stream".into(),
            seconds: connection.timeout,
        })?
        .context("opening the event stream")?;
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the event stream")?;
        for sse in parser.feed(&chunk) {
            let event: BusEvent = serde_json::from_str(&sse.data)
                .with_context(|| format!("decoding an event: {}", sse.data))?;
            if out.json {
                out.json_line(&event)?;
            } else {
                say!(
                    "{} <None> {} {} {}",
                    plane_time(event.time),
                    event.key.as_deref().unwrap_or("<global>"),
                    event.kind,
                    event.payload
                );
            }
        }
    }
    anyhow::bail!("the controller closed the event stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lines_follow_db_cli() {
        let node: NodeState = serde_json::from_value(serde_json::json!({
            "name": {"Drone": "dr-abc"}, "plane_version": "0.1.0", "plane_hash": "h1",
            "controller": "co-xyz", "controller_heartbeat_age": 1
        }))
        .unwrap();
        let cluster: ClusterName = "localhost:9090".parse().unwrap();
        assert_eq!(
            node_line(&cluster, &node),
            "Connected to co-xyz localhost:9090 dr-abc Plane=0.1.0@h1"
        );
    }
}
