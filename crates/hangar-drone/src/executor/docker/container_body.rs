//! What `docker create` gets for a backend (plane-api.md §6.3.3): environment, labels, the published
//! port, resource limits, the data mount, network, GPUs, runtime, logging and hardened defaults. Pure:
//! every decision is here and unit-tested; the executor only sends the result.

use super::mount::CONTAINER_DATA_DIR;
use super::{DroneProcess, BACKEND_LABEL, DRONE_LABEL, DRONE_PROCESS_LABEL};
use crate::config::DockerLogConfig;
use crate::executor::BackendSpec;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, Mount, MountTypeEnum,
    PortBinding, ResourcesUlimits,
};
use hangar_types::executable::{DockerExecutable, ResourceLimits};
use hangar_types::DroneName;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;

/// The port every containerised backend listens on (`PORT`).
pub const CONTAINER_PORT: u16 = 8080;
/// `CONTAINER_PORT` as Docker names it.
pub const CONTAINER_PORT_KEY: &str = "8080/tcp";
/// CFS period when `cpu_period_percent` is given without `cpu_period`, in microseconds.
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Everything a container's configuration depends on.
pub struct ContainerPlan<'a> {
    pub spec: &'a BackendSpec,
    pub exe: &'a DockerExecutable,
    pub drone: &'a DroneName,
    /// The drone's process, for a drone whose containers die with it.
    pub process: Option<&'a DroneProcess>,
    /// Where the published port listens (the drone's address).
    pub ip: IpAddr,
    /// Host directory mounted at [`CONTAINER_DATA_DIR`].
    pub data_dir: Option<PathBuf>,
    /// Drone-level runtime (`runsc`, …).
    pub runtime: Option<String>,
    pub log_config: Option<DockerLogConfig>,
    /// Whether the storage driver can limit a container's disk (`StorageOpt.size`).
    pub storage_opt_supported: bool,
}

