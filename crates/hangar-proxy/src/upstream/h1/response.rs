//! The response side of a kept connection's exchange: the head parsed from the connection's buffer
//! ([`parse_response_head`]) and the body read after it ([`KeptBody`]: content-length, chunked with
//! trailers, or to the close), which puts the connection back once the response has ended.

use super::{
    content_length, ends_in_chunked, KeptStream, Slot, MAX_CHUNK_LINE, MAX_RESPONSE_HEADERS,
    READ_SIZE,
};
use crate::error::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A parsed response head: its parts, how its body is framed, and whether the connection can be
/// used again after it.
pub(super) type ParsedHead = (http::response::Parts, ResponseFraming, bool);

pub(super) enum Parsed {
    Final(ParsedHead),
    /// A `1xx` (not `101`) was consumed from the buffer.
    Informational,
}

/// Parses a response head at the start of `buf`, consuming it when complete.
pub(super) fn parse_response_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Parsed>, BoxError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let code = parsed.code.ok_or("response without a status")?;
    let status = StatusCode::from_u16(code)?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("101 Switching Protocols for a request that asked for no upgrade".into());
        }
        buf.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let reason = parsed.reason.unwrap_or_default();
    // Header values are slices of the head, which is kept as one shared buffer.
    let names_and_ranges: Vec<(HeaderName, std::ops::Range<usize>)> = {
        let base = buf.as_ptr() as usize;
        let mut out = Vec::with_capacity(parsed.headers.len());
        for header in parsed.headers.iter() {
            let name = HeaderName::from_bytes(header.name.as_bytes())?;
            let start = header.value.as_ptr() as usize - base;
            out.push((name, start..start + header.value.len()));
        }
        out
    };
    let custom_reason = (!reason.is_empty() && Some(reason) != status.canonical_reason())
        .then(|| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok())
        .flatten();
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(names_and_ranges.len());
    for (name, range) in names_and_ranges {
        headers.append(name, HeaderValue::from_maybe_shared(head.slice(range))?);
    }

    let te = headers.get_all(TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Length(0)
        } else if has_te {
            if version == Version::HTTP_11 && ends_in_chunked(&te) {
                ResponseFraming::Chunked(Chunked::Size)
            } else {
                ResponseFraming::ToEnd
            }
        } else {
            match content_length(&headers) {
                Ok(Some(n)) => ResponseFraming::Length(n),
                Ok(None) => ResponseFraming::ToEnd,
                Err(()) => return Err("invalid content-length in the response".into()),
            }
        };
    let close = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    let reusable = version == Version::HTTP_11 && !close && framing != ResponseFraming::ToEnd;

    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = custom_reason {
        response.extensions_mut().insert(reason);
    }
    let (parts, ()) = response.into_parts();
    Ok(Some(Parsed::Final((parts, framing, reusable))))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResponseFraming {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    ToEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

/// The body of a response read from a kept connection.
pub(crate) struct KeptBody {
    /// `None` once the body has ended (the connection went back to its slot or was closed).
    conn: Option<KeptStream>,
    framing: ResponseFraming,
    reusable: bool,
    slot: Slot,
    addr: SocketAddr,
}

impl KeptBody {
    pub(super) fn new(
        conn: KeptStream,
        framing: ResponseFraming,
        reusable: bool,
        slot: Slot,
        addr: SocketAddr,
    ) -> KeptBody {
        let mut body = KeptBody {
            conn: Some(conn),
            framing,
            reusable,
            slot,
            addr,
        };
        if framing == ResponseFraming::Length(0) {
            body.finish();
        }
        body
    }

    /// The response has ended: the connection goes back when nothing is left over.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() {
                super::super::put_back(&self.slot, self.addr, conn);
            }
        }
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the connection.
    fn poll_fill(conn: &mut KeptStream, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            conn.buf.reserve(READ_SIZE);
            match conn.stream.try_read_buf(&mut conn.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(conn.stream.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing {
                ResponseFraming::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                ResponseFraming::Length(left) => {
                    if conn.buf.is_empty() && ready!(Self::poll_fill(conn, cx))? == 0 {
                        self.conn = None;
                        return Poll::Ready(Some(Err(
                            "backend closed the connection mid-body".into()
                        )));
                    }
                    let n = conn
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = conn.buf.split_to(n).freeze();
                    self.framing = ResponseFraming::Length(left - n as u64);
                    if left == n as u64 {
                        // Back before the client sees the end, so its next request finds it.
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                ResponseFraming::ToEnd => {
                    if conn.buf.is_empty() && ready!(Self::poll_fill(conn, cx))? == 0 {
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                ResponseFraming::Chunked(state) => match step_chunked(state, &mut conn.buf)? {
                    Step::NeedMore => {
                        if ready!(Self::poll_fill(conn, cx))? == 0 {
                            self.conn = None;
                            return Poll::Ready(Some(Err(
                                "backend closed the connection mid-body".into(),
                            )));
                        }
                    }
                    Step::Next(next) => self.framing = ResponseFraming::Chunked(next),
                    Step::Data(data, next) => {
                        self.framing = ResponseFraming::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Step::End(trailers) => {
                        self.framing = ResponseFraming::Length(0);
                        self.finish();
                        return match trailers {
                            Some(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                            None => Poll::Ready(None),
                        };
                    }
                },
            }
        }
    }
}

enum Step {
    NeedMore,
    Next(Chunked),
    Data(Bytes, Chunked),
    /// The body ended, with its trailer fields if it had any.
    End(Option<HeaderMap>),
}

/// One step of decoding a chunked body from `buf`.
fn step_chunked(state: Chunked, buf: &mut BytesMut) -> Result<Step, BoxError> {
    match state {
        Chunked::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, 0))) => {
                buf.advance(used);
                Ok(Step::Next(Chunked::Trailers))
            }
            Ok(httparse::Status::Complete((used, size))) => {
                buf.advance(used);
                Ok(Step::Next(Chunked::Data(size)))
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => Ok(Step::NeedMore),
            Ok(httparse::Status::Partial) => Err("chunk-size line too long".into()),
            Err(_) => Err("invalid chunk size".into()),
        },
        Chunked::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(n).freeze();
            let left = left - n as u64;
            let next = if left == 0 {
                Chunked::DataEnd
            } else {
                Chunked::Data(left)
            };
            Ok(Step::Data(data, next))
        }
        Chunked::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            buf.advance(2);
            Ok(Step::Next(Chunked::Size))
        }
        Chunked::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((used, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        trailers.append(
                            HeaderName::from_bytes(field.name.as_bytes())?,
                            HeaderValue::from_bytes(field.value)?,
                        );
                    }
                    buf.advance(used);
                    Ok(Step::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => Ok(Step::NeedMore),
                Ok(httparse::Status::Partial) => Err("trailer section too long".into()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

impl Body for KeptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            // Whatever was read is no longer a response's end: the connection is not reused.
            this.conn = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.framing == ResponseFraming::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            ResponseFraming::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}
