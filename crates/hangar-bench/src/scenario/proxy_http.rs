//! `proxy-http`: small GETs (`GET /`, a 30-byte body) to one running test backend over C keep-alive
//! HTTP/1.1 connections, N requests per target, through:
//!
//! - `direct`: the backend's own address (the baseline);
//! - `hangar`: Hangar's proxy (in this process) with the route cached, as after a client's first request;
//! - `nginx`: nginx as a reverse proxy with upstream keep-alive, when `nginx` is on `PATH`.
//!
//! Metrics: per-request latency and requests per second of each target (ratio against direct), and the
//! latency a proxy adds at p50 and p99 (its percentile minus direct's; Hangar's ratio is against
//! nginx's when nginx ran). The load generator runs on a thread of its own; each target gets an untimed
//! warm-up first.

use super::{on_load_thread, run_id, test_backend_executable, BenchOptions};
use crate::http_load::{run_http_load, HttpTarget, LoadOutcome};
use crate::nginx::{self, Nginx};
use crate::report::{Report, Summary, Unit};
use crate::system::{free_port, StoreKind, System, SystemConfig};
use anyhow::Context;
use hangar_types::BackendStatus;
use std::net::SocketAddr;

pub const DEFAULT_N: usize = 30_000;
pub const DEFAULT_CONCURRENCY: usize = 16;
const WARM_UP_REQUESTS: usize = 500;

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let n = options.n.unwrap_or(DEFAULT_N);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let mut report = Report::new("proxy-http");
    report.param("n", n);
    report.param("concurrency", concurrency);
    report.param("store", store.as_str());

    let system = System::start(&SystemConfig::new(store)).await?;
    let measured = measure(&system, n, concurrency, &mut report).await;
    system.shutdown().await;
    let outcomes = measured?;

    let direct = find(&outcomes, "direct");
    let nginx_ran = find(&outcomes, "nginx").is_some();
    for (name, outcome) in &outcomes {
        let baseline = (*name != "direct").then_some("direct_latency");
        report.add_micros(&format!("{name}_latency"), &outcome.latencies, baseline);
        let baseline = (*name != "direct").then_some("direct_requests_per_s");
        report.add_value(
            &format!("{name}_requests_per_s"),
            Unit::PerSecond,
            outcome.per_second(),
            baseline,
        );
        if outcome.errors > 0 {
            report.note(format!("{name}: {} requests failed", outcome.errors));
        }
    }
    if let Some(direct) = direct.and_then(micros_summary) {
        for (name, outcome) in &outcomes {
            let Some(s) = (*name != "direct")
                .then(|| micros_summary(outcome))
                .flatten()
            else {
                continue;
            };
            let baseline =
                |p: &str| (nginx_ran && *name == "hangar").then(|| format!("nginx_added_{p}"));
            report.add_value(
                &format!("{name}_added_p50"),
                Unit::Microseconds,
                s.median - direct.median,
                baseline("p50").as_deref(),
            );
            report.add_value(
                &format!("{name}_added_p99"),
                Unit::Microseconds,
                s.p99 - direct.p99,
                baseline("p99").as_deref(),
            );
        }
    }
    Ok(report)
}

fn find<'a>(outcomes: &'a [(&str, LoadOutcome)], name: &str) -> Option<&'a LoadOutcome> {
    outcomes.iter().find(|(n, _)| *n == name).map(|(_, o)| o)
}

fn micros_summary(outcome: &LoadOutcome) -> Option<Summary> {
    let us: Vec<f64> = outcome
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    Summary::of(&us)
}

async fn measure(
    system: &System,
    n: usize,
    concurrency: usize,
    report: &mut Report,
) -> anyhow::Result<Vec<(&'static str, LoadOutcome)>> {
    let request = system.connect_request(
        &format!("proxy-http-{}", run_id()),
        test_backend_executable(&[])?,
    )?;
    let response = system.client.connect(&request).await?;
    system
        .wait_for_status(&response.backend_id, BackendStatus::Ready)
        .await?;
    let backend = system.backend_address(&response.backend_id).await?;
    let url = url::Url::parse(&response.url).context("connect response URL")?;
    let proxy_port = system.cluster.port().context("cluster has no port")?;
    let mut targets = vec![
        (
            "direct",
            HttpTarget {
                addr: backend,
                host: backend.to_string(),
                path: "/".into(),
            },
        ),
        (
            "hangar",
            HttpTarget {
                addr: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
                host: system.cluster.to_string(),
                path: url.path().to_string(),
            },
        ),
    ];
    let nginx = match nginx::find() {
        Some(binary) => {
            let nginx = Nginx::start(&binary, free_port().await?, backend).await?;
            targets.push((
                "nginx",
                HttpTarget {
                    addr: nginx.addr,
                    host: nginx.addr.to_string(),
                    path: "/".into(),
                },
            ));
            Some(nginx)
        }
        None => {
            report.note("nginx skipped: `nginx` is not on PATH");
            None
        }
    };
    let measured = on_load_thread(move || async move {
        let mut outcomes = Vec::new();
        for (name, target) in targets {
            let warm_up = run_http_load(&target, WARM_UP_REQUESTS, concurrency).await?;
            anyhow::ensure!(
                warm_up.errors == 0,
                "{name}: {} warm-up requests to {} failed",
                warm_up.errors,
                target.addr
            );
            outcomes.push((name, run_http_load(&target, n, concurrency).await?));
        }
        Ok(outcomes)
    })
    .await;
    if let Some(nginx) = nginx {
        let nginx_failed = measured
            .as_ref()
            .ok()
            .and_then(|outcomes| find(outcomes, "nginx"))
            .is_some_and(|o| o.errors > 0);
        if nginx_failed {
            report.note(format!("nginx error log: {}", nginx.error_log_tail(3)));
        }
        nginx.stop().await;
    }
    measured
}
