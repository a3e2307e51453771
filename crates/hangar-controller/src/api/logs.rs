//! `GET /ctrl/b/{backend}/logs` (a backend's output, kept on its drone) and
//! `GET /ctrl/b/{backend}/events` (its state history, with its last stderr lines when it failed).
//!
//! Logs are JSON lines (`application/x-ndjson`, one `{"time", "stream", "line"}` per line, chunked).
//! They come from the drone over its session ([`crate::log_relay`]); when the drone's session is held
//! by another controller of the same store, the request is forwarded once to that controller's
//! `internal_url` (marked with [`FORWARDED_HEADER`] so it is never forwarded again) and its answer
//! streamed back. Lines never pass through the store.

use crate::api::backend_views::{backend_row, backend_with_history};
use crate::api::{ApiPath, AppState};
use crate::error::ApiError;
use crate::log_relay::{LogChunk, LogQuery, LogRead};
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use hangar_store::BackendRow;
use hangar_types::logs::{
    BackendEvents, LogEndReason, LogLine, LogReadEnd, LogReadEndKind, LogSince, LogStream,
};
use hangar_types::{BackendId, BackendState, BackendStatus};
use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

/// Set on a request forwarded to the controller holding the drone's session (its value: the
/// forwarding controller's name); such a request is answered, never forwarded again.
pub const FORWARDED_HEADER: &str = "x-hangar-forwarded-by";
/// Largest `?tail=` accepted (the drone serves at most this many kept lines per read).
pub const MAX_TAIL: u32 = 10_000;
/// Lines asked of the drone for a failed backend's events, and how many of them are shown.
const ERROR_TAIL: u32 = 200;
const ERROR_LINES: usize = 10;
/// How long the events endpoint waits for the failed backend's last lines.
const ERROR_LINES_WAIT: Duration = Duration::from_secs(3);
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A forwarded read without `follow` must be over within this.
const FORWARD_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a follow waits for the drone to confirm it watches the backend before answering anyway.
const FOLLOW_START_WAIT: Duration = Duration::from_secs(5);

/// `GET /ctrl/b/{backend}/logs[?since=10m|<ms>|<RFC 3339>][&tail=N][&follow=true]`.
#[utoipa::path(get, path = "/ctrl/b/{backend}/logs", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id"), ("since" = Option<String>, Query, description = "Only lines written since then: an RFC 3339 time (2024-12-05T12:00:00Z), milliseconds since the epoch (1733400000000), or a duration ago (500ms, 90s, 10m, 2h, 1d)"), ("tail" = Option<u32>, Query, description = "Only the last N lines (at most 10000)"), ("follow" = Option<bool>, Query, description = "Keep streaming new lines until the backend ends")), responses((status = 200, description = "Chunked JSON lines, one LogLine object per line; a follow (and a read that ended early) ends with one LogReadEnd object saying why", content_type = "application/x-ndjson", body = LogLine)))]
pub async fn backend_logs_get(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = parse_query(raw.as_deref())?;
    let row = backend_row(&state, &backend).await?;
    let body = match open(&state, &row, query, &headers).await? {
        Source::Local(mut read) => {
            // A follow is answered once the drone watches the backend (its first batch), so a line
            // written after the client got its answer is never missed. Bounded for older drones
            // that send nothing until a line comes.
            let first = if query.follow {
                tokio::time::timeout(FOLLOW_START_WAIT, read.next())
                    .await
                    .ok()
                    .flatten()
            } else {
                None
            };
            Body::from_stream(ndjson(first, read, query.follow))
        }
        Source::Forwarded(response) if response.status() != reqwest::StatusCode::OK => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = response.bytes().await.unwrap_or_default();
            let mut answer = (status, body).into_response();
            answer.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(answer);
        }
        Source::Forwarded(response) => Body::from_stream(forwarded(response)),
    };
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// `GET /ctrl/b/{backend}/events`.
#[utoipa::path(get, path = "/ctrl/b/{backend}/events", tag = "ctrl", params(("backend" = BackendId, Path, description = "Backend id")), responses((status = 200, description = "The backend's state history, drone and last error lines", body = BackendEvents)))]
pub async fn backend_events_get(
    State(state): State<AppState>,
    ApiPath(backend): ApiPath<BackendId>,
    headers: HeaderMap,
) -> Result<Json<BackendEvents>, ApiError> {
    let (row, events) = backend_with_history(&state, &backend).await?;
    let error_lines = if failed(&row.state) {
        last_error_lines(&state, &row, &headers).await
    } else {
        None
    };
    Ok(Json(BackendEvents {
        backend_id: row.id,
        cluster: row.cluster,
        drone: row.drone,
        events,
        error_lines,
    }))
}

