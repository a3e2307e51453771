//! Store suite cases of warm pools (mounted in `suite`, whose fixtures they use).

use crate::suite::{assert_held_by, cluster, controller, key, make_ready, ready_drone};
use crate::Harness;
use hangar_store::*;
use hangar_types::executable::Executable;
use hangar_types::protocol::{BackendAction, KeyDeadlines};
use hangar_types::timing::UNHEALTHY_AFTER;
use hangar_types::token::ConnectionToken;
use hangar_types::warm_pool::{WarmPool, WarmPoolConfig};
use hangar_types::{
    BackendId, BackendStatus, Millis, TerminationKind, TerminationReason, WarmPoolName,
};
use serde_json::json;
use std::time::Duration;

fn pool_name(name: &str) -> WarmPoolName {
    name.parse().unwrap()
}

pub(crate) fn warm_config(size: u32, command: &str) -> WarmPoolConfig {
    WarmPoolConfig {
        cluster: None,
        pool: String::new(),
        size,
        executable: Executable::from_json(&json!({"command": [command]})).unwrap(),
        max_age_seconds: None,
        claim_path: None,
    }
}

pub(crate) async fn put(store: &dyn Store, name: &str, config: &WarmPoolConfig) -> WarmPoolRow {
    store
        .put_warm_pool(&pool_name(name), &cluster(), config)
        .await
        .unwrap()
}

fn new_warm(pool: &WarmPoolRow, drone: NodeId) -> NewWarmBackend {
    NewWarmBackend {
        id: BackendId::random(),
        pool: pool.api.name.clone(),
        generation: pool.generation,
        cluster: cluster(),
        drone_pool: String::new(),
        drone,
        executable: pool.api.executable.clone(),
        deadlines: KeyDeadlines::from_base(Millis(1_000)),
    }
}

/// Inserts an unclaimed backend or panics; returns its id.
pub(crate) async fn insert_warm(store: &dyn Store, pool: &WarmPoolRow, drone: NodeId) -> BackendId {
    let new = new_warm(pool, drone);
    let id = new.id.clone();
    match store.insert_warm_backend(new).await.unwrap() {
        WarmInsert::Inserted { action } => assert_eq!(action.backend_id, id),
        other => panic!("expected Inserted, got {other:?}"),
    }
    id
}

/// `pool` as stored now, with its counts.
pub(crate) async fn pool_counts(store: &dyn Store, pool: &WarmPoolRow) -> WarmPool {
    store.warm_pool(&pool.api.name).await.unwrap().unwrap().api
}

pub(crate) fn warm_claim(pool: &str, key_name: &str) -> WarmClaim {
    WarmClaim {
        pool: pool_name(pool),
        key: key(key_name),
        static_token: None,
        subdomain: None,
        max_idle_seconds: None,
        lifetime_limit_seconds: None,
        max_heartbeat_age: UNHEALTHY_AFTER,
        on_controller: None,
    }
}

/// A ready drone `dr-one` and the warm pool `p` of `size` backends (command `a`).
async fn drone_and_pool(store: &dyn Store, size: u32) -> (NodeId, WarmPoolRow) {
    let drone = ready_drone(store, "dr-one", "").await;
    (drone, put(store, "p", &warm_config(size, "a")).await)
}

/// Claims a backend of a warm pool (see [`Store::claim_warm_backend`]).
async fn claim_warm(store: &dyn Store, claim: WarmClaim) -> WarmClaimOutcome {
    store.claim_warm_backend(claim).await.unwrap()
}

/// A ready unclaimed backend of `pool` on `drone`.
pub(crate) async fn ready_warm(store: &dyn Store, pool: &WarmPoolRow, drone: NodeId) -> BackendId {
    let id = insert_warm(store, pool, drone).await;
    make_ready(store, &id).await;
    id
}

/// The names of the warm pools, as listed.
async fn pool_names(store: &dyn Store) -> Vec<String> {
    let pools = store.warm_pools().await.unwrap();
    pools.iter().map(|p| p.api.name.to_string()).collect()
}

pub async fn warm_pool_put_list_delete(h: Harness) {
    let store = &*h.store;
    assert!(store.warm_pools().await.unwrap().is_empty());
    let first = put(store, "notebooks", &warm_config(3, "a")).await;
    assert_eq!(
        (
            first.api.size,
            first.api.ready,
            first.api.starting,
            first.api.claimed
        ),
        (3, 0, 0, 0)
    );
    assert_eq!(first.api.cluster, cluster());
    assert_eq!(first.api.executable, warm_config(3, "a").executable);

    // A resize keeps the generation; another executable starts a new one.
    let mut resized = warm_config(5, "a");
    resized.max_age_seconds = Some(60);
    let second = put(store, "notebooks", &resized).await;
    assert_eq!((second.api.size, second.api.max_age_seconds), (5, Some(60)));
    assert_eq!(second.generation, first.generation);
    let third = put(store, "notebooks", &warm_config(5, "b")).await;
    assert!(third.generation > second.generation);

    put(store, "games", &warm_config(1, "a")).await;
    assert_eq!(pool_names(store).await, ["games", "notebooks"]);
    assert_eq!(
        store.warm_pool(&pool_name("notebooks")).await.unwrap(),
        Some(third)
    );
    assert!(store
        .delete_warm_pool(&pool_name("notebooks"))
        .await
        .unwrap());
    assert!(!store
        .delete_warm_pool(&pool_name("notebooks"))
        .await
        .unwrap());
    assert_eq!(
        store.warm_pool(&pool_name("notebooks")).await.unwrap(),
        None
    );
    assert_eq!(pool_names(store).await, ["games"]);
}

