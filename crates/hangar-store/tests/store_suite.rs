//! The store test suite. Every case in [`suite`] is an async fn over a [`Harness`] (a `dyn Store` plus a
//! way to move the store clock), so the same cases run against every implementation: the
//! `store_tests!` macro instantiates one `#[tokio::test]` per case for a store factory. It runs against
//! SQLite in memory, SQLite in a file, and PostgreSQL (a fresh database per test, on the server named by
//! `HANGAR_TEST_POSTGRES_URL`; see [`postgres`]).

// Test code: a failed unwrap is a failed test (clippy's in-test allowance does not cover helpers).
#![allow(clippy::unwrap_used)]

#[path = "store_suite/gathered_calls.rs"]
mod gathered_calls;
#[path = "store_suite/postgres.rs"]
mod postgres;
#[path = "store_suite/warm_pools.rs"]
mod warm_pools;

use hangar_store::sqlite::SqliteStore;
use hangar_store::Store;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Upper bound for one test case; nothing in the suite waits on a timer, so this is generous.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Work to do after a case, whether it passed or failed (dropping a test database).
pub type Teardown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A store under test and its clock controls.
pub struct Harness {
    pub store: Arc<dyn Store>,
    advance: Box<dyn Fn(Duration) + Send + Sync>,
    rewind: Box<dyn Fn(Duration) + Send + Sync>,
    /// Keeps whatever backs the store (a temp dir) alive for the test.
    _guard: Option<Box<dyn Send + Sync>>,
    /// Taken by [`run_case`] before the case runs. In a mutex only to make `Harness` `Sync`, so that a
    /// case can lend `&Harness` to a helper that awaits.
    teardown: std::sync::Mutex<Option<Teardown>>,
}

impl Harness {
    /// Moves the store clock forward.
    pub fn advance(&self, d: Duration) {
        (self.advance)(d)
    }
    /// Moves the store clock backwards (a wall clock stepped back).
    pub fn rewind(&self, d: Duration) {
        (self.rewind)(d)
    }
}

/// Sets up a harness (`None`: this store is not available here, the test is skipped), runs the case,
/// then the harness's teardown.
pub async fn run_case<S, C>(setup: impl FnOnce() -> S, case: impl FnOnce(Harness) -> C)
where
    S: Future<Output = Option<Harness>>,
    C: Future<Output = ()> + Send + 'static,
{
    let harness = tokio::time::timeout(TEST_TIMEOUT, setup())
        .await
        .expect("test setup timed out");
    let Some(mut harness) = harness else {
        return;
    };
    let teardown = harness
        .teardown
        .get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    run_then_teardown(case(harness), teardown).await;
}

/// Runs `case` with a timeout, then `teardown` even if the case failed, then reports the case's
/// outcome (re-raising its panic).
pub async fn run_then_teardown(
    case: impl Future<Output = ()> + Send + 'static,
    teardown: Option<Teardown>,
) {
    // A task, so that a panicking case still lets the teardown run.
    let outcome = tokio::time::timeout(TEST_TIMEOUT, tokio::spawn(case)).await;
    if let Some(teardown) = teardown {
        if tokio::time::timeout(TEST_TIMEOUT, teardown).await.is_err() {
            eprintln!("test teardown timed out");
        }
    }
    match outcome {
        Err(_) => panic!("test timed out"),
        Ok(Err(e)) => match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("test task failed: {e}"),
        },
        Ok(Ok(())) => {}
    }
}

fn sqlite_harness(store: SqliteStore, guard: Option<Box<dyn Send + Sync>>) -> Harness {
    let store = Arc::new(store);
    let (a, r) = (store.clone(), store.clone());
    Harness {
        store,
        advance: Box::new(move |d| a.advance_clock(d)),
        rewind: Box::new(move |d| r.rewind_clock(d)),
        _guard: guard,
        teardown: std::sync::Mutex::new(None),
    }
}

async fn sqlite_memory() -> Option<Harness> {
    Some(sqlite_harness(
        SqliteStore::in_memory().await.unwrap(),
        None,
    ))
}

async fn sqlite_file() -> Option<Harness> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hangar.db"))
        .await
        .unwrap();
    Some(sqlite_harness(store, Some(Box::new(dir))))
}

macro_rules! store_tests {
    ($factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                crate::run_case($factory, crate::suite::$case).await;
            }
        )*
    };
}

macro_rules! all_store_tests {
    ($factory:path) => {
        store_tests!($factory;
            key_lookup_missing_live_expired,
            renew_key_extends_lease,
            insert_backend_writes_everything,
            concurrent_acquire_has_one_winner,
            concurrent_spawns_are_answered_each,
            spawn_writes_its_token,
            backend_id_taken_writes_nothing,
            fencing_token_increases_across_acquisitions,
            fencing_token_increases_when_clock_goes_back,
            state_time_never_goes_back,
            state_recording_is_monotonic,
            states_recorded_together_in_order,
            terminated_releases_only_its_own_key,
            dynamic_token_resolution_follows_status,
            token_expiry_and_revocation,
            static_token_resolution,
            reuse_key_reuses_only_a_live_holder,
            reuse_key_of_a_static_token_backend_writes_nothing,
            concurrent_reuses_are_answered_each,
            a_failing_reuse_fails_only_its_own_caller,
            pending_actions_and_ack,
            drone_reports_are_stored_together,
            sweep_idle_backends,
            sweep_lifetime_limit,
            keepalive_reports_known_live_backends,
            connected_backends_are_not_idle,
            register_and_disconnect_with_takeover,
            drain_is_kept_across_reconnects,
            cluster_state_shape,
            schedulable_drones_filters,
            cleanup_deletes_old_rows,
            events_are_published_after_commit,
            schedulable_drones_require_a_live_controller,
            lost_backends_need_a_gone_drone_and_an_expired_lease,
            drone_live_backends_for_mark_lost,
            prevent_renew_refuses_later_renewals,
            drone_attachment_reports_the_session,
            drone_controller_names_the_session_holder_and_its_url,
            cert_lease_is_exclusive_renewable_and_expires,
            txt_record_belongs_to_the_lease_holder,
            http_challenges_belong_to_the_lease_holder,
            certificates_are_stored_and_published,
            dashboard_lists_clusters_and_recent_backends,
            list_backends_filters_by_status_cluster_and_key,
            warm_pool_put_list_delete,
            warm_backends_fill_up_to_size,
            warm_claim_gives_one_key_once,
            warm_claim_skips_draining_and_stale,
            concurrent_claims_take_distinct_backends,
        );
    };
}

mod sqlite_memory {
    use super::sqlite_memory;
    all_store_tests!(sqlite_memory);
}

mod sqlite_file {
    use super::sqlite_file;
    all_store_tests!(sqlite_file);
}

mod postgres_suite {
    use super::postgres::harness as postgres;
    all_store_tests!(postgres);
}

/// A file-backed store keeps its data across close and reopen.
#[tokio::test]
async fn sqlite_file_survives_reopen() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hangar.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let drone = suite::ready_drone(&store, "dr-one", "").await;
        let nb = suite::new_backend(drone, "reopen");
        let id = nb.id.clone();
        let first = suite::acquire(&store, nb.clone()).await.0;
        store.close().await;
        drop(store);

        let store = SqliteStore::open(&path).await.unwrap();
        let row = store
            .backend(&id)
            .await
            .unwrap()
            .expect("backend survives reopen");
        assert_eq!(row.fencing_token, first);
        let key = hangar_store::KeyRef::from(&nb.key);
        assert!(matches!(
            store.key_lookup(&key).await.unwrap(),
            hangar_store::KeyLookup::Live { .. }
        ));
        assert_eq!(store.pending_actions(drone, 10).await.unwrap().len(), 1);
        assert_eq!(store.backend_history(&id).await.unwrap().len(), 1);
        // Migrations are not re-applied destructively and fencing continues from the stored value.
        suite::terminate(&store, &id).await;
        let mut again = suite::new_backend(drone, "reopen");
        again.key = nb.key.clone();
        let second = suite::acquire(&store, again).await.0;
        assert!(second > first);
    })
    .await
    .expect("test timed out");
}

mod suite {
    pub use crate::warm_pools::*;

    use super::Harness;
    use hangar_store::*;
    use hangar_types::api::{ClusterState, KeyConfig};
    use hangar_types::executable::{Executable, ExecutorKind};
    use hangar_types::protocol::{BackendAction, KeyDeadlines, TokenHolder};
    use hangar_types::timing::{KEY_LEASE, UNHEALTHY_AFTER};
    use hangar_types::token::{ConnectionToken, SecretToken};
    use hangar_types::{
        BackendId, BackendState, BackendStatus, ClusterName, ControllerName, DroneName, Millis,
        NodeName, ProxyName, TerminationKind, TerminationReason,
    };
    use serde_json::json;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::sync::broadcast::error::TryRecvError;

    // ---- fixtures ------------------------------------------------------------------------------

    pub fn cluster() -> ClusterName {
        "c1.test:9090".parse().unwrap()
    }

    pub(crate) fn controller() -> ControllerName {
        "co-test".parse().unwrap()
    }

    fn addr() -> SocketAddr {
        "10.0.0.7:31000".parse().unwrap()
    }

    fn registration(name: &str, pool: &str, executors: &[ExecutorKind]) -> DroneRegistration {
        DroneRegistration {
            cluster: cluster(),
            name: name.parse().unwrap(),
            pool: pool.to_string(),
            executors: executors.to_vec(),
            controller: controller(),
            version: "0.1.0".into(),
        }
    }

    /// Registers a drone; its controller is recorded alive first (drones are only schedulable under a
    /// live controller).
    async fn register(store: &dyn Store, reg: &DroneRegistration) -> (NodeId, SessionId) {
        store
            .controller_heartbeat(&reg.controller, true)
            .await
            .unwrap();
        match store.register_drone(reg).await.unwrap() {
            Registration::Registered { node, session } => (node, session),
            other => panic!("registration refused: {other:?}"),
        }
    }

    /// Registers a proxy of [`cluster`]; returns its node and the new session.
    async fn register_proxy(store: &dyn Store, name: &str) -> (NodeId, SessionId) {
        let name: ProxyName = name.parse().unwrap();
        match store
            .register_proxy(&cluster(), &name, &controller(), "0.1.0")
            .await
            .unwrap()
        {
            Registration::Registered { node, session } => (node, session),
            other => panic!("proxy not registered: {other:?}"),
        }
    }

    pub async fn proxy_node(store: &dyn Store, name: &str) -> NodeId {
        register_proxy(store, name).await.0
    }

    /// The attached nodes of [`cluster`].
    async fn attached(store: &dyn Store) -> ClusterState {
        store.cluster_state(&cluster()).await.unwrap()
    }

    /// The controller holding the session of drone `name` of [`cluster`], and its URL.
    async fn controller_of(store: &dyn Store, name: &DroneName) -> Option<DroneController> {
        store.drone_controller(&cluster(), name).await.unwrap()
    }

    /// The session of drone `name` of [`cluster`] as [`Store::drone_attachment`] reports it.
    async fn attachment_of(store: &dyn Store, name: &DroneName) -> Option<DroneAttachment> {
        store.drone_attachment(&cluster(), name).await.unwrap()
    }

    /// A registered drone offering process and docker, with a heartbeat.
    pub async fn ready_drone(store: &dyn Store, name: &str, pool: &str) -> NodeId {
        let reg = registration(name, pool, &[ExecutorKind::Process, ExecutorKind::Docker]);
        let (node, _) = register(store, &reg).await;
        store.drone_heartbeat(node, Millis(1_000)).await.unwrap();
        node
    }

    pub(crate) fn key(name: &str) -> KeyConfig {
        KeyConfig {
            name: name.parse().unwrap(),
            namespace: "ns".into(),
            tag: "t1".into(),
        }
    }

    pub fn new_backend(drone: NodeId, key_name: &str) -> NewBackend {
        NewBackend {
            id: BackendId::random(),
            key: key(key_name),
            cluster: cluster(),
            pool: String::new(),
            drone,
            executable: Executable::from_json(&json!({"command": ["sleep", "100"]})).unwrap(),
            deadlines: KeyDeadlines::from_base(Millis(1_000)),
            static_token: None,
            token: None,
            subdomain: None,
            max_idle_seconds: None,
            lifetime_limit_seconds: None,
        }
    }

