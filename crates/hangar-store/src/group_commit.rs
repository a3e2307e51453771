//! Group commit: writes that many callers make at once (a connection token per connect call, a
//! reconnect's key lookup and token) are gathered and written by one statement, so concurrent callers
//! share one round trip and one commit (on PostgreSQL one WAL flush; on SQLite one turn of the single
//! writer connection). Each caller gets its own answer (`R`; `()` for a plain write). Reads that many
//! callers make at once use the same queue (the scheduler's, `ops/nodes.rs`): a batch is read only
//! after every call in it was made, so each still sees what was committed before it.
//!
//! Leader and followers, no task of its own: a caller queues its row, then waits for the flush lock
//! or its answer, whichever comes first; whoever holds the lock takes every queued row (its own and
//! those queued meanwhile) and writes them. While one batch is being written, the next one gathers.
//! A caller whose row was taken by another flush returns with its answer, without taking the lock.
//! Every caller gets the outcome of its own row: the batch either commits as a whole, or the rows are
//! written one by one so that one bad row fails only its caller.
//!
//! Cancellation: a leader dropped in the middle of a flush (its client went away) drops the rows it
//! took; their callers get a retryable error ([`cancelled`]) and the connect is retried with a new token,
//! as after a lost connection.

use crate::{StoreError, StoreResult};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Most rows one statement writes (SQLite allows 32 766 parameters; a row has a handful).
pub const MAX_BATCH: usize = 64;

/// A row waiting to be written, and where its outcome goes.
pub type Pending<T, R = ()> = (T, oneshot::Sender<StoreResult<R>>);

/// The queue and flush lock of one kind of row.
#[derive(Debug)]
pub struct GroupCommit<T, R = ()> {
    queue: Mutex<Vec<Pending<T, R>>>,
    flush: tokio::sync::Mutex<()>,
}

