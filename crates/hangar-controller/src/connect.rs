//! Get-or-create (`POST /ctrl/connect`, plane-api.md §2.4.1): reuse the live backend holding the key,
//! claim a ready backend of a matching warm pool ([`crate::warm_pool`]), or schedule a new one with a
//! fresh key lease; and issue a connection token for it (for a new backend, written in the spawn's own
//! transaction, so a fresh connect waits on one commit).
//!
//! A cold spawn needs the scheduler's read of the drones as well as the key lookup. For a key this
//! controller does not remember as held ([`crate::held_keys`]) the two run side by side, so the spawn
//! waits for one store round trip fewer; a remembered key's reconnect reads no drones.
//!
//! Races between concurrent connects are settled by the store (one transaction per step); a lost race
//! (`FailedToRemoveKey`, `FailedToAcquireKey`) retries the whole attempt, at most [`MAX_ATTEMPTS`] in
//! total, as Plane does.

use crate::api::AppState;
use crate::prometheus::DroneRead;
use crate::scheduler;
use hangar_store::{
    Acquire, BackendRow, DroneCandidate, KeyLookup, KeyRef, KeyReuse, NewBackend, Reuse,
    StoreError, TokenGrant,
};
use hangar_types::api::{connection_url, ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig};
use hangar_types::names::{validate_key_text, validate_subdomain};
use hangar_types::protocol::KeyDeadlines;
use hangar_types::timing::TOKEN_LIFETIME;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendId, BackendStatus, ClusterName, KeyName};
use std::time::Instant;

/// Attempts of the whole get-or-create before a race is reported to the client.
pub const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("Lock is held but tag does not match.")]
    TagMismatch,
    /// Deviation from Plane (quirk 26), see [`reuse_backend`].
    #[error(
        "Lock is held by backend {backend}, which is shutting down ({status}); retry shortly to get a new backend."
    )]
    BackendShuttingDown {
        backend: BackendId,
        status: BackendStatus,
    },
    #[error("Failed to remove lock.")]
    FailedToRemoveKey,
    #[error("Failed to acquire lock.")]
    FailedToAcquireKey,
    #[error("A backend with id {0} already exists.")]
    BackendIdTaken(BackendId),
    #[error("Lock is unheld but no spawn config was provided.")]
    NoSpawnConfig,
    #[error("No cluster provided, and no default cluster for this controller.")]
    NoClusterProvided,
    #[error("No active drone available.")]
    NoDroneAvailable,
    /// A warm backend was claimed but its drone did not answer the claim hook; it is terminated.
    #[error("The drone of warm backend {0} did not answer its claim hook; retry shortly.")]
    WarmClaimUnanswered(BackendId),
    #[error("Internal error.")]
    Store(#[from] StoreError),
}

impl ConnectError {
    /// A lost race or a transient store failure: the whole attempt may succeed when repeated.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::FailedToRemoveKey | ConnectError::FailedToAcquireKey => true,
            ConnectError::Store(e) => e.is_retryable(),
            ConnectError::InvalidRequest(_)
            | ConnectError::TagMismatch
            | ConnectError::BackendShuttingDown { .. }
            | ConnectError::BackendIdTaken(_)
            | ConnectError::NoSpawnConfig
            | ConnectError::NoClusterProvided
            | ConnectError::NoDroneAvailable
            | ConnectError::WarmClaimUnanswered(_) => false,
        }
    }
}

/// Runs get-or-create for one request.
pub async fn connect(
    state: &AppState,
    request: &ConnectRequest,
) -> Result<ConnectResponse, ConnectError> {
    validate(request)?;
    let mut attempt = 1;
    loop {
        match connect_once(state, request).await {
            Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "Connect lost a race, retrying");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Checks what serde cannot: free-text key fields, subdomain syntax, positive limits.
fn validate(request: &ConnectRequest) -> Result<(), ConnectError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        ConnectError::InvalidRequest(format!("invalid {what}: {e}"))
    };
    if let Some(key) = &request.key {
        validate_key_text(&key.namespace).map_err(|e| invalid("key.namespace", &e))?;
        validate_key_text(&key.tag).map_err(|e| invalid("key.tag", &e))?;
    }
    if let Some(spawn) = &request.spawn_config {
        if let Some(sub) = &spawn.subdomain {
            validate_subdomain(sub).map_err(|e| invalid("spawn_config.subdomain", &e))?;
        }
        for (field, value) in [
            ("max_idle_seconds", spawn.max_idle_seconds),
            ("lifetime_limit_seconds", spawn.lifetime_limit_seconds),
        ] {
            if value.is_some_and(|v| v <= 0) {
                return Err(ConnectError::InvalidRequest(format!(
                    "invalid spawn_config.{field}: must be greater than 0"
                )));
            }
        }
        validate_key_text(&spawn.pool).map_err(|e| invalid("spawn_config.pool", &e))?;
    }
    Ok(())
}

