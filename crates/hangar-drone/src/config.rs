//! The drone's configuration (`DroneConfig`), filled by the binary from file, env and flags.

use crate::executor::{DockerSettings, SocketSettings};
use hangar_types::executable::ExecutorKind;
use hangar_types::timing::{READINESS_TIMEOUT, SOFT_TERMINATE_GRACE};
use hangar_types::{ClusterName, DroneName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DroneConfig {
    /// This drone's name (`dr-…`). It identifies the drone to the controller across reconnects. A
    /// drone with a `state_file` keeps its name there and refuses to start under another one;
    /// `hangar drone` started without a name takes the kept one. Default: that kept name, else a
    /// fresh random name.
    #[serde(default = "DroneName::random")]
    pub name: DroneName,
    /// Base URL of the controller (`http(s)://[bearer-token@]host:port/`). Required.
    pub controller_url: Url,
    /// Cluster this drone runs backends for. Required.
    pub cluster: ClusterName,
    /// Pool this drone belongs to; backends are only placed on drones of their pool. Default: `""`.
    #[serde(default)]
    pub pool: String,
    /// Address through which proxies reach this drone's backends (each backend is `ip:port`).
    /// Default: `127.0.0.1`.
    #[serde(default = "default_ip")]
    pub ip: IpAddr,
    /// SQLite file holding the backends this drone runs and its unacknowledged events, so they survive
    /// a drone restart. Default: none (an in-memory database; nothing survives a restart).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Executors this drone offers. The process executor runs any command a `/ctrl` caller sends, so
    /// offer it only on trusted networks. Default: `["docker"]`.
    #[serde(default = "default_executors")]
    pub executors: Vec<ExecutorKind>,
    /// Time between SIGTERM and SIGKILL for a soft termination, in milliseconds. Default: 10000.
    #[serde(default = "default_grace", with = "duration_ms")]
    pub soft_terminate_grace: Duration,
    /// How long a started backend may take to answer HTTP on its port before it is hard-terminated
    /// with reason `startuptimeout`, in milliseconds. Default: 300000.
    #[serde(default = "default_readiness_timeout", with = "duration_ms")]
    pub readiness_timeout: Duration,
    /// Docker: absolute host directory under which `executable.mount` directories are created
    /// (`mount: true` → `<mount_base>/<key>`, `mount: "a/b"` → `<mount_base>/a/b`, bound at
    /// `/plane-data`). A backend asking for a mount fails when this is absent. Default: none.
    #[serde(default)]
    pub mount_base: Option<PathBuf>,
    /// Docker: runtime for every container (e.g. `runsc` for gVisor). Default: Docker's.
    #[serde(default)]
    pub docker_runtime: Option<String>,
    /// Docker: log driver for every container, as Docker's `LogConfig`:
    /// `{"Type": "json-file", "Config": {"max-size": "10m"}}`. Default: Docker's.
    #[serde(default)]
    pub docker_log_config: Option<serde_json::Value>,
    /// Docker: stopped Hangar containers created longer ago than this are removed by the periodic
    /// cleanup (every minute), in milliseconds. Default: 600000 (10 minutes).
    #[serde(default = "default_cleanup_min_age", with = "duration_ms")]
    pub docker_cleanup_min_age: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9092`. Default: none (off).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket of an external executor speaking Plane's executor protocol (plane-api.md §6.6).
    /// When set, the drone offers the `socket` executor in place of `docker`: every Docker-style
    /// executable goes to the socket, as in Plane (`process` stays if listed in `executors`).
    /// Default: none.
    #[serde(default)]
    pub executor_socket: Option<PathBuf>,
    /// How long the executor socket may stay unreachable before the drone reports an executor error
    /// and ends the socket's backends `terminated` with reason `lost`, in milliseconds. Default:
    /// 30000 (Plane's give-up time).
    #[serde(default = "default_executor_socket_give_up", with = "duration_ms")]
    pub executor_socket_give_up: Duration,
    /// Directory of the backends' kept output lines (the log store). Default: `<state_file>.logs`
    /// beside the state file; without a state file, a temporary directory removed when the drone
    /// stops.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// Most bytes of output kept per backend (oldest lines dropped first), in bytes. Default:
    /// 8388608 (8 MiB).
    #[serde(default = "default_log_backend_bytes")]
    pub log_backend_bytes: u64,
    /// Most bytes of output kept for all backends together (oldest dropped first), in bytes. At
    /// least `log_backend_bytes`. Default: 1073741824 (1 GiB).
    #[serde(default = "default_log_total_bytes")]
    pub log_total_bytes: u64,
    /// How long a backend's output is kept after it ended, in milliseconds. Default: 86400000 (24 h).
    #[serde(default = "default_log_retention", with = "duration_ms")]
    pub log_retention: Duration,
}

/// Docker's log configuration of a container (`HostConfig.LogConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerLogConfig {
    /// The log driver (`json-file`, `local`, `journald`, `none`, …).
    #[serde(rename = "Type")]
    pub kind: String,
    /// Driver options.
    #[serde(rename = "Config", default)]
    pub config: BTreeMap<String, String>,
}

fn default_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn default_executors() -> Vec<ExecutorKind> {
    vec![ExecutorKind::Docker]
}

fn default_grace() -> Duration {
    SOFT_TERMINATE_GRACE
}

fn default_readiness_timeout() -> Duration {
    READINESS_TIMEOUT
}

fn default_executor_socket_give_up() -> Duration {
    Duration::from_secs(30)
}

fn default_log_backend_bytes() -> u64 {
    8 * 1024 * 1024
}

fn default_log_total_bytes() -> u64 {
    1024 * 1024 * 1024
}

fn default_log_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_cleanup_min_age() -> Duration {
    Duration::from_secs(600)
}

/// Durations as integer milliseconds in config files.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl DroneConfig {
    /// A configuration with every default, for `controller_url` and `cluster`.
    pub fn new(controller_url: Url, cluster: ClusterName) -> Self {
        DroneConfig {
            name: DroneName::random(),
            controller_url,
            cluster,
            pool: String::new(),
            ip: default_ip(),
            state_file: None,
            executors: default_executors(),
            soft_terminate_grace: default_grace(),
            readiness_timeout: default_readiness_timeout(),
            mount_base: None,
            docker_runtime: None,
            docker_log_config: None,
            docker_cleanup_min_age: default_cleanup_min_age(),
            metrics_addr: None,
            executor_socket: None,
            executor_socket_give_up: default_executor_socket_give_up(),
            log_dir: None,
            log_backend_bytes: default_log_backend_bytes(),
            log_total_bytes: default_log_total_bytes(),
            log_retention: default_log_retention(),
        }
    }

    /// Where the log store lives: `log_dir`, else `<state_file>.logs`; `None` means a temporary
    /// directory.
    pub fn log_dir(&self) -> Option<PathBuf> {
        self.log_dir.clone().or_else(|| {
            self.state_file.as_ref().map(|state| {
                let mut dir = state.clone().into_os_string();
                dir.push(".logs");
                PathBuf::from(dir)
            })
        })
    }

    /// The log store's limits.
    pub fn log_limits(&self) -> crate::log_store::LogLimits {
        crate::log_store::LogLimits {
            backend_bytes: self.log_backend_bytes,
            total_bytes: self.log_total_bytes,
            retention: self.log_retention,
        }
    }

    /// The executors this drone runs, sorted: `executors`, with `docker` replaced by `socket` when
    /// `executor_socket` is set.
    pub fn offered_executors(&self) -> Vec<ExecutorKind> {
        let mut kinds = self.executors.clone();
        if self.executor_socket.is_some() {
            kinds.retain(|k| *k != ExecutorKind::Docker);
            kinds.push(ExecutorKind::Socket);
        }
        kinds.sort();
        kinds.dedup();
        kinds
    }

    pub fn validate(&self) -> Result<(), DroneConfigError> {
        if !matches!(self.controller_url.scheme(), "http" | "https")
            || self.controller_url.cannot_be_a_base()
        {
            return Err(DroneConfigError::InvalidControllerUrl(redacted(
                &self.controller_url,
            )));
        }
        if self.executors.is_empty() {
            return Err(DroneConfigError::NoExecutors);
        }
        if self.executors.contains(&ExecutorKind::Socket) && self.executor_socket.is_none() {
            return Err(DroneConfigError::SocketWithoutPath);
        }
        if self.readiness_timeout.is_zero() {
            return Err(DroneConfigError::ZeroReadinessTimeout);
        }
        if let Some(base) = &self.mount_base {
            if !base.is_absolute() {
                return Err(DroneConfigError::RelativeMountBase(base.clone()));
            }
        }
        if self
            .docker_runtime
            .as_deref()
            .is_some_and(|r| r.trim().is_empty())
        {
            return Err(DroneConfigError::EmptyDockerRuntime);
        }
        self.log_config()?;
        if self.log_backend_bytes == 0 || self.log_total_bytes < self.log_backend_bytes {
            return Err(DroneConfigError::InvalidLogCaps);
        }
        Ok(())
    }

    /// The parsed `docker_log_config`.
    pub fn log_config(&self) -> Result<Option<DockerLogConfig>, DroneConfigError> {
        self.docker_log_config
            .as_ref()
            .map(|v| {
                serde_json::from_value(v.clone())
                    .map_err(|e| DroneConfigError::InvalidLogConfig(e.to_string()))
            })
            .transpose()
    }

    /// The settings of the socket executor, when `executor_socket` is set.
    pub fn socket_settings(&self) -> Option<SocketSettings> {
        Some(SocketSettings {
            path: self.executor_socket.clone()?,
            ip: self.ip,
            give_up_after: self.executor_socket_give_up,
        })
    }

    /// The settings of the Docker executor.
    pub fn docker_settings(&self) -> Result<DockerSettings, DroneConfigError> {
        Ok(DockerSettings {
            drone: self.name.clone(),
            ip: self.ip,
            mount_base: self.mount_base.clone(),
            runtime: self.docker_runtime.clone(),
            log_config: self.log_config()?,
            cleanup_min_age: self.docker_cleanup_min_age,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DroneConfigError {
    #[error("`controller_url` must be an http or https URL with a host, got {0}")]
    InvalidControllerUrl(String),
    #[error("`executors` must name at least one executor")]
    NoExecutors,
    #[error("the socket executor needs `executor_socket` (`--executor-socket PATH`)")]
    SocketWithoutPath,
    /// The executor is not compiled into this drone. (Every executor is, today; kept so callers
    /// that handle it keep working.)
    #[error("the {0} executor is not available in this build of the drone")]
    ExecutorUnavailable(ExecutorKind),
    #[error("`readiness_timeout` must be more than zero")]
    ZeroReadinessTimeout,
    #[error("`mount_base` must be an absolute path, got {}", .0.display())]
    RelativeMountBase(PathBuf),
    #[error("`docker_runtime` must not be empty")]
    EmptyDockerRuntime,
    #[error(
        "invalid `docker_log_config` (expected {{\"Type\": \"<driver>\", \"Config\": {{…}}}}): {0}"
    )]
    InvalidLogConfig(String),
    #[error("`log_backend_bytes` must be more than zero and at most `log_total_bytes`")]
    InvalidLogCaps,
}

/// The URL with its user info (a bearer token) hidden.
fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_username("redacted");
        let _ = url.set_password(None);
    }
    url.to_string()
}

/// The controller URL may carry a bearer token: never print it.
impl std::fmt::Debug for DroneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DroneConfig")
            .field("name", &self.name)
            .field("controller_url", &redacted(&self.controller_url))
            .field("cluster", &self.cluster)
            .field("pool", &self.pool)
            .field("ip", &self.ip)
            .field("state_file", &self.state_file)
            .field("executors", &self.executors)
            .field("soft_terminate_grace", &self.soft_terminate_grace)
            .field("readiness_timeout", &self.readiness_timeout)
            .field("mount_base", &self.mount_base)
            .field("docker_runtime", &self.docker_runtime)
            .field("docker_log_config", &self.docker_log_config)
            .field("docker_cleanup_min_age", &self.docker_cleanup_min_age)
            .field("metrics_addr", &self.metrics_addr)
            .field("executor_socket", &self.executor_socket)
            .field("executor_socket_give_up", &self.executor_socket_give_up)
            .field("log_dir", &self.log_dir)
            .field("log_backend_bytes", &self.log_backend_bytes)
            .field("log_total_bytes", &self.log_total_bytes)
            .field("log_retention", &self.log_retention)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: DroneConfig = serde_json::from_str(
            r#"{"controller_url": "http://localhost:8080/", "cluster": "localhost:9090"}"#,
        )
        .unwrap();
        assert!(c.name.as_str().starts_with("dr-"));
        assert_eq!(c.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.executors, vec![ExecutorKind::Docker]);
        assert_eq!(c.soft_terminate_grace, SOFT_TERMINATE_GRACE);
        assert_eq!(c.readiness_timeout, READINESS_TIMEOUT);
        assert_eq!(c.mount_base, None);
        assert_eq!(c.docker_cleanup_min_age, Duration::from_secs(600));
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.validate(), Ok(()));
        assert!(serde_json::from_str::<DroneConfig>(
            r#"{"controller_url": "http://x/", "cluster": "c", "bogus": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<DroneConfig>(r#"{"cluster": "c"}"#).is_err());
    }

    #[test]
    fn durations_are_milliseconds_and_validated() {
        let c: DroneConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "cluster": "c", "executors": ["process"],
                "soft_terminate_grace": 1500, "readiness_timeout": 0}"#,
        )
        .unwrap();
        assert_eq!(c.soft_terminate_grace, Duration::from_millis(1500));
        assert_eq!(c.validate(), Err(DroneConfigError::ZeroReadinessTimeout));
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["soft_terminate_grace"], 1500);
    }

    #[test]
    fn docker_settings_are_validated() {
        let c: DroneConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "cluster": "c", "mount_base": "/srv/hangar",
                "docker_runtime": "runsc", "docker_cleanup_min_age": 5000,
                "docker_log_config": {"Type": "json-file", "Config": {"max-size": "10m"}}}"#,
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        let settings = c.docker_settings().unwrap();
        assert_eq!(settings.runtime.as_deref(), Some("runsc"));
        assert_eq!(settings.cleanup_min_age, Duration::from_secs(5));
        let log = settings.log_config.unwrap();
        assert_eq!(log.kind, "json-file");
        assert_eq!(log.config["max-size"], "10m");

        let mut bad = c.clone();
        bad.mount_base = Some("relative/dir".into());
        assert!(matches!(
            bad.validate(),
            Err(DroneConfigError::RelativeMountBase(_))
        ));
        let mut bad = c.clone();
        bad.docker_runtime = Some(" ".into());
        assert_eq!(bad.validate(), Err(DroneConfigError::EmptyDockerRuntime));
        let mut bad = c;
        bad.docker_log_config = Some(serde_json::json!({"Driver": "x"}));
        let err = bad.validate().unwrap_err();
        assert!(
            matches!(err, DroneConfigError::InvalidLogConfig(_)),
            "{err}"
        );
        assert!(err.to_string().contains("Type"), "{err}");
    }

    #[test]
    fn executor_socket_replaces_docker() {
        let c: DroneConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "cluster": "c", "executor_socket": "/run/ex.sock"}"#,
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.offered_executors(), vec![ExecutorKind::Socket]);
        let mut both = c.clone();
        both.executors = vec![ExecutorKind::Process, ExecutorKind::Docker];
        assert_eq!(
            both.offered_executors(),
            vec![ExecutorKind::Process, ExecutorKind::Socket]
        );
        let mut bad = c;
        bad.executor_socket = None;
        bad.executors = vec![ExecutorKind::Socket];
        assert_eq!(bad.validate(), Err(DroneConfigError::SocketWithoutPath));
    }

    #[test]
    fn debug_hides_the_bearer_token() {
        let mut c = DroneConfig::new(
            "http://very-secret@localhost:8080/".parse().unwrap(),
            "c".parse().unwrap(),
        );
        c.executors = vec![ExecutorKind::Process];
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("very-secret"));
        c.controller_url = "ftp://very-secret@x/".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("very-secret"), "{err}");
    }
}
