//! Capped exponential backoff with jitter for reconnect loops.

use hangar_types::timing::{BACKOFF_INITIAL, BACKOFF_MAX};
use rand::Rng;
use std::time::{Duration, Instant};

/// Delay before the next reconnect attempt. Doubles after each failure up to a cap; a connection that
/// stayed up for at least `stable_after` resets it.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    stable_after: Duration,
    connected_at: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX)
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
            stable_after: Duration::from_secs(30),
            connected_at: None,
        }
    }

    /// Call when a connection was established.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    /// The delay to wait before the next attempt (with ±20 % jitter), advancing the backoff.
    pub fn next_delay(&mut self) -> Duration {
        if let Some(at) = self.connected_at.take() {
            if at.elapsed() >= self.stable_after {
                self.current = self.initial;
            }
        }
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.max)
    }

    /// Waits for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_and_resets_after_stable_connection() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..10 {
            b.next_delay();
        }
        assert!(b.next_delay() <= Duration::from_secs(1));
        assert!(b.next_delay() >= Duration::from_millis(800));
        b.stable_after = Duration::ZERO;
        b.connected();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn short_connection_keeps_growing() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        b.next_delay();
        b.connected();
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(160), "{d:?}");
    }
}