    /// Acquires or panics; returns the fencing token and the spawn action.
    pub async fn acquire(
        store: &dyn Store,
        nb: NewBackend,
    ) -> (i64, hangar_types::protocol::ActionMessage) {
        match store.insert_backend_with_key(nb).await.unwrap() {
            Acquire::Acquired {
                fencing_token,
                action,
            } => (fencing_token, action),
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    /// A new backend for `key_name` on `drone`, acquired; returns what was inserted.
    pub async fn acquired(store: &dyn Store, drone: NodeId, key_name: &str) -> NewBackend {
        acquired_with(store, drone, key_name, |_| {}).await
    }

    /// Like [`acquired`], with `edit` applied to the new backend before it is inserted.
    pub async fn acquired_with(
        store: &dyn Store,
        drone: NodeId,
        key_name: &str,
        edit: impl FnOnce(&mut NewBackend),
    ) -> NewBackend {
        let mut nb = new_backend(drone, key_name);
        edit(&mut nb);
        acquire(store, nb.clone()).await;
        nb
    }

    /// Acquires a backend for each `(drone, key name)` in order, 5 ms apart, so that "oldest first"
    /// is observable.
    pub async fn acquired_in_turn<const N: usize>(
        h: &Harness,
        backends: [(NodeId, &str); N],
    ) -> [NewBackend; N] {
        let mut acquired_ones = Vec::with_capacity(N);
        for (i, (drone, key_name)) in backends.into_iter().enumerate() {
            if i > 0 {
                h.advance(Duration::from_millis(5));
            }
            acquired_ones.push(acquired(&*h.store, drone, key_name).await);
        }
        match acquired_ones.try_into() {
            Ok(all) => all,
            Err(_) => unreachable!("one backend per entry"),
        }
    }

    /// Asserts that the key `kref` is live and held by backend `id`.
    pub async fn assert_held_by(store: &dyn Store, kref: &KeyRef, id: &BackendId) {
        match store.key_lookup(kref).await.unwrap() {
            KeyLookup::Live { backend, .. } => assert_eq!(&backend.id, id),
            other => panic!("expected Live, got {other:?}"),
        }
    }

    /// Queues a terminate of an existing backend; returns the queued action.
    async fn queue_terminate(
        store: &dyn Store,
        id: &BackendId,
        kind: TerminationKind,
        reason: TerminationReason,
    ) -> hangar_types::protocol::ActionMessage {
        store
            .queue_terminate(id, kind, reason)
            .await
            .unwrap()
            .expect("backend exists")
    }

    /// The backends of `drone` due for a sweep (idle or past their lifetime).
    async fn sweep_due(store: &dyn Store, drone: NodeId) -> Vec<BackendId> {
        store.sweep_candidates(drone).await.unwrap()
    }

    /// Lets `wait_secs` pass, then asserts that exactly `due` are due for a sweep on `drone`.
    async fn assert_due_after(
        h: &Harness,
        wait_secs: u64,
        drone: NodeId,
        due: &[&BackendId],
        why: &str,
    ) {
        h.advance(Duration::from_secs(wait_secs));
        let got = sweep_due(&*h.store, drone).await;
        assert_eq!(got.iter().collect::<Vec<_>>(), due, "{why}");
    }

    /// Proxy `px` reports whether it has open connections to `id`, which must be known.
    async fn report_connected(store: &dyn Store, id: &BackendId, px: NodeId, connected: bool) {
        assert_ne!(
            store.keepalive(id, px, connected).await.unwrap(),
            KeepAlive::Gone
        );
    }

    async fn record(store: &dyn Store, id: &BackendId, state: BackendState) -> StateUpdate {
        store.record_backend_state(id, &state).await.unwrap()
    }

    pub(crate) async fn make_ready(store: &dyn Store, id: &BackendId) {
        for state in [
            BackendState::Loading,
            BackendState::Starting,
            BackendState::Waiting { address: addr() },
            BackendState::Ready { address: addr() },
        ] {
            assert!(matches!(
                record(store, id, state).await,
                StateUpdate::Applied { .. }
            ));
        }
    }

    fn terminating() -> BackendState {
        BackendState::Terminating {
            last_status: BackendStatus::Ready,
            termination: TerminationKind::Soft,
            reason: TerminationReason::External,
        }
    }

    fn terminated() -> BackendState {
        BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: Some(TerminationKind::Soft),
            reason: Some(TerminationReason::External),
            exit_code: Some(0),
            message: None,
            oom_killed: false,
        }
    }

    pub async fn terminate(store: &dyn Store, id: &BackendId) {
        assert!(matches!(
            record(store, id, terminated()).await,
            StateUpdate::Applied { .. }
        ));
    }

    fn new_token(backend: &BackendId, user: Option<&str>, auth: serde_json::Value) -> NewToken {
        token_grant(user, auth).for_backend(backend.clone())
    }

    /// A new dynamic token for `user`, lasting an hour.
    fn token_grant(user: Option<&str>, auth: serde_json::Value) -> TokenGrant {
        TokenGrant {
            token: ConnectionToken::random(),
            secret: SecretToken::random(),
            user: user.map(str::to_string),
            auth: auth.as_object().cloned().unwrap_or_default(),
            lifetime: Duration::from_secs(3600),
        }
    }

    fn status(lookup: &TokenLookup) -> &'static str {
        match lookup {
            TokenLookup::NotFound => "not-found",
            TokenLookup::Pending { .. } => "pending",
            TokenLookup::Ready(_) => "ready",
        }
    }

    // ---- connect building blocks ---------------------------------------------------------------

    pub async fn key_lookup_missing_live_expired(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = new_backend(drone, "room");
        let kref = KeyRef::from(&nb.key);
        assert_eq!(store.key_lookup(&kref).await.unwrap(), KeyLookup::Missing);

        let (token, _) = acquire(store, nb.clone()).await;
        match store.key_lookup(&kref).await.unwrap() {
            KeyLookup::Live { tag, backend } => {
                assert_eq!(tag, "t1");
                assert_eq!(backend.id, nb.id);
                assert_eq!(backend.key, nb.key);
                assert_eq!(backend.fencing_token, token);
                assert_eq!(backend.drone_id, drone);
                assert_eq!(backend.drone.as_str(), "dr-one");
                assert_eq!(backend.state, BackendState::Scheduled);
            }
            other => panic!("expected Live, got {other:?}"),
        }
        // A live key is not taken over, and its holder is left as it was.
        let lost = lost_state("taken over");
        assert!(!store
            .take_over_expired_key(&kref, &nb.id, &lost)
            .await
            .unwrap());
        assert_eq!(
            store.backend(&nb.id).await.unwrap().unwrap().state,
            BackendState::Scheduled
        );

        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert!(matches!(
            store.key_lookup(&kref).await.unwrap(),
            KeyLookup::Expired { .. }
        ));
        // Named with another holder (the key changed hands since it was looked up): not taken.
        assert!(!store
            .take_over_expired_key(&kref, &BackendId::random(), &lost)
            .await
            .unwrap());
        assert!(matches!(
            store.key_lookup(&kref).await.unwrap(),
            KeyLookup::Expired { .. }
        ));
        // Taken over: the key is free and, in the same step, its holder is recorded lost (and
        // announced, so that proxies cut its tunnels before a new holder exists).
        let mut events = store.events().subscribe();
        assert!(store
            .take_over_expired_key(&kref, &nb.id, &lost)
            .await
            .unwrap());
        assert_eq!(store.key_lookup(&kref).await.unwrap(), KeyLookup::Missing);
        assert_eq!(store.backend(&nb.id).await.unwrap().unwrap().state, lost);
        assert_eq!(
            published_states(&mut events),
            vec![(nb.id.clone(), lost.clone())]
        );
        assert!(!store
            .take_over_expired_key(&kref, &nb.id, &lost)
            .await
            .unwrap());

        // The key can be taken again by a new backend; the old backend row is kept.
        let mut next = new_backend(drone, "room");
        next.key = nb.key.clone();
        let (token2, _) = acquire(store, next.clone()).await;
        assert!(token2 > token);
        assert!(store.backend(&nb.id).await.unwrap().is_some());
        assert_held_by(store, &kref, &next.id).await;
    }

    pub async fn renew_key_extends_lease(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = acquired(store, drone, "renewed").await;
        let kref = KeyRef::from(&nb.key);
        h.advance(KEY_LEASE - Duration::from_secs(10));
        assert!(store.renew_key(&nb.id).await.unwrap());
        h.advance(Duration::from_secs(20));
        // Past the original lease, inside the renewed one.
        assert!(matches!(
            store.key_lookup(&kref).await.unwrap(),
            KeyLookup::Live { .. }
        ));
        terminate(store, &nb.id).await;
        assert!(!store.renew_key(&nb.id).await.unwrap());
        assert!(!store.renew_key(&BackendId::random()).await.unwrap());
    }

