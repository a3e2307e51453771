//! Answers the controller's log requests on one session (`LogRequest` → `LogLines`… `LogEnd`) from the
//! drone's [`LogStore`].
//!
//! Flow control: a read sends at most [`LOG_WINDOW`] batches ahead of the controller's `LogCredit`s,
//! and every frame goes through the session's bounded log channel, so a slow HTTP client slows its
//! own read and nothing else. At most [`MAX_OPEN`] reads run per session; all of them stop when the
//! session ends (the controller's side is gone with it).

use crate::log_store::{LogCursor, LogStore};
use hangar_types::logs::{LogEndReason, LogLine};
use hangar_types::protocol::{DroneToController, LOG_WINDOW};
use hangar_types::BackendId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Log reads served at once per session; more are answered `LogEnd { Busy }`.
pub const MAX_OPEN: usize = 64;

/// One log request as the controller sent it.
pub struct LogRequest {
    pub request_id: u64,
    pub backend: BackendId,
    pub since: Option<hangar_types::logs::LogSince>,
    pub tail: Option<u32>,
    pub follow: bool,
}

/// The log reads of one session.
pub struct LogRequests {
    store: Option<LogStore>,
    /// Frames for the session writer. Bounded ([`LOG_FRAMES`]); a full channel makes reads wait.
    out: mpsc::Sender<DroneToController>,
    open: Arc<Mutex<HashMap<u64, Open>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Capacity of a session's channel of log frames.
pub const LOG_FRAMES: usize = 16;

struct Open {
    credits: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl LogRequests {
    pub fn new(store: Option<LogStore>, out: mpsc::Sender<DroneToController>) -> Self {
        LogRequests {
            store,
            out,
            open: Arc::default(),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    pub fn start(&self, request: LogRequest) {
        let id = request.request_id;
        let credits = Arc::new(Semaphore::new(LOG_WINDOW as usize));
        let cancel = self.cancel.child_token();
        {
            let mut open = lock(&self.open);
            if open.len() >= MAX_OPEN || open.contains_key(&id) {
                drop(open);
                let end = DroneToController::LogEnd {
                    request_id: id,
                    reason: LogEndReason::Busy,
                };
                if self.out.try_send(end).is_err() {
                    tracing::debug!(request = id, "Log channel full; refused read not answered");
                }
                return;
            }
            let entry = Open {
                credits: credits.clone(),
                cancel: cancel.clone(),
            };
            open.insert(id, entry);
        }
        let read = Read {
            store: self.store.clone(),
            out: self.out.clone(),
            credits,
            cancel,
        };
        let open = self.open.clone();
        self.tracker.spawn(async move {
            read.run(request).await;
            lock(&open).remove(&id);
        });
    }

    pub fn credit(&self, request_id: u64) {
        if let Some(open) = lock(&self.open).get(&request_id) {
            open.credits.add_permits(1);
        }
    }

    pub fn cancel(&self, request_id: u64) {
        if let Some(open) = lock(&self.open).remove(&request_id) {
            open.cancel.cancel();
        }
    }
}

impl Drop for LogRequests {
    /// The session is over: every read stops (no work is spawned here).
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

struct Read {
    store: Option<LogStore>,
    out: mpsc::Sender<DroneToController>,
    credits: Arc<Semaphore>,
    cancel: CancellationToken,
}

/// The read was cancelled or the session ended: send nothing more.
struct Stopped;

impl Read {
    async fn run(self, request: LogRequest) {
        let id = request.request_id;
        let reason = match self.serve(request).await {
            Ok(reason) => reason,
            Err(Stopped) => return,
        };
        let end = DroneToController::LogEnd {
            request_id: id,
            reason,
        };
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.out.send(end) => {}
        }
    }

    async fn serve(&self, request: LogRequest) -> Result<LogEndReason, Stopped> {
        let Some(store) = self.store.clone() else {
            return Ok(LogEndReason::Unknown);
        };
        // Watched before the first read, so no write after it goes unnoticed.
        let Some(mut changes) = store.watch(&request.backend) else {
            return Ok(LogEndReason::Unknown);
        };
        let (backend, since) = (request.backend.clone(), request.since);
        let tail = request.tail.map(|t| t as usize);
        let reading = blocking(move || store.start_read(&backend, since, tail));
        let (first, mut cursor) = match self.wait(reading).await? {
            Ok(Some(started)) => started,
            Ok(None) => return Ok(LogEndReason::Unknown),
            Err(e) => return Ok(LogEndReason::Failed(e)),
        };
        for batch in first.chunks(crate::log_store::BATCH_LINES) {
            self.send(request.request_id, batch.to_vec()).await?;
        }
        if first.is_empty() && request.follow {
            // An empty first batch tells the controller the read is in place: every line written
            // from now on reaches it, so it can answer its HTTP client.
            self.send(request.request_id, Vec::new()).await?;
        }
        loop {
            let version = *changes.borrow_and_update();
            let (lines, returned) = match self.read_batch(cursor).await? {
                Ok(read) => read,
                Err(e) => return Ok(LogEndReason::Failed(e)),
            };
            cursor = returned;
            if !lines.is_empty() {
                self.send(request.request_id, lines).await?;
                continue;
            }
            if !request.follow {
                return Ok(LogEndReason::Complete);
            }
            if version.ended {
                return Ok(LogEndReason::BackendEnded);
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(Stopped),
                changed = changes.changed() => if changed.is_err() {
                    // The store forgot the backend (retention): nothing more will come.
                    return Ok(LogEndReason::BackendEnded);
                },
            }
        }
    }

    async fn read_batch(
        &self,
        mut cursor: LogCursor,
    ) -> Result<Result<(Vec<LogLine>, LogCursor), String>, Stopped> {
        let Some(store) = self.store.clone() else {
            return Ok(Err("no log store".into()));
        };
        let reading = blocking(move || store.read_batch(&mut cursor).map(|lines| (lines, cursor)));
        self.wait(reading).await
    }

    async fn send(&self, request_id: u64, lines: Vec<LogLine>) -> Result<(), Stopped> {
        let permit = tokio::select! {
            _ = self.cancel.cancelled() => return Err(Stopped),
            permit = self.credits.acquire() => permit.map_err(|_| Stopped)?,
        };
        permit.forget();
        let frame = DroneToController::LogLines { request_id, lines };
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stopped),
            sent = self.out.send(frame) => sent.map_err(|_| Stopped),
        }
    }

    async fn wait<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, Stopped> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stopped),
            done = work => Ok(done),
        }
    }
}

