//! `proxy-http`: small GETs (`GET /`, a 30-byte body) to one running test backend over C keep-alive
//! HTTP/1.1 connections, N requests per target, through:
//!
//! - `direct`: the backend's own address (the baseline);
//! - `hangar`: Hangar's proxy with the route cached, as after a client's first request. It runs as a
//!   child process (`hangar proxy`, like `proxy-ws`), so its CPU time can be read alone and it has a
//!   runtime of its own, as nginx has its own processes;
//! - `nginx`: nginx as a reverse proxy with upstream keep-alive, when `nginx` is on `PATH`.
//!
//! Two passes: C connections (default 16), then one connection (`c1_` metrics, N/3 requests), where
//! latency is not queueing. Within a pass the targets take turns: each target's requests are sent in
//! R rounds (`--rounds`, default 3), and round r starts with the target after the one that started
//! round r − 1 (direct, hangar, nginx; then hangar, nginx, direct; …). A target's figures are over all
//! its rounds (requests ÷ the sum of its rounds' times, CPU summed), so a machine whose speed drifts
//! during the run (on a shared VM the direct rate moved by a third between runs) moves every target
//! alike instead of whichever ran last.
//!
//! Metrics: per-request latency and requests per second of each target (ratio against direct), the
//! latency a proxy adds at p50 and p99 (its percentile minus direct's; Hangar's ratio is against
//! nginx's when nginx ran), and each proxy's CPU time per request: utime + stime (`/proc/<pid>/stat`)
//! of the `hangar proxy` process, or of nginx's master and workers, read before and after the timed
//! requests. The load generator runs on a thread of its own; each target gets an untimed warm-up first.

use super::{on_load_thread, run_id, BenchOptions};
use crate::http_load::{run_http_load, HttpTarget, LoadOutcome};
use crate::nginx::{self, Nginx};
use crate::process_usage::cpu_time_with_children;
use crate::proxy_process::SystemWithProxyProcess;
use crate::report::{Report, Summary, Unit};
use crate::system::{free_port, StoreKind, System};
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;

pub const DEFAULT_N: usize = 30_000;
pub const DEFAULT_CONCURRENCY: usize = 16;
pub const DEFAULT_ROUNDS: usize = 3;
const WARM_UP_REQUESTS: usize = 500;

/// One target's timed requests.
struct Measured {
    load: LoadOutcome,
    /// CPU time the proxy process(es) used during them (proxies only).
    cpu: Option<Duration>,
}

impl Measured {
    /// `self` and a later round of the same target, as one measurement: every request's latency,
    /// the rounds' times and CPU times summed.
    fn and(mut self, round: Measured) -> Measured {
        self.load.latencies.extend(round.load.latencies);
        self.load.errors += round.load.errors;
        self.load.elapsed += round.load.elapsed;
        self.cpu = match (self.cpu, round.cpu) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self
    }
}

/// Requests of round `round` when `n` are sent in `rounds`: as even as possible, `n` in all.
fn round_share(n: usize, rounds: usize, round: usize) -> usize {
    n / rounds + usize::from(round < n % rounds)
}

/// All targets at one concurrency.
struct Pass {
    /// Metric name prefix: empty for the main pass, `c1_` for one connection.
    prefix: &'static str,
    targets: Vec<(&'static str, Measured)>,
}

/// A target and the process whose CPU time it costs.
struct Target {
    name: &'static str,
    http: HttpTarget,
    cpu_pid: Option<u32>,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let n = options.n.unwrap_or(DEFAULT_N);
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1);
    let rounds = options.rounds.unwrap_or(DEFAULT_ROUNDS).max(1);
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let mut report = Report::new("proxy-http");
    report.param("n", n);
    report.param("concurrency", concurrency);
    report.param("rounds", rounds);
    report.param("store", store.as_str());

    let mut running = SystemWithProxyProcess::start(store).await?;
    let measured = measure(&mut running, n, concurrency, rounds, &mut report).await;
    running.shutdown().await;
    for pass in measured? {
        add_pass(&mut report, &pass);
    }
    report.note("proxy CPU: utime + stime of the `hangar proxy` process / nginx master + workers");
    Ok(report)
}

fn add_pass(report: &mut Report, pass: &Pass) {
    let p = pass.prefix;
    let find = |name: &str| pass.targets.iter().find(|(n, _)| *n == name);
    let nginx_ran = find("nginx").is_some();
    let hangar_baseline = |metric: &str| (nginx_ran).then(|| format!("{p}nginx_{metric}"));
    for (name, measured) in &pass.targets {
        let outcome = &measured.load;
        let direct = |metric: &str| (*name != "direct").then(|| format!("{p}direct_{metric}"));
        report.add_micros(
            &format!("{p}{name}_latency"),
            &outcome.latencies,
            direct("latency").as_deref(),
        );
        report.add_value(
            &format!("{p}{name}_requests_per_s"),
            Unit::PerSecond,
            outcome.per_second(),
            direct("requests_per_s").as_deref(),
        );
        if outcome.errors > 0 {
            report.note(format!("{p}{name}: {} requests failed", outcome.errors));
        }
        if let Some(cpu) = measured.cpu {
            let requests = (outcome.latencies.len() + outcome.errors).max(1);
            let baseline = (*name == "hangar")
                .then(|| hangar_baseline("cpu_us_per_request"))
                .flatten();
            report.add_value(
                &format!("{p}{name}_cpu_us_per_request"),
                Unit::Microseconds,
                cpu.as_secs_f64() * 1e6 / requests as f64,
                baseline.as_deref(),
            );
        }
    }
    let Some(direct) = find("direct").and_then(|(_, m)| Summary::of_micros(&m.load.latencies))
    else {
        return;
    };
    let nginx = nginx_ran.then(|| format!("{p}nginx"));
    for (name, measured) in &pass.targets {
        let Some(s) = (*name != "direct")
            .then(|| Summary::of_micros(&measured.load.latencies))
            .flatten()
        else {
            continue;
        };
        let baseline = (*name == "hangar").then_some(nginx.as_deref()).flatten();
        report.add_added_latency(&format!("{p}{name}"), &s, &direct, baseline);
    }
}