pub async fn warm_backends_fill_up_to_size(h: Harness) {
    let store = &*h.store;
    let (drone, pool) = drone_and_pool(store, 2).await;
    let a = insert_warm(store, &pool, drone).await;
    let b = insert_warm(store, &pool, drone).await;
    assert_eq!(
        store
            .insert_warm_backend(new_warm(&pool, drone))
            .await
            .unwrap(),
        WarmInsert::Full
    );
    let mut stale = new_warm(&pool, drone);
    stale.generation -= 1;
    assert_eq!(
        store.insert_warm_backend(stale).await.unwrap(),
        WarmInsert::PoolChanged
    );
    let mut unknown = new_warm(&pool, drone);
    unknown.pool = pool_name("nope");
    assert_eq!(
        store.insert_warm_backend(unknown).await.unwrap(),
        WarmInsert::PoolChanged
    );

    // Spawned without a key: no key row, fencing token 0; renewals are granted all the same.
    let pending = store.pending_actions(drone, 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    match &pending[0].action {
        BackendAction::Spawn { key, .. } => assert_eq!(key.token, 0),
        other => panic!("expected a spawn, got {other:?}"),
    }
    let row = store.backend(&a).await.unwrap().unwrap();
    let placeholder = KeyRef::from(&row.key);
    assert_eq!(
        store.key_lookup(&placeholder).await.unwrap(),
        KeyLookup::Missing
    );
    assert!(store.renew_key(&a).await.unwrap());

    make_ready(store, &a).await;
    let counted = pool_counts(store, &pool).await;
    assert_eq!((counted.ready, counted.starting), (1, 1));
    let unclaimed = store.unclaimed_backends().await.unwrap();
    // Oldest first; created within one millisecond, they are ordered by id.
    let mut ids: Vec<&BackendId> = unclaimed.iter().map(|u| &u.id).collect();
    ids.sort();
    let mut expected = [&a, &b];
    expected.sort();
    assert_eq!(ids, expected);
    assert!(unclaimed
        .iter()
        .all(|u| u.pool == pool.api.name && u.generation == pool.generation && !u.drone_draining));

    // Never swept as idle, however long it waits.
    h.advance(Duration::from_secs(100_000));
    assert!(store.sweep_candidates(drone).await.unwrap().is_empty());

    // One asked to terminate no longer counts, gets no renewals, and makes room.
    store
        .queue_terminate(&a, TerminationKind::Soft, TerminationReason::Swept)
        .await
        .unwrap()
        .unwrap();
    assert!(!store.renew_key(&a).await.unwrap());
    let counted = pool_counts(store, &pool).await;
    assert_eq!((counted.ready, counted.starting), (0, 1));
    assert_eq!(store.unclaimed_backends().await.unwrap().len(), 1);
    insert_warm(store, &pool, drone).await;

    // A new generation: the old backends no longer count, new ones fill it.
    let changed = put(store, "p", &warm_config(2, "b")).await;
    assert_eq!((changed.api.ready, changed.api.starting), (0, 0));
    insert_warm(store, &changed, drone).await;
    insert_warm(store, &changed, drone).await;
    assert_eq!(store.unclaimed_backends().await.unwrap().len(), 4);
}

pub async fn warm_claim_gives_one_key_once(h: Harness) {
    let store = &*h.store;
    let (drone, pool) = drone_and_pool(store, 3).await;
    let first = ready_warm(store, &pool, drone).await;
    let starting = insert_warm(store, &pool, drone).await;

    let mut claim = warm_claim("p", "room");
    claim.max_idle_seconds = Some(5);
    claim.subdomain = Some("sub".into());
    claim.static_token = Some(ConnectionToken::random_static());
    let backend = match claim_warm(store, claim.clone()).await {
        WarmClaimOutcome::Claimed { backend } => backend,
        other => panic!("expected Claimed, got {other:?}"),
    };
    assert_eq!(backend.id, first);
    assert_eq!(backend.key, claim.key);
    assert!(backend.fencing_token > 0);
    assert_eq!(backend.state.status(), BackendStatus::Ready);
    assert_eq!(backend.subdomain.as_deref(), Some("sub"));
    assert_eq!(backend.static_token, claim.static_token);
    assert_eq!(backend.max_idle_seconds, Some(5));
    assert_held_by(store, &KeyRef::from(&claim.key), &first).await;
    assert!(store.renew_key(&first).await.unwrap());
    let ids: Vec<BackendId> = store
        .unclaimed_backends()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&starting));
    let counted = pool_counts(store, &pool).await;
    assert_eq!(
        (counted.ready, counted.starting, counted.claimed),
        (0, 1, 1)
    );

    // Nothing ready: empty, and not counted.
    let other = warm_claim("p", "other");
    assert_eq!(
        claim_warm(store, other.clone()).await,
        WarmClaimOutcome::Empty
    );
    assert_eq!(
        claim_warm(store, warm_claim("nope", "x")).await,
        WarmClaimOutcome::Empty
    );
    // A key already held: refused, and the backend stays unclaimed.
    make_ready(store, &starting).await;
    assert_eq!(
        claim_warm(store, claim.clone()).await,
        WarmClaimOutcome::KeyHeld
    );
    let counted = pool_counts(store, &pool).await;
    assert_eq!((counted.ready, counted.claimed), (1, 1));

    // A claimed backend is an ordinary one: idle from the claim on, swept by its own limits.
    h.advance(Duration::from_secs(6));
    assert_eq!(store.sweep_candidates(drone).await.unwrap(), [first]);
    match claim_warm(store, other).await {
        WarmClaimOutcome::Claimed { backend } => assert_eq!(backend.id, starting),
        got => panic!("expected Claimed, got {got:?}"),
    }
}