/// Runs file IO on a blocking thread; an IO error or a panic becomes its message.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::logs::LogStream;
    use std::time::Duration;

    async fn frame(rx: &mut mpsc::Receiver<DroneToController>) -> DroneToController {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no frame in time")
            .expect("the log channel closed")
    }

    fn batch(frame: DroneToController) -> Vec<String> {
        match frame {
            DroneToController::LogLines { lines, .. } => {
                lines.into_iter().map(|l| l.line).collect()
            }
            other => panic!("expected LogLines, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_follow_with_nothing_to_send_yet_says_it_is_watching() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::log_store::test_store(dir.path(), 1 << 20);
        let backend = BackendId::random();
        store.append(&backend, &[(LogStream::Stdout, "before".into())]);
        let (tx, mut rx) = mpsc::channel(LOG_FRAMES);
        let requests = LogRequests::new(Some(store.clone()), tx);
        let request = |request_id, follow| LogRequest {
            request_id,
            backend: backend.clone(),
            since: None,
            tail: Some(0),
            follow,
        };

        // Without follow, nothing to send means the read is simply complete.
        requests.start(request(1, false));
        assert!(matches!(
            frame(&mut rx).await,
            DroneToController::LogEnd {
                request_id: 1,
                reason: LogEndReason::Complete
            }
        ));

        // A follow begins with an empty batch once it watches; a line written after it arrives.
        requests.start(request(2, true));
        assert_eq!(batch(frame(&mut rx).await), Vec::<String>::new());
        store.append(&backend, &[(LogStream::Stderr, "after".into())]);
        assert_eq!(batch(frame(&mut rx).await), ["after"]);
    }
}
