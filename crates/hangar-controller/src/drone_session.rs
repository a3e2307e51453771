//! One drone's WebSocket session (`/ctrl/c/{cluster}/drone-socket`, plane-api.md §3.4.3).
//!
//! After the handshake and registration, four loops run until one of them ends the session: the socket
//! writer, the reader (heartbeats, backend events, action acks, key renewals), action delivery (live
//! actions for this drone, plus a resend of every unacked action each `ACTION_RESEND_INTERVAL`) and the
//! sweeper. On the way out the node is detached, only if this session is still its current one.
//!
//! Invariants: an action is delivered until the drone acks it (resends survive reconnects because
//! pending actions live in the store); a backend event is acked only once the store has it (stale and
//! unknown ones included, so the drone's outbox drains); a bad frame is logged and skipped, never ends
//! the session.

use crate::api::AppState;
use crate::executor_errors::ExecutorErrors;
use crate::log_relay::{DroneLink, LogChunk};
use crate::metrics::{BackendSample, LatestMetrics};
use crate::node_socket::{self, NodeSender, SessionClosed, Welcomed};
use crate::prometheus::{ControllerMetrics, NodeKind};
use crate::sweeper;
use axum::extract::ws::WebSocket;
use hangar_store::{DroneRegistration, NodeId, SessionId, StateUpdate, Store, StoreEvent};
use hangar_types::protocol::{
    ActionMessage, ControllerToDrone, DroneToController, KeyDeadlines, NodeHello,
};
use hangar_types::timing::{KeyTiming, ACTION_RESEND_INTERVAL, UNHEALTHY_AFTER};
use hangar_types::{ActionId, BackendId, BackendState, BackendStatus, ClusterName, DroneName};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most unacked actions read (and resent) per pass. More wait for the next pass once earlier ones are
/// acked; a drone acks actions as soon as it has persisted them, so this bounds bursts, not throughput.
const RESEND_PAGE: u32 = 500;

/// An action sent less than this long ago is not sent again by a resend pass (dedupes the overlap
/// between the live event and the pending list, without delaying a resend by a whole extra interval).
const RESEND_MIN_AGE: std::time::Duration =
    ACTION_RESEND_INTERVAL.saturating_sub(std::time::Duration::from_secs(1));

/// Runs a drone session on an upgraded socket until the drone leaves or the controller shuts down.
pub async fn run_drone_session(state: AppState, cluster: ClusterName, mut socket: WebSocket) {
    let hello = match node_socket::read_hello(&mut socket).await {
        Ok(hello) => hello,
        Err(reason) => return node_socket::refuse(socket, reason).await,
    };
    let NodeHello::Drone {
        name,
        pool,
        executors,
    } = hello.node
    else {
        let reason = "a proxy must connect to the proxy socket, not the drone socket".to_string();
        return node_socket::refuse(socket, reason).await;
    };
    // Read before registering, only to report a takeover of a live session (reconnects must work, so a
    // takeover is allowed; a second drone process using the same name is an operator's mistake).
    let previous = match state.store.drone_attachment(&cluster, &name).await {
        Ok(previous) => previous,
        Err(e) => {
            tracing::debug!(drone = %name, error = %e, "Could not read the drone's previous session");
            None
        }
    };
    let registration = DroneRegistration {
        cluster: cluster.clone(),
        name: name.clone(),
        pool,
        executors,
        controller: state.config.name.clone(),
        version: hello.version,
    };
    let registered = state.store.register_drone(&registration).await;
    let (node, session) = match node_socket::registered(registered, "drone", &name) {
        Ok(registered) => registered,
        Err(reason) => return node_socket::refuse(socket, reason).await,
    };
    tracing::info!(drone = %name, %cluster, node, session, "Drone connected");
    if let Some(previous) = previous.filter(|p| {
        p.controller.is_some() && p.heartbeat_age.is_some_and(|age| age < UNHEALTHY_AFTER)
    }) {
        let age = previous.heartbeat_age.map(|a| a.as_millis());
        tracing::warn!(
            drone = %name,
            %cluster,
            node,
            new_session = session,
            previous_session = previous.session,
            previous_controller = ?previous.controller.as_ref().map(|c| c.as_str()),
            previous_heartbeat_age_ms = ?age,
            "Drone connected while another session of it was live and heartbeating; the new session \
             takes over (a reconnect, or two drones sharing a name)"
        );
    }

    // Subscribe before the first pending-actions read, so no action queued in between is missed.
    let events = state.store.events().subscribe();
    let _counted = state.prometheus.node_session(NodeKind::Drone);
    if let Some(Welcomed {
        sender,
        cancel,
        socket,
    }) = node_socket::welcome(socket, &state.config.name, &state.cancel).await
    {
        let link = state
            .drone_links
            .attach(&cluster, &name, session, sender.clone());
        let drone = DroneSession {
            prometheus: state.prometheus.clone(),
            store: state.store.clone(),
            key_timing: state.config.key_timing,
            metrics: state.metrics.clone(),
            executor_errors: state.executor_errors.clone(),
            cluster: cluster.clone(),
            session,
            node,
            name: name.clone(),
            sender,
            link,
            claim_hooks: state.warm.hooks.clone(),
            cancel: cancel.clone(),
        };
        let work = async {
            tokio::join!(
                drone.run_action_delivery(events),
                sweeper::run_sweeper(state.store.clone(), node, name.clone(), cancel.clone()),
            );
        };
        socket
            .run(&cancel, &name, |batch| drone.handle_batch(batch), work)
            .await;
    }
    state
        .executor_errors
        .session_ended(&cluster, &name, session);
    node_socket::disconnected(state.store.as_ref(), "drone", &name, node, session).await;
}

