//! One HTTP/1.1 exchange on a kept backend connection, run by the request's own task: the request
//! head is written straight from the request's parts, the response head parsed with `httparse`, and
//! the response body read by the body the client connection polls ([`KeptBody`]), which puts the
//! connection back once the response ended with the connection still usable. This file is the
//! request side; `h1/response.rs` the response's head and body.
//!
//! hyper's client connection would need a task of its own per connection and a channel hop for the
//! request, the response head and every body chunk; on a keep-alive connection of small requests
//! those hops cost more than the parsing. The framing rules are hyper's (so requests and responses
//! are the same on both paths):
//! - request: no body when the body is already at its end (a `transfer-encoding` is dropped then);
//!   a `transfer-encoding` ending in `chunked` means chunked; else `content-length`; else the body's
//!   exact size as `content-length`; else no body for `GET` and `HEAD` and chunked for
//!   the others; a `content-length` beside a `transfer-encoding` is dropped. A `transfer-encoding`
//!   not ending in `chunked`, and `CONNECT`, are not sent here (the pool sends them).
//! - response: no body for `HEAD`, `204` and `304`; chunked when `transfer-encoding` ends in
//!   `chunked`; read to the end of the connection for any other `transfer-encoding`, or when there is
//!   no `content-length`; informational responses (`1xx` but `101`) are skipped.

use crate::error::{BoxError, ProxyBody};
use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::Body;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub(crate) use response::KeptBody;
use response::{parse_response_head, Parsed, ParsedHead};

/// Largest response head accepted (hyper's client reads up to about 400 KB; backends' heads are
/// small, and a head this large is an error worth a `502`).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most response headers accepted (hyper's client default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// How much a read asks for at least.
const READ_SIZE: usize = 16 * 1024;

/// An open HTTP/1.1 connection to a backend, idle between exchanges.
pub(crate) struct KeptStream {
    stream: TcpStream,
    /// Bytes read but not yet used; empty between exchanges.
    buf: BytesMut,
}

/// Where a kept connection goes back once its response has been read to the end.
pub(crate) type Slot = Arc<Mutex<super::Kept>>;

/// Why an exchange failed.
pub(crate) enum ExchangeError {
    /// The request can be sent again on another connection: its head could not be written, or it
    /// has no body and an idempotent method and the backend closed the connection without a byte of
    /// answer (a backend closing an idle connection as the request arrives looks like this).
    Unsent(Box<Request<ProxyBody>>, BoxError),
    Failed(BoxError),
}

impl KeptStream {
    pub(crate) fn new(stream: TcpStream) -> KeptStream {
        KeptStream {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether the idle connection can take a request: the backend has neither closed it nor sent
    /// anything unasked. Uses the readiness the runtime already has; a system call only when it says
    /// the connection is readable.
    pub(crate) fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // Closed (0), or bytes no request asked for.
            Ok(_) => false,
        }
    }

    /// Sends `req` (origin-form URI, HTTP/1.1) and reads the response head. The response's body
    /// reads the rest and returns the connection to `slot` (for `addr`) when it is reusable.
    pub(crate) async fn exchange(
        mut self,
        req: Request<ProxyBody>,
        slot: Slot,
        addr: SocketAddr,
    ) -> Result<Response<KeptBody>, ExchangeError> {
        let head_request = req.method() == Method::HEAD;
        let Some((head, framing)) = encode_head(&req) else {
            let error = "a request this path does not send".into();
            return Err(ExchangeError::Unsent(Box::new(req), error));
        };
        if let Err(e) = self.stream.write_all(&head).await {
            // A request head cut short is no request: the backend answers nothing to it.
            return Err(ExchangeError::Unsent(Box::new(req), e.into()));
        }
        let (retry, response) = if framing == RequestFraming::Empty {
            // Kept until a response starts, to be sent again if none comes and that is safe.
            let retry = is_idempotent(req.method()).then_some(req);
            (
                retry,
                read_head(&mut self.stream, &mut self.buf, head_request).await,
            )
        } else {
            (
                None,
                self.send_body(req.into_body(), framing, head_request)
                    .await?,
            )
        };
        let (parts, framing, reusable) = match response {
            Ok(response) => response,
            Err(ReadHeadError::ClosedBeforeResponse(e)) => {
                return Err(match retry {
                    Some(req) => ExchangeError::Unsent(Box::new(req), e),
                    None => ExchangeError::Failed(e),
                })
            }
            Err(ReadHeadError::Other(e)) => return Err(ExchangeError::Failed(e)),
        };
        let body = KeptBody::new(self, framing, reusable, slot, addr);
        Ok(Response::from_parts(parts, body))
    }

    /// Sends the body while watching for the response, as hyper's client does: a backend may answer
    /// before it has read the whole body (a `413`, say) and stop reading or close. Such an early
    /// response is returned, and the connection is not reused (the body was cut short).
    async fn send_body(
        &mut self,
        body: ProxyBody,
        framing: RequestFraming,
        head_request: bool,
    ) -> Result<Result<ParsedHead, ReadHeadError>, ExchangeError> {
        let (mut reader, mut writer) = self.stream.split();
        let sending = write_body(&mut writer, body, framing);
        let reading = read_head(&mut reader, &mut self.buf, head_request);
        tokio::pin!(sending, reading);
        let early = tokio::select! {
            sent = &mut sending => match sent {
                Ok(()) => None,
                // The backend closed or reset: its answer may already be here.
                Err(SendError::Io(e)) => match (&mut reading).await {
                    Ok(head) => Some(Ok(head)),
                    Err(_) => return Err(ExchangeError::Failed(e.into())),
                },
                Err(SendError::Body(e)) => return Err(ExchangeError::Failed(e)),
            },
            head = &mut reading => Some(head),
        };
        Ok(match early {
            Some(head) => head.map(|(parts, framing, _)| (parts, framing, false)),
            None => reading.await,
        })
    }
}

