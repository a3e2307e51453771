//! The request body size limit for forwarded requests: a body wrapper that counts bytes as they
//! stream through and fails the body once it grows past the limit, remembering that it did so the
//! pipeline can answer `413` instead of `502`.

use crate::error::BoxError;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The body grew past the limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
pub(crate) struct BodyTooLarge {
    pub(crate) limit: u64,
}

/// Whether a [`LimitedBody`] went over its limit; shared with the code that sent it.
#[derive(Clone, Default)]
pub(crate) struct Tripped(Arc<AtomicBool>);

impl Tripped {
    pub(crate) fn is_tripped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body that fails with [`BodyTooLarge`] once more than `limit` bytes came through.
pub(crate) struct LimitedBody<B> {
    inner: B,
    limit: u64,
    seen: u64,
    tripped: Tripped,
}

impl<B> LimitedBody<B> {
    pub(crate) fn new(inner: B, limit: u64) -> (Self, Tripped) {
        let tripped = Tripped::default();
        let body = LimitedBody {
            inner,
            limit,
            seen: 0,
            tripped: tripped.clone(),
        };
        (body, tripped)
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.tripped.is_tripped() {
            return Poll::Ready(Some(Err(BodyTooLarge { limit: self.limit }.into())));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            self.seen = self.seen.saturating_add(data.len() as u64);
            if self.seen > self.limit {
                self.tripped.0.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(BodyTooLarge { limit: self.limit }.into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(sizes: &[usize]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![1u8; n]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn passes_bodies_up_to_the_limit() {
        crate::with_test_timeout(async {
            let (body, tripped) = LimitedBody::new(chunks(&[4, 4, 2]), 10);
            let collected = body.collect().await.unwrap().to_bytes();
            assert_eq!(collected.len(), 10);
            assert!(!tripped.is_tripped());
        })
        .await;
    }

    #[tokio::test]
    async fn fails_once_past_the_limit() {
        crate::with_test_timeout(async {
            let (body, tripped) = LimitedBody::new(chunks(&[4, 4, 3, 100]), 10);
            let error = body.collect().await.unwrap_err();
            assert!(error.is::<BodyTooLarge>(), "{error}");
            assert!(tripped.is_tripped());
        })
        .await;
    }
}
