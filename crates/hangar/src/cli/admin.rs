//! `hangar admin …`: Plane's `plane admin` habits (plane-api.md §1.5), so operators' scripts keep
//! working: the same subcommands, flags and output lines (`Created backend: …`, `Status: <status> at
//! <time>`, `Drone <d> draining initiated.`), and on failure Plane's error text on stderr with exit
//! status 1 (for API errors: message, HTTP status and error id). Thin wrappers over the same client
//! as Hangar's own commands; `--json` is not used here (Plane's output is the contract).
//!
//! Times are printed as Plane prints them (UTC, `2024-06-10 12:34:56.789 UTC`, the fraction only
//! when it is not zero). Plane colours its output on a terminal; Hangar prints plain text.

use crate::cli::cluster::format_age;
use crate::cli::connect::{parse_command_line, CommandLine};
use crate::cli::say;
use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use hangar_client::status_stream::StatusStream;
use hangar_client::{ClientError, ControllerClient};
use hangar_types::api::{ClusterState, ConnectRequest, KeyConfig, NodeState, SpawnConfig};
use hangar_types::executable::Executable;
use hangar_types::{BackendId, BackendStatus, ClusterName, DroneName, KeyName, Millis};
use std::path::PathBuf;
use std::process::ExitCode;

/// Git hash baked in by the build, when the build provides one (as the controller reports it).
const GIT_HASH: &str = match option_env!("HANGAR_GIT_HASH") {
    Some(hash) => hash,
    None => "unknown",
};

/// `max_idle_seconds` of `admin connect` when `--max-idle-seconds` is absent (Plane's default).
pub const DEFAULT_MAX_IDLE_SECONDS: i32 = 500;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// `--controller` and `--timeout`, before or after the subcommand (`hangar admin --controller
    /// URL connect …`, as Plane's).
    #[command(flatten)]
    pub connection: crate::cli::ConnectionArgs,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Get or create a backend (Plane's flags) and follow its status until it is ready.
    Connect(AdminConnectArgs),
    /// Soft- or hard-terminate a backend and follow its status until it is terminated.
    Terminate(AdminTerminateArgs),
    /// Stop scheduling new backends on a drone.
    Drain(AdminDrainArgs),
    /// The controller's status, version and hash beside this client's.
    Status,
    /// The drones and proxies of a cluster, in Plane's layout.
    ClusterState(AdminClusterArgs),
    /// Follow a backend's status until it is terminated.
    BackendStatus(AdminBackendArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("executable").required(true).args(["image", "command"])))]
pub struct AdminConnectArgs {
    #[arg(long)]
    pub cluster: Option<ClusterName>,
    /// Container image to run (required by Plane).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub image: Option<String>,
    /// Hangar extension: run a local process instead of an image (process executor).
    #[arg(long, value_parser = parse_command_line)]
    pub command: Option<CommandLine>,
    #[arg(long)]
    pub key: Option<KeyName>,
    /// Print the backend and return without following its status.
    #[arg(long)]
    pub immediate: bool,
    /// Seconds without any connected client before the backend is terminated.
    #[arg(long, default_value_t = DEFAULT_MAX_IDLE_SECONDS)]
    pub max_idle_seconds: i32,
    /// Explicit backend id (not recommended).
    #[arg(long)]
    pub id: Option<BackendId>,
    /// One static connection token for the backend instead of one per connect.
    #[arg(long)]
    pub static_token: bool,
    /// Drone pool ("" is the default pool).
    #[arg(long, default_value = "")]
    pub pool: String,
    /// Directory under the drone's mount base to mount at /plane-data.
    #[arg(long)]
    pub mount: Option<PathBuf>,
    /// Make the backend reachable only through `<subdomain>.<cluster>`.
    #[arg(long)]
    pub subdomain: Option<String>,
}

#[derive(Debug, Args)]
pub struct AdminTerminateArgs {
    #[command(flatten)]
    pub target: AdminBackendArgs,
    /// SIGKILL at once instead of SIGTERM first.
    #[arg(long)]
    pub hard: bool,
    /// Return without following the status.
    #[arg(long)]
    pub immediate: bool,
}

