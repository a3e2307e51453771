//! Warm pools: claiming an unclaimed backend at connect time ([`claim`]) and keeping every pool filled
//! ([`run_warm_pools`]).
//!
//! The store decides every race: a claim is one transaction that gives one warm backend one key, and
//! an insert never overfills a pool. So every controller runs the fill loop, and whichever acts first
//! wins; the others find the pool full or the stale backend already asked to terminate.
//!
//! Which pool a connect may claim from is looked up in this controller's copy of the pool list
//! ([`WarmPools`]), refreshed by every fill pass and by this controller's own changes, so a connect
//! that finds no pool costs no store query. Another controller's change is seen at the next pass.
//!
//! A pool with `claim_path` completes each claim with a hook ([`hook`]): a refused hook kills the
//! backend (the drone confirms it `terminated`, which frees the key) and the connect spawns cold.

mod hook;

pub use hook::ClaimHooks;
use hook::HookResult;

use crate::api::AppState;
use crate::connect::ConnectError;
use crate::scheduler;
use hangar_store::{
    BackendRow, NewWarmBackend, Store, StoreResult, UnclaimedBackend, WarmClaim, WarmClaimOutcome,
    WarmInsert, WarmPoolRow,
};
use hangar_types::api::{KeyConfig, SpawnConfig};
use hangar_types::protocol::{ClaimHookOutcome, KeyDeadlines};
use hangar_types::timing::UNHEALTHY_AFTER;
use hangar_types::token::ConnectionToken;
use hangar_types::{
    BackendId, BackendStatus, ClusterName, TerminationKind, TerminationReason, WarmPoolName,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often every pool is checked (besides right after a claim or a change made here).
pub const FILL_INTERVAL: Duration = Duration::from_secs(2);

/// Longest wait of a pool whose backends keep failing to start (see [`fill_backoff`]).
pub const MAX_FILL_BACKOFF: Duration = Duration::from_secs(300);

/// At most this many backends are started per pool and pass, so a large pool fills in steps instead
/// of flooding the drones at once.
const MAX_STARTS_PER_PASS: u32 = 32;

/// This controller's view of the warm pools, and the fill loop's wake-up.
#[derive(Debug, Default, Clone)]
pub struct WarmPools {
    pools: Arc<RwLock<Vec<WarmPoolRow>>>,
    wake: Arc<Notify>,
    /// Claim hooks of connects on this controller waiting for their drone.
    pub(crate) hooks: ClaimHooks,
}

/// A pool a spawn may claim from.
struct Matching {
    name: WarmPoolName,
    claim_path: Option<String>,
}

impl WarmPools {
    /// Replaces the pool list.
    pub fn set(&self, pools: Vec<WarmPoolRow>) {
        match self.pools.write() {
            Ok(mut p) => *p = pools,
            Err(poisoned) => *poisoned.into_inner() = pools,
        }
    }

    /// Adds or replaces one pool, or removes it (`None`).
    pub fn update(&self, name: &WarmPoolName, pool: Option<WarmPoolRow>) {
        let mut pools = match self.pools.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools.retain(|p| &p.api.name != name);
        pools.extend(pool);
    }

    /// Whether a spawn may claim from a warm pool (one matches; it may be empty).
    pub(crate) fn may_claim(&self, cluster: &ClusterName, spawn: &SpawnConfig) -> bool {
        spawn.id.is_none() && self.matching(cluster, spawn).is_some()
    }

    /// The pool a spawn may claim from: same cluster, drone pool and executable. The executable's
    /// `env` must be equal too, unless the pool has a claim hook (which delivers the connect's env):
    /// without one, a backend would run with an env the connect did not ask for.
    fn matching(&self, cluster: &ClusterName, spawn: &SpawnConfig) -> Option<Matching> {
        let pools = match self.pools.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools
            .iter()
            .map(|p| &p.api)
            .find(|p| {
                &p.cluster == cluster
                    && p.pool == spawn.pool
                    && match p.claim_path {
                        Some(_) => p.executable.eq_except_env(&spawn.executable),
                        None => p.executable == spawn.executable,
                    }
            })
            .map(|p| Matching {
                name: p.name.clone(),
                claim_path: p.claim_path.clone(),
            })
    }

    /// Runs a fill pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Claims a ready warm backend for a spawn, if a pool matches and has one. `None`: spawn cold.
pub(crate) async fn claim(
    state: &AppState,
    key: &KeyConfig,
    spawn: &SpawnConfig,
    cluster: &ClusterName,
    static_token: Option<&ConnectionToken>,
) -> Result<Option<BackendRow>, ConnectError> {
    // A client-chosen backend id cannot be a warm backend's.
    if spawn.id.is_some() {
        return Ok(None);
    }
    let Some(Matching {
        name: pool,
        claim_path,
    }) = state.warm.matching(cluster, spawn)
    else {
        return Ok(None);
    };
    let claim = WarmClaim {
        pool: pool.clone(),
        key: key.clone(),
        static_token: static_token.cloned(),
        subdomain: spawn.subdomain.clone(),
        max_idle_seconds: spawn.max_idle_seconds,
        lifetime_limit_seconds: spawn.lifetime_limit_seconds,
        max_heartbeat_age: UNHEALTHY_AFTER,
        // The hook goes over the drone's session, which must be here.
        on_controller: claim_path.as_ref().map(|_| state.config.name.clone()),
    };
    let outcome = state.store.claim_warm_backend(claim).await?;
    let metrics = &state.prometheus.warm;
    let backend = match outcome {
        WarmClaimOutcome::Claimed { backend } => backend,
        WarmClaimOutcome::Empty => {
            metrics.record_claim(&pool, ClaimOutcome::Empty);
            tracing::debug!(pool = %pool, "Warm pool has no ready backend; spawning cold");
            state.warm.wake();
            return Ok(None);
        }
        WarmClaimOutcome::KeyHeld => {
            metrics.record_claim(&pool, ClaimOutcome::KeyHeld);
            return Err(ConnectError::FailedToAcquireKey);
        }
    };
    state.warm.wake();
    if let Some(path) = claim_path {
        let hooks = &state.warm.hooks;
        let body = hook::hook_body(&backend, key, spawn);
        match hooks.run(&state.drone_links, &backend, &path, body).await {
            HookResult::Accepted => {}
            HookResult::Refused(outcome) => {
                metrics.record_claim(&pool, ClaimOutcome::HookRefused);
                return refused(state, &backend, outcome).await;
            }
            HookResult::Unanswered => {
                metrics.record_claim(&pool, ClaimOutcome::HookUnanswered);
                tracing::warn!(backend = %backend.id, pool = %pool, drone = %backend.drone,
                    "Claim hook unanswered; terminating the backend");
                return unconfirmed(state, &backend).await;
            }
        }
    }
    metrics.record_claim(&pool, ClaimOutcome::Claimed);
    tracing::info!(backend = %backend.id, pool = %pool, drone = %backend.drone,
        fencing_token = backend.fencing_token, "Warm backend claimed");
    Ok(Some(backend))
}

/// A refused claim hook: the drone killed the backend. Recording its final state frees the key, so
/// the connect spawns cold (`None`); without a confirmed end the key stays held and the connect fails.
async fn refused(
    state: &AppState,
    backend: &BackendRow,
    outcome: ClaimHookOutcome,
) -> Result<Option<BackendRow>, ConnectError> {
    let ClaimHookOutcome::Refused {
        message,
        terminated,
    } = outcome
    else {
        return Ok(Some(backend.clone()));
    };
    tracing::warn!(backend = %backend.id, drone = %backend.drone, %message,
        "Claim hook refused; spawning cold");
    match terminated {
        Some(end) if end.status() == BackendStatus::Terminated => {
            state.store.record_backend_state(&backend.id, &end).await?;
            Ok(None)
        }
        _ => unconfirmed(state, backend).await,
    }
}

/// A claimed backend whose end the drone did not confirm: it keeps the key until it is terminated
/// (asked here), so the connect cannot spawn cold and fails.
async fn unconfirmed(
    state: &AppState,
    backend: &BackendRow,
) -> Result<Option<BackendRow>, ConnectError> {
    let (kind, reason) = (TerminationKind::Hard, TerminationReason::InternalError);
    state
        .store
        .queue_terminate(&backend.id, kind, reason)
        .await?;
    Err(ConnectError::WarmClaimUnanswered(backend.id.clone()))
}

/// Keeps every warm pool filled until `cancel` fires. Store errors are logged; the next pass retries.
pub async fn run_warm_pools(state: AppState, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(FILL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = state.warm.wake.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = wake.notified() => {}
        }
        if let Err(e) = fill_once(&state).await {
            tracing::warn!(error = %e, "Warm pool pass failed");
        }
    }
}

/// One pass over every pool: replaces unclaimed backends that must go, then starts what is missing.
pub async fn fill_once(state: &AppState) -> StoreResult<()> {
    let store = state.store.as_ref();
    let pools = store.warm_pools().await?;
    state.warm.set(pools.clone());
    state.prometheus.warm.set_pools(&pools);
    let mut live: HashMap<WarmPoolName, u32> = HashMap::new();
    // Oldest first: a shrunk pool keeps its oldest backends, the likeliest to be ready.
    for backend in store.unclaimed_backends().await? {
        let pool = pools.iter().find(|p| p.api.name == backend.pool);
        let kept = live.get(&backend.pool).copied().unwrap_or(0);
        let retire = retire_reason(pool, &backend).or_else(|| {
            pool.is_some_and(|p| kept >= p.api.size)
                .then_some("its warm pool shrank")
        });
        match retire {
            Some(why) => {
                let kind = TerminationKind::Soft;
                if store
                    .queue_terminate(&backend.id, kind, TerminationReason::Swept)
                    .await?
                    .is_some()
                {
                    tracing::info!(backend = %backend.id, pool = %backend.pool, why, "Replacing warm backend");
                }
            }
            None => *live.entry(backend.pool).or_default() += 1,
        }
    }
    for pool in &pools {
        let have = live.get(&pool.api.name).copied().unwrap_or(0);
        let missing = pool.api.size.saturating_sub(have).min(MAX_STARTS_PER_PASS);
        if missing > 0 && backing_off(pool) {
            continue;
        }
        for _ in 0..missing {
            if !start_one(state, pool).await? {
                break;
            }
        }
    }
    Ok(())
}

/// How long a pool waits after its last failed start before starting again: 2 s, doubling with
/// every failed start in a row, at most [`MAX_FILL_BACKOFF`]. Zero without failures.
pub fn fill_backoff(failed_starts: u64) -> Duration {
    match failed_starts {
        0 => Duration::ZERO,
        n => {
            let doublings = u32::try_from(n - 1).unwrap_or(u32::MAX).min(16);
            FILL_INTERVAL
                .saturating_mul(1 << doublings)
                .min(MAX_FILL_BACKOFF)
        }
    }
}

/// Whether `pool` must not start backends yet because its last ones failed to start.
fn backing_off(pool: &WarmPoolRow) -> bool {
    let Some(age) = pool.last_failed_start_age else {
        return false;
    };
    let failed_starts = pool.api.failed_starts;
    let wait = fill_backoff(failed_starts);
    if age < wait {
        tracing::debug!(pool = %pool.api.name, failed_starts, ?wait,
            "Warm pool backing off after failed starts");
        return true;
    }
    if failed_starts > 0 {
        tracing::warn!(pool = %pool.api.name, failed_starts, waited = ?wait,
            "Warm pool backends keep failing to start; trying again");
    }
    false
}

/// Why an unclaimed backend must be terminated, if it must.
fn retire_reason(pool: Option<&WarmPoolRow>, backend: &UnclaimedBackend) -> Option<&'static str> {
    let Some(pool) = pool else {
        return Some("its warm pool was deleted");
    };
    if pool.generation != backend.generation {
        return Some("its warm pool changed");
    }
    if backend.drone_draining {
        return Some("its drone is draining");
    }
    if pool
        .api
        .max_age_seconds
        .is_some_and(|max| backend.age > Duration::from_secs(u64::from(max)))
    {
        return Some("it reached the pool's max_age_seconds");
    }
    None
}

