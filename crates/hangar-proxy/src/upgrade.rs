//! Upgraded connections (WebSockets): once both the client's and the backend's connections have
//! switched protocols, bytes are copied both ways until one side closes. The tunnel holds a
//! [`ConnectionGuard`], so the backend counts one open connection for exactly the tunnel's life, and
//! its client connection, so it keeps counting against `max_connections`.
//!
//! Memory and wake-ups: an idle tunnel is one task whose state is the two connections and two
//! [`Direction`]s of a few words each. The backend's connection is taken back out of hyper as the
//! plain `TcpStream` it was opened as (with any bytes hyper had read past the `101` response), so
//! it is read and written without hyper's boxed I/O and buffer in between. A read lands on the stack
//! of the poll that completes it and is written from there at once; only what the writer does not
//! take is kept on the heap until it is written. No copy buffer, no split-stream lock, no allocation
//! per message (`hangar-bench proxy-ws` measures a tunnel's memory and round trip).
//!
//! Going away (proxy shutdown): a WebSocket tunnel finishes forwarding the frame in progress in
//! each direction (boundaries are followed by [`FrameTracker`] as bytes are copied), then sends a
//! close frame with status 1001 to the client (unmasked, as a server) and to the backend (masked,
//! as a client), waits briefly for the client to close, and ends. Other upgraded protocols just end.
//!
//! Must not: interpret or change what passes through, except for that final close frame.

use crate::connection_tracker::ConnectionGuard;
use crate::server::ClientConnection;
use crate::signal::or_signal;
use crate::ws_frames::{masked_close_going_away, FrameTracker, CLOSE_GOING_AWAY};
use bytes::Bytes;
use futures_util::future::Either;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// After one direction ends, how long the other may still drain before the tunnel is dropped. Bounds
/// the life of half-closed tunnels whose peer never closes its side.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(5);
/// When going away: how long a tunnel may take to reach frame boundaries, send its close frames and
/// see the client close.
pub(crate) const GOING_AWAY_WAIT: Duration = Duration::from_secs(2);
/// Most bytes one read of a direction takes (into a buffer on the stack of the poll).
const READ_CHUNK: usize = 16 * 1024;
/// When going away, at most this much is read (and discarded) while waiting for the client to close.
const MAX_DISCARD: usize = 1024 * 1024;

/// An accepted upgrade whose tunnel is not running yet.
pub(crate) struct Tunnel {
    pub(crate) client: OnUpgrade,
    pub(crate) backend: OnUpgrade,
    /// Whether the protocol is WebSocket (frame boundaries can be followed).
    pub(crate) websocket: bool,
    pub(crate) guard: ConnectionGuard,
    pub(crate) connection: Arc<ClientConnection>,
}

/// Runs one tunnel until either side closes, `going_away` has been handled, or `cancel` fires.
pub(crate) async fn run_tunnel(
    tunnel: Tunnel,
    going_away: CancellationToken,
    cancel: CancellationToken,
) {
    let Tunnel {
        client,
        backend,
        websocket,
        guard,
        connection,
    } = tunnel;
    let severed = guard.severed();
    let upgraded = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = severed.cancelled() => return,
        both = async { tokio::try_join!(client, backend) } => both,
    };
    let (client, backend) = match upgraded {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "Upgrade did not complete");
            return;
        }
    };
    let client = TokioIo::new(client);
    let (backend, ahead) = backend_connection(backend);
    // A terminated backend's tunnel is cut at once, without close frames: its process may still
    // run, and nothing it sends may reach the client any more.
    // The tunnel's task wakes for every message; the two tokens are polled only when one fires.
    let copy = async {
        match backend {
            Ok(stream) => {
                let ends = Ends::new(client, stream, websocket, ahead);
                splice(ends, websocket, &going_away).await;
            }
            Err(upgraded) => {
                let ends = Ends::new(client, TokioIo::new(upgraded), websocket, ahead);
                splice(ends, websocket, &going_away).await;
            }
        }
    };
    // `true`: the backend was terminated; `false`: the proxy stops.
    let cut = async {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = severed.cancelled() => true,
        }
    };
    if let Either::Right(true) = or_signal(copy, cut).await {
        tracing::debug!("Closing a tunnel to a terminated backend");
    }
    drop(guard);
    drop(connection);
}