#[derive(Debug, Args)]
pub struct AdminDrainArgs {
    #[arg(long)]
    pub cluster: ClusterName,
    #[arg(long)]
    pub drone: DroneName,
}

#[derive(Debug, Args)]
pub struct AdminClusterArgs {
    pub cluster: ClusterName,
}

#[derive(Debug, Args)]
pub struct AdminBackendArgs {
    /// The backend (Plane's `--backend BACKEND` works too).
    #[arg(
        required_unless_present = "backend_flag",
        conflicts_with = "backend_flag"
    )]
    pub backend: Option<BackendId>,
    #[arg(long = "backend", id = "backend_flag", value_name = "BACKEND")]
    pub backend_flag: Option<BackendId>,
}

impl AdminBackendArgs {
    /// The backend, given positionally or with `--backend` (clap requires exactly one).
    fn backend(self) -> anyhow::Result<BackendId> {
        self.backend
            .or(self.backend_flag)
            .context("a backend is required")
    }
}

/// Runs an admin command; errors are printed in Plane's words and give exit status 1 (124 when
/// `--timeout` ran out).
pub async fn run(client: &ControllerClient, args: AdminArgs) -> ExitCode {
    let result = match args.command {
        AdminCommand::Connect(args) => connect(client, args).await,
        AdminCommand::Terminate(args) => terminate(client, args).await,
        AdminCommand::Drain(args) => drain(client, args).await,
        AdminCommand::Status => status(client).await,
        AdminCommand::ClusterState(args) => cluster_state(client, &args.cluster).await,
        AdminCommand::BackendStatus(args) => match args.backend() {
            Ok(backend) => follow(client, &backend, BackendStatus::Terminated).await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", plane_error_text(&e));
            if crate::cli::is_timeout(&e) {
                ExitCode::from(crate::cli::exit::TIMEOUT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Plane's description of a client error (its `show_error`), or Hangar's for other failures.
pub fn plane_error_text(err: &anyhow::Error) -> String {
    let Some(client_error) = err.chain().find_map(|c| c.downcast_ref::<ClientError>()) else {
        return crate::cli::describe_error(err);
    };
    match client_error {
        ClientError::Api { status, error } => format!(
            "API returned error status:\n    Message: {}\n    HTTP status: {status}\n    Error ID for correlating with logs: {}",
            error.message, error.id
        ),
        ClientError::UnexpectedResponse { status, .. } => {
            format!("Unexpected status code from API server: {status}")
        }
        ClientError::Transport(e) => format!("HTTP error from API server: {e}"),
        ClientError::InvalidUrl(e) => format!("URL error: {e}"),
        ClientError::WebSocket(e) => format!("WebSocket error: {e}"),
        ClientError::Handshake(e) => format!("Failed to connect to API server: {e}"),
    }
}

/// A store time as Plane prints it: `2024-06-10 12:34:56.789 UTC` (no fraction when it is zero).
pub fn plane_time(time: Millis) -> String {
    let nanos = i128::from(time.0) * 1_000_000;
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(nanos) else {
        return format!("{} ms", time.0);
    };
    let mut text = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if t.millisecond() != 0 {
        text.push_str(&format!(".{:03}", t.millisecond()));
    }
    text.push_str(" UTC");
    text
}

impl AdminConnectArgs {
    /// The request Plane's `admin connect` sends: its executor config is the image with defaults
    /// (`lifetime_limit_seconds` null, `max_idle_seconds` 500 unless given).
    pub fn to_request(&self) -> anyhow::Result<ConnectRequest> {
        let mount = self
            .mount
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let executable = match (&self.image, &self.command) {
            (Some(image), _) => serde_json::json!({
                "image": image, "pull_policy": null, "credentials": null, "env": {},
                "resource_limits": {}, "mount": mount, "network_name": null,
            }),
            (None, Some(CommandLine(command))) => {
                anyhow::ensure!(mount.is_none(), "--mount needs --image");
                serde_json::json!({ "command": command })
            }
            (None, None) => anyhow::bail!("give --image (or Hangar's --command)"),
        };
        let executable = Executable::from_json(&executable).context("invalid executable")?;
        Ok(ConnectRequest {
            key: self.key.clone().map(KeyConfig::named),
            spawn_config: Some(SpawnConfig {
                id: self.id.clone(),
                cluster: self.cluster.clone(),
                pool: self.pool.clone(),
                executable,
                lifetime_limit_seconds: None,
                max_idle_seconds: Some(self.max_idle_seconds),
                use_static_token: self.static_token,
                subdomain: self.subdomain.clone(),
            }),
            user: None,
            auth: Default::default(),
        })
    }
}

async fn connect(client: &ControllerClient, args: AdminConnectArgs) -> anyhow::Result<()> {
    let response = client.connect(&args.to_request()?).await?;
    let verb = if response.spawned {
        "Created"
    } else {
        "Reusing"
    };
    say!("{verb} backend: {}", response.backend_id);
    say!("URL: {}", response.url);
    say!("Status URL: {}", response.status_url);
    if let Some(drone) = &response.drone {
        say!("Drone: {drone}");
    }
    if !args.immediate {
        follow(client, &response.backend_id, BackendStatus::Ready).await?;
    }
    Ok(())
}

/// Prints `Status: <status> at <time>` for the history and every new status, until one at or after
/// `until` (Plane's loop; a terminated backend also ends a wait for `ready`).
async fn follow(
    client: &ControllerClient,
    backend: &BackendId,
    until: BackendStatus,
) -> anyhow::Result<()> {
    let mut stream = StatusStream::new(client.clone(), backend.clone());
    loop {
        let entry = stream.next().await?;
        say!("Status: {} at {}", entry.status, plane_time(entry.time));
        if entry.status >= until {
            return Ok(());
        }
    }
}

async fn terminate(client: &ControllerClient, args: AdminTerminateArgs) -> anyhow::Result<()> {
    let (hard, immediate) = (args.hard, args.immediate);
    let backend = args.target.backend()?;
    if hard {
        client.hard_terminate(&backend).await?;
    } else {
        client.soft_terminate(&backend).await?;
    }
    say!("Sent termination signal {backend}");
    if !immediate {
        follow(client, &backend, BackendStatus::Terminated).await?;
    }
    Ok(())
}

async fn drain(client: &ControllerClient, args: AdminDrainArgs) -> anyhow::Result<()> {
    let result = client.drain(&args.cluster, &args.drone).await?;
    if result.updated {
        say!("Drone {} draining initiated.", args.drone);
    } else {
        say!("Drone {} was already draining.", args.drone);
    }
    Ok(())
}

async fn status(client: &ControllerClient) -> anyhow::Result<()> {
    let status = client.status().await?;
    say!("Status: {}", status.status);
    say!(
        "Version: {} (client: {})",
        status.version,
        hangar_types::VERSION
    );
    say!("Hash: {} (client: {GIT_HASH})", status.hash);
    Ok(())
}

async fn cluster_state(client: &ControllerClient, cluster: &ClusterName) -> anyhow::Result<()> {
    let state = client.cluster_state(cluster).await?;
    print!("{}", render_cluster_state(&state));
    Ok(())
}

fn render_node(out: &mut String, node: &NodeState) {
    let controller = node
        .controller
        .as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string);
    out.push_str(&format!("  {}\n", node.name));
    out.push_str(&format!("    Plane version: {}\n", node.plane_version));
    out.push_str(&format!("    Plane hash: {}\n", node.plane_hash));
    out.push_str(&format!("    Controller: {controller}\n"));
    out.push_str(&format!(
        "    Controller heartbeat age: {}\n",
        format_age(node.controller_heartbeat_age)
    ));
}

/// Plane's `cluster-state` layout: one block per drone, then per proxy.
pub fn render_cluster_state(state: &ClusterState) -> String {
    let mut out = String::from("Drones:\n");
    for drone in &state.drones {
        render_node(&mut out, &drone.node);
        out.push_str(&format!("    Ready: {}\n", drone.ready));
        out.push_str(&format!("    Draining: {}\n", drone.draining));
        out.push_str(&format!("    Backend count: {}\n", drone.backend_count));
        out.push_str(&format!(
            "    Last heartbeat age: {}\n",
            format_age(drone.last_heartbeat_age)
        ));
    }
    out.push_str("Proxies:\n");
    for proxy in &state.proxies {
        render_node(&mut out, proxy);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AdminCommand, clap::Error> {
        crate::parse_flags::<AdminArgs>(args).map(|a| a.command)
    }

    #[test]
    fn times_print_as_plane_prints_them() {
        assert_eq!(
            plane_time(Millis(1_718_022_896_789)),
            "2024-06-10 12:34:56.789 UTC"
        );
        assert_eq!(
            plane_time(Millis(1_718_022_896_000)),
            "2024-06-10 12:34:56 UTC"
        );
        assert_eq!(plane_time(Millis(5)), "1970-01-01 00:00:00.005 UTC");
    }

    #[test]
    fn connect_takes_plane_flags_and_defaults() {
        let AdminCommand::Connect(args) = parse(&["connect", "--image", "ghcr.io/a/b:1"]).unwrap()
        else {
            panic!("not connect");
        };
        let req = args.to_request().unwrap();
        let spawn = req.spawn_config.unwrap();
        assert_eq!(spawn.max_idle_seconds, Some(500));
        assert_eq!(spawn.lifetime_limit_seconds, None);
        assert_eq!(spawn.pool, "");
        assert!(req.key.is_none());
        let AdminCommand::Connect(args) = parse(&[
            "connect",
            "--image",
            "img",
            "--key",
            "k",
            "--immediate",
            "--max-idle-seconds",
            "30",
            "--static-token",
            "--pool",
            "gpu",
            "--mount",
            "data/x",
            "--subdomain",
            "s",
        ])
        .unwrap() else {
            panic!("not connect");
        };
        assert!(args.immediate);
        let spawn = args.to_request().unwrap().spawn_config.unwrap();
        assert_eq!(spawn.max_idle_seconds, Some(30));
        assert!(spawn.use_static_token);
        assert_eq!(spawn.pool, "gpu");
        let exe = serde_json::to_value(&spawn.executable).unwrap();
        assert_eq!(exe["mount"], "data/x", "{exe}");
        // Plane requires --image; Hangar also takes --command.
        assert!(parse(&["connect", "--key", "k"]).is_err());
        let AdminCommand::Connect(args) = parse(&["connect", "--command", "sleep 1"]).unwrap()
        else {
            panic!("not connect");
        };
        let exe =
            serde_json::to_value(&args.to_request().unwrap().spawn_config.unwrap().executable)
                .unwrap();
        assert_eq!(exe["command"], serde_json::json!(["sleep", "1"]));
    }

    #[test]
    fn terminate_and_backend_status_take_the_backend_either_way() {
        for args in [
            &["terminate", "ba1"][..],
            &["terminate", "--backend", "ba1", "--hard", "--immediate"],
            &["backend-status", "ba1"],
            &["backend-status", "--backend", "ba1"],
        ] {
            assert!(parse(args).is_ok(), "{args:?}");
        }
        assert!(parse(&["terminate"]).is_err());
        assert!(parse(&["terminate", "ba1", "--backend", "ba2"]).is_err());
        assert!(parse(&["drain", "--cluster", "localhost:9090"]).is_err());
        assert!(parse(&["drain", "--cluster", "localhost:9090", "--drone", "dr-a"]).is_ok());
        assert!(parse(&["cluster-state", "localhost:9090"]).is_ok());
    }

    #[test]
    fn api_errors_are_shown_as_plane_shows_them() {
        let err = anyhow::Error::new(ClientError::Api {
            status: reqwest::StatusCode::NOT_FOUND,
            error: hangar_types::api::ApiError {
                id: "abc123".into(),
                kind: hangar_types::api::ApiErrorKind::NotFound,
                message: "Backend does not exist".into(),
            },
        });
        assert_eq!(
            plane_error_text(&err),
            "API returned error status:\n    Message: Backend does not exist\n    HTTP status: 404 Not Found\n    Error ID for correlating with logs: abc123"
        );
    }
}