pub fn container_body(plan: &ContainerPlan<'_>) -> ContainerCreateBody {
    let exe = plan.exe;
    let mut host_config = HostConfig {
        // Hardened defaults: never privileged, no privilege gain through setuid binaries, and no raw
        // sockets (packet spoofing on the host network).
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges".to_string()]),
        cap_drop: Some(vec!["NET_RAW".to_string()]),
        network_mode: exe.network_name.clone(),
        runtime: plan.runtime.clone(),
        log_config: plan.log_config.as_ref().map(|l| HostConfigLogConfig {
            typ: Some(l.kind.clone()),
            config: Some(l.config.clone().into_iter().collect()),
        }),
        mounts: plan.data_dir.as_ref().map(|dir| {
            vec![Mount {
                target: Some(CONTAINER_DATA_DIR.to_string()),
                source: Some(dir.display().to_string()),
                typ: Some(MountTypeEnum::BIND),
                ..Default::default()
            }]
        }),
        device_requests: (exe.gpu == Some(true)).then(|| {
            // Count -1: every GPU of the host.
            vec![DeviceRequest {
                driver: Some(String::new()),
                count: Some(-1),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    apply_limits(
        &mut host_config,
        &exe.resource_limits,
        plan.storage_opt_supported,
    );
    // On a named network proxies reach the container's own address; elsewhere the port is
    // published on the drone's address at a port Docker picks.
    if exe.network_name.is_none() {
        let binding = PortBinding {
            host_ip: Some(plan.ip.to_string()),
            host_port: Some(String::new()),
        };
        host_config.port_bindings = Some(HashMap::from([(
            CONTAINER_PORT_KEY.to_string(),
            Some(vec![binding]),
        )]));
    }
    ContainerCreateBody {
        image: Some(exe.image.clone()),
        env: Some(environment(plan)),
        labels: Some(labels(plan)),
        exposed_ports: Some(HashMap::from([(
            CONTAINER_PORT_KEY.to_string(),
            HashMap::new(),
        )])),
        cmd: exe.command.clone(),
        entrypoint: exe.entrypoint.clone(),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The user's variables, then the backend contract's (which win).
fn environment(plan: &ContainerPlan<'_>) -> Vec<String> {
    let mut env: BTreeMap<String, String> = plan.exe.env.clone();
    for (name, value) in plan.spec.contract_env(CONTAINER_PORT) {
        env.insert(name.to_string(), value);
    }
    if plan.data_dir.is_some() {
        env.insert("HANGAR_DATA_DIR".into(), CONTAINER_DATA_DIR.into());
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The user's labels, then the ones the drones find containers by (which win; the user's
/// `dev.hangar.drone-process` is dropped, so a user cannot get a container of a durable drone removed).
fn labels(plan: &ContainerPlan<'_>) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = plan.exe.labels.clone().into_iter().collect();
    labels.insert(BACKEND_LABEL.into(), plan.spec.id.to_string());
    labels.insert(DRONE_LABEL.into(), plan.drone.to_string());
    match plan.process {
        Some(process) => labels.insert(DRONE_PROCESS_LABEL.into(), process.to_string()),
        None => labels.remove(DRONE_PROCESS_LABEL),
    };
    labels
}

/// Plane's mapping of `resource_limits` onto the host config.
fn apply_limits(host: &mut HostConfig, limits: &ResourceLimits, storage_opt_supported: bool) {
    host.memory = limits.memory_limit_bytes;
    host.cpu_period = limits.cpu_period.map(clamp_i64);
    if let Some(percent) = limits.cpu_period_percent {
        let period = limits.cpu_period.unwrap_or(DEFAULT_CPU_PERIOD_US);
        host.cpu_quota = Some(clamp_i64(period.saturating_mul(u64::from(percent)) / 100));
    }
    if let Some(seconds) = limits.cpu_time_limit {
        host.ulimits = Some(vec![ResourcesUlimits {
            name: Some("cpu".to_string()),
            soft: Some(clamp_i64(seconds)),
            hard: Some(clamp_i64(seconds)),
        }]);
    }
    match limits.disk_limit_bytes {
        Some(bytes) if storage_opt_supported => {
            host.storage_opt = Some(HashMap::from([("size".to_string(), bytes.to_string())]));
        }
        Some(_) => tracing::warn!(
            "Ignoring disk_limit_bytes: the Docker storage driver cannot limit container disk usage"
        ),
        None => {}
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::executable::Executable;
    use hangar_types::token::ConnectionToken;
    use hangar_types::BackendId;
    use std::net::Ipv4Addr;

    fn exe(json: serde_json::Value) -> DockerExecutable {
        match Executable::from_json(&json).unwrap() {
            Executable::Docker(d) => *d,
            Executable::Process(_) => unreachable!(),
        }
    }

    fn spec(exe: &DockerExecutable) -> BackendSpec {
        BackendSpec {
            id: BackendId::random(),
            executable: Executable::Docker(Box::new(exe.clone())),
            key: "room-1".parse().unwrap(),
            fencing_token: 42,
            static_token: Some(ConnectionToken::random_static()),
        }
    }

    fn body_of(
        exe: &DockerExecutable,
        adjust: impl FnOnce(&mut ContainerPlan<'_>),
    ) -> ContainerCreateBody {
        let spec = spec(exe);
        let drone: DroneName = "dr-test".parse().unwrap();
        let mut plan = ContainerPlan {
            spec: &spec,
            exe,
            drone: &drone,
            process: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            data_dir: None,
            runtime: None,
            log_config: None,
            storage_opt_supported: false,
        };
        adjust(&mut plan);
        container_body(&plan)
    }

    #[test]
    fn only_an_ephemeral_drone_labels_its_process() {
        let e = exe(serde_json::json!({"image": "app:1",
            "labels": {"dev.hangar.drone-process": "boot.1.2.3"}}));
        let durable = body_of(&e, |_| {}).labels.unwrap();
        assert!(!durable.contains_key(DRONE_PROCESS_LABEL), "{durable:?}");
        let spec = spec(&e);
        let drone: DroneName = "dr-test".parse().unwrap();
        let process: DroneProcess = "boot.4.5.6".parse().unwrap();
        let ephemeral = container_body(&ContainerPlan {
            spec: &spec,
            exe: &e,
            drone: &drone,
            process: Some(&process),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            data_dir: None,
            runtime: None,
            log_config: None,
            storage_opt_supported: false,
        });
        assert_eq!(ephemeral.labels.unwrap()[DRONE_PROCESS_LABEL], "boot.4.5.6");
    }

    fn host(body: &ContainerCreateBody) -> &HostConfig {
        body.host_config.as_ref().unwrap()
    }

    #[test]
    fn environment_labels_and_port() {
        let e = exe(
            serde_json::json!({"image": "app:1", "env": {"PORT": "1", "A": "b"},
            "labels": {"team": "x", "dev.hangar.drone": "spoofed"}}),
        );
        let spec = spec(&e);
        let drone: DroneName = "dr-test".parse().unwrap();
        let body = container_body(&ContainerPlan {
            spec: &spec,
            exe: &e,
            drone: &drone,
            process: None,
            ip: "10.1.2.3".parse().unwrap(),
            data_dir: None,
            runtime: None,
            log_config: None,
            storage_opt_supported: false,
        });
        let env = body.env.clone().unwrap();
        assert!(env.contains(&"A=b".to_string()));
        assert!(env.contains(&"PORT=8080".to_string()));
        assert!(!env.contains(&"PORT=1".to_string()));
        assert!(env.contains(&format!("SESSION_BACKEND_ID={}", spec.id)));
        assert!(env.contains(&"SESSION_BACKEND_KEY=room-1".to_string()));
        assert!(env.contains(&"SESSION_BACKEND_FENCING_TOKEN=42".to_string()));
        let token = spec.static_token.as_ref().unwrap().as_str();
        assert!(env.contains(&format!("SESSION_BACKEND_STATIC_TOKEN={token}")));
        assert!(!env.iter().any(|v| v.starts_with("HANGAR_DATA_DIR=")));
        let labels = body.labels.clone().unwrap();
        assert_eq!(labels["team"], "x");
        assert_eq!(labels[BACKEND_LABEL], spec.id.as_str());
        assert_eq!(labels[DRONE_LABEL], "dr-test");
        let bindings = host(&body).port_bindings.clone().unwrap();
        let binding = &bindings[CONTAINER_PORT_KEY].as_ref().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(binding.host_port.as_deref(), Some(""));
        assert_eq!(body.image.as_deref(), Some("app:1"));
        assert_eq!(body.cmd, None);
        assert_eq!(body.entrypoint, None);
    }

    #[test]
    fn hardened_defaults() {
        let body = body_of(&exe(serde_json::json!({"image": "app:1"})), |_| {});
        let host = host(&body);
        assert_eq!(host.privileged, Some(false));
        assert_eq!(
            host.security_opt.as_deref(),
            Some(&["no-new-privileges".to_string()][..])
        );
        assert_eq!(host.cap_drop.as_deref(), Some(&["NET_RAW".to_string()][..]));
        assert_eq!(host.memory, None);
        assert_eq!(host.mounts, None);
        assert_eq!(host.network_mode, None);
        assert_eq!(host.device_requests, None);
        assert_eq!(host.runtime, None);
        assert_eq!(host.log_config, None);
    }

    #[test]
    fn resource_limits_as_plane_maps_them() {
        let e = exe(serde_json::json!({"image": "app:1", "resource_limits": {
            "cpu_period": 1_000_000, "cpu_period_percent": 80, "cpu_time_limit": 100,
            "memory_limit_bytes": 10_000_000, "disk_limit_bytes": 5_000_000}}));
        let body = body_of(&e, |p| p.storage_opt_supported = true);
        let host = host(&body);
        assert_eq!(host.cpu_period, Some(1_000_000));
        assert_eq!(host.cpu_quota, Some(800_000));
        assert_eq!(host.memory, Some(10_000_000));
        let ulimit = &host.ulimits.as_ref().unwrap()[0];
        assert_eq!(
            (ulimit.name.as_deref(), ulimit.soft, ulimit.hard),
            (Some("cpu"), Some(100), Some(100))
        );
        assert_eq!(host.storage_opt.as_ref().unwrap()["size"], "5000000");
        // Without driver support the disk limit is left out; a percentage alone uses 100 ms.
        let e = exe(serde_json::json!({"image": "app:1", "resource_limits": {
            "cpu_period_percent": 50, "disk_limit_bytes": 5}}));
        let body = body_of(&e, |_| {});
        let limits = body.host_config.as_ref().unwrap();
        assert_eq!(limits.storage_opt, None);
        assert_eq!(limits.cpu_period, None);
        assert_eq!(limits.cpu_quota, Some(50_000));
    }

    #[test]
    fn mount_network_gpu_overrides_runtime_and_logs() {
        let e = exe(
            serde_json::json!({"image": "app:1", "network_name": "my-net", "gpu": true,
            "command": ["serve", "--fast"], "entrypoint": ["/bin/app"]}),
        );
        let log_config = DockerLogConfig {
            kind: "json-file".into(),
            config: BTreeMap::from([("max-size".to_string(), "10m".to_string())]),
        };
        let body = body_of(&e, |p| {
            p.data_dir = Some(PathBuf::from("/srv/hangar/room-1"));
            p.runtime = Some("runsc".into());
            p.log_config = Some(log_config);
        });
        let host = host(&body);
        let mount = &host.mounts.as_ref().unwrap()[0];
        assert_eq!(mount.source.as_deref(), Some("/srv/hangar/room-1"));
        assert_eq!(mount.target.as_deref(), Some("/plane-data"));
        assert_eq!(mount.typ, Some(MountTypeEnum::BIND));
        assert!(body
            .env
            .as_ref()
            .unwrap()
            .contains(&"HANGAR_DATA_DIR=/plane-data".to_string()));
        assert_eq!(host.network_mode.as_deref(), Some("my-net"));
        // On a named network the port is not published.
        assert_eq!(host.port_bindings, None);
        let gpu = &host.device_requests.as_ref().unwrap()[0];
        assert_eq!(gpu.count, Some(-1));
        assert_eq!(gpu.capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(
            body.cmd,
            Some(vec!["serve".to_string(), "--fast".to_string()])
        );
        assert_eq!(body.entrypoint, Some(vec!["/bin/app".to_string()]));
        assert_eq!(host.runtime.as_deref(), Some("runsc"));
        let logs = host.log_config.as_ref().unwrap();
        assert_eq!(logs.typ.as_deref(), Some("json-file"));
        assert_eq!(logs.config.as_ref().unwrap()["max-size"], "10m");
    }
}
