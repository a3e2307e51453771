//! Memory per idle client connection of the controller and of the proxy, each a separate `hangar`
//! process: `cargo run -p hangar-bench --example idle_connections [--release] -- [N]` (default
//! 3000). For each process it reads `VmRSS` (`/proc/<pid>/status`) after a warm-up, then with N
//! connections open that sent nothing yet ("silent"), then with N keep-alive connections that each
//! finished one request and wait for the next ("after one request"). Prints bytes per connection.
//! A measurement, not a test: see BENCHMARKS.md.

// A measuring program: failing loudly on the first unexpected condition is what it should do.
#![allow(clippy::unwrap_used)]

use anyhow::Context;
use hangar_bench::child::ChildProcess;
use hangar_bench::process_usage::{rss_bytes, Pid};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections opened at once while filling up (both servers' defaults allow far more).
const OPEN_BATCH: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("N must be a number")?,
        None => 3000,
    };
    let hangar = hangar_bench::binaries::hangar()?;
    let dir = tempfile::tempdir()?;
    let controller_port = free_port().await?;
    let proxy_port = free_port().await?;
    let mut command = tokio::process::Command::new(&hangar);
    command
        .arg("controller")
        .arg("--db")
        .arg(dir.path().join("bench.db"))
        .arg("--port")
        .arg(controller_port.to_string())
        .env("RUST_LOG", "warn");
    let mut controller = ChildProcess::spawn("hangar controller", command)?;
    let controller_addr: SocketAddr = ([127, 0, 0, 1], controller_port).into();
    wait_for_answer(
        controller_addr,
        b"GET /pub/health HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await?;
    let mut command = tokio::process::Command::new(&hangar);
    command
        .arg("proxy")
        .arg("--controller-url")
        .arg(format!("http://{controller_addr}/"))
        .arg("--cluster")
        .arg(format!("localhost:{proxy_port}"))
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--http-port")
        .arg(proxy_port.to_string())
        .env("RUST_LOG", "warn");
    let mut proxy = ChildProcess::spawn("hangar proxy", command)?;
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], proxy_port).into();
    let proxy_request = format!("GET /ready HTTP/1.1\r\nhost: localhost:{proxy_port}\r\n\r\n");
    wait_for_answer(proxy_addr, proxy_request.as_bytes()).await?;

    println!("{:<12} {:>22} {:>22}", "", "silent", "after one request");
    for (what, child, addr, request) in [
        (
            "controller",
            &mut controller,
            controller_addr,
            b"GET /pub/health HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        ),
        ("proxy", &mut proxy, proxy_addr, proxy_request.into_bytes()),
    ] {
        let pid = Pid::Other(child.id()?);
        let silent = per_connection(pid, addr, n, None).await?;
        let after = per_connection(pid, addr, n, Some(&request)).await?;
        child.check_running()?;
        println!("{what:<12} {:>16.0} B/conn {:>16.0} B/conn", silent, after);
    }
    controller.stop().await;
    proxy.stop().await;
    Ok(())
}

/// RSS growth per connection with `n` connections open to `addr`, each having sent `request` and
/// read its answer's first bytes (or nothing).
async fn per_connection(
    pid: Pid,
    addr: SocketAddr,
    n: usize,
    request: Option<&[u8]>,
) -> anyhow::Result<f64> {
    // Warm-up: lazily allocated state (thread caches, buffers) exists before the first reading.
    drop(open(addr, OPEN_BATCH, request).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let connections = open(addr, n, request).await?;
    // Let the server finish its work for the last ones (each connection has answered already
    // when a request was sent; silent ones only need to be accepted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid)?;
    drop(connections);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

async fn open(
    addr: SocketAddr,
    n: usize,
    request: Option<&[u8]>,
) -> anyhow::Result<Vec<TcpStream>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = OPEN_BATCH.min(n - all.len());
        let opened = futures_util::future::try_join_all((0..batch).map(|_| async move {
            let mut stream = TcpStream::connect(addr).await?;
            if let Some(request) = request {
                stream.write_all(request).await?;
                let mut head = [0u8; 12];
                stream.read_exact(&mut head).await?;
                anyhow::ensure!(&head == b"HTTP/1.1 200", "unexpected answer {head:?}");
                // Read the rest of this small answer, so the next reading is of an idle connection.
                let mut rest = [0u8; 4096];
                let _ =
                    tokio::time::timeout(Duration::from_millis(50), stream.read(&mut rest)).await;
            }
            Ok::<_, anyhow::Error>(stream)
        }))
        .await?;
        all.extend(opened);
    }
    Ok(all)
}

async fn wait_for_answer(addr: SocketAddr, request: &[u8]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(request).await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            anyhow::ensure!(&head == b"HTTP/1.1 200", "not ready: {head:?}");
            Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).with_context(|| format!("{addr} never answered"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn free_port() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}
