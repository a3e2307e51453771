//! The proxy's half of the certificate messages on its controller session (plane-api.md §7.9.3):
//! a small outbox of `ProxyToController` TLS messages that the session's sender drains, and the
//! controller's answers to lease and TXT requests, handed to the one task that asks (the ACME loop).
//!
//! The protocol carries no request ids: an answer belongs to the oldest unanswered request. Only the
//! ACME loop sends requests that are answered, one at a time, and it drops stale answers before each
//! request, so a late answer to a timed-out request cannot be taken for the next one's.
//!
//! Invariant: the outbox is bounded ([`OUTBOX_CAPACITY`]); when full the oldest message is dropped
//! (the ACME loop times out and retries). Messages wait in it while the controller is unreachable and
//! leave it only once sent (at least once: a message may be sent again on the next connection).

use hangar_types::protocol::ProxyToController;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Most TLS messages queued for the controller.
const OUTBOX_CAPACITY: usize = 32;
/// Answers kept until the ACME loop reads them; more are dropped (nobody is waiting for them).
const ANSWER_CAPACITY: usize = 8;

/// An answer of the controller to a certificate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertAnswer {
    Lease { accepted: bool },
    TxtRecord { accepted: bool },
}

/// Why a request got no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("the controller did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the controller answered a different request")]
    UnexpectedAnswer,
}

pub(crate) struct CertLink {
    outbox: Mutex<VecDeque<ProxyToController>>,
    /// Wakes the session's sender.
    outbound: Arc<Notify>,
    answers_tx: mpsc::Sender<CertAnswer>,
    answers_rx: tokio::sync::Mutex<mpsc::Receiver<CertAnswer>>,
}

impl CertLink {
    pub(crate) fn new(outbound: Arc<Notify>) -> Self {
        let (answers_tx, answers_rx) = mpsc::channel(ANSWER_CAPACITY);
        CertLink {
            outbox: Mutex::new(VecDeque::new()),
            outbound,
            answers_tx,
            answers_rx: tokio::sync::Mutex::new(answers_rx),
        }
    }

    fn outbox(&self) -> MutexGuard<'_, VecDeque<ProxyToController>> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message` for the controller (sent once connected).
    pub(crate) fn send(&self, message: ProxyToController) {
        {
            let mut outbox = self.outbox();
            if outbox.len() >= OUTBOX_CAPACITY {
                outbox.pop_front();
                tracing::warn!(
                    "Too many certificate messages queued for the controller; dropped the oldest"
                );
            }
            outbox.push_back(message);
        }
        self.outbound.notify_one();
    }

    /// Whether messages wait to be sent.
    pub(crate) fn has_unsent(&self) -> bool {
        !self.outbox().is_empty()
    }

    /// The oldest message not yet sent; it stays queued until [`CertLink::mark_sent`].
    pub(crate) fn next_unsent(&self) -> Option<ProxyToController> {
        self.outbox().front().cloned()
    }

    /// `message` (from [`CertLink::next_unsent`]) went out: take it off the queue, unless an overflow
    /// already dropped it.
    pub(crate) fn mark_sent(&self, message: &ProxyToController) {
        let mut outbox = self.outbox();
        if outbox.front() == Some(message) {
            outbox.pop_front();
        }
    }

    /// An answer arrived from the controller.
    pub(crate) fn answer(&self, answer: CertAnswer) {
        if self.answers_tx.try_send(answer).is_err() {
            tracing::debug!(?answer, "Dropping a certificate answer nobody waits for");
        }
    }

    /// Sends `request` and waits up to `wait` for its answer.
    pub(crate) async fn request(
        &self,
        request: ProxyToController,
        wait: Duration,
    ) -> Result<CertAnswer, LinkError> {
        let mut answers = self.answers_rx.lock().await;
        while answers.try_recv().is_ok() {}
        let expect_lease = matches!(request, ProxyToController::CertLeaseRequest);
        self.send(request);
        let answer = tokio::time::timeout(wait, answers.recv())
            .await
            .ok()
            .flatten()
            .ok_or(LinkError::NoAnswer(wait))?;
        match (expect_lease, answer) {
            (true, CertAnswer::Lease { .. }) | (false, CertAnswer::TxtRecord { .. }) => Ok(answer),
            _ => Err(LinkError::UnexpectedAnswer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_get_their_answers_and_stale_ones_are_dropped() {
        crate::with_test_timeout(async {
            let link = Arc::new(CertLink::new(Arc::new(Notify::new())));
            // A late answer from before the request is not taken for its answer.
            link.answer(CertAnswer::Lease { accepted: false });
            let asking = {
                let link = link.clone();
                tokio::spawn(async move {
                    link.request(ProxyToController::CertLeaseRequest, Duration::from_secs(5))
                        .await
                })
            };
            // Wait until the request is queued, then answer it.
            loop {
                if let Some(sent) = link.next_unsent() {
                    assert_eq!(sent, ProxyToController::CertLeaseRequest);
                    link.mark_sent(&sent);
                    break;
                }
                tokio::task::yield_now().await;
            }
            link.answer(CertAnswer::Lease { accepted: true });
            assert_eq!(
                asking.await.unwrap(),
                Ok(CertAnswer::Lease { accepted: true })
            );

            // No answer: a timeout error.
            let result = link
                .request(
                    ProxyToController::SetTxtRecord { txt_value: None },
                    Duration::from_secs(5),
                )
                .await;
            assert_eq!(result, Err(LinkError::NoAnswer(Duration::from_secs(5))));
        })
        .await;
    }

    #[test]
    fn the_outbox_is_bounded_and_keeps_messages_until_sent() {
        let link = CertLink::new(Arc::new(Notify::new()));
        assert!(!link.has_unsent());
        link.send(ProxyToController::CertLeaseRequest);
        for _ in 0..OUTBOX_CAPACITY {
            link.send(ProxyToController::ReleaseCertLease);
        }
        // The oldest was dropped.
        assert_eq!(
            link.next_unsent(),
            Some(ProxyToController::ReleaseCertLease)
        );
        let mut sent = 0;
        while let Some(message) = link.next_unsent() {
            // Not marked sent: still there.
            assert_eq!(link.next_unsent().as_ref(), Some(&message));
            link.mark_sent(&message);
            sent += 1;
        }
        assert_eq!(sent, OUTBOX_CAPACITY);
        assert!(!link.has_unsent());
    }
}
