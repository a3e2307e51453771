//! Backend logs and events (issue 15), end to end: real backend processes write to stdout and stderr,
//! the drone keeps the lines on its disk, and the controller serves them over the drone's session
//! (`GET /ctrl/b/{backend}/logs`, `/events`), through either controller of a PostgreSQL pair.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::StreamExt;
use hangar_tests::{
    assert_api_error, eventually, shell_executable, with_env, with_postgres_pair, within, TestEnv,
    WAIT,
};
use hangar_types::api::{ApiErrorKind, ConnectRequest};
use hangar_types::executable::Executable;
use hangar_types::logs::{LogLine, LogReadEnd, LogReadEndKind, LogReadItem, LogStream};
use hangar_types::{BackendId, BackendStatus};

/// A connect request whose backend runs `script` in `sh` (with `$BACKEND` the test backend).
fn shell_request(env: &TestEnv, key: &str, script: &str) -> ConnectRequest {
    let mut req = env.connect_request(key, &[]);
    req.spawn_config.as_mut().unwrap().executable = shell_executable(script);
    req
}

/// Makes the test backend behind `url` write `text` to `stream`.
async fn print(env: &TestEnv, url: &str, stream: &str, text: &str) {
    let resp = env
        .http
        .post(format!("{url}print/{stream}"))
        .body(format!("{text}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

/// `GET /ctrl/b/{backend}/logs?{query}` on controller `i`: status and lines.
async fn logs_at(env: &TestEnv, i: usize, backend: &str, query: &str) -> (u16, Vec<LogLine>) {
    let url = format!("{}ctrl/b/{backend}/logs?{query}", env.controller_url_at(i));
    let resp = env.get(url).await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    if status != 200 {
        let error: hangar_types::api::ApiError = serde_json::from_str(&body).expect(&body);
        return (
            status,
            vec![LogLine {
                time: hangar_types::Millis(0),
                stream: LogStream::Stderr,
                line: format!("{:?}: {}", error.kind, error.message),
            }],
        );
    }
    let lines = body
        .lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect();
    (status, lines)
}

fn texts(lines: &[LogLine]) -> Vec<(LogStream, &str)> {
    lines.iter().map(|l| (l.stream, l.line.as_str())).collect()
}

/// Waits until the kept lines of `backend` include `line`.
async fn wait_for_line(env: &TestEnv, backend: &BackendId, line: &str) {
    eventually(&format!("line {line:?} to be kept"), || async {
        let (_, lines) = logs_at(env, 0, backend.as_str(), "").await;
        lines.iter().any(|l| l.line == line).then_some(())
    })
    .await;
}

/// An open `?follow=true` read: yields lines as they arrive, `None` once the server ended it.
struct Follow {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    pending: Vec<u8>,
    /// The read's last line, once it came.
    end: Option<LogReadEnd>,
}

impl Follow {
    async fn open(env: &TestEnv, i: usize, backend: &BackendId, query: &str) -> Follow {
        let url = format!(
            "{}ctrl/b/{backend}/logs?follow=true&{query}",
            env.controller_url_at(i)
        );
        let resp = env.get(url).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        Follow {
            body: Box::pin(resp.bytes_stream()),
            pending: Vec::new(),
            end: None,
        }
    }

    async fn next(&mut self) -> Option<LogLine> {
        loop {
            if let Some(newline) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=newline).collect();
                match serde_json::from_slice(&line).unwrap() {
                    LogReadItem::Line(line) => {
                        assert!(self.end.is_none(), "a line after the end: {line:?}");
                        return Some(line);
                    }
                    LogReadItem::End(end) => {
                        assert!(self.end.is_none(), "two ends: {end:?}");
                        self.end = Some(end);
                        continue;
                    }
                }
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("no log line in time")?;
            self.pending.extend_from_slice(&chunk.unwrap());
        }
    }

    /// Reads to the end of the read: its last line, saying why it ended.
    async fn end(&mut self) -> LogReadEnd {
        while self.next().await.is_some() {}
        self.end.take().expect("the read ended without saying why")
    }

    /// Reads until `line` arrives; panics if the read ends first.
    async fn until(&mut self, line: &str) -> LogLine {
        loop {
            let next = self.next().await.expect("the read ended");
            if next.line == line {
                return next;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_of_both_streams_are_kept_in_order_and_followed() {
    within(with_env(async |env| {
        let resp = env.connect_ready(&env.connect_request("logs", &[])).await;
        let (id, url) = (resp.backend_id.clone(), resp.url.clone());
        // Each line is kept before the next is written, so the order across streams is known.
        print(env, &url, "stdout", "out-1").await;
        wait_for_line(env, &id, "out-1").await;
        print(env, &url, "stderr", "err-1").await;
        wait_for_line(env, &id, "err-1").await;
        print(env, &url, "stdout", "out-2").await;
        wait_for_line(env, &id, "out-2").await;

        let (status, all) = logs_at(env, 0, id.as_str(), "").await;
        assert_eq!(status, 200);
        let ours: Vec<_> = texts(&all)
            .into_iter()
            .filter(|(_, l)| l.starts_with("out-") || l.starts_with("err-"))
            .collect();
        assert_eq!(
            ours,
            [
                (LogStream::Stdout, "out-1"),
                (LogStream::Stderr, "err-1"),
                (LogStream::Stdout, "out-2")
            ]
        );
        assert!(all.windows(2).all(|w| w[0].time <= w[1].time));
        let (_, tail) = logs_at(env, 0, id.as_str(), "tail=1").await;
        assert_eq!(texts(&tail), [(LogStream::Stdout, "out-2")]);
        let (_, recent) = logs_at(env, 0, id.as_str(), "since=1h&tail=2").await;
        assert_eq!(recent.len(), 2);
        let future = hangar_types::Millis::now().0 + 3_600_000;
        let (_, none) = logs_at(env, 0, id.as_str(), &format!("since={future}")).await;
        assert!(none.is_empty());
        // RFC 3339 times too (`+` percent-encoded, as a client sends it).
        let rfc3339 = |t: time::OffsetDateTime| {
            let text = t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
        };
        let hour = time::Duration::hours(1);
        let in_an_hour = rfc3339(time::OffsetDateTime::now_utc() + hour);
        let (status, none) = logs_at(env, 0, id.as_str(), &format!("since={in_an_hour}")).await;
        assert_eq!((status, none.len()), (200, 0));
        let an_hour_ago = rfc3339(time::OffsetDateTime::now_utc() - hour);
        let (_, all_since) = logs_at(env, 0, id.as_str(), &format!("since={an_hour_ago}")).await;
        assert_eq!(all_since, all);

        // Follow: the kept tail first, then each new line, until the backend ends.
        let mut follow = Follow::open(env, 0, &id, "tail=1").await;
        assert_eq!(follow.next().await.unwrap().line, "out-2");
        print(env, &url, "stderr", "err-live").await;
        let live = follow.until("err-live").await;
        assert_eq!(live.stream, LogStream::Stderr);
        print(env, &url, "stdout", "last words").await;
        follow.until("last words").await;
        env.soft_terminated(&id).await;
        assert_eq!(follow.end().await.end, LogReadEndKind::BackendEnded);

        // Kept after the exit.
        let (status, after) = logs_at(env, 0, id.as_str(), "").await;
        assert_eq!(status, 200);
        assert!(after.iter().any(|l| l.line == "last words"));

        // The history, without error lines for a backend terminated on request.
        let events = env.client.backend_events(&id).await.unwrap();
        let statuses: Vec<_> = events.events.iter().map(|e| e.status).collect();
        assert_eq!(statuses.first(), Some(&BackendStatus::Scheduled));
        assert!(statuses.contains(&BackendStatus::Ready));
        assert_eq!(statuses.last(), Some(&BackendStatus::Terminated));
        assert_eq!(events.drone, env.drones[0].name().clone());
        assert_eq!(events.error_lines, None);
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_unreachable_drones_are_answered_clearly() {
    within(with_env(async |env| {
        let (status, body) = logs_at(env, 0, "Not_An_Id", "").await;
        assert_eq!(status, 400, "{body:?}");
        let unknown = BackendId::random();
        let (status, body) = logs_at(env, 0, unknown.as_str(), "").await;
        assert_eq!(status, 404, "{body:?}");
        let events = env.client.backend_events(&unknown).await;
        assert_api_error(events, 404, ApiErrorKind::NotFound);
        let resp = env
            .connect_ready(&env.connect_request("bad-input", &[]))
            .await;
        let id = resp.backend_id.as_str().to_string();
        for query in [
            "tail=x",
            "tail=10001",
            "since=yesterday",
            "since=2024-12-05T12:00:00",
            "since=2024-13-05T12:00:00Z",
            "follow=perhaps",
            "grep=x",
        ] {
            let (status, body) = logs_at(env, 0, &id, query).await;
            assert_eq!(status, 400, "{query}: {body:?}");
            assert!(body[0].line.starts_with("InvalidRequest: "), "{body:?}");
        }

        // Its drone goes away: 503 with the last known status.
        let drone = env.drones.remove(0);
        drone.shutdown().await;
        let body = eventually("503 once the drone's session is gone", || async {
            let (status, body) = logs_at(env, 0, &id, "").await;
            (status == 503).then_some(body)
        })
        .await;
        assert!(body[0].line.starts_with("DroneUnreachable"), "{body:?}");
        assert!(
            body[0].line.contains("last known status: terminated"),
            "{body:?}"
        );
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_crashes_at_startup_shows_why() {
    within(with_env(async |env| {
        let req = shell_request(
            env,
            "crash",
            "echo starting; echo 'fatal: missing DATABASE_URL' >&2; exit 3",
        );
        let resp = env.connect(&req).await;
        let done = env.terminated(&resp.backend_id).await;
        assert_eq!(done.exit_code, Some(3));
        let events = env.client.backend_events(&resp.backend_id).await.unwrap();
        let lines = events.error_lines.expect("error lines of a failed backend");
        assert_eq!(
            texts(&lines),
            [(LogStream::Stderr, "fatal: missing DATABASE_URL")]
        );
        // Both streams are kept. Their relative order is the order in which the drone read two
        // pipes, which the shell's write order does not decide, so only membership is checked here
        // (the order within one stream is checked by the other tests).
        let (_, all) = logs_at(env, 0, resp.backend_id.as_str(), "").await;
        let mut kept = texts(&all);
        kept.sort_by_key(|(stream, _)| *stream == LogStream::Stderr);
        assert_eq!(
            kept,
            [
                (LogStream::Stdout, "starting"),
                (LogStream::Stderr, "fatal: missing DATABASE_URL")
            ]
        );
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_survive_a_drone_restart() {
    within(async {
        let mut env = TestEnv::controller_only(false).await;
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("drone.db");
        let name: hangar_types::DroneName = "dr-logs-restart".parse().unwrap();
        env.add_drone_with_state(&state_file, &name).await;
        let req = shell_request(&env, "restart", "echo 'before the restart'; exit 0");
        let resp = env.connect(&req).await;
        env.terminated(&resp.backend_id).await;
        wait_for_line(&env, &resp.backend_id, "before the restart").await;
        env.drones.remove(0).shutdown().await;
        assert!(dir.path().join("drone.db.logs").is_dir());

        env.add_drone_with_state(&state_file, &name).await;
        let (status, lines) = logs_at(&env, 0, resp.backend_id.as_str(), "").await;
        assert_eq!(status, 200, "{lines:?}");
        assert_eq!(texts(&lines), [(LogStream::Stdout, "before the restart")]);
        env.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_works_through_the_other_controller_of_a_postgres_pair() {
    within(with_postgres_pair(0, async |env| {
        let resp = env.connect_ready_at(1, 1, "pair").await;
        print(env, &resp.url, "stdout", "hello pair").await;
        eventually("the line through controller 1", || async {
            let (status, lines) = logs_at(env, 1, resp.backend_id.as_str(), "").await;
            (status == 200 && lines.iter().any(|l| l.line == "hello pair")).then_some(())
        })
        .await;

        // Controller 1 does not hold the drone's session: it forwards the read to controller 0.
        let mut follow = Follow::open(env, 1, &resp.backend_id, "tail=0").await;
        print(env, &resp.url, "stderr", "followed across controllers").await;
        follow.until("followed across controllers").await;
        env.client_at(1)
            .soft_terminate(&resp.backend_id)
            .await
            .unwrap();
        assert_eq!(follow.end().await.end, LogReadEndKind::BackendEnded);
        env.wait_for_status_at(1, &resp.backend_id, BackendStatus::Terminated)
            .await;
        let events = env
            .client_at(1)
            .backend_events(&resp.backend_id)
            .await
            .unwrap();
        assert_eq!(
            events.events.last().map(|e| e.status),
            Some(BackendStatus::Terminated)
        );
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_is_dropped_stops_on_the_drone() {
    within(with_env(async |env| {
        let resp = env
            .connect_ready(&env.connect_request("dropped", &[]))
            .await;
        print(env, &resp.url, "stdout", "one").await;
        wait_for_line(env, &resp.backend_id, "one").await;
        // Many follows opened and dropped: none of them is left open on the drone (at most 64 are
        // served per session, so a leak would make the next read fail).
        for _ in 0..80 {
            let mut follow = Follow::open(env, 0, &resp.backend_id, "tail=1").await;
            assert_eq!(follow.next().await.unwrap().line, "one");
        }
        let (status, lines) = logs_at(env, 0, resp.backend_id.as_str(), "tail=1").await;
        assert_eq!((status, lines.len()), (200, 1));
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_output_is_captured_by_stream_and_kept_after_removal() {
    use hangar_test_support::docker::{docker_ready, TestRun};
    use hangar_types::executable::ExecutorKind;
    if !docker_ready() {
        return;
    }
    within(async {
        let run = TestRun::new();
        let mut env = TestEnv::controller_only(false).await;
        env.add_drone(|c| c.executors = vec![ExecutorKind::Docker])
            .await;
        env.start_proxy().await;
        let never_pull = serde_json::json!({"pull_policy": "Never"});
        let docker_request = |key: &str, vars: &[(&str, &str)]| {
            let mut req = env.connect_request(key, &[]);
            let executable = run.executable_with(vars, never_pull.clone());
            req.spawn_config.as_mut().unwrap().executable =
                Executable::Docker(Box::new(executable));
            req
        };

        let resp = env.connect_ready(&docker_request("docker-logs", &[])).await;
        wait_for_line(&env, &resp.backend_id, "listening on 0.0.0.0:8080").await;
        env.soft_terminated(&resp.backend_id).await;
        assert!(run.containers().is_empty(), "the container is removed");
        let (status, lines) = logs_at(&env, 0, resp.backend_id.as_str(), "").await;
        assert_eq!(status, 200);
        assert_eq!(
            texts(&lines),
            [
                (LogStream::Stdout, "listening on 0.0.0.0:8080"),
                (LogStream::Stdout, "got SIGTERM"),
                (LogStream::Stdout, "exiting with code 0"),
            ]
        );

        // A container that fails at startup: its stderr explains why.
        let bad = docker_request(
            "docker-crash",
            &[("TEST_BACKEND_EXIT_CODE", "not-a-number")],
        );
        let resp = env.connect(&bad).await;
        let done = env.terminated(&resp.backend_id).await;
        assert_ne!(done.exit_code, Some(0));
        let events = env.client.backend_events(&resp.backend_id).await.unwrap();
        let lines = events
            .error_lines
            .expect("error lines of a failed container");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].stream, LogStream::Stderr);
        assert!(
            lines[0].line.contains("TEST_BACKEND_EXIT_CODE"),
            "{lines:?}"
        );
        env.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_cut_by_its_drone_session_says_so() {
    within(with_env(async |env| {
        let resp = env.connect_ready(&env.connect_request("cut", &[])).await;
        print(env, &resp.url, "stdout", "before the cut").await;
        wait_for_line(env, &resp.backend_id, "before the cut").await;
        let mut follow = Follow::open(env, 0, &resp.backend_id, "tail=1").await;
        assert_eq!(follow.next().await.unwrap().line, "before the cut");

        // The drone's session drops (no close handshake) while the backend runs on: the read ends,
        // and its last line says the drone went away, not that the backend ended.
        env.drones[0].reconnect();
        let end = follow.end().await;
        assert_eq!(end.end, LogReadEndKind::DroneDisconnected, "{end:?}");
        assert!(end.message.is_some_and(|m| m.contains("session")));
        let status = env.client.backend_status(&resp.backend_id).await.unwrap();
        assert_eq!(status.status, BackendStatus::Ready);

        // Once the drone is back, a new follow works again.
        eventually("the drone's session to come back", || async {
            let (status, _) = logs_at(env, 0, resp.backend_id.as_str(), "tail=1").await;
            (status == 200).then_some(())
        })
        .await;
        let mut follow = Follow::open(env, 0, &resp.backend_id, "tail=1").await;
        assert_eq!(follow.next().await.unwrap().line, "before the cut");
    }))
    .await;
}
