//! Client of `GET /pub/b/:backend/status-stream` (Server-Sent Events). Reconnects by itself with
//! backoff and resumes with `Last-Event-ID`, so callers see every status once, in order.

use crate::backoff::Backoff;
use crate::http::{ClientError, ControllerClient};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use hangar_types::state::BackendStatusEntry;
use hangar_types::BackendId;

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

/// Incremental SSE parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
    id: Option<String>,
}

impl SseParser {
    /// Feeds bytes and returns the events they complete.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(SseEvent {
                        id: self.id.take(),
                        data: self.data.join("\n"),
                    });
                    self.data.clear();
                }
                self.id = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => self.data.push(value.to_string()),
                "id" => self.id = Some(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// A status stream that survives disconnects.
pub struct StatusStream {
    client: ControllerClient,
    backend: BackendId,
    last_id: Option<String>,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    parser: SseParser,
    pending: std::collections::VecDeque<SseEvent>,
    backoff: Backoff,
}

impl StatusStream {
    pub fn new(client: ControllerClient, backend: BackendId) -> Self {
        StatusStream {
            client,
            backend,
            last_id: None,
            body: None,
            parser: SseParser::default(),
            pending: Default::default(),
            backoff: Backoff::default(),
        }
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        let mut req = self.client.stream_request(
            reqwest::Method::GET,
            &format!("/pub/b/{}/status-stream", self.backend),
        )?;
        if let Some(id) = &self.last_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::UnexpectedResponse { status, body });
        }
        self.parser = SseParser::default();
        self.body = Some(resp.bytes_stream().boxed());
        self.backoff.connected();
        Ok(())
    }

    /// The next status. Transport errors are retried forever with backoff (wrap in a timeout);
    /// a non-retryable error (e.g. 4xx) is returned.
    pub async fn next(&mut self) -> Result<BackendStatusEntry, ClientError> {
        loop {
            while let Some(ev) = self.pending.pop_front() {
                if ev.id.is_some() {
                    self.last_id = ev.id.clone();
                }
                match serde_json::from_str::<BackendStatusEntry>(&ev.data) {
                    Ok(entry) => return Ok(entry),
                    Err(e) => tracing::warn!(error = %e, "Skipping unparseable status event"),
                }
            }
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.open().await {
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "Status stream connect failed; retrying");
                    self.backoff.wait().await;
                }
                continue;
            };
            match body.next().await {
                Some(Ok(chunk)) => {
                    let events = self.parser.feed(&chunk);
                    self.pending.extend(events);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Status stream interrupted; reconnecting");
                    self.body = None;
                    self.backoff.wait().await;
                }
                None => {
                    self.body = None;
                    self.backoff.wait().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\ndata: {\"a\"").is_empty());
        let evs = p.feed(b":1}\nid: ready\n\ndata: x\ndata: y\n\n");
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    id: Some("ready".into()),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    id: None,
                    data: "x\ny".into()
                }
            ]
        );
        let evs = p.feed(b"data: z\r\n\r\n");
        assert_eq!(evs[0].data, "z");
    }
}
