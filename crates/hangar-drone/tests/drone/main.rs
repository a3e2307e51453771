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
