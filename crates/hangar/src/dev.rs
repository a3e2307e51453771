//! `hangar dev`: controller + one drone + proxy in one process, on an embedded SQLite store. The
//! quickstart and the single-machine deployment. The drone runs local processes, and Docker
//! containers too when a Docker engine answers (the banner says which).
//!
//! Order matters: both listeners are bound before anything starts (a busy port fails fast and
//! leaves nothing behind); on SIGINT/SIGTERM the proxy stops first (no new traffic), then the drone
//! (which terminates its backends), then the controller, then the store.

use crate::cli::say;
use crate::serve::{bind_listener, local_url};
use crate::shutdown::StopSignals;
use anyhow::Context;
use clap::Args;
use hangar_client::ControllerClient;
use hangar_controller::ControllerConfig;
use hangar_drone::DroneConfig;
use hangar_proxy::ProxyConfig;
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::executable::ExecutorKind;
use hangar_types::{ClusterName, DroneName};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How long `hangar dev` waits for its drone to register before printing the banner anyway.
const DRONE_REGISTRATION_WAIT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the drone to register.
const DRONE_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// File in the data directory that keeps the drone's name, so a restarted `hangar dev` re-adopts
/// the backends recorded in `drone.db` under the same name.
const DRONE_NAME_FILE: &str = "drone-name";

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory for the database (`hangar.db`) and the drone's state (`drone.db`). Default: the
    /// platform's local data directory + `/hangar` (e.g. `~/.local/share/hangar`).
    #[arg(long, env = "HANGAR_DEV_DATA_DIR", conflicts_with = "in_memory")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long)]
    pub in_memory: bool,
    /// Address the controller and the proxy listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Controller port.
    #[arg(long, default_value_t = 8080)]
    pub controller_port: u16,
    /// Proxy port.
    #[arg(long, default_value_t = 9090)]
    pub proxy_port: u16,
    /// Cluster name used in backend URLs. Default: `localhost:<proxy port>`.
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Where the proxy serves its Prometheus metrics (`GET /metrics`). The controller's are at
    /// `<controller>/metrics`.
    #[arg(
        long,
        env = "HANGAR_PROXY_METRICS_ADDR",
        default_value = "127.0.0.1:9091"
    )]
    pub proxy_metrics_addr: SocketAddr,
    /// Where the drone serves its Prometheus metrics (`GET /metrics`).
    #[arg(
        long,
        env = "HANGAR_DRONE_METRICS_ADDR",
        default_value = "127.0.0.1:9092"
    )]
    pub drone_metrics_addr: SocketAddr,
    /// Plane's forward auth on the controller (see `hangar controller --help`). The dev drone and
    /// proxy connect without credentials, so the auth service must admit their sockets
    /// (`x-original-path: /c/<cluster>/drone-socket` and `/proxy-socket`).
    #[arg(long, env = "HANGAR_FORWARD_AUTH")]
    pub forward_auth: Option<Url>,
    /// PEM file of extra CA certificates to trust for an `https://` --forward-auth URL.
    #[arg(long, env = "HANGAR_FORWARD_AUTH_CA_CERT", requires = "forward_auth")]
    pub forward_auth_ca_cert: Option<PathBuf>,
}

/// Where `hangar dev` keeps its files; `None` in memory.
fn data_dir(args: &DevArgs) -> anyhow::Result<Option<PathBuf>> {
    if args.in_memory {
        return Ok(None);
    }
    let dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => dirs::data_local_dir()
            .context("cannot find a local data directory; pass --data-dir DIR or --in-memory")?
            .join("hangar"),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    Ok(Some(dir))
}

