//! A simulated drone for the control-plane scenario: it speaks the drone protocol over a real
//! WebSocket session but runs nothing. It heartbeats, renews keys, acks every action at once and answers
//! a spawn with `loading`, `starting`, `waiting` and `ready` events (with a dummy address) back to back,
//! so only Hangar's control path (API, store, sessions) is measured.
//!
//! It reports the moment the controller acknowledges a backend's `ready` event — the controller has
//! stored it by then — keyed by the key name the connect request used.

use anyhow::Context;
use hangar_client::node::NodeSocket;
use hangar_client::ControllerClient;
use hangar_types::executable::ExecutorKind;
use hangar_types::protocol::{
    ActionMessage, BackendAction, ClaimHookOutcome, ControllerToDrone, DroneToController, Hello,
    NodeHello,
};
use hangar_types::state::BackendStatus;
use hangar_types::timing::{HEARTBEAT_INTERVAL, KEY_RENEW_AFTER};
use hangar_types::{BackendId, BackendState, ClusterName, DroneName, Millis};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where the simulated backends "listen" (the discard port; nothing connects to it).
const DUMMY_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// A backend's `ready` event was stored by the controller.
#[derive(Debug, Clone)]
pub struct ReadyReport {
    pub key: String,
    pub backend: BackendId,
    pub at: Instant,
}

/// A connected simulated drone; [`FakeDrone::run`] serves its session.
pub struct FakeDrone {
    name: DroneName,
    socket: NodeSocket<DroneToController, ControllerToDrone>,
    next_event_id: i64,
    /// Event id of each backend's `ready` event that is not acked yet → (key, backend).
    ready_events: HashMap<i64, (String, BackendId)>,
    /// Backends "running" here (their key renewals are due every `KEY_RENEW_AFTER`).
    running: HashMap<BackendId, String>,
}

impl FakeDrone {
    /// Opens the drone session and sends the first heartbeat (a drone is schedulable once the
    /// controller has one).
    pub async fn connect(
        client: &ControllerClient,
        cluster: &ClusterName,
    ) -> anyhow::Result<FakeDrone> {
        let name = DroneName::random();
        let hello = Hello::new(NodeHello::Drone {
            name: name.clone(),
            pool: String::new(),
            executors: vec![ExecutorKind::Process],
        });
        let path = format!("/ctrl/c/{cluster}/drone-socket");
        let mut socket = NodeSocket::connect(client, &path, &hello)
            .await
            .with_context(|| format!("simulated drone {name} could not connect"))?;
        socket
            .send(&DroneToController::Heartbeat {
                local_time: Millis::now(),
            })
            .await
            .context("sending the first heartbeat")?;
        Ok(FakeDrone {
            name,
            socket,
            next_event_id: 1,
            ready_events: HashMap::new(),
            running: HashMap::new(),
        })
    }

    pub fn name(&self) -> &DroneName {
        &self.name
    }

    /// Serves the session until `cancel` fires; errors when the controller closes it first.
    pub async fn run(
        mut self,
        ready: mpsc::UnboundedSender<ReadyReport>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        let mut renew = tokio::time::interval(KEY_RENEW_AFTER);
        // Both fire at once on the first tick; the first heartbeat was sent by `connect`.
        heartbeat.tick().await;
        renew.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    self.send(DroneToController::Heartbeat { local_time: Millis::now() }).await?;
                }
                _ = renew.tick() => {
                    let backends: Vec<BackendId> = self.running.keys().cloned().collect();
                    for backend in backends {
                        self.send(DroneToController::RenewKey { backend, local_time: Millis::now() }).await?;
                    }
                }
                message = self.socket.recv() => {
                    let message = message.with_context(|| format!("the controller closed the session of {}", self.name))?;
                    self.handle(message, &ready).await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        message: ControllerToDrone,
        ready: &mpsc::UnboundedSender<ReadyReport>,
    ) -> anyhow::Result<()> {
        match message {
            ControllerToDrone::Action(ActionMessage {
                action_id,
                backend_id,
                action,
            }) => {
                self.send(DroneToController::AckAction { action_id })
                    .await?;
                match action {
                    BackendAction::Spawn { key, .. } => {
                        // A resent spawn for a backend already reported needs nothing more.
                        if !self.running.contains_key(&backend_id) {
                            self.spawn(backend_id, key.key.name.to_string()).await?;
                        }
                    }
                    BackendAction::Terminate { kind, reason } => {
                        if self.running.remove(&backend_id).is_some() {
                            let state = BackendState::Terminated {
                                last_status: BackendStatus::Ready,
                                termination: Some(kind),
                                reason: Some(reason),
                                exit_code: Some(0),
                                message: None,
                                oom_killed: false,
                            };
                            self.event(&backend_id, state).await?;
                        }
                    }
                }
            }
            ControllerToDrone::AckEvent { event_id } => {
                if let Some((key, backend)) = self.ready_events.remove(&event_id) {
                    // The receiver is gone only when the scenario stopped listening.
                    let _ = ready.send(ReadyReport {
                        key,
                        backend,
                        at: Instant::now(),
                    });
                }
            }
            // A simulated backend has no claim hook to call: it accepts every claim.
            ControllerToDrone::ClaimHook { request_id, .. } => {
                let outcome = ClaimHookOutcome::Accepted;
                self.send(DroneToController::ClaimHookResult {
                    request_id,
                    outcome,
                })
                .await?;
            }
            // Simulated backends print nothing, and no scenario reads their logs.
            ControllerToDrone::RenewKeyResponse { .. }
            | ControllerToDrone::LogRequest { .. }
            | ControllerToDrone::LogCredit { .. }
            | ControllerToDrone::LogCancel { .. } => {}
        }
        Ok(())
    }

    async fn spawn(&mut self, backend: BackendId, key: String) -> anyhow::Result<()> {
        self.running.insert(backend.clone(), key.clone());
        for state in [
            BackendState::Loading,
            BackendState::Starting,
            BackendState::Waiting {
                address: DUMMY_ADDRESS,
            },
        ] {
            self.event(&backend, state).await?;
        }
        let id = self
            .event(
                &backend,
                BackendState::Ready {
                    address: DUMMY_ADDRESS,
                },
            )
            .await?;
        self.ready_events.insert(id, (key, backend));
        Ok(())
    }

    /// Sends one backend event; returns its id.
    async fn event(&mut self, backend: &BackendId, state: BackendState) -> anyhow::Result<i64> {
        let event_id = self.next_event_id;
        self.next_event_id += 1;
        self.send(DroneToController::BackendEvent {
            event_id,
            backend_id: backend.clone(),
            state,
            timestamp: Millis::now(),
        })
        .await?;
        Ok(event_id)
    }

    async fn send(&mut self, message: DroneToController) -> anyhow::Result<()> {
        self.socket
            .send(&message)
            .await
            .with_context(|| format!("simulated drone {} could not send", self.name))
    }
}