enum SendError {
    /// The request's own body failed (the client went away, or it is over the size limit).
    Body(BoxError),
    /// Writing to the backend failed.
    Io(io::Error),
}

/// Writes a request body with `framing` (not [`RequestFraming::Empty`]).
async fn write_body<W>(
    writer: &mut W,
    mut body: ProxyBody,
    framing: RequestFraming,
) -> Result<(), SendError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut left = match framing {
        RequestFraming::Length(n) => Some(n),
        _ => None,
    };
    let mut chunk = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(mut data) = frame.map_err(SendError::Body)?.into_data() else {
            // Trailers: hyper sends them only when the request declares them; not here.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut left {
            Some(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(SendError::Body(
                        "request body longer than its content-length".into(),
                    ));
                }
                *left -= n;
                writer
                    .write_all_buf(&mut data)
                    .await
                    .map_err(SendError::Io)?;
            }
            None => {
                chunk.clear();
                chunk.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                writer.write_all(&chunk).await.map_err(SendError::Io)?;
            }
        }
    }
    match left {
        Some(0) => Ok(()),
        Some(_) => Err(SendError::Body(
            "request body shorter than its content-length".into(),
        )),
        None => writer.write_all(b"0\r\n\r\n").await.map_err(SendError::Io),
    }
}

/// Reads until a complete final response head is in `buf` and parses it.
async fn read_head<R>(
    reader: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<ParsedHead, ReadHeadError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut read_any = false;
    loop {
        if !buf.is_empty() {
            match parse_response_head(buf, head_request) {
                Ok(Some(Parsed::Final(parsed))) => return Ok(parsed),
                Ok(Some(Parsed::Informational)) => continue,
                Ok(None) => {}
                Err(e) => return Err(ReadHeadError::Other(e)),
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(ReadHeadError::Other("response head too large".into()));
            }
        }
        buf.reserve(READ_SIZE);
        let n = match tokio::io::AsyncReadExt::read_buf(reader, buf).await {
            Ok(n) => n,
            Err(e) if !read_any => return Err(ReadHeadError::ClosedBeforeResponse(e.into())),
            Err(e) => return Err(ReadHeadError::Other(e.into())),
        };
        if n == 0 {
            let error = "backend closed the connection before the response ended".into();
            return Err(if read_any {
                ReadHeadError::Other(error)
            } else {
                ReadHeadError::ClosedBeforeResponse(error)
            });
        }
        read_any = true;
    }
}

enum ReadHeadError {
    /// No byte came back: the backend closed the connection (or reset it) without answering.
    ClosedBeforeResponse(BoxError),
    Other(BoxError),
}

/// Whether a request that reached a backend which closed the connection without answering may be
/// sent again: only when repeating it cannot do anything twice (nginx's rule for its retries).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    Empty,
    Length(u64),
    Chunked,
}

/// The request head as hyper's client would write it, and how its body is framed; `None` for a
/// request this path does not send (see the module's rules).
fn encode_head(req: &Request<ProxyBody>) -> Option<(Vec<u8>, RequestFraming)> {
    if req.method() == Method::CONNECT {
        // A tunnel, whose answer hyper reads as an upgrade: the pool's business.
        return None;
    }
    let headers = req.headers();
    let body = req.body();
    let te = headers.get_all(TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let mut extra: Option<(&'static str, String)> = None;
    // The framing header that must not be sent: a `transfer-encoding` of a request without a body,
    // a `content-length` beside a `transfer-encoding` (which wins, as with hyper).
    let mut skip = None;
    let framing = if body.is_end_stream() {
        skip = Some(TRANSFER_ENCODING);
        RequestFraming::Empty
    } else if has_te {
        if !ends_in_chunked(&te) {
            return None;
        }
        skip = Some(CONTENT_LENGTH);
        RequestFraming::Chunked
    } else if let Some(len) = content_length(headers).ok()? {
        RequestFraming::Length(len)
    } else if let Some(len) = body.size_hint().exact() {
        extra = Some(("content-length", len.to_string()));
        RequestFraming::Length(len)
    } else if matches!(*req.method(), Method::GET | Method::HEAD) {
        RequestFraming::Empty
    } else {
        extra = Some(("transfer-encoding", "chunked".to_string()));
        RequestFraming::Chunked
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if skip.as_ref() == Some(name) {
            continue;
        }
        push_field(&mut head, name.as_str(), value.as_bytes());
    }
    if let Some((name, value)) = extra {
        push_field(&mut head, name, value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    Some((head, framing))
}

/// Appends one `name: value` line to a head.
fn push_field(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Whether the last coding of a `transfer-encoding` is `chunked`.
fn ends_in_chunked(values: &http::header::GetAll<'_, HeaderValue>) -> bool {
    values
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// The `content-length` (all values must agree), `Ok(None)` when absent, `Err` when invalid.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value.to_str().map_err(drop)?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = part.parse().map_err(drop)?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

mod response;

#[cfg(test)]
mod tests;
