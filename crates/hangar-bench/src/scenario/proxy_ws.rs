//! `proxy-ws`: N concurrent WebSockets to one test backend's echo endpoint, directly, through Hangar's
//! proxy and through nginx (when `nginx` is on `PATH`).
//!
//! - `direct_rtt` / `hangar_rtt` / `nginx_rtt`: every connection sends R small text messages, one
//!   every 100 ms (starts spread over the first 100 ms, so N connections make a steady 10·N messages
//!   per second), each timed until its echo arrives; one sample per round trip. The targets are
//!   measured one after the other, in that order, each with the same N and R after the same warm-up,
//!   while the others are idle. `hangar_rtt` and `nginx_rtt` have `direct_rtt` as baseline;
//!   `*_added_p50` / `*_added_p99` are a proxy's percentile minus direct's (Hangar's with nginx's as
//!   baseline when nginx ran, as in `proxy-http`), and `hangar_rtt_p50_vs_nginx` is Hangar's median
//!   with `nginx_rtt` as baseline (its ratio is Hangar's p50 over nginx's).
//! - nginx is the `proxy-http` configuration ([`crate::nginx`]): one worker per CPU, WebSocket
//!   upgrades forwarded to the same backend.
//! - Memory: the proxy runs as its own process (`hangar proxy`, the binary of this build's profile) so
//!   its resident memory (`VmRSS` of `/proc/<pid>/status`) can be read alone: at 0 open WebSockets
//!   (after a warm-up) and with M open idle ones (`--idle-tunnels`, default 5000, opened and closed
//!   before the round trips). `proxy_bytes_per_idle_ws` is the difference divided by M (each counts
//!   the client-side and the backend-side socket of the tunnel); `idle_ws_per_gib` is 1 GiB divided
//!   by that. RSS grows in steps of the allocator's heap (around a MiB), so with 1000 tunnels one
//!   step more or less moved the result by a third from run to run; 5000 make a step 5× smaller.
//!
//! The controller and drone run in this process and are idle during the measurement.

