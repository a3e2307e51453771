//! `hangar controller`, `hangar drone` and `hangar proxy`: one component per process, configured by a
//! TOML file (`--config`), `HANGAR_*` environment variables and flags (see [`crate::config_file`] for
//! the precedence), stopped cleanly by SIGINT/SIGTERM.

use crate::config_file::{required, ConfigLayers};
use crate::database::{open_store_waiting, Database};
use crate::shutdown::{SecondSignal, StopSignals};
use anyhow::Context;
use clap::Args;
use hangar_controller::ControllerConfig;
use hangar_drone::DroneConfig;
use hangar_proxy::ProxyConfig;
use hangar_types::executable::ExecutorKind;
use hangar_types::ClusterName;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;
use url::Url;

/// Default listen address of `hangar controller`.
const CONTROLLER_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Default port of `hangar controller`.
const CONTROLLER_PORT: u16 = 8080;
/// Default listen address of `hangar proxy`.
const PROXY_HOST: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default HTTP port of `hangar proxy`.
const PROXY_HTTP_PORT: u16 = 9090;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// TOML file with `ControllerConfig` fields, plus `db`, `host` and `port`. Flags and `HANGAR_*`
    /// variables override its values.
    #[arg(long, env = "HANGAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database: a `postgres://user:password@host:port/database` URL (several controllers may share
    /// it) or a SQLite file path (created if missing; one controller only). Required.
    #[arg(long, env = "HANGAR_DB")]
    pub db: Option<String>,
    /// Address to listen on. Default: 127.0.0.1.
    #[arg(long, env = "HANGAR_CONTROLLER_HOST")]
    pub host: Option<IpAddr>,
    /// Port to listen on. Default: 8080.
    #[arg(long, env = "HANGAR_CONTROLLER_PORT")]
    pub port: Option<u16>,
    /// Cluster for connect requests that name none.
    #[arg(long, env = "HANGAR_DEFAULT_CLUSTER")]
    pub default_cluster: Option<ClusterName>,
    /// This controller's externally reachable URL, which it advertises (in `status_url`).
    /// Default: `http://<host>:<port>`.
    #[arg(long, env = "HANGAR_ADVERTISED_URL")]
    pub controller_url: Option<Url>,
    /// Where the other controllers sharing the database reach this one directly (log reads of
    /// backends whose drone is connected here are forwarded to it). Default: `http://<host>:<port>`.
    #[arg(long, env = "HANGAR_INTERNAL_URL")]
    pub internal_url: Option<Url>,
    /// Require `Authorization: Bearer <token>` on every `/ctrl` route, node sockets included.
    #[arg(long, env = "HANGAR_BEARER_TOKEN", hide_env_values = true)]
    pub bearer_token: Option<String>,
    /// Plane's forward auth: check every `/ctrl` request (node sockets included), the dashboard and
    /// `/metrics` with a side request to this http(s) URL first; a 2xx answer lets the request
    /// through, any other answer goes back to the client. Side-request timeout: TOML
    /// `forward_auth_timeout` (ms; default: 10000).
    #[arg(long, env = "HANGAR_FORWARD_AUTH")]
    pub forward_auth: Option<Url>,
    /// PEM file of extra CA certificates to trust for an `https://` --forward-auth URL.
    #[arg(long, env = "HANGAR_FORWARD_AUTH_CA_CERT", requires = "forward_auth")]
    pub forward_auth_ca_cert: Option<PathBuf>,
    /// Milliseconds a client may take to send a complete request head; slower clients are
    /// disconnected. Default: 30000.
    #[arg(long, value_name = "MS")]
    pub header_read_timeout: Option<u64>,
    /// Milliseconds without a new request after which a connection is closed gracefully
    /// (WebSockets are not affected). Default: 60000.
    #[arg(long, value_name = "MS")]
    pub idle_timeout: Option<u64>,
    /// Most connections open at once, WebSockets included; more get 503. Default: 10000.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Largest request head in bytes; larger heads get 431. Default: 65536.
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
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

/// Everything `hangar controller` needs, resolved from file, environment and flags.
#[derive(Debug)]
pub struct ControllerSetup {
    pub config: ControllerConfig,
    pub db: Database,
    pub listen: SocketAddr,
}