/// The backend's side of the tunnel: the plain TCP connection the pool opened, when hyper gives it
/// back (it always should: the pool's connector makes `TokioIo<TcpStream>`), with the bytes hyper
/// read beyond the `101` response, which go to the client first.
fn backend_connection(upgraded: Upgraded) -> (Result<TcpStream, Upgraded>, Bytes) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (Ok(parts.io.into_inner()), parts.read_buf),
        // Still correct, through hyper's boxed I/O (which replays what it read ahead itself).
        Err(upgraded) => (Err(upgraded), Bytes::new()),
    }
}

/// Both connections of a tunnel and the state of each direction.
struct Ends<A, B> {
    client: A,
    backend: B,
    /// Client → backend.
    up: Direction,
    /// Backend → client.
    down: Direction,
}

/// Which side ended the copy.
enum Ended {
    Client,
    Backend,
    GoingAway,
}

/// Copies client → backend and backend → client. When one direction reaches end of stream (or
/// fails), the write side it fed is shut down and the other direction gets [`HALF_CLOSE_LINGER`]
/// to finish. Copy errors only end the tunnel. See the module docs for `going_away`.
async fn splice<A, B>(mut ends: Ends<A, B>, websocket: bool, going_away: &CancellationToken)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Both directions are polled from this one future; which goes first alternates, so a busy
    // direction cannot use up the task's I/O budget before the other is polled every time.
    let mut up_first = true;
    let copied = poll_fn(|cx| {
        up_first = !up_first;
        ends.poll_both(cx, up_first)
    });
    let ended = match or_signal(copied, going_away.cancelled()).await {
        Either::Left(ended) => ended,
        Either::Right(()) => Ended::GoingAway,
    };
    let Ends {
        client,
        backend,
        up,
        down,
    } = &mut ends;
    match ended {
        Ended::Client => {
            let _ = backend.shutdown().await;
            linger(down, backend, client, going_away).await;
        }
        Ended::Backend => {
            let _ = client.shutdown().await;
            linger(up, client, backend, going_away).await;
        }
        Ended::GoingAway if websocket => {
            let _ = tokio::time::timeout(GOING_AWAY_WAIT, say_going_away(&mut ends)).await;
        }
        Ended::GoingAway => {}
    }
}

impl<A, B> Ends<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// `ahead`: bytes already read from the backend, to be sent to the client first.
    fn new(client: A, backend: B, websocket: bool, ahead: Bytes) -> Self {
        Ends {
            client,
            backend,
            up: Direction::new(websocket, Bytes::new()),
            down: Direction::new(websocket, ahead),
        }
    }

    /// Copies both ways; ready when either direction reached end of stream or failed.
    fn poll_both(&mut self, cx: &mut Context<'_>, up_first: bool) -> Poll<Ended> {
        for up in [up_first, !up_first] {
            let copied = if up {
                self.up
                    .poll_copy(cx, &mut self.client, &mut self.backend, Until::End)
            } else {
                self.down
                    .poll_copy(cx, &mut self.backend, &mut self.client, Until::End)
            };
            if copied.is_ready() {
                return Poll::Ready(if up { Ended::Client } else { Ended::Backend });
            }
        }
        Poll::Pending
    }
}

/// Lets the remaining direction finish for a while, then shuts down the side it writes to.
async fn linger<R, W>(
    direction: &mut Direction,
    reader: &mut R,
    writer: &mut W,
    going_away: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let rest = poll_fn(|cx| direction.poll_copy(cx, reader, writer, Until::End));
    tokio::select! {
        _ = tokio::time::timeout(HALF_CLOSE_LINGER, rest) => {}
        _ = going_away.cancelled() => {}
    }
    let _ = writer.shutdown().await;
}

