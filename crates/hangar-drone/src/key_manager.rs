//! Key deadlines of one backend on the drone's own clock (plane-api.md §5.4–5.7): renew after
//! `renew_at`, soft-terminate at `soft_terminate_at`, hard-terminate at `hard_terminate_at`.
//!
//! Deadlines arrive as drone wall-clock [`Millis`]; they are turned into monotonic instants once, when
//! received, by comparing with the drone's own wall clock, so no other machine's clock is ever used
//! and a wall-clock jump afterwards cannot delay a termination.

use hangar_types::protocol::KeyDeadlines;
use hangar_types::{Millis, TerminationKind};
use std::time::Duration;
use tokio::time::Instant;

/// A renewal that got no answer is asked again after this long.
pub const RENEW_RETRY: Duration = Duration::from_secs(5);

/// What the key manager wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep {
    /// Send `RenewKey` for the backend.
    Renew,
    /// Terminate the backend with reason `keyexpired`.
    Terminate(TerminationKind),
}

#[derive(Debug, Clone)]
pub struct KeyManager {
    renew_at: Instant,
    soft_at: Instant,
    hard_at: Instant,
    /// When the last renewal was asked for (reset by new deadlines).
    renew_sent: Option<Instant>,
    /// The controller refused to renew: let the backend run into its deadlines.
    refused: bool,
    soft_done: bool,
    hard_done: bool,
}

/// The instant at which the drone clock, now reading `now_local` (at `now`), reads `at`.
fn instant_of(at: Millis, now_local: Millis, now: Instant) -> Instant {
    now + now_local.until(at)
}

impl KeyManager {
    /// Deadlines as received; `now_local` is the drone's wall clock at the instant `now`.
    pub fn new(deadlines: &KeyDeadlines, now_local: Millis, now: Instant) -> Self {
        KeyManager {
            renew_at: instant_of(deadlines.renew_at, now_local, now),
            soft_at: instant_of(deadlines.soft_terminate_at, now_local, now),
            hard_at: instant_of(deadlines.hard_terminate_at, now_local, now),
            renew_sent: None,
            refused: false,
            soft_done: false,
            hard_done: false,
        }
    }

    /// A renewal succeeded: these deadlines replace the current ones. A termination already begun is
    /// not undone.
    pub fn renewed(&mut self, deadlines: &KeyDeadlines, now_local: Millis, now: Instant) {
        let (soft_done, hard_done) = (self.soft_done, self.hard_done);
        *self = KeyManager::new(deadlines, now_local, now);
        self.soft_done = soft_done;
        self.hard_done = hard_done;
    }

    /// The controller refused the renewal: keep the deadlines and stop asking.
    pub fn refused(&mut self) {
        self.refused = true;
    }

    fn renewing(&self) -> bool {
        !self.refused && !self.soft_done
    }

    fn next_renew(&self) -> Instant {
        match self.renew_sent {
            Some(sent) => self.renew_at.max(sent + RENEW_RETRY),
            None => self.renew_at,
        }
    }

    /// The step due at `now`, if any; each termination step is returned once, renewals again every
    /// [`RENEW_RETRY`] until answered.
    pub fn poll(&mut self, now: Instant) -> Option<KeyStep> {
        if !self.hard_done && now >= self.hard_at {
            self.hard_done = true;
            self.soft_done = true;
            return Some(KeyStep::Terminate(TerminationKind::Hard));
        }
        if !self.soft_done && now >= self.soft_at {
            self.soft_done = true;
            return Some(KeyStep::Terminate(TerminationKind::Soft));
        }
        if self.renewing() && now >= self.next_renew() {
            self.renew_sent = Some(now);
            return Some(KeyStep::Renew);
        }
        None
    }