async fn connect_once(
    state: &AppState,
    request: &ConnectRequest,
) -> Result<ConnectResponse, ConnectError> {
    let (key, drones) = match &request.key {
        Some(key) => {
            let reuse = key_reuse(request, key);
            let key_ref = reuse.key.clone();
            let issued = (reuse.grant.token.clone(), reuse.grant.secret.clone());
            let (reuse, drones) = tokio::join!(
                state.store.reuse_key(reuse),
                drones_alongside_lookup(state, request, key)
            );
            let reuse = reuse?;
            if matches!(
                reuse,
                Reuse::NotReused(KeyLookup::Missing | KeyLookup::Expired { .. })
            ) {
                state.held_keys.forget(key);
            } else {
                state.held_keys.remember(key, Instant::now());
                if drones.is_some() {
                    state.prometheus.record_drone_read(DroneRead::Wasted);
                }
            }
            let lookup = match reuse {
                Reuse::Reused { backend } => return Ok(reused(state, backend, issued)),
                Reuse::NotReused(lookup) => lookup,
            };
            match lookup {
                // Refused by the store's checks, which `reuse_backend` repeats for the error.
                KeyLookup::Live { tag, backend } => {
                    return reuse_backend(state, request, key, &tag, backend).await;
                }
                KeyLookup::Expired { backend: old } => {
                    // The lease expired on the store clock, so the old holder's drone has already
                    // hard-terminated it by its own deadlines (hard < lease). The store records it
                    // lost in the transaction that frees the key, before the new backend exists, so
                    // the history never shows two live holders of a key, and proxies hear of it.
                    let lost = crate::lost::lost_state(
                        &old.state,
                        "key lease expired and the key was taken over".into(),
                    );
                    if !state
                        .store
                        .take_over_expired_key(&key_ref, &old.id, &lost)
                        .await?
                    {
                        return Err(ConnectError::FailedToRemoveKey);
                    }
                    tracing::info!(key = %key.name, namespace = %key.namespace, backend = %old.id, "Took over an expired key");
                }
                KeyLookup::Missing => {}
            }
            (key.clone(), drones)
        }
        None => {
            let key = KeyConfig {
                name: KeyName::random(),
                namespace: String::new(),
                tag: String::new(),
            };
            (key, None)
        }
    };
    let spawn = request
        .spawn_config
        .as_ref()
        .ok_or(ConnectError::NoSpawnConfig)?;
    let response = spawn_backend(state, request, key, spawn, drones).await?;
    if let Some(key) = &request.key {
        state.held_keys.remember(key, Instant::now());
    }
    Ok(response)
}

/// The scheduler's read for a connect whose key this controller does not remember as held and whose
/// spawn would be cold (no warm pool matches), made while the key is looked up. `None`: not read
/// (or the read failed; the spawn then reads again).
async fn drones_alongside_lookup(
    state: &AppState,
    request: &ConnectRequest,
    key: &KeyConfig,
) -> Option<Option<DroneCandidate>> {
    let spawn = request.spawn_config.as_ref()?;
    let cluster = spawn_cluster(state, spawn).ok()?;
    if state.warm.may_claim(&cluster, spawn) || state.held_keys.probably_held(key, Instant::now()) {
        return None;
    }
    pick_drone(state, &cluster, spawn).await.ok()
}

/// The spawn's cluster: the request's, else this controller's default.
fn spawn_cluster(state: &AppState, spawn: &SpawnConfig) -> Result<ClusterName, ConnectError> {
    spawn
        .cluster
        .clone()
        .or_else(|| state.config.default_cluster.clone())
        .ok_or(ConnectError::NoClusterProvided)
}

