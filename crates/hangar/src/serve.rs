//! `hangar controller`, `hangar drone` and `hangar proxy`: one component per process, configured by
//! flags or `HANGAR_*` environment variables, stopped cleanly by SIGINT/SIGTERM.

use crate::shutdown::StopSignals;
use anyhow::Context;
use clap::Args;
use hangar_controller::ControllerConfig;
use hangar_drone::DroneConfig;
use hangar_proxy::ProxyConfig;
use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use hangar_types::executable::ExecutorKind;
use hangar_types::ClusterName;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;
use url::Url;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Database: a SQLite file path (created if missing). PostgreSQL URLs are not supported yet.
    #[arg(long, env = "HANGAR_DB")]
    pub db: String,
    /// Address to listen on.
    #[arg(long, env = "HANGAR_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "HANGAR_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Cluster for connect requests that name none.
    #[arg(long, env = "HANGAR_DEFAULT_CLUSTER")]
    pub default_cluster: Option<ClusterName>,
    /// This controller's externally reachable URL (used in `status_url`); `http://<host>:<port>`
    /// when absent.
    #[arg(long, env = "HANGAR_CONTROLLER_URL")]
    pub controller_url: Option<Url>,
    /// Require `Authorization: Bearer <token>` on every `/ctrl` route, node sockets included.
    #[arg(long, env = "HANGAR_BEARER_TOKEN", hide_env_values = true)]
    pub bearer_token: Option<String>,
}

/// Binds a TCP listener, turning "address in use" into a message that says what to change.
pub async fn bind_listener(
    addr: SocketAddr,
    what: &str,
    flag: &str,
) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "cannot listen on {addr} for the {what}: the port is already in use \
             (is another Hangar running?); choose another port with {flag}"
        )),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr} for the {what}")),
    }
}

/// Opens the controller's store from `--db`.
pub async fn open_store(db: &str) -> anyhow::Result<Arc<SqliteStore>> {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        anyhow::bail!(
            "PostgreSQL is not supported yet; give --db a SQLite file path (e.g. --db ./hangar.db)"
        );
    }
    let path = db.strip_prefix("sqlite://").unwrap_or(db);
    if path.is_empty() {
        anyhow::bail!("--db must not be empty");
    }
    let store = SqliteStore::open(Path::new(path))
        .await
        .with_context(|| format!("opening the SQLite database {path}"))?;
    Ok(Arc::new(store))
}

/// The URL other processes on this machine use to reach a server listening on `addr` (an unspecified
/// address such as 0.0.0.0 is reached through loopback).
pub fn local_url(addr: SocketAddr) -> anyhow::Result<Url> {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => IpAddr::from([127, 0, 0, 1]),
        ip if ip.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let url = format!("http://{}/", SocketAddr::new(ip, addr.port()));
    Url::parse(&url).with_context(|| format!("building a URL from {addr}"))
}