impl<T, R> Default for GroupCommit<T, R> {
    fn default() -> Self {
        GroupCommit {
            queue: Mutex::new(Vec::new()),
            flush: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T, R> GroupCommit<T, R> {
    /// Writes `row` together with the rows queued beside it. `write` writes a batch of at most
    /// [`MAX_BATCH`] rows and answers each of them.
    pub async fn write<F, Fut>(&self, row: T, write: F) -> StoreResult<R>
    where
        F: Fn(Vec<Pending<T, R>>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (done, mut outcome) = oneshot::channel();
        self.lock_queue().push((row, done));
        // A follower whose row a leader answers returns at once rather than when the flush lock
        // comes its way: the callers of a batch do not pass the lock on one by one before the next
        // batch's leader gets it.
        let _flushing = tokio::select! {
            biased;
            answer = &mut outcome => return answer.unwrap_or_else(|_| Err(cancelled())),
            flushing = self.flush.lock() => flushing,
        };
        // FIFO: a holder before us may already have written our row. A leader writes until its own
        // row is answered, not while rows keep coming, so it never serves others indefinitely.
        loop {
            match outcome.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(cancelled()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = {
                let mut queue = self.lock_queue();
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                // Not reachable while `write` answers every row it is given.
                return Err(cancelled());
            }
            write(batch).await;
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Pending<T, R>>> {
        // Nothing panics while holding it (push and drain), so a poisoned lock still holds a sound queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The answers of one call of an [`all_or_each`] writer: an error if it wrote nothing, else one answer
/// per row, in the order of the rows.
pub type Answers<'a, R> =
    Pin<Box<dyn Future<Output = StoreResult<Vec<StoreResult<R>>>> + Send + 'a>>;

/// Answers `batch` with one call of `write` for all its rows; if that call fails, calls `write` for
/// each row alone, so that one bad row fails only its own caller. `write` must be all or nothing when
/// it fails (one statement, or nothing written before the failure).
pub async fn all_or_each<C, T, R>(
    context: &C,
    batch: Vec<Pending<T, R>>,
    write: impl for<'a> Fn(&'a C, Vec<&'a T>) -> Answers<'a, R>,
) {
    if batch.len() > 1 {
        let rows: Vec<&T> = batch.iter().map(|(row, _)| row).collect();
        let outcome = write(context, rows).await;
        if let Ok(answers) = outcome {
            let mut answers = answers.into_iter();
            for (_, done) in batch {
                let _ = done.send(answers.next().unwrap_or_else(|| Err(unanswered())));
            }
            return;
        }
    }
    for (row, done) in batch {
        let answer = match write(context, vec![&row]).await {
            Ok(answers) => answers
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(unanswered())),
            Err(e) => Err(e),
        };
        let _ = done.send(answer);
    }
}

/// A `write` that returned fewer answers than rows: a bug, reported to the callers left without one.
fn unanswered() -> StoreError {
    StoreError::Corrupt("a batched write returned fewer answers than rows".into())
}

/// The outcome of a row whose flush was dropped before it answered: retryable, as a lost connection is.
fn cancelled() -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "the batch holding this write was cancelled",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A follower returns with its answer while the leader that wrote its row still holds the flush
    /// lock (here: the leader's write has answered every row but not returned).
    #[tokio::test]
    async fn an_answered_follower_does_not_wait_for_the_flush_lock() {
        let group = Arc::new(GroupCommit::<u32>::default());
        let release = Arc::new(tokio::sync::Notify::new());
        let leader = {
            let (group, release) = (group.clone(), release.clone());
            tokio::spawn(async move {
                let write = |batch: Vec<Pending<u32>>| {
                    let release = release.clone();
                    async move {
                        for (_, done) in batch {
                            let _ = done.send(Ok(()));
                        }
                        release.notified().await;
                    }
                };
                group.write(0, write).await
            })
        };
        // The leader holds the flush lock once its row is taken.
        while group.flush.try_lock().is_ok() || !group.lock_queue().is_empty() {
            tokio::task::yield_now().await;
        }
        // A second caller queues its row; were it ever to lead, its write would fail the row.
        let follower = {
            let group = group.clone();
            tokio::spawn(async move {
                group
                    .write(1, |batch: Vec<Pending<u32>>| async move {
                        for (_, done) in batch {
                            let _ = done.send(Err(cancelled()));
                        }
                    })
                    .await
            })
        };
        while group.lock_queue().is_empty() {
            tokio::task::yield_now().await;
        }
        // Answer row 1 by hand, as a batch of the leader would, while the leader still holds the
        // lock: the follower must return with that answer.
        let (_, done) = group.lock_queue().pop().unwrap();
        done.send(Ok(())).unwrap();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
            .await
            .expect("the answered follower waited for the flush lock");
        assert!(answered.unwrap().is_ok());
        assert!(
            group.flush.try_lock().is_err(),
            "the leader still holds the lock"
        );
        release.notify_one();
        assert!(leader.await.unwrap().is_ok());
    }

    /// Rows queued while a batch is written go out together in the next one, and each writer gets
    /// its own row's outcome.
    #[tokio::test]
    async fn batches_rows_queued_meanwhile_and_answers_each() {
        let group = Arc::new(GroupCommit::<u32>::default());
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let writer = |i: u32| {
            let (group, batches, gate) = (group.clone(), batches.clone(), gate.clone());
            async move {
                let write = |batch: Vec<Pending<u32>>| {
                    let (batches, gate) = (batches.clone(), gate.clone());
                    async move {
                        gate.acquire().await.unwrap().forget();
                        batches
                            .lock()
                            .unwrap()
                            .push(batch.iter().map(|(r, _)| *r).collect());
                        for (row, done) in batch {
                            let outcome = if row == 7 { Err(cancelled()) } else { Ok(()) };
                            let _ = done.send(outcome);
                        }
                    }
                };
                (i, group.write(i, write).await.is_ok())
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(writer(0));
        // The first writer holds the flush lock with its row taken; nine more queue behind it.
        while group.flush.try_lock().is_ok() || !group.lock_queue().is_empty() {
            tokio::task::yield_now().await;
        }
        for i in 1..10 {
            tasks.spawn(writer(i));
        }
        while group.lock_queue().len() < 9 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(10);
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
        results.sort();
        for (i, ok) in results {
            assert_eq!(ok, i != 7, "row {i}");
        }
        assert_eq!(
            *batches.lock().unwrap(),
            vec![vec![0], (1..10).collect::<Vec<_>>()]
        );
    }
}