pub async fn warm_claim_skips_draining_and_stale(h: Harness) {
    let store = &*h.store;
    let draining = ready_drone(store, "dr-drain", "").await;
    let pool = put(store, "p", &warm_config(3, "a")).await;
    let on_draining = ready_warm(store, &pool, draining).await;
    assert_eq!(
        store
            .drain_drone(&cluster(), &"dr-drain".parse().unwrap())
            .await
            .unwrap(),
        Some(true)
    );
    assert_eq!(
        claim_warm(store, warm_claim("p", "k1")).await,
        WarmClaimOutcome::Empty
    );
    let unclaimed = store.unclaimed_backends().await.unwrap();
    assert_eq!(unclaimed.len(), 1);
    assert_eq!(unclaimed[0].id, on_draining);
    assert!(unclaimed[0].drone_draining);

    // Backends of an older generation are never claimed.
    let drone = ready_drone(store, "dr-two", "").await;
    ready_warm(store, &pool, drone).await;
    put(store, "p", &warm_config(3, "b")).await;
    assert_eq!(
        claim_warm(store, warm_claim("p", "k1")).await,
        WarmClaimOutcome::Empty
    );
    // Nor on a drone without a recent heartbeat.
    let pool = store.warm_pool(&pool.api.name).await.unwrap().unwrap();
    ready_warm(store, &pool, drone).await;
    h.advance(UNHEALTHY_AFTER + Duration::from_secs(1));
    assert_eq!(
        claim_warm(store, warm_claim("p", "k1")).await,
        WarmClaimOutcome::Empty
    );
    store.drone_heartbeat(drone, Millis(2_000)).await.unwrap();
    // A claim with a hook takes only backends whose drone's session is on the claiming controller.
    let elsewhere = WarmClaim {
        on_controller: Some("co-elsewhere".parse().unwrap()),
        ..warm_claim("p", "k1")
    };
    assert_eq!(claim_warm(store, elsewhere).await, WarmClaimOutcome::Empty);
    let here = WarmClaim {
        on_controller: Some(controller()),
        ..warm_claim("p", "k1")
    };
    assert!(matches!(
        claim_warm(store, here).await,
        WarmClaimOutcome::Claimed { .. }
    ));
}

/// Concurrent claims (more than there are backends) each get a distinct backend or nothing.
pub async fn concurrent_claims_take_distinct_backends(h: Harness) {
    let (drone, pool) = drone_and_pool(&*h.store, 10).await;
    for _ in 0..10 {
        ready_warm(&*h.store, &pool, drone).await;
    }
    let claims = (0..25).map(|i| {
        let store = h.store.clone();
        tokio::spawn(async move {
            store
                .claim_warm_backend(warm_claim("p", &format!("k{i}")))
                .await
                .unwrap()
        })
    });
    let outcomes: Vec<WarmClaimOutcome> = futures_join(claims).await;
    let mut claimed: Vec<BackendId> = outcomes
        .iter()
        .filter_map(|o| match o {
            WarmClaimOutcome::Claimed { backend } => Some(backend.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(claimed.len(), 10, "{outcomes:?}");
    claimed.sort();
    claimed.dedup();
    assert_eq!(claimed.len(), 10);
    let counted = pool_counts(&*h.store, &pool).await;
    assert_eq!((counted.ready, counted.claimed), (0, 10));
}

/// Awaits every task.
pub(crate) async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}
