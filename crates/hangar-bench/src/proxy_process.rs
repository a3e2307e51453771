//! Hangar's proxy as a child process of a scenario (`hangar proxy`, the binary of this build's
//! profile), so its memory and CPU time can be read alone from `/proc/<pid>` and it runs on a runtime
//! of its own, like nginx beside it. The system it serves (controller, drone) stays in this process.

use crate::child::ChildProcess;
use crate::system::{eventually, free_port, StoreKind, System, SystemConfig, WAIT};
use hangar_types::api::ConnectResponse;
use hangar_types::executable::Executable;
use hangar_types::BackendStatus;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A running system whose proxy is the child process `proxy`.
pub struct SystemWithProxyProcess {
    pub system: System,
    pub proxy: ChildProcess,
    /// The `hangar` binary the proxy runs.
    pub binary: PathBuf,
}

impl SystemWithProxyProcess {
    /// Starts the system without an in-process proxy, then `hangar proxy` on the cluster's port.
    pub async fn start(store: StoreKind) -> anyhow::Result<SystemWithProxyProcess> {
        let binary = crate::binaries::hangar()?;
        let port = free_port().await?;
        let config = SystemConfig {
            proxy: false,
            cluster_port: Some(port),
            ..SystemConfig::new(store)
        };
        let system = System::start(&config).await?;
        let mut command = tokio::process::Command::new(&binary);
        command
            .arg("proxy")
            .arg("--controller-url")
            .arg(system.controller_url().as_str())
            .arg("--cluster")
            .arg(system.cluster.as_str())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--http-port")
            .arg(port.to_string())
            .env("RUST_LOG", "warn");
        match ChildProcess::spawn("hangar proxy", command) {
            Ok(proxy) => Ok(SystemWithProxyProcess {
                system,
                proxy,
                binary,
            }),
            Err(e) => {
                system.shutdown().await;
                Err(e)
            }
        }
    }

    /// Connects `key` to a backend running `executable` and waits until the backend is ready and
    /// the proxy routes its URL: the connect answer and the backend's own address.
    pub async fn connect_routed(
        &mut self,
        key: &str,
        executable: Executable,
    ) -> anyhow::Result<(ConnectResponse, SocketAddr)> {
        let system = &self.system;
        let request = system.connect_request(key, executable)?;
        let response = system.client.connect(&request).await?;
        system
            .wait_for_status(&response.backend_id, BackendStatus::Ready)
            .await?;
        let backend = system.backend_address(&response.backend_id).await?;
        self.wait_until_routed(&response.url).await?;
        Ok((response, backend))
    }

    /// Waits until a `GET url` through the proxy succeeds (it has connected to the controller and
    /// routes the token), then checks the process still runs.
    async fn wait_until_routed(&mut self, url: &str) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        eventually("the proxy process to route requests", WAIT, || async {
            let ok = http.get(url).send().await.ok()?.status().is_success();
            ok.then_some(())
        })
        .await?;
        self.proxy.check_running()
    }

    pub async fn shutdown(mut self) {
        self.proxy.stop().await;
        self.system.shutdown().await;
    }
}
