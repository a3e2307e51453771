//! Work raced against signals that rarely fire (cancellation tokens, idle timers), without paying
//! for the signals on every wake-up of the work.
//!
//! `tokio::select!` polls every branch each time its task wakes, and a connection's task wakes for
//! every read and write. Polling a `CancellationToken`'s future takes the token's lock (twice), so
//! a connection that watched its signals that way spent about 2 % of the proxy's CPU on them, more
//! than the request routing's own code (BENCHMARKS.md, "Signals polled on every wake-up"). A [`Signals`] set gives each signal its own
//! waker and polls only the ones that fired.

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Signals of one kind of outcome, each polled only when its own waker fired.
pub(crate) struct Signals<'a, T> {
    set: FuturesUnordered<Pin<Box<dyn Future<Output = T> + Send + 'a>>>,
}

impl<'a, T> Signals<'a, T> {
    pub(crate) fn new() -> Self {
        Signals {
            set: FuturesUnordered::new(),
        }
    }

    pub(crate) fn push(&mut self, signal: impl Future<Output = T> + Send + 'a) {
        self.set.push(Box::pin(signal));
    }

    /// The next signal to fire; never completes while the set is empty.
    pub(crate) async fn next(&mut self) -> T {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        match self.set.poll_next_unpin(cx) {
            Poll::Ready(Some(fired)) => Poll::Ready(fired),
            // Empty: nothing can fire any more.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`or_signal`].
    pub(crate) struct OrSignal<'a, W, T> {
        #[pin]
        work: W,
        signals: Signals<'a, T>,
    }
}

/// Runs `work` until it completes (`Left`) or `signal` fires first (`Right`, and `work` is
/// dropped). `signal` is polled only when its own waker fired; `work` first on each wake-up.
pub(crate) fn or_signal<'a, W, S>(work: W, signal: S) -> OrSignal<'a, W, S::Output>
where
    W: Future,
    S: Future + Send + 'a,
{
    let mut signals = Signals::new();
    signals.push(signal);
    OrSignal { work, signals }
}

impl<W: Future, T> Future for OrSignal<'_, W, T> {
    type Output = Either<W::Output, T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(done) = this.work.poll(cx) {
            return Poll::Ready(Either::Left(done));
        }
        this.signals.poll_next(cx).map(Either::Right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    /// A future that counts its polls and completes when `token` is cancelled.
    fn counted(token: CancellationToken, polls: Arc<AtomicUsize>) -> impl Future<Output = ()> {
        let mut wait = Box::pin(token.cancelled_owned());
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            wait.as_mut().poll(cx)
        })
    }

    #[tokio::test]
    async fn a_signal_is_polled_only_when_it_fired_not_on_each_wake_up_of_the_work() {
        crate::with_test_timeout(async {
            let polls = Arc::new(AtomicUsize::new(0));
            let token = CancellationToken::new();
            // Work that wakes its task 1000 times before it completes.
            let mut wake_ups = 0;
            let work = std::future::poll_fn(|cx| {
                wake_ups += 1;
                if wake_ups > 1000 {
                    return Poll::Ready("done");
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            });
            let outcome = or_signal(work, counted(token.clone(), polls.clone())).await;
            assert!(matches!(outcome, Either::Left("done")));
            // Polled once to register its waker (a plain select! polls it 1001 times).
            assert_eq!(polls.load(Ordering::Relaxed), 1);

            // The signal wins over work that never completes, and was polled once more to fire.
            polls.store(0, Ordering::Relaxed);
            let firing = token.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                firing.cancel();
            });
            let outcome =
                or_signal(std::future::pending::<()>(), counted(token, polls.clone())).await;
            assert!(matches!(outcome, Either::Right(())));
            assert_eq!(polls.load(Ordering::Relaxed), 2);
        })
        .await;
    }

    #[test]
    fn an_empty_set_never_fires() {
        // An empty `FuturesUnordered` is at its end at once; the set must stay pending instead.
        let mut signals = Signals::<()>::new();
        assert!(
            futures_util::FutureExt::now_or_never(signals.next()).is_none(),
            "an empty set fired"
        );
    }
}