async fn pick_drone(
    state: &AppState,
    cluster: &ClusterName,
    spawn: &SpawnConfig,
) -> Result<Option<DroneCandidate>, StoreError> {
    scheduler::pick_drone(
        state.store.as_ref(),
        cluster,
        &spawn.pool,
        spawn.executable.kind(),
        state.config.best_of,
    )
    .await
}

/// A connect's reuse of the key's holder, with a new dynamic token for this request's user.
fn key_reuse(request: &ConnectRequest, key: &KeyConfig) -> KeyReuse {
    KeyReuse {
        key: KeyRef::from(key),
        tag: key.tag.clone(),
        grant: token_grant(request),
    }
}

/// A new dynamic connection token for this request's user.
fn token_grant(request: &ConnectRequest) -> TokenGrant {
    TokenGrant {
        token: ConnectionToken::random(),
        secret: SecretToken::random(),
        user: request.user.clone(),
        auth: request.auth.clone(),
        lifetime: TOKEN_LIFETIME,
    }
}

/// The answer for a key's holder reused by the store ([`hangar_store::Store::reuse_key`]): its static
/// token, or the dynamic token the store inserted.
fn reused(
    state: &AppState,
    backend: BackendRow,
    (token, secret): (ConnectionToken, SecretToken),
) -> ConnectResponse {
    let issued = match backend.static_token.clone() {
        Some(token) => (token, None),
        None => (token, Some(secret)),
    };
    respond(state, backend, false, issued)
}

/// Returns the backend that holds the key (after the store refused to reuse it: this reports why, and
/// issues a token by itself if the store's checks and these ever disagree).
///
/// Deviation from Plane (quirk 26): Plane returns the holder even when it is already terminating, so
/// the client gets a URL to a backend that is about to disappear. We refuse with 409 `KeyHeld` instead:
/// the key is released as soon as the backend reports `terminated` (seconds later), so a retry then
/// gets a fresh backend for the same key, and a client is never handed a dying backend.
async fn reuse_backend(
    state: &AppState,
    request: &ConnectRequest,
    key: &KeyConfig,
    held_tag: &str,
    backend: BackendRow,
) -> Result<ConnectResponse, ConnectError> {
    if held_tag != key.tag {
        return Err(ConnectError::TagMismatch);
    }
    let status = backend.state.status();
    if status.is_terminating_or_terminated() {
        return Err(ConnectError::BackendShuttingDown {
            backend: backend.id,
            status,
        });
    }
    backend_response(state, request, backend, false).await
}

async fn spawn_backend(
    state: &AppState,
    request: &ConnectRequest,
    key: KeyConfig,
    spawn: &SpawnConfig,
    drones: Option<Option<DroneCandidate>>,
) -> Result<ConnectResponse, ConnectError> {
    let cluster = spawn_cluster(state, spawn)?;
    let static_token = spawn.use_static_token.then(ConnectionToken::random_static);
    if let Some(backend) =
        crate::warm_pool::claim(state, &key, spawn, &cluster, static_token.as_ref()).await?
    {
        return backend_response(state, request, backend, true).await;
    }
    let drone = match drones {
        Some(drone) => {
            state
                .prometheus
                .record_drone_read(DroneRead::AlongsideLookup);
            drone
        }
        None => {
            state.prometheus.record_drone_read(DroneRead::AfterLookup);
            pick_drone(state, &cluster, spawn).await?
        }
    };
    let drone = drone.ok_or(ConnectError::NoDroneAvailable)?;

    let id = spawn.id.clone().unwrap_or_else(BackendId::random);
    // The dynamic token is written with the spawn, in its transaction.
    let (grant, (token, secret_token)) = match &static_token {
        Some(token) => (None, (token.clone(), None)),
        None => {
            let grant = token_grant(request);
            let issued = (grant.token.clone(), Some(grant.secret.clone()));
            (Some(grant), issued)
        }
    };
    let new = NewBackend {
        id: id.clone(),
        key,
        cluster: cluster.clone(),
        pool: spawn.pool.clone(),
        drone: drone.id,
        executable: spawn.executable.clone(),
        // Deadlines on the drone's own clock, from its last heartbeat (plane-api.md §5.2, with the
        // intended +50 s hard deadline rather than Plane's +40 s, quirk 3).
        deadlines: KeyDeadlines::from_base_with(drone.last_local_time, &state.config.key_timing),
        static_token,
        token: grant,
        subdomain: spawn.subdomain.clone(),
        max_idle_seconds: spawn.max_idle_seconds,
        lifetime_limit_seconds: spawn.lifetime_limit_seconds,
    };
    match state.store.insert_backend_with_key(new).await? {
        Acquire::Acquired { fencing_token, .. } => {
            tracing::info!(backend = %id, drone = %drone.name, %cluster, fencing_token, "Backend scheduled");
        }
        Acquire::KeyHeld => return Err(ConnectError::FailedToAcquireKey),
        Acquire::BackendIdTaken if spawn.id.is_some() => {
            return Err(ConnectError::BackendIdTaken(id));
        }
        // A collision of two random ids: astronomically unlikely, but a retry fixes it.
        Acquire::BackendIdTaken => return Err(ConnectError::FailedToAcquireKey),
    }
    Ok(ConnectResponse {
        url: connection_url(&cluster, spawn.subdomain.as_deref(), &token),
        status_url: state.status_url(&id),
        backend_id: id,
        spawned: true,
        status: BackendStatus::Scheduled,
        token,
        subdomain: spawn.subdomain.clone(),
        secret_token,
        drone: Some(drone.name),
        warm: false,
    })
}

