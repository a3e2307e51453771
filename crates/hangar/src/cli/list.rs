//! `hangar list` (`ls`): the backends the controller knows, newest first, with filters (`GET
//! /ctrl/backends`); a table, or with `--json` the controller's answer as one document.

use super::admin::plane_time;
use super::cluster::render_table;
use super::Output;
use crate::cli::say;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_types::api::BackendSummary;
use hangar_types::{BackendStatus, ClusterName, KeyName};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only backends whose current status is this.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<BackendStatus>,
    /// Only backends of this cluster.
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Only backends of this key (in any namespace unless --namespace is given).
    #[arg(long)]
    pub key: Option<KeyName>,
    /// Only backends of keys in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// List at most this many backends (the newest).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
}

fn parse_status(s: &str) -> Result<BackendStatus, String> {
    s.parse().map_err(|_| {
        let names: Vec<&str> = BackendStatus::ALL.iter().map(|st| st.as_str()).collect();
        format!("unknown status {s:?}; one of {}", names.join(", "))
    })
}

impl ListArgs {
    /// The query parameters of `GET /ctrl/backends`.
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = vec![("limit", self.limit.to_string())];
        if let Some(status) = self.status {
            query.push(("status", status.as_str().to_string()));
        }
        if let Some(cluster) = &self.cluster {
            query.push(("cluster", cluster.to_string()));
        }
        if let Some(key) = &self.key {
            query.push(("key", key.to_string()));
        }
        if let Some(namespace) = &self.namespace {
            query.push(("namespace", namespace.clone()));
        }
        query
    }
}

/// `ID  KEY  STATUS  SINCE  CLUSTER  DRONE` rows.
pub fn render_backends(backends: &[BackendSummary]) -> String {
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            let key = if b.key.namespace.is_empty() {
                b.key.name.to_string()
            } else {
                format!("{}/{}", b.key.namespace, b.key.name)
            };
            let status = match b.termination_reason {
                Some(reason) => format!("{} ({reason})", b.status),
                None => b.status.to_string(),
            };
            vec![
                b.id.to_string(),
                key,
                status,
                plane_time(b.status_time),
                b.cluster.to_string(),
                b.drone.to_string(),
            ]
        })
        .collect();
    render_table(&["ID", "KEY", "STATUS", "SINCE", "CLUSTER", "DRONE"], &rows)
}

pub async fn list(
    client: &ControllerClient,
    args: ListArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let query: Vec<(&str, String)> = args.query();
    let list = client
        .list_backends(&query)
        .await
        .context("listing the backends")?;
    out.finish(&list, |list| {
        if list.backends.is_empty() {
            say!("No backends.");
        } else {
            print!("{}", render_backends(&list.backends));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ListArgs, clap::Error> {
        crate::parse_flags(args)
    }

    #[test]
    fn list_args_become_query_parameters() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.query(), vec![("limit", "100".to_string())]);
        let a = parse(&[
            "--status",
            "ready",
            "--cluster",
            "localhost:9090",
            "--key",
            "room 1",
            "--limit",
            "5",
        ])
        .unwrap();
        assert_eq!(
            a.query(),
            vec![
                ("limit", "5".to_string()),
                ("status", "ready".to_string()),
                ("cluster", "localhost:9090".to_string()),
                ("key", "room 1".to_string()),
            ]
        );
        let err = parse(&["--status", "sleeping"]).unwrap_err().to_string();
        assert!(err.contains("one of scheduled"), "{err}");
        assert!(parse(&["--limit", "0"]).is_err());
        assert!(parse(&["--limit", "1001"]).is_err());
        assert!(parse(&["--cluster", "not a cluster"]).is_err());
    }

    #[test]
    fn backends_render_as_a_table() {
        let backends: Vec<BackendSummary> = serde_json::from_value(serde_json::json!([
            {"id": "ba1", "cluster": "localhost:9090", "drone": "dr-abc",
             "key": {"name": "room", "namespace": "games", "tag": ""}, "status": "terminated",
             "status_time": 1_718_022_896_000_i64, "termination_reason": "swept",
             "created_at": 1_718_022_890_000_i64}
        ]))
        .unwrap();
        let text = render_backends(&backends);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID   KEY         STATUS"), "{text}");
        assert!(lines[1].contains("games/room"), "{text}");
        assert!(lines[1].contains("terminated (swept)"), "{text}");
        assert!(lines[1].contains("2024-06-10 12:34:56 UTC"), "{text}");
        assert!(lines[1].ends_with("dr-abc"), "{text}");
    }
}
