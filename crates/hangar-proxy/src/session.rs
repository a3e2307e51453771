//! The proxy's session with the controller (Plane §3.5): connect with `Hello`, request routes and
//! send keepalives, apply route responses, backend removals and token revocations; carry the
//! certificate messages (lease, TXT value, HTTP-01 answers, the cluster certificate; see
//! `cert_link.rs` and `tls.rs`); reconnect with backoff forever, and also now and then on purpose to
//! rebalance across controllers.
//!
//! Keepalive answers (`KeyLease`) extend the proxy's bound on the backend's key lease;
//! [`run_lease_expiry`] closes the tunnels of backends whose bound has passed.
//!
//! Each connection is a *generation*: the route cache re-sends every outstanding route request on a
//! new generation, and queued keepalives wait across a disconnect and go out on the next connection.

use crate::cert_link::CertAnswer;
use crate::tls::{CertPem, CertSource, ClusterCert};
use crate::ProxyState;
use hangar_client::node::{ConnectionEnd, NodeReceiver, NodeSender, Reconnecting};
use hangar_client::{ClientError, ControllerClient};
use hangar_types::protocol::{ControllerToProxy, Hello, NodeHello, ProxyToController};
use hangar_types::timing::ROUTE_LEASE_CHECK_INTERVAL;
use rand::Rng;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A connection is deliberately re-established after this long (± [`RECONNECT_JITTER`]), so proxies
/// spread over the controllers again after a controller restart.
const PERIODIC_RECONNECT: Duration = Duration::from_secs(3600);
const RECONNECT_JITTER: Duration = Duration::from_secs(600);

type Sender = NodeSender<ProxyToController>;
type Receiver = NodeReceiver<ControllerToProxy>;

/// Runs the controller session until `cancel` fires.
pub(crate) async fn run_session(
    state: std::sync::Arc<ProxyState>,
    client: ControllerClient,
    cancel: CancellationToken,
) {
    let path = format!("/ctrl/c/{}/proxy-socket", state.config.cluster);
    let hello = Hello::new(NodeHello::Proxy {
        name: state.config.name.clone(),
    });
    let mut session = Reconnecting::new(&client, &path, &hello, &cancel);
    while let Some((socket, generation)) = session.connect().await {
        state.route_cache.start_session();
        state.set_connected(true);
        let (tx, rx) = socket.split();
        let end = run_connection(&state, tx, rx, generation, &cancel).await;
        state.set_connected(false);
        if !session.ended(end).await {
            break;
        }
    }
}

async fn run_connection(
    state: &ProxyState,
    mut tx: Sender,
    mut rx: Receiver,
    generation: u64,
    cancel: &CancellationToken,
) -> ConnectionEnd {
    let reconnect_after = {
        let jitter = rand::rng().random_range(0.0..=2.0) * RECONNECT_JITTER.as_secs_f64();
        PERIODIC_RECONNECT - RECONNECT_JITTER + Duration::from_secs_f64(jitter)
    };
    let end = tokio::select! {
        _ = cancel.cancelled() => ConnectionEnd::Cancelled,
        _ = tokio::time::sleep(reconnect_after) => ConnectionEnd::Rebalance,
        () = run_receiver(state, &mut rx) => ConnectionEnd::Closed,
        error = run_sender(state, &mut tx, generation) => ConnectionEnd::SendFailed(error),
    };
    if !matches!(end, ConnectionEnd::SendFailed(_)) {
        tx.close().await;
    }
    end
}