impl ControllerArgs {
    pub fn resolve(&self) -> anyhow::Result<ControllerSetup> {
        let mut layers = ConfigLayers::load(self.config.as_deref())?;
        let db = layers.take("db", self.db.clone())?;
        let host = layers.take("host", self.host)?.unwrap_or(CONTROLLER_HOST);
        let port = layers.take("port", self.port)?.unwrap_or(CONTROLLER_PORT);
        layers.set("default_cluster", self.default_cluster.as_ref())?;
        layers.set("controller_url", self.controller_url.as_ref())?;
        layers.set("internal_url", self.internal_url.as_ref())?;
        layers.set("bearer_token", self.bearer_token.as_ref())?;
        layers.set("forward_auth", self.forward_auth.as_ref())?;
        layers.set("forward_auth_ca_cert", self.forward_auth_ca_cert.as_ref())?;
        layers.set("header_read_timeout", self.header_read_timeout.as_ref())?;
        layers.set("idle_timeout", self.idle_timeout.as_ref())?;
        layers.set("max_connections", self.max_connections.as_ref())?;
        layers.set("max_header_bytes", self.max_header_bytes.as_ref())?;
        let config: ControllerConfig = layers.build("controller")?;
        config
            .validate()
            .context("invalid controller configuration")?;
        let db = Database::parse(&required(db, "db", "--db", "HANGAR_DB")?)?;
        Ok(ControllerSetup {
            config,
            db,
            listen: SocketAddr::new(host, port),
        })
    }
}

pub async fn run_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let setup = args.resolve()?;
    let listener = bind_listener(setup.listen, "controller", "--port").await?;
    let mut signals = StopSignals::install()?;
    let Some((store, listener)) =
        open_store_waiting(&setup.db, listener, &setup.config, &mut signals).await?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    let controller = hangar_controller::start(setup.config, store.store(), listener)
        .await
        .context("starting the controller")?;
    tracing::info!(url = %local_url(controller.local_addr())?, "Controller ready");
    serve_until_signal(signals, |_| async {
        controller.shutdown().await;
        store.close().await;
    })
    .await
}

/// What every node component (drone, proxy) is told first: the file its configuration starts from,
/// the controller it reports to and the cluster it belongs to.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML file with this component's configuration (its keys: docs/configuration.md; commented
    /// examples: examples/config/). Flags and `HANGAR_*` variables override its values.
    #[arg(long, env = "HANGAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Controller URL to connect to (`http(s)://[TOKEN@]host:port`; `host:port` means
    /// `http://host:port`). Required.
    #[arg(long, env = "HANGAR_CONTROLLER_URL", value_parser = crate::cli::parse_controller_url)]
    pub controller_url: Option<Url>,
    /// Cluster this node joins (a drone) or serves (a proxy). Required.
    #[arg(long, env = "HANGAR_CLUSTER")]
    pub cluster: Option<ClusterName>,
}

impl NodeArgs {
    /// The configuration layers (file, environment) with these flags over them; the controller URL
    /// and the cluster must be given somewhere.
    fn layers(&self) -> anyhow::Result<ConfigLayers> {
        let mut layers = ConfigLayers::load(self.config.as_deref())?;
        layers.set("controller_url", self.controller_url.as_ref())?;
        layers.set("cluster", self.cluster.as_ref())?;
        layers.require(
            "controller_url",
            "--controller-url",
            "HANGAR_CONTROLLER_URL",
        )?;
        layers.require("cluster", "--cluster", "HANGAR_CLUSTER")?;
        Ok(layers)
    }
}

