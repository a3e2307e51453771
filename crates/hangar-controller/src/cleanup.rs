//! Periodic deletion of data nobody needs any more (plane-api.md §9.3): expired tokens and left-behind
//! ACME challenges always, terminated backends once they are `cleanup_min_age_days` old.
//!
//! Every controller runs this loop; the first pass comes after a random part of the interval so that
//! controllers sharing a database spread out, and the store makes concurrent passes safe.

use hangar_store::{Store, StoreResult};
use hangar_types::ticks::every_from;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows of each kind deleted per store call (Plane's `cleanup_batch_size`).
pub const CLEANUP_BATCH: u32 = 100;

/// What to delete and how often.
#[derive(Debug, Clone, Copy)]
pub struct CleanupPolicy {
    /// Terminated backends older than this are deleted; `None` keeps them.
    pub min_age: Option<Duration>,
    /// Time between passes (non-zero).
    pub interval: Duration,
}

impl CleanupPolicy {
    pub fn new(min_age_days: Option<u32>, interval: Duration) -> CleanupPolicy {
        CleanupPolicy {
            min_age: min_age_days.map(|days| Duration::from_secs(u64::from(days) * 24 * 3600)),
            interval,
        }
    }
}

/// Runs a cleanup pass every `policy.interval` until cancelled. Errors are logged; the next pass retries.
pub async fn run_cleanup(store: Arc<dyn Store>, policy: CleanupPolicy, cancel: CancellationToken) {
    // `interval` is validated non-zero by the config; guard anyway, an empty range would panic.
    let interval = policy.interval.max(Duration::from_millis(1));
    let offset = rand::rng().random_range(Duration::ZERO..interval);
    let mut ticks = every_from(tokio::time::Instant::now() + offset, interval, &cancel);
    while ticks.next().await {
        match cleanup_pass(store.as_ref(), policy.min_age, &cancel).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "Cleanup pass deleted rows"),
            Err(e) => tracing::warn!(error = %e, "Cleanup pass failed"),
        }
    }
}

/// One pass: batches of [`CLEANUP_BATCH`] until a batch deletes fewer rows than that (or `cancel`
/// fires). Returns the number of rows deleted.
pub async fn cleanup_pass(
    store: &dyn Store,
    min_age: Option<Duration>,
    cancel: &CancellationToken,
) -> StoreResult<u64> {
    let mut total = 0;
    while !cancel.is_cancelled() {
        let deleted = store.cleanup(min_age, CLEANUP_BATCH).await?;
        total += deleted;
        if deleted < u64::from(CLEANUP_BATCH) {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_age_is_whole_days() {
        let p = CleanupPolicy::new(Some(2), Duration::from_secs(5));
        assert_eq!(p.min_age, Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(
            CleanupPolicy::new(None, Duration::from_secs(5)).min_age,
            None
        );
    }
}
