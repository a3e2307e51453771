//! `spawn_config.executable`: what to run. Opaque JSON in Plane; Hangar parses it at connect time so an
//! unknown field is a 400 then, not a failure on the drone minutes later. An object with `image` is a
//! Docker container; an object with `command` and no `image` is a local process.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Which executor can run an executable. A drone announces the kinds it offers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Docker,
    Process,
    /// An external executor on a unix socket speaking Plane's executor protocol (`hangar drone
    /// --executor-socket`). It receives Docker-style executables, as Plane's executors do.
    Socket,
}

impl ExecutorKind {
    /// Whether an executor of this kind runs executables of kind `executable` (what
    /// [`Executable::kind`] says). A socket executor runs Docker-style executables.
    pub fn runs(self, executable: ExecutorKind) -> bool {
        self == executable || (self == ExecutorKind::Socket && executable == ExecutorKind::Docker)
    }
}

impl std::fmt::Display for ExecutorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutorKind::Docker => "docker",
            ExecutorKind::Process => "process",
            ExecutorKind::Socket => "socket",
        })
    }
}

/// A parsed executable.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Executable {
    Docker(Box<DockerExecutable>),
    Process(ProcessExecutable),
}

impl Executable {
    pub fn kind(&self) -> ExecutorKind {
        match self {
            Executable::Docker(_) => ExecutorKind::Docker,
            Executable::Process(_) => ExecutorKind::Process,
        }
    }

    /// The user's environment variables.
    pub fn env(&self) -> &BTreeMap<String, String> {
        match self {
            Executable::Docker(d) => &d.env,
            Executable::Process(p) => &p.env,
        }
    }

    /// Equal apart from `env` (a warm pool with a claim hook delivers the connect's env by the hook).
    pub fn eq_except_env(&self, other: &Executable) -> bool {
        let mut a = self.clone();
        let mut b = other.clone();
        for e in [&mut a, &mut b] {
            match e {
                Executable::Docker(d) => d.env.clear(),
                Executable::Process(p) => p.env.clear(),
            }
        }
        a == b
    }

    /// Parses the JSON given by a client, with a message fit for an API error.
    pub fn from_json(v: &serde_json::Value) -> Result<Executable, ExecutableError> {
        let obj = v.as_object().ok_or(ExecutableError::NotAnObject)?;
        if obj.contains_key("image") {
            let d: DockerExecutable = serde_json::from_value(v.clone())
                .map_err(|e| ExecutableError::Invalid(e.to_string()))?;
            if d.image.trim().is_empty() {
                return Err(ExecutableError::Invalid("`image` must not be empty".into()));
            }
            Ok(Executable::Docker(Box::new(d)))
        } else if obj.contains_key("command") {
            let p: ProcessExecutable = serde_json::from_value(v.clone())
                .map_err(|e| ExecutableError::Invalid(e.to_string()))?;
            if p.command.is_empty() || p.command[0].is_empty() {
                return Err(ExecutableError::Invalid(
                    "`command` must name a program".into(),
                ));
            }
            Ok(Executable::Process(p))
        } else {
            Err(ExecutableError::NoImageOrCommand)
        }
    }
}

impl<'de> Deserialize<'de> for Executable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Executable::from_json(&v).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecutableError {
    #[error("`executable` must be a JSON object")]
    NotAnObject,
    #[error("`executable` needs `image` (a container) or `command` (a local process)")]
    NoImageOrCommand,
    #[error("invalid `executable`: {0}")]
    Invalid(String),
}

/// A local process: `command[0]` with arguments `command[1..]`, listening on `$PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessExecutable {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the drone's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

/// Docker registry credentials: either user/password or a registry token (untagged, as Plane's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DockerRegistryAuth {
    UsernamePassword { username: String, password: String },
    Token { registrytoken: String },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// CFS period in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period: Option<u64>,
    /// Percentage of one CPU over the period (e.g. 80 = 0.8 CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period_percent: Option<u8>,
    /// Total CPU seconds (RLIMIT_CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limit_bytes: Option<i64>,
}

/// `mount`: `true` (a directory named after the key), a relative path, or `false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Mount {
    Bool(bool),
    Path(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerExecutable {
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<DockerRegistryAuth>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resource_limits: ResourceLimits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Mount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_name: Option<String>,
    /// Hangar extension: request GPUs (`true` = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<bool>,
    /// Hangar extension: override the image's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Hangar extension: override the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Hangar extension: extra container labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn process_and_docker_are_told_apart() {
        let p =
            Executable::from_json(&json!({"command": ["sleep", "1"], "env": {"A": "b"}})).unwrap();
        assert_eq!(p.kind(), ExecutorKind::Process);
        let d = Executable::from_json(&json!({"image": "app:1", "pull_policy": "Never",
            "resource_limits": {"memory_limit_bytes": 1000}, "mount": true}))
        .unwrap();
        assert_eq!(d.kind(), ExecutorKind::Docker);
        let d = Executable::from_json(&json!({"image": "app:1", "command": ["x"]})).unwrap();
        assert_eq!(d.kind(), ExecutorKind::Docker);
    }

    #[test]
    fn bad_executables_are_refused() {
        assert_eq!(
            Executable::from_json(&json!("x")),
            Err(ExecutableError::NotAnObject)
        );
        assert_eq!(
            Executable::from_json(&json!({})),
            Err(ExecutableError::NoImageOrCommand)
        );
        assert!(Executable::from_json(&json!({"command": []})).is_err());
        assert!(Executable::from_json(&json!({"command": ["a"], "bogus": 1})).is_err());
        assert!(Executable::from_json(&json!({"image": "a", "bogus": 1})).is_err());
        assert!(Executable::from_json(&json!({"image": ""})).is_err());
        assert!(Executable::from_json(&json!({"image": "a", "pull_policy": "Sometimes"})).is_err());
    }

    #[test]
    fn socket_executors_run_docker_executables() {
        assert!(ExecutorKind::Socket.runs(ExecutorKind::Docker));
        assert!(ExecutorKind::Docker.runs(ExecutorKind::Docker));
        assert!(!ExecutorKind::Socket.runs(ExecutorKind::Process));
        assert!(!ExecutorKind::Docker.runs(ExecutorKind::Socket));
        assert_eq!(
            serde_json::to_value(ExecutorKind::Socket).unwrap(),
            json!("socket")
        );
        assert_eq!(ExecutorKind::Socket.to_string(), "socket");
    }

    #[test]
    fn roundtrip() {
        let v = json!({"command": ["a", "b"], "env": {"X": "1"}});
        let e = Executable::from_json(&v).unwrap();
        let back = serde_json::to_value(&e).unwrap();
        assert_eq!(Executable::from_json(&back).unwrap(), e);
    }
}
