//! [`ControllerTxtSource`]: TXT values asked from the controller over a WebSocket session on
//! `/ctrl/dns-socket` (Plane §3.6), reconnecting with backoff forever.
//!
//! Concurrent lookups for one cluster share one request (Plane sends one per query, a TODO there):
//! the first lookup queues a request, later ones join it, and the controller's answer resolves all
//! of them. A lookup that arrives while a request is in flight therefore gets the value read for that
//! request, at most one controller round trip old. Requests still unanswered when a connection drops
//! are sent again on the next connection; a lookup that gives up (the server's timeout) removes
//! itself, and the request is forgotten once nobody waits for it.

use crate::txt_source::{TxtError, TxtSource};
use hangar_client::node::{ConnectionEnd, NodeReceiver, NodeSender, Reconnecting};
use hangar_client::{ClientError, ControllerClient};
use hangar_types::protocol::{ControllerToDns, DnsHello, DnsToController};
use hangar_types::{ClusterName, DnsName};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The controller's WebSocket route for DNS responders.
pub const DNS_SOCKET_PATH: &str = "/ctrl/dns-socket";

/// How long shutdown waits to send the WebSocket close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Sender = NodeSender<DnsToController>;
type Receiver = NodeReceiver<ControllerToDns>;

/// A [`TxtSource`] backed by a session with the controller.
pub struct ControllerTxtSource {
    shared: Arc<Shared>,
}

struct Shared {
    /// One entry per cluster with at least one waiting lookup.
    pending: Mutex<HashMap<ClusterName, Pending>>,
    /// Wakes the session's sender when a request is queued.
    outbound: Notify,
    connected: AtomicBool,
    /// Fires on shutdown; lookups then fail with [`TxtError::Closed`].
    closed: CancellationToken,
}

struct Pending {
    waiters: Vec<oneshot::Sender<Option<String>>>,
    /// Generation of the connection the request went out on; 0 while not sent yet.
    sent_on: u64,
}

impl ControllerTxtSource {
    /// Starts the controller session as a task on `tasks`; it runs until `cancel` fires, after which
    /// lookups fail with [`TxtError::Closed`].
    pub fn start(
        client: ControllerClient,
        name: DnsName,
        cancel: CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            outbound: Notify::new(),
            connected: AtomicBool::new(false),
            closed: cancel,
        });
        tasks.spawn(run_session(shared.clone(), client, name));
        Arc::new(ControllerTxtSource { shared })
    }

    /// Whether a controller connection is up.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Lookups currently waiting for the controller (all clusters).
    pub fn waiting_lookups(&self) -> usize {
        self.shared
            .lock()
            .values()
            .map(|pending| pending.waiters.len())
            .sum()
    }
}

#[async_trait::async_trait]
impl TxtSource for ControllerTxtSource {
    async fn txt_record(&self, cluster: &ClusterName) -> Result<Option<String>, TxtError> {
        if self.shared.closed.is_cancelled() {
            return Err(TxtError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        let queued = match self.shared.lock().entry(cluster.clone()) {
            Entry::Occupied(mut entry) => {
                entry.get_mut().waiters.push(tx);
                false
            }
            Entry::Vacant(entry) => {
                entry.insert(Pending {
                    waiters: vec![tx],
                    sent_on: 0,
                });
                true
            }
        };
        if queued {
            // `notify_one` stores a permit, so a sender between two takes does not miss this.
            self.shared.outbound.notify_one();
        }
        let mut waiter = Waiter {
            shared: &self.shared,
            cluster,
            rx,
        };
        tokio::select! {
            value = &mut waiter.rx => value.map_err(|_| TxtError::Closed),
            _ = self.shared.closed.cancelled() => Err(TxtError::Closed),
        }
    }
}

/// One lookup's place in [`Shared::pending`]; leaving (answered, timed out or cancelled) removes it.
struct Waiter<'a> {
    shared: &'a Shared,
    cluster: &'a ClusterName,
    rx: oneshot::Receiver<Option<String>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Closing first makes our own sender count as abandoned below.
        self.rx.close();
        let mut pending = self.shared.lock();
        if let Some(entry) = pending.get_mut(self.cluster) {
            entry.waiters.retain(|waiter| !waiter.is_closed());
            if entry.waiters.is_empty() {
                pending.remove(self.cluster);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClusterName, Pending>> {
        // No code panics while holding the lock; if one did, the map is still consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Clusters whose request has not gone out on connection `generation` yet; marks them sent.
    fn take_unsent(&self, generation: u64) -> Vec<ClusterName> {
        let mut pending = self.lock();
        pending
            .iter_mut()
            .filter(|(_, entry)| entry.sent_on != generation)
            .map(|(cluster, entry)| {
                entry.sent_on = generation;
                cluster.clone()
            })
            .collect()
    }

    /// Hands the controller's answer to every lookup waiting for `cluster`.
    fn resolve(&self, cluster: &ClusterName, value: Option<String>) {
        let waiters = {
            let mut pending = self.lock();
            // An entry whose request is not out yet was created after the request this answers (whose
            // waiters all gave up); its own request will be answered soon.
            match pending.get(cluster) {
                Some(entry) if entry.sent_on != 0 => pending.remove(cluster),
                _ => None,
            }
        };
        for waiter in waiters.into_iter().flat_map(|entry| entry.waiters) {
            // The lookup may have just given up; nothing to do then.
            let _ = waiter.send(value.clone());
        }
    }
}

/// Runs the controller session until `shared.closed` fires.
async fn run_session(shared: Arc<Shared>, client: ControllerClient, name: DnsName) {
    let cancel = shared.closed.clone();
    let hello = DnsHello::new(name);
    let mut session = Reconnecting::new(&client, DNS_SOCKET_PATH, &hello, &cancel);
    while let Some((socket, generation)) = session.connect().await {
        shared.connected.store(true, Ordering::Relaxed);
        let (mut tx, mut rx) = socket.split();
        let end = tokio::select! {
            _ = cancel.cancelled() => ConnectionEnd::Cancelled,
            () = run_receiver(&shared, &mut rx) => ConnectionEnd::Closed,
            error = run_sender(&shared, &mut tx, generation) => ConnectionEnd::SendFailed(error),
        };
        shared.connected.store(false, Ordering::Relaxed);
        if let ConnectionEnd::Cancelled = end {
            // Best effort: a stuck peer must not hold up shutdown.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.close()).await;
        }
        if !session.ended(end).await {
            break;
        }
    }
}

/// Applies answers from the controller until the connection closes.
async fn run_receiver(shared: &Shared, rx: &mut Receiver) {
    while let Some(message) = rx.recv().await {
        match message {
            ControllerToDns::TxtRecordResponse { cluster, txt_value } => {
                shared.resolve(&cluster, txt_value);
            }
        }
    }
}

/// Sends requests as lookups queue them; returns the error that ended sending.
async fn run_sender(shared: &Shared, tx: &mut Sender, generation: u64) -> ClientError {
    loop {
        let clusters = shared.take_unsent(generation);
        if clusters.is_empty() {
            shared.outbound.notified().await;
            continue;
        }
        for cluster in clusters {
            if let Err(error) = tx
                .send(&DnsToController::TxtRecordRequest { cluster })
                .await
            {
                return error;
            }
        }
    }
}