/// Action acks and backend events of a drone, stored together.
#[derive(Default)]
struct Reports {
    acks: Vec<ActionId>,
    /// `(event_id, backend, state)`, in the order received.
    events: Vec<(i64, BackendId, BackendState)>,
}

struct DroneSession {
    store: Arc<dyn Store>,
    /// Durations of the key deadlines sent with renewals.
    key_timing: KeyTiming,
    metrics: LatestMetrics,
    prometheus: Arc<ControllerMetrics>,
    executor_errors: ExecutorErrors,
    cluster: ClusterName,
    session: SessionId,
    node: NodeId,
    name: DroneName,
    sender: NodeSender<ControllerToDrone>,
    /// Log reads relayed to this drone.
    link: DroneLink,
    /// Claim hooks waiting for their answer.
    claim_hooks: crate::warm_pool::ClaimHooks,
    /// The session's token: every loop stops when it fires, and any loop that ends fires it.
    cancel: CancellationToken,
}

impl DroneSession {
    /// Handles a batch of messages in order; a run of backend events and action acks in it is stored
    /// in one transaction (a drone reporting many backends at once waits for one commit, not one per
    /// event).
    async fn handle_batch(&self, batch: Vec<DroneToController>) -> Result<(), SessionClosed> {
        let mut reports = Reports::default();
        for message in batch {
            match message {
                DroneToController::BackendEvent {
                    event_id,
                    backend_id,
                    state,
                    ..
                } => reports.events.push((event_id, backend_id, state)),
                DroneToController::AckAction { action_id } => reports.acks.push(action_id),
                other => {
                    self.record_reports(std::mem::take(&mut reports)).await?;
                    self.handle(other).await?;
                }
            }
        }
        self.record_reports(reports).await
    }