/// Sends close frames (1001) both ways at frame boundaries, then reads from the client until it
/// closes, so closing the socket does not reset the connection before the client read the frame.
async fn say_going_away<A, B>(ends: &mut Ends<A, B>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Both directions at once, each needing one half of each connection: split them for this last
    // step only (the halves share a lock, which the copy of a running tunnel does without).
    let (mut client_read, mut client_write) = tokio::io::split(&mut ends.client);
    let (mut backend_read, mut backend_write) = tokio::io::split(&mut ends.backend);
    let (up, down) = (&mut ends.up, &mut ends.down);
    let to_client = async {
        let copied =
            poll_fn(|cx| down.poll_copy(cx, &mut backend_read, &mut client_write, Until::Boundary));
        if matches!(copied.await, Ok(Stopped::Boundary)) {
            let _ = client_write.write_all(&CLOSE_GOING_AWAY).await;
        }
        let _ = client_write.shutdown().await;
    };
    let to_backend = async {
        let copied =
            poll_fn(|cx| up.poll_copy(cx, &mut client_read, &mut backend_write, Until::Boundary));
        if matches!(copied.await, Ok(Stopped::Boundary)) {
            let close = masked_close_going_away(rand::random());
            let _ = backend_write.write_all(&close).await;
        }
        let _ = backend_write.shutdown().await;
        client_read
    };
    let ((), mut client_read) = tokio::join!(to_client, to_backend);
    let mut discarded = 0;
    let mut discard = vec![0; 1024];
    while discarded < MAX_DISCARD {
        match client_read.read(&mut discard).await {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

/// How far [`Direction::poll_copy`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Until the reader's end of stream.
    End,
    /// Up to the next frame boundary and no further (bytes read beyond it are never written).
    Boundary,
}

/// Why [`Direction::poll_copy`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The reader reached end of stream.
    End,
    /// At a frame boundary, with everything before it written and flushed.
    Boundary,
    /// No boundary can be reached: not WebSocket, or the framing was lost.
    NoBoundary,
}

/// One direction of a tunnel. Bytes read but not yet written wait in `pending[start..]`; the frame
/// tracker (WebSocket only) accounts for written bytes only. The state lives here, not in a future,
/// so a copy can stop at any `Pending` and be resumed later (or by another kind of copy).
struct Direction {
    /// Empty, without an allocation, while the writer keeps up (unless the last read was a full
    /// [`READ_CHUNK`]: a bulk transfer keeps its allocation for the next read).
    pending: Vec<u8>,
    start: usize,
    /// Bytes were written since the last flush.
    unflushed: bool,
    frames: Option<FrameTracker>,
}

impl Direction {
    /// A direction whose first bytes to write are `prefix` (read before the tunnel started).
    fn new(websocket: bool, prefix: Bytes) -> Self {
        Direction {
            // A copy, not `Vec::from`: that could keep the whole (empty) read buffer `prefix` is
            // a slice of, as this direction's allocation, for as long as the tunnel is idle.
            pending: prefix.to_vec(),
            start: 0,
            unflushed: false,
            frames: websocket.then(FrameTracker::new),
        }
    }

    /// Copies from `reader` to `writer` until `until`; errors of either end it. Every read is
    /// written from the stack at once where the writer takes it.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        until: Until,
    ) -> Poll<io::Result<Stopped>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let boundary = self.frames.as_ref().and_then(FrameTracker::until_boundary);
            let limit = match until {
                Until::End => usize::MAX,
                Until::Boundary => boundary.map_or(0, |d| usize::try_from(d).unwrap_or(usize::MAX)),
            };
            if self.start < self.pending.len() && limit > 0 {
                let end = self.pending.len().min(self.start.saturating_add(limit));
                let chunk = self.pending.get(self.start..end).unwrap_or_default();
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))?;
                wrote(&mut self.frames, chunk, n)?;
                self.unflushed = true;
                self.start += n;
                if self.start == self.pending.len() {
                    self.drained();
                }
                continue;
            }
            if self.unflushed {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.unflushed = false;
            }
            if until == Until::Boundary {
                match boundary {
                    None => return Poll::Ready(Ok(Stopped::NoBoundary)),
                    // Bytes of the next frame may have been read; they are never written.
                    Some(0) => return Poll::Ready(Ok(Stopped::Boundary)),
                    Some(_) => {}
                }
            }
            // Nothing is pending here: everything read was written, up to the limit.
            let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut scratch);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut read))?;
            let data = read.filled();
            if data.is_empty() {
                return Poll::Ready(Ok(Stopped::End));
            }
            let now = data.get(..limit.min(data.len())).unwrap_or_default();
            let written = match Pin::new(&mut *writer).poll_write(cx, now) {
                Poll::Ready(Ok(n)) => {
                    wrote(&mut self.frames, now, n)?;
                    self.unflushed = true;
                    n
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                // The writer wakes the task once it can take more; the bytes wait on the heap.
                Poll::Pending => 0,
            };
            self.keep(data.get(written..).unwrap_or_default(), data.len());
        }
    }

    /// Keeps `rest`, the part of a read of `read` bytes the writer did not take, to write later.
    fn keep(&mut self, rest: &[u8], read: usize) {
        if rest.is_empty() && read < READ_CHUNK {
            // Small messages (again): no allocation kept from a bulk transfer.
            self.pending = Vec::new();
        }
        self.pending.extend_from_slice(rest);
        self.start = 0;
    }

    /// Forgets the written bytes; a small message's allocation is freed (see `pending`).
    fn drained(&mut self) {
        if self.pending.len() < READ_CHUNK {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        self.start = 0;
    }
}