/// Applies messages from the controller until the connection closes.
async fn run_receiver(state: &ProxyState, rx: &mut Receiver) {
    while let Some(message) = rx.recv().await {
        match message {
            ControllerToProxy::RouteResponse { token, route } => {
                state.route_cache.resolve(token, route);
            }
            ControllerToProxy::BackendRemoved {
                backend,
                terminated,
            } => {
                tracing::debug!(%backend, terminated, "Backend removed");
                state.route_cache.remove_backend(&backend);
                state.tracker.forget(&backend, terminated);
            }
            ControllerToProxy::TokensRevoked { tokens, holder } => {
                tracing::debug!(count = tokens.len(), ?holder, "Tokens revoked");
                state.route_cache.revoke(&tokens);
                if let Some(holder) = holder {
                    state
                        .route_cache
                        .revoke_holder(&holder.backend, &holder.user);
                }
            }
            ControllerToProxy::KeyLease {
                backend,
                remaining_ms,
            } => {
                let remaining = Duration::from_millis(remaining_ms);
                state.route_cache.lease_answered(&backend, remaining);
            }
            ControllerToProxy::CertLeaseResponse { accepted } => {
                state.cert_link.answer(CertAnswer::Lease { accepted });
            }
            ControllerToProxy::SetTxtRecordResponse { accepted } => {
                state.cert_link.answer(CertAnswer::TxtRecord { accepted });
            }
            ControllerToProxy::HttpChallenge {
                token,
                key_authorization,
            } => {
                tracing::debug!(set = key_authorization.is_some(), "ACME HTTP-01 challenge");
                state.tls.set_challenge(token, key_authorization);
            }
            ControllerToProxy::Certificate { cert_pem, key_pem } => {
                let pem = CertPem { cert_pem, key_pem };
                match ClusterCert::from_pem(pem, CertSource::Controller) {
                    Ok(cert) => {
                        state.tls.offer_shared(cert);
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "Ignoring the cluster certificate from the controller: it cannot be served"
                    ),
                }
            }
        }
    }
}

/// Closes the tunnels to backends whose key lease the proxy can no longer vouch for (see
/// `route_cache.rs`), every [`ROUTE_LEASE_CHECK_INTERVAL`], until `cancel` fires. Connected or not: a
/// proxy cut off from every controller must stop serving a backend before its key can change hands.
pub(crate) async fn run_lease_expiry(state: std::sync::Arc<ProxyState>, cancel: CancellationToken) {
    let mut ticks = hangar_types::ticks::every(ROUTE_LEASE_CHECK_INTERVAL, &cancel);
    while ticks.next().await {
        for backend in state.route_cache.lapse_leases(tokio::time::Instant::now()) {
            let open = state
                .tracker
                .counts(&backend)
                .map_or(0, |c| c.open_connections);
            if open > 0 {
                tracing::warn!(%backend, open, "Key lease not confirmed in time; closing the tunnels to the backend");
            }
            state.tracker.forget(&backend, true);
        }
    }
}

/// Sends route requests and keepalives as they are queued; returns the error that ended sending.
async fn run_sender(state: &ProxyState, tx: &mut Sender, generation: u64) -> ClientError {
    loop {
        let routes = state.route_cache.take_unsent(generation);
        let keepalives = state.tracker.take_keepalives();
        if routes.is_empty() && keepalives.is_empty() && !state.cert_link.has_unsent() {
            // `notify_one` stores a permit, so work queued since the takes above is not missed.
            state.outbound.notified().await;
            continue;
        }
        state
            .route_cache
            .lease_asked(keepalives.iter().map(|(backend, _)| backend));
        let messages =
            routes
                .into_iter()
                .map(|token| ProxyToController::RouteRequest { token })
                .chain(keepalives.into_iter().map(|(backend, connected)| {
                    ProxyToController::KeepAlive { backend, connected }
                }));
        for message in messages {
            if let Err(error) = tx.send(&message).await {
                return error;
            }
        }
        // A certificate message leaves its queue only once sent, so one caught by a connection that
        // ends (or by this future being dropped) goes out on the next connection: a lost
        // `StoreCertificate` would leave the other proxies without the new certificate.
        while let Some(message) = state.cert_link.next_unsent() {
            if let Err(error) = tx.send(&message).await {
                return error;
            }
            state.cert_link.mark_sent(&message);
        }
    }
}
