//! The system under test as real processes of the built `hangar` binary: controllers on a fresh
//! PostgreSQL database of the harness's own server, drones with the process executor, proxies, each
//! reaching the next through a fault relay, and a relay in front of every backend. Faults are applied
//! and healed here.

use crate::postgres::PostgresServer;
use crate::relay::{Relay, RelayMode};
use crate::schedule::{Component, Fault, Link};
use crate::shim;
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long a component may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where things are and how to start them.
pub struct ClusterConfig {
    pub hangar: PathBuf,
    pub test_backend: PathBuf,
    /// `hangar-chaos` itself, started as `hangar-chaos shim` in front of every backend.
    pub shim: PathBuf,
    /// The server, for faults that stop it.
    pub postgres: Arc<PostgresServer>,
    /// `postgres://user:password@host:port/database` of the run's fresh database.
    pub database_url: url::Url,
    pub controllers: usize,
    pub drones: usize,
    /// Drones with the Docker executor, after the process ones.
    pub docker_drones: usize,
    pub proxies: usize,
    /// Logs and drone state files.
    pub dir: PathBuf,
    /// Marks this run's backend processes (environment `HANGAR_CHAOS_RUN`).
    pub run_id: String,
}

/// A component that exited without a fault stopping it, and what it left behind.
#[derive(Debug)]
pub struct ExitedComponent {
    pub name: String,
    /// How it ended, e.g. `exit status: 1` or `signal: 6 (SIGABRT)`.
    pub status: String,
    /// The end of its log, oldest first.
    pub last_lines: Vec<String>,
}

impl std::fmt::Display for ExitedComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.status)?;
        for line in &self.last_lines {
            write!(f, "\n    | {line}")?;
        }
        Ok(())
    }
}

/// How many lines of an exited component's log are reported.
const EXIT_LOG_LINES: usize = 5;

/// The last `n` lines of a log file (none if it cannot be read).
fn last_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|line| line.to_string())
        .collect()
}

/// A started component: its command line, to start it again, and its process.
struct Process {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    config: ClusterConfig,
    processes: BTreeMap<String, Process>,
    relays: BTreeMap<String, Relay>,
    controller_ports: Vec<u16>,
    proxy_ports: Vec<u16>,
    /// Orders for the proxy ↔ backend relays, and the last order's number.
    link_file: PathBuf,
    link_epoch: u64,
}