/// Starts one unclaimed backend of `pool`; `false` when no more can be started now.
async fn start_one(state: &AppState, row: &WarmPoolRow) -> StoreResult<bool> {
    let store: &dyn Store = state.store.as_ref();
    let pool = &row.api;
    let kind = pool.executable.kind();
    let best_of = state.config.best_of;
    let Some(drone) =
        scheduler::pick_drone(store, &pool.cluster, &pool.pool, kind, best_of).await?
    else {
        tracing::debug!(pool = %pool.name, "No drone for a warm backend");
        return Ok(false);
    };
    let new = NewWarmBackend {
        id: BackendId::random(),
        pool: pool.name.clone(),
        generation: row.generation,
        cluster: pool.cluster.clone(),
        drone_pool: pool.pool.clone(),
        drone: drone.id,
        executable: pool.executable.clone(),
        deadlines: KeyDeadlines::from_base_with(drone.last_local_time, &state.config.key_timing),
    };
    let id = new.id.clone();
    match store.insert_warm_backend(new).await? {
        WarmInsert::Inserted { .. } => {
            tracing::info!(backend = %id, pool = %pool.name, drone = %drone.name, "Warm backend scheduled");
            Ok(true)
        }
        WarmInsert::Full | WarmInsert::PoolChanged => Ok(false),
    }
}