    pub async fn insert_backend_writes_everything(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let mut nb = new_backend(drone, "full");
        nb.static_token = Some(ConnectionToken::random_static());
        nb.subdomain = Some("sub".into());
        nb.max_idle_seconds = Some(30);
        nb.lifetime_limit_seconds = Some(600);
        let before = store.now().await.unwrap();
        let (token, action) = acquire(store, nb.clone()).await;
        assert!(token >= before.0, "fencing token is a store time or later");
        assert_eq!(action.backend_id, nb.id);
        match &action.action {
            BackendAction::Spawn {
                executable,
                key,
                static_token,
            } => {
                assert_eq!(executable, &nb.executable);
                assert_eq!(key.key, nb.key);
                assert_eq!(key.deadlines, nb.deadlines);
                assert_eq!(key.token, token);
                assert_eq!(static_token, &nb.static_token);
            }
            other => panic!("expected Spawn, got {other:?}"),
        }
        assert_eq!(
            store.pending_actions(drone, 10).await.unwrap(),
            vec![action.clone()]
        );

        let row = store.backend(&nb.id).await.unwrap().unwrap();
        assert_eq!(row.cluster, cluster());
        assert_eq!(row.state, BackendState::Scheduled);
        assert_eq!(row.static_token, nb.static_token);
        assert_eq!(row.subdomain.as_deref(), Some("sub"));
        assert_eq!(row.max_idle_seconds, Some(30));
        assert_eq!(row.lifetime_limit_seconds, Some(600));
        assert!(row.created_at >= before);
        assert_eq!(row.state_time, row.created_at);

        let history = store.backend_history(&nb.id).await.unwrap();
        assert_eq!(history, vec![(BackendState::Scheduled, row.created_at)]);
        assert!(store.backend(&BackendId::random()).await.unwrap().is_none());
        assert!(store
            .backend_history(&BackendId::random())
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn concurrent_acquire_has_one_winner(h: Harness) {
        let drone = ready_drone(&*h.store, "dr-one", "").await;
        let attempts: Vec<NewBackend> = (0..16).map(|_| new_backend(drone, "hot")).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for nb in attempts.clone() {
            let store = h.store.clone();
            tasks.spawn(async move {
                let id = nb.id.clone();
                (id, store.insert_backend_with_key(nb).await.unwrap())
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (id, outcome) = joined.unwrap();
            match outcome {
                Acquire::Acquired { .. } => winners.push(id),
                Acquire::KeyHeld => {}
                Acquire::BackendIdTaken => panic!("ids are distinct"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one acquisition wins");
        let store = &*h.store;
        assert_held_by(store, &KeyRef::from(&attempts[0].key), &winners[0]).await;
        for nb in &attempts {
            let exists = store.backend(&nb.id).await.unwrap().is_some();
            assert_eq!(exists, nb.id == winners[0], "losers leave no backend row");
        }
        assert_eq!(store.pending_actions(drone, 100).await.unwrap().len(), 1);
    }

    /// Spawns made at once (which the store may write together) are each answered as if alone:
    /// distinct keys are acquired with their own rows, a held key and a taken id are refused and
    /// write nothing.
    pub async fn concurrent_spawns_are_answered_each(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let held = acquired(store, drone, "held").await;
        let mut spawns: Vec<NewBackend> = (0..12)
            .map(|i| with_token(new_backend(drone, &format!("k{i}"))))
            .collect();
        let mut held_again = with_token(new_backend(drone, "unused"));
        held_again.key = held.key.clone();
        let mut id_taken = with_token(new_backend(drone, "id-taken"));
        id_taken.id = held.id.clone();
        spawns.insert(3, held_again.clone());
        spawns.insert(8, id_taken.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for nb in spawns {
            let store = h.store.clone();
            tasks.spawn(async move {
                let outcome = store.insert_backend_with_key(nb.clone()).await.unwrap();
                (nb, outcome)
            });
        }
        let mut acquired = 0;
        while let Some(joined) = tasks.join_next().await {
            let (nb, outcome) = joined.unwrap();
            let token = &nb.token.as_ref().unwrap().token;
            let resolved = store.resolve_token(token).await.unwrap();
            // The id-taken spawn's token would name the existing backend if it leaked.
            let refused = if nb.id == held_again.id {
                Some(Acquire::KeyHeld)
            } else if nb.id == id_taken.id {
                Some(Acquire::BackendIdTaken)
            } else {
                None
            };
            if let Some(refusal) = refused {
                assert_eq!(outcome, refusal);
                assert_eq!(
                    resolved,
                    TokenLookup::NotFound,
                    "a refused spawn has no token"
                );
                continue;
            }
            assert_eq!(
                resolved,
                TokenLookup::Pending {
                    backend: nb.id.clone()
                }
            );
            let Acquire::Acquired {
                fencing_token,
                action,
            } = outcome
            else {
                panic!("{} was refused: {outcome:?}", nb.key.name);
            };
            acquired += 1;
            assert_eq!(action.backend_id, nb.id);
            // The action carries the key's fencing token, as returned and as the drone reads it.
            let BackendAction::Spawn { key, .. } = &action.action else {
                panic!("a spawn queued {action:?}");
            };
            assert_eq!(key.token, fencing_token);
            let pending = store.pending_actions(drone, 100).await.unwrap();
            assert!(
                pending.contains(&action),
                "the stored action is the one returned: {action:?} not in {pending:?}"
            );
            match store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap() {
                KeyLookup::Live { backend, .. } => {
                    assert_eq!(backend.id, nb.id);
                    assert_eq!(backend.fencing_token, fencing_token);
                }
                other => panic!("expected Live, got {other:?}"),
            }
            assert_eq!(store.backend_history(&nb.id).await.unwrap().len(), 1);
        }
        assert_eq!(acquired, 12);
        assert!(store.backend(&held_again.id).await.unwrap().is_none());
        assert_eq!(
            store
                .key_lookup(&KeyRef::from(&id_taken.key))
                .await
                .unwrap(),
            KeyLookup::Missing
        );
        assert_eq!(store.pending_actions(drone, 100).await.unwrap().len(), 13);
    }

    /// `nb` with a dynamic token to write with its spawn.
    fn with_token(mut nb: NewBackend) -> NewBackend {
        nb.token = Some(token_grant(Some("alice"), json!({"role": "admin"})));
        nb
    }

    /// The token given with a spawn is written with it: it resolves as soon as the spawn returns,
    /// with its user, secret and auth, and routes once the backend is ready; a refused spawn (key
    /// held, id taken) leaves no token behind, and a spawn without one writes none.
    pub async fn spawn_writes_its_token(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = with_token(new_backend(drone, "with-token"));
        let grant = nb.token.clone().unwrap();
        acquire(store, nb.clone()).await;
        assert_eq!(
            store.resolve_token(&grant.token).await.unwrap(),
            TokenLookup::Pending {
                backend: nb.id.clone()
            }
        );
        make_ready(store, &nb.id).await;
        match store.resolve_token(&grant.token).await.unwrap() {
            TokenLookup::Ready(route) => {
                assert_eq!(route.backend_id, nb.id);
                assert_eq!(route.secret_token, grant.secret);
                assert_eq!(route.user.as_deref(), Some("alice"));
                assert_eq!(route.user_data, Some(grant.auth.clone()));
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        // Revocable like any dynamic token.
        assert_eq!(
            store.revoke_tokens(&nb.id, "alice").await.unwrap(),
            vec![grant.token.clone()]
        );

        let mut held = with_token(new_backend(drone, "unused"));
        held.key = nb.key.clone();
        assert_eq!(
            store.insert_backend_with_key(held.clone()).await.unwrap(),
            Acquire::KeyHeld
        );
        let mut id_taken = with_token(new_backend(drone, "other"));
        id_taken.id = nb.id.clone();
        assert_eq!(
            store
                .insert_backend_with_key(id_taken.clone())
                .await
                .unwrap(),
            Acquire::BackendIdTaken
        );
        for refused in [held, id_taken] {
            let token = &refused.token.as_ref().unwrap().token;
            assert_eq!(
                store.resolve_token(token).await.unwrap(),
                TokenLookup::NotFound
            );
        }
        // No token given (a static token, a warm spawn): none written.
        let bare = acquired(store, drone, "bare").await;
        make_ready(store, &bare.id).await;
        assert_eq!(
            store.revoke_tokens(&bare.id, "alice").await.unwrap(),
            vec![]
        );
    }

    pub async fn backend_id_taken_writes_nothing(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let first = acquired(store, drone, "first").await;
        let mut dup = new_backend(drone, "second");
        dup.id = first.id.clone();
        assert_eq!(
            store.insert_backend_with_key(dup.clone()).await.unwrap(),
            Acquire::BackendIdTaken
        );
        assert_eq!(
            store.key_lookup(&KeyRef::from(&dup.key)).await.unwrap(),
            KeyLookup::Missing
        );
        assert_eq!(store.pending_actions(drone, 10).await.unwrap().len(), 1);
        assert_eq!(store.backend_history(&first.id).await.unwrap().len(), 1);

        // KeyHeld leaves nothing behind either.
        let mut held = new_backend(drone, "first");
        held.key = first.key.clone();
        assert_eq!(
            store.insert_backend_with_key(held.clone()).await.unwrap(),
            Acquire::KeyHeld
        );
        assert!(store.backend(&held.id).await.unwrap().is_none());
        assert!(store.backend_history(&held.id).await.unwrap().is_empty());
        assert_eq!(store.pending_actions(drone, 10).await.unwrap().len(), 1);
    }

    pub async fn fencing_token_increases_across_acquisitions(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let mut last = i64::MIN;
        // Several acquisitions within (probably) the same millisecond still get increasing tokens.
        for _ in 0..5 {
            let nb = new_backend(drone, "fenced");
            let (token, _) = acquire(store, nb.clone()).await;
            assert!(token > last, "{token} must exceed {last}");
            last = token;
            terminate(store, &nb.id).await;
            assert_eq!(
                store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap(),
                KeyLookup::Missing,
                "terminated releases the key"
            );
        }
    }

    pub async fn fencing_token_increases_when_clock_goes_back(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        h.advance(Duration::from_secs(3600));
        let nb = new_backend(drone, "skewed");
        let (first, _) = acquire(store, nb.clone()).await;
        terminate(store, &nb.id).await;
        h.rewind(Duration::from_secs(7200));
        let (second, _) = acquire(store, new_backend(drone, "skewed")).await;
        assert!(second > first, "{second} must exceed {first}");
    }

    // ---- states --------------------------------------------------------------------------------

    /// A state recorded while the store clock is behind the backend's last state time keeps that
    /// time: the row, the answer and the history agree, and the history never goes back.
    pub async fn state_time_never_goes_back(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        h.advance(Duration::from_secs(3600));
        let nb = new_backend(drone, "late-clock");
        acquire(store, nb.clone()).await;
        let scheduled_at = store.backend(&nb.id).await.unwrap().unwrap().state_time;
        h.rewind(Duration::from_secs(7200));
        let updates = store
            .record_drone_reports(
                drone,
                &[],
                &[
                    (nb.id.clone(), BackendState::Loading),
                    (nb.id.clone(), BackendState::Starting),
                ],
            )
            .await
            .unwrap();
        let applied = StateUpdate::Applied { time: scheduled_at };
        assert_eq!(updates, [applied.clone(), applied]);
        let row = store.backend(&nb.id).await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.state_time),
            (BackendState::Starting, scheduled_at)
        );
        let times: Vec<Millis> = store
            .backend_history(&nb.id)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, time)| time)
            .collect();
        assert_eq!(times, [scheduled_at; 3]);
        // Once the clock is ahead again, the next state gets the clock's time.
        h.advance(Duration::from_secs(7200 + 60));
        let ready = BackendState::Ready { address: addr() };
        let StateUpdate::Applied { time } = record(store, &nb.id, ready).await else {
            panic!("ready was not applied");
        };
        assert!(
            time.0 >= scheduled_at.0 + 59_000,
            "{time:?} after {scheduled_at:?}"
        );
        let history = store.backend_history(&nb.id).await.unwrap();
        assert_eq!(history.last().map(|(_, t)| *t), Some(time));
    }

    pub async fn state_recording_is_monotonic(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = new_backend(drone, "mono");
        let id = nb.id.clone();
        acquire(store, nb.clone()).await;

        let mut expected = vec![BackendState::Scheduled];
        for state in [BackendState::Loading, BackendState::Starting] {
            assert!(matches!(
                record(store, &id, state.clone()).await,
                StateUpdate::Applied { .. }
            ));
            expected.push(state);
        }
        // Duplicates and backwards moves are refused.
        assert_eq!(
            record(store, &id, BackendState::Starting).await,
            StateUpdate::Stale
        );
        assert_eq!(
            record(store, &id, BackendState::Loading).await,
            StateUpdate::Stale
        );
        assert_eq!(
            record(store, &id, BackendState::Scheduled).await,
            StateUpdate::Stale
        );
        // Skipping forward is fine for the store (the drone's state machine decides order).
        let ready = BackendState::Ready { address: addr() };
        let time = match record(store, &id, ready.clone()).await {
            StateUpdate::Applied { time } => time,
            other => panic!("expected Applied, got {other:?}"),
        };
        expected.push(ready.clone());
        assert_eq!(
            record(store, &id, BackendState::Waiting { address: addr() }).await,
            StateUpdate::Stale
        );
        let row = store.backend(&id).await.unwrap().unwrap();
        assert_eq!(row.state, ready);
        assert_eq!(row.state_time, time);

        assert!(matches!(
            record(store, &id, terminating()).await,
            StateUpdate::Applied { .. }
        ));
        expected.push(terminating());
        assert!(matches!(
            store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap(),
            KeyLookup::Live { .. }
        ));
        terminate(store, &id).await;
        expected.push(terminated());
        assert_eq!(
            store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap(),
            KeyLookup::Missing
        );
        assert_eq!(record(store, &id, terminated()).await, StateUpdate::Stale);
        assert_eq!(
            record(store, &BackendId::random(), BackendState::Loading).await,
            StateUpdate::UnknownBackend
        );

        let history = store.backend_history(&id).await.unwrap();
        let states: Vec<BackendState> = history.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(
            states, expected,
            "history holds exactly the applied states, in order"
        );
        assert!(history.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(
            store.backend(&id).await.unwrap().unwrap().state,
            terminated()
        );
    }

    /// The backend states published so far, in order.
    fn published_states(
        events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    ) -> Vec<(BackendId, BackendState)> {
        let mut published = Vec::new();
        while let Ok(StoreEvent::BackendState { backend, state, .. }) = events.try_recv() {
            published.push((backend, state));
        }
        published
    }

    pub async fn states_recorded_together_in_order(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let (a, b) = (new_backend(drone, "batch-a"), new_backend(drone, "batch-b"));
        acquire(store, a.clone()).await;
        acquire(store, b.clone()).await;
        let mut events = store.events().subscribe();
        let ready = BackendState::Ready { address: addr() };
        let batch = [
            (a.id.clone(), BackendState::Loading),
            (a.id.clone(), BackendState::Starting),
            (a.id.clone(), BackendState::Loading),
            (b.id.clone(), BackendState::Loading),
            (BackendId::random(), BackendState::Loading),
            (a.id.clone(), ready.clone()),
        ];
        let updates = store
            .record_drone_reports(drone, &[], &batch)
            .await
            .unwrap();
        let outcomes: Vec<&str> = updates
            .iter()
            .map(|u| match u {
                StateUpdate::Applied { .. } => "applied",
                StateUpdate::Stale => "stale",
                StateUpdate::UnknownBackend => "unknown",
            })
            .collect();
        assert_eq!(
            outcomes,
            ["applied", "applied", "stale", "applied", "unknown", "applied"]
        );
        let history: Vec<BackendState> = store
            .backend_history(&a.id)
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let expected = [
            BackendState::Scheduled,
            BackendState::Loading,
            BackendState::Starting,
            ready.clone(),
        ];
        assert_eq!(history, expected);
        assert_eq!(store.backend(&a.id).await.unwrap().unwrap().state, ready);
        // Published after the commit, one event per stored state, in order.
        assert_eq!(
            published_states(&mut events),
            [
                (a.id.clone(), BackendState::Loading),
                (a.id.clone(), BackendState::Starting),
                (b.id.clone(), BackendState::Loading),
                (a.id.clone(), ready),
            ]
        );
        // `terminated` in a batch releases the key as it does alone.
        store
            .record_drone_reports(
                drone,
                &[],
                &[(a.id.clone(), terminating()), (a.id.clone(), terminated())],
            )
            .await
            .unwrap();
        assert_eq!(
            store.key_lookup(&KeyRef::from(&a.key)).await.unwrap(),
            KeyLookup::Missing
        );
    }

    pub async fn terminated_releases_only_its_own_key(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let old = acquired(store, drone, "shared").await;
        let kref = KeyRef::from(&old.key);
        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert!(store
            .take_over_expired_key(&kref, &old.id, &lost_state("taken over"))
            .await
            .unwrap());
        let new = acquired(store, drone, "shared").await;
        // The old backend finally reports terminated (already recorded lost by the take-over): the
        // new holder keeps the key.
        assert_eq!(
            record(store, &old.id, terminated()).await,
            StateUpdate::Stale
        );
        assert_held_by(store, &kref, &new.id).await;
    }

    // ---- tokens --------------------------------------------------------------------------------

    pub async fn dynamic_token_resolution_follows_status(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let mut nb = new_backend(drone, "routed");
        nb.subdomain = Some("sub".into());
        let id = nb.id.clone();
        acquire(store, nb).await;
        let with_user = new_token(&id, Some("alice"), json!({"role": "admin"}));
        let anonymous = new_token(&id, None, json!({}));
        store.insert_token(with_user.clone()).await.unwrap();
        store.insert_token(anonymous.clone()).await.unwrap();

        let lookup = store.resolve_token(&with_user.token).await.unwrap();
        assert_eq!(
            lookup,
            TokenLookup::Pending {
                backend: id.clone()
            }
        );
        for state in [
            BackendState::Loading,
            BackendState::Starting,
            BackendState::Waiting { address: addr() },
        ] {
            record(store, &id, state).await;
            let lookup = store.resolve_token(&with_user.token).await.unwrap();
            assert_eq!(status(&lookup), "pending");
        }
        record(store, &id, BackendState::Ready { address: addr() }).await;
        match store.resolve_token(&with_user.token).await.unwrap() {
            TokenLookup::Ready(route) => {
                assert_eq!(route.backend_id, id);
                assert_eq!(route.address, addr());
                assert_eq!(route.secret_token, with_user.secret);
                assert_eq!(route.cluster, cluster());
                assert_eq!(route.user.as_deref(), Some("alice"));
                assert_eq!(route.user_data, Some(with_user.auth.clone()));
                assert_eq!(route.subdomain.as_deref(), Some("sub"));
                let left = route
                    .lease_remaining()
                    .expect("a keyed backend's route is bounded");
                assert!(left <= KEY_LEASE && left > KEY_LEASE / 2, "{left:?}");
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        match store.resolve_token(&anonymous.token).await.unwrap() {
            TokenLookup::Ready(route) => {
                assert_eq!(route.user, None);
                assert_eq!(route.user_data, Some(serde_json::Map::new()));
                assert_eq!(route.secret_token, anonymous.secret);
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        // A ready backend whose key lease ran out has no route (its drone may be frozen while another
        // backend takes the key); renewed, it has one again.
        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert_eq!(
            store.resolve_token(&with_user.token).await.unwrap(),
            TokenLookup::NotFound
        );
        assert!(store.renew_key(&id).await.unwrap());
        assert_eq!(
            status(&store.resolve_token(&with_user.token).await.unwrap()),
            "ready"
        );
        record(store, &id, terminating()).await;
        assert_eq!(
            store.resolve_token(&with_user.token).await.unwrap(),
            TokenLookup::NotFound
        );
        terminate(store, &id).await;
        assert_eq!(
            store.resolve_token(&with_user.token).await.unwrap(),
            TokenLookup::NotFound
        );
        assert_eq!(
            store
                .resolve_token(&ConnectionToken::from_path_segment("nope"))
                .await
                .unwrap(),
            TokenLookup::NotFound
        );
    }

    pub async fn token_expiry_and_revocation(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = new_backend(drone, "tokens");
        let id = nb.id.clone();
        acquire(store, nb).await;
        make_ready(store, &id).await;

        let mut short = new_token(&id, Some("bob"), json!({}));
        short.lifetime = Duration::from_secs(10);
        let alice1 = new_token(&id, Some("alice"), json!({}));
        let alice2 = new_token(&id, Some("alice"), json!({}));
        for t in [&short, &alice1, &alice2] {
            store.insert_token(t.clone()).await.unwrap();
        }
        assert_eq!(
            status(&store.resolve_token(&short.token).await.unwrap()),
            "ready"
        );
        h.advance(Duration::from_secs(11));
        assert_eq!(
            store.resolve_token(&short.token).await.unwrap(),
            TokenLookup::NotFound,
            "expired tokens do not resolve"
        );
        assert_eq!(
            status(&store.resolve_token(&alice1.token).await.unwrap()),
            "ready"
        );

        let mut events = store.events().subscribe();
        let mut revoked = store.revoke_tokens(&id, "alice").await.unwrap();
        revoked.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut expected = vec![alice1.token.clone(), alice2.token.clone()];
        expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(revoked, expected);
        let holder = TokenHolder {
            backend: id.clone(),
            user: "alice".into(),
        };
        match events.try_recv() {
            Ok(StoreEvent::TokensRevoked { tokens, holder: h }) => {
                assert_eq!(tokens.len(), 2);
                assert_eq!(h.as_ref(), Some(&holder));
            }
            other => panic!("expected TokensRevoked, got {other:?}"),
        }
        assert_eq!(
            store.resolve_token(&alice1.token).await.unwrap(),
            TokenLookup::NotFound
        );
        // Nothing left to delete, but the holder is announced again: proxies may cache a token
        // the store no longer has.
        assert!(store.revoke_tokens(&id, "alice").await.unwrap().is_empty());
        match events.try_recv() {
            Ok(StoreEvent::TokensRevoked { tokens, holder: h }) => {
                assert!(tokens.is_empty());
                assert_eq!(h, Some(holder));
            }
            other => panic!("expected TokensRevoked, got {other:?}"),
        }
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
        // Bob's (expired) token is his own; revoking Alice's did not touch it.
        assert_eq!(
            store.revoke_tokens(&id, "bob").await.unwrap(),
            vec![short.token]
        );
    }

    pub async fn static_token_resolution(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let token = ConnectionToken::random_static();
        let static_token = Some(token.clone());
        let id = acquired_with(store, drone, "static", |nb| nb.static_token = static_token)
            .await
            .id;
        assert_eq!(
            store.resolve_token(&token).await.unwrap(),
            TokenLookup::Pending {
                backend: id.clone()
            }
        );
        make_ready(store, &id).await;
        match store.resolve_token(&token).await.unwrap() {
            TokenLookup::Ready(route) => {
                assert_eq!(route.backend_id, id);
                assert_eq!(route.address, addr());
                assert_eq!(route.secret_token, SecretToken::empty());
                assert_eq!(route.user, None);
                assert_eq!(route.user_data, None);
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        // Static tokens do not expire (the key lease does, unless renewed).
        h.advance(Duration::from_secs(10 * 3600));
        assert!(store.renew_key(&id).await.unwrap());
        assert_eq!(status(&store.resolve_token(&token).await.unwrap()), "ready");
        assert_eq!(
            store
                .resolve_token(&ConnectionToken::random_static())
                .await
                .unwrap(),
            TokenLookup::NotFound
        );
        terminate(store, &id).await;
        assert_eq!(
            store.resolve_token(&token).await.unwrap(),
            TokenLookup::NotFound
        );
    }

    fn key_reuse(key: &KeyConfig, user: Option<&str>, auth: serde_json::Value) -> KeyReuse {
        KeyReuse {
            key: KeyRef::from(key),
            tag: key.tag.clone(),
            grant: token_grant(user, auth),
        }
    }

    /// `reuse_key` answers as `key_lookup` does and inserts its token only when the key's holder is
    /// reused: live, same tag, not shutting down, no static token.
    pub async fn reuse_key_reuses_only_a_live_holder(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = new_backend(drone, "reused");
        let id = nb.id.clone();

        let missing = key_reuse(&nb.key, Some("alice"), json!({}));
        assert_eq!(
            store.reuse_key(missing.clone()).await.unwrap(),
            Reuse::NotReused(KeyLookup::Missing)
        );
        assert_eq!(
            store.resolve_token(&missing.grant.token).await.unwrap(),
            TokenLookup::NotFound
        );

        acquire(store, nb.clone()).await;
        make_ready(store, &id).await;
        let live = key_reuse(&nb.key, Some("alice"), json!({"role": "admin"}));
        let expected_backend = match store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap() {
            KeyLookup::Live { backend, .. } => backend,
            other => panic!("expected Live, got {other:?}"),
        };
        assert_eq!(
            store.reuse_key(live.clone()).await.unwrap(),
            Reuse::Reused {
                backend: expected_backend
            }
        );
        // The token row is the one `insert_token` writes.
        match store.resolve_token(&live.grant.token).await.unwrap() {
            TokenLookup::Ready(route) => {
                assert_eq!(route.backend_id, id);
                assert_eq!(route.secret_token, live.grant.secret);
                assert_eq!(route.user.as_deref(), Some("alice"));
                assert_eq!(route.user_data, Some(live.grant.auth.clone()));
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        assert_eq!(
            store.revoke_tokens(&id, "alice").await.unwrap(),
            vec![live.grant.token.clone()]
        );

        let mut other_tag = key_reuse(&nb.key, Some("erin"), json!({}));
        other_tag.tag = "t2".into();
        match store.reuse_key(other_tag.clone()).await.unwrap() {
            Reuse::NotReused(KeyLookup::Live { tag, backend }) => {
                assert_eq!(tag, "t1");
                assert_eq!(backend.id, id);
            }
            other => panic!("expected a refused live key, got {other:?}"),
        }
        assert!(store.revoke_tokens(&id, "erin").await.unwrap().is_empty());

        // A token that expires is given its lifetime from store now.
        let mut short = key_reuse(&nb.key, None, json!({}));
        short.grant.lifetime = Duration::from_secs(10);
        assert!(matches!(
            store.reuse_key(short.clone()).await.unwrap(),
            Reuse::Reused { .. }
        ));
        h.advance(Duration::from_secs(11));
        assert!(store.renew_key(&id).await.unwrap());
        assert_eq!(
            store.resolve_token(&short.grant.token).await.unwrap(),
            TokenLookup::NotFound
        );

        h.advance(KEY_LEASE + Duration::from_secs(1));
        let expired = key_reuse(&nb.key, Some("frank"), json!({}));
        match store.reuse_key(expired.clone()).await.unwrap() {
            Reuse::NotReused(KeyLookup::Expired { backend }) => assert_eq!(backend.id, id),
            other => panic!("expected Expired, got {other:?}"),
        }
        assert!(store.revoke_tokens(&id, "frank").await.unwrap().is_empty());
        assert!(store.renew_key(&id).await.unwrap());

        record(store, &id, terminating()).await;
        let shutting_down = key_reuse(&nb.key, Some("dave"), json!({}));
        match store.reuse_key(shutting_down.clone()).await.unwrap() {
            Reuse::NotReused(KeyLookup::Live { tag, backend }) => {
                assert_eq!(tag, "t1");
                assert_eq!(backend.state.status(), BackendStatus::Terminating);
            }
            other => panic!("expected a refused live key, got {other:?}"),
        }
        assert!(store.revoke_tokens(&id, "dave").await.unwrap().is_empty());
        terminate(store, &id).await;
        assert_eq!(
            store.reuse_key(shutting_down.clone()).await.unwrap(),
            Reuse::NotReused(KeyLookup::Missing)
        );
        assert!(store.revoke_tokens(&id, "dave").await.unwrap().is_empty());
    }

    /// A backend with a static token is reused without a token row.
    pub async fn reuse_key_of_a_static_token_backend_writes_nothing(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let static_token = ConnectionToken::random_static();
        let token = Some(static_token.clone());
        let nb = acquired_with(store, drone, "static-reuse", |nb| nb.static_token = token).await;
        let reuse = key_reuse(&nb.key, Some("bob"), json!({}));
        match store.reuse_key(reuse.clone()).await.unwrap() {
            Reuse::Reused { backend } => {
                assert_eq!(backend.id, nb.id);
                assert_eq!(backend.static_token, Some(static_token));
            }
            other => panic!("expected Reused, got {other:?}"),
        }
        assert_eq!(
            store.resolve_token(&reuse.grant.token).await.unwrap(),
            TokenLookup::NotFound
        );
        assert!(store.revoke_tokens(&nb.id, "bob").await.unwrap().is_empty());
    }

    /// Concurrent reuses of several keys (held, held under another tag, missing) each get their own
    /// answer, whichever of them were answered together.
    pub async fn concurrent_reuses_are_answered_each(h: Harness) {
        let drone = ready_drone(&*h.store, "dr-one", "").await;
        let mut held = Vec::new();
        for i in 0..4 {
            let nb = new_backend(drone, &format!("many-{i}"));
            acquire(&*h.store, nb.clone()).await;
            held.push(nb);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..12 {
            let nb = held[round % held.len()].clone();
            let mut reuse = key_reuse(&nb.key, Some("carol"), json!({ "round": round }));
            // Rounds 3, 7 and 11 ask for a key nobody holds; 2, 5 and 8 under another tag.
            let expect = if round % 4 == 3 {
                reuse.key.name = format!("nobody-{round}");
                "missing"
            } else if round % 3 == 2 {
                reuse.tag = "other".into();
                "refused"
            } else {
                "reused"
            };
            let store = h.store.clone();
            tasks.spawn(async move {
                let answer = store.reuse_key(reuse.clone()).await.unwrap();
                let resolved = store.resolve_token(&reuse.grant.token).await.unwrap();
                (expect, nb.id, reuse, answer, resolved)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (expect, id, reuse, answer, resolved) = joined.unwrap();
            match (expect, answer) {
                ("reused", Reuse::Reused { backend }) => {
                    assert_eq!(backend.id, id);
                    match resolved {
                        TokenLookup::Pending { backend } => assert_eq!(backend, id),
                        other => panic!("expected the token to resolve, got {other:?}"),
                    }
                }
                ("refused", Reuse::NotReused(KeyLookup::Live { backend, .. })) => {
                    assert_eq!(backend.id, id);
                    assert_eq!(resolved, TokenLookup::NotFound);
                }
                ("missing", Reuse::NotReused(KeyLookup::Missing)) => {
                    assert_eq!(resolved, TokenLookup::NotFound);
                }
                (expect, answer) => panic!("{:?}: expected {expect}, got {answer:?}", reuse.key),
            }
        }
        // 6 of the 12 reused: rounds 0, 1, 4, 6, 9 and 10.
        let mut revoked = 0;
        for nb in &held {
            revoked += h.store.revoke_tokens(&nb.id, "carol").await.unwrap().len();
        }
        assert_eq!(revoked, 6);
    }

    /// A reuse whose token cannot be inserted (its value is taken) fails alone: the reuses answered
    /// beside it still get their tokens, each exactly once, and the taken token keeps its holder.
    pub async fn a_failing_reuse_fails_only_its_own_caller(h: Harness) {
        let drone = ready_drone(&*h.store, "dr-one", "").await;
        let nb = new_backend(drone, "one-fails");
        acquire(&*h.store, nb.clone()).await;
        let first = key_reuse(&nb.key, Some("dave"), json!({}));
        assert!(matches!(
            h.store.reuse_key(first.clone()).await.unwrap(),
            Reuse::Reused { .. }
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..12 {
            let mut reuse = key_reuse(&nb.key, Some("erin"), json!({ "round": round }));
            if round == 5 {
                reuse.grant.token = first.grant.token.clone();
            }
            let store = h.store.clone();
            tasks.spawn(async move { (round, store.reuse_key(reuse.clone()).await, reuse) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (round, answer, reuse) = joined.unwrap();
            if round == 5 {
                assert!(
                    answer.is_err(),
                    "the taken token was inserted again: {answer:?}"
                );
                continue;
            }
            assert!(
                matches!(answer, Ok(Reuse::Reused { .. })),
                "round {round}: {answer:?}"
            );
            match h.store.resolve_token(&reuse.grant.token).await.unwrap() {
                TokenLookup::Pending { backend } => assert_eq!(backend, nb.id),
                other => panic!("round {round}: expected the token to resolve, got {other:?}"),
            }
        }
        // The eleven reuses that succeeded, and dave's first one, each wrote one token.
        assert_eq!(
            h.store.revoke_tokens(&nb.id, "erin").await.unwrap().len(),
            11
        );
        assert_eq!(
            h.store.revoke_tokens(&nb.id, "dave").await.unwrap().len(),
            1
        );
    }

    // ---- actions and sweeps --------------------------------------------------------------------

    pub async fn pending_actions_and_ack(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let other = ready_drone(store, "dr-two", "").await;
        let a = new_backend(drone, "a");
        let b = new_backend(drone, "b");
        let (_, spawn_a) = acquire(store, a.clone()).await;
        let (_, spawn_b) = acquire(store, b.clone()).await;
        let terminate_a = queue_terminate(
            store,
            &a.id,
            TerminationKind::Hard,
            TerminationReason::External,
        )
        .await;
        assert_eq!(terminate_a.backend_id, a.id);
        assert_eq!(
            terminate_a.action,
            BackendAction::Terminate {
                kind: TerminationKind::Hard,
                reason: TerminationReason::External
            }
        );
        assert_eq!(
            store.pending_actions(drone, 10).await.unwrap(),
            vec![spawn_a.clone(), spawn_b.clone(), terminate_a.clone()],
            "oldest first"
        );
        assert_eq!(
            store.pending_actions(drone, 2).await.unwrap(),
            vec![spawn_a.clone(), spawn_b.clone()]
        );
        assert!(store.pending_actions(other, 10).await.unwrap().is_empty());

        // An ack from another drone is ignored.
        store.ack_action(other, &spawn_a.action_id).await.unwrap();
        assert_eq!(store.pending_actions(drone, 10).await.unwrap().len(), 3);
        store.ack_action(drone, &spawn_a.action_id).await.unwrap();
        store.ack_action(drone, &spawn_a.action_id).await.unwrap();
        assert_eq!(
            store.pending_actions(drone, 10).await.unwrap(),
            vec![spawn_b, terminate_a]
        );
        assert!(store
            .queue_terminate(
                &BackendId::random(),
                TerminationKind::Soft,
                TerminationReason::External
            )
            .await
            .unwrap()
            .is_none());
    }

    pub async fn drone_reports_are_stored_together(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let other = ready_drone(store, "dr-two", "").await;
        let (a, b) = (new_backend(drone, "a"), new_backend(drone, "b"));
        let (_, spawn_a) = acquire(store, a.clone()).await;
        let (_, spawn_b) = acquire(store, b.clone()).await;
        let mut events = store.events().subscribe();
        let ready = BackendState::Ready { address: addr() };
        let waiting = BackendState::Waiting { address: addr() };
        let states = [
            (a.id.clone(), BackendState::Loading),
            (b.id.clone(), BackendState::Starting),
            (a.id.clone(), waiting.clone()),
            (a.id.clone(), ready.clone()),
            (b.id.clone(), BackendState::Loading),
        ];
        // Another drone's ack is ignored, in a batch as alone.
        let updates = store
            .record_drone_reports(drone, std::slice::from_ref(&spawn_a.action_id), &states)
            .await
            .unwrap();
        store
            .record_drone_reports(other, std::slice::from_ref(&spawn_b.action_id), &[])
            .await
            .unwrap();
        assert_eq!(
            store.pending_actions(drone, 10).await.unwrap(),
            vec![spawn_b.clone()]
        );
        let times: Vec<Option<Millis>> = updates
            .iter()
            .map(|u| match u {
                StateUpdate::Applied { time } => Some(*time),
                _ => None,
            })
            .collect();
        assert!(times[..4].iter().all(|t| t.is_some()), "{updates:?}");
        assert_eq!(updates[4], StateUpdate::Stale);
        // One batch, one time per backend.
        assert_eq!(times[0], times[2]);
        assert_eq!(times[0], times[3]);
        let row = store.backend(&a.id).await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.state_time),
            (ready.clone(), times[3].unwrap())
        );
        assert_eq!(
            store.backend(&b.id).await.unwrap().unwrap().state,
            BackendState::Starting
        );
        let history: Vec<(BackendState, Millis)> = store.backend_history(&a.id).await.unwrap();
        assert_eq!(
            history.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            [
                BackendState::Scheduled,
                BackendState::Loading,
                waiting.clone(),
                ready.clone()
            ]
        );
        assert!(history.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(
            published_states(&mut events),
            [
                (a.id.clone(), BackendState::Loading),
                (b.id.clone(), BackendState::Starting),
                (a.id.clone(), waiting),
                (a.id.clone(), ready),
            ]
        );
        // Acks alone.
        store
            .record_drone_reports(drone, std::slice::from_ref(&spawn_b.action_id), &[])
            .await
            .unwrap();
        assert!(store.pending_actions(drone, 10).await.unwrap().is_empty());
    }

    pub async fn sweep_idle_backends(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = acquired_with(store, drone, "idle", |nb| nb.max_idle_seconds = Some(60)).await;
        let id = nb.id;
        let no_limit =
            acquired_with(store, drone, "forever", |nb| nb.max_idle_seconds = None).await;

        // Not ready yet: idle time does not count, however long it takes.
        assert_due_after(&h, 120, drone, &[], "not ready yet").await;
        // The idle clock starts at ready.
        make_ready(store, &id).await;
        make_ready(store, &no_limit.id).await;
        assert!(sweep_due(store, drone).await.is_empty());
        assert_due_after(&h, 50, drone, &[], "idle for 50 s of 60").await;
        let px = proxy_node(store, "px-one").await;
        report_connected(store, &id, px, false).await;
        assert_due_after(&h, 50, drone, &[], "keepalive reset the idle clock").await;
        assert_due_after(&h, 11, drone, &[&id], "idle for 61 s").await;
        let other = ready_drone(store, "dr-two", "").await;
        assert!(sweep_due(store, other).await.is_empty());

        // Once a terminate is queued the backend is not swept again.
        queue_terminate(store, &id, TerminationKind::Soft, TerminationReason::Swept).await;
        assert!(sweep_due(store, drone).await.is_empty());
        // An explicit terminate still queues another action.
        queue_terminate(
            store,
            &id,
            TerminationKind::Hard,
            TerminationReason::External,
        )
        .await;
        let pending = store.pending_actions(drone, 10).await.unwrap();
        let terminates = pending
            .iter()
            .filter(|a| matches!(a.action, BackendAction::Terminate { .. }))
            .count();
        assert_eq!(terminates, 2);
    }

    pub async fn sweep_lifetime_limit(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let mut loading = new_backend(drone, "lifetime-a");
        loading.lifetime_limit_seconds = Some(30);
        let mut ready = new_backend(drone, "lifetime-b");
        ready.lifetime_limit_seconds = Some(30);
        let mut stopping = new_backend(drone, "lifetime-c");
        stopping.lifetime_limit_seconds = Some(30);
        let mut longer = new_backend(drone, "lifetime-d");
        longer.lifetime_limit_seconds = Some(300);
        for nb in [&loading, &ready, &stopping, &longer] {
            acquire(store, nb.clone()).await;
        }
        record(store, &loading.id, BackendState::Loading).await;
        make_ready(store, &ready.id).await;
        record(store, &stopping.id, terminating()).await;
        assert!(sweep_due(store, drone).await.is_empty());

        h.advance(Duration::from_secs(31));
        let mut due = sweep_due(store, drone).await;
        due.sort();
        let mut expected = vec![loading.id.clone(), ready.id.clone()];
        expected.sort();
        assert_eq!(
            due, expected,
            "terminating backends and later limits are not due"
        );

        queue_terminate(
            store,
            &ready.id,
            TerminationKind::Soft,
            TerminationReason::Swept,
        )
        .await;
        assert_eq!(sweep_due(store, drone).await, vec![loading.id]);
    }

    pub async fn keepalive_reports_known_live_backends(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = acquired(store, drone, "alive").await;
        let px = proxy_node(store, "px-one").await;
        match store.keepalive(&nb.id, px, true).await.unwrap() {
            KeepAlive::Recorded {
                lease_left: Some(left),
            } => assert!(left <= KEY_LEASE && left > KEY_LEASE / 2, "{left:?}"),
            other => panic!("expected the key lease, got {other:?}"),
        }
        assert_eq!(
            store
                .keepalive(&BackendId::random(), px, false)
                .await
                .unwrap(),
            KeepAlive::Gone
        );
        // A lease that ran out is reported as such: the proxy must stop routing to the backend.
        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert_eq!(
            store.keepalive(&nb.id, px, false).await.unwrap(),
            KeepAlive::Recorded {
                lease_left: Some(Duration::ZERO)
            }
        );
        terminate(store, &nb.id).await;
        assert_eq!(
            store.keepalive(&nb.id, px, false).await.unwrap(),
            KeepAlive::Gone
        );
    }

    /// Open connections reported by proxies keep a backend from being idle, per proxy, for as long as
    /// the reports are fresh; withdrawing the last one starts the idle clock.
    pub async fn connected_backends_are_not_idle(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = acquired_with(store, drone, "busy", |nb| nb.max_idle_seconds = Some(10)).await;
        let id = nb.id;
        make_ready(store, &id).await;
        let (p1, p2) = (
            proxy_node(store, "px-one").await,
            proxy_node(store, "px-two").await,
        );

        report_connected(store, &id, p1, true).await;
        assert_due_after(&h, 15, drone, &[], "an open connection is not idle").await;
        // The report was not refreshed (proxy gone): idle again once it expires.
        assert_due_after(&h, 10, drone, &[&id], "the report expired").await;

        report_connected(store, &id, p1, true).await;
        report_connected(store, &id, p2, true).await;
        report_connected(store, &id, p1, false).await;
        let why = "the other proxy still has a connection";
        assert_due_after(&h, 15, drone, &[], why).await;
        report_connected(store, &id, p2, false).await;
        assert_due_after(&h, 9, drone, &[], "idle for 9 s of 10").await;
        assert_due_after(&h, 2, drone, &[&id], "idle for 11 s").await;
    }

    // ---- nodes ---------------------------------------------------------------------------------

    pub async fn register_and_disconnect_with_takeover(h: Harness) {
        let store = &*h.store;
        let reg = registration("dr-one", "", &[ExecutorKind::Docker]);
        let (node, first) = register(store, &reg).await;
        let (again, second) = register(store, &reg).await;
        assert_eq!(again, node, "same node row");
        assert_ne!(second, first, "fresh session");
        // The stale session's disconnect does not detach the new session.
        store.node_disconnected(node, first).await.unwrap();
        assert_eq!(attached(store).await.drones.len(), 1);
        store.node_disconnected(node, second).await.unwrap();
        assert!(attached(store).await.drones.is_empty());
        // Detached nodes are listed only when asked for.
        let attached_only = store.cluster_nodes(&cluster(), false).await.unwrap();
        assert!(attached_only.drones.is_empty());
        let all = store.cluster_nodes(&cluster(), true).await.unwrap();
        assert_eq!(all.drones.len(), 1);
        assert_eq!(all.drones[0].node.controller, None);
        assert_eq!(all.drones[0].node.name.to_string(), "dr-one");
        let (_, third) = register(store, &reg).await;
        assert!(third != first && third != second);

        let (p, s1) = register_proxy(store, "px-one").await;
        let (p2, s2) = register_proxy(store, "px-one").await;
        assert_eq!(p, p2);
        assert_ne!(p, node, "a proxy is its own node");
        assert_ne!(s1, s2);
        store.node_disconnected(p, s1).await.unwrap();
        assert_eq!(attached(store).await.proxies.len(), 1);
        store.node_disconnected(p, s2).await.unwrap();
        assert!(attached(store).await.proxies.is_empty());
    }

    pub async fn drain_is_kept_across_reconnects(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let name: DroneName = "dr-one".parse().unwrap();
        let query = DroneQuery {
            cluster: cluster(),
            pool: String::new(),
            executor: ExecutorKind::Process,
            max_heartbeat_age: UNHEALTHY_AFTER,
        };
        assert_eq!(store.schedulable_drones(&query).await.unwrap().len(), 1);
        assert_eq!(
            store.drain_drone(&cluster(), &name).await.unwrap(),
            Some(true)
        );
        assert_eq!(
            store.drain_drone(&cluster(), &name).await.unwrap(),
            Some(false)
        );
        assert!(store.schedulable_drones(&query).await.unwrap().is_empty());
        let unknown: DroneName = "dr-nope".parse().unwrap();
        assert_eq!(store.drain_drone(&cluster(), &unknown).await.unwrap(), None);
        let elsewhere: ClusterName = "other.test".parse().unwrap();
        assert_eq!(store.drain_drone(&elsewhere, &name).await.unwrap(), None);

        // Reconnecting keeps the drone draining.
        assert_eq!(ready_drone(store, "dr-one", "").await, drone);
        assert!(store.schedulable_drones(&query).await.unwrap().is_empty());
        let state = attached(store).await;
        assert!(state.drones[0].draining);
    }

    pub async fn cluster_state_shape(h: Harness) {
        let store = &*h.store;
        let empty = attached(store).await;
        assert!(empty.drones.is_empty() && empty.proxies.is_empty());

        store
            .controller_heartbeat(&controller(), true)
            .await
            .unwrap();
        let drone = ready_drone(store, "dr-one", "gpu").await;
        // Registered but no heartbeat yet: listed with no age, no error.
        let fresh = registration("dr-two", "", &[ExecutorKind::Docker]);
        register(store, &fresh).await;
        // Detached and other-cluster drones are not listed.
        let (gone, gone_session) =
            register(store, &registration("dr-gone", "", &[ExecutorKind::Docker])).await;
        store.node_disconnected(gone, gone_session).await.unwrap();
        let mut elsewhere = registration("dr-far", "", &[ExecutorKind::Docker]);
        elsewhere.cluster = "other.test".parse().unwrap();
        register(store, &elsewhere).await;
        let proxy: ProxyName = "px-one".parse().unwrap();
        store
            .register_proxy(&cluster(), &proxy, &controller(), "0.2.0")
            .await
            .unwrap();

        let live = new_backend(drone, "counted");
        let done = new_backend(drone, "finished");
        acquire(store, live).await;
        acquire(store, done.clone()).await;
        terminate(store, &done.id).await;

        h.advance(Duration::from_millis(3_500));
        let state = attached(store).await;
        let value = serde_json::to_value(&state).unwrap();
        assert_eq!(state.drones.len(), 2, "{value}");
        let one = &state.drones[0];
        assert_eq!(one.node.name, NodeName::Drone("dr-one".parse().unwrap()));
        assert!(one.ready);
        assert!(!one.draining);
        assert_eq!(one.last_heartbeat_age, Some(3));
        assert_eq!(one.backend_count, 1, "terminated backends are not counted");
        assert_eq!(one.pool, "gpu");
        assert_eq!(
            one.executors,
            vec![ExecutorKind::Docker, ExecutorKind::Process]
        );
        assert_eq!(one.node.plane_version, "0.1.0");
        assert_eq!(one.node.controller, Some(controller()));
        assert_eq!(one.node.controller_heartbeat_age, Some(3));
        let two = &state.drones[1];
        assert_eq!(two.node.name, NodeName::Drone("dr-two".parse().unwrap()));
        assert_eq!(two.last_heartbeat_age, None);
        assert_eq!(two.backend_count, 0);

        assert_eq!(state.proxies.len(), 1);
        assert_eq!(state.proxies[0].name, NodeName::Proxy(proxy));
        assert_eq!(state.proxies[0].plane_version, "0.2.0");
        assert_eq!(state.proxies[0].controller_heartbeat_age, Some(3));
        // Plane's JSON shape.
        assert_eq!(
            value["drones"][0]["node"]["name"],
            json!({"Drone": "dr-one"})
        );
        assert_eq!(value["proxies"][0]["name"], json!({"Proxy": "px-one"}));
    }

    pub async fn schedulable_drones_filters(h: Harness) {
        let store = &*h.store;
        let both = [ExecutorKind::Process, ExecutorKind::Docker];
        // Stale: its last heartbeat is older than the allowed age.
        ready_drone(store, "dr-stale", "").await;
        h.advance(UNHEALTHY_AFTER + Duration::from_secs(1));

        let good = ready_drone(store, "dr-good", "").await;
        ready_drone(store, "dr-pool", "gpu").await;
        let (docker_only, _) = register(
            store,
            &registration("dr-docker", "", &[ExecutorKind::Docker]),
        )
        .await;
        store.drone_heartbeat(docker_only, Millis(5)).await.unwrap();
        ready_drone(store, "dr-drain", "").await;
        store
            .drain_drone(&cluster(), &"dr-drain".parse().unwrap())
            .await
            .unwrap();
        let (gone, gone_session) = register(store, &registration("dr-gone", "", &both)).await;
        store.drone_heartbeat(gone, Millis(5)).await.unwrap();
        store.node_disconnected(gone, gone_session).await.unwrap();
        // Silent: registered, never sent a heartbeat.
        register(store, &registration("dr-silent", "", &both)).await;
        let mut far = registration("dr-far", "", &both);
        far.cluster = "other.test".parse().unwrap();
        let (f, _) = register(store, &far).await;
        store.drone_heartbeat(f, Millis(5)).await.unwrap();

        let mut query = DroneQuery {
            cluster: cluster(),
            pool: String::new(),
            executor: ExecutorKind::Process,
            max_heartbeat_age: UNHEALTHY_AFTER,
        };
        let found = store.schedulable_drones(&query).await.unwrap();
        assert_eq!(
            found,
            vec![DroneCandidate {
                id: good,
                name: "dr-good".parse().unwrap(),
                last_local_time: Millis(1_000),
                backend_count: 0,
            }]
        );

        query.executor = ExecutorKind::Docker;
        let mut names: Vec<String> = store
            .schedulable_drones(&query)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name.to_string())
            .collect();
        names.sort();
        assert_eq!(names, vec!["dr-docker", "dr-good"]);

        // Backend counts exclude terminated backends.
        acquire(store, new_backend(good, "x")).await;
        let done = acquired(store, good, "y").await;
        terminate(store, &done.id).await;
        query.executor = ExecutorKind::Process;
        assert_eq!(
            store.schedulable_drones(&query).await.unwrap()[0].backend_count,
            1
        );

        // The gpu pool has its own drone, once it heartbeats again; re-registration updates the pool.
        query.pool = "gpu".into();
        let pool_drone = ready_drone(store, "dr-pool", "gpu").await;
        let found = store.schedulable_drones(&query).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, pool_drone);
        ready_drone(store, "dr-pool", "cpu").await;
        assert!(store.schedulable_drones(&query).await.unwrap().is_empty());
    }

    // ---- cleanup -------------------------------------------------------------------------------

    pub async fn cleanup_deletes_old_rows(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let old: Vec<NewBackend> = (0..3)
            .map(|i| new_backend(drone, &format!("old-{i}")))
            .collect();
        let mut old_tokens = Vec::new();
        for nb in &old {
            old_tokens.push(acquire(store, nb.clone()).await.0);
            store
                .insert_token(new_token(&nb.id, Some("u"), json!({})))
                .await
                .unwrap();
            terminate(store, &nb.id).await;
        }
        let live = acquired(store, drone, "live").await;
        let mut expiring = new_token(&live.id, None, json!({}));
        expiring.lifetime = Duration::from_secs(60);
        let lasting = new_token(&live.id, None, json!({}));
        store.insert_token(expiring.clone()).await.unwrap();
        store.insert_token(lasting.clone()).await.unwrap();

        // Nothing is old enough yet.
        assert_eq!(
            store
                .cleanup(Some(Duration::from_secs(600)), 100)
                .await
                .unwrap(),
            0
        );

        h.advance(Duration::from_secs(700));
        let recent = acquired(store, drone, "recent").await;
        terminate(store, &recent.id).await;

        // Without an age only expired tokens go: `expiring` (60 s); the others last an hour.
        assert_eq!(store.cleanup(None, 100).await.unwrap(), 1);
        assert!(store.backend(&old[0].id).await.unwrap().is_some());
        assert_eq!(
            store.resolve_token(&lasting.token).await.unwrap(),
            TokenLookup::Pending {
                backend: live.id.clone()
            }
        );

        // With an age and a batch of 2: two old backends go, with their children.
        let deleted = store
            .cleanup(Some(Duration::from_secs(600)), 2)
            .await
            .unwrap();
        assert!(
            deleted >= 2 + 2 * 3,
            "backends, tokens, actions and history rows: {deleted}"
        );
        let remaining: Vec<bool> = {
            let mut v = Vec::new();
            for nb in &old {
                v.push(store.backend(&nb.id).await.unwrap().is_some());
            }
            v
        };
        assert_eq!(
            remaining.iter().filter(|r| **r).count(),
            1,
            "bounded by batch"
        );
        for nb in &old {
            if store.backend(&nb.id).await.unwrap().is_none() {
                assert!(store.backend_history(&nb.id).await.unwrap().is_empty());
            }
        }
        store
            .cleanup(Some(Duration::from_secs(600)), 100)
            .await
            .unwrap();
        for nb in &old {
            assert!(store.backend(&nb.id).await.unwrap().is_none());
        }
        // Recently terminated and live backends are kept, and so are their valid tokens.
        assert!(store.backend(&recent.id).await.unwrap().is_some());
        assert!(store.backend(&live.id).await.unwrap().is_some());
        assert_eq!(store.pending_actions(drone, 100).await.unwrap().len(), 2);
        assert_eq!(
            store.resolve_token(&lasting.token).await.unwrap(),
            TokenLookup::Pending {
                backend: live.id.clone()
            }
        );

        // Fencing still increases for keys whose rows were cleaned up.
        let (again, _) = acquire(store, new_backend(drone, "old-0")).await;
        assert!(again > old_tokens[0]);
    }

    // ---- events --------------------------------------------------------------------------------

    pub async fn events_are_published_after_commit(h: Harness) {
        let drone = ready_drone(&*h.store, "dr-one", "").await;
        let nb = new_backend(drone, "evented");
        let id = nb.id.clone();

        // A subscriber that reads the store as soon as it hears of the backend must find it.
        let mut rx = h.store.events().subscribe();
        let reader = {
            let store = h.store.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let event = rx.recv().await.unwrap();
                    match &event {
                        StoreEvent::BackendState { backend, .. } => {
                            let row = store.backend(backend).await.unwrap();
                            seen.push((event.clone(), row.is_some()));
                        }
                        StoreEvent::Action { action, .. } => {
                            let pending = store.pending_actions(drone, 10).await.unwrap();
                            seen.push((event.clone(), pending.contains(action)));
                            return seen;
                        }
                        StoreEvent::TokensRevoked { .. }
                        | StoreEvent::HttpChallenge { .. }
                        | StoreEvent::Certificate(_) => {}
                    }
                }
            })
        };
        let mut events = h.store.events().subscribe();
        let (_, action) = acquire(&*h.store, nb.clone()).await;
        let seen = reader.await.unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|(_, visible)| *visible), "{seen:?}");
        match events.try_recv().unwrap() {
            StoreEvent::BackendState {
                backend,
                state,
                time,
            } => {
                assert_eq!(backend, id);
                assert_eq!(state, BackendState::Scheduled);
                assert_eq!(time, store_time_of(&*h.store, &id).await);
            }
            other => panic!("expected BackendState, got {other:?}"),
        }
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::Action {
                drone,
                action: action.clone()
            }
        );

        // Refused writes publish nothing.
        let mut held = new_backend(drone, "evented");
        held.key = nb.key.clone();
        assert_eq!(
            h.store.insert_backend_with_key(held).await.unwrap(),
            Acquire::KeyHeld
        );
        assert_eq!(
            record(&*h.store, &id, BackendState::Scheduled).await,
            StateUpdate::Stale
        );
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));

        // Applied states and queued terminates are published.
        let applied = record(&*h.store, &id, BackendState::Loading).await;
        let StateUpdate::Applied { time } = applied else {
            panic!("expected Applied, got {applied:?}")
        };
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::BackendState {
                backend: id.clone(),
                state: BackendState::Loading,
                time
            }
        );
        let terminate = queue_terminate(
            &*h.store,
            &id,
            TerminationKind::Soft,
            TerminationReason::External,
        )
        .await;
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::Action {
                drone,
                action: terminate
            }
        );
    }

    async fn store_time_of(store: &dyn Store, id: &BackendId) -> Millis {
        store.backend(id).await.unwrap().unwrap().created_at
    }

    // ---- controller liveness -------------------------------------------------------------------

    pub async fn schedulable_drones_require_a_live_controller(h: Harness) {
        let store = &*h.store;
        let query = DroneQuery {
            cluster: cluster(),
            pool: String::new(),
            executor: ExecutorKind::Process,
            max_heartbeat_age: UNHEALTHY_AFTER,
        };
        let drone = ready_drone(store, "dr-one", "").await;
        assert_eq!(store.schedulable_drones(&query).await.unwrap().len(), 1);

        // The controller stops heartbeating (it died without detaching its drones); the drone's own
        // heartbeat is fresh, but nobody would deliver its actions.
        h.advance(UNHEALTHY_AFTER + Duration::from_secs(1));
        store.drone_heartbeat(drone, Millis(2_000)).await.unwrap();
        assert!(store.schedulable_drones(&query).await.unwrap().is_empty());

        // It heartbeats again: schedulable again.
        store
            .controller_heartbeat(&controller(), true)
            .await
            .unwrap();
        assert_eq!(store.schedulable_drones(&query).await.unwrap().len(), 1);

        // Marked offline (stopped): not schedulable, however fresh its last heartbeat.
        store
            .controller_heartbeat(&controller(), false)
            .await
            .unwrap();
        assert!(store.schedulable_drones(&query).await.unwrap().is_empty());

        // A drone attached to a controller that never recorded a heartbeat is not schedulable either.
        store
            .controller_heartbeat(&controller(), true)
            .await
            .unwrap();
        let mut ghost = registration("dr-ghost", "", &[ExecutorKind::Process]);
        ghost.controller = "co-ghost".parse().unwrap();
        let Registration::Registered { node, .. } = store.register_drone(&ghost).await.unwrap()
        else {
            panic!("registration refused")
        };
        store.drone_heartbeat(node, Millis(3_000)).await.unwrap();
        let found = store.schedulable_drones(&query).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, drone);
    }

    // ---- lost drones ---------------------------------------------------------------------------

    fn lost_state(message: &str) -> BackendState {
        BackendState::Terminated {
            last_status: BackendStatus::Scheduled,
            termination: None,
            reason: Some(TerminationReason::Lost),
            exit_code: None,
            message: Some(message.to_string()),
            oom_killed: false,
        }
    }

    fn ids(backends: &[LiveBackend]) -> Vec<BackendId> {
        backends.iter().map(|b| b.id.clone()).collect()
    }

    pub async fn lost_backends_need_a_gone_drone_and_an_expired_lease(h: Harness) {
        let store = &*h.store;
        let both = [ExecutorKind::Process, ExecutorKind::Docker];
        let (gone, gone_session) = register(store, &registration("dr-gone", "", &both)).await;
        store.drone_heartbeat(gone, Millis(1_000)).await.unwrap();
        let healthy = ready_drone(store, "dr-healthy", "").await;
        let [on_gone, finished, on_healthy] =
            acquired_in_turn(&h, [(gone, "a"), (gone, "b"), (healthy, "c")]).await;
        terminate(store, &finished.id).await;
        let lost = |limit| store.lost_backends(UNHEALTHY_AFTER, limit);

        assert!(lost(100).await.unwrap().is_empty(), "all drones fresh");
        // The drone leaves, but its key is still leased: it may still be running the backend.
        store.node_disconnected(gone, gone_session).await.unwrap();
        assert!(lost(100).await.unwrap().is_empty(), "lease not expired");

        // The lease expires. The backend on the healthy drone is not lost (expired lease, but its drone
        // reports for itself); the terminated one never is.
        h.advance(KEY_LEASE + Duration::from_secs(1));
        store.drone_heartbeat(healthy, Millis(5_000)).await.unwrap();
        assert_eq!(
            lost(100).await.unwrap(),
            vec![LiveBackend {
                id: on_gone.id.clone(),
                drone: "dr-gone".parse().unwrap(),
                state: BackendState::Scheduled,
            }]
        );

        // An attached drone silent for longer than the heartbeat age counts as gone too; oldest first.
        h.advance(UNHEALTHY_AFTER + Duration::from_secs(1));
        assert_eq!(
            ids(&lost(100).await.unwrap()),
            vec![on_gone.id.clone(), on_healthy.id.clone()]
        );
        assert_eq!(ids(&lost(1).await.unwrap()), vec![on_gone.id.clone()]);

        // A renewed lease is live again; a backend recorded terminated is not listed any more.
        assert!(store.renew_key(&on_healthy.id).await.unwrap());
        assert!(matches!(
            record(
                store,
                &on_gone.id,
                lost_state("drone dr-gone stopped reporting")
            )
            .await,
            StateUpdate::Applied { .. }
        ));
        assert!(lost(100).await.unwrap().is_empty());
        assert_eq!(
            record(store, &on_gone.id, lost_state("again")).await,
            StateUpdate::Stale,
            "a second sweep's recording is harmless"
        );

        // A key taken over by a connect: its holder was recorded lost with the take-over, so no
        // sweep finds it.
        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert_eq!(ids(&lost(100).await.unwrap()), vec![on_healthy.id.clone()]);
        assert!(store
            .take_over_expired_key(
                &KeyRef::from(&on_healthy.key),
                &on_healthy.id,
                &lost_state("taken over"),
            )
            .await
            .unwrap());
        assert!(lost(100).await.unwrap().is_empty());
    }

    pub async fn drone_live_backends_for_mark_lost(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let other = ready_drone(store, "dr-two", "").await;
        let [a, b, c] = acquired_in_turn(&h, [(drone, "a"), (drone, "b"), (drone, "c")]).await;
        make_ready(store, &b.id).await;
        terminate(store, &c.id).await;
        acquire(store, new_backend(other, "d")).await;

        let name: DroneName = "dr-one".parse().unwrap();
        let live = store
            .drone_live_backends(&cluster(), &name)
            .await
            .unwrap()
            .expect("known drone");
        assert_eq!(ids(&live), vec![a.id.clone(), b.id.clone()]);
        assert!(live.iter().all(|l| l.drone == name));
        assert_eq!(live[0].state, BackendState::Scheduled);
        assert_eq!(live[1].state, BackendState::Ready { address: addr() });

        let unknown: DroneName = "dr-nope".parse().unwrap();
        assert_eq!(
            store
                .drone_live_backends(&cluster(), &unknown)
                .await
                .unwrap(),
            None
        );
        let elsewhere: ClusterName = "other.test".parse().unwrap();
        assert_eq!(
            store.drone_live_backends(&elsewhere, &name).await.unwrap(),
            None
        );

        // Recording them terminated (what mark-lost does) releases their keys at once.
        for backend in &live {
            assert!(matches!(
                record(store, &backend.id, lost_state("marked lost")).await,
                StateUpdate::Applied { .. }
            ));
        }
        for nb in [&a, &b] {
            assert_eq!(
                store.key_lookup(&KeyRef::from(&nb.key)).await.unwrap(),
                KeyLookup::Missing
            );
        }
        assert_eq!(
            store.drone_live_backends(&cluster(), &name).await.unwrap(),
            Some(Vec::new())
        );
    }

    pub async fn prevent_renew_refuses_later_renewals(h: Harness) {
        let store = &*h.store;
        let drone = ready_drone(store, "dr-one", "").await;
        let nb = acquired(store, drone, "blocked").await;
        let kref = KeyRef::from(&nb.key);
        assert!(store.renew_key(&nb.id).await.unwrap());
        assert!(store.prevent_renew(&nb.id).await.unwrap());
        assert!(store.prevent_renew(&nb.id).await.unwrap(), "idempotent");
        assert!(!store.renew_key(&nb.id).await.unwrap());
        // The lease itself runs on until it expires.
        assert!(matches!(
            store.key_lookup(&kref).await.unwrap(),
            KeyLookup::Live { .. }
        ));
        h.advance(KEY_LEASE + Duration::from_secs(1));
        assert!(matches!(
            store.key_lookup(&kref).await.unwrap(),
            KeyLookup::Expired { .. }
        ));

        assert!(!store.prevent_renew(&BackendId::random()).await.unwrap());
        terminate(store, &nb.id).await;
        assert!(
            !store.prevent_renew(&nb.id).await.unwrap(),
            "no key any more"
        );
    }

    pub async fn drone_controller_names_the_session_holder_and_its_url(h: Harness) {
        let store = &*h.store;
        let name: DroneName = "dr-held".parse().unwrap();
        assert_eq!(controller_of(store, &name).await, None);
        let reg = registration("dr-held", "", &[ExecutorKind::Process]);
        let (node, session) = register(store, &reg).await;
        assert_eq!(
            controller_of(store, &name).await,
            Some(DroneController {
                controller: controller(),
                internal_url: None,
            })
        );
        // A new URL replaces the old one; a heartbeat keeps it.
        for url in ["http://10.0.0.5:8080/", "http://10.0.0.6:8080/"] {
            store.set_controller_url(&controller(), url).await.unwrap();
            let held = controller_of(store, &name).await.unwrap();
            assert_eq!(held.internal_url.as_deref(), Some(url));
            store
                .controller_heartbeat(&controller(), true)
                .await
                .unwrap();
            let held = controller_of(store, &name).await.unwrap();
            assert_eq!(held.internal_url.as_deref(), Some(url), "after a heartbeat");
        }
        store.node_disconnected(node, session).await.unwrap();
        assert_eq!(controller_of(store, &name).await, None);
    }

    pub async fn drone_attachment_reports_the_session(h: Harness) {
        let store = &*h.store;
        let name: DroneName = "dr-one".parse().unwrap();
        assert_eq!(attachment_of(store, &name).await, None);
        let reg = registration("dr-one", "", &[ExecutorKind::Process]);
        let (node, first) = register(store, &reg).await;
        let attachment = attachment_of(store, &name).await.unwrap();
        assert_eq!(
            attachment,
            DroneAttachment {
                node,
                controller: Some(controller()),
                session: first,
                heartbeat_age: None,
            }
        );
        store.drone_heartbeat(node, Millis(1)).await.unwrap();
        h.advance(Duration::from_secs(2));
        let age = attachment_of(store, &name)
            .await
            .unwrap()
            .heartbeat_age
            .unwrap();
        assert!(
            age >= Duration::from_secs(2) && age < Duration::from_secs(30),
            "{age:?}"
        );
        let (_, second) = register(store, &reg).await;
        store.node_disconnected(node, second).await.unwrap();
        let attachment = attachment_of(store, &name).await.unwrap();
        assert_eq!(attachment.session, second);
        assert_eq!(attachment.controller, None);
        assert_eq!(attachment.heartbeat_age, None, "cleared by the new session");
        let elsewhere: ClusterName = "other.test".parse().unwrap();
        assert_eq!(
            store.drone_attachment(&elsewhere, &name).await.unwrap(),
            None
        );
    }

    // ---- TLS -----------------------------------------------------------------------------------

    /// Who takes part in the TLS cases: two proxies of [`cluster`] (`c`) and a cluster of neither.
    struct TlsParties {
        c: ClusterName,
        other: ClusterName,
        p1: NodeId,
        p2: NodeId,
    }

    async fn tls_parties(store: &dyn Store) -> TlsParties {
        TlsParties {
            c: cluster(),
            other: "other.test".parse().unwrap(),
            p1: proxy_node(store, "px-one").await,
            p2: proxy_node(store, "px-two").await,
        }
    }

    pub async fn cert_lease_is_exclusive_renewable_and_expires(h: Harness) {
        let store = &*h.store;
        let lease = hangar_types::timing::CERT_LEASE;
        let TlsParties { c, other, p1, p2 } = tls_parties(store).await;

        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        assert!(!store.acquire_cert_lease(&c, p2).await.unwrap());
        // The holder renews within the lease (Plane quirk 22: it could not).
        h.advance(lease / 2);
        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        // Past the first lease, inside the renewed one.
        h.advance(lease / 2 + Duration::from_secs(1));
        assert!(!store.acquire_cert_lease(&c, p2).await.unwrap());
        // Leases are per cluster.
        assert!(store.acquire_cert_lease(&other, p2).await.unwrap());

        // Expired: another proxy takes it over, and then the first cannot.
        h.advance(lease);
        assert!(store.acquire_cert_lease(&c, p2).await.unwrap());
        assert!(!store.acquire_cert_lease(&c, p1).await.unwrap());

        // Only the holder releases it; then anyone may take it at once.
        assert!(!store.release_cert_lease(&c, p1).await.unwrap());
        assert!(store.release_cert_lease(&c, p2).await.unwrap());
        assert!(!store.release_cert_lease(&c, p2).await.unwrap());
        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        assert!(!store.acquire_cert_lease(&c, p2).await.unwrap());
    }

    pub async fn txt_record_belongs_to_the_lease_holder(h: Harness) {
        let store = &*h.store;
        let TlsParties { c, other, p1, p2 } = tls_parties(store).await;

        assert_eq!(store.txt_record(&c).await.unwrap(), None);
        assert!(
            !store.set_txt_record(&c, p1, Some("v0")).await.unwrap(),
            "no lease"
        );
        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap(), None, "no value yet");
        assert!(!store.set_txt_record(&c, p2, Some("x")).await.unwrap());
        assert!(store.set_txt_record(&c, p1, Some("v1")).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap().as_deref(), Some("v1"));
        assert_eq!(store.txt_record(&other).await.unwrap(), None);

        // A renewal keeps the value; clearing works.
        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap().as_deref(), Some("v1"));
        assert!(store.set_txt_record(&c, p1, None).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap(), None);
        assert!(store.set_txt_record(&c, p1, Some("v2")).await.unwrap());

        // A takeover after expiry clears the old holder's value, and the old holder cannot set one.
        h.advance(hangar_types::timing::CERT_LEASE + Duration::from_secs(1));
        assert!(store.acquire_cert_lease(&c, p2).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap(), None);
        assert!(!store.set_txt_record(&c, p1, Some("late")).await.unwrap());
        assert!(store.set_txt_record(&c, p2, Some("v3")).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap().as_deref(), Some("v3"));

        // Releasing the lease drops the value.
        assert!(store.release_cert_lease(&c, p2).await.unwrap());
        assert_eq!(store.txt_record(&c).await.unwrap(), None);
    }

    pub async fn http_challenges_belong_to_the_lease_holder(h: Harness) {
        let store = &*h.store;
        let TlsParties { c, other, p1, p2 } = tls_parties(store).await;
        let mut events = h.store.events().subscribe();

        assert!(!store
            .set_http_challenge(&c, p1, "tok1", Some("tok1.a"))
            .await
            .unwrap());
        assert!(store.acquire_cert_lease(&c, p1).await.unwrap());
        assert!(!store
            .set_http_challenge(&c, p2, "tok1", Some("tok1.a"))
            .await
            .unwrap());
        assert!(
            matches!(events.try_recv(), Err(TryRecvError::Empty)),
            "refused: nothing published"
        );

        assert!(store
            .set_http_challenge(&c, p1, "tok1", Some("tok1.a"))
            .await
            .unwrap());
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::HttpChallenge {
                cluster: c.clone(),
                token: "tok1".into(),
                key_authorization: Some("tok1.a".into()),
            }
        );
        assert!(store
            .set_http_challenge(&c, p1, "tok2", Some("tok2.b"))
            .await
            .unwrap());
        let challenge = |token: &str, key: &str| HttpChallenge {
            token: token.into(),
            key_authorization: key.into(),
        };
        assert_eq!(
            store.http_challenges(&c).await.unwrap(),
            vec![challenge("tok1", "tok1.a"), challenge("tok2", "tok2.b")]
        );
        assert!(store.http_challenges(&other).await.unwrap().is_empty());

        // Withdrawn.
        assert!(store
            .set_http_challenge(&c, p1, "tok1", None)
            .await
            .unwrap());
        events.try_recv().unwrap();
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::HttpChallenge {
                cluster: c.clone(),
                token: "tok1".into(),
                key_authorization: None,
            }
        );
        assert_eq!(
            store.http_challenges(&c).await.unwrap(),
            vec![challenge("tok2", "tok2.b")]
        );

        // Answers left behind are deleted by cleanup after the retention.
        assert_eq!(store.cleanup(None, 100).await.unwrap(), 0);
        h.advance(HTTP_CHALLENGE_RETENTION + Duration::from_secs(1));
        assert_eq!(store.cleanup(None, 100).await.unwrap(), 1);
        assert!(store.http_challenges(&c).await.unwrap().is_empty());
    }

    pub async fn certificates_are_stored_and_published(h: Harness) {
        let store = &*h.store;
        let TlsParties { c, other, p1, p2 } = tls_parties(store).await;
        assert_eq!(store.certificate(&c).await.unwrap(), None);
        let mut events = h.store.events().subscribe();

        // Large enough that it could never travel in a PostgreSQL notification.
        let cert = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(20_000)
        );
        let key = "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        let stored = store.store_certificate(&c, p1, &cert, key).await.unwrap();
        assert_eq!(stored.cluster, c);
        assert_eq!(stored.cert_pem, cert);
        assert_eq!(stored.key_pem, key);
        assert_eq!(
            events.try_recv().unwrap(),
            StoreEvent::Certificate(stored.clone())
        );
        assert_eq!(store.certificate(&c).await.unwrap(), Some(stored.clone()));
        assert_eq!(store.certificate(&other).await.unwrap(), None);
        assert!(
            !format!("{stored:?}").contains("secret"),
            "Debug hides the key"
        );

        // Any proxy of the cluster may store a newer one; it replaces the old one.
        h.advance(Duration::from_secs(1));
        let newer = store
            .store_certificate(&c, p2, "-----BEGIN CERTIFICATE-----\nB\n", key)
            .await
            .unwrap();
        assert!(newer.stored_at > stored.stored_at);
        assert_eq!(store.certificate(&c).await.unwrap(), Some(newer.clone()));
        assert_eq!(events.try_recv().unwrap(), StoreEvent::Certificate(newer));
    }

    // ---- dashboard -----------------------------------------------------------------------------

    pub async fn dashboard_lists_clusters_and_recent_backends(h: Harness) {
        let store = &*h.store;
        assert!(store.active_clusters(10).await.unwrap().is_empty());
        assert!(store.recent_backends(None, 10).await.unwrap().is_empty());

        let drone = ready_drone(store, "dr-one", "").await;
        // A detached node's cluster is not listed; an attached proxy's is.
        let mut far = registration("dr-far", "", &[ExecutorKind::Docker]);
        far.cluster = "far.test".parse().unwrap();
        let (far_node, far_session) = register(store, &far).await;
        store
            .node_disconnected(far_node, far_session)
            .await
            .unwrap();
        let edge: ClusterName = "a-edge.test".parse().unwrap();
        let proxy: ProxyName = "px-one".parse().unwrap();
        store
            .register_proxy(&edge, &proxy, &controller(), "0.1.0")
            .await
            .unwrap();
        assert_eq!(
            store.active_clusters(10).await.unwrap(),
            vec![edge.clone(), cluster()]
        );
        assert_eq!(store.active_clusters(1).await.unwrap(), vec![edge]);

        let [a, b, c] = acquired_in_turn(&h, [(drone, "a"), (drone, "b"), (drone, "c")]).await;
        make_ready(store, &b.id).await;
        terminate(store, &c.id).await;

        let recent = store.recent_backends(None, 10).await.unwrap();
        let ids: Vec<BackendId> = recent.iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, vec![c.id.clone(), b.id.clone(), a.id.clone()]);
        let newest = &recent[0];
        assert_eq!(newest.cluster, cluster());
        assert_eq!(newest.drone, "dr-one".parse::<DroneName>().unwrap());
        assert_eq!(newest.key, c.key);
        assert_eq!(newest.state, terminated());

        let limited = store.recent_backends(None, 2).await.unwrap();
        assert_eq!(limited.len(), 2);
        assert_eq!(limited[1].id, b.id);

        let recent_with = |status| store.recent_backends(Some(status), 10);
        let ready = recent_with(BackendStatus::Ready).await.unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].id, b.id);
        assert_eq!(ready[0].state, BackendState::Ready { address: addr() });
        let scheduled = recent_with(BackendStatus::Scheduled).await.unwrap();
        assert_eq!(scheduled.len(), 1);
        assert_eq!(scheduled[0].id, a.id);
        assert!(recent_with(BackendStatus::Terminating)
            .await
            .unwrap()
            .is_empty());

        // Live backends by cluster and status: the terminated one is not counted.
        let count = |status, count| BackendCount {
            cluster: cluster(),
            status,
            count,
        };
        assert_eq!(
            store.live_backend_counts().await.unwrap(),
            vec![
                count(BackendStatus::Ready, 1),
                count(BackendStatus::Scheduled, 1)
            ]
        );
        terminate(store, &b.id).await;
        assert_eq!(
            store.live_backend_counts().await.unwrap(),
            vec![count(BackendStatus::Scheduled, 1)]
        );
    }

