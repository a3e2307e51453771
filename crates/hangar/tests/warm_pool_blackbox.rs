//! Black-box test of `hangar warm-pool set|list|delete`: the built `hangar` binary against a
//! `hangar dev` child process, driven only through the CLI. Covers `--claim-path` (delivered to the
//! claimed backend), `set` replacing the whole configuration, `failed_starts` in the table and in
//! `--json`, delete, and a bad `--claim-path` refused before any request.

// Helpers outside `#[test]` functions are test code too: a panic there is a test failure.
#![allow(clippy::unwrap_used)]

use hangar_test_support::{clean_command, eventually, free_port, output_within, with_timeout};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::Child;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for one CLI command.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn hangar() -> tokio::process::Command {
    clean_command(env!("CARGO_BIN_EXE_hangar"))
}

/// `hangar dev --in-memory` on free ports, its output in a file printed if the test fails; killed
/// when dropped.
struct Dev {
    _child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    controller: String,
}

impl Dev {
    fn start() -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dev.log");
        let out = std::fs::File::create(&log).unwrap();
        let port = free_port().to_string();
        let child = hangar()
            .args(["dev", "--in-memory", "--controller-port", &port])
            .args(["--proxy-port", &free_port().to_string()])
            .args(["--proxy-metrics-addr", "127.0.0.1:0"])
            .args(["--drone-metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Dev {
            _child: child,
            log,
            _dir: dir,
            controller: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `hangar <args> --controller <dev's controller>`.
    async fn run(&self, args: &[&str]) -> Output {
        output_within(
            STEP_TIMEOUT,
            hangar()
                .args(args)
                .args(["--controller", &self.controller])
                .stdin(Stdio::null()),
        )
        .await
    }

    /// Like [`Dev::run`], failing the test unless the command succeeds; returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "hangar {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `hangar warm-pool list --json`: the pools by name.
    async fn pools(&self) -> Vec<Value> {
        let list = document(&self.ok(&["warm-pool", "list", "--json"]).await);
        list["pools"].as_array().unwrap().clone()
    }

    /// The pool `name` from `warm-pool list --json` once `check` holds for it.
    async fn pool_when(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(what, || async {
            self.pools()
                .await
                .into_iter()
                .find(|p| p["name"] == name && check(p))
        })
        .await
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let output = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- hangar dev output ----\n{output}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `stdout` as exactly one JSON document on one line.
fn document(stdout: &str) -> Value {
    assert_eq!(stdout.trim().lines().count(), 1, "not one line: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The cells of the table row whose first cell is `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_commands_set_list_and_delete_pools() {
    with_timeout(TEST_TIMEOUT, async {
        let dev = Dev::start();
        let backend = format!("'{}'", hangar_test_support::test_backend().display());
        eventually("hangar dev to answer", || async {
            dev.run(&["warm-pool", "list"])
                .await
                .status
                .success()
                .then_some(())
        })
        .await;
        let out = dev.ok(&["warm-pool", "list"]).await;
        assert_eq!(out, "No warm pools.\n");

        // A bad --claim-path gets the API's message, and nothing is created.
        for bad in ["claim", "/has space", ""] {
            let out = dev
                .run(&[
                    "warm-pool",
                    "set",
                    "bad",
                    "--size",
                    "1",
                    "--command",
                    &backend,
                    "--claim-path",
                    bad,
                ])
                .await;
            assert_eq!(out.status.code(), Some(1), "{bad:?}");
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("invalid claim_path: an absolute path"),
                "{bad:?}: {stderr}"
            );
        }

        // set --claim-path --json: the pool as stored, with its claim path.
        let hot = [
            "warm-pool",
            "set",
            "hot",
            "--size",
            "2",
            "--command",
            &backend,
            "--claim-path",
            "/claim",
            "--max-age-seconds",
            "3600",
        ];
        let set = document(&dev.ok(&[&hot[..], &["--json"][..]].concat()).await);
        assert_eq!(set["name"], "hot", "{set}");
        assert_eq!(set["size"], 2, "{set}");
        assert_eq!(set["claim_path"], "/claim", "{set}");
        assert_eq!(set["max_age_seconds"], 3600, "{set}");
        assert_eq!(set["failed_starts"], 0, "{set}");
        // A pool whose backends cannot start counts its failed starts.
        dev.ok(&[
            "warm-pool",
            "set",
            "broken",
            "--size",
            "1",
            "--command",
            "false",
        ])
        .await;
        let pools = dev.pools().await;
        assert!(pools.iter().all(|p| p["name"] != "bad"), "{pools:?}");
        dev.pool_when("hot", "hot to be filled", |p| p["ready"] == 2)
            .await;
        let broken = dev
            .pool_when("broken", "a failed start of broken", |p| {
                p["failed_starts"].as_u64() > Some(0)
            })
            .await;
        assert_eq!(broken["ready"], 0, "{broken}");
        assert_eq!(broken["claim_path"], Value::Null, "{broken}");

        // The table: counts, failed starts and claim path per pool.
        let table = dev.ok(&["warm-pool", "list"]).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME", "CLUSTER", "POOL", "SIZE", "READY", "STARTING", "CLAIMED", "FAILED",
                "CLAIM", "PATH"
            ],
            "{table}"
        );
        let cells = row(&table, "hot");
        assert_eq!(
            [cells[2], cells[3], cells[4], cells[6], cells[7], cells[8]],
            ["-", "2", "2", "0", "0", "/claim"],
            "{table}"
        );
        let cells = row(&table, "broken");
        assert!(cells[7].parse::<u64>().unwrap() > 0, "{table}");
        assert_eq!(cells[8], "-", "{table}");

        // A connect claims a ready backend of `hot`, which gets the claim hook with its key.
        let connected = document(
            &dev.ok(&[
                "connect",
                "--key",
                "room",
                "--command",
                &backend,
                "--env",
                "ROLE=a",
                "--json",
            ])
            .await,
        );
        assert_eq!(connected["warm"], true, "{connected}");
        let url = connected["url"].as_str().unwrap();
        let claims: Value = reqwest::get(format!("{}/claim", url.trim_end_matches('/')))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(claims[0]["key"]["name"], "room", "{claims}");
        assert_eq!(claims[0]["env"]["ROLE"], "a", "{claims}");
        dev.pool_when("hot", "the claim to be counted", |p| p["claimed"] == 1)
            .await;

        // `set` replaces the whole configuration: without --claim-path and --max-age-seconds, the
        // pool has neither any more.
        let set = document(&dev.ok(&[&hot[..7], &["--json"][..]].concat()).await);
        assert_eq!(set["claim_path"], Value::Null, "{set}");
        assert_eq!(set["max_age_seconds"], Value::Null, "{set}");

        // delete: the table form, then --json answering with the pool as it was.
        let out = dev.ok(&["warm-pool", "delete", "hot"]).await;
        assert!(out.starts_with("Warm pool hot deleted"), "{out}");
        let deleted = document(&dev.ok(&["warm-pool", "delete", "broken", "--json"]).await);
        assert_eq!(deleted["name"], "broken", "{deleted}");
        let out = dev.run(&["warm-pool", "delete", "hot"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("Warm pool does not exist"));
        assert_eq!(dev.pools().await, Vec::<Value>::new());
        // The claimed backend lives on as an ordinary backend.
        let id = connected["backend_id"].as_str().unwrap();
        let details = document(&dev.ok(&["status", id, "--json"]).await);
        assert_eq!(details["status"], "ready", "{details}");
    })
    .await;
}
