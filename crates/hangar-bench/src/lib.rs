//! `hangar-bench`: benchmarks that show where Hangar stands. Each scenario starts the system it
//! measures in this process on loopback (controller on SQLite or PostgreSQL, drones, proxy), measures
//! it against a baseline taken in the same run (a bare process start, a direct connection, nginx, a
//! health round trip), and returns a [`report::Report`]: per metric the median, p90, p99, max and the
//! ratio to its baseline. `BENCHMARKS.md` at the repository root explains the scenarios and records
//! results.
//!
//! This crate is a measuring tool, not a component: it uses `anyhow` throughout and may depend on
//! every other crate. Timings are never asserted anywhere (the smoke test checks only shapes and
//! counts).

pub mod binaries;
pub mod child;
pub mod fake_drone;
pub mod http_load;
pub mod machine;
pub mod nginx;
pub mod postgres_db;
pub mod process_usage;
pub mod proxy_process;
pub mod report;
pub mod scenario;
pub mod sql_statements;
pub mod system;

pub use report::{Metric, Report, Summary, Unit};
pub use scenario::{run, BenchOptions, Scenario};
pub use system::StoreKind;
