//! Runs every scenario at a tiny size and checks the report's shape: the expected metrics are there,
//! with the right sample counts and sane (finite, non-negative) values. No timing is asserted.
//!
//! The scenarios run one at a time (a shared lock): they measure the whole process (RSS, CPU, SQL
//! statement counts), so running them side by side would mix their numbers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_bench::{BenchOptions, Report, Scenario, StoreKind};
use std::time::Duration;

/// Generous: a first run may build `hangar` and `hangar-test-backend`.
const TEST_TIMEOUT: Duration = Duration::from_secs(900);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(scenario: Scenario, options: BenchOptions) -> Report {
    hangar_bench::sql_statements::install_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let report = tokio::time::timeout(TEST_TIMEOUT, hangar_bench::run(scenario, &options))
        .await
        .expect("scenario timed out")
        .unwrap_or_else(|e| panic!("scenario failed: {e:#}"));
    println!("{}", report.table());
    assert_eq!(report.scenario, scenario.as_str());
    for m in &report.metrics {
        let s = &m.summary;
        for v in [s.median, s.p90, s.p99, s.max] {
            assert!(v.is_finite(), "{} has a non-finite value: {m:?}", m.name);
        }
        assert!(
            s.median <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.max,
            "{} percentiles out of order: {m:?}",
            m.name
        );
        assert!(s.samples > 0);
        if let Some(ratio) = m.ratio {
            assert!(ratio.is_finite(), "{}: ratio {ratio}", m.name);
        }
    }
    // The JSON report round-trips.
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.metrics.len(), report.metrics.len());
    report
}

fn metric<'a>(report: &'a Report, name: &str) -> &'a hangar_bench::Metric {
    report.metric(name).unwrap_or_else(|| {
        let names: Vec<&str> = report.metrics.iter().map(|m| m.name.as_str()).collect();
        panic!("metric {name} missing; have {names:?}")
    })
}

/// A duration/size metric: `samples` values, none negative, ratio present iff a baseline is named.
fn check(report: &Report, name: &str, samples: usize) {
    let m = metric(report, name);
    assert_eq!(m.summary.samples, samples, "{name}: {m:?}");
    assert!(m.summary.median >= 0.0, "{name}: {m:?}");
    assert_eq!(m.ratio.is_some(), m.baseline.is_some(), "{name}: {m:?}");
}