/// Runs until SIGINT or SIGTERM, then stops the component with `shutdown`, which may cut its grace
/// period short on a second signal ([`StopSignals::run_shutdown`]).
async fn serve_until_signal<F: Future<Output = ()>>(
    mut signals: StopSignals,
    shutdown: impl FnOnce(SecondSignal) -> F,
) -> anyhow::Result<ExitCode> {
    crate::shutdown::announce(signals.recv().await);
    signals.run_shutdown(shutdown).await;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct DroneArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Drone name (`dr-…`). Default: the name kept in the --state-file, else random.
    #[arg(long, env = "HANGAR_DRONE_NAME")]
    pub name: Option<hangar_types::DroneName>,
    /// Drone pool. Default: `""` (the default pool).
    #[arg(long, env = "HANGAR_POOL")]
    pub pool: Option<String>,
    /// Address proxies use to reach this drone's backends. Default: 127.0.0.1.
    #[arg(long, env = "HANGAR_IP")]
    pub ip: Option<IpAddr>,
    /// File for the drone's own state (backends it runs, unacknowledged events). Default: in memory
    /// (backends are then lost on restart).
    #[arg(long, env = "HANGAR_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Executors to offer (repeat or separate with commas). `process` runs any command a `/ctrl`
    /// caller sends: offer it only to trusted callers. Default: docker.
    #[arg(long = "executor", env = "HANGAR_EXECUTOR", value_delimiter = ',')]
    pub executors: Option<Vec<ExecutorArg>>,
    /// Docker: absolute host directory under which `executable.mount` directories are created
    /// (bound at `/plane-data` in the container). Without it, backends asking for a mount fail.
    #[arg(long, env = "HANGAR_MOUNT_BASE")]
    pub mount_base: Option<PathBuf>,
    /// Docker: runtime for every container, e.g. `runsc` (gVisor). Default: Docker's.
    #[arg(long, env = "HANGAR_DOCKER_RUNTIME")]
    pub docker_runtime: Option<String>,
    /// Docker: log configuration for every container, as JSON, e.g.
    /// '{"Type": "json-file", "Config": {"max-size": "10m"}}'. Default: Docker's.
    #[arg(long, env = "HANGAR_DOCKER_LOG_CONFIG", value_parser = parse_json)]
    pub log_config: Option<serde_json::Value>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. `127.0.0.1:9092`. Default: off.
    #[arg(long, env = "HANGAR_DRONE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket of an external executor speaking Plane's executor protocol (as Plane's
    /// `--executor-socket`). It takes the Docker executor's place: Docker-style executables
    /// (`executable.image`) go to the socket. Default: none.
    #[arg(long, env = "HANGAR_EXECUTOR_SOCKET")]
    pub executor_socket: Option<PathBuf>,
    /// Directory of the backends' kept output. Default: `<state-file>.logs`, or a temporary
    /// directory without a state file.
    #[arg(long, env = "HANGAR_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// Most bytes of output kept per backend (oldest lines dropped first). Default: 8388608.
    #[arg(long, env = "HANGAR_LOG_BACKEND_BYTES")]
    pub log_backend_bytes: Option<u64>,
    /// Most bytes of output kept for all backends. Default: 1073741824.
    #[arg(long, env = "HANGAR_LOG_TOTAL_BYTES")]
    pub log_total_bytes: Option<u64>,
    /// How long output is kept after its backend ended, in milliseconds. Default: 86400000 (24 h).
    #[arg(long, env = "HANGAR_LOG_RETENTION")]
    pub log_retention: Option<u64>,
}

/// A JSON flag value.
fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
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
    #[command(flatten)]
    pub node: NodeArgs,
    /// Proxy name (`px-…`). Default: random.
    #[arg(long, env = "HANGAR_PROXY_NAME")]
    pub name: Option<hangar_types::ProxyName>,
    /// Address to listen on. Default: 0.0.0.0.
    #[arg(long, env = "HANGAR_PROXY_HOST")]
    pub host: Option<IpAddr>,
    /// HTTP port. Default: 9090 (80 with --https or --https-port).
    #[arg(long, env = "HANGAR_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// Requests for `/` are redirected here.
    #[arg(long, env = "HANGAR_ROOT_REDIRECT_URL")]
    pub root_redirect_url: Option<Url>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. `127.0.0.1:9091`; a separate
    /// listener, never the public proxy port. Default: off.
    #[arg(long, env = "HANGAR_PROXY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Threads serving client connections, each with its own listening socket; 0 = one per
    /// available core. Default: 0.
    #[arg(long, env = "HANGAR_PROXY_WORKERS")]
    pub workers: Option<usize>,
    /// HTTPS and certificates (boxed: they are most of the size of the arguments).
    #[command(flatten)]
    pub tls: Box<crate::proxy_tls::ProxyTlsArgs>,
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
    /// The drone's configuration from file, environment and flags (not yet validated).
    pub fn to_config(&self) -> anyhow::Result<DroneConfig> {
        let mut layers = self.node.layers()?;
        layers.set("name", self.name.as_ref())?;
        layers.set("pool", self.pool.as_ref())?;
        layers.set("ip", self.ip.as_ref())?;
        layers.set("state_file", self.state_file.as_ref())?;
        let executors = self.executors.as_ref().map(|given| {
            let mut kinds: Vec<ExecutorKind> = given.iter().map(|e| e.kind()).collect();
            kinds.sort();
            kinds.dedup();
            kinds
        });
        layers.set("executors", executors.as_ref())?;
        layers.set("mount_base", self.mount_base.as_ref())?;
        layers.set("docker_runtime", self.docker_runtime.as_ref())?;
        layers.set("docker_log_config", self.log_config.as_ref())?;
        layers.set("metrics_addr", self.metrics_addr.as_ref())?;
        layers.set("executor_socket", self.executor_socket.as_ref())?;
        layers.set("log_dir", self.log_dir.as_ref())?;
        layers.set("log_backend_bytes", self.log_backend_bytes.as_ref())?;
        layers.set("log_total_bytes", self.log_total_bytes.as_ref())?;
        layers.set("log_retention", self.log_retention.as_ref())?;
        Ok(layers.build("drone")?)
    }
}