    /// When [`KeyManager::poll`] next has something to do; `None` once the hard deadline was acted on.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        if !self.hard_done {
            consider(self.hard_at);
        }
        if !self.soft_done {
            consider(self.soft_at);
        }
        if self.renewing() {
            consider(self.next_renew());
        }
        next
    }

    /// Waits for the next step. Cancel-safe: nothing changes until the wait is over.
    pub async fn next_step(&mut self) -> KeyStep {
        loop {
            let Some(at) = self.next_wakeup() else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(at).await;
            if let Some(step) = self.poll(Instant::now()) {
                return step;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::timing::{
        KEY_HARD_TERMINATE_AFTER, KEY_RENEW_AFTER, KEY_SOFT_TERMINATE_AFTER,
    };

    const TEST_TIMEOUT: Duration = Duration::from_secs(600);

    fn fresh() -> (KeyManager, Instant) {
        let now = Instant::now();
        let local = Millis::now();
        (
            KeyManager::new(&KeyDeadlines::from_base(local), local, now),
            now,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn renews_then_soft_then_hard_without_answers() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (mut key, start) = fresh();
            assert_eq!(key.next_step().await, KeyStep::Renew);
            assert_eq!(start.elapsed(), KEY_RENEW_AFTER);
            // No answer: asked again every RENEW_RETRY until the soft deadline.
            assert_eq!(key.next_step().await, KeyStep::Renew);
            assert_eq!(start.elapsed(), KEY_RENEW_AFTER + RENEW_RETRY);
            assert_eq!(
                key.next_step().await,
                KeyStep::Terminate(TerminationKind::Soft)
            );
            assert_eq!(start.elapsed(), KEY_SOFT_TERMINATE_AFTER);
            assert_eq!(
                key.next_step().await,
                KeyStep::Terminate(TerminationKind::Hard)
            );
            assert_eq!(start.elapsed(), KEY_HARD_TERMINATE_AFTER);
            assert_eq!(key.next_wakeup(), None);
            let waited = tokio::time::timeout(Duration::from_secs(100), key.next_step()).await;
            assert!(waited.is_err(), "nothing is left to do");
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_pushes_deadlines_back() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (mut key, start) = fresh();
            assert_eq!(key.next_step().await, KeyStep::Renew);
            // The controller answers with deadlines based on the drone's time at the request.
            let local = Millis::now();
            key.renewed(&KeyDeadlines::from_base(local), local, Instant::now());
            assert_eq!(key.next_step().await, KeyStep::Renew);
            assert_eq!(start.elapsed(), KEY_RENEW_AFTER * 2);
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn refused_renewal_runs_into_deadlines() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (mut key, start) = fresh();
            assert_eq!(key.next_step().await, KeyStep::Renew);
            key.refused();
            assert_eq!(
                key.next_step().await,
                KeyStep::Terminate(TerminationKind::Soft)
            );
            assert_eq!(start.elapsed(), KEY_SOFT_TERMINATE_AFTER);
        })
        .await
        .unwrap();
    }

    #[test]
    fn past_deadlines_act_at_once_and_hard_wins() {
        let now = Instant::now();
        let local = Millis(1_000_000);
        let mut key = KeyManager::new(&KeyDeadlines::from_base(Millis(0)), local, now);
        assert_eq!(key.next_wakeup(), Some(now));
        assert_eq!(
            key.poll(now),
            Some(KeyStep::Terminate(TerminationKind::Hard))
        );
        assert_eq!(key.poll(now), None);
        assert_eq!(key.next_wakeup(), None);
    }

    #[test]
    fn renewal_after_soft_termination_does_not_undo_it() {
        let now = Instant::now();
        let local = Millis(100_000);
        let soft_passed = KeyDeadlines {
            renew_at: Millis(0),
            soft_terminate_at: Millis(0),
            hard_terminate_at: Millis(200_000),
        };
        let mut key = KeyManager::new(&soft_passed, local, now);
        assert_eq!(
            key.poll(now),
            Some(KeyStep::Terminate(TerminationKind::Soft))
        );
        key.renewed(&KeyDeadlines::from_base(local), local, now);
        // Still heading for the hard deadline of the new lease, never renewing again.
        assert_eq!(key.poll(now + KEY_RENEW_AFTER), None);
        assert_eq!(key.next_wakeup(), Some(now + KEY_HARD_TERMINATE_AFTER));
    }
}