    pub async fn list_backends_filters_by_status_cluster_and_key(h: Harness) {
        let store = &*h.store;
        let all = |limit| BackendFilter {
            limit,
            ..BackendFilter::default()
        };
        assert!(store.list_backends(&all(10)).await.unwrap().is_empty());
        let drone = ready_drone(store, "dr-one", "").await;
        let mut far = registration("dr-far", "", &[ExecutorKind::Process]);
        far.cluster = "far.test".parse().unwrap();
        let (far_drone, _) = register(store, &far).await;

        let a = acquired(store, drone, "room-a").await;
        h.advance(Duration::from_millis(5));
        let mut b = new_backend(far_drone, "room-b");
        b.cluster = far.cluster.clone();
        acquire(store, b.clone()).await;
        make_ready(store, &b.id).await;
        h.advance(Duration::from_millis(5));
        let mut c = new_backend(drone, "room-a");
        c.key.namespace = "other".into();
        acquire(store, c.clone()).await;
        terminate(store, &c.id).await;

        let ids = |rows: Vec<BackendRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let list =
            |filter: BackendFilter| async move { ids(store.list_backends(&filter).await.unwrap()) };
        assert_eq!(
            list(all(10)).await,
            vec![c.id.clone(), b.id.clone(), a.id.clone()]
        );
        assert_eq!(list(all(1)).await, vec![c.id.clone()]);
        let ready = BackendFilter {
            status: Some(BackendStatus::Ready),
            ..all(10)
        };
        assert_eq!(list(ready).await, vec![b.id.clone()]);
        let far_cluster = BackendFilter {
            cluster: Some(far.cluster.clone()),
            ..all(10)
        };
        let rows = store.list_backends(&far_cluster).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].drone, "dr-far".parse::<DroneName>().unwrap());
        assert_eq!(rows[0].key, b.key);
        let room_a = BackendFilter {
            key: Some("room-a".into()),
            ..all(10)
        };
        assert_eq!(list(room_a.clone()).await, vec![c.id.clone(), a.id.clone()]);
        let room_a_ns = BackendFilter {
            namespace: Some("ns".into()),
            ..room_a.clone()
        };
        assert_eq!(list(room_a_ns).await, vec![a.id.clone()]);
        // Every condition must hold.
        let none = BackendFilter {
            status: Some(BackendStatus::Ready),
            ..room_a
        };
        assert!(list(none).await.is_empty());
        let nowhere = BackendFilter {
            cluster: Some("nowhere.test".parse().unwrap()),
            ..all(10)
        };
        assert!(list(nowhere).await.is_empty());
    }
}
