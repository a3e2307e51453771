//! Finds the workspace binaries a scenario runs as child processes (`hangar-test-backend`, `hangar`),
//! building them with cargo when they are missing. A release benchmark uses release binaries, a debug
//! one (the smoke test) debug binaries.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The session backend every scenario spawns.
pub fn test_backend() -> anyhow::Result<PathBuf> {
    workspace_binary("hangar-test-backend", "hangar-test-backend")
}

/// The `hangar` binary (`proxy-ws` runs `hangar proxy` as a child to measure its memory alone).
pub fn hangar() -> anyhow::Result<PathBuf> {
    workspace_binary("hangar", "hangar")
}

fn profile_dir() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the binaries of this build's profile are: `CARGO_TARGET_DIR`, else the directory of this
/// executable (or its parent, for test executables in `deps/`), else the workspace's `target/`.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(target).join(profile_dir()));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(parent) = dir.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    dirs.push(workspace_root().join("target").join(profile_dir()));
    dirs
}

fn find(name: &str) -> Option<PathBuf> {
    candidate_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn workspace_binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    // One build at a time: concurrent scenarios (tests) would otherwise race to build the same binary.
    static BUILD: Mutex<()> = Mutex::new(());
    if let Some(path) = find(name) {
        return Ok(path);
    }
    let _guard = BUILD
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = find(name) {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(workspace_root())
        .args(["build", "-p", package]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    eprintln!("hangar-bench: {name} not found; building it ({build:?})");
    let status = build
        .status()
        .with_context(|| format!("running cargo to build {name}"))?;
    anyhow::ensure!(status.success(), "building {name} failed ({status})");
    find(name).with_context(|| format!("{name} is still missing after building it"))
}
