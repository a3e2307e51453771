//! The drone's connection to an external executor's unix socket: one task owns the socket, numbers
//! requests, matches answers by id, dispatches events, and reconnects with backoff.
//!
//! Better than Plane, where messages sent while disconnected are lost: a request made while the
//! socket is down waits in `pending`, and every request without an answer is sent again (same id,
//! oldest first) on each new connection, so an executor that restarts mid-session still receives
//! everything (at least once: an executor that died after acting but before answering sees the
//! request again). When no connection has been up for `give_up_after` (Plane: 30 s, then it stops
//! trying for good), the link becomes *unavailable*: waiting requests fail, every backend it knows is
//! marked lost (its supervisor ends it `terminated` with reason `lost`), the drone reports the error
//! to the controller (cluster state shows it), and new requests fail at once. The link keeps trying;
//! once the executor is back the error clears and the lost backends are hard-terminated there, so
//! nothing keeps running unsupervised.

use super::wire::{MessageToClient, MessageToServer, MetricsMessage, WrappedMessage};
use futures_util::StreamExt;
use hangar_client::backoff::Backoff;
use hangar_types::protocol::DroneToController;
use hangar_types::BackendId;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

/// Requests waiting to reach the link task. When full, callers wait (nothing is dropped).
const REQUEST_CAPACITY: usize = 256;
/// Longest line accepted from the executor; a longer one is skipped with a warning.
const MAX_LINE: usize = 1 << 20;
/// Reconnect delays (Plane: 10 ms growing to 1 s).
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Unavailable(String),
    #[error("the executor link was stopped (drone shutting down)")]
    Stopped,
    #[error("cannot encode a {0} request")]
    Encode(&'static str),
}

/// How a backend of the executor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A `TerminateEvent`, or "nothing to terminate" (`None`).
    Exited(Option<i32>),
    /// The executor vanished; the message says why.
    Lost(String),
}

type Reply = oneshot::Sender<Result<MessageToClient, LinkError>>;

struct Outgoing {
    message: MessageToServer,
    /// `None`: nobody waits for the answer (cleanup requests).
    reply: Option<Reply>,
}

/// Exit watches of the backends the executor runs.
#[derive(Default)]
struct Exits {
    map: Mutex<HashMap<BackendId, watch::Sender<Option<Ending>>>>,
}

impl Exits {
    fn lock(&self) -> MutexGuard<'_, HashMap<BackendId, watch::Sender<Option<Ending>>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records how `backend` ended; the first ending wins. `false` when the backend is unknown.
    fn end(&self, backend: &BackendId, ending: Ending) -> bool {
        match self.lock().get(backend) {
            Some(exit) => {
                exit.send_if_modified(|e| e.is_none() && e.replace(ending).is_none());
                true
            }
            None => false,
        }
    }

    /// Marks every backend still running lost; returns them.
    fn lose_all(&self, message: &str) -> Vec<BackendId> {
        let mut lost = Vec::new();
        for (backend, exit) in self.lock().iter() {
            if exit.send_if_modified(|e| {
                e.is_none() && e.replace(Ending::Lost(message.into())).is_none()
            }) {
                lost.push(backend.clone());
            }
        }
        lost
    }
}

/// What the link needs.
pub struct LinkSettings {
    pub path: PathBuf,
    pub give_up_after: Duration,
}

/// A handle on the link task. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    requests: mpsc::Sender<Outgoing>,
    unavailable: watch::Receiver<Option<String>>,
    exits: Arc<Exits>,
}

impl Link {
    /// Starts the link task (ends when `cancel` fires). Metrics events go to `metrics`; `error` is
    /// set while the executor is unavailable.
    pub fn start(
        settings: LinkSettings,
        metrics: mpsc::Sender<DroneToController>,
        error: watch::Sender<Option<String>>,
        tracker: &tokio_util::task::TaskTracker,
        cancel: CancellationToken,
    ) -> Link {
        let (requests, requests_rx) = mpsc::channel(REQUEST_CAPACITY);
        let exits = Arc::new(Exits::default());
        let link = Link {
            requests,
            unavailable: error.subscribe(),
            exits: exits.clone(),
        };
        let task = LinkTask {
            settings,
            requests: requests_rx,
            error,
            exits,
            metrics,
            pending: BTreeMap::new(),
            next_id: 1,
            lost: Vec::new(),
        };
        tracker.spawn(task.run(cancel));
        link
    }

