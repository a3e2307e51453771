//! Upgraded connections (WebSockets): once both the client's and the backend's connections have
//! switched protocols, bytes are copied both ways until one side closes. The tunnel holds a
//! [`ConnectionGuard`], so the backend counts one open connection for exactly the tunnel's life, and
//! its client connection, so it keeps counting against `max_connections`.
//!
//! Going away (proxy shutdown): a WebSocket tunnel finishes forwarding the frame in progress in
//! each direction (boundaries are followed by [`FrameTracker`] as bytes are copied), then sends a
//! close frame with status 1001 to the client (unmasked, as a server) and to the backend (masked,
//! as a client), waits briefly for the client to close, and ends. Other upgraded protocols just end.
//!
//! Must not: interpret or change what passes through, except for that final close frame.

use crate::connection_tracker::ConnectionGuard;
use crate::server::ClientConnection;
use crate::ws_frames::{masked_close_going_away, FrameTracker, CLOSE_GOING_AWAY};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// After one direction ends, how long the other may still drain before the tunnel is dropped. Bounds
/// the life of half-closed tunnels whose peer never closes its side.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(5);
/// When going away: how long a tunnel may take to reach frame boundaries, send its close frames and
/// see the client close.
pub(crate) const GOING_AWAY_WAIT: Duration = Duration::from_secs(2);
/// Most bytes one read of a direction takes. Reads go into a buffer on the stack of the poll that
/// completes them; only bytes not yet written are kept on the heap, so an idle tunnel holds no copy
/// buffer at all (`hangar-bench proxy-ws` measures a tunnel's memory).
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
    let backend = TokioIo::new(backend);
    // A terminated backend's tunnel is cut at once, without close frames: its process may still
    // run, and nothing it sends may reach the client any more.
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = severed.cancelled() => {
            tracing::debug!("Closing a tunnel to a terminated backend");
        }
        _ = splice(client, backend, websocket, &going_away) => {}
    }
    drop(guard);
    drop(connection);
}

/// Copies client → backend and backend → client. When one direction reaches end of stream (or
/// fails), the write side it fed is shut down and the other direction gets [`HALF_CLOSE_LINGER`]
/// to finish. Copy errors only end the tunnel. See the module docs for `going_away`.
async fn splice<A, B>(client: A, backend: B, websocket: bool, going_away: &CancellationToken)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (backend_read, backend_write) = tokio::io::split(backend);
    let mut up = Pump::new(client_read, backend_write, websocket);
    let mut down = Pump::new(backend_read, client_write, websocket);
    enum Ended {
        Client,
        Backend,
        GoingAway,
    }
    // Both copies are cancel-safe: their state lives in the pumps, so they can be resumed below.
    let ended = tokio::select! {
        _ = up.copy() => Ended::Client,
        _ = down.copy() => Ended::Backend,
        _ = going_away.cancelled() => Ended::GoingAway,
    };
    match ended {
        Ended::Client => {
            let _ = up.writer.shutdown().await;
            linger(&mut down, going_away).await;
        }
        Ended::Backend => {
            let _ = down.writer.shutdown().await;
            linger(&mut up, going_away).await;
        }
        Ended::GoingAway if websocket => {
            let _ = tokio::time::timeout(GOING_AWAY_WAIT, say_going_away(&mut up, &mut down)).await;
        }
        Ended::GoingAway => {}
    }
}

/// Lets the remaining direction finish for a while, then shuts down the side it writes to.
async fn linger<R, W>(pump: &mut Pump<R, W>, going_away: &CancellationToken)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::time::timeout(HALF_CLOSE_LINGER, pump.copy()) => {}
        _ = going_away.cancelled() => {}
    }
    let _ = pump.writer.shutdown().await;
}