/// Terminated by an error, a non-zero exit, the OOM killer or the loss of its drone.
fn failed(state: &BackendState) -> bool {
    use hangar_types::TerminationReason as R;
    match state {
        BackendState::Terminated {
            reason,
            exit_code,
            oom_killed,
            ..
        } => {
            *oom_killed
                || matches!(reason, Some(R::StartupTimeout | R::InternalError | R::Lost))
                || (reason.is_none() && exit_code.is_some_and(|c| c != 0))
        }
        _ => false,
    }
}

/// The failed backend's last stderr lines (or last lines, when it wrote none to stderr); `None` when
/// its drone cannot be asked in time.
async fn last_error_lines(
    state: &AppState,
    row: &BackendRow,
    headers: &HeaderMap,
) -> Option<Vec<LogLine>> {
    let query = LogQuery {
        since: None,
        tail: Some(ERROR_TAIL),
        follow: false,
    };
    let collect = async {
        let lines = match open(state, row, query, headers).await.ok()? {
            Source::Local(mut read) => {
                let mut lines = Vec::new();
                while let Some(LogChunk::Lines(batch)) = read.next().await {
                    lines.extend(batch);
                }
                lines
            }
            Source::Forwarded(response) if response.status() == reqwest::StatusCode::OK => {
                let body = response.bytes().await.ok()?;
                body.split(|b| *b == b'\n')
                    .filter_map(|line| serde_json::from_slice::<LogLine>(line).ok())
                    .collect()
            }
            Source::Forwarded(_) => return None,
        };
        Some(lines)
    };
    let lines = tokio::time::timeout(ERROR_LINES_WAIT, collect)
        .await
        .ok()
        .flatten()?;
    let stderr: Vec<LogLine> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Stderr)
        .cloned()
        .collect();
    let mut chosen = if stderr.is_empty() { lines } else { stderr };
    let skip = chosen.len().saturating_sub(ERROR_LINES);
    chosen.drain(..skip);
    Some(chosen)
}

/// Where a read's lines come from.
enum Source {
    /// The drone's session is held here.
    Local(LogRead),
    /// Another controller holds it: its answer.
    Forwarded(reqwest::Response),
}

async fn open(
    state: &AppState,
    row: &BackendRow,
    query: LogQuery,
    headers: &HeaderMap,
) -> Result<Source, ApiError> {
    if let Some(read) = state
        .drone_links
        .open(&row.cluster, &row.drone, &row.id, query)
    {
        return Ok(Source::Local(read));
    }
    let unreachable = || ApiError::DroneUnreachable {
        status: row.state.status(),
    };
    if headers.contains_key(FORWARDED_HEADER) {
        return Err(unreachable());
    }
    let holder = state
        .store
        .drone_controller(&row.cluster, &row.drone)
        .await
        .map_err(ApiError::store("Database error"))?
        .filter(|holder| holder.controller != state.config.name);
    let Some(url) = holder.and_then(|holder| holder.internal_url) else {
        return Err(unreachable());
    };
    let mut url = url::Url::parse(&url).map_err(|_| unreachable())?;
    url.set_path(&format!("/ctrl/b/{}/logs", row.id));
    url.set_query(Some(&query_string(query)));
    let mut request = forward_client()
        .map_err(|_| unreachable())?
        .get(url.clone())
        .header(FORWARDED_HEADER, state.config.name.as_str());
    for name in [header::AUTHORIZATION, header::COOKIE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    if !query.follow {
        request = request.timeout(FORWARD_READ_TIMEOUT);
    }
    match request.send().await {
        Ok(response) => Ok(Source::Forwarded(response)),
        Err(e) => {
            tracing::warn!(backend = %row.id, controller = %url.host_str().unwrap_or(""), error = %e,
                "Cannot forward a log read to the drone's controller");
            Err(unreachable())
        }
    }
}

fn forward_client() -> Result<&'static reqwest::Client, reqwest::Error> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(client) = CLIENT.get() {
        return Ok(client);
    }
    let client = reqwest::Client::builder()
        .connect_timeout(FORWARD_CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    Ok(CLIENT.get_or_init(|| client))
}

/// The lines of a read as JSON lines, one chunk per batch, until the drone ends the read (or its
/// session ends), then the [`LogReadEnd`] line saying why (always for a follow; for another read only
/// when it ended early).
fn ndjson(
    first: Option<LogChunk>,
    read: LogRead,
    follow: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(Some((first, read)), move |open| async move {
        let (first, mut read) = open?;
        let chunk = match first {
            Some(chunk) => Some(chunk),
            None => read.next().await,
        };
        let end = match chunk {
            Some(LogChunk::Lines(lines)) => {
                let mut buf = Vec::with_capacity(lines.len() * 64);
                for line in &lines {
                    if serde_json::to_writer(&mut buf, line).is_ok() {
                        buf.push(b'\n');
                    }
                }
                return Some((Ok(Bytes::from(buf)), Some((None, read))));
            }
            Some(LogChunk::End(reason)) => read_end(reason, follow),
            None => Some(LogReadEnd {
                end: LogReadEndKind::DroneDisconnected,
                message: Some(
                    "The drone's session ended before the read did; lines may be missing.".into(),
                ),
            }),
        };
        Some((Ok(end.map(end_line).unwrap_or_default()), None))
    })
    .filter(|chunk| std::future::ready(!matches!(chunk, Ok(b) if b.is_empty())))
}

