//! Locates (building it once) the `hangar-test-backend` binary.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Path of the test backend binary, built on first use.
pub fn path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "hangar-test-backend"])
            .current_dir(&workspace)
            .status()
            .expect("cannot run cargo to build hangar-test-backend");
        assert!(status.success(), "building hangar-test-backend failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let binary = target.join("debug/hangar-test-backend");
        assert!(binary.exists(), "{} is missing", binary.display());
        binary
    })
}
