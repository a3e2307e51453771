//! Hangar's proxy as a child process of a scenario (`hangar proxy`, the binary of this build's
//! profile), so its memory and CPU time can be read alone from `/proc/<pid>` and it runs on a runtime
//! of its own, like nginx beside it. The system it serves (controller, drone) stays in this process.

use crate::child::ChildProcess;
use crate::system::{eventually, free_port, StoreKind, System, SystemConfig, WAIT};
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

    /// Waits until a `GET url` through the proxy succeeds (it has connected to the controller and
    /// routes the token), then checks the process still runs.
    pub async fn wait_until_routed(&mut self, url: &str) -> anyhow::Result<()> {
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
