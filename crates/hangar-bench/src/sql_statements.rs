//! Counts the SQL statements the stores execute, from the `sqlx::query` events sqlx emits for every
//! statement it runs (at DEBUG, WARN when slow). Counting is off by default: while off, the filter
//! rejects those events before sqlx formats them, so the rest of a run is not slowed down.
//!
//! This needs the process-wide tracing subscriber installed by [`install_tracing`]; when another
//! subscriber was installed first, counting is unavailable and [`Counting::start`] says so.
//!
//! What counts: every statement sqlx sends (queries, and on PostgreSQL also `BEGIN`/`COMMIT`, which sqlx
//! issues as statements). SQLite transactions are begun and committed by sqlx's worker without a logged
//! statement, so SQLite counts exclude them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

static COUNTING: AtomicBool = AtomicBool::new(false);
static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Installs the process-wide subscriber once: log lines to stderr filtered by `RUST_LOG` (default
/// `warn`), plus the statement counter. Returns whether the counter is available.
pub fn install_tracing() -> bool {
    *INSTALLED.get_or_init(|| {
        let env_filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(env_filter);
        let counter = StatementCounter.with_filter(filter_fn(|meta| {
            meta.target() == "sqlx::query" && COUNTING.load(Ordering::Relaxed)
        }));
        tracing_subscriber::registry()
            .with(log)
            .with(counter)
            .try_init()
            .is_ok()
    })
}

struct StatementCounter;

impl<S: tracing::Subscriber> Layer<S> for StatementCounter {
    fn on_event(&self, _event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        STATEMENTS.fetch_add(1, Ordering::Relaxed);
    }
}

/// A counting window. Only one may be open at a time in a process.
pub struct Counting {
    start: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CountingError {
    #[error("another tracing subscriber was installed first, so SQL statements cannot be counted")]
    Unavailable,
    #[error("a statement counting window is already open")]
    AlreadyCounting,
}

impl Counting {
    pub fn start() -> Result<Counting, CountingError> {
        if !install_tracing() {
            return Err(CountingError::Unavailable);
        }
        if COUNTING.swap(true, Ordering::SeqCst) {
            return Err(CountingError::AlreadyCounting);
        }
        // The filter's answer may be cached per callsite by an earlier "off"; make it ask again.
        tracing::callsite::rebuild_interest_cache();
        Ok(Counting {
            start: STATEMENTS.load(Ordering::SeqCst),
        })
    }

    /// Statements counted since [`Counting::start`]; ends the window.
    pub fn stop(self) -> u64 {
        STATEMENTS.load(Ordering::SeqCst) - self.start
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}