async fn measure(
    running: &mut SystemWithProxyProcess,
    n: usize,
    concurrency: usize,
    rounds: usize,
    report: &mut Report,
) -> anyhow::Result<Vec<Pass>> {
    let key = format!("proxy-http-{}", run_id());
    let executable = super::test_backend_executable(&[])?;
    let (response, backend) = running.connect_routed(&key, executable).await?;
    let url = url::Url::parse(&response.url).context("connect response URL")?;
    let mut targets = vec![
        Target {
            name: "direct",
            http: HttpTarget {
                addr: backend,
                host: backend.to_string(),
                path: "/".into(),
            },
            cpu_pid: None,
        },
        hangar_target(&running.system, &url, running.proxy.id()?)?,
    ];
    let nginx = match nginx::find() {
        Some(binary) => {
            let nginx = Nginx::start(&binary, free_port().await?, backend, concurrency).await?;
            targets.push(Target {
                name: "nginx",
                http: HttpTarget {
                    addr: nginx.addr,
                    host: nginx.addr.to_string(),
                    path: "/".into(),
                },
                cpu_pid: Some(nginx.pid()?),
            });
            Some(nginx)
        }
        None => {
            report.note("nginx skipped: `nginx` is not on PATH");
            None
        }
    };
    let mut passes = vec![("", concurrency, n)];
    if concurrency > 1 {
        passes.push(("c1_", 1, (n / 3).max(1)));
    }
    let measured = on_load_thread(move || async move {
        let mut done = Vec::new();
        for (prefix, concurrency, n) in passes {
            let mut measured: Vec<Option<Measured>> = targets.iter().map(|_| None).collect();
            for round in 0..rounds {
                let requests = round_share(n, rounds, round);
                if requests == 0 {
                    continue;
                }
                for turn in 0..targets.len() {
                    let index = (round + turn) % targets.len();
                    let this = measure_target(&targets[index], requests, concurrency).await?;
                    let total = &mut measured[index];
                    *total = Some(match total.take() {
                        Some(so_far) => so_far.and(this),
                        None => this,
                    });
                }
            }
            let targets = targets.iter().zip(measured);
            done.push(Pass {
                prefix,
                targets: targets
                    .filter_map(|(target, m)| Some((target.name, m?)))
                    .collect(),
            });
        }
        Ok(done)
    })
    .await;
    if let Some(nginx) = nginx {
        let nginx_failed = measured.as_ref().ok().is_some_and(|passes| {
            passes
                .iter()
                .flat_map(|p| &p.targets)
                .any(|(name, m)| *name == "nginx" && m.load.errors > 0)
        });
        if nginx_failed {
            report.note(format!("nginx error log: {}", nginx.error_log_tail(3)));
        }
        nginx.stop().await;
    }
    measured
}

fn hangar_target(system: &System, url: &url::Url, pid: u32) -> anyhow::Result<Target> {
    let port = system.cluster.port().context("cluster has no port")?;
    Ok(Target {
        name: "hangar",
        http: HttpTarget {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            host: system.cluster.to_string(),
            path: url.path().to_string(),
        },
        cpu_pid: Some(pid),
    })
}

/// An untimed warm-up, then `n` timed requests over `concurrency` connections.
async fn measure_target(target: &Target, n: usize, concurrency: usize) -> anyhow::Result<Measured> {
    let warm_up = run_http_load(&target.http, WARM_UP_REQUESTS, concurrency).await?;
    anyhow::ensure!(
        warm_up.errors == 0,
        "{}: {} warm-up requests to {} failed",
        target.name,
        warm_up.errors,
        target.http.addr
    );
    let cpu_before = target.cpu_pid.map(cpu_time_with_children).transpose()?;
    let load = run_http_load(&target.http, n, concurrency).await?;
    let cpu = match (target.cpu_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_time_with_children(pid)?.saturating_sub(before)),
        _ => None,
    };
    Ok(Measured { load, cpu })
}

#[cfg(test)]
mod tests {
    use super::round_share;

    #[test]
    fn rounds_share_the_requests_evenly_and_exactly() {
        for (n, rounds) in [(30_000, 3), (50, 3), (16, 3), (2, 3), (7, 1)] {
            let shares: Vec<usize> = (0..rounds).map(|r| round_share(n, rounds, r)).collect();
            assert_eq!(
                shares.iter().sum::<usize>(),
                n,
                "{n} in {rounds}: {shares:?}"
            );
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "{n} in {rounds}: {shares:?}");
        }
    }
}
