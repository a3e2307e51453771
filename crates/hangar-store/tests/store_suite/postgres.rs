//! PostgreSQL harness of the store suite, and the cases only PostgreSQL has: several stores (several
//! controllers) sharing one database.
//!
//! `HANGAR_TEST_POSTGRES_URL` names a server and a user allowed to create databases, e.g.
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres` (`scripts/start-postgres.sh` starts a local
//! server and prints it). Each test creates its own database `hangar_test_<random>` and drops it
//! afterwards (best effort; `hangar_test_support::postgres`). Without the variable these tests are skipped with a message, except under
//! `CI`, where they fail.

use super::{run_then_teardown, suite, Harness, TEST_TIMEOUT};
use hangar_chaos::relay::{Relay, RelayMode};
use hangar_store::postgres::PostgresStore;
use hangar_store::{
    Acquire, KeyLookup, KeyRef, NewToken, StateUpdate, Store, StoreError, StoreEvent,
};
use hangar_test_support::postgres::TestDatabase;
use hangar_types::protocol::TokenHolder;
use hangar_types::token::{ConnectionToken, SecretToken};
use hangar_types::{BackendState, BackendStatus, TerminationKind, TerminationReason};
use sqlx::{Connection, PgConnection};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// How long to wait for an event relayed through the database; relaying takes milliseconds.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

/// The suite's factory: a store on a fresh database.
pub async fn harness() -> Option<Harness> {
    let db = TestDatabase::create().await?;
    let store = Arc::new(PostgresStore::connect(db.url()).await.unwrap());
    let (a, r) = (store.clone(), store.clone());
    Some(Harness {
        store,
        advance: Box::new(move |d| a.advance_clock(d)),
        rewind: Box::new(move |d| r.rewind_clock(d)),
        _guard: None,
        teardown: std::sync::Mutex::new(Some(Box::pin(db.drop_database()))),
    })
}

/// Runs `case` on the URL of a fresh database, then drops the database.
async fn with_database<F>(case: impl FnOnce(String) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let db = tokio::time::timeout(TEST_TIMEOUT, TestDatabase::create())
        .await
        .expect("test setup timed out");
    let Some(db) = db else {
        return;
    };
    let case = case(db.url().to_string());
    run_then_teardown(case, Some(Box::pin(db.drop_database()))).await;
}

/// Two stores on the database at `url`, as two controllers sharing it.
async fn two_stores(url: &str) -> [PostgresStore; 2] {
    [
        PostgresStore::connect(url).await.unwrap(),
        PostgresStore::connect(url).await.unwrap(),
    ]
}

/// The next event on `rx`, waiting at most `within`.
async fn next_event(rx: &mut broadcast::Receiver<StoreEvent>, within: Duration) -> StoreEvent {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("no relayed event in time")
        .expect("event bus closed or lagged")
}

async fn relayed(rx: &mut broadcast::Receiver<StoreEvent>) -> StoreEvent {
    next_event(rx, RELAY_TIMEOUT).await
}

async fn applied(
    store: &dyn Store,
    id: &hangar_types::BackendId,
    state: &BackendState,
) -> StoreEvent {
    match store.record_backend_state(id, state).await.unwrap() {
        StateUpdate::Applied { time } => StoreEvent::BackendState {
            backend: id.clone(),
            state: state.clone(),
            time,
        },
        other => panic!("expected Applied, got {other:?}"),
    }
}

/// What one controller commits reaches the other controllers' buses once, and its own bus once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_other_stores() {
    with_database(|url| async move {
        let [a, b] = two_stores(&url).await;
        let mut on_a = a.events().subscribe();
        let mut on_b = b.events().subscribe();

        // A spawn through `a`: the state goes inline, the action by reference.
        let drone = suite::ready_drone(&a, "dr-one", "").await;
        let nb = suite::new_backend(drone, "shared");
        let id = nb.id.clone();
        let (_, spawn) = suite::acquire(&a, nb).await;
        let scheduled = StoreEvent::BackendState {
            backend: id.clone(),
            state: BackendState::Scheduled,
            time: a.backend(&id).await.unwrap().unwrap().created_at,
        };
        let spawned = StoreEvent::Action {
            drone,
            action: spawn,
        };
        assert_eq!(relayed(&mut on_b).await, scheduled);
        assert_eq!(relayed(&mut on_b).await, spawned);
        assert_eq!(on_a.try_recv().unwrap(), scheduled);
        assert_eq!(on_a.try_recv().unwrap(), spawned);

        // A state recorded and a terminate queued through `b` reach `a`.
        let loading = applied(&b, &id, &BackendState::Loading).await;
        assert_eq!(relayed(&mut on_a).await, loading);
        assert_eq!(on_b.try_recv().unwrap(), loading);
        let terminate = b
            .queue_terminate(&id, TerminationKind::Soft, TerminationReason::External)
            .await
            .unwrap()
            .unwrap();
        let terminate = StoreEvent::Action {
            drone,
            action: terminate,
        };
        assert_eq!(relayed(&mut on_a).await, terminate);
        assert_eq!(on_b.try_recv().unwrap(), terminate);

        // Revoked tokens.
        let token = NewToken {
            token: ConnectionToken::random(),
            backend: id.clone(),
            secret: SecretToken::random(),
            user: Some("alice".into()),
            auth: serde_json::Map::new(),
            lifetime: Duration::from_secs(60),
        };
        a.insert_token(token.clone()).await.unwrap();
        assert_eq!(a.revoke_tokens(&id, "alice").await.unwrap().len(), 1);
        let revoked = StoreEvent::TokensRevoked {
            tokens: vec![token.token],
            holder: Some(TokenHolder {
                backend: id.clone(),
                user: "alice".into(),
            }),
        };
        assert_eq!(relayed(&mut on_b).await, revoked);
        assert_eq!(on_a.try_recv().unwrap(), revoked);

        // A state too large for a notification travels by reference and arrives whole.
        let large = BackendState::Terminated {
            last_status: BackendStatus::Loading,
            termination: Some(TerminationKind::Hard),
            reason: Some(TerminationReason::External),
            exit_code: Some(1),
            message: Some("x".repeat(20_000)),
            oom_killed: false,
        };
        let terminated = applied(&a, &id, &large).await;
        assert_eq!(relayed(&mut on_b).await, terminated);
        assert_eq!(on_a.try_recv().unwrap(), terminated);

        // No store hears its own events back. Notifications arrive in commit order, so an echo of an
        // earlier event would come before the other store's next one.
        let marker = suite::new_backend(drone, "marker");
        suite::acquire(&b, marker.clone()).await;
        assert!(matches!(
            on_b.try_recv(),
            Ok(StoreEvent::BackendState { .. })
        ));
        assert!(matches!(on_b.try_recv(), Ok(StoreEvent::Action { .. })));
        match relayed(&mut on_a).await {
            StoreEvent::BackendState { backend, .. } => assert_eq!(backend, marker.id),
            other => panic!("expected the marker's state, got {other:?}"),
        }
        assert!(matches!(
            relayed(&mut on_a).await,
            StoreEvent::Action { .. }
        ));
        let last = applied(&a, &marker.id, &BackendState::Loading).await;
        assert_eq!(relayed(&mut on_b).await, last);
        assert_eq!(on_a.try_recv().unwrap(), last);
        assert!(on_a.try_recv().is_err(), "nothing else on a");
        assert!(on_b.try_recv().is_err(), "nothing else on b");
    })
    .await;
}

/// 50 concurrent acquisitions of one key through two controllers: one winner, the others see the key
/// held, nobody gets an error; fencing tokens increase from round to round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquire_across_stores_has_one_winner() {
    with_database(|url| async move {
        let stores = two_stores(&url).await.map(Arc::new);
        let drone = suite::ready_drone(&*stores[0], "dr-one", "").await;
        let mut last_token = i64::MIN;
        for round in 0..3 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..50 {
                let store = stores[i % 2].clone();
                let nb = suite::new_backend(drone, "contended");
                tasks.spawn(async move {
                    let id = nb.id.clone();
                    (id, store.insert_backend_with_key(nb).await)
                });
            }
            let mut winners = Vec::new();
            let mut held = 0;
            while let Some(joined) = tasks.join_next().await {
                match joined.unwrap() {
                    (id, Ok(Acquire::Acquired { fencing_token, .. })) => {
                        winners.push((id, fencing_token))
                    }
                    (_, Ok(Acquire::KeyHeld)) => held += 1,
                    (_, Ok(Acquire::BackendIdTaken)) => panic!("ids are distinct"),
                    (_, Err(e)) => panic!("an acquisition failed instead of losing: {e}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
            assert_eq!(held, 49);
            let (winner, token) = winners.pop().unwrap();
            assert!(
                token > last_token,
                "round {round}: {token} after {last_token}"
            );
            last_token = token;
            for store in &stores {
                let key = KeyRef {
                    namespace: "ns".into(),
                    name: "contended".into(),
                };
                match store.key_lookup(&key).await.unwrap() {
                    KeyLookup::Live { backend, .. } => {
                        assert_eq!(backend.id, winner);
                        assert_eq!(backend.fencing_token, token);
                    }
                    other => panic!("expected Live, got {other:?}"),
                }
            }
            suite::terminate(&*stores[round % 2], &winner).await;
        }
        assert_eq!(
            stores[1].pending_actions(drone, 100).await.unwrap().len(),
            3,
            "one spawn per round, none from the losers"
        );
    })
    .await;
}

/// Kills the listening connections; the stores listen again and relay events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_losing_its_connection() {
    with_database(|url| async move {
        let [a, b] = two_stores(&url).await;
        let drone = suite::ready_drone(&a, "dr-one", "").await;
        let mut on_b = b.events().subscribe();

        let mut admin = PgConnection::connect(&url).await.unwrap();
        // Waits (up to 5 s each) until the connections are gone.
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND query LIKE 'LISTEN %') AS t",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert_eq!(killed, 2, "one listening connection per store");

        // Events sent while a listener is away are lost; keep sending until one gets through.
        let deadline = tokio::time::Instant::now() + RELAY_TIMEOUT * 3;
        for attempt in 0.. {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event relayed after the listener lost its connection"
            );
            let nb = suite::new_backend(drone, &format!("probe-{attempt}"));
            let id = nb.id.clone();
            suite::acquire(&a, nb).await;
            let probe = async {
                loop {
                    match on_b.recv().await.unwrap() {
                        StoreEvent::BackendState { backend, .. } if backend == id => return,
                        _ => {}
                    }
                }
            };
            if tokio::time::timeout(Duration::from_millis(250), probe)
                .await
                .is_ok()
            {
                break;
            }
        }
        let _ = admin.close().await;
    })
    .await;
}

/// The server closes every connection of the store (as a restart does) while they are idle: the next
/// group-committed batches (a spawn, a drone's report, a reconnect's token) are written on fresh
/// connections instead of failing on the dead ones the batches keep outside the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_after_the_server_closed_their_idle_connections_succeed() {
    with_database(|url| async move {
        let store = PostgresStore::connect(&url).await.unwrap();
        let drone = suite::ready_drone(&store, "dr-one", "").await;
        // Every kind of batch has written once, so each keeps a connection of its own.
        let first = suite::acquired(&store, drone, "before").await;
        applied(&store, &first.id, &BackendState::Loading).await;
        store.insert_token(token_for(&first.id)).await.unwrap();

        let mut admin = PgConnection::connect(&url).await.unwrap();
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(
            killed >= 3,
            "the batches' own connections were there: {killed}"
        );
        let _ = admin.close().await;
        // Not a wait for an event: the batches check a connection first only once it has been idle
        // for the store's `IDLE_PING_AFTER` (1 s), the case a restart leaves them in.
        tokio::time::sleep(Duration::from_millis(1_100)).await;

        let second = suite::acquired(&store, drone, "after").await;
        applied(&store, &second.id, &BackendState::Loading).await;
        store.insert_token(token_for(&second.id)).await.unwrap();
    })
    .await;
}

/// A dynamic token for `backend`.
fn token_for(backend: &hangar_types::BackendId) -> NewToken {
    NewToken {
        token: ConnectionToken::random(),
        backend: backend.clone(),
        secret: SecretToken::random(),
        user: None,
        auth: serde_json::Map::new(),
        lifetime: Duration::from_secs(60),
    }
}

/// Notifications on the channel that do not decode, or point at nothing, are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_notifications_are_ignored() {
    with_database(|url| async move {
        let [a, b] = two_stores(&url).await;
        let mut on_b = b.events().subscribe();
        let mut admin = PgConnection::connect(&url).await.unwrap();
        for payload in [
            "garbage",
            r#"{"origin":"elsewhere","events":[{"kind":"action","drone":1,"action_id":"ak-nothing"}]}"#,
            r#"{"origin":"elsewhere","events":[{"kind":"state_row","history_id":12345}]}"#,
            r#"{"origin":"elsewhere","events":[{"kind":"unknown"}]}"#,
        ] {
            sqlx::query("SELECT pg_notify('hangar_events', $1)")
                .bind(payload)
                .execute(&mut admin)
                .await
                .unwrap();
        }
        let _ = admin.close().await;

        let drone = suite::ready_drone(&a, "dr-one", "").await;
        let nb = suite::new_backend(drone, "after-strays");
        suite::acquire(&a, nb.clone()).await;
        match relayed(&mut on_b).await {
            StoreEvent::BackendState { backend, .. } => assert_eq!(backend, nb.id),
            other => panic!("expected the real event first, got {other:?}"),
        }
        b.health().await.unwrap();
    })
    .await;
}

/// `hangar migrate` can run any number of times, before or after stores connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_repeatable() {
    with_database(|url| async move {
        hangar_store::postgres::migrate(&url).await.unwrap();
        hangar_store::postgres::migrate(&url).await.unwrap();
        let store = PostgresStore::connect(&url).await.unwrap();
        store.health().await.unwrap();
        hangar_store::postgres::migrate(&url).await.unwrap();
        let before = store.now().await.unwrap();
        store.advance_clock(Duration::from_secs(3600));
        assert!(store.now().await.unwrap().0 >= before.0 + 3_600_000);
        store.close().await;
        assert!(store.health().await.is_err(), "closed");
        assert!(hangar_store::postgres::migrate("not a url").await.is_err());
    })
    .await;
}

/// ACME challenges (inline) and certificates (by pointer, however large) reach the other controllers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_events_reach_other_stores() {
    with_database(|url| async move {
        let [a, b] = two_stores(&url).await;
        let mut on_b = b.events().subscribe();
        let cluster = suite::cluster();
        let proxy = suite::proxy_node(&a, "px-one").await;
        assert!(a.acquire_cert_lease(&cluster, proxy).await.unwrap());

        assert!(a
            .set_http_challenge(&cluster, proxy, "tok", Some("tok.thumb"))
            .await
            .unwrap());
        assert_eq!(
            relayed(&mut on_b).await,
            StoreEvent::HttpChallenge {
                cluster: cluster.clone(),
                token: "tok".into(),
                key_authorization: Some("tok.thumb".into()),
            }
        );
        // The lease and its TXT value are shared through the database.
        assert!(a
            .set_txt_record(&cluster, proxy, Some("txt"))
            .await
            .unwrap());
        assert_eq!(
            b.txt_record(&cluster).await.unwrap().as_deref(),
            Some("txt")
        );

        let cert = format!("-----BEGIN CERTIFICATE-----\n{}\n", "A".repeat(50_000));
        let stored = a
            .store_certificate(&cluster, proxy, &cert, "-----BEGIN PRIVATE KEY-----\n")
            .await
            .unwrap();
        assert_eq!(relayed(&mut on_b).await, StoreEvent::Certificate(stored));
    })
    .await;
}

/// Concurrent lease requests of two proxies through two controllers: only one proxy ever wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_lease_has_one_holder_across_stores() {
    with_database(|url| async move {
        let stores = two_stores(&url).await.map(Arc::new);
        let proxies = [
            suite::proxy_node(&*stores[0], "px-one").await,
            suite::proxy_node(&*stores[1], "px-two").await,
        ];
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let store = stores[i % 2].clone();
            let proxy = proxies[(i / 2) % 2];
            tasks.spawn(async move {
                let accepted = store
                    .acquire_cert_lease(&suite::cluster(), proxy)
                    .await
                    .unwrap();
                (proxy, accepted)
            });
        }
        let mut winners = std::collections::HashSet::new();
        while let Some(joined) = tasks.join_next().await {
            let (proxy, accepted) = joined.unwrap();
            if accepted {
                winners.insert(proxy);
            }
        }
        assert_eq!(winners.len(), 1, "one holder: {winners:?}");
    })
    .await;
}

/// Two controllers claim from one warm pool of 10 ready backends with 50 connects at once: each warm
/// backend is claimed at most once, each claim gets exactly one backend or none, and the pool counts
/// exactly the claims made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_claims_across_stores_take_distinct_backends() {
    use crate::warm_pools::{futures_join, put, ready_warm, warm_claim, warm_config};
    use hangar_store::WarmClaimOutcome;
    with_database(|url| async move {
        let a: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
        let b: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
        let drone = suite::ready_drone(&*a, "dr-one", "").await;
        let pool = put(&*a, "p", &warm_config(10, "a")).await;
        let mut warm = Vec::new();
        for _ in 0..10 {
            warm.push(ready_warm(&*a, &pool, drone).await);
        }
        let claims = (0..50).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .claim_warm_backend(warm_claim("p", &format!("k{i}")))
                    .await
                    .unwrap()
            })
        });
        let outcomes = futures_join(claims).await;
        let mut claimed: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                WarmClaimOutcome::Claimed { backend } => Some(backend.id.clone()),
                WarmClaimOutcome::Empty => None,
                WarmClaimOutcome::KeyHeld => panic!("distinct keys cannot be held"),
            })
            .collect();
        claimed.sort();
        warm.sort();
        assert_eq!(claimed, warm, "each warm backend claimed exactly once");
        let counted = suite::pool_counts(&*b, &pool).await;
        assert_eq!((counted.ready, counted.claimed), (0, 10));
    })
    .await;
}

/// A store call whose link to the database black-holes (the TCP connection stays up, the bytes
/// vanish) fails at its deadline with a retryable error, and once the link passes again the store
/// works: the connections the abandoned calls left mid-exchange are closed, not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_calls_end_at_their_deadline_and_the_pool_recovers() {
    with_database(|url| async move {
        let url = url::Url::parse(&url).unwrap();
        let (relay, url) = Relay::start_for_postgres_url(&url).await.unwrap();
        let store = Arc::new(PostgresStore::connect(url.as_str()).await.unwrap());
        concurrent_health(&store, 5).await;
        store.set_call_deadline(Duration::from_secs(2));

        relay.set(RelayMode::BlackHole);
        for outcome in concurrent_health(&store, 5).await {
            let err = outcome.unwrap_err();
            assert!(
                matches!(err, StoreError::DeadlineExceeded(_)),
                "expected the deadline, got {err}"
            );
            assert!(err.is_retryable(), "{err}");
        }
        relay.set(RelayMode::Pass);
        // Calls may still fail (retryably) while the abandoned connections are being closed.
        loop {
            match store.health().await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {}
                Err(e) => panic!("not retryable: {e}"),
            }
        }
        // Dropped, not closed: `close` waits for every connection to come back, which after a black
        // hole sometimes takes most of a minute (seen in 1 of 5 runs; not investigated yet).
        drop(store);
        drop(relay);
    })
    .await;
}

async fn concurrent_health(store: &Arc<PostgresStore>, n: usize) -> Vec<Result<(), StoreError>> {
    let calls = (0..n).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.health().await })
    });
    let mut outcomes = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        outcomes.push(call.await.unwrap());
    }
    outcomes
}
