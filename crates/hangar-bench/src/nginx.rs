//! nginx as a reference reverse proxy for `proxy-http`: when `nginx` is on `PATH`, a temporary
//! configuration proxies a loopback port to the backend with upstream keep-alive (nginx's usual
//! production setup), and nginx runs in the foreground as a child until [`Nginx::stop`].

use crate::child::ChildProcess;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `nginx` on `PATH`, if any.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

pub struct Nginx {
    child: ChildProcess,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts `binary` listening on `port` and proxying to `upstream`; waits until it answers.
    pub async fn start(binary: &PathBuf, port: u16, upstream: SocketAddr) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("hangar-bench-nginx-")
            .tempdir()
            .context("creating nginx's directory")?;
        let prefix = dir.path().display().to_string();
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = format!(
            r#"daemon off;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream backend {{
        server {upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let child = ChildProcess::spawn("nginx", command)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let started =
            crate::system::eventually("nginx to answer", Duration::from_secs(20), || async {
                crate::http_load::answers_http(addr).await.then_some(())
            })
            .await;
        if let Err(e) = started {
            let log =
                std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default();
            nginx.child.stop().await;
            return Err(e.context(format!("nginx did not start; its error log: {log}")));
        }
        Ok(nginx)
    }

    /// The master's process id (its workers are its children).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id()
    }

    /// The last lines of nginx's error log (why requests failed, if they did).
    pub fn error_log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self._dir.path().join("error.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops nginx (SIGTERM: the master stops its workers) and waits for it.
    pub async fn stop(mut self) {
        self.child.stop().await;
    }
}
