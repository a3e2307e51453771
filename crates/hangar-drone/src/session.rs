//! The drone's session with the controller (plane-api.md §3.3–3.4, in Hangar's protocol): connect
//! with `Hello`, then on every connection send a heartbeat at once and every `HEARTBEAT_INTERVAL`,
//! replay every unacked outbox event in id order before new ones, forward key renewals and action
//! acks, and hand actions to [`run_actions`] without blocking the reader. Reconnects forever with
//! capped exponential backoff. An event sent on a connection and still unacked a whole
//! `EVENT_RESEND_INTERVAL` later (the controller could not record it and keeps the connection) is
//! sent again, with every event after it: a controller records states idempotently (an old state is
//! stale, and acked), so a resend never does harm, and an unrecorded event never waits for the next
//! connection.
//!
//! Invariant: an event is sent only once it is committed to the outbox (as the outbox kept its
//! latest commit, or read back from the file), so a connection that drops loses nothing: the next
//! one starts its replay from the first unacked event, read from the file.

use crate::log_requests::{LogRequest, LogRequests, LOG_FRAMES};
use crate::log_store::LogStore;
use crate::outbox::{Outbox, SpawnRecord, StoredEvent};
use crate::prometheus::DroneMetrics;
use crate::supervisor::{ClaimHookRequest, Supervisors};
use futures_util::FutureExt;
use hangar_client::node::{ConnectionEnd, NodeReceiver, NodeSender, NodeSocket, Reconnecting};
use hangar_client::ControllerClient;
use hangar_types::protocol::{
    ActionMessage, BackendAction, ControllerToDrone, DroneToController, Hello,
};
use hangar_types::timing::{EVENT_RESEND_INTERVAL, HEARTBEAT_INTERVAL};
use hangar_types::Millis;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Most acks deleted by one statement (well under SQLite's limit of bound parameters); the rest wait
/// for the next.
const MAX_ACKS_PER_DELETE: usize = 256;

/// Events read from the outbox per query while replaying.
const EVENT_PAGE: i64 = 256;
/// Terminated backends are forgotten this long after their last event was acked.
const PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// What one controller session needs.
pub struct Session {
    pub client: ControllerClient,
    /// `/ctrl/c/<cluster>/drone-socket`.
    pub path: String,
    pub hello: Hello,
    pub outbox: Outbox,
    pub supervisors: Supervisors,
    /// Actions for [`run_actions`]. Bounded; when full an action is dropped and the controller resends
    /// it (unacked actions are resent every `ACTION_RESEND_INTERVAL`).
    pub actions: mpsc::Sender<ActionMessage>,
    /// Acks and renewals to send (shared by every connection).
    pub outbound: mpsc::Receiver<DroneToController>,
    /// Metrics samples to send, after everything else. Bounded; see `METRICS_CAPACITY`.
    pub metrics: mpsc::Receiver<DroneToController>,
    /// Whether a connection is up.
    pub connected: watch::Sender<bool>,
    /// Bumped to drop the current connection (tests simulate a cut connection with it).
    pub reconnect: watch::Receiver<u64>,
    /// Connection and reconnect series.
    pub prometheus: Arc<DroneMetrics>,
    /// Why the executor cannot run backends, while it cannot (reported as `ExecutorStatus`).
    pub executor_error: watch::Receiver<Option<String>>,
    /// Backend output, for the controller's log requests.
    pub logs: Option<LogStore>,
}

impl Session {
    pub async fn run_session(mut self, cancel: CancellationToken) {
        // Copies: each connection borrows the whole session mutably.
        let (client, path, hello) = (self.client.clone(), self.path.clone(), self.hello.clone());
        let mut session = Reconnecting::new(&client, &path, &hello, &cancel);
        while let Some((socket, generation)) = session.connect().await {
            self.prometheus.record_connected(generation == 1);
            self.connected.send_replace(true);
            let end = self.run_connection(socket, &cancel).await;
            self.connected.send_replace(false);
            if !session.ended(end).await {
                break;
            }
        }
    }

    async fn run_connection(
        &mut self,
        socket: NodeSocket<DroneToController, ControllerToDrone>,
        cancel: &CancellationToken,
    ) -> ConnectionEnd {
        let before = Millis(
            Millis::now()
                .0
                .saturating_sub(PRUNE_AFTER.as_millis() as i64),
        );
        if let Err(e) = self.outbox.prune(before).await {
            tracing::warn!(error = %e, "Failed to prune the drone state");
        }
        let (sender, receiver) = socket.split();
        self.reconnect.borrow_and_update();
        let Session {
            outbox,
            supervisors,
            actions,
            outbound,
            metrics,
            reconnect,
            executor_error,
            logs,
            ..
        } = self;
        // Samples queued while disconnected are stale.
        while metrics.try_recv().is_ok() {}
        let mut writer = Writer {
            sender,
            outbox,
            sent_up_to: 0,
            oldest_unacked: None,
        };
        let (log_frames, mut log_frames_rx) = mpsc::channel(LOG_FRAMES);
        let log_requests = LogRequests::new(logs.clone(), log_frames);
        let reader = run_reader(receiver, outbox, supervisors, actions, log_requests);
        tokio::select! {
            _ = cancel.cancelled() => {
                writer.sender.close().await;
                ConnectionEnd::Cancelled
            }
            () = reconnect_requested(reconnect) => ConnectionEnd::Closed,
            () = reader => ConnectionEnd::Closed,
            () = writer.run(outbound, metrics, executor_error, &mut log_frames_rx) => ConnectionEnd::Closed,
        }
    }
}

/// Resolves when a reconnect is requested; never when nobody can request one any more.
async fn reconnect_requested(reconnect: &mut watch::Receiver<u64>) {
    if reconnect.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Writer<'a> {
    sender: NodeSender<DroneToController>,
    outbox: &'a Outbox,
    /// Highest event id sent on this connection.
    sent_up_to: i64,
    /// The oldest unacked event already sent on this connection, as the last resend check found it.
    oldest_unacked: Option<i64>,
}

impl Writer<'_> {
    /// Sends heartbeats, outbox events, queued messages and metrics (in that priority) until sending
    /// fails.
    async fn run(
        &mut self,
        outbound: &mut mpsc::Receiver<DroneToController>,
        metrics: &mut mpsc::Receiver<DroneToController>,
        executor_error: &mut watch::Receiver<Option<String>>,
        log_frames: &mut mpsc::Receiver<DroneToController>,
    ) {
        // The first heartbeat goes out before anything else on the connection.
        let beat = DroneToController::Heartbeat {
            local_time: Millis::now(),
        };
        if self.sender.send(&beat).await.is_err() {
            return;
        }
        // A new controller session knows no error: tell it of a current one.
        let current = executor_error.borrow_and_update().clone();
        if let Some(error) = current {
            let status = DroneToController::ExecutorStatus { error: Some(error) };
            if self.sender.send(&status).await.is_err() {
                return;
            }
        }
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + HEARTBEAT_INTERVAL,
            HEARTBEAT_INTERVAL,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resend = tokio::time::interval_at(
            tokio::time::Instant::now() + EVENT_RESEND_INTERVAL,
            EVENT_RESEND_INTERVAL,
        );
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut latest = self.outbox.subscribe();
        // Marked changed so the first pass replays everything unacked.
        latest.mark_changed();
        loop {
            let sent = tokio::select! {
                biased;
                _ = heartbeat.tick() => {
                    let beat = DroneToController::Heartbeat { local_time: Millis::now() };
                    self.sender.send(&beat).await.is_ok()
                }
                _ = resend.tick() => {
                    let newest = *latest.borrow();
                    self.resend_unacked(newest).await
                }
                changed = latest.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let newest = *latest.borrow_and_update();
                    self.send_events(newest).await
                }
                message = outbound.recv() => match message {
                    Some(message) => self.sender.send(&message).await.is_ok(),
                    None => return,
                },
                Ok(()) = executor_error.changed() => {
                    let error = executor_error.borrow_and_update().clone();
                    let status = DroneToController::ExecutorStatus { error };
                    self.sender.send(&status).await.is_ok()
                }
                Some(frame) = log_frames.recv() => self.sender.send(&frame).await.is_ok(),
                Some(sample) = metrics.recv() => self.sender.send(&sample).await.is_ok(),
            };
            if !sent {
                return;
            }
        }
    }

    /// Sends every outbox event not yet sent on this connection, up to `newest` at least (what
    /// `latest` said). The events of the latest commit go out as the outbox kept them when they
    /// follow what was sent; anything else is read from the file. `false` when the connection broke.
    async fn send_events(&mut self, newest: i64) -> bool {
        if let Some(events) = self.outbox.committed_after(self.sent_up_to) {
            if !self.send(events).await {
                return false;
            }
            if self.sent_up_to >= newest {
                return true;
            }
        }
        loop {
            let events = match self.outbox.events_after(self.sent_up_to, EVENT_PAGE).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(error = %e, "Failed to read the outbox");
                    return false;
                }
            };
            // A short page is the end: an event committed after the read bumps `latest` again.
            let more = events.len() as i64 == EVENT_PAGE;
            if !self.send(events).await {
                return false;
            }
            if !more {
                return true;
            }
        }
    }

    /// Sends again the oldest unacked event and every one after it, if that event was sent on this
    /// connection and was already the oldest unacked at the previous check (so it went unacked for a
    /// whole interval at least). `false` when the connection broke.
    async fn resend_unacked(&mut self, newest: i64) -> bool {
        let oldest = match self.outbox.oldest_event().await {
            Ok(oldest) => oldest.filter(|&id| id <= self.sent_up_to),
            Err(e) => {
                tracing::warn!(error = %e, "Failed to read the outbox");
                return true;
            }
        };
        let stuck = oldest.filter(|_| oldest == self.oldest_unacked);
        // After a resend the next check only takes note again: a resent event gets a whole interval.
        self.oldest_unacked = if stuck.is_some() { None } else { oldest };
        let Some(oldest) = stuck else {
            return true;
        };
        tracing::warn!(
            event_id = oldest,
            "Backend events unacked for {EVENT_RESEND_INTERVAL:?}; sending them again"
        );
        self.sent_up_to = oldest - 1;
        self.send_events(newest).await
    }

    /// Sends `events` in order. `false` when the connection broke.
    async fn send(&mut self, events: Vec<StoredEvent>) -> bool {
        for event in events {
            if self.sender.send(&event.to_message()).await.is_err() {
                return false;
            }
            self.sent_up_to = event.event_id;
        }
        true
    }
}

