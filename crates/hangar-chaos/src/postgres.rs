//! The harness's own PostgreSQL server: a cluster made with `initdb` in a temporary directory and run
//! with `pg_ctl`, so that a fault can really stop and start the database server (a crash stop,
//! `-m immediate`) without touching any other PostgreSQL on the machine. Runs as the `postgres` user
//! when the harness runs as root (PostgreSQL refuses to run as root).

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tokio::process::Command;

/// How long the server may take to accept connections after a start.
const START_TIMEOUT_SECONDS: &str = "60";

#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Holds the data directory; removed on drop.
    _dir: tempfile::TempDir,
    as_postgres: bool,
}

impl PostgresServer {
    /// Makes a fresh cluster (trust authentication on loopback) and starts it on a free port.
    pub async fn start() -> anyhow::Result<PostgresServer> {
        let bin = bin_dir().await?;
        let as_postgres = crate::is_root();
        let dir = tempfile::Builder::new()
            .prefix("hangar-chaos-pg")
            .tempdir()
            .context("making the PostgreSQL directory")?;
        let data = dir.path().join("data");
        if as_postgres {
            // The server runs as `postgres`: it must own (and reach) its directory.
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()?;
            anyhow::ensure!(status.success(), "chown of the PostgreSQL directory failed");
        }
        let port = crate::free_port()?;
        let server = PostgresServer {
            bin,
            data,
            port,
            _dir: dir,
            as_postgres,
        };
        let data = server
            .data
            .to_str()
            .context("non-UTF-8 temporary directory")?;
        server
            .run(
                "initdb",
                &[
                    "-D",
                    data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            )
            .await?;
        let config = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n\
             fsync = off\nmax_connections = 200\n"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(server.data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, config.as_bytes()))
            .context("writing postgresql.conf")?;
        server.start_server().await?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start_server(&self) -> anyhow::Result<()> {
        let log = self.data.join("server.log");
        let data = self
            .data
            .to_str()
            .context("non-UTF-8 temporary directory")?;
        let log = log.to_str().context("non-UTF-8 temporary directory")?;
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                data,
                "-l",
                log,
                "-w",
                "-t",
                START_TIMEOUT_SECONDS,
            ],
        )
        .await
        .map(drop)
    }

    /// Crash-stops the server (`-m immediate`: no checkpoint, every connection cut at once).
    pub async fn crash_stop(&self) -> anyhow::Result<()> {
        let data = self
            .data
            .to_str()
            .context("non-UTF-8 temporary directory")?;
        self.run("pg_ctl", &["stop", "-D", data, "-m", "immediate", "-w"])
            .await
            .map(drop)
    }

    /// Stops the server (fast shutdown); called when the harness is done. Dropping the server
    /// stops it too (immediately), so a panicking test leaves no server behind.
    pub async fn stop(&self) {
        if let Some(data) = self.data.to_str() {
            let _ = self
                .run("pg_ctl", &["stop", "-D", data, "-m", "fast", "-w"])
                .await;
        }
    }

    /// `program` of the server's binaries, run as `postgres` when the harness is root.
    fn command(&self, program: &Path) -> std::process::Command {
        let mut command = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        command.current_dir("/");
        command
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let program = self.bin.join(program);
        let mut command = Command::from(self.command(&program));
        let output = tokio::time::timeout(Duration::from_secs(120), command.args(args).output())
            .await
            .with_context(|| format!("{} did not finish", program.display()))?
            .with_context(|| format!("running {}", program.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Blocking is fine here: a stop of a stopped server returns at once, a running one stops
        // within a second or two.
        let _ = self
            .command(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The server's binaries: `pg_config --bindir`, else the newest `/usr/lib/postgresql/<v>/bin`
/// (Debian's layout, where `pg_config` may be missing).
async fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output().await {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| Path::new(bin).join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package",
    )
}
