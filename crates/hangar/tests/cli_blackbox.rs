//! Black-box tests of the client commands of the built `hangar` binary, against a controller, drone
//! and proxy running in this test process (`hangar_tests::TestEnv`), a hung controller (a socket that
//! never answers) or no controller at all: flags, exit statuses, `--json` documents and errors,
//! `list`, `status`, `terminate`, `connect --key` alone, completions and man pages, renamed variables.

// Helpers outside `#[test]` functions are test code too: a panic there is a test failure.
#![allow(clippy::unwrap_used)]

use hangar_tests::TestEnv;
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::Command;
use tokio::time::timeout;

/// Upper bound for one command or wait.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// `hangar` with no `HANGAR_*` variable of the test's environment.
fn hangar() -> Command {
    hangar_test_support::clean_command(env!("CARGO_BIN_EXE_hangar"))
}

async fn run(cmd: &mut Command) -> Output {
    hangar_test_support::output_within(STEP_TIMEOUT, cmd).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `hangar <command> --controller <controller> <rest>`.
async fn client(controller: &str, args: &[&str]) -> Output {
    let (command, rest) = args.split_first().unwrap();
    run(hangar()
        .arg(command)
        .args(["--controller", controller])
        .args(rest))
    .await
}

/// The whole of stdout as exactly one JSON document.
fn one_document(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "not one line: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Stderr as the `{"error": {...}}` document.
fn error_document(out: &Output) -> Value {
    let stderr = text(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    let doc: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert!(doc["error"]["message"].is_string(), "{doc}");
    doc
}

fn backend_command() -> String {
    format!("'{}'", hangar_tests::test_backend().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_list_describe_and_answer_in_json() {
    timeout(TEST_TIMEOUT, async {
        let env = TestEnv::start().await;
        let url = env.controller_url().to_string();
        // `host:port` without a scheme means http://host:port.
        let bare = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let command = backend_command();
        let cluster = env.cluster.to_string();

        // connect --json: one document, with the status the wait ended with.
        let out = client(
            &bare,
            &[
                "connect",
                "--key",
                "room",
                "--command",
                &command,
                "--cluster",
                &cluster,
                "--json",
            ],
        )
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let connected = one_document(&out);
        let id = connected["backend_id"].as_str().unwrap().to_string();
        assert!(
            connected["url"].as_str().unwrap().starts_with("http://"),
            "{connected}"
        );
        assert_eq!(connected["spawned"], true);
        assert_eq!(connected["final_status"]["status"], "ready", "{connected}");

        // --key alone reuses the live backend, as Plane's CLI.
        let out = client(&url, &["connect", "--key", "room"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with(&format!("Reusing backend: {id}\n")),
            "{stdout}"
        );
        assert!(stdout.lines().any(|l| l == "Status: ready"), "{stdout}");
        // ... and says what to do when the key has no live backend.
        let out = client(&url, &["connect", "--key", "nobody-here"]).await;
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(
                "\"nobody-here\" has no live backend to reuse; give --command or --image"
            ) && stderr.contains("KeyUnheldNoSpawnConfig"),
            "{stderr}"
        );
        let out = client(&url, &["connect", "--key", "nobody-here", "--json"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        let error = error_document(&out);
        assert_eq!(error["error"]["kind"], "KeyUnheldNoSpawnConfig", "{error}");
        assert_eq!(error["error"]["status"], 409, "{error}");
        assert!(error["error"]["id"].is_string(), "{error}");

        // list / ls: a table, filters, one JSON document.
        let out = client(&url, &["list"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let table = text(&out.stdout);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("ID") && lines[0].contains("DRONE"),
            "{table}"
        );
        assert!(
            lines[1].starts_with(&id) && lines[1].contains("room") && lines[1].contains("ready"),
            "{table}"
        );
        let out = client(
            &url,
            &[
                "ls",
                "--status",
                "ready",
                "--key",
                "room",
                "--cluster",
                &cluster,
                "--limit",
                "5",
                "--json",
            ],
        )
        .await;
        let list = one_document(&out);
        assert_eq!(list["backends"][0]["id"], id.as_str(), "{list}");
        assert_eq!(list["limit"], 5);
        let out = client(&url, &["ls", "--status", "terminated", "--json"]).await;
        assert!(one_document(&out)["backends"]
            .as_array()
            .unwrap()
            .is_empty());
        let out = client(&url, &["ls", "--status", "sleeping"]).await;
        assert_eq!(out.status.code(), Some(2));

        // status: the key, the drone and the time of each state.
        let out = client(&url, &["status", &id]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let status = text(&out.stdout);
        assert!(status.starts_with("Status: ready\n"), "{status}");
        assert!(status.contains("\nKey: room\n"), "{status}");
        assert!(status.contains("\nDrone: dr-"), "{status}");
        let history: Vec<&str> = status.lines().filter(|l| l.starts_with("  ")).collect();
        assert!(history.len() >= 2, "{status}");
        assert!(history.iter().all(|l| l.contains(" UTC  ")), "{status}");
        assert!(history.last().unwrap().ends_with("  ready"), "{status}");
        let out = client(&url, &["status", &id, "--json"]).await;
        let details = one_document(&out);
        assert_eq!(details["status"], "ready");
        assert_eq!(details["key"]["name"], "room");
        assert!(
            details["drone"].as_str().unwrap().starts_with("dr-"),
            "{details}"
        );
        assert_eq!(details["history"][0]["status"], "scheduled", "{details}");

        // Errors as JSON on stderr, nothing on stdout.
        let out = client(&url, &["status", "nosuchbackend", "--json"]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert_eq!(error_document(&out)["error"]["kind"], "NotFound");

        // list-nodes --json: one array.
        let out = client(&url, &["list-nodes", "--json"]).await;
        let nodes = one_document(&out);
        assert!(!nodes.as_array().unwrap().is_empty(), "{nodes}");

        // terminate --wait --json: one document; a second terminate says it is already done.
        let out = client(&url, &["terminate", &id, "--wait", "--json"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let terminated = one_document(&out);
        assert_eq!(
            terminated["final_status"]["status"], "terminated",
            "{terminated}"
        );
        let out = client(&url, &["terminate", &id]).await;
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("backend {id} is already terminated")),
            "{stderr}"
        );

        // status --follow --json: JSON lines, one status object per line, up to terminated.
        let out = client(&url, &["status", &id, "--follow", "--json"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines: Vec<Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.first().unwrap()["status"], "scheduled");
        assert_eq!(lines.last().unwrap()["status"], "terminated");
        assert!(lines.iter().all(|l| l["time"].is_i64()), "{lines:?}");

        // connect --timeout-seconds that passes: exit status 124, the document still printed.
        let out = client(
            &url,
            &[
                "connect",
                "--command",
                "sleep 300",
                "--cluster",
                &cluster,
                "--timeout-seconds",
                "1",
                "--json",
            ],
        )
        .await;
        assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
        let pending = one_document(&out);
        assert!(pending["final_status"].is_null(), "{pending}");
        assert_eq!(error_document(&out)["error"]["kind"], "Timeout");
        let stuck = pending["backend_id"].as_str().unwrap();
        let out = client(&url, &["terminate", stuck, "--hard"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        env.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A controller that accepts connections and never answers.
async fn hung_controller() -> (tokio::task::JoinHandle<()>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (task, url)
}

#[tokio::test]
async fn a_hung_controller_gives_the_timeout_exit_status() {
    timeout(TEST_TIMEOUT, async {
        let (task, url) = hung_controller().await;
        let out = client(&url, &["status", "ba1", "--timeout", "1"]).await;
        assert_eq!(out.status.code(), Some(124));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("--timeout"), "{stderr}");
        let out = client(&url, &["list", "--timeout", "1", "--json"]).await;
        assert_eq!(out.status.code(), Some(124));
        assert_eq!(error_document(&out)["error"]["kind"], "Timeout");
        let out = client(&url, &["events", "--timeout", "1"]).await;
        assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
        // Plane's admin commands take --controller and --timeout before their subcommand.
        let out =
            run(hangar().args(["admin", "--controller", &url, "--timeout", "1", "status"])).await;
        assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
        task.abort();
        // Nothing listening: an error (1), not a timeout.
        let out = client("127.0.0.1:1", &["status", "ba1"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn flags_belong_to_their_commands_and_bad_values_say_what_to_write() {
    // Client flags are not taken by server commands, nor before the command.
    for args in [
        &["drone", "--controller", "http://x:1", "--cluster", "c"][..],
        &["dev", "--json"],
        &["controller", "--timeout", "3"],
        &["--controller", "http://x:1", "status", "ba1"],
    ] {
        let out = run(hangar().args(args)).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("unexpected argument"),
            "{args:?}"
        );
    }
    // A usage error with --json is a JSON document too.
    let out = run(hangar().args(["list", "--limit", "0", "--json"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(error_document(&out)["error"]["kind"], "Usage");
    // A controller URL that cannot be one says how to write it.
    let out = run(hangar().args(["status", "ba1", "--controller", "ftp://x"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("write the controller as http://HOST:PORT"),
        "{}",
        text(&out.stderr)
    );
    // An unsupported database names the supported ones.
    let out =
        run(hangar().args(["controller", "--db", "mysql://u:p@db/hangar", "--port", "0"])).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("unsupported database `mysql://…`")
            && stderr.contains("SQLite file path")
            && stderr.contains("postgres://"),
        "{stderr}"
    );
    // The exit statuses are documented in --help.
    let out = run(hangar().arg("--help")).await;
    let help = text(&out.stdout);
    assert!(
        help.contains("Exit status: 0 success; 1 error") && help.contains("124 timeout"),
        "{help}"
    );
}

#[tokio::test]
async fn help_shows_defaults_one_way() {
    let out = run(hangar().arg("--help")).await;
    let commands: Vec<String> = text(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.contains(&"list".to_string()), "{commands:?}");
    for command in &commands {
        let out = run(hangar().args([command.as_str(), "--help"])).await;
        assert!(out.status.success(), "{command}");
        let help = text(&out.stdout);
        assert!(
            !help.contains("[default:"),
            "hangar {command} --help: {help}"
        );
    }
    let out = run(hangar().args(["dev", "--help"])).await;
    assert!(
        text(&out.stdout).contains("Controller port. Default: 8080\n"),
        "{}",
        text(&out.stdout)
    );
    let out = run(hangar().args(["controller", "--help"])).await;
    assert!(text(&out.stdout).contains("Port to listen on. Default: 8080\n"));
}

#[tokio::test]
async fn completions_and_man_pages_are_generated() {
    let out = run(hangar().args(["completions", "bash"])).await;
    assert!(out.status.success());
    let script = text(&out.stdout);
    assert!(
        script.contains("_hangar()") && script.contains("terminate"),
        "{script}"
    );
    let out = run(hangar().args(["completions", "zsh"])).await;
    assert!(text(&out.stdout).starts_with("#compdef hangar"));
    let dir = tempfile::tempdir().unwrap();
    let out = run(hangar().args(["man", "--out"]).arg(dir.path())).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("hangar.1")).unwrap();
    assert!(page.contains(".TH hangar"), "{page}");
    let connect = std::fs::read_to_string(dir.path().join("hangar-connect.1")).unwrap();
    assert!(connect.contains("timeout\\-seconds"), "{connect}");
    assert!(dir.path().join("hangar-admin-connect.1").exists());
}

/// An old variable name keeps working for one release, with a warning naming the new one.
#[tokio::test]
async fn renamed_variables_still_work_with_a_warning() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    timeout(TEST_TIMEOUT, async {
        let port = hangar_tests::free_port().await;
        let db = tempfile::NamedTempFile::new().unwrap();
        let mut child = hangar()
            .arg("controller")
            .arg("--db")
            .arg(db.path())
            .env("HANGAR_PORT", port.to_string())
            .env("HANGAR_HOST", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut warnings = Vec::new();
        while let Some(line) = timeout(STEP_TIMEOUT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
        {
            if line.contains("Controller ready") {
                assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
                break;
            }
            warnings.push(line);
        }
        let warnings = warnings.join("\n");
        assert!(
            warnings.contains("HANGAR_PORT is deprecated")
                && warnings.contains("set HANGAR_CONTROLLER_PORT"),
            "{warnings}"
        );
        assert!(
            warnings.contains("set HANGAR_CONTROLLER_HOST"),
            "{warnings}"
        );
        // The client commands' old name, with a warning on stderr.
        let out = run(hangar()
            .args(["list", "--json"])
            .env("HANGAR_CONTROLLER", format!("http://127.0.0.1:{port}")))
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(one_document(&out)["backends"].is_array());
        assert!(
            text(&out.stderr).contains("set HANGAR_CONTROLLER_URL"),
            "{}",
            text(&out.stderr)
        );
        child.start_kill().unwrap();
    })
    .await
    .expect("test timed out");
}
