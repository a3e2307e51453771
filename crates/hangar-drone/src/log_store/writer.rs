//! The drone's one writer of backend output: executors hand batches of lines to a [`LogWriter`], and
//! a dedicated thread appends them to the [`LogStore`] (file IO, `fsync`-free but blocking), so a
//! slow disk never stalls a runtime worker that captures output, proxies a session or renews keys.
//!
//! Order: one queue for every backend, so a backend's lines are kept in the order they were read and
//! its end is recorded after its last line. Each line keeps the time it was read, not written.
//! Overflow: the queue holds [`WRITE_QUEUE`] batches; when it is full the capturing task waits (the
//! backend's pipe fills, as it would behind a slow disk); nothing is dropped. The thread ends once
//! every handle is gone; [`LogWriter::flush`] waits for what was queued before it (the drone's stop).

use super::LogStore;
use hangar_types::logs::LogStream;
use hangar_types::{BackendId, Millis};
use std::io;
use tokio::sync::{mpsc, oneshot};

/// Batches queued for the writer thread before capturing tasks wait. A batch is what one read of a
/// backend's pipe or Docker's log stream gave (at most 64 KiB of output for the process executor),
/// so the queue holds at most a few MiB: a flood of output does not grow the drone's memory.
pub const WRITE_QUEUE: usize = 16;

/// Cheap to clone; every clone feeds the same thread.
#[derive(Clone)]
pub struct LogWriter {
    store: LogStore,
    queue: mpsc::Sender<Write>,
}

enum Write {
    Append {
        backend: BackendId,
        time: Millis,
        lines: Vec<(LogStream, String)>,
    },
    End(BackendId, oneshot::Sender<()>),
    Flush(oneshot::Sender<()>),
}

impl LogWriter {
    /// Starts the writer thread of `store`.
    pub fn start(store: LogStore) -> io::Result<LogWriter> {
        let (queue, writes) = mpsc::channel(WRITE_QUEUE);
        let thread_store = store.clone();
        std::thread::Builder::new()
            .name("hangar-log-writer".into())
            .spawn(move || run_log_writer(thread_store, writes))?;
        Ok(LogWriter { store, queue })
    }

    /// The store written to (for reads).
    pub fn store(&self) -> &LogStore {
        &self.store
    }

    /// Queues one batch of `backend`'s lines, timed now; waits only while the queue is full.
    pub async fn append(&self, backend: &BackendId, lines: Vec<(LogStream, String)>) {
        if lines.is_empty() {
            return;
        }
        let write = Write::Append {
            backend: backend.clone(),
            time: Millis::now(),
            lines,
        };
        self.send(write).await;
    }

    /// Records the end of `backend` after every line queued before, and waits until it is written
    /// (so a backend's lines are kept before its exit is reported).
    pub async fn end(&self, backend: &BackendId) {
        let (done, written) = oneshot::channel();
        self.send(Write::End(backend.clone(), done)).await;
        let _ = written.await;
    }

    /// Waits until everything queued before is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        self.send(Write::Flush(done)).await;
        let _ = written.await;
    }

    async fn send(&self, write: Write) {
        if self.queue.send(write).await.is_err() {
            tracing::warn!("The log writer thread is gone; backend output not kept");
        }
    }
}

fn run_log_writer(store: LogStore, mut writes: mpsc::Receiver<Write>) {
    while let Some(write) = writes.blocking_recv() {
        match write {
            Write::Append {
                backend,
                time,
                lines,
            } => store.append_at(&backend, time, &lines),
            Write::End(backend, done) => {
                store.end(&backend);
                let _ = done.send(());
            }
            Write::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_and_the_end_are_written_in_order_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::log_store::test_store(dir.path(), 1 << 20);
        let writer = LogWriter::start(store.clone()).unwrap();
        let backend = BackendId::random();
        for i in 0..100 {
            let lines = vec![(LogStream::Stdout, format!("line {i}"))];
            writer.append(&backend, lines).await;
        }
        writer.end(&backend).await;
        let mut changes = store.watch(&backend).unwrap();
        assert!(changes.borrow_and_update().ended);
        let (lines, _) = store
            .start_read(&backend, None, Some(1000))
            .unwrap()
            .unwrap();
        let texts: Vec<_> = lines.iter().map(|l| l.line.as_str()).collect();
        let expected: Vec<_> = (0..100).map(|i| format!("line {i}")).collect();
        assert_eq!(texts, expected);
        let other = BackendId::random();
        writer
            .append(&other, vec![(LogStream::Stderr, "late".into())])
            .await;
        writer.flush().await;
        assert!(store.watch(&other).is_some());
    }
}
