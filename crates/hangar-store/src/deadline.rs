//! The client-side deadline on every store call.
//!
//! A pooled PostgreSQL connection whose link loses packets waits for its answer forever: sqlx has no
//! query timeout, `statement_timeout` runs on the server (which never saw the query), and the TCP
//! connection itself may stay healthy (a relay, a proxy or a NAT that swallows the bytes). So every
//! [`crate::Store`] method ends within [`STORE_CALL_DEADLINE`], with the retryable
//! [`crate::StoreError::DeadlineExceeded`] past it. The abandoned call's connection is dropped
//! mid-exchange and goes back to the pool, which pings it before reusing it; that ping would hang on
//! the same dead link and hold a pool slot for good, so for a while after a call overran
//! ([`Overruns`]) released connections must answer their ping within [`RELEASE_PING_TIMEOUT`] or are
//! closed (PostgreSQL's pool, `postgres.rs`).
//!
//! Must not: cost the healthy path more than a timer per call and a lock per released connection.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long a store call may take before it fails with `DeadlineExceeded`. Above the pool's acquire
/// timeout (10 s), so a busy pool reports itself; below the controller's node-session deadline
/// (`HANDLE_DEADLINE`, 30 s), so a session sees a store error rather than ending.
pub const STORE_CALL_DEADLINE: Duration = Duration::from_secs(20);

/// How long a connection released soon after an overrun has to answer its ping before it is closed.
pub(crate) const RELEASE_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after an overrun released connections are pinged with a bound. The abandoned connection
/// is released at the moment its call gives up, so a short window catches it.
const RELEASE_CHECK_WINDOW: Duration = Duration::from_secs(10);

/// When a store call last ran past its deadline.
#[derive(Debug, Default)]
pub(crate) struct Overruns {
    last: Mutex<Option<Instant>>,
}

impl Overruns {
    /// A call was abandoned at its deadline.
    pub(crate) fn record(&self) {
        *self.lock() = Some(Instant::now());
    }

    /// Whether a connection released now may be one an abandoned call left mid-exchange.
    pub(crate) fn recent(&self) -> bool {
        self.lock()
            .is_some_and(|last| last.elapsed() < RELEASE_CHECK_WINDOW)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means another thread panicked while writing an `Instant`.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_ordered() {
        assert!(RELEASE_PING_TIMEOUT < RELEASE_CHECK_WINDOW);
        assert!(crate::postgres::ACQUIRE_TIMEOUT < STORE_CALL_DEADLINE);
    }

    #[test]
    fn overruns_are_recent_for_a_while() {
        let overruns = Overruns::default();
        assert!(!overruns.recent());
        overruns.record();
        assert!(overruns.recent());
        *overruns.lock() = Instant::now().checked_sub(RELEASE_CHECK_WINDOW);
        assert!(!overruns.recent());
    }
}
