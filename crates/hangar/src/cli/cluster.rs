//! `hangar cluster-state` and `hangar drain`: commands about a cluster's nodes.

use super::Output;
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_types::api::ClusterState;
use hangar_types::{ClusterName, DroneName};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ClusterStateArgs {
    /// The cluster (`host[:port]`).
    pub cluster: ClusterName,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The cluster (`host[:port]`).
    pub cluster: ClusterName,
    /// The drone (`dr-…`).
    pub drone: DroneName,
}

pub async fn cluster_state(
    client: &ControllerClient,
    args: ClusterStateArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let state = client
        .cluster_state(&args.cluster)
        .await
        .with_context(|| format!("reading the state of cluster {}", args.cluster))?;
    out.finish(&state, |state| print!("{}", render_cluster_state(state)))
}

pub async fn drain(
    client: &ControllerClient,
    args: DrainArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let result = client
        .drain(&args.cluster, &args.drone)
        .await
        .with_context(|| format!("draining drone {}", args.drone))?;
    out.finish(&result, |result| {
        if result.updated {
            say!("Drone {} draining initiated.", args.drone);
        } else {
            say!("Drone {} was already draining.", args.drone);
        }
    })
}

/// An age in whole seconds shown in its largest whole unit (`3d`, `2h`, `5m`, `12s`); `-` if unknown.
pub fn format_age(seconds: Option<i64>) -> String {
    match seconds {
        None => "-".to_string(),
        Some(s) if s >= 86_400 => format!("{}d", s / 86_400),
        Some(s) if s >= 3_600 => format!("{}h", s / 3_600),
        Some(s) if s >= 60 => format!("{}m", s / 60),
        Some(s) => format!("{s}s"),
    }
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn render_cluster_state(state: &ClusterState) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let drones: Vec<Vec<String>> = state
        .drones
        .iter()
        .map(|d| {
            let executors: Vec<String> = d.executors.iter().map(|e| e.to_string()).collect();
            vec![
                d.node.name.to_string(),
                if d.pool.is_empty() {
                    "-".into()
                } else {
                    d.pool.clone()
                },
                yes_no(d.ready),
                yes_no(d.draining),
                d.backend_count.to_string(),
                if executors.is_empty() {
                    "-".into()
                } else {
                    executors.join(",")
                },
                format_age(d.last_heartbeat_age),
                d.node
                    .controller
                    .as_ref()
                    .map_or("-".into(), |c| c.to_string()),
                d.node.plane_version.clone(),
            ]
        })
        .collect();
    let proxies: Vec<Vec<String>> = state
        .proxies
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                p.controller.as_ref().map_or("-".into(), |c| c.to_string()),
                format_age(p.controller_heartbeat_age),
                p.plane_version.clone(),
            ]
        })
        .collect();
    let mut out = format!("Drones ({}):\n", drones.len());
    if !drones.is_empty() {
        out.push_str(&render_table(
            &[
                "NAME",
                "POOL",
                "READY",
                "DRAINING",
                "BACKENDS",
                "EXECUTORS",
                "HEARTBEAT",
                "CONTROLLER",
                "VERSION",
            ],
            &drones,
        ));
    }
    out.push_str(&format!("Proxies ({}):\n", proxies.len()));
    if !proxies.is_empty() {
        out.push_str(&render_table(
            &["NAME", "CONTROLLER", "CONTROLLER HEARTBEAT", "VERSION"],
            &proxies,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(format_age(None), "-");
        assert_eq!(format_age(Some(12)), "12s");
        assert_eq!(format_age(Some(300)), "5m");
        assert_eq!(format_age(Some(7_300)), "2h");
        assert_eq!(format_age(Some(3 * 86_400 + 5)), "3d");
    }

    #[test]
    fn cluster_state_renders_as_a_table() {
        let state: ClusterState = serde_json::from_value(serde_json::json!({
            "drones": [{"ready": true, "draining": false, "last_heartbeat_age": 3, "backend_count": 2,
                "node": {"name": {"Drone": "dr-abc"}, "plane_version": "0.1.0", "plane_hash": "x",
                         "controller": "co-xyz", "controller_heartbeat_age": 4},
                "pool": "", "executors": ["process"]}],
            "proxies": [{"name": {"Proxy": "px-def"}, "plane_version": "0.1.0", "plane_hash": "x",
                "controller": null, "controller_heartbeat_age": null}]
        }))
        .unwrap();
        let text = render_cluster_state(&state);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Drones (1):");
        assert!(lines[1].starts_with("NAME    POOL  READY"), "{text}");
        assert!(lines[2].starts_with("dr-abc  -     yes"), "{text}");
        assert!(
            lines[2].contains("process") && lines[2].contains("co-xyz"),
            "{text}"
        );
        assert_eq!(lines[3], "Proxies (1):");
        assert!(lines[5].starts_with("px-def  -"), "{text}");
        let empty = render_cluster_state(&ClusterState::default());
        assert_eq!(empty, "Drones (0):\nProxies (0):\n");
    }
}
