//! The backend's HTTP and WebSocket routes.
//!
//! Paths are matched exactly as received: the backend strips no prefix, so tests can check what
//! the proxy forwarded. Every path without a route of its own (including `/headers`) answers
//! with [`request_show`], a JSON description of the request.

use axum::body::Bytes;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Largest `/alloc/<mb>` request, so a typo cannot overflow the size computation.
const MAX_ALLOC_MB: usize = 64 * 1024;

/// Memory handed out by `/alloc/<mb>`, kept until the process exits.
static ALLOCATED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Builds the router; `exit_requests` receives the code of each `POST /exit/<code>`.
pub fn router(exit_requests: mpsc::Sender<i32>) -> Router {
    Router::new()
        .route("/", get(hello_show))
        .route("/env", get(env_show))
        // A test backend may be sent large bodies on purpose; no limit to trip over.
        .route(
            "/echo",
            post(echo_create).layer(DefaultBodyLimit::disable()),
        )
        .route("/exit/{code}", post(exit_create))
        .route("/sleep/{ms}", get(sleep_show))
        .route("/ws", get(ws_upgrade))
        .route("/alloc/{mb}", post(alloc_create))
        .route("/print/{stream}", post(print_create))
        .route("/claim", post(claim_create).get(claim_show))
        .route(
            "/write/{name}",
            post(write_create).layer(DefaultBodyLimit::disable()),
        )
        .fallback(request_show)
        .with_state(exit_requests)
}

/// Bodies of every `POST /claim` (warm-pool claim hooks), oldest first.
static CLAIMS: Mutex<Vec<Value>> = Mutex::new(Vec::new());

/// `POST /claim`: records the JSON body, then answers as `TEST_BACKEND_CLAIM` says: `ok` (default,
/// 204), `status:<code>` (that status), or `hang` (never answers).
async fn claim_create(body: Bytes) -> Response {
    let claim = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match CLAIMS.lock() {
        Ok(mut claims) => claims.push(claim),
        Err(poisoned) => poisoned.into_inner().push(claim),
    }
    let mode = std::env::var("TEST_BACKEND_CLAIM").unwrap_or_default();
    if mode == "hang" {
        std::future::pending::<()>().await;
    }
    let status = mode
        .strip_prefix("status:")
        .and_then(|code| code.parse().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::NO_CONTENT);
    status.into_response()
}

/// `GET /claim`: the bodies of every `POST /claim` so far, oldest first.
async fn claim_show() -> Json<Vec<Value>> {
    let claims = match CLAIMS.lock() {
        Ok(claims) => claims.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Json(claims)
}

/// `POST /print/stdout` or `/print/stderr`: writes the body to that stream (for log capture tests).
async fn print_create(Path(stream): Path<String>, body: Bytes) -> StatusCode {
    use std::io::Write;
    let written = match stream.as_str() {
        "stdout" => std::io::stdout()
            .lock()
            .write_all(&body)
            .and_then(|()| std::io::stdout().flush()),
        "stderr" => std::io::stderr().lock().write_all(&body),
        _ => return StatusCode::NOT_FOUND,
    };
    match written {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn hello_show() -> &'static str {
    "hello from hangar-test-backend"
}

/// All environment variables, non-UTF-8 bytes replaced.
async fn env_show() -> Json<Map<String, Value>> {
    Json(env_vars())
}

fn env_vars() -> Map<String, Value> {
    std::env::vars_os()
        .map(|(name, value)| {
            let value = Value::String(value.to_string_lossy().into_owned());
            (name.to_string_lossy().into_owned(), value)
        })
        .collect()
}

/// The request as received: header names (lowercase) to values, repeated headers joined with
/// `", "`, plus `__method`, `__path` and `__query` (the raw query string, or null).
async fn request_show(method: Method, uri: Uri, headers: HeaderMap) -> Json<Map<String, Value>> {
    let mut fields = Map::new();
    for name in headers.keys() {
        let values: Vec<_> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()))
            .collect();
        fields.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
    }
    // Inserted last, so a client header spelled `__path` cannot hide the real path.
    fields.insert("__method".to_owned(), Value::String(method.to_string()));
    fields.insert("__path".to_owned(), Value::String(uri.path().to_owned()));
    fields.insert(
        "__query".to_owned(),
        uri.query()
            .map_or(Value::Null, |query| Value::String(query.to_owned())),
    );
    Json(fields)
}