/// The answer for an existing backend: the key's holder (`claimed: false`), or a warm backend just
/// claimed for the key (a new backend for it, already ready).
async fn backend_response(
    state: &AppState,
    request: &ConnectRequest,
    backend: BackendRow,
    claimed: bool,
) -> Result<ConnectResponse, ConnectError> {
    let issued = issue_token(state, request, &backend.id, backend.static_token.clone()).await?;
    Ok(respond(state, backend, claimed, issued))
}

/// The answer for an existing backend, with the token issued for this request.
fn respond(
    state: &AppState,
    backend: BackendRow,
    claimed: bool,
    (token, secret_token): (ConnectionToken, Option<SecretToken>),
) -> ConnectResponse {
    ConnectResponse {
        url: connection_url(&backend.cluster, backend.subdomain.as_deref(), &token),
        status_url: state.status_url(&backend.id),
        backend_id: backend.id,
        spawned: claimed,
        status: backend.state.status(),
        token,
        subdomain: backend.subdomain,
        secret_token,
        drone: claimed.then_some(backend.drone),
        warm: claimed,
    }
}

/// The backend's static token (no secret), or a new dynamic token for this request's user.
async fn issue_token(
    state: &AppState,
    request: &ConnectRequest,
    backend: &BackendId,
    static_token: Option<ConnectionToken>,
) -> Result<(ConnectionToken, Option<SecretToken>), ConnectError> {
    if let Some(token) = static_token {
        return Ok((token, None));
    }
    let grant = token_grant(request);
    state
        .store
        .insert_token(grant.for_backend(backend.clone()))
        .await?;
    Ok((grant.token, Some(grant.secret)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(v: serde_json::Value) -> ConnectRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn validation() {
        let ok = request(json!({"spawn_config": {"executable": {"command": ["x"]},
            "subdomain": "abc", "max_idle_seconds": 1, "lifetime_limit_seconds": 5}}));
        assert!(validate(&ok).is_ok());
        for bad in [
            json!({"spawn_config": {"executable": {"command": ["x"]}, "subdomain": "-a"}}),
            json!({"spawn_config": {"executable": {"command": ["x"]}, "max_idle_seconds": 0}}),
            json!({"spawn_config": {"executable": {"command": ["x"]}, "lifetime_limit_seconds": -4}}),
            json!({"key": {"name": "k", "namespace": "a\u{0}b"}}),
            json!({"key": {"name": "k", "tag": "x\n"}}),
        ] {
            assert!(
                matches!(
                    validate(&request(bad.clone())),
                    Err(ConnectError::InvalidRequest(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn retryable_errors() {
        assert!(ConnectError::FailedToRemoveKey.is_retryable());
        assert!(ConnectError::FailedToAcquireKey.is_retryable());
        assert!(!ConnectError::TagMismatch.is_retryable());
        assert!(!ConnectError::NoDroneAvailable.is_retryable());
    }
}
