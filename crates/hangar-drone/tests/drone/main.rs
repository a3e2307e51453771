//! Drone tests with real processes, real containers and real sockets: the process and Docker
//! executors on their own, and whole drones against a fake controller.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod docker;
mod drive;
mod executor;
mod fake_controller;
mod metrics;
mod probe;
mod session;
mod spawn;
mod test_backend;

pub use hangar_test_support::init_tracing;

/// The fields of `/proc/<pid>/stat` after the command name (state, parent, process group, …):
/// `None` once the process is gone.
pub fn proc_stat_fields(pid: impl std::fmt::Display) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    Some(fields.map(str::to_string).collect())
}