pub async fn run_drone(args: DroneArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.to_config()?;
    // A drone restarted without a name comes back under the one its state file keeps, to re-adopt
    // its backends.
    let name_given = args.name.is_some() || args.node.layers()?.contains("name");
    if let (false, Some(state_file)) = (name_given, &config.state_file) {
        if let Some(kept) = hangar_drone::name_in_state_file(state_file).await? {
            tracing::info!(drone = %kept, state_file = %state_file.display(), "Using the drone name kept in the state file");
            config.name = kept;
        }
    }
    if let Err(e) = config.validate() {
        if matches!(e, hangar_drone::DroneConfigError::ExecutorUnavailable(_)) {
            anyhow::bail!(
                "invalid drone configuration: {e}; run local processes with --executor process"
            );
        }
        return Err(e).context("invalid drone configuration");
    }
    let signals = StopSignals::install()?;
    let _watchdog = crate::container_watchdog::start_for(&config);
    let drone = hangar_drone::start(config)
        .await
        .context("starting the drone")?;
    serve_until_signal(signals, |second| drone.shutdown_cut_short_by(second)).await
}

impl ProxyArgs {
    /// The proxy's configuration (not yet validated) and listen address, from file, environment and
    /// flags.
    #[cfg(test)]
    pub fn to_config(&self) -> anyhow::Result<(ProxyConfig, SocketAddr)> {
        let setup = self.to_setup()?;
        Ok((setup.config, setup.http))
    }

    /// [`ProxyArgs::to_config`] with the HTTPS listen address too (Plane's port rules, see
    /// [`crate::proxy_tls::ports`]); the file may also hold `https` and `https_port`.
    pub fn to_setup(&self) -> anyhow::Result<crate::proxy_tls::ProxySetup> {
        let mut layers = self.node.layers()?;
        let host = layers.take("host", self.host)?.unwrap_or(PROXY_HOST);
        let http_port = layers.take("http_port", self.http_port)?;
        let https_port = layers.take("https_port", self.tls.https_port)?;
        let https = layers.take("https", self.tls.https.then_some(true))?;
        let ports = crate::proxy_tls::ports(
            https.unwrap_or(false),
            http_port,
            https_port,
            PROXY_HTTP_PORT,
        );
        layers.set("name", self.name.as_ref())?;
        layers.set("root_redirect_url", self.root_redirect_url.as_ref())?;
        layers.set("metrics_addr", self.metrics_addr.as_ref())?;
        layers.set("workers", self.workers.as_ref())?;
        let mut config: ProxyConfig = layers.build("proxy")?;
        self.tls.apply(&mut config)?;
        crate::proxy_tls::ProxySetup::new(config, host, ports)
    }
}

pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let setup = args.to_setup()?;
    let config = setup.config;
    config.validate().context("invalid proxy configuration")?;
    let listener = bind_listener(setup.http, "proxy", "--http-port").await?;
    let https = match setup.https {
        Some(addr) => Some(bind_listener(addr, "proxy's HTTPS", "--https-port").await?),
        None => None,
    };
    let signals = StopSignals::install()?;
    let listeners = hangar_proxy::ProxyListeners {
        http: listener,
        https,
    };
    let proxy = hangar_proxy::start_with_listeners(config, listeners)
        .await
        .context("starting the proxy")?;
    serve_until_signal(signals, |_| proxy.shutdown()).await
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

    fn drone(args: &[&str]) -> DroneArgs {
        let mut full = vec!["drone"];
        full.extend_from_slice(args);
        match parse(&full).unwrap() {
            Cli::Drone(d) => d,
            other => panic!("not a drone: {other:?}"),
        }
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn drone_args() {
        let c = drone(&[
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "localhost:9090",
            "--executor",
            "process",
            "--pool",
            "gpu",
        ])
        .to_config()
        .unwrap();
        assert_eq!(c.executors, vec![ExecutorKind::Process]);
        assert_eq!(c.pool, "gpu");
        assert!(c.name.as_str().starts_with("dr-"));
        assert!(c.validate().is_ok());
        let d = drone(&[
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "c",
            "--executor",
            "process,docker",
            "--executor",
            "process",
        ]);
        assert_eq!(
            d.to_config().unwrap().executors,
            vec![ExecutorKind::Docker, ExecutorKind::Process]
        );
        // Docker is the default executor.
        let d = drone(&["--controller-url", "http://ctrl:8080", "--cluster", "c"]);
        assert_eq!(d.to_config().unwrap().executors, vec![ExecutorKind::Docker]);
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
        let err = drone(&["--cluster", "c"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--controller-url") && err.contains("HANGAR_CONTROLLER_URL"),
            "{err}"
        );
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
    fn drone_docker_flags() {
        let base = ["--controller-url", "http://ctrl:8080", "--cluster", "c"];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            drone(&args).to_config().unwrap()
        };
        let c = with(&[
            "--mount-base",
            "/srv/hangar",
            "--docker-runtime",
            "runsc",
            "--log-config",
            r#"{"Type": "json-file", "Config": {"max-size": "10m"}}"#,
        ]);
        assert!(c.validate().is_ok());
        assert_eq!(
            c.mount_base.as_deref(),
            Some(std::path::Path::new("/srv/hangar"))
        );
        assert_eq!(c.docker_runtime.as_deref(), Some("runsc"));
        assert_eq!(c.metrics_addr, None);
        let metrics = with(&["--metrics-addr", "127.0.0.1:9192"]);
        assert_eq!(
            metrics.metrics_addr,
            Some("127.0.0.1:9192".parse().unwrap())
        );
        let log = c.log_config().unwrap().unwrap();
        assert_eq!(
            (log.kind.as_str(), log.config["max-size"].as_str()),
            ("json-file", "10m")
        );
        assert!(with(&["--mount-base", "relative"]).validate().is_err());
        assert!(with(&["--log-config", r#"{"Driver": "x"}"#])
            .validate()
            .is_err());
        let mut args: Vec<&str> = vec!["drone"];
        args.extend(base);
        args.extend(["--log-config", "not json"]);
        assert!(parse(&args).is_err());
    }

    #[test]
    fn drone_flags_override_the_config_file() {
        let file = config_file(
            "controller_url = \"http://file:8080/\"\ncluster = \"file.example\"\npool = \"p\"\n\
             executors = [\"process\"]\nsoft_terminate_grace = 2500\n",
        );
        let path = file.path().to_str().unwrap();
        let c = drone(&["--config", path]).to_config().unwrap();
        assert_eq!(c.controller_url.as_str(), "http://file:8080/");
        assert_eq!(c.executors, vec![ExecutorKind::Process]);
        assert_eq!(c.soft_terminate_grace, Duration::from_millis(2500));
        let c = drone(&[
            "--config",
            path,
            "--pool",
            "flag",
            "--cluster",
            "flag.example",
        ])
        .to_config()
        .unwrap();
        assert_eq!(c.pool, "flag");
        assert_eq!(c.cluster.as_str(), "flag.example");
        assert_eq!(
            c.executors,
            vec![ExecutorKind::Process],
            "kept from the file"
        );

        let bad = config_file(
            "controller_url = \"http://x/\"\ncluster = \"c\"\nexecutor = [\"process\"]\n",
        );
        let err = drone(&["--config", bad.path().to_str().unwrap()])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `executor`"), "{err}");
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
            "--metrics-addr",
            "127.0.0.1:9191",
            "--workers",
            "3",
        ])
        .unwrap() else {
            panic!("not a proxy")
        };
        let (c, listen) = p.to_config().unwrap();
        assert_eq!(listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9191".parse().unwrap()));
        assert_eq!(c.workers, 3);
        assert_eq!(c.cluster.as_str(), "app.example.com");
        assert_eq!(
            c.root_redirect_url.as_ref().map(Url::as_str),
            Some("https://example.com/")
        );
        let Cli::Controller(c) = parse(&["controller", "--db", "x.db"]).unwrap() else {
            panic!("not a controller")
        };
        let setup = c.resolve().unwrap();
        assert_eq!(setup.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(setup.db.location, "x.db");
        let Cli::Controller(c) = parse(&["controller"]).unwrap() else {
            panic!("not a controller")
        };
        let err = c.resolve().unwrap_err().to_string();
        assert!(err.contains("--db") && err.contains("HANGAR_DB"), "{err}");
        assert!(parse(&["controller", "--db", "x", "--default-cluster", "a b"]).is_err());
    }

    #[test]
    fn controller_file_holds_listen_and_database_settings() {
        let file = config_file(
            "db = \"postgres://u:p@db:5432/hangar\"\nhost = \"0.0.0.0\"\nport = 7000\n\
             best_of = 3\ndefault_cluster = \"file.example\"\nbearer_token = \"from-file\"\n",
        );
        let path = file.path().to_str().unwrap();
        let Cli::Controller(c) = parse(&["controller", "--config", path]).unwrap() else {
            panic!("not a controller")
        };
        let setup = c.resolve().unwrap();
        assert_eq!(setup.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(setup.db.kind, crate::database::DatabaseKind::Postgres);
        assert_eq!(setup.config.best_of, 3);
        assert_eq!(setup.config.bearer_token.as_deref(), Some("from-file"));
        let Cli::Controller(c) = parse(&[
            "controller",
            "--config",
            path,
            "--port",
            "7001",
            "--db",
            "local.db",
            "--bearer-token",
            "from-flag",
        ])
        .unwrap() else {
            panic!("not a controller")
        };
        let setup = c.resolve().unwrap();
        assert_eq!(setup.listen, "0.0.0.0:7001".parse().unwrap());
        assert_eq!(setup.db.location, "local.db");
        assert_eq!(setup.config.bearer_token.as_deref(), Some("from-flag"));
        assert_eq!(
            setup.config.default_cluster.as_ref().map(|c| c.as_str()),
            Some("file.example")
        );

        let invalid = config_file("db = \"x.db\"\nbest_of = 0\n");
        let Cli::Controller(c) =
            parse(&["controller", "--config", invalid.path().to_str().unwrap()]).unwrap()
        else {
            panic!("not a controller")
        };
        let err = format!("{:#}", c.resolve().unwrap_err());
        assert!(err.contains("best_of"), "{err}");
    }

    #[test]
    fn controller_listener_limit_flags() {
        let Cli::Controller(c) = parse(&[
            "controller",
            "--db",
            "x.db",
            "--header-read-timeout",
            "1500",
            "--idle-timeout",
            "9000",
            "--max-connections",
            "12",
            "--max-header-bytes",
            "16384",
        ])
        .unwrap() else {
            panic!("not a controller")
        };
        let config = c.resolve().unwrap().config;
        assert_eq!(config.header_read_timeout, Duration::from_millis(1500));
        assert_eq!(config.idle_timeout, Duration::from_secs(9));
        assert_eq!(
            (config.max_connections, config.max_header_bytes),
            (12, 16384)
        );
        let Cli::Controller(c) =
            parse(&["controller", "--db", "x.db", "--max-header-bytes", "10"]).unwrap()
        else {
            panic!("not a controller")
        };
        let err = format!("{:#}", c.resolve().unwrap_err());
        assert!(err.contains("max_header_bytes"), "{err}");
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

    #[test]
    fn drone_executor_socket() {
        let c = drone(&[
            "--controller-url",
            "http://ctrl:8080",
            "--cluster",
            "c",
            "--executor-socket",
            "/run/executor.sock",
        ])
        .to_config()
        .unwrap();
        assert_eq!(c.executor_socket, Some(PathBuf::from("/run/executor.sock")));
        assert_eq!(c.offered_executors(), vec![ExecutorKind::Socket]);
        assert!(c.validate().is_ok());
        let file = config_file(
            "controller_url = \"http://ctrl:8080\"\ncluster = \"c\"\nexecutor_socket = \"/tmp/x.sock\"\n",
        );
        let c = drone(&["--config", file.path().to_str().unwrap()])
            .to_config()
            .unwrap();
        assert_eq!(c.executor_socket, Some(PathBuf::from("/tmp/x.sock")));
    }
}