use super::{run_id, test_backend_executable, BenchOptions};
use crate::nginx::{self, Nginx};
use crate::process_usage::{rss_bytes, Pid};
use crate::proxy_process::SystemWithProxyProcess;
use crate::report::{Report, Summary, Unit};
use crate::system::{free_port, StoreKind, WAIT};
use anyhow::Context;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const DEFAULT_N: usize = 1000;
pub const DEFAULT_ROUND_TRIPS: usize = 20;
pub const DEFAULT_IDLE_TUNNELS: usize = 5000;
/// Connections being opened at once.
const OPEN_CONCURRENCY: usize = 64;
const WARM_UP_CONNECTIONS: usize = 16;
/// Time between two messages of one connection: N connections send N·10 messages per second.
const ROUND_TRIP_INTERVAL: Duration = Duration::from_millis(100);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Measured {
    /// Round-trip samples per target, in the order measured: direct, hangar, nginx (if it ran).
    rtt: Vec<(&'static str, Vec<Duration>)>,
    rss_idle: u64,
    rss_open: u64,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<Report> {
    let n = options.n.unwrap_or(DEFAULT_N).max(1);
    let round_trips = options.round_trips.unwrap_or(DEFAULT_ROUND_TRIPS);
    let idle_tunnels = options.idle_tunnels.unwrap_or(DEFAULT_IDLE_TUNNELS).max(1);
    let store = options.store.unwrap_or(StoreKind::Sqlite);
    let mut report = Report::new("proxy-ws");
    report.param("n", n);
    report.param("round_trips", round_trips);
    report.param("idle_tunnels", idle_tunnels);
    report.param("store", store.as_str());

    let mut running = SystemWithProxyProcess::start(store).await?;
    let sizes = Sizes {
        n,
        round_trips,
        idle_tunnels,
    };
    let measured = measure(&mut running, sizes, &mut report).await;
    let binary = running.binary.clone();
    running.shutdown().await;
    let m = measured?;

    add_round_trips(&mut report, &m.rtt);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.add_value("proxy_rss_idle", Unit::Mebibytes, mib(m.rss_idle), None);
    report.add_value(
        &format!("proxy_rss_with_{idle_tunnels}_ws"),
        Unit::Mebibytes,
        mib(m.rss_open),
        Some("proxy_rss_idle"),
    );
    let per_ws = m.rss_open.saturating_sub(m.rss_idle) as f64 / idle_tunnels as f64;
    report.add_value("proxy_bytes_per_idle_ws", Unit::Bytes, per_ws, None);
    if per_ws > 0.0 {
        report.add_value(
            "idle_ws_per_gib",
            Unit::Count,
            (1u64 << 30) as f64 / per_ws,
            None,
        );
    }
    report.note(format!(
        "proxy memory is the VmRSS of a separate `{}` process",
        binary.display()
    ));
    Ok(report)
}

#[derive(Clone, Copy)]
struct Sizes {
    n: usize,
    round_trips: usize,
    idle_tunnels: usize,
}

/// Every target's RTT with `direct_rtt` as baseline, then the latency each proxy adds (Hangar's
/// against nginx's when nginx ran).
fn add_round_trips(report: &mut Report, rtt: &[(&'static str, Vec<Duration>)]) {
    for (name, samples) in rtt {
        let baseline = (*name != "direct").then_some("direct_rtt");
        report.add_micros(&format!("{name}_rtt"), samples, baseline);
    }
    let summary = |target: &str| {
        rtt.iter()
            .find(|(name, _)| *name == target)
            .and_then(|(_, samples)| Summary::of_micros(samples))
    };
    let nginx = summary("nginx");
    if let (Some(hangar), Some(_)) = (summary("hangar"), nginx) {
        report.add_value(
            "hangar_rtt_p50_vs_nginx",
            Unit::Microseconds,
            hangar.median,
            Some("nginx_rtt"),
        );
    }
    let Some(direct) = summary("direct") else {
        return;
    };
    for name in ["hangar", "nginx"] {
        if let Some(s) = summary(name) {
            let baseline = (name == "hangar" && nginx.is_some()).then_some("nginx");
            report.add_added_latency(name, &s, &direct, baseline);
        }
    }
}

async fn measure(
    running: &mut SystemWithProxyProcess,
    sizes: Sizes,
    report: &mut Report,
) -> anyhow::Result<Measured> {
    let key = format!("proxy-ws-{}", run_id());
    let executable = test_backend_executable(&[])?;
    let (response, backend) = running.connect_routed(&key, executable).await?;
    let pid = Pid::Other(running.proxy.id()?);
    let proxy_url = format!("{}ws", response.url.replacen("http://", "ws://", 1));
    let direct_url = format!("ws://{backend}/ws");

    // Warm-up: a few tunnels opened, used and closed, so lazily allocated state exists before the
    // idle reading.
    close_all(open(&proxy_url, WARM_UP_CONNECTIONS).await?).await;
    let rss_idle = rss_bytes(pid)?;
    let idle = open(&proxy_url, sizes.idle_tunnels).await?;
    let rss_open = rss_bytes(pid)?;
    close_all(idle).await;

    let nginx = match nginx::find() {
        Some(binary) => Some(Nginx::start(&binary, free_port().await?, backend, sizes.n).await?),
        None => {
            report.note("nginx skipped: `nginx` is not on PATH");
            None
        }
    };
    let mut targets = vec![("direct", direct_url), ("hangar", proxy_url)];
    if let Some(nginx) = &nginx {
        targets.push(("nginx", format!("ws://{}/ws", nginx.addr)));
    }
    // On an error nginx is dropped, which kills it.
    let mut rtt = Vec::new();
    for (name, url) in targets {
        let samples = measure_target(&url, sizes).await;
        let samples = match &nginx {
            Some(nginx) if name == "nginx" => samples
                .with_context(|| format!("nginx's error log ends: {}", nginx.error_log_tail(3))),
            _ => samples,
        };
        rtt.push((
            name,
            samples.with_context(|| format!("{name}: round trips"))?,
        ));
    }
    if let Some(nginx) = nginx {
        nginx.stop().await;
    }
    Ok(Measured {
        rtt,
        rss_idle,
        rss_open,
    })
}

/// A warm-up (a few WebSockets opened, used and closed), then `n` WebSockets doing `round_trips`
/// timed echoes each.
async fn measure_target(url: &str, sizes: Sizes) -> anyhow::Result<Vec<Duration>> {
    close_all(open(url, WARM_UP_CONNECTIONS).await?).await;
    let mut sockets = open(url, sizes.n).await?;
    let samples = round_trip_all(&mut sockets, sizes.round_trips).await;
    close_all(sockets).await;
    samples
}

/// Opens `n` WebSockets to `url` (a few at a time), each checked with one echo.
async fn open(url: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    futures_util::stream::iter(0..n)
        .map(|_| async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .with_context(|| format!("opening a WebSocket to {url}"))?;
            round_trip(&mut ws).await?;
            anyhow::Ok(ws)
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await
}

/// Every socket does `round_trips` echoes, one every [`ROUND_TRIP_INTERVAL`], all sockets
/// concurrently; their starts are spread evenly over one interval so the load is steady.
async fn round_trip_all(sockets: &mut [Ws], round_trips: usize) -> anyhow::Result<Vec<Duration>> {
    let count = sockets.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    let runs = sockets.iter_mut().enumerate().map(|(i, ws)| async move {
        let mut samples = Vec::with_capacity(round_trips);
        let mut next = start + ROUND_TRIP_INTERVAL * (i as u32) / count;
        for _ in 0..round_trips {
            tokio::time::sleep_until(next).await;
            next += ROUND_TRIP_INTERVAL;
            samples.push(round_trip(ws).await?);
        }
        anyhow::Ok(samples)
    });
    let results = futures_util::future::try_join_all(runs).await?;
    Ok(results.into_iter().flatten().collect())
}

/// Sends one small text message and waits for its echo.
async fn round_trip(ws: &mut Ws) -> anyhow::Result<Duration> {
    const PAYLOAD: &str = "hangar-bench ping";
    let sent = Instant::now();
    ws.send(Message::text(PAYLOAD))
        .await
        .context("sending a WebSocket message")?;
    let echoed = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => anyhow::bail!("expected an echo, got {other:?}"),
            }
        }
    })
    .await
    .context("no echo in time")??;
    anyhow::ensure!(echoed.as_str() == PAYLOAD, "wrong echo {echoed:?}");
    Ok(sent.elapsed())
}

async fn close_all(sockets: Vec<Ws>) {
    let closes = sockets.into_iter().map(|mut ws| async move {
        let _ = ws.close(None).await;
    });
    futures_util::future::join_all(closes).await;
}
