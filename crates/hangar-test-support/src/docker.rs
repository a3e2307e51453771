//! What the Docker tests (the drone's executor, end to end) share: a check that Docker and the test image are there (failing, not
//! skipping, under CI), and a per-test label with a guard that removes every container and network
//! carrying it when the test ends, even when it fails.

use hangar_types::executable::{DockerExecutable, Executable};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The image `scripts/build-test-image.sh` builds.
pub const TEST_IMAGE: &str = "hangar-test-backend:latest";
/// Label on everything a test creates, valued with the test's run id.
pub const TEST_RUN_LABEL: &str = "dev.hangar.test-run";

/// Runs `docker` with `args`; its stdout when it succeeded.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Whether Docker tests can run: the engine answers and the test image exists (built once if
/// missing). Without Docker a test is skipped, except under CI (`CI` set), where it fails.
pub fn docker_ready() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        docker(&["info", "--format", "{{.ServerVersion}}"])
            .map_err(|e| format!("the Docker engine is unreachable: {e}"))?;
        if docker(&["image", "inspect", TEST_IMAGE]).is_err() {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-image.sh");
            let status = Command::new("bash")
                .arg(&script)
                .status()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !status.success() {
                return Err(format!("{} failed", script.display()));
            }
        }
        Ok(())
    });
    match ready {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("Docker tests need Docker and the test image under CI: {e}")
        }
        Err(e) => {
            eprintln!("skipping a Docker test: {e}");
            false
        }
    }
}

/// One test's Docker objects. Dropping it removes every container and network labelled with it.
pub struct TestRun {
    pub id: String,
}

impl Default for TestRun {
    fn default() -> TestRun {
        TestRun::new()
    }
}

impl TestRun {
    /// A run with a fresh random id.
    pub fn new() -> TestRun {
        TestRun {
            id: format!("t{}", hangar_types::names::random_string()),
        }
    }

    pub fn label(&self) -> String {
        format!("{TEST_RUN_LABEL}={}", self.id)
    }

    /// A Docker executable of the test image with this run's label and `env`.
    pub fn executable(&self, env: &[(&str, &str)]) -> DockerExecutable {
        self.executable_with(env, serde_json::json!({}))
    }

    /// Like [`TestRun::executable`], with more executable fields (`extra` is merged in).
    pub fn executable_with(
        &self,
        env: &[(&str, &str)],
        extra: serde_json::Value,
    ) -> DockerExecutable {
        let env: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let mut json = serde_json::json!({
            "image": TEST_IMAGE,
            "pull_policy": "IfNotPresent",
            "env": env,
            "labels": {TEST_RUN_LABEL: self.id},
        });
        if let (Some(json), Some(extra)) = (json.as_object_mut(), extra.as_object()) {
            json.extend(extra.clone());
        }
        match Executable::from_json(&json).unwrap() {
            Executable::Docker(d) => *d,
            Executable::Process(_) => unreachable!("an image makes a Docker executable"),
        }
    }

    /// Ids of this run's containers (running or not).
    pub fn containers(&self) -> Vec<String> {
        let out = docker(&["ps", "-aq", "--filter", &format!("label={}", self.label())])
            .unwrap_or_default();
        out.lines().map(str::to_string).collect()
    }

    /// Creates a labelled network and returns its name.
    pub fn network(&self) -> String {
        let name = format!("hangar-test-{}", self.id);
        docker(&["network", "create", "--label", &self.label(), &name]).unwrap();
        name
    }
}

impl Drop for TestRun {
    fn drop(&mut self) {
        let containers = self.containers();
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let filter = format!("label={}", self.label());
        if let Ok(networks) = docker(&["network", "ls", "-q", "--filter", &filter]) {
            for network in networks.lines() {
                let _ = docker(&["network", "rm", network]);
            }
        }
    }
}
