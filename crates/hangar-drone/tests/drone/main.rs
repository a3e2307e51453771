//! Drone tests with real processes, real containers and real sockets: the process and Docker
//! executors on their own, and whole drones against a fake controller.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod docker;
mod executor;
mod fake_controller;
mod metrics;
mod session;
mod test_backend;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