    /// Sends `message` and waits for its answer (across reconnects). Fails at once while the executor
    /// is unavailable.
    pub async fn request(&self, message: MessageToServer) -> Result<MessageToClient, LinkError> {
        if let Some(error) = self.unavailable.borrow().clone() {
            return Err(LinkError::Unavailable(error));
        }
        let (reply, answer) = oneshot::channel();
        let outgoing = Outgoing {
            message,
            reply: Some(reply),
        };
        self.requests
            .send(outgoing)
            .await
            .map_err(|_| LinkError::Stopped)?;
        answer.await.map_err(|_| LinkError::Stopped)?
    }

    /// Queues `message` without waiting for its answer (delivered once the executor is reachable).
    pub fn send_later(&self, message: MessageToServer) {
        let name = message.name();
        let outgoing = Outgoing {
            message,
            reply: None,
        };
        if self.requests.try_send(outgoing).is_err() {
            tracing::warn!(
                request = name,
                "Executor request queue full; request dropped"
            );
        }
    }

    /// Starts watching how `backend` ends.
    pub fn watch_exit(&self, backend: &BackendId) -> watch::Receiver<Option<Ending>> {
        let (exit, ending) = watch::channel(None);
        self.exits.lock().insert(backend.clone(), exit);
        ending
    }

    /// Records that `backend` ended (e.g. the executor had nothing to terminate).
    pub fn end(&self, backend: &BackendId, ending: Ending) {
        self.exits.end(backend, ending);
    }

    /// Stops watching `backend`.
    pub fn forget(&self, backend: &BackendId) {
        self.exits.lock().remove(backend);
    }
}

struct Pending {
    line: String,
    name: &'static str,
    reply: Option<Reply>,
}

/// Why a connection ended.
enum Ended {
    Cancelled,
    Broken,
}

struct LinkTask {
    settings: LinkSettings,
    requests: mpsc::Receiver<Outgoing>,
    error: watch::Sender<Option<String>>,
    exits: Arc<Exits>,
    metrics: mpsc::Sender<DroneToController>,
    /// Requests without an answer, by id (so in sending order).
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Backends lost while the executor was unavailable: hard-terminated there once it is back.
    lost: Vec<BackendId>,
}

