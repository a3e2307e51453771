//! Black-box tests of the `hangar` binary with PostgreSQL and configuration files: `hangar migrate`,
//! `hangar controller --config` (precedence of flags, environment and file), and the operator commands
//! `mark-lost` and `prevent-renew` against a running controller.
//!
//! The PostgreSQL cases use a fresh database on `HANGAR_TEST_POSTGRES_URL` (skipped without it outside
//! CI).

#![allow(clippy::unwrap_used)]

use hangar_chaos::relay::{Relay, RelayMode};
use hangar_test_support::{eventually_within, free_port};
use hangar_tests::postgres::TestDatabase;
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::timeout;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// `hangar` with no `HANGAR_*` variable of the test's environment.
fn hangar() -> Command {
    hangar_test_support::clean_command(env!("CARGO_BIN_EXE_hangar"))
}

/// `hangar <args>`, run to its end.
async fn run_hangar(args: &[&str]) -> Output {
    hangar_test_support::output_within(STEP_TIMEOUT, hangar().args(args)).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

/// Polls `/pub/health` on `port` until it answers 200.
/// Starts `cmd` (a controller on `port`, its output discarded) and waits until it is healthy.
async fn start_healthy(cmd: &mut Command, port: u16) -> Child {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&mut child, port).await;
    child
}

async fn wait_healthy(child: &mut Child, port: u16) {
    wait_for_health_status(child, port, 200).await;
}

/// Stops the child with SIGTERM and expects a clean exit.
async fn stop(mut child: Child) {
    let pid = child.id().expect("child is running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = timeout(STEP_TIMEOUT, child.wait())
        .await
        .expect("controller did not stop")
        .unwrap();
    assert!(status.success(), "controller exited with {status}");
}

/// Runs `case` on the URL of a fresh database, then drops the database; skipped without a server.
async fn with_database(case: impl AsyncFnOnce(&str)) {
    timeout(TEST_TIMEOUT, async {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        case(db.url()).await;
        db.drop_database().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_runs_twice_on_a_fresh_database() {
    with_database(async |db_url| {
        for round in 0..2 {
            let out = run_hangar(&["migrate", "--db", db_url]).await;
            assert!(
                out.status.success(),
                "round {round}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
            assert!(
                text(&out.stdout).contains("up to date"),
                "{}",
                text(&out.stdout)
            );
            assert!(
                !text(&out.stdout).contains(":postgres@"),
                "the password is not printed"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_postgres_with_a_config_file_and_operator_commands() {
    with_database(async |db_url| {
        let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
        let file = config_file(&format!(
            "db = \"{}\"\nport = {file_port}\ndefault_cluster = \"localhost:9999\"\nbest_of = 3\n",
            db_url
        ));
        let path = file.path().to_str().unwrap().to_string();

        // The environment beats the file.
        let child = start_healthy(
            hangar()
                .args(["controller", "--config", &path])
                .env("HANGAR_CONTROLLER_PORT", env_port.to_string()),
            env_port,
        )
        .await;
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", file_port)).is_err(),
            "not listening on the file's port"
        );
        let controller = format!("http://127.0.0.1:{env_port}");
        let out = run_hangar(&[
            "mark-lost",
            "--controller",
            &controller,
            "localhost:9999",
            "dr-nobody",
        ])
        .await;
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("Drone does not exist"),
            "{}",
            text(&out.stderr)
        );
        let out = run_hangar(&["prevent-renew", "--controller", &controller, "nothing-here"]).await;
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("holds no key"),
            "{}",
            text(&out.stderr)
        );
        stop(child).await;

        // A flag beats the environment (here the old name of the variable, still read).
        let child = start_healthy(
            hangar()
                .args([
                    "controller",
                    "--config",
                    &path,
                    "--port",
                    &flag_port.to_string(),
                ])
                .env("HANGAR_PORT", env_port.to_string()),
            flag_port,
        )
        .await;
        stop(child).await;
    })
    .await;
}

/// A controller started while its database cannot be reached (every connection reset) waits for it
/// instead of exiting: its health check answers 503 meanwhile, and once the database answers the
/// controller starts and is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_waits_for_an_unreachable_database() {
    with_database(async |db_url| {
        let url = url::Url::parse(db_url).unwrap();
        let (relay, url) = Relay::start_for_postgres_url(&url).await.unwrap();
        relay.set(RelayMode::Reset);
        let port = free_port();
        let mut child = hangar()
            .args([
                "controller",
                "--db",
                url.as_str(),
                "--port",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_health_status(&mut child, port, 503).await;
        relay.set(RelayMode::Pass);
        wait_healthy(&mut child, port).await;
        stop(child).await;
        relay.shutdown().await;
    })
    .await;
}

/// Polls `/pub/health` on `port` until it answers `status`; the controller must keep running.
async fn wait_for_health_status(child: &mut Child, port: u16, status: u16) {
    let url = format!("http://127.0.0.1:{port}/pub/health");
    let http = reqwest::Client::new();
    let what = format!("the controller on {port} to answer {status}");
    eventually_within(STEP_TIMEOUT, &what, || {
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("controller exited with {exit} instead of answering {status}");
        }
        let answer = http.get(&url).send();
        async move { (answer.await.ok()?.status() == status).then_some(()) }
    })
    .await
}

#[tokio::test]
async fn bad_config_files_are_refused_with_the_field_named() {
    timeout(TEST_TIMEOUT, async {
        let file = config_file("db = \"x.db\"\nbestof = 3\n");
        let out = run_hangar(&["controller", "--config", file.path().to_str().unwrap()]).await;
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("unknown field `bestof`"), "{err}");
        assert!(err.contains(file.path().to_str().unwrap()), "{err}");

        let file = config_file("controller_url = \"http://127.0.0.1:1/\"\n");
        let out = run_hangar(&["drone", "--config", file.path().to_str().unwrap()]).await;
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("missing `cluster`") && err.contains("--cluster"),
            "{err}"
        );

        let out = run_hangar(&["proxy", "--config", "/nonexistent/proxy.toml"]).await;
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("cannot read"),
            "{}",
            text(&out.stderr)
        );
    })
    .await
    .expect("test timed out");
}