/// How a claim tried by a connect ended (the `outcome` label).
#[derive(Debug, Clone, Copy)]
enum ClaimOutcome {
    Claimed,
    /// No ready backend: spawned cold.
    Empty,
    KeyHeld,
    /// The claim hook was refused (non-2xx, timeout): the backend was killed, spawned cold.
    HookRefused,
    /// The drone did not answer the claim hook: the backend is being killed, the connect failed.
    HookUnanswered,
}

/// Label set of the warm pool series.
type PoolLabels = [(&'static str, String); 2];

/// `hangar_warm_pool_backends{pool,status}` (unclaimed backends at this controller's last pass) and
/// `hangar_warm_claims_total{pool,outcome}` (claims tried by connects on this controller).
#[derive(Debug, Default)]
pub struct WarmMetrics {
    backends: Family<PoolLabels, Gauge>,
    claims: Family<PoolLabels, Counter>,
}

impl WarmMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "warm_pool_backends",
            "Unclaimed warm-pool backends by pool and status (ready, starting), as of this \
             controller's last fill pass",
            self.backends.clone(),
        );
        registry.register(
            "warm_claims",
            "Warm-pool claims tried by connects on this controller, by pool and outcome \
             (claimed, empty, key_held, hook_refused, hook_unanswered)",
            self.claims.clone(),
        );
    }

    fn set_pools(&self, pools: &[WarmPoolRow]) {
        self.backends.clear();
        for pool in pools.iter().map(|p| &p.api) {
            for (status, n) in [("ready", pool.ready), ("starting", pool.starting)] {
                let labels = [
                    ("pool", pool.name.to_string()),
                    ("status", status.to_string()),
                ];
                self.backends
                    .get_or_create(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    fn record_claim(&self, pool: &WarmPoolName, outcome: ClaimOutcome) {
        let outcome = match outcome {
            ClaimOutcome::Claimed => "claimed",
            ClaimOutcome::Empty => "empty",
            ClaimOutcome::KeyHeld => "key_held",
            ClaimOutcome::HookRefused => "hook_refused",
            ClaimOutcome::HookUnanswered => "hook_unanswered",
        };
        let labels = [("pool", pool.to_string()), ("outcome", outcome.to_string())];
        self.claims.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::executable::Executable;
    use hangar_types::warm_pool::WarmPool;

    fn pool(max_age_seconds: Option<u32>) -> WarmPoolRow {
        WarmPoolRow {
            api: WarmPool {
                name: "p".parse().unwrap(),
                cluster: "c.example".parse().unwrap(),
                pool: String::new(),
                size: 2,
                executable: Executable::from_json(&serde_json::json!({"command": ["x"]})).unwrap(),
                max_age_seconds,
                claim_path: None,
                ready: 0,
                starting: 0,
                claimed: 0,
                failed_starts: 0,
            },
            generation: 7,
            last_failed_start_age: None,
        }
    }

    fn unclaimed(generation: i64, drone_draining: bool, age_secs: u64) -> UnclaimedBackend {
        UnclaimedBackend {
            id: BackendId::random(),
            pool: "p".parse().unwrap(),
            generation,
            drone_draining,
            age: Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn fill_backs_off_exponentially_after_failed_starts() {
        assert_eq!(fill_backoff(0), Duration::ZERO);
        assert_eq!(fill_backoff(1), FILL_INTERVAL);
        assert_eq!(fill_backoff(2), FILL_INTERVAL * 2);
        assert_eq!(fill_backoff(4), FILL_INTERVAL * 8);
        assert_eq!(fill_backoff(40), MAX_FILL_BACKOFF);
        let mut p = pool(None);
        assert!(!backing_off(&p));
        p.api.failed_starts = 3;
        p.last_failed_start_age = Some(Duration::from_secs(7));
        assert!(backing_off(&p));
        p.last_failed_start_age = Some(Duration::from_secs(8));
        assert!(!backing_off(&p));
    }

    #[test]
    fn retire_reasons() {
        let p = pool(Some(60));
        assert_eq!(retire_reason(Some(&p), &unclaimed(7, false, 10)), None);
        assert!(retire_reason(None, &unclaimed(7, false, 10)).is_some());
        assert!(retire_reason(Some(&p), &unclaimed(6, false, 10)).is_some());
        assert!(retire_reason(Some(&p), &unclaimed(7, true, 10)).is_some());
        assert!(retire_reason(Some(&p), &unclaimed(7, false, 61)).is_some());
        assert_eq!(
            retire_reason(Some(&pool(None)), &unclaimed(7, false, 1 << 30)),
            None
        );
    }
}
