//! The `hangar-test-backend` binary (built once), from the shared test support.

// Kept for test files written against this path; the others use hangar_test_support directly.
#[allow(unused_imports)]
pub use hangar_test_support::test_backend as path;
