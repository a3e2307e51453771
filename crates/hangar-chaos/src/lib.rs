//! `hangar-chaos`: Hangar's fault-injection harness. It runs the built `hangar` binary as real
//! processes (controllers on a fresh PostgreSQL database, drones with the process executor, a
//! proxy), puts a fault relay on every link between them, drives a steady client load, injects
//! seeded random faults (combined when they overlap), and judges the recorded history with the
//! checker in [`history`]. See RELIABILITY.md at the repository root.
//!
//! Boundary: talks to Hangar only as a user and an operator would (processes, signals, HTTP, the
//! database it created); it depends on no Hangar crate.

pub mod cluster;
pub mod history;
pub mod load;
pub mod postgres;
pub mod relay;
pub mod run;
pub mod schedule;
pub mod shim;

use std::path::{Path, PathBuf};

/// The workspace's debug binaries (`hangar`, `hangar-test-backend`), built first if missing.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join(name);
    if !path.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args(["build", "-p", name])
            .status()?;
        anyhow::ensure!(status.success(), "building {name} failed");
    }
    Ok(path)
}

/// Whether the harness runs as root (`/proc/self` belongs to the effective user).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// A free loopback port for a component the harness restarts on the same port (bound and
/// released). It is taken below the kernel's ephemeral range: a port from that range (what binding
/// port 0 gives) can meanwhile become the local port of any outgoing connection on the machine, and a
/// restarted controller or proxy then finds it taken for as long as that connection lives. Only a
/// process binding the same random port by number can still race it.
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let range = FIXED_PORTS_FROM..ephemeral_low.max(FIXED_PORTS_FROM + 1000);
    let mut rng = rand::rng();
    for _ in 0..100 {
        let port = rng.random_range(range.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {range:?} after 100 tries")
}

/// Where [`free_port`] starts looking.
const FIXED_PORTS_FROM: u16 = 20000;