/// Accounts for `n` bytes of `chunk` that a writer took.
fn wrote(frames: &mut Option<FrameTracker>, chunk: &[u8], n: usize) -> io::Result<()> {
    if n == 0 && !chunk.is_empty() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    if let Some(frames) = frames {
        frames.advance(chunk.get(..n).unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    async fn read_n<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).await.unwrap();
        buf
    }

    async fn assert_eof<R: AsyncRead + Unpin>(r: &mut R) {
        let mut rest = vec![];
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "unexpected bytes {rest:?}");
    }

    /// A tunnel between two in-memory pipes of `capacity` bytes; returns the client's and the
    /// backend's ends and the running splice.
    fn spawn_splice(
        capacity: usize,
        websocket: bool,
        going_away: &CancellationToken,
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, proxy_a) = tokio::io::duplex(capacity);
        let (proxy_b, backend) = tokio::io::duplex(capacity);
        let going_away = going_away.clone();
        let ends = Ends::new(proxy_a, proxy_b, websocket, Bytes::new());
        let tunnel = tokio::spawn(async move { splice(ends, websocket, &going_away).await });
        (client, backend, tunnel)
    }

    #[tokio::test]
    async fn splice_copies_both_ways_and_ends_when_one_side_closes() {
        crate::with_test_timeout(async {
            let (mut client, mut backend, tunnel) =
                spawn_splice(64, false, &CancellationToken::new());
            client.write_all(b"ping").await.unwrap();
            assert_eq!(read_n(&mut backend, 4).await, b"ping");
            // More than one read and more than the pipe's capacity.
            let big: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
            let writer = tokio::spawn(async move {
                backend.write_all(&big).await.unwrap();
                backend
            });
            let got = read_n(&mut client, 100_000).await;
            assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
            let backend = writer.await.unwrap();
            // The backend goes away; the client sees end of stream and the tunnel ends.
            drop(backend);
            assert_eof(&mut client).await;
            drop(client);
            tunnel.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_direction_holds_no_buffer_once_its_writer_took_everything() {
        crate::with_test_timeout(async {
            let (mut source, mut reader) = tokio::io::duplex(1 << 20);
            // A writer smaller than a read: most reads are only partly taken and wait on the heap.
            let (mut writer, mut sink) = tokio::io::duplex(1000);
            let mut direction = Direction::new(false, Bytes::from_static(b"prefix:"));
            let big: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
            source.write_all(&big).await.unwrap();
            let copy = poll_fn(|cx| direction.poll_copy(cx, &mut reader, &mut writer, Until::End));
            tokio::select! {
                _ = copy => panic!("the source is still open"),
                got = read_n(&mut sink, 7 + big.len()) => {
                    assert_eq!(got[..7], *b"prefix:");
                    assert!(got[7..] == big[..], "the bulk transfer arrives unchanged");
                }
            }
            // A small message is written as soon as it is read; waiting for the next one, the
            // direction holds no allocation: that is the state of an idle tunnel.
            source.write_all(b"small").await.unwrap();
            let copy = poll_fn(|cx| direction.poll_copy(cx, &mut reader, &mut writer, Until::End));
            tokio::select! {
                _ = copy => panic!("the source is still open"),
                got = read_n(&mut sink, 5) => assert_eq!(got, b"small"),
            }
            assert_eq!(direction.pending.capacity(), 0);
            drop(source);
            let copied =
                poll_fn(|cx| direction.poll_copy(cx, &mut reader, &mut writer, Until::End));
            assert_eq!(copied.await.unwrap(), Stopped::End);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn half_closed_tunnel_ends_after_the_linger() {
        crate::with_test_timeout(async {
            let (client, backend, tunnel) = spawn_splice(64, true, &CancellationToken::new());
            // The client closes but the backend keeps its side open and silent.
            drop(client);
            tokio::time::timeout(HALF_CLOSE_LINGER * 2, tunnel)
                .await
                .expect("tunnel ends after the linger")
                .unwrap();
            drop(backend);
        })
        .await;
    }

    #[tokio::test]
    async fn going_away_waits_for_the_frame_in_progress_then_sends_close_frames() {
        crate::with_test_timeout(async {
            let going_away = CancellationToken::new();
            let (mut client, mut backend, tunnel) = spawn_splice(1 << 16, true, &going_away);

            // A complete masked text frame from the client reaches the backend unchanged.
            let hello = [0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
            client.write_all(&hello).await.unwrap();
            assert_eq!(read_n(&mut backend, hello.len()).await, hello);

            // The backend starts a 300-byte binary frame (16-bit length) and sends half of it.
            let mut frame = vec![0x82, 126, 0x01, 0x2C];
            frame.extend((0..300).map(|i| i as u8));
            backend.write_all(&frame[..150]).await.unwrap();
            assert_eq!(read_n(&mut client, 150).await, &frame[..150]);

            going_away.cancel();
            // The client side is at a boundary: the backend gets a masked close 1001 at once.
            let close = read_n(&mut backend, 8).await;
            assert_eq!(close[..2], [0x88, 0x82]);
            assert_eq!([close[6] ^ close[2], close[7] ^ close[3]], [0x03, 0xE9]);
            assert_eof(&mut backend).await;

            // The rest of the frame still reaches the client, then the close frame; a frame the
            // backend sends after the boundary does not.
            let mut rest = frame[150..].to_vec();
            rest.extend_from_slice(&[0x81, 0x01, b'x']);
            backend.write_all(&rest).await.unwrap();
            assert_eq!(read_n(&mut client, frame.len() - 150).await, &frame[150..]);
            assert_eq!(read_n(&mut client, 4).await, CLOSE_GOING_AWAY);
            assert_eof(&mut client).await;

            // The client answers with its close frame and closes; the tunnel ends.
            client.write_all(&[0x88, 0x80, 1, 2, 3, 4]).await.unwrap();
            drop(client);
            tunnel.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn going_away_ends_other_protocols_without_a_close_frame() {
        crate::with_test_timeout(async {
            let going_away = CancellationToken::new();
            let (mut client, mut backend, tunnel) = spawn_splice(64, false, &going_away);
            client.write_all(b"raw").await.unwrap();
            assert_eq!(read_n(&mut backend, 3).await, b"raw");
            going_away.cancel();
            tunnel.await.unwrap();
            assert_eof(&mut client).await;
            assert_eof(&mut backend).await;
        })
        .await;
    }

    /// The pool's upgraded connections come back out of hyper as their `TcpStream`, and bytes the
    /// backend sent right behind its `101` response are forwarded first.
    #[tokio::test]
    async fn the_backend_connection_is_taken_back_from_hyper_with_what_it_read_ahead() {
        crate::with_test_timeout(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(stream.read_u8().await.unwrap());
                }
                // The response and the first bytes of the new protocol in one write.
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                    upgrade: websocket\r\n\r\nahead|";
                stream.write_all(answer).await.unwrap();
                stream.write_all(b"after").await.unwrap();
            });
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection.with_upgrades());
            let request = http::Request::get("/ws")
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "websocket")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
            let upgraded = hyper::upgrade::on(response).await.unwrap();

            let (backend, ahead) = backend_connection(upgraded);
            let mut down = Direction::new(false, ahead);
            let mut backend = backend.expect("the pool's TcpStream");
            let (mut writer, mut client) = tokio::io::duplex(1024);
            let copied = poll_fn(|cx| down.poll_copy(cx, &mut backend, &mut writer, Until::End));
            assert_eq!(copied.await.unwrap(), Stopped::End);
            assert_eq!(read_n(&mut client, 11).await, b"ahead|after");
            server.await.unwrap();
        })
        .await;
    }
}