    /// Stores acks and backend events together; if that fails, one by one, so that one report the
    /// store refuses does not hold back the others.
    async fn record_reports(&self, reports: Reports) -> Result<(), SessionClosed> {
        let Reports { acks, events } = reports;
        if acks.len() + events.len() > 1 {
            let states: Vec<(BackendId, BackendState)> = events
                .iter()
                .map(|(_, backend, state)| (backend.clone(), state.clone()))
                .collect();
            match self
                .store
                .record_drone_reports(self.node, &acks, &states)
                .await
            {
                Ok(updates) => {
                    for ((event_id, backend, state), update) in events.into_iter().zip(updates) {
                        self.event_recorded(event_id, &backend, &state, update)
                            .await?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(drone = %self.name, acks = acks.len(), events = states.len(), error = %e, "Failed to store a drone's reports together, storing them one by one");
                }
            }
        }
        for action_id in acks {
            self.ack_action(&action_id).await;
        }
        for (event_id, backend, state) in events {
            match self.store.record_backend_state(&backend, &state).await {
                Ok(update) => {
                    self.event_recorded(event_id, &backend, &state, update)
                        .await?
                }
                // Not acked: the drone keeps the event in its outbox and replays it later.
                Err(e) => {
                    tracing::error!(drone = %self.name, %backend, error = %e, "Failed to record backend state");
                }
            }
        }
        Ok(())
    }

    /// Marks an action acked; on failure the action is resent and the drone acks it again.
    async fn ack_action(&self, action_id: &ActionId) {
        if let Err(e) = self.store.ack_action(self.node, action_id).await {
            tracing::warn!(drone = %self.name, action = %action_id, error = %e, "Failed to ack action");
        }
    }

    /// Counts a stored state and acks the event (stale and unknown ones too, so the outbox drains).
    async fn event_recorded(
        &self,
        event_id: i64,
        backend: &BackendId,
        state: &BackendState,
        update: StateUpdate,
    ) -> Result<(), SessionClosed> {
        if matches!(update, StateUpdate::Applied { .. }) {
            self.prometheus.record_state_change(state.status());
        }
        if state.status() == BackendStatus::Terminated {
            self.metrics.remove(backend);
        }
        tracing::debug!(drone = %self.name, %backend, status = %state.status(), ?update, "Backend event");
        self.sender
            .send(&ControllerToDrone::AckEvent { event_id })
            .await
    }

    async fn handle(&self, message: DroneToController) -> Result<(), SessionClosed> {
        match message {
            DroneToController::Heartbeat { local_time } => {
                if let Err(e) = self.store.drone_heartbeat(self.node, local_time).await {
                    tracing::warn!(drone = %self.name, error = %e, "Failed to record heartbeat");
                }
            }
            DroneToController::BackendEvent {
                event_id,
                backend_id,
                state,
                ..
            } => {
                let reports = Reports {
                    acks: Vec::new(),
                    events: vec![(event_id, backend_id, state)],
                };
                self.record_reports(reports).await?
            }
            DroneToController::BackendMetrics {
                backend_id,
                mem_used,
                mem_limit,
                cpu_used_ns,
                sys_cpu_ns,
            } => {
                tracing::debug!(drone = %self.name, backend = %backend_id, mem_used, mem_limit, cpu_used_ns, sys_cpu_ns, "Backend metrics");
                let sample = BackendSample {
                    mem_used,
                    mem_limit,
                    cpu_used_ns,
                    sys_cpu_ns,
                    received: Instant::now(),
                };
                self.metrics.record(backend_id, sample);
            }
            DroneToController::ExecutorStatus { error } => {
                match &error {
                    Some(error) => {
                        tracing::warn!(drone = %self.name, %error, "Drone reports an executor error")
                    }
                    None => tracing::info!(drone = %self.name, "Drone's executor works again"),
                }
                let errors = &self.executor_errors;
                errors.report(&self.cluster, &self.name, self.session, error);
            }
            DroneToController::LogLines { request_id, lines } => {
                self.link.deliver(request_id, LogChunk::Lines(lines));
            }
            DroneToController::LogEnd { request_id, reason } => {
                self.link.deliver(request_id, LogChunk::End(reason));
            }
            DroneToController::ClaimHookResult {
                request_id,
                outcome,
            } => self.claim_hooks.deliver(request_id, outcome),
            DroneToController::AckAction { action_id } => self.ack_action(&action_id).await,
            DroneToController::RenewKey {
                backend,
                local_time,
            } => match self.store.renew_key(&backend).await {
                Ok(renewed) => {
                    if !renewed {
                        tracing::info!(drone = %self.name, %backend, "Key renewal refused");
                    }
                    let deadlines =
                        renewed.then(|| KeyDeadlines::from_base_with(local_time, &self.key_timing));
                    self.sender
                        .send(&ControllerToDrone::RenewKeyResponse { backend, deadlines })
                        .await?;
                }
                // No answer: "refused" would make the drone kill a healthy backend over a transient
                // store error; the drone asks again.
                Err(e) => {
                    tracing::error!(drone = %self.name, %backend, error = %e, "Failed to renew key");
                }
            },
        }
        Ok(())
    }

    /// Forwards live actions for this drone and periodically resends every unacked one.
    async fn run_action_delivery(&self, mut events: broadcast::Receiver<StoreEvent>) {
        let mut last_sent: HashMap<ActionId, Instant> = HashMap::new();
        // The first tick is immediate: that pass sends everything left unacked by earlier sessions.
        let mut resend = tokio::time::interval(ACTION_RESEND_INTERVAL);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sent = tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = resend.tick() => self.send_pending(&mut last_sent).await,
                event = events.recv() => match event {
                    Ok(StoreEvent::Action { drone, action }) if drone == self.node => {
                        last_sent.insert(action.action_id.clone(), Instant::now());
                        self.send_action(action).await
                    }
                    Ok(_) => Ok(()),
                    // Missed events may include actions for us: resync from the store.
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(drone = %self.name, missed, "Action subscription lagged, resyncing");
                        self.send_pending(&mut last_sent).await
                    }
                    Err(broadcast::error::RecvError::Closed) => Err(SessionClosed),
                },
            };
            if sent.is_err() {
                break;
            }
        }
        self.cancel.cancel();
    }

    /// Sends the unacked actions not sent within [`RESEND_MIN_AGE`]. A store error is logged and the
    /// next pass tries again.
    async fn send_pending(
        &self,
        last_sent: &mut HashMap<ActionId, Instant>,
    ) -> Result<(), SessionClosed> {
        let pending = match self.store.pending_actions(self.node, RESEND_PAGE).await {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(drone = %self.name, error = %e, "Failed to read pending actions");
                return Ok(());
            }
        };
        // Forget acked actions.
        last_sent.retain(|id, _| pending.iter().any(|a| &a.action_id == id));
        let now = Instant::now();
        for action in pending {
            let recent = last_sent
                .get(&action.action_id)
                .is_some_and(|at| now.duration_since(*at) < RESEND_MIN_AGE);
            if !recent {
                last_sent.insert(action.action_id.clone(), now);
                self.send_action(action).await?;
            }
        }
        Ok(())
    }

    async fn send_action(&self, action: ActionMessage) -> Result<(), SessionClosed> {
        tracing::debug!(drone = %self.name, action = %action.action_id, backend = %action.backend_id, "Sending action");
        self.sender.send(&ControllerToDrone::Action(action)).await
    }
}