impl LinkTask {
    async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        let mut down_since = Instant::now();
        loop {
            let Some(stream) = self.reconnect(&cancel, &mut backoff, down_since).await else {
                break;
            };
            backoff.connected();
            tracing::info!(socket = %self.settings.path.display(), "Connected to the executor");
            if self.error.send_replace(None).is_some() {
                tracing::info!("The executor is available again");
            }
            for backend in std::mem::take(&mut self.lost) {
                self.accept(Outgoing {
                    message: MessageToServer::Terminate(backend, true),
                    reply: None,
                });
            }
            if let Ended::Cancelled = self.run_connected(stream, &cancel).await {
                break;
            }
            tracing::warn!(socket = %self.settings.path.display(), "Lost the executor connection; reconnecting");
            down_since = Instant::now();
        }
        // Waiting callers learn the link is gone from their dropped reply senders.
        self.pending.clear();
    }

    /// Connects with backoff while queueing requests; gives up (once) after `give_up_after`.
    /// `None` when cancelled.
    async fn reconnect(
        &mut self,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        down_since: Instant,
    ) -> Option<UnixStream> {
        let give_up_at = down_since + self.settings.give_up_after;
        loop {
            let error = match UnixStream::connect(&self.settings.path).await {
                Ok(stream) => return Some(stream),
                Err(e) => e,
            };
            tracing::debug!(socket = %self.settings.path.display(), error = %error, "Cannot connect to the executor");
            let retry = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(retry);
            loop {
                let available = self.error.borrow().is_none();
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = &mut retry => break,
                    _ = tokio::time::sleep_until(give_up_at), if available => self.give_up(&error),
                    Some(outgoing) = self.requests.recv() => {
                        self.accept(outgoing);
                    }
                }
            }
        }
    }

    fn give_up(&mut self, error: &std::io::Error) {
        let message = format!(
            "executor socket {} unreachable for {} s ({error}); its backends were lost and new ones \
             cannot start until it is back",
            self.settings.path.display(),
            self.settings.give_up_after.as_secs_f64(),
        );
        tracing::error!(%message, "Executor unavailable");
        for (_, pending) in std::mem::take(&mut self.pending) {
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(LinkError::Unavailable(message.clone())));
            }
        }
        self.lost.extend(self.exits.lose_all(&message));
        self.error.send_replace(Some(message));
    }

    /// Numbers and queues a request; returns the line to write, or `None` when it was answered
    /// already (refused while unavailable, or not encodable).
    fn accept(&mut self, outgoing: Outgoing) -> Option<String> {
        let Outgoing { message, reply } = outgoing;
        let name = message.name();
        if let Some(error) = self.error.borrow().clone() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(LinkError::Unavailable(error)));
            }
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let wrapped = WrappedMessage {
            id: Some(id.to_string()),
            message,
        };
        let line = match serde_json::to_string(&wrapped) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(request = name, error = %e, "Cannot encode executor request");
                if let Some(reply) = reply {
                    let _ = reply.send(Err(LinkError::Encode(name)));
                }
                return None;
            }
        };
        self.pending.insert(
            id,
            Pending {
                line: line.clone(),
                name,
                reply,
            },
        );
        Some(line)
    }

    async fn run_connected(&mut self, stream: UnixStream, cancel: &CancellationToken) -> Ended {
        let (read, mut write) = stream.into_split();
        let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        // Everything unanswered goes out again, oldest first (the executor may have restarted).
        let unanswered: Vec<String> = self.pending.values().map(|p| p.line.clone()).collect();
        for line in unanswered {
            if write_line(&mut write, &line).await.is_err() {
                return Ended::Broken;
            }
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ended::Cancelled,
                line = lines.next() => match line {
                    Some(Ok(line)) => self.on_line(&line),
                    Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                        tracing::warn!(max = MAX_LINE, "Skipping an overlong line from the executor");
                    }
                    Some(Err(LinesCodecError::Io(e))) => {
                        tracing::warn!(error = %e, "Executor socket read failed");
                        return Ended::Broken;
                    }
                    None => return Ended::Broken,
                },
                Some(outgoing) = self.requests.recv() => {
                    if let Some(line) = self.accept(outgoing) {
                        // On failure the request stays pending and is sent on the next connection.
                        if write_line(&mut write, &line).await.is_err() {
                            return Ended::Broken;
                        }
                    }
                }
            }
        }
    }

    /// Handles one line from the executor. Bad lines are logged and skipped: one broken message
    /// must not cost the other backends their connection.
    fn on_line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        let wrapped: WrappedMessage<MessageToClient> = match serde_json::from_str(line) {
            Ok(wrapped) => wrapped,
            Err(e) => {
                let shown: String = line.chars().take(200).collect();
                tracing::warn!(error = %e, line = %shown, "Skipping an unparseable line from the executor");
                return;
            }
        };
        match (wrapped.id, wrapped.message) {
            (None, MessageToClient::TerminateEvent(event)) => {
                if !self
                    .exits
                    .end(&event.backend_id, Ending::Exited(event.exit_code))
                {
                    tracing::debug!(backend = %event.backend_id, "Exit event for a backend not supervised here");
                }
            }
            (None, MessageToClient::MetricsMessage(metrics)) => self.on_metrics(metrics),
            (None, message) => {
                tracing::warn!(
                    ?message,
                    "Skipping an answer without an id from the executor"
                )
            }
            (Some(id), message) => {
                let pending = id.parse::<u64>().ok().and_then(|n| self.pending.remove(&n));
                match pending {
                    Some(Pending {
                        reply: Some(reply), ..
                    }) => {
                        let _ = reply.send(Ok(message));
                    }
                    Some(Pending { name, .. }) => {
                        tracing::debug!(
                            request = name,
                            ?message,
                            "Executor answered a cleanup request"
                        )
                    }
                    None => tracing::warn!(%id, "Skipping an answer to an unknown request id"),
                }
            }
        }
    }

    fn on_metrics(&self, m: MetricsMessage) {
        let sample = DroneToController::BackendMetrics {
            backend_id: m.backend_id,
            mem_used: m.mem_used,
            mem_limit: m.mem_limit,
            cpu_used_ns: m.cpu_used,
            sys_cpu_ns: m.sys_cpu,
        };
        // Best effort, like Docker's samples: dropped when the controller queue is full.
        let _ = self.metrics.try_send(sample);
    }
}

async fn write_line(write: &mut OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    write.write_all(&bytes).await
}