pub async fn run_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&args.db).await?;
    let listener = bind_listener(
        SocketAddr::new(args.host, args.port),
        "controller",
        "--port",
    )
    .await?;
    let config = ControllerConfig {
        controller_url: args.controller_url,
        default_cluster: args.default_cluster,
        bearer_token: args.bearer_token,
        ..ControllerConfig::default()
    };
    config
        .validate()
        .context("invalid controller configuration")?;
    let mut signals = StopSignals::install()?;
    let dyn_store: Arc<dyn Store> = store.clone();
    let controller = hangar_controller::start(config, dyn_store, listener)
        .await
        .context("starting the controller")?;
    tracing::info!(url = %local_url(controller.local_addr())?, "Controller ready");
    let signal = signals.recv().await;
    tracing::info!(signal, "Shutting down");
    controller.shutdown().await;
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct DroneArgs {
    /// Controller URL (`http(s)://[TOKEN@]host:port`).
    #[arg(long, env = "HANGAR_CONTROLLER_URL")]
    pub controller_url: Url,
    /// Cluster to join.
    #[arg(long, env = "HANGAR_CLUSTER")]
    pub cluster: ClusterName,
    /// Drone name (`dr-…`); random when absent.
    #[arg(long, env = "HANGAR_DRONE_NAME")]
    pub name: Option<hangar_types::DroneName>,
    /// Drone pool ("" is the default pool).
    #[arg(long, env = "HANGAR_POOL", default_value = "")]
    pub pool: String,
    /// Address proxies use to reach this drone's backends.
    #[arg(long, env = "HANGAR_IP", default_value = "127.0.0.1")]
    pub ip: IpAddr,
    /// File for the drone's own state (backends it runs, unacknowledged events); in memory when
    /// absent (backends are then lost on restart).
    #[arg(long, env = "HANGAR_STATE_FILE")]
    pub state_file: Option<std::path::PathBuf>,
    /// Executors to offer. `process` runs any command a `/ctrl` caller sends: offer it only to
    /// trusted callers.
    #[arg(
        long = "executor",
        env = "HANGAR_EXECUTOR",
        value_delimiter = ',',
        default_value = "docker"
    )]
    pub executors: Vec<ExecutorArg>,
}

/// `--executor` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorArg {
    /// Docker containers (`executable.image`).
    Docker,
    /// Local processes (`executable.command`).
    Process,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Controller URL (`http(s)://[TOKEN@]host:port`).
    #[arg(long, env = "HANGAR_CONTROLLER_URL")]
    pub controller_url: Url,
    /// Cluster this proxy serves.
    #[arg(long, env = "HANGAR_CLUSTER")]
    pub cluster: ClusterName,
    /// Proxy name (`px-…`); random when absent.
    #[arg(long, env = "HANGAR_PROXY_NAME")]
    pub name: Option<hangar_types::ProxyName>,
    /// Address to listen on.
    #[arg(long, env = "HANGAR_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// HTTP port.
    #[arg(long, env = "HANGAR_HTTP_PORT", default_value_t = 9090)]
    pub http_port: u16,
    /// Requests for `/` are redirected here.
    #[arg(long, env = "HANGAR_ROOT_REDIRECT_URL")]
    pub root_redirect_url: Option<Url>,
}

impl ExecutorArg {
    fn kind(self) -> ExecutorKind {
        match self {
            ExecutorArg::Docker => ExecutorKind::Docker,
            ExecutorArg::Process => ExecutorKind::Process,
        }
    }
}

impl DroneArgs {
    pub fn to_config(&self) -> DroneConfig {
        let mut config = DroneConfig::new(self.controller_url.clone(), self.cluster.clone());
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config.pool = self.pool.clone();
        config.ip = self.ip;
        config.state_file = self.state_file.clone();
        let mut executors: Vec<ExecutorKind> = self.executors.iter().map(|e| e.kind()).collect();
        executors.sort();
        executors.dedup();
        config.executors = executors;
        config
    }
}