/// The last line of a read the drone ended, if it gets one.
fn read_end(reason: LogEndReason, follow: bool) -> Option<LogReadEnd> {
    let (end, message) = match reason {
        LogEndReason::Complete => return None,
        LogEndReason::Unknown if !follow => return None,
        LogEndReason::BackendEnded => (LogReadEndKind::BackendEnded, None),
        LogEndReason::Unknown => (
            LogReadEndKind::NotKept,
            Some("The drone keeps no lines of this backend.".to_string()),
        ),
        LogEndReason::Busy => (
            LogReadEndKind::DroneBusy,
            Some("The drone has too many log reads open; try again later.".to_string()),
        ),
        LogEndReason::Failed(error) => {
            tracing::warn!(%error, "The drone could not read a backend's logs");
            (
                LogReadEndKind::Failed,
                Some(format!("The drone could not read the logs: {error}")),
            )
        }
    };
    Some(LogReadEnd { end, message })
}

fn end_line(end: LogReadEnd) -> Bytes {
    let mut buf = serde_json::to_vec(&end).unwrap_or_default();
    buf.push(b'\n');
    Bytes::from(buf)
}

/// A forwarded read's answer, streamed through; cut off by an error of the other controller, it
/// ends with a [`LogReadEndKind::ControllerDisconnected`] line.
fn forwarded(
    response: reqwest::Response,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(Some(response.bytes_stream()), |body| async move {
        let mut body = body?;
        match body.next().await? {
            Ok(bytes) => Some((Ok(bytes), Some(body))),
            Err(e) => {
                let end = LogReadEnd {
                    end: LogReadEndKind::ControllerDisconnected,
                    message: Some(format!(
                        "The controller holding the drone's session stopped answering: {e}"
                    )),
                };
                Some((Ok(end_line(end)), None))
            }
        }
    })
}

fn parse_query(raw: Option<&str>) -> Result<LogQuery, ApiError> {
    let mut query = LogQuery::default();
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*name {
            "since" => {
                let since = value
                    .parse::<LogSince>()
                    .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
                query.since = Some(since);
            }
            "tail" => {
                let tail = value.parse::<u32>().ok().filter(|t| *t <= MAX_TAIL);
                let tail = tail.ok_or_else(|| {
                    ApiError::InvalidRequest(format!(
                        "invalid `tail` {value:?}: expected a number of lines from 0 to {MAX_TAIL}"
                    ))
                })?;
                query.tail = Some(tail);
            }
            "follow" => {
                query.follow = match &*value {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::InvalidRequest(format!(
                            "invalid `follow` {value:?}: expected true or false"
                        )))
                    }
                }
            }
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter `{other}` (expected since, tail, follow)"
                )))
            }
        }
    }
    Ok(query)
}

/// The query of a forwarded read (relative `since` stays relative: the drone resolves it).
fn query_string(query: LogQuery) -> String {
    let mut parts = Vec::new();
    match query.since {
        Some(LogSince::At(at)) => parts.push(format!("since={}", at.0)),
        Some(LogSince::Ago(ms)) => parts.push(format!("since={ms}ms")),
        None => {}
    }
    if let Some(tail) = query.tail {
        parts.push(format!("tail={tail}"));
    }
    parts.push(format!("follow={}", query.follow));
    parts.join("&")
}

/// The 503 body's status, for [`ApiError::DroneUnreachable`].
pub fn unreachable_message(status: BackendStatus) -> String {
    format!("The backend's drone is not connected to any controller (last known status: {status}).")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_roundtrip() {
        let q = parse_query(Some("since=10m&tail=5&follow=true")).unwrap();
        assert_eq!(q.since, Some(LogSince::Ago(600_000)));
        assert_eq!(q.tail, Some(5));
        assert!(q.follow);
        let again = parse_query(Some(&query_string(q))).unwrap();
        assert_eq!(
            (again.since, again.tail, again.follow),
            (q.since, q.tail, q.follow)
        );
        assert!(!parse_query(None).unwrap().follow);
        for bad in [
            "since=yesterday",
            "tail=-1",
            "tail=10001",
            "follow=maybe",
            "x=1",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
