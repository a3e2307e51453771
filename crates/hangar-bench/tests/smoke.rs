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

/// Each metric of `names` has `samples` values ([`check`]).
fn check_each(report: &Report, names: &[&str], samples: usize) {
    for name in names {
        check(report, name, samples);
    }
}

/// No note of the report says something failed.
fn assert_nothing_failed(report: &Report) {
    let failed: Vec<&String> = report
        .notes
        .iter()
        .filter(|n| n.contains("failed"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// The reconnect scenario on `store` with `n` calls, checked for its `n` reconnects and health calls
/// (metrics named with `prefix`).
async fn reconnect_report(store: StoreKind, prefix: &str, n: usize) -> Report {
    let report = run_with(Scenario::Reconnect, n, |o| o.store = Some(store)).await;
    check_each(
        &report,
        &[&format!("{prefix}_reconnect"), &format!("{prefix}_health")],
        n,
    );
    report
}

fn options(n: usize) -> BenchOptions {
    BenchOptions {
        n: Some(n),
        concurrency: Some(2),
        ..BenchOptions::default()
    }
}

/// [`run`] with [`options`] changed by `adjust`.
async fn run_with(scenario: Scenario, n: usize, adjust: impl FnOnce(&mut BenchOptions)) -> Report {
    let mut options = options(n);
    adjust(&mut options);
    run(scenario, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_warm_scenario_reports_claims_beside_cold_spawns() {
    let report = run_with(Scenario::Spawn, 2, |o| o.warm = true).await;
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
    let report = run_with(Scenario::Spawn, 2, |o| {
        o.executor = Some(hangar_types::executable::ExecutorKind::Docker)
    })
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
    let report = reconnect_report(StoreKind::Sqlite, "sqlite", 20).await;
    check(&report, "sqlite_reconnect_calls_per_s", 1);
    assert!(
        metric(&report, "sqlite_reconnect_calls_per_s")
            .summary
            .median
            > 0.0
    );
    assert_nothing_failed(&report);
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
    reconnect_report(StoreKind::Postgres, "postgres", 10).await;
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
    assert_nothing_failed(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_ws_scenario_reports_round_trips_and_memory() {
    let report = run_with(Scenario::ProxyWs, 3, |o| {
        o.round_trips = Some(2);
        o.idle_tunnels = Some(3);
    })
    .await;
    check_each(&report, &["direct_rtt", "hangar_rtt"], 6);
    if hangar_bench::nginx::find().is_some() {
        check(&report, "nginx_rtt", 6);
    }
    let memory = [
        "proxy_rss_idle",
        "proxy_rss_with_3_ws",
        "proxy_bytes_per_idle_ws",
    ];
    check_each(&report, &memory, 1);
    assert!(metric(&report, "proxy_rss_idle").summary.median > 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_scenario_reports_spawns_and_statements() {
    let report = run_with(Scenario::ControlPlane, 6, |o| {
        o.drones = Some(2);
        o.steady_seconds = Some(1);
    })
    .await;
    let calls = [
        "connect_call",
        "connect_to_ready",
        "health",
        "connect_to_ready_unloaded",
        "health_unloaded",
    ];
    check_each(&report, &calls, 6);
    check_each(
        &report,
        &["spawns_per_s", "steady_cpu", "rss_with_backends"],
        1,
    );
    let statements = metric(&report, "statements_per_connect").summary.median;
    // A connect stores a backend, a key, a token and an action, and four state changes: many statements.
    assert!(statements >= 3.0, "statements per connect: {statements}");
    assert_nothing_failed(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logging_backend_run_is_reported_beside_the_quiet_one() {
    let report = run_with(Scenario::ProxyHttp, 50, |o| {
        o.backend_logs_per_s = Some(1000)
    })
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