async fn run_reader(
    mut receiver: NodeReceiver<ControllerToDrone>,
    outbox: &Outbox,
    supervisors: &Supervisors,
    actions: &mpsc::Sender<ActionMessage>,
    log_requests: LogRequests,
) {
    // A message read after a run of acks, handled next.
    let mut next = None;
    loop {
        let message = match next.take() {
            Some(message) => message,
            None => match receiver.recv().await {
                Some(message) => message,
                None => return,
            },
        };
        match message {
            ControllerToDrone::Action(action) => {
                if actions.try_send(action).is_err() {
                    tracing::warn!("Too many actions queued; the controller will resend this one");
                }
            }
            ControllerToDrone::AckEvent { event_id } => {
                // The acks already received go with it: one write instead of one each (the
                // controller acks every event of a batch it recorded).
                let mut acked = vec![event_id];
                while acked.len() < MAX_ACKS_PER_DELETE {
                    let Some(Some(message)) = receiver.recv().now_or_never() else {
                        break;
                    };
                    match message {
                        ControllerToDrone::AckEvent { event_id } => acked.push(event_id),
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                if let Err(e) = outbox.ack(&acked).await {
                    tracing::warn!(events = ?acked, error = %e, "Failed to delete acked events");
                }
            }
            ControllerToDrone::RenewKeyResponse { backend, deadlines } => {
                supervisors.key_renewed(&backend, deadlines);
            }
            ControllerToDrone::LogRequest {
                request_id,
                backend,
                since,
                tail,
                follow,
            } => log_requests.start(LogRequest {
                request_id,
                backend,
                since,
                tail,
                follow,
            }),
            ControllerToDrone::LogCredit { request_id } => log_requests.credit(request_id),
            ControllerToDrone::LogCancel { request_id } => log_requests.cancel(request_id),
            ControllerToDrone::ClaimHook {
                request_id,
                backend,
                path,
                body,
            } => supervisors.claim_hook(ClaimHookRequest {
                request_id,
                backend,
                path,
                body,
            }),
        }
    }
}

/// Applies actions one at a time, in arrival order (so a terminate never overtakes its spawn), and
/// queues `AckAction` once an action is applied. An action that fails to apply is not acked; the
/// controller resends it.
pub async fn run_actions(
    supervisors: Supervisors,
    mut actions: mpsc::Receiver<ActionMessage>,
    outbound: mpsc::Sender<DroneToController>,
    cancel: CancellationToken,
) {
    loop {
        let action = tokio::select! {
            _ = cancel.cancelled() => return,
            action = actions.recv() => match action {
                Some(action) => action,
                None => return,
            },
        };
        let ActionMessage {
            action_id,
            backend_id,
            action,
        } = action;
        let applied = match action {
            BackendAction::Spawn {
                executable,
                key,
                static_token,
            } => {
                let spawn = SpawnRecord {
                    action_id: action_id.clone(),
                    executable,
                    key,
                    static_token,
                };
                supervisors.spawn(&backend_id, spawn).await
            }
            BackendAction::Terminate { kind, reason } => {
                supervisors
                    .terminate(&action_id, &backend_id, kind, reason)
                    .await
            }
        };
        match applied {
            Ok(()) => {
                if outbound
                    .try_send(DroneToController::AckAction { action_id })
                    .is_err()
                {
                    tracing::debug!(backend = %backend_id, "Action ack not queued; the controller will resend");
                }
            }
            Err(e) => {
                tracing::error!(backend = %backend_id, action = %action_id, error = %e, "Failed to apply action")
            }
        }
    }
}
