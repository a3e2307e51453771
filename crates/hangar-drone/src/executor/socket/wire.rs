//! Plane's executor-socket messages (plane-api.md §6.6), byte for byte: one JSON object per line,
//! `{"id": <string or null>, "message": <payload>}`. Requests carry an id the answer repeats; events
//! (`TerminateEvent`, `MetricsMessage`) carry `null`. Payloads are externally tagged enums; request
//! arguments are JSON arrays (serde tuple variants) and results are serde `Result`s
//! (`{"Ok": …}` / `{"Err": …}`), as in Plane.

use hangar_types::executable::DockerExecutable;
use hangar_types::protocol::AcquiredKey;
use hangar_types::BackendId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// One line on the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrappedMessage<T> {
    pub id: Option<String>,
    pub message: T,
}

/// Drone → executor (Plane's `MessageToServer`).
#[allow(clippy::large_enum_variant)] // moved once onto the wire
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MessageToServer {
    Prepare(DockerExecutable),
    Spawn(
        BackendId,
        DockerExecutable,
        Option<AcquiredKey>,
        Option<String>,
    ),
    /// `true`: hard (SIGKILL); `false`: soft.
    Terminate(BackendId, bool),
    WaitForBackend(BackendId, SocketAddr),
}

impl MessageToServer {
    /// The request's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            MessageToServer::Prepare(_) => "Prepare",
            MessageToServer::Spawn(..) => "Spawn",
            MessageToServer::Terminate(..) => "Terminate",
            MessageToServer::WaitForBackend(..) => "WaitForBackend",
        }
    }
}

/// Executor → drone (Plane's `MessageToClient`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MessageToClient {
    PrepareResult(Result<(), String>),
    SpawnResult(Result<SpawnResult, String>),
    /// `Ok(true)`: a stop was issued (a `TerminateEvent` follows); `Ok(false)`: nothing to stop.
    TerminateResult(Result<bool, String>),
    WaitForBackendResult(Result<(), WaitError>),
    TerminateEvent(TerminateEvent),
    MetricsMessage(MetricsMessage),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnResult {
    pub container_id: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WaitError {
    StartupTimeout,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminateEvent {
    pub backend_id: BackendId,
    pub exit_code: Option<i32>,
}

/// Plane's `BackendMetricsMessage`. Only the fields Hangar reports are read; the others
/// (`mem_total`, `mem_active`, …) are accepted and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsMessage {
    pub backend_id: BackendId,
    pub mem_used: u64,
    pub mem_limit: u64,
    /// Backend CPU nanoseconds since the previous sample.
    pub cpu_used: u64,
    /// Host CPU nanoseconds over the same window.
    pub sys_cpu: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend() -> BackendId {
        BackendId::random()
    }

    #[test]
    fn requests_are_plane_shaped() {
        let id = backend();
        let exe: DockerExecutable = serde_json::from_value(json!({"image": "app:1"})).unwrap();
        let line = |m: MessageToServer| {
            serde_json::to_value(WrappedMessage {
                id: Some("a1".into()),
                message: m,
            })
            .unwrap()
        };
        assert_eq!(
            line(MessageToServer::Prepare(exe.clone())),
            json!({"id": "a1", "message": {"Prepare": {"image": "app:1", "env": {},
                "resource_limits": {}, "labels": {}}}})
        );
        assert_eq!(
            line(MessageToServer::Terminate(id.clone(), true)),
            json!({"id": "a1", "message": {"Terminate": [id.to_string(), true]}})
        );
        assert_eq!(
            line(MessageToServer::WaitForBackend(
                id.clone(),
                "127.0.0.1:80".parse().unwrap()
            )),
            json!({"id": "a1", "message": {"WaitForBackend": [id.to_string(), "127.0.0.1:80"]}})
        );
        let spawn = line(MessageToServer::Spawn(id.clone(), exe, None, None));
        assert_eq!(spawn["message"]["Spawn"][0], json!(id.to_string()));
        assert_eq!(spawn["message"]["Spawn"][2], json!(null));
        assert_eq!(spawn["message"]["Spawn"][3], json!(null));
    }

    #[test]
    fn plane_answers_parse() {
        let id = backend();
        let parse = |v: serde_json::Value| -> WrappedMessage<MessageToClient> {
            serde_json::from_value(v).unwrap()
        };
        let m = parse(json!({"id": "a1", "message": {"PrepareResult": {"Ok": null}}}));
        assert_eq!(m.message, MessageToClient::PrepareResult(Ok(())));
        let m = parse(json!({"id": "a1", "message": {"PrepareResult": {"Err": "reason"}}}));
        assert_eq!(
            m.message,
            MessageToClient::PrepareResult(Err("reason".into()))
        );
        let m = parse(json!({"id": "a2", "message": {"SpawnResult": {"Ok":
            {"container_id": "anything", "port": 80}}}}));
        assert_eq!(
            m.message,
            MessageToClient::SpawnResult(Ok(SpawnResult {
                container_id: "anything".into(),
                port: 80
            }))
        );
        let m = parse(json!({"id": "a3", "message": {"TerminateResult": {"Ok": true}}}));
        assert_eq!(m.message, MessageToClient::TerminateResult(Ok(true)));
        let m = parse(json!({"id": "a4", "message": {"WaitForBackendResult": {"Ok": null}}}));
        assert_eq!(m.message, MessageToClient::WaitForBackendResult(Ok(())));
        let m = parse(json!({"id": "a4", "message":
            {"WaitForBackendResult": {"Err": "StartupTimeout"}}}));
        assert_eq!(
            m.message,
            MessageToClient::WaitForBackendResult(Err(WaitError::StartupTimeout))
        );
        let m = parse(json!({"id": "a4", "message":
            {"WaitForBackendResult": {"Err": {"Other": "reason"}}}}));
        assert_eq!(
            m.message,
            MessageToClient::WaitForBackendResult(Err(WaitError::Other("reason".into())))
        );
        let m = parse(json!({"id": null, "message": {"TerminateEvent":
            {"backend_id": id.to_string(), "exit_code": 0}}}));
        assert_eq!(m.id, None);
        assert_eq!(
            m.message,
            MessageToClient::TerminateEvent(TerminateEvent {
                backend_id: id.clone(),
                exit_code: Some(0)
            })
        );
        let m = parse(json!({"id": null, "message": {"MetricsMessage": {
            "backend_id": id.to_string(), "mem_used": 1234, "mem_total": 2345, "mem_active": 100,
            "mem_inactive": 200, "mem_unevictable": 0, "mem_limit": 4294967296_u64,
            "cpu_used": 1500000, "sys_cpu": 10000000000_u64}}}));
        let MessageToClient::MetricsMessage(metrics) = m.message else {
            panic!("not metrics");
        };
        assert_eq!(metrics.mem_used, 1234);
        assert_eq!(metrics.sys_cpu, 10_000_000_000);
    }
}