/// Sends close frames (1001) both ways at frame boundaries, then reads from the client until it
/// closes, so closing the socket does not reset the connection before the client read the frame.
async fn say_going_away<CR, BW, BR, CW>(up: &mut Pump<CR, BW>, down: &mut Pump<BR, CW>)
where
    CR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let to_client = async {
        if down.copy_to_boundary().await.unwrap_or(false) {
            let _ = down.writer.write_all(&CLOSE_GOING_AWAY).await;
        }
        let _ = down.writer.shutdown().await;
    };
    let to_backend = async {
        if up.copy_to_boundary().await.unwrap_or(false) {
            let close = masked_close_going_away(rand::random());
            let _ = up.writer.write_all(&close).await;
        }
        let _ = up.writer.shutdown().await;
    };
    tokio::join!(to_client, to_backend);
    let mut discarded = 0;
    let mut discard = vec![0; 1024];
    while discarded < MAX_DISCARD {
        match up.reader.read(&mut discard).await {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

/// One direction of a tunnel: bytes read but not yet written wait in `buf[start..]`, and the frame
/// tracker (WebSocket only) accounts for written bytes only. Every await is a single read or write
/// that either happened completely or not at all, so the copy methods are cancel-safe.
struct Pump<R, W> {
    reader: R,
    writer: W,
    /// Empty, without an allocation, whenever everything read has been written (unless the last read
    /// was a full [`READ_CHUNK`]: a bulk transfer keeps its allocation for the next read).
    buf: Vec<u8>,
    start: usize,
    frames: Option<FrameTracker>,
}

impl<R, W> Pump<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fn new(reader: R, writer: W, websocket: bool) -> Self {
        Pump {
            reader,
            writer,
            buf: Vec::new(),
            start: 0,
            frames: websocket.then(FrameTracker::new),
        }
    }

    /// Reads more into the (empty) buffer; `false` at end of stream. The read itself lands on the
    /// stack and is copied out only once it completed, so a pump waiting here holds no buffer.
    async fn fill(&mut self) -> io::Result<bool> {
        let Pump { reader, buf, .. } = self;
        let n = std::future::poll_fn(|cx| {
            let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    buf.clear();
                    buf.extend_from_slice(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        self.start = 0;
        Ok(n > 0)
    }

    /// Forgets the written bytes; a small message's allocation is freed (see `buf`).
    fn drained(&mut self) {
        if self.buf.len() < READ_CHUNK {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.start = 0;
    }

    /// Writes up to `limit` of the waiting bytes (once), flushing when none are left.
    async fn write_some(&mut self, limit: usize) -> io::Result<()> {
        let end = self.buf.len().min(self.start.saturating_add(limit));
        let chunk = self.buf.get(self.start..end).unwrap_or_default();
        let n = self.writer.write(chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if let Some(frames) = &mut self.frames {
            frames.advance(chunk.get(..n).unwrap_or_default());
        }
        self.start += n;
        if self.start == self.buf.len() {
            self.drained();
            self.writer.flush().await?;
        }
        Ok(())
    }

    /// Copies until the reader's end of stream.
    async fn copy(&mut self) -> io::Result<()> {
        loop {
            if self.start < self.buf.len() {
                self.write_some(usize::MAX).await?;
            } else if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Copies up to the next frame boundary and no further (bytes read beyond it are dropped).
    /// `false` when no boundary can be reached: not WebSocket, framing lost, or end of stream.
    async fn copy_to_boundary(&mut self) -> io::Result<bool> {
        loop {
            let Some(distance) = self.frames.as_ref().and_then(FrameTracker::until_boundary) else {
                return Ok(false);
            };
            if distance == 0 {
                return Ok(true);
            }
            if self.start < self.buf.len() {
                self.write_some(usize::try_from(distance).unwrap_or(usize::MAX))
                    .await?;
            } else if !self.fill().await? {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn splice_copies_both_ways_and_ends_when_one_side_closes() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (mut client, proxy_a) = tokio::io::duplex(64);
            let (proxy_b, mut backend) = tokio::io::duplex(64);
            let never = CancellationToken::new();
            let tunnel = tokio::spawn(async move { splice(proxy_a, proxy_b, false, &never).await });
            client.write_all(b"ping").await.unwrap();
            assert_eq!(read_n(&mut backend, 4).await, b"ping");
            // More than one buffer and more than the duplex capacity.
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
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_idle_pump_holds_no_buffer_and_bulk_transfers_arrive_whole() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (mut source, reader) = tokio::io::duplex(1 << 20);
            let (writer, mut sink) = tokio::io::duplex(1 << 20);
            let mut pump = Pump::new(reader, writer, false);
            assert_eq!(pump.buf.capacity(), 0);
            // A bulk transfer moves in reads of up to READ_CHUNK and arrives unchanged.
            let big: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
            source.write_all(&big).await.unwrap();
            let mut copied = 0;
            let mut largest = 0;
            while copied < big.len() {
                assert!(pump.fill().await.unwrap());
                largest = largest.max(pump.buf.len());
                copied += pump.buf.len();
                while pump.start < pump.buf.len() {
                    pump.write_some(usize::MAX).await.unwrap();
                }
            }
            assert_eq!(largest, READ_CHUNK);
            assert_eq!(read_n(&mut sink, big.len()).await, big);
            // A small message is copied, and once written the pump holds no allocation any more:
            // that is the state of an idle tunnel, waiting in `fill`.
            source.write_all(b"small").await.unwrap();
            assert!(pump.fill().await.unwrap());
            assert_eq!(pump.buf, b"small");
            pump.write_some(usize::MAX).await.unwrap();
            assert_eq!(pump.buf.capacity(), 0);
            assert_eq!(read_n(&mut sink, 5).await, b"small");
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn half_closed_tunnel_ends_after_the_linger() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (client, proxy_a) = tokio::io::duplex(64);
            let (proxy_b, backend) = tokio::io::duplex(64);
            let never = CancellationToken::new();
            let tunnel = tokio::spawn(async move { splice(proxy_a, proxy_b, true, &never).await });
            // The client closes but the backend keeps its side open and silent.
            drop(client);
            tokio::time::timeout(HALF_CLOSE_LINGER * 2, tunnel)
                .await
                .expect("tunnel ends after the linger")
                .unwrap();
            drop(backend);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn going_away_waits_for_the_frame_in_progress_then_sends_close_frames() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (mut client, proxy_a) = tokio::io::duplex(1 << 16);
            let (proxy_b, mut backend) = tokio::io::duplex(1 << 16);
            let going_away = CancellationToken::new();
            let signal = going_away.clone();
            let tunnel = tokio::spawn(async move { splice(proxy_a, proxy_b, true, &signal).await });

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
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn going_away_ends_other_protocols_without_a_close_frame() {
        tokio::time::timeout(crate::TEST_TIMEOUT, async {
            let (mut client, proxy_a) = tokio::io::duplex(64);
            let (proxy_b, mut backend) = tokio::io::duplex(64);
            let going_away = CancellationToken::new();
            let signal = going_away.clone();
            let tunnel =
                tokio::spawn(async move { splice(proxy_a, proxy_b, false, &signal).await });
            client.write_all(b"raw").await.unwrap();
            assert_eq!(read_n(&mut backend, 3).await, b"raw");
            going_away.cancel();
            tunnel.await.unwrap();
            assert_eof(&mut client).await;
            assert_eof(&mut backend).await;
        })
        .await
        .unwrap();
    }
}
