//! The periodic loop every component runs (sweeps, heartbeats, recounts, pruning): a tick every
//! period until a `CancellationToken` fires. A tick that comes late delays the next ones rather than
//! bunching them up ([`MissedTickBehavior::Delay`]): a slow pass is not followed by a burst of passes.
//!
//! A timer, not IO: this is the one piece of this crate that needs the tokio runtime.

use std::time::Duration;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Ticks every period until cancelled; see [`every`] and [`every_from`].
#[derive(Debug)]
pub struct Ticks<'a> {
    interval: Interval,
    cancel: &'a CancellationToken,
}

/// Ticks at once, then every `period`, until `cancel` fires.
///
/// ```text
/// let mut ticks = every(SWEEP_INTERVAL, &cancel);
/// while ticks.next().await {
///     sweep_once(...).await;
/// }
/// ```
pub fn every(period: Duration, cancel: &CancellationToken) -> Ticks<'_> {
    every_from(Instant::now(), period, cancel)
}

/// Ticks at `start`, then every `period`, until `cancel` fires.
pub fn every_from(start: Instant, period: Duration, cancel: &CancellationToken) -> Ticks<'_> {
    let mut interval = tokio::time::interval_at(start, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Ticks { interval, cancel }
}

impl Ticks<'_> {
    /// Waits for the next tick: `true` when it came, `false` once the token is cancelled (also when
    /// both are ready, so a cancelled loop never runs one more pass).
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_at_once_then_every_period_until_cancelled() {
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let mut ticks = every(Duration::from_secs(10), &cancel);
        assert!(ticks.next().await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(ticks.next().await);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        cancel.cancel();
        assert!(!ticks.next().await);
        assert!(!ticks.next().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_delays_the_next_ones() {
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let mut ticks = every_from(
            start + Duration::from_secs(5),
            Duration::from_secs(10),
            &cancel,
        );
        assert!(ticks.next().await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A pass that takes 25 s: the next tick comes at once, the one after a full period later.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(ticks.next().await);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert!(ticks.next().await);
        assert_eq!(start.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_wins_over_a_ready_tick() {
        let cancel = CancellationToken::new();
        let mut ticks = every(Duration::from_secs(10), &cancel);
        cancel.cancel();
        // The first tick is due at once, yet the loop ends.
        assert!(!ticks.next().await);
    }
}