/// Sends the body back with the request's content type.
async fn echo_create(headers: HeaderMap, body: Bytes) -> Response {
    match headers.get(header::CONTENT_TYPE) {
        Some(content_type) => {
            ([(header::CONTENT_TYPE, content_type.clone())], body).into_response()
        }
        None => body.into_response(),
    }
}

/// Answers 200, then the process exits with `code` (see `run_exit_requests` in `main.rs`).
async fn exit_create(
    State(exit_requests): State<mpsc::Sender<i32>>,
    Path(code): Path<i32>,
) -> &'static str {
    // Full means an earlier request already decided the exit code.
    let _ = exit_requests.try_send(code);
    "exiting"
}

/// Allocates `mb` MiB and writes to every byte, so the memory is really resident (an OOM test
/// needs the kernel to see it); the memory is kept until the process exits.
async fn alloc_create(Path(mb): Path<usize>) -> Response {
    if mb > MAX_ALLOC_MB {
        let message = format!("at most {MAX_ALLOC_MB} MiB per request");
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    // One MiB at a time: a cgroup memory limit then kills the process part way, as a real leak does.
    let mut chunks = Vec::with_capacity(mb);
    for _ in 0..mb {
        chunks.push(vec![0x5a_u8; 1 << 20]);
    }
    let mut allocated = match ALLOCATED.lock() {
        Ok(allocated) => allocated,
        Err(poisoned) => poisoned.into_inner(),
    };
    allocated.extend(chunks);
    format!("allocated {mb} MiB").into_response()
}

/// Writes the body to `$HANGAR_DATA_DIR/<name>` (the backend's mounted data directory). `name` must
/// be a plain file name.
async fn write_create(Path(name): Path<String>, body: Bytes) -> Response {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return (StatusCode::BAD_REQUEST, "expected a plain file name").into_response();
    }
    let Some(dir) = std::env::var_os("HANGAR_DATA_DIR") else {
        return (StatusCode::CONFLICT, "HANGAR_DATA_DIR is not set").into_response();
    };
    let path = std::path::Path::new(&dir).join(&name);
    match tokio::fs::write(&path, &body).await {
        Ok(()) => format!("wrote {}", path.display()).into_response(),
        Err(error) => {
            let message = format!("cannot write {}: {error}", path.display());
            (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
        }
    }
}

async fn sleep_show(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    "slept"
}

/// Upgrades to a WebSocket echo, selecting the first subprotocol the client offers.
async fn ws_upgrade(headers: HeaderMap, mut ws: WebSocketUpgrade) -> Response {
    // Read from the header rather than `requested_protocols()`, which is sorted, not in offer order.
    let first_offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .find(|protocol| !protocol.is_empty())
        .and_then(|protocol| HeaderValue::from_bytes(protocol).ok());
    if let Some(protocol) = first_offered {
        ws.set_selected_protocol(protocol);
    }
    ws.on_upgrade(ws_echo)
}

/// Echoes text as text and binary as binary; the text `close` makes the server close normally, and
/// the text `env` is answered with the environment as a JSON object (as `GET /env`), so a client
/// holding a WebSocket can tell which backend answers it.
async fn ws_echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == "close" => Message::Close(Some(CloseFrame {
                code: close_code::NORMAL,
                reason: Utf8Bytes::from_static(""),
            })),
            Message::Text(text) if text.as_str() == "env" => {
                Message::Text(Value::Object(env_vars()).to_string().into())
            }
            Message::Text(_) | Message::Binary(_) => message,
            // Pings are answered by the WebSocket library itself.
            Message::Ping(_) | Message::Pong(_) => continue,
            // The library answers the client's close frame; nothing is left to do.
            Message::Close(_) => return,
        };
        // After our close frame the loop goes on to read the client's reply, then ends.
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}
