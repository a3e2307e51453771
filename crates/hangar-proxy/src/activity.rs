//! Idle detection for one client connection: when it last sent or received a byte
//! ([`ActivityIo`] records it) and how many request/response exchanges are in progress on it
//! ([`ExchangeGuard`]s, which live until the response body is finished or dropped).
//! [`ConnectionActivity::idle`] completes once the connection has been idle for a given time.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

pub(crate) struct ConnectionActivity {
    origin: Instant,
    /// Milliseconds after `origin` of the last byte read or written, or of the last exchange end.
    last_ms: AtomicU64,
    exchanges: AtomicUsize,
    had_exchange: AtomicBool,
}

impl ConnectionActivity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnectionActivity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            exchanges: AtomicUsize::new(0),
            had_exchange: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// An exchange (a request and its response) starts; it ends when the guard is dropped.
    pub(crate) fn begin_exchange(self: &Arc<Self>) -> ExchangeGuard {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        self.had_exchange.store(true, Ordering::Relaxed);
        self.touch();
        ExchangeGuard {
            activity: self.clone(),
        }
    }

    /// Whether any exchange has started on this connection.
    pub(crate) fn had_exchange(&self) -> bool {
        self.had_exchange.load(Ordering::Relaxed)
    }

    /// Completes once no exchange is in progress and no byte moved for `timeout`. While exchanges
    /// are in progress (e.g. a long poll), it checks again every `timeout`.
    pub(crate) async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            let now = Instant::now();
            if now < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.exchanges.load(Ordering::Relaxed) == 0 {
                return;
            } else {
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// One exchange in progress on a connection.
pub(crate) struct ExchangeGuard {
    activity: Arc<ConnectionActivity>,
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        // Touch first, so the idle clock starts no earlier than the end of the exchange.
        self.activity.touch();
        self.activity.exchanges.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket that records every read and write in its [`ConnectionActivity`].
pub(crate) struct ActivityIo<T> {
    inner: T,
    activity: Arc<ConnectionActivity>,
}

impl<T> ActivityIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<ConnectionActivity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_quiet_and_for_exchanges_to_end() {
        crate::with_test_timeout(async {
            let timeout = Duration::from_secs(10);
            let activity = ConnectionActivity::new();
            assert!(!activity.had_exchange());
            let (a, mut b) = tokio::io::duplex(64);
            let mut io = ActivityIo::new(a, activity.clone());
            let start = Instant::now();

            // Traffic after 4 s pushes the idle point to 14 s.
            tokio::time::sleep(Duration::from_secs(4)).await;
            b.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 1];
            io.read_exact(&mut buf).await.unwrap();
            activity.idle(timeout).await;
            assert_eq!(start.elapsed(), Duration::from_secs(14));

            // An exchange in progress keeps the connection from being idle, however quiet.
            let exchange = activity.begin_exchange();
            assert!(activity.had_exchange());
            let idle = activity.idle(timeout);
            tokio::pin!(idle);
            assert!(
                tokio::time::timeout(Duration::from_secs(35), &mut idle)
                    .await
                    .is_err(),
                "idle during an exchange"
            );
            let ended = Instant::now();
            drop(exchange);
            idle.await;
            assert!(ended.elapsed() >= timeout);
            assert!(ended.elapsed() < timeout * 2);

            // Writes count too.
            let before = activity.last();
            tokio::time::sleep(Duration::from_secs(1)).await;
            io.write_all(b"y").await.unwrap();
            assert!(activity.last() > before);
        })
        .await;
    }
}