/// The drone's name: kept in the data directory across restarts, fresh in memory mode.
fn drone_name(data_dir: Option<&Path>) -> anyhow::Result<DroneName> {
    let Some(dir) = data_dir else {
        return Ok(DroneName::random());
    };
    let path = dir.join(DRONE_NAME_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().with_context(|| {
            format!(
                "{} does not hold a drone name; delete it to get a new one",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = DroneName::random();
            std::fs::write(&path, format!("{name}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(name)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let cluster = match &args.cluster {
        Some(c) => c.clone(),
        None => format!("localhost:{}", args.proxy_port)
            .parse()
            .context("building the default cluster name")?,
    };
    let data_dir = data_dir(&args)?;
    let drone_name = drone_name(data_dir.as_deref())?;

    // Bind first: a busy port is reported before anything is started.
    let controller_listener = bind_listener(
        SocketAddr::new(args.host, args.controller_port),
        "controller",
        "--controller-port",
    )
    .await?;
    let proxy_listener = bind_listener(
        SocketAddr::new(args.host, args.proxy_port),
        "proxy",
        "--proxy-port",
    )
    .await?;
    let controller_url = local_url(
        controller_listener
            .local_addr()
            .context("reading the controller's address")?,
    )?;
    let proxy_url = local_url(
        proxy_listener
            .local_addr()
            .context("reading the proxy's address")?,
    )?;
    let mut signals = StopSignals::install()?;

    let store = match &data_dir {
        Some(dir) => {
            let path = dir.join("hangar.db");
            SqliteStore::open(&path)
                .await
                .with_context(|| format!("opening the database {}", path.display()))?
        }
        None => SqliteStore::in_memory()
            .await
            .context("creating the in-memory database")?,
    };
    let store = Arc::new(store);
    let dyn_store: Arc<dyn Store> = store.clone();

    let controller_config = ControllerConfig {
        controller_url: Some(controller_url.clone()),
        default_cluster: Some(cluster.clone()),
        forward_auth: args.forward_auth.clone(),
        forward_auth_ca_cert: args.forward_auth_ca_cert.clone(),
        ..ControllerConfig::default()
    };
    let controller = hangar_controller::start(controller_config, dyn_store, controller_listener)
        .await
        .context("starting the controller")?;

    let mut drone_config = DroneConfig::new(controller_url.clone(), cluster.clone());
    drone_config.name = drone_name.clone();
    drone_config.ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    drone_config.executors = dev_executors().await;
    drone_config.state_file = data_dir.as_ref().map(|d| d.join("drone.db"));
    drone_config.metrics_addr = Some(args.drone_metrics_addr);
    let executors = drone_config.executors.clone();
    let _watchdog = crate::container_watchdog::start_for(&drone_config);
    let drone = match hangar_drone::start(drone_config).await {
        Ok(d) => d,
        Err(e) => {
            controller.shutdown().await;
            store.close().await;
            return Err(
                e.context("starting the drone (its metrics address is --drone-metrics-addr)")
            );
        }
    };

    let proxy_config = ProxyConfig {
        metrics_addr: Some(args.proxy_metrics_addr),
        ..ProxyConfig::new(controller_url.clone(), cluster.clone())
    };
    let proxy = match hangar_proxy::start(proxy_config, proxy_listener).await {
        Ok(p) => p,
        Err(e) => {
            drone.shutdown().await;
            controller.shutdown().await;
            store.close().await;
            return Err(
                e.context("starting the proxy (its metrics address is --proxy-metrics-addr)")
            );
        }
    };

    let stop_signal = tokio::select! {
        signal = signals.recv() => Some(signal),
        registered = wait_for_drone(&controller_url, &cluster, &drone_name) => {
            if let Err(e) = registered {
                tracing::warn!(error = %format!("{e:#}"), "The drone has not registered yet; connects may fail until it does");
            }
            None
        }
    };
    let stop_signal = match stop_signal {
        Some(signal) => signal,
        None => {
            print_banner(&Banner {
                controller_url: &controller_url,
                proxy_url: &proxy_url,
                proxy_metrics: proxy.metrics_addr(),
                drone_metrics: drone.metrics_addr(),
                cluster: &cluster,
                data_dir: data_dir.as_deref(),
                drone: &drone_name,
                executors: &executors,
            });
            signals.recv().await
        }
    };

    crate::shutdown::announce(stop_signal);
    signals
        .run_shutdown(|second| async {
            proxy.shutdown().await;
            drone.shutdown_cut_short_by(second).await;
            controller.shutdown().await;
            store.close().await;
        })
        .await;
    say!("Hangar dev stopped.");
    Ok(ExitCode::SUCCESS)
}

/// Polls the cluster state until `drone` is listed as ready, for up to [`DRONE_REGISTRATION_WAIT`].
async fn wait_for_drone(
    controller_url: &Url,
    cluster: &ClusterName,
    drone: &DroneName,
) -> anyhow::Result<()> {
    let client = ControllerClient::new(controller_url.clone()).context("controller URL")?;
    let deadline = tokio::time::Instant::now() + DRONE_REGISTRATION_WAIT;
    loop {
        let state = client.cluster_state(cluster).await;
        if let Ok(state) = &state {
            if state
                .drones
                .iter()
                .any(|d| d.ready && d.node.name.as_str() == drone.as_str())
            {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return match state {
                Ok(_) => Err(anyhow::anyhow!(
                    "drone {drone} did not register within {DRONE_REGISTRATION_WAIT:?}"
                )),
                Err(e) => Err(e).context("reading the cluster state"),
            };
        }
        tokio::time::sleep(DRONE_POLL_INTERVAL).await;
    }
}

struct Banner<'a> {
    controller_url: &'a Url,
    proxy_url: &'a Url,
    /// Where the proxy serves its metrics.
    proxy_metrics: Option<SocketAddr>,
    /// Where the drone serves its metrics.
    drone_metrics: Option<SocketAddr>,
    cluster: &'a ClusterName,
    data_dir: Option<&'a Path>,
    drone: &'a DroneName,
    executors: &'a [ExecutorKind],
}

/// Local processes always; Docker containers too when a Docker engine answers.
async fn dev_executors() -> Vec<ExecutorKind> {
    if hangar_drone::executor::DockerExecutor::engine_reachable().await {
        vec![ExecutorKind::Docker, ExecutorKind::Process]
    } else {
        tracing::info!("No Docker engine answers; the drone runs local processes only");
        vec![ExecutorKind::Process]
    }
}

/// The executors line of the banner.
fn executors_text(executors: &[ExecutorKind]) -> String {
    let names: Vec<String> = executors.iter().map(ToString::to_string).collect();
    let mut text = names.join(", ");
    if !executors.contains(&ExecutorKind::Docker) {
        text.push_str(" (no Docker engine found, so no containers)");
    }
    text
}

fn banner_text(b: &Banner<'_>) -> String {
    let controller = b.controller_url.as_str().trim_end_matches('/');
    let data = match b.data_dir {
        Some(dir) => format!("{} (hangar.db, drone.db)", dir.display()),
        None => "in memory (nothing is kept after exit)".to_string(),
    };
    let controller_flag = if controller == crate::cli::DEFAULT_CONTROLLER_URL {
        String::new()
    } else {
        format!(" --controller {controller}")
    };
    let node_metrics: String = [("proxy", b.proxy_metrics), ("drone", b.drone_metrics)]
        .into_iter()
        .filter_map(|(what, addr)| addr.map(|addr| format!(", {what} http://{addr}/metrics")))
        .collect();
    format!(
        "Hangar dev is running.\n\
         \x20 Controller API:  {controller}\n\
         \x20 Dashboard:       {controller}/dashboard\n\
         \x20 Proxy:           {proxy} (cluster {cluster}; backend URLs look like http://{cluster}/<token>/)\n\
         \x20 Metrics:         controller {controller}/metrics{node_metrics}\n\
         \x20 Data:            {data}\n\
         \x20 Drone:           {drone}, executors: {executors}\n\
         \n\
         Start a backend (any program that listens on $PORT):\n\
         \x20 hangar connect{controller_flag} --key demo --command \"sh -c 'exec python3 -m http.server \\$PORT'\"\n\
         \n\
         Press Ctrl-C to stop ({stopping}).\n",
        proxy = b.proxy_url.as_str().trim_end_matches('/'),
        cluster = b.cluster,
        drone = b.drone,
        executors = executors_text(b.executors),
        stopping = if b.executors.contains(&ExecutorKind::Docker) && b.data_dir.is_some() {
            "process backends are terminated; containers keep running and the next `hangar dev` \
             takes them back"
        } else {
            "running backends are terminated"
        },
    )
}

fn print_banner(b: &Banner<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // Flushed at once: scripts and tests read it through a pipe.
    let _ = stdout.write_all(banner_text(b).as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<DevArgs, clap::Error> {
        crate::parse_flags(args)
    }

    #[test]
    fn dev_args() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.controller_port, 8080);
        assert_eq!(a.proxy_port, 9090);
        assert_eq!(a.proxy_metrics_addr, "127.0.0.1:9091".parse().unwrap());
        assert_eq!(a.drone_metrics_addr, "127.0.0.1:9092".parse().unwrap());
        let a = parse(&[
            "--proxy-metrics-addr",
            "127.0.0.1:0",
            "--drone-metrics-addr",
            "127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(a.proxy_metrics_addr, "127.0.0.1:0".parse().unwrap());
        assert_eq!(a.drone_metrics_addr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(a.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(!a.in_memory);
        assert!(parse(&["--in-memory", "--data-dir", "/tmp/x"]).is_err());
        assert!(parse(&["--proxy-port", "70000"]).is_err());
        assert!(parse(&["--cluster", "not a cluster"]).is_err());
        let a = parse(&["--in-memory", "--cluster", "app.example.com"]).unwrap();
        assert_eq!(data_dir(&a).unwrap(), None);
    }

    #[test]
    fn drone_name_is_kept_in_the_data_dir() {
        let dir = std::env::temp_dir().join(format!("hangar-dev-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = drone_name(Some(&dir)).unwrap();
        assert_eq!(drone_name(Some(&dir)).unwrap(), first);
        std::fs::write(dir.join(DRONE_NAME_FILE), "Not A Name").unwrap();
        assert!(drone_name(Some(&dir)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(drone_name(None).unwrap(), drone_name(None).unwrap());
    }

    #[test]
    fn banner_says_where_everything_is() {
        let controller: Url = "http://127.0.0.1:18080/".parse().unwrap();
        let proxy: Url = "http://127.0.0.1:19090/".parse().unwrap();
        let cluster: ClusterName = "localhost:19090".parse().unwrap();
        let drone: DroneName = "dr-abc".parse().unwrap();
        let text = banner_text(&Banner {
            controller_url: &controller,
            proxy_url: &proxy,
            proxy_metrics: Some("127.0.0.1:19091".parse().unwrap()),
            drone_metrics: Some("127.0.0.1:19092".parse().unwrap()),
            cluster: &cluster,
            data_dir: None,
            drone: &drone,
            executors: &[ExecutorKind::Process],
        });
        assert!(
            text.contains("Controller API:  http://127.0.0.1:18080\n"),
            "{text}"
        );
        assert!(
            text.contains("Dashboard:       http://127.0.0.1:18080/dashboard\n"),
            "{text}"
        );
        assert!(text.contains("cluster localhost:19090"), "{text}");
        assert!(
            text.contains(
                "Metrics:         controller http://127.0.0.1:18080/metrics, proxy http://127.0.0.1:19091/metrics, drone http://127.0.0.1:19092/metrics\n"
            ),
            "{text}"
        );
        assert!(text.contains("in memory"), "{text}");
        assert!(
            text.contains("executors: process (no Docker engine found"),
            "{text}"
        );
        assert!(text.contains("running backends are terminated"), "{text}");
        let dir = Path::new("/tmp/hangar-dev");
        let text = banner_text(&Banner {
            controller_url: &controller,
            proxy_url: &proxy,
            proxy_metrics: None,
            drone_metrics: None,
            cluster: &cluster,
            data_dir: Some(dir),
            drone: &drone,
            executors: &[ExecutorKind::Docker, ExecutorKind::Process],
        });
        assert!(text.contains("executors: docker, process\n"), "{text}");
        assert!(text.contains("containers keep running"), "{text}");
        assert!(
            text.contains("hangar connect --controller http://127.0.0.1:18080 --key demo"),
            "{text}"
        );
    }
}