pub async fn run_drone(args: DroneArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config();
    if let Err(e) = config.validate() {
        if matches!(e, hangar_drone::DroneConfigError::ExecutorUnavailable(_)) {
            anyhow::bail!(
                "invalid drone configuration: {e}; run local processes with --executor process"
            );
        }
        return Err(e).context("invalid drone configuration");
    }
    let mut signals = StopSignals::install()?;
    let drone = hangar_drone::start(config)
        .await
        .context("starting the drone")?;
    let signal = signals.recv().await;
    tracing::info!(signal, "Shutting down");
    drone.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

impl ProxyArgs {
    pub fn to_config(&self) -> ProxyConfig {
        let mut config = ProxyConfig::new(self.controller_url.clone(), self.cluster.clone());
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config.root_redirect_url = self.root_redirect_url.clone();
        config
    }
}

pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config();
    config.validate().context("invalid proxy configuration")?;
    let listener = bind_listener(
        SocketAddr::new(args.host, args.http_port),
        "proxy",
        "--http-port",
    )
    .await?;
    let mut signals = StopSignals::install()?;
    let proxy = hangar_proxy::start(config, listener)
        .await
        .context("starting the proxy")?;
    let signal = signals.recv().await;
    tracing::info!(signal, "Shutting down");
    proxy.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Debug, Parser)]
    enum Cli {
        Controller(ControllerArgs),
        Drone(DroneArgs),
        Proxy(ProxyArgs),
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hangar").chain(args.iter().copied()))
    }

    #[test]
    fn drone_args() {
        let Cli::Drone(d) = parse(&[
            "drone",
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "localhost:9090",
            "--executor",
            "process",
            "--pool",
            "gpu",
        ])
        .unwrap() else {
            panic!("not a drone")
        };
        let c = d.to_config();
        assert_eq!(c.executors, vec![ExecutorKind::Process]);
        assert_eq!(c.pool, "gpu");
        assert!(c.name.as_str().starts_with("dr-"));
        assert!(c.validate().is_ok());
        let Cli::Drone(d) = parse(&[
            "drone",
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "c",
            "--executor",
            "process,docker",
            "--executor",
            "process",
        ])
        .unwrap() else {
            panic!("not a drone")
        };
        assert_eq!(
            d.to_config().executors,
            vec![ExecutorKind::Docker, ExecutorKind::Process]
        );
        // Docker is the default executor.
        let Cli::Drone(d) = parse(&[
            "drone",
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "c",
        ])
        .unwrap() else {
            panic!("not a drone")
        };
        assert_eq!(d.to_config().executors, vec![ExecutorKind::Docker]);
        assert!(parse(&[
            "drone",
            "--cluster",
            "c",
            "--controller-url",
            "http://x",
            "--executor",
            "vm"
        ])
        .is_err());
        assert!(parse(&["drone", "--cluster", "c"]).is_err());
        assert!(parse(&[
            "drone",
            "--controller-url",
            "http://x",
            "--cluster",
            "c",
            "--name",
            "px-abc"
        ])
        .is_err());
    }

    #[test]
    fn proxy_and_controller_args() {
        let Cli::Proxy(p) = parse(&[
            "proxy",
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "app.example.com",
            "--root-redirect-url",
            "https://example.com/",
        ])
        .unwrap() else {
            panic!("not a proxy")
        };
        assert_eq!(p.http_port, 9090);
        let c = p.to_config();
        assert_eq!(c.cluster.as_str(), "app.example.com");
        assert_eq!(
            c.root_redirect_url.as_ref().map(Url::as_str),
            Some("https://example.com/")
        );
        let Cli::Controller(c) = parse(&["controller", "--db", "x.db"]).unwrap() else {
            panic!("not a controller")
        };
        assert_eq!(c.port, 8080);
        assert_eq!(c.host, IpAddr::from([127, 0, 0, 1]));
        assert!(parse(&["controller"]).is_err());
        assert!(parse(&["controller", "--db", "x", "--default-cluster", "a b"]).is_err());
    }

    #[tokio::test]
    async fn postgres_is_refused_clearly() {
        let err = tokio::time::timeout(Duration::from_secs(10), open_store("postgres://u@h/db"))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not supported yet"), "{err}");
    }

    #[tokio::test]
    async fn busy_port_gives_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            bind_listener(addr, "proxy", "--proxy-port"),
        )
        .await
        .unwrap()
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("already in use") && text.contains("--proxy-port"),
            "{text}"
        );
    }

    #[test]
    fn local_urls_use_loopback_for_unspecified_addresses() {
        assert_eq!(
            local_url("0.0.0.0:9090".parse().unwrap()).unwrap().as_str(),
            "http://127.0.0.1:9090/"
        );
        assert_eq!(
            local_url("[::]:9090".parse().unwrap()).unwrap().as_str(),
            "http://[::1]:9090/"
        );
        assert_eq!(
            local_url("10.0.0.5:80".parse().unwrap()).unwrap().as_str(),
            "http://10.0.0.5/"
        );
    }
}
