//! Log reads relayed to drones over their sessions with this controller (issue 15): a handler opens a
//! [`LogRead`] on the drone that ran a backend, the drone answers with `LogLines` batches and one
//! `LogEnd`, and the drone's session hands them to the read ([`DroneLink::deliver`]).
//!
//! Owns: which drones have a session here ([`DroneLinks`]) and the open reads of each. Flow control:
//! the drone sends at most [`LOG_WINDOW`] batches ahead; a `LogCredit` goes back each time the reader
//! takes one, so a slow HTTP client slows only its own read, and a session reader never waits on one.
//! Invariant: lines pass through memory only (never the store).

use crate::node_socket::NodeSender;
use hangar_store::SessionId;
use hangar_types::logs::{LogEndReason, LogLine, LogSince};
use hangar_types::protocol::{ControllerToDrone, LOG_WINDOW};
use hangar_types::{BackendId, ClusterName, DroneName};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

/// What a log read asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogQuery {
    pub since: Option<LogSince>,
    pub tail: Option<u32>,
    pub follow: bool,
}

/// One message of a read.
#[derive(Debug)]
pub enum LogChunk {
    Lines(Vec<LogLine>),
    End(LogEndReason),
}

type Reads = Arc<Mutex<HashMap<u64, mpsc::Sender<LogChunk>>>>;

/// The drones with a session on this controller. Cheap to clone.
#[derive(Clone, Default)]
pub struct DroneLinks {
    links: Arc<Mutex<HashMap<(ClusterName, DroneName), Link>>>,
    next_request: Arc<AtomicU64>,
}

struct Link {
    session: SessionId,
    sender: NodeSender<ControllerToDrone>,
    reads: Reads,
}

impl DroneLinks {
    /// A drone session starts: reads for this drone go to it until the returned link is dropped.
    pub fn attach(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
        session: SessionId,
        sender: NodeSender<ControllerToDrone>,
    ) -> DroneLink {
        let reads = Reads::default();
        let link = Link {
            session,
            sender,
            reads: reads.clone(),
        };
        lock(&self.links).insert((cluster.clone(), drone.clone()), link);
        DroneLink {
            links: self.clone(),
            key: (cluster.clone(), drone.clone()),
            session,
            reads,
        }
    }

    /// The sender of `drone`'s session here, if it has one (claim hooks go through it too).
    pub fn sender(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
    ) -> Option<NodeSender<ControllerToDrone>> {
        let links = lock(&self.links);
        let link = links.get(&(cluster.clone(), drone.clone()))?;
        Some(link.sender.clone())
    }

    /// Asks `drone` for `backend`'s lines. `None` when the drone has no session here (or its socket
    /// is too busy to take the request).
    pub fn open(
        &self,
        cluster: &ClusterName,
        drone: &DroneName,
        backend: &BackendId,
        query: LogQuery,
    ) -> Option<LogRead> {
        let (sender, reads) = {
            let links = lock(&self.links);
            let link = links.get(&(cluster.clone(), drone.clone()))?;
            (link.sender.clone(), link.reads.clone())
        };
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        // One more than the window: the `LogEnd` after a full window.
        let (tx, rx) = mpsc::channel(LOG_WINDOW as usize + 1);
        lock(&reads).insert(request_id, tx);
        let request = ControllerToDrone::LogRequest {
            request_id,
            backend: backend.clone(),
            since: query.since,
            tail: query.tail,
            follow: query.follow,
        };
        if sender.try_send(&request).is_err() {
            lock(&reads).remove(&request_id);
            return None;
        }
        Some(LogRead {
            request_id,
            rx,
            sender,
            reads,
            ended: false,
        })
    }
}

/// A drone's session as the relay sees it; dropping it (the session ended) ends its reads.
pub struct DroneLink {
    links: DroneLinks,
    key: (ClusterName, DroneName),
    session: SessionId,
    reads: Reads,
}

impl DroneLink {
    /// Hands a `LogLines`/`LogEnd` of the drone to its read. A read that is gone is ignored; one whose
    /// drone ignored the window is ended.
    pub fn deliver(&self, request_id: u64, chunk: LogChunk) {
        let mut reads = lock(&self.reads);
        let ends = matches!(chunk, LogChunk::End(_));
        let delivered = match reads.get(&request_id) {
            Some(read) => read.try_send(chunk).is_ok(),
            None => return,
        };
        if ends || !delivered {
            if !delivered {
                tracing::warn!(
                    request_id,
                    "Drone sent log lines beyond its window; read ended"
                );
            }
            reads.remove(&request_id);
        }
    }
}

impl Drop for DroneLink {
    fn drop(&mut self) {
        let mut links = lock(&self.links.links);
        if links
            .get(&self.key)
            .is_some_and(|l| l.session == self.session)
        {
            links.remove(&self.key);
        }
        drop(links);
        // Dropping the senders ends every open read of this session.
        lock(&self.reads).clear();
    }
}

/// An open read: [`LogRead::next`] until `None`.
pub struct LogRead {
    request_id: u64,
    rx: mpsc::Receiver<LogChunk>,
    sender: NodeSender<ControllerToDrone>,
    reads: Reads,
    ended: bool,
}

impl LogRead {
    /// The next batch or the end; `None` when the drone's session ended first.
    pub async fn next(&mut self) -> Option<LogChunk> {
        let chunk = self.rx.recv().await;
        match &chunk {
            Some(LogChunk::Lines(_)) => {
                let credit = ControllerToDrone::LogCredit {
                    request_id: self.request_id,
                };
                if self.sender.try_send(&credit).is_err() {
                    tracing::debug!(
                        request_id = self.request_id,
                        "Log credit not sent (socket busy or gone)"
                    );
                }
            }
            Some(LogChunk::End(_)) | None => self.ended = true,
        }
        chunk
    }
}

impl Drop for LogRead {
    /// The reader went away: the drone stops (no work is spawned here).
    fn drop(&mut self) {
        lock(&self.reads).remove(&self.request_id);
        if !self.ended {
            let cancel = ControllerToDrone::LogCancel {
                request_id: self.request_id,
            };
            let _ = self.sender.try_send(&cancel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
