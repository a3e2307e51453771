//! Docker and the test image, and each test's labelled objects: the shared test support's.

pub use hangar_test_support::docker::{docker, docker_ready, TestRun, TEST_IMAGE};