fn free_port() -> anyhow::Result<u16> {
    crate::free_port().context("finding a free port")
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    (0..n).map(|_| free_port()).collect()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn name(component: Component) -> String {
    format!("{component:?}")
}

fn link_name(link: Link) -> String {
    format!("{link:?}")
}

impl Cluster {
    /// Starts relays, controllers, drones and the proxy (not waiting for them to be ready).
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Cluster> {
        let link_file = config.dir.join("proxy-backends.link");
        shim::write_mode(&link_file, 0, Some(RelayMode::Pass))?;
        let mut cluster = Cluster {
            controller_ports: free_ports(config.controllers)?,
            proxy_ports: free_ports(config.proxies)?,
            config,
            processes: BTreeMap::new(),
            relays: BTreeMap::new(),
            link_file,
            link_epoch: 0,
        };
        let pg = cluster.config.database_url.clone();
        let pg_addr = local(pg.port().unwrap_or(5432));
        for i in 0..cluster.config.controllers {
            let relay = Relay::start(pg_addr).await?;
            let mut db = pg.clone();
            db.set_port(Some(relay.addr().port()))
                .map_err(|()| anyhow::anyhow!("database URL without a host"))?;
            let port = cluster.controller_ports[i];
            cluster
                .relays
                .insert(link_name(Link::ControllerPostgres(i)), relay);
            let args = [
                "controller",
                "--db",
                db.as_str(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--default-cluster",
                &cluster.cluster(),
            ];
            cluster.spawn(Component::Controller(i), &args)?;
        }
        for j in 0..cluster.config.drones + cluster.config.docker_drones {
            let url = cluster
                .relay_to_controller(Link::DroneController(j), j)
                .await?;
            let state = cluster.config.dir.join(format!("drone-{j}.state"));
            let drone_name = cluster.drone_name(j);
            let executor = if j < cluster.config.drones {
                "process"
            } else {
                "docker"
            };
            let args = [
                "drone",
                "--controller-url",
                &url,
                "--cluster",
                &cluster.cluster(),
                "--name",
                &drone_name,
                "--executor",
                executor,
                "--state-file",
                state.to_str().context("non-UTF-8 directory")?,
            ];
            cluster.spawn(Component::Drone(j), &args)?;
        }
        // Every proxy serves the one cluster, each attached to a controller of its own.
        for p in 0..cluster.config.proxies {
            let url = cluster
                .relay_to_controller(Link::ProxyController(p), p)
                .await?;
            let port = cluster.proxy_ports[p].to_string();
            let args = [
                "proxy",
                "--controller-url",
                &url,
                "--cluster",
                &cluster.cluster(),
                "--host",
                "127.0.0.1",
                "--http-port",
                &port,
            ];
            cluster.spawn(Component::Proxy(p), &args)?;
        }
        Ok(cluster)
    }

    fn drone_name(&self, j: usize) -> String {
        format!("dr-chaos{j}{}", self.config.run_id)
    }

    /// The cluster name: the first proxy's public address (the others are reached with this name
    /// as `Host`, as behind a load balancer).
    pub fn cluster(&self) -> String {
        format!("localhost:{}", self.proxy_ports[0])
    }

    /// Every proxy's address.
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxy_ports.iter().map(|p| local(*p)).collect()
    }

    /// The backend command: the shim in front of the test backend, with what it needs.
    pub fn backend_command(&self) -> (Vec<String>, Vec<(&'static str, String)>) {
        let command = vec![
            self.config.shim.to_string_lossy().into_owned(),
            "shim".into(),
        ];
        let env = vec![
            (
                shim::BACKEND_VAR,
                self.config.test_backend.to_string_lossy().into_owned(),
            ),
            (
                shim::LINK_FILE_VAR,
                self.link_file.to_string_lossy().into_owned(),
            ),
        ];
        (command, env)
    }

    fn order_backend_links(&mut self, mode: Option<RelayMode>) -> anyhow::Result<()> {
        self.link_epoch += 1;
        shim::write_mode(&self.link_file, self.link_epoch, mode)
            .context("writing the proxy ↔ backend order")
    }

    pub fn controller_urls(&self) -> Vec<String> {
        self.controller_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}/"))
            .collect()
    }

    /// Starts the relay of `link`, a node's link to controller `n` (modulo the controllers); returns
    /// the controller URL the node is given.
    async fn relay_to_controller(&mut self, link: Link, n: usize) -> anyhow::Result<String> {
        let controller = local(self.controller_ports[n % self.config.controllers]);
        let relay = Relay::start(controller).await?;
        let url = format!("http://{}/", relay.addr());
        self.relays.insert(link_name(link), relay);
        Ok(url)
    }

    fn spawn(&mut self, component: Component, args: &[&str]) -> anyhow::Result<()> {
        let log = self.config.dir.join(format!("{}.log", name(component)));
        let process = Process {
            args: args.iter().map(|a| a.to_string()).collect(),
            log,
            child: None,
        };
        self.processes.insert(name(component), process);
        self.start_process(component)
    }

    fn start_process(&mut self, component: Component) -> anyhow::Result<()> {
        self.start_named(&name(component))
    }

    /// Starts again every component that exited on its own, as a supervisor with
    /// `Restart=always` (systemd, Docker's restart policy) would, and says for each what it exited
    /// with and the last lines of its log (why it stopped). A component stopped by a fault is not
    /// running (no child) and is left to the fault's heal.
    pub fn restart_exited(&mut self) -> anyhow::Result<Vec<ExitedComponent>> {
        let exited: Vec<ExitedComponent> = self
            .processes
            .iter_mut()
            .filter_map(|(name, process)| {
                let child = process.child.as_mut()?;
                let Ok(Some(status)) = child.try_wait() else {
                    return None;
                };
                Some(ExitedComponent {
                    name: name.clone(),
                    status: status.to_string(),
                    last_lines: last_lines(&process.log, EXIT_LOG_LINES),
                })
            })
            .collect();
        for component in &exited {
            self.start_named(&component.name)?;
        }
        Ok(exited)
    }

    fn start_named(&mut self, key: &str) -> anyhow::Result<()> {
        let hangar = self.config.hangar.clone();
        let process = self.processes.get_mut(key).context("unknown component")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&process.log)
            .context("opening a component log")?;
        let mut command = Command::new(hangar);
        command
            .args(&process.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (var, _) in std::env::vars() {
            if var.starts_with("HANGAR_") {
                command.env_remove(var);
            }
        }
        process.child = Some(command.spawn().context("starting a component")?);
        Ok(())
    }

    fn signal(&self, component: Component, signal: Signal) {
        let pid = self
            .processes
            .get(&name(component))
            .and_then(|p| p.child.as_ref())
            .and_then(Child::id)
            .and_then(|id| i32::try_from(id).ok());
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    async fn wait_exit(&mut self, component: Component) {
        if let Some(mut child) = self
            .processes
            .get_mut(&name(component))
            .and_then(|p| p.child.take())
        {
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    fn relay(&self, link: Link) -> Option<&Relay> {
        self.relays.get(&link_name(link))
    }

    /// Applies a fault (its first half: the heal is [`Cluster::heal`]).
    pub async fn inject(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(c) => {
                self.signal(c, Signal::SIGKILL);
                self.wait_exit(c).await;
            }
            Fault::Pause(c) => self.signal(c, Signal::SIGSTOP),
            Fault::Restart(c) => {
                self.signal(c, Signal::SIGTERM);
                self.wait_exit(c).await;
                self.start_process(c)?;
            }
            Fault::CutPostgres => self.cut_postgres().await?,
            Fault::StopPostgres => self.config.postgres.crash_stop().await?,
            Fault::Drop(Link::ProxyBackends) => self.order_backend_links(None)?,
            Fault::Relay(Link::ProxyBackends, mode) => self.order_backend_links(Some(mode))?,
            Fault::Drop(link) => {
                if let Some(r) = self.relay(link) {
                    r.drop_connections();
                }
            }
            Fault::Relay(link, mode) => {
                if let Some(r) = self.relay(link) {
                    r.set(mode);
                }
            }
        }
        Ok(())
    }

    /// Undoes `fault`.
    pub async fn heal(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(c) => self.start_process(c)?,
            Fault::Pause(c) => self.signal(c, Signal::SIGCONT),
            Fault::Restart(_) | Fault::CutPostgres | Fault::Drop(_) => {}
            Fault::StopPostgres => self.config.postgres.start_server().await?,
            Fault::Relay(Link::ProxyBackends, _) => {
                self.order_backend_links(Some(RelayMode::Pass))?
            }
            Fault::Relay(link, _) => {
                if let Some(r) = self.relay(link) {
                    r.set(RelayMode::Pass);
                }
            }
        }
        Ok(())
    }

    /// Terminates every server connection to the run's database.
    async fn cut_postgres(&self) -> anyhow::Result<()> {
        let database = self
            .config
            .database_url
            .path()
            .trim_start_matches('/')
            .to_string();
        let mut admin = self.config.database_url.clone();
        admin.set_path("/postgres");
        let pool = sqlx::PgPool::connect(admin.as_str()).await?;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .execute(&pool)
        .await?;
        pool.close().await;
        Ok(())
    }

    /// Backends the store records as not terminated.
    pub async fn reported_live(&self) -> anyhow::Result<BTreeSet<String>> {
        let pool = sqlx::PgPool::connect(self.config.database_url.as_str()).await?;
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM backend WHERE last_status_number < 70")
                .fetch_all(&pool)
                .await?;
        pool.close().await;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Backend ids of this run's running backend processes (found by their environment).
    pub fn running_backends(&self) -> BTreeSet<String> {
        running_backend_processes(&self.config.run_id)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// Stops everything: components (SIGCONT first, for paused ones), relays, and any backend
    /// process of this run still running.
    pub async fn shutdown(mut self) {
        let components: Vec<String> = self.processes.keys().cloned().collect();
        for key in components {
            if let Some(mut child) = self.processes.get_mut(&key).and_then(|p| p.child.take()) {
                if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
                if tokio::time::timeout(STOP_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
        for (_, relay) in std::mem::take(&mut self.relays) {
            relay.shutdown().await;
        }
        for (pid, _) in running_backend_processes(&self.config.run_id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for j in self.config.drones..self.config.drones + self.config.docker_drones {
            remove_containers(&self.drone_name(j)).await;
        }
    }
}

/// Removes every container of the Docker drone `drone` (the drone labels its containers).
async fn remove_containers(drone: &str) {
    let label = format!("label=dev.hangar.drone={drone}");
    let Ok(listed) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &label])
        .output()
        .await
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .output()
            .await;
    }
}

/// Whether this machine can run the Docker drone: an engine and the test backend's image
/// (`scripts/build-test-image.sh`), and root, to find the containers' processes in `/proc`.
pub async fn docker_ready() -> bool {
    crate::is_root()
        && Command::new("docker")
            .args(["image", "inspect", DOCKER_IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
}

/// The image the Docker drone's backends run.
pub const DOCKER_IMAGE: &str = "hangar-test-backend:latest";

/// `(pid, SESSION_BACKEND_ID)` of every process whose environment has `HANGAR_CHAOS_RUN=<run_id>`.
pub fn running_backend_processes(run_id: &str) -> Vec<(i32, String)> {
    let marker = format!("{}={run_id}", crate::load::RUN_VAR);
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A zombie (exited, not yet reaped) is not running: its environ reads empty.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if !vars.contains(&marker.as_bytes()) {
            continue;
        }
        let id = vars.iter().find_map(|v| {
            std::str::from_utf8(v)
                .ok()?
                .strip_prefix("SESSION_BACKEND_ID=")
                .map(str::to_string)
        });
        if let Some(id) = id {
            found.push((pid, id));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_component_reports_the_end_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy-0.log");
        let text: String = (1..=8).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let exited = ExitedComponent {
            name: "proxy-0".into(),
            status: "exit status: 1".into(),
            last_lines: last_lines(&log, 3),
        };
        assert_eq!(exited.last_lines, ["line 6", "line 7", "line 8"]);
        assert_eq!(
            exited.to_string(),
            "proxy-0 (exit status: 1)\n    | line 6\n    | line 7\n    | line 8"
        );
        assert!(last_lines(&dir.path().join("missing.log"), 3).is_empty());
    }
}
