//! The SSE status stream read raw: history replay, live events, `Last-Event-ID` resume.

use crate::support::*;
use futures_util::StreamExt;
use hangar_types::{BackendId, BackendState, BackendStatus, TerminationKind, TerminationReason};
use serde_json::Value;

/// One parsed SSE event: `(id, data)`.
pub type SseEvent = (String, Value);

pub struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub async fn open(
        ctl: &TestController,
        backend: &BackendId,
        last_event_id: Option<&str>,
    ) -> SseReader {
        let mut request = ctl
            .http
            .get(format!("{}/pub/b/{backend}/status-stream", ctl.base));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped).
    pub async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str(v.trim()).unwrap());
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    return (id, data);
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("timed out waiting for an SSE event")
                .expect("stream ended")
                .unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

fn terminating() -> BackendState {
    BackendState::Terminating {
        last_status: BackendStatus::Ready,
        termination: TerminationKind::Soft,
        reason: TerminationReason::External,
    }
}

#[tokio::test]
async fn replays_history_then_streams_live_states() {
    with_ready_backend("sse", async |ctl, mut drone, backend| {
        let mut stream = SseReader::open(ctl, &backend, None).await;
        for expected in ["scheduled", "loading", "starting", "waiting", "ready"] {
            let (id, data) = stream.next().await;
            assert_eq!(id, expected);
            assert_eq!(data["status"], expected);
            assert!(data["time"].as_i64().unwrap() > 0);
            assert!(data.get("address").is_none(), "no address is exposed");
        }
        drone.report(50, &backend, terminating()).await;
        let (id, data) = stream.next().await;
        assert_eq!(id, "terminating");
        assert_eq!(data["termination_kind"], "soft");
        assert_eq!(data["termination_reason"], "external");
    })
    .await
}

#[tokio::test]
async fn resumes_after_last_event_id() {
    with_ready_backend("resume", async |ctl, _drone, backend| {
        let mut stream = SseReader::open(ctl, &backend, Some("starting")).await;
        assert_eq!(stream.next().await.0, "waiting");
        assert_eq!(stream.next().await.0, "ready");

        // An unparseable id is ignored: full replay.
        let mut stream = SseReader::open(ctl, &backend, Some("bogus")).await;
        assert_eq!(stream.next().await.0, "scheduled");
    })
    .await
}

#[tokio::test]
async fn unknown_backend_stream_starts_empty_and_shows_later_states() {
    with_drone(async |ctl, mut drone| {
        let id: BackendId = "chosen-id".parse().unwrap();
        let mut stream = SseReader::open(ctl, &id, None).await;
        let mut body = connect_body(Some("chosen"));
        body["spawn_config"]["id"] = serde_json::json!("chosen-id");
        let connected = ctl.connect(&body).await;
        assert_eq!(connected.backend_id, id);
        // `scheduled` may come from the live event; either way states arrive in order.
        assert_eq!(stream.next().await.0, "scheduled");
        drone.report(1, &id, BackendState::Loading).await;
        assert_eq!(stream.next().await.0, "loading");
    })
    .await
}
