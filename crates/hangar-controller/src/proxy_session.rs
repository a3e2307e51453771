//! One proxy's WebSocket session (`/ctrl/c/{cluster}/proxy-socket`, plane-api.md §3.5.3).
//!
//! Three loops: the socket writer, the reader (route requests, keepalives — each answered with the
//! backend's remaining key lease, which bounds the proxy's use of its routes — certificate requests — see
//! [`crate::cert`]) and the event forwarder (`BackendRemoved` for every backend that starts terminating,
//! `TokensRevoked` for revocations, the cluster's ACME HTTP challenges and certificates; on connect it
//! first sends the cluster's current certificate and challenges). A route request for a backend that is
//! not ready yet is answered later by a waiter task.
//!
//! Unlike Plane (quirks 5, 6, 32): every route request gets an answer — `None` on a store error or after
//! [`ROUTE_WAIT_TIMEOUT`] — so a proxy never hangs; removal is announced as soon as a backend starts
//! terminating; and a store error never ends the session.

use crate::api::AppState;
use crate::cert::{tls_event, tls_snapshot, ProxyTls};
use crate::node_socket::{self, NodeSender, SessionClosed, Welcomed};
use crate::prometheus::ControllerMetrics;
use axum::extract::ws::WebSocket;
use hangar_store::{KeepAlive, NodeId, Store, StoreEvent, StoreResult, TokenLookup};
use hangar_types::protocol::{ControllerToProxy, NodeHello, ProxyToController, RouteInfo};
use hangar_types::token::ConnectionToken;
use hangar_types::{BackendId, BackendStatus, ClusterName, ProxyName};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait for a pending backend to become ready before answering `None` (Plane: 30 min, then
/// silence). Longer than the drone's readiness timeout, so a backend that starts at all is reported.
pub const ROUTE_WAIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs a proxy session on an upgraded socket until the proxy leaves or the controller shuts down.
pub async fn run_proxy_session(state: AppState, cluster: ClusterName, mut socket: WebSocket) {
    let hello = match node_socket::read_hello(&mut socket).await {
        Ok(hello) => hello,
        Err(reason) => return node_socket::refuse(socket, reason).await,
    };
    let NodeHello::Proxy { name } = hello.node else {
        let reason = "a drone must connect to the drone socket, not the proxy socket".to_string();
        return node_socket::refuse(socket, reason).await;
    };
    let registered = state
        .store
        .register_proxy(&cluster, &name, &state.config.name, &hello.version)
        .await;
    let (node, session) = match node_socket::registered(registered, "proxy", &name) {
        Ok(registered) => registered,
        Err(reason) => return node_socket::refuse(socket, reason).await,
    };
    tracing::info!(proxy = %name, %cluster, node, session, "Proxy connected");

    let events = state.store.events().subscribe();
    let _counted = state
        .prometheus
        .node_session(crate::prometheus::NodeKind::Proxy);
    if let Some(Welcomed {
        sender,
        cancel,
        socket,
    }) = node_socket::welcome(socket, &state.config.name, &state.cancel).await
    {
        let proxy = ProxySession {
            store: state.store.clone(),
            metrics: state.prometheus.clone(),
            cluster: cluster.clone(),
            name: name.clone(),
            node,
            sender,
            cancel: cancel.clone(),
            waiters: state.tracker.clone(),
        };
        socket
            .run(
                &cancel,
                &name,
                |batch| proxy.handle_batch(batch),
                proxy.run_event_forwarder(events),
            )
            .await;
    }
    node_socket::disconnected(state.store.as_ref(), "proxy", &name, node, session).await;
}

struct ProxySession {
    store: Arc<dyn Store>,
    metrics: Arc<ControllerMetrics>,
    cluster: ClusterName,
    name: ProxyName,
    /// The proxy's node id: connection reports are kept per proxy.
    node: NodeId,
    sender: NodeSender<ControllerToProxy>,
    /// The session's token: every loop and waiter stops when it fires, and any loop that ends fires it.
    cancel: CancellationToken,
    /// Where route waiters run (the controller's tracker, so shutdown waits for them).
    waiters: TaskTracker,
}

impl ProxySession {
    async fn handle_batch(&self, batch: Vec<ProxyToController>) -> Result<(), SessionClosed> {
        for message in batch {
            self.handle(message).await?;
        }
        Ok(())
    }

    async fn handle(&self, message: ProxyToController) -> Result<(), SessionClosed> {
        match message {
            ProxyToController::RouteRequest { token } => self.route_request(token).await,
            ProxyToController::KeepAlive { backend, connected } => {
                self.keepalive(backend, connected).await
            }
            ProxyToController::CertLeaseRequest => {
                let answer = self.tls().lease_request().await;
                self.sender.send(&answer).await
            }
            ProxyToController::ReleaseCertLease => {
                self.tls().release_lease().await;
                Ok(())
            }
            ProxyToController::SetTxtRecord { txt_value } => {
                let answer = self.tls().set_txt_record(txt_value).await;
                self.sender.send(&answer).await
            }
            ProxyToController::SetHttpChallenge {
                token,
                key_authorization,
            } => {
                self.tls()
                    .set_http_challenge(token, key_authorization)
                    .await;
                Ok(())
            }
            ProxyToController::StoreCertificate { cert_pem, key_pem } => {
                self.tls().store_certificate(cert_pem, key_pem).await;
                Ok(())
            }
        }
    }

    fn tls(&self) -> ProxyTls<'_> {
        ProxyTls {
            store: self.store.as_ref(),
            cluster: &self.cluster,
            proxy: self.node,
            name: &self.name,
        }
    }

    /// Sends the cluster's current certificate and HTTP challenges.
    async fn send_tls_snapshot(&self) -> Result<(), SessionClosed> {
        for message in tls_snapshot(self.store.as_ref(), &self.cluster).await {
            self.sender.send(&message).await?;
        }
        Ok(())
    }

    async fn route_request(&self, token: ConnectionToken) -> Result<(), SessionClosed> {
        // Subscribe before the lookup: a state change right after it is then not missed by a waiter.
        let events = self.store.events().subscribe();
        let route = match resolve(self.store.as_ref(), &self.metrics, &token).await {
            Ok(TokenLookup::Ready(route)) => Some(route),
            Ok(TokenLookup::NotFound) => None,
            Ok(TokenLookup::Pending { backend }) => {
                let waiter = RouteWaiter {
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    token,
                    backend,
                    events,
                };
                let sender = self.sender.clone();
                let cancel = self.cancel.clone();
                self.waiters.spawn(waiter.run_route_waiter(sender, cancel));
                return Ok(());
            }
            Err(e) => {
                tracing::error!(proxy = %self.name, error = %e, "Failed to resolve token");
                None
            }
        };
        self.sender
            .send(&ControllerToProxy::RouteResponse { token, route })
            .await
    }

    async fn keepalive(&self, backend: BackendId, connected: bool) -> Result<(), SessionClosed> {
        match self.store.keepalive(&backend, self.node, connected).await {
            // The answer bounds the proxy's routes and tunnels to the backend (see
            // `RouteInfo::lease_remaining_ms`).
            Ok(KeepAlive::Recorded {
                lease_left: Some(left),
            }) => {
                let remaining_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                self.sender
                    .send(&ControllerToProxy::KeyLease {
                        backend,
                        remaining_ms,
                    })
                    .await
            }
            Ok(KeepAlive::Recorded { lease_left: None }) => Ok(()),
            Ok(KeepAlive::Gone) => {
                self.sender
                    .send(&ControllerToProxy::BackendRemoved {
                        backend,
                        terminated: true,
                    })
                    .await
            }
            Err(e) => {
                tracing::warn!(proxy = %self.name, %backend, error = %e, "Failed to record keepalive");
                Ok(())
            }
        }
    }

    /// Tells the proxy to forget backends that start terminating and tokens that are revoked, and keeps
    /// it up to date with its cluster's certificate and ACME HTTP challenges.
    async fn run_event_forwarder(&self, mut events: broadcast::Receiver<StoreEvent>) {
        // Subscribed before this read: a certificate stored meanwhile is sent (again) below.
        if self.send_tls_snapshot().await.is_err() {
            self.cancel.cancel();
            return;
        }
        loop {
            let event = tokio::select! {
                _ = self.cancel.cancelled() => break,
                event = events.recv() => event,
            };
            let message = match event {
                Ok(StoreEvent::BackendState { backend, state, .. })
                    if state.status().is_terminating_or_terminated() =>
                {
                    ControllerToProxy::BackendRemoved {
                        backend,
                        terminated: state.status() == BackendStatus::Terminated,
                    }
                }
                Ok(StoreEvent::TokensRevoked { tokens, holder }) => {
                    ControllerToProxy::TokensRevoked { tokens, holder }
                }
                Ok(event) => match tls_event(&event, &self.cluster) {
                    Some(message) => message,
                    None => continue,
                },
                // Lost notifications cannot be replayed; a proxy whose cached route is stale gets
                // `BackendRemoved` on its next keepalive for that backend. TLS state is re-sent whole.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(proxy = %self.name, missed, "Proxy event subscription lagged");
                    if self.send_tls_snapshot().await.is_err() {
                        break;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if self.sender.send(&message).await.is_err() {
                break;
            }
        }
        self.cancel.cancel();
    }
}

/// Answers one route request for a backend that was not ready when asked.
struct RouteWaiter {
    store: Arc<dyn Store>,
    metrics: Arc<ControllerMetrics>,
    token: ConnectionToken,
    backend: BackendId,
    /// Subscribed before the first lookup.
    events: broadcast::Receiver<StoreEvent>,
}

impl RouteWaiter {
    async fn run_route_waiter(
        mut self,
        sender: NodeSender<ControllerToProxy>,
        cancel: CancellationToken,
    ) {
        let route = tokio::select! {
            _ = cancel.cancelled() => return,
            route = tokio::time::timeout(ROUTE_WAIT_TIMEOUT, self.wait_for_route()) => {
                route.unwrap_or_else(|_| {
                    tracing::warn!(backend = %self.backend, "Backend not ready in time for a route request");
                    None
                })
            }
        };
        let token = self.token;
        // A failed send means the session is over; nothing to do.
        let _ = sender
            .send(&ControllerToProxy::RouteResponse { token, route })
            .await;
    }

    /// Re-resolves the token once a state change may have decided its answer, until it is ready or
    /// gone. The lookup that made this waiter already said `Pending`, after the subscription, so the
    /// first re-resolve waits for an event too. States before `ready` cannot change the answer
    /// (the lookup says `Pending` for all of them), so a start's `loading`, `starting` and `waiting`
    /// cost no read; a lagged subscription may have lost the deciding event, so it re-resolves.
    async fn wait_for_route(&mut self) -> Option<RouteInfo> {
        loop {
            loop {
                match self.events.recv().await {
                    Ok(StoreEvent::BackendState { backend, state, .. })
                        if backend == self.backend && may_decide_route(state.status()) =>
                    {
                        break
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
            match resolve(self.store.as_ref(), &self.metrics, &self.token).await {
                Ok(TokenLookup::Ready(route)) => return Some(route),
                Ok(TokenLookup::NotFound) => return None,
                Ok(TokenLookup::Pending { .. }) => {}
                Err(e) => {
                    tracing::error!(backend = %self.backend, error = %e, "Failed to resolve token");
                    return None;
                }
            }
        }
    }
}

/// Resolves `token` for a route request, counted in `hangar_route_lookups_total`.
async fn resolve(
    store: &dyn Store,
    metrics: &ControllerMetrics,
    token: &ConnectionToken,
) -> StoreResult<TokenLookup> {
    let lookup = store.resolve_token(token).await;
    metrics.record_route_lookup(&lookup);
    lookup
}

/// Whether a backend that entered `status` may have a different route answer than `Pending`: `ready`
/// (a route, unless its lease ran out) and every state after it (none).
fn may_decide_route(status: BackendStatus) -> bool {
    status >= BackendStatus::Ready
}