fn options(n: usize) -> BenchOptions {
    BenchOptions {
        n: Some(n),
        concurrency: Some(2),
        ..BenchOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_warm_scenario_reports_claims_beside_cold_spawns() {
    let report = run(
        Scenario::Spawn,
        BenchOptions {
            warm: true,
            ..options(2)
        },
    )
    .await;
    check(&report, "reconnect", 4);
    for name in [
        "claim_connect_to_ready",
        "claim_hook_connect_to_ready",
        "claim_connect_to_first_response",
        "cold_connect_to_ready",
    ] {
        check(&report, name, 2);
        assert_eq!(metric(&report, name).baseline.as_deref(), Some("reconnect"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_scenario_reports_each_spawn() {
    let report = run(Scenario::Spawn, options(3)).await;
    for name in [
        "direct_start_to_http",
        "connect_to_ready",
        "connect_to_first_response",
        "connect_call",
    ] {
        check(&report, name, 3);
    }
    assert!(metric(&report, "connect_to_ready").summary.median > 0.0);
    assert_eq!(
        metric(&report, "connect_to_ready").baseline.as_deref(),
        Some("direct_start_to_http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_scenario_with_docker_measures_or_says_why_not() {
    let report = run(
        Scenario::Spawn,
        BenchOptions {
            executor: Some(hangar_types::executable::ExecutorKind::Docker),
            ..options(2)
        },
    )
    .await;
    if report.metrics.is_empty() {
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("docker spawn skipped")),
            "{:?}",
            report.notes
        );
    } else {
        check(&report, "connect_to_ready", 2);
        check(&report, "direct_start_to_http", 2);
        check(&report, "docker_cli_start_to_http", 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_scenario_reports_every_call() {
    let report = run(
        Scenario::Reconnect,
        BenchOptions {
            store: Some(StoreKind::Sqlite),
            ..options(20)
        },
    )
    .await;
    check(&report, "sqlite_reconnect", 20);
    check(&report, "sqlite_health", 20);
    check(&report, "sqlite_reconnect_calls_per_s", 1);
    assert!(
        metric(&report, "sqlite_reconnect_calls_per_s")
            .summary
            .median
            > 0.0
    );
    assert!(
        report.notes.iter().all(|n| !n.contains("failed")),
        "{:?}",
        report.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_scenario_on_postgres_when_configured() {
    if hangar_bench::postgres_db::server_url().is_none() {
        eprintln!(
            "skipping: {} is not set",
            hangar_bench::postgres_db::URL_VAR
        );
        return;
    }
    let report = run(
        Scenario::Reconnect,
        BenchOptions {
            store: Some(StoreKind::Postgres),
            ..options(10)
        },
    )
    .await;
    check(&report, "postgres_reconnect", 10);
    check(&report, "postgres_health", 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_http_scenario_reports_every_request() {
    let report = run(Scenario::ProxyHttp, options(50)).await;
    check(&report, "direct_latency", 50);
    check(&report, "hangar_latency", 50);
    check(&report, "hangar_requests_per_s", 1);
    // Added latency may be negative by noise; it only has to be there.
    assert!(metric(&report, "hangar_added_p50")
        .summary
        .median
        .is_finite());
    if hangar_bench::nginx::find().is_some() {
        check(&report, "nginx_latency", 50);
    }
    assert!(
        report.notes.iter().all(|n| !n.contains("failed")),
        "{:?}",
        report.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_ws_scenario_reports_round_trips_and_memory() {
    let report = run(
        Scenario::ProxyWs,
        BenchOptions {
            round_trips: Some(2),
            ..options(3)
        },
    )
    .await;
    check(&report, "direct_rtt", 6);
    check(&report, "hangar_rtt", 6);
    check(&report, "proxy_rss_idle", 1);
    check(&report, "proxy_rss_with_3_ws", 1);
    check(&report, "proxy_bytes_per_idle_ws", 1);
    assert!(metric(&report, "proxy_rss_idle").summary.median > 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_scenario_reports_spawns_and_statements() {
    let report = run(
        Scenario::ControlPlane,
        BenchOptions {
            drones: Some(2),
            steady_seconds: Some(1),
            ..options(6)
        },
    )
    .await;
    check(&report, "connect_call", 6);
    check(&report, "connect_to_ready", 6);
    check(&report, "health", 6);
    check(&report, "connect_to_ready_unloaded", 6);
    check(&report, "health_unloaded", 6);
    check(&report, "spawns_per_s", 1);
    check(&report, "steady_cpu", 1);
    check(&report, "rss_with_backends", 1);
    let statements = metric(&report, "statements_per_connect").summary.median;
    // A connect stores a backend, a key, a token and an action, and four state changes: many statements.
    assert!(statements >= 3.0, "statements per connect: {statements}");
    assert!(
        report.notes.iter().all(|n| !n.contains("failed")),
        "{:?}",
        report.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logging_backend_run_is_reported_beside_the_quiet_one() {
    let report = run(
        Scenario::ProxyHttp,
        BenchOptions {
            backend_logs_per_s: Some(1000),
            ..options(50)
        },
    )
    .await;
    check(&report, "hangar_latency", 50);
    check(&report, "logging_hangar_latency", 50);
    assert_eq!(
        metric(&report, "logging_hangar_requests_per_s")
            .baseline
            .as_deref(),
        Some("hangar_requests_per_s")
    );
    assert_eq!(report.params["backend_logs_per_s"], 1000);
}
