//! Token → route cache with coalesced lookups.
//!
//! Owns: the cached routes (bounded, least-recently-used entries evicted first), short-lived negative
//! entries, and the set of *pending* lookups — tokens some request is waiting for. Concurrent misses
//! for one token share one pending entry and therefore one `RouteRequest`. The session's writer asks
//! [`RouteCache::take_unsent`] for the tokens it has not yet requested on the current controller
//! connection, so after a reconnect every outstanding lookup is requested again.
//!
//! Key leases: a route to a backend that holds a key is used only while the proxy knows the key lease
//! runs: until the moment it sent the lookup plus the lease time the controller reported
//! ([`RouteInfo::lease_remaining_ms`]), less [`ROUTE_LEASE_MARGIN`] (so that the tunnels, closed by
//! a check that may run up to [`hangar_types::timing::ROUTE_LEASE_CHECK_INTERVAL`] late, are closed
//! before the key can change hands). Keepalive answers ([`RouteCache::lease_answered`]) extend the
//! bound of every route to the backend, so a proxy with traffic never asks again; a proxy cut off
//! from every controller stops routing to the backend before its key can go to another backend, and
//! [`RouteCache::lapse_leases`] names the backends whose open tunnels must close. Measuring from the
//! moment the question was sent keeps the bound on the safe side of the store clock whatever the
//! delays on the way.
//!
//! Invariant: a pending entry exists only while someone waits for it (the last waiter to leave removes
//! it), so abandoned lookups are not re-sent forever. Must not: do IO or block; the lock is never held
//! across an await.

use crate::headers::PreparedRoute;
use crate::prometheus::RouteCacheCounters;
use hangar_types::protocol::RouteInfo;
use hangar_types::timing::ROUTE_LEASE_MARGIN;
use hangar_types::token::ConnectionToken;
use hangar_types::BackendId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Most cached tokens (routes and negative entries together); beyond it the least recently used
/// tenth is evicted.
pub(crate) const ROUTE_CACHE_CAPACITY: usize = 10_000;
/// How long a negative answer ("no route") is remembered. Short, because it only shields the
/// controller from floods of requests for a dead token.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// The outcome of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Found(Arc<PreparedRoute>),
    Gone(GoneReason),
}

/// Why a token has no route (shown to the client in the 410 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GoneReason {
    /// The controller does not know the token or its backend is terminating/terminated.
    Unknown,
    /// The controller told us the token's backend is gone.
    BackendRemoved,
    /// The controller told us the token was revoked.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("no route arrived within the wait timeout")]
    TimedOut,
    #[error("the route cache is shutting down")]
    Abandoned,
}

enum Entry {
    Found {
        route: Arc<PreparedRoute>,
        last_used: u64,
        /// The end of the backend's key lease as known when this entry was last checked; `None`:
        /// unbounded (a backend without a key).
        until: Option<Instant>,
    },
    Gone {
        reason: GoneReason,
        until: Instant,
    },
}

struct Pending {
    tx: watch::Sender<Option<Route>>,
    /// The controller connection (generation) on which the request was last sent, and when.
    sent_on: Option<u64>,
    sent_at: Option<Instant>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<ConnectionToken, Entry>,
    pending: HashMap<ConnectionToken, Pending>,
    /// Logical clock for least-recently-used ordering.
    clock: u64,
    /// The latest known end of each bounded backend's key lease. Kept across controller connections
    /// and beyond the backend's cached routes: it also bounds the open tunnels to the backend.
    leases: HashMap<BackendId, Instant>,
    /// Backends asked about with a keepalive not yet answered, with when the first such keepalive was
    /// sent (the answer's lease time counts from then).
    lease_asked: HashMap<BackendId, Instant>,
}

pub(crate) struct RouteCache {
    state: Mutex<CacheState>,
    /// Wakes the session writer when there is a new token to request.
    outbound: Arc<Notify>,
    capacity: usize,
    /// Hits, misses and coalesced lookups, for the metrics endpoint.
    counters: RouteCacheCounters,
}

impl RouteCache {
    pub(crate) fn new(outbound: Arc<Notify>) -> Self {
        Self::with_capacity(outbound, ROUTE_CACHE_CAPACITY)
    }

    fn with_capacity(outbound: Arc<Notify>, capacity: usize) -> Self {
        RouteCache {
            state: Mutex::new(CacheState::default()),
            outbound,
            capacity: capacity.max(10),
            counters: RouteCacheCounters::default(),
        }
    }

    /// Counts lookups on `counters` (shared with the metrics registry).
    pub(crate) fn with_counters(mut self, counters: RouteCacheCounters) -> Self {
        self.counters = counters;
        self
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A poisoned lock only means another thread panicked mid-update; the maps stay usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached answer for `token`, if there is one (counted as a hit); never waits.
    pub(crate) fn cached(&self, token: &ConnectionToken) -> Option<Route> {
        let route = self.lock().cached(token);
        if route.is_some() {
            self.counters.hit.inc();
        }
        route
    }

    /// The route for `token`: from the cache, or from the controller (waiting at most `wait`).
    pub(crate) async fn lookup(
        &self,
        token: &ConnectionToken,
        wait: Duration,
    ) -> Result<Route, LookupError> {
        let rx = {
            let mut st = self.lock();
            if let Some(route) = st.cached(token) {
                self.counters.hit.inc();
                return Ok(route);
            }
            match st.pending.get(token) {
                Some(p) => {
                    self.counters.coalesced.inc();
                    p.tx.subscribe()
                }
                None => {
                    self.counters.miss.inc();
                    let (tx, rx) = watch::channel(None);
                    let pending = Pending {
                        tx,
                        sent_on: None,
                        sent_at: None,
                    };
                    st.pending.insert(token.clone(), pending);
                    self.outbound.notify_one();
                    rx
                }
            }
        };
        let mut waiter = Waiter {
            cache: self,
            token,
            rx: Some(rx),
        };
        let Some(rx) = waiter.rx.as_mut() else {
            return Err(LookupError::Abandoned);
        };
        let outcome = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(route)) => route.clone().ok_or(LookupError::Abandoned),
            Ok(Err(_)) => Err(LookupError::Abandoned),
            Err(_) => Err(LookupError::TimedOut),
        };
        drop(waiter);
        outcome
    }

    /// Pending tokens not yet requested on connection `generation`; marks them as requested.
    pub(crate) fn take_unsent(&self, generation: u64) -> Vec<ConnectionToken> {
        let mut st = self.lock();
        let now = Instant::now();
        st.pending
            .iter_mut()
            .filter(|(_, p)| p.sent_on != Some(generation))
            .map(|(token, p)| {
                p.sent_on = Some(generation);
                p.sent_at = Some(now);
                token.clone()
            })
            .collect()
    }

    /// A new controller connection is up. Routes cached so far are dropped: removal and revocation
    /// notices sent while we were disconnected are lost, so every token is checked again. Keepalives
    /// sent on the old connection are never answered. Known lease ends stay: they still bound tunnels.
    pub(crate) fn start_session(&self) {
        let mut st = self.lock();
        st.entries
            .retain(|_, entry| matches!(entry, Entry::Gone { .. }));
        st.lease_asked.clear();
    }

    /// A `RouteResponse` arrived. Only answers someone is waiting for are cached; late duplicates
    /// (e.g. after a revocation) are ignored.
    pub(crate) fn resolve(&self, token: ConnectionToken, route: Option<RouteInfo>) {
        let mut st = self.lock();
        let Some(pending) = st.pending.remove(&token) else {
            return;
        };
        let route = match route {
            Some(r) => {
                // Answered on the connection it was last sent on, so counted from that send.
                let sent_at = pending.sent_at.unwrap_or_else(Instant::now);
                let until = r.lease_remaining().map(|left| lease_end(sent_at, left));
                if let Some(until) = until {
                    st.extend_lease(&r.backend_id, until);
                }
                let route = Arc::new(PreparedRoute::new(r));
                st.insert_found(token, route.clone(), until, self.capacity);
                Route::Found(route)
            }
            None => {
                st.insert_gone(token, GoneReason::Unknown, self.capacity);
                Route::Gone(GoneReason::Unknown)
            }
        };
        pending.tx.send_replace(Some(route));
    }

    /// Keepalives for `backends` are about to be sent; their answers ([`Self::lease_answered`])
    /// count from now.
    pub(crate) fn lease_asked<'a>(&self, backends: impl IntoIterator<Item = &'a BackendId>) {
        let mut st = self.lock();
        let now = Instant::now();
        for backend in backends {
            st.lease_asked.entry(backend.clone()).or_insert(now);
        }
    }

    /// The controller answered a keepalive: `backend`'s key lease ran `remaining` more when it was
    /// recorded. An answer whose keepalive is not known (sent on an earlier connection, or a second
    /// answer to keepalives sent before the first came back) is ignored: its start is unknown.
    pub(crate) fn lease_answered(&self, backend: &BackendId, remaining: Duration) {
        let mut st = self.lock();
        if let Some(asked) = st.lease_asked.remove(backend) {
            st.extend_lease(backend, lease_end(asked, remaining));
        }
    }

    /// Forgets the backends whose known key lease has ended by `now` and returns them: their cached
    /// routes are no longer used, and their open tunnels must close.
    pub(crate) fn lapse_leases(&self, now: Instant) -> Vec<BackendId> {
        let mut st = self.lock();
        let lapsed: Vec<BackendId> = st
            .leases
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(backend, _)| backend.clone())
            .collect();
        for backend in &lapsed {
            st.leases.remove(backend);
        }
        lapsed
    }

    /// Every cached route to `backend` becomes "backend removed".
    pub(crate) fn remove_backend(&self, backend: &BackendId) {
        let mut st = self.lock();
        st.leases.remove(backend);
        st.lease_asked.remove(backend);
        let until = Instant::now() + NEGATIVE_TTL;
        for entry in st.entries.values_mut() {
            if matches!(entry, Entry::Found { route, .. } if &route.backend_id == backend) {
                *entry = Entry::Gone {
                    reason: GoneReason::BackendRemoved,
                    until,
                };
            }
        }
    }

    /// The tokens were revoked: forget their routes and answer their waiters with "revoked".
    pub(crate) fn revoke(&self, tokens: &[ConnectionToken]) {
        let mut st = self.lock();
        let gone = Route::Gone(GoneReason::Revoked);
        for token in tokens {
            st.insert_gone(token.clone(), GoneReason::Revoked, self.capacity);
            if let Some(pending) = st.pending.remove(token) {
                pending.tx.send_replace(Some(gone.clone()));
            }
        }
    }

    /// Forgets every cached route of `user` to `backend`, whichever token it came with: a revocation
    /// names the tokens the store deleted, and the store may have forgotten some. Forgotten, not
    /// marked revoked: the next request asks the controller, which refuses a revoked or forgotten
    /// token and still routes a token issued after the revocation (whose route may have been cached
    /// before the revocation arrived, when it was relayed from another controller).
    pub(crate) fn revoke_holder(&self, backend: &BackendId, user: &str) {
        self.lock().entries.retain(|_, entry| {
            !matches!(entry, Entry::Found { route, .. }
                if &route.backend_id == backend && route.user.as_deref() == Some(user))
        });
    }

    /// Number of tokens waiting for the controller's answer.
    #[cfg(test)]
    fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Number of requests waiting for a route (possibly several per token).
    pub(crate) fn waiting_requests(&self) -> usize {
        self.lock()
            .pending
            .values()
            .map(|p| p.tx.receiver_count())
            .sum()
    }

    /// Called when a waiter leaves: drop the pending entry if nobody waits any more.
    fn leave(&self, token: &ConnectionToken) {
        let mut st = self.lock();
        if st
            .pending
            .get(token)
            .is_some_and(|p| p.tx.receiver_count() == 0)
        {
            st.pending.remove(token);
        }
    }
}

/// One request's interest in a pending lookup; leaving (answered, timed out or cancelled because
/// the client went away) cleans up the pending entry when it was the last one.
struct Waiter<'a> {
    cache: &'a RouteCache,
    token: &'a ConnectionToken,
    rx: Option<watch::Receiver<Option<Route>>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // The receiver must be gone before counting the remaining ones.
        drop(self.rx.take());
        self.cache.leave(self.token);
    }
}

impl CacheState {
    fn cached(&mut self, token: &ConnectionToken) -> Option<Route> {
        self.clock += 1;
        let now = Instant::now();
        match self.entries.get_mut(token)? {
            Entry::Found {
                route,
                last_used,
                until,
            } => {
                if until.is_some_and(|until| until <= now) {
                    // The lease the route was resolved under has run out, unless a keepalive answer
                    // extended it since.
                    match self.leases.get(&route.backend_id) {
                        Some(lease) if *lease > now => *until = Some(*lease),
                        _ => {
                            self.entries.remove(token);
                            return None;
                        }
                    }
                }
                *last_used = self.clock;
                Some(Route::Found(route.clone()))
            }
            Entry::Gone { reason, until } if *until > now => Some(Route::Gone(*reason)),
            Entry::Gone { .. } => {
                self.entries.remove(token);
                None
            }
        }
    }

    fn extend_lease(&mut self, backend: &BackendId, until: Instant) {
        let lease = self.leases.entry(backend.clone()).or_insert(until);
        *lease = (*lease).max(until);
    }

    fn insert_found(
        &mut self,
        token: ConnectionToken,
        route: Arc<PreparedRoute>,
        until: Option<Instant>,
        capacity: usize,
    ) {
        self.clock += 1;
        let entry = Entry::Found {
            route,
            last_used: self.clock,
            until,
        };
        self.insert(token, entry, capacity);
    }

    fn insert_gone(&mut self, token: ConnectionToken, reason: GoneReason, capacity: usize) {
        let entry = Entry::Gone {
            reason,
            until: Instant::now() + NEGATIVE_TTL,
        };
        self.insert(token, entry, capacity);
    }

    fn insert(&mut self, token: ConnectionToken, entry: Entry, capacity: usize) {
        self.entries.insert(token, entry);
        if self.entries.len() > capacity {
            self.evict(capacity);
        }
    }

    /// Evicts down to 90 % of `capacity`: negative entries first, then the least recently used.
    fn evict(&mut self, capacity: usize) {
        let keep = capacity - capacity / 10;
        let mut ranked: Vec<(u64, ConnectionToken)> = self
            .entries
            .iter()
            .map(|(token, entry)| match entry {
                Entry::Found { last_used, .. } => (*last_used, token.clone()),
                Entry::Gone { .. } => (0, token.clone()),
            })
            .collect();
        ranked.sort_unstable_by_key(|(rank, _)| *rank);
        let excess = ranked.len().saturating_sub(keep);
        for (_, token) in ranked.into_iter().take(excess) {
            self.entries.remove(&token);
        }
    }
}

/// The end of a route's lease as the proxy keeps it: `remaining` (the controller's figure) counted
/// from `asked` (when the question was sent), less [`ROUTE_LEASE_MARGIN`].
fn lease_end(asked: Instant, remaining: Duration) -> Instant {
    asked + remaining.saturating_sub(ROUTE_LEASE_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::token::SecretToken;

    const WAIT: Duration = Duration::from_secs(60);

    fn route(backend: &str) -> RouteInfo {
        RouteInfo {
            backend_id: backend.parse().unwrap(),
            address: "127.0.0.1:1".parse().unwrap(),
            secret_token: SecretToken::empty(),
            cluster: "localhost:1".parse().unwrap(),
            user: None,
            user_data: None,
            subdomain: None,
            lease_remaining_ms: None,
        }
    }

    /// A route whose backend's key lease runs `left` more.
    fn leased(backend: &str, left: Duration) -> RouteInfo {
        RouteInfo {
            lease_remaining_ms: Some(u64::try_from(left.as_millis()).unwrap()),
            ..route(backend)
        }
    }

    fn new_cache() -> Arc<RouteCache> {
        Arc::new(RouteCache::new(Arc::new(Notify::new())))
    }

    /// Starts a lookup of `token` in a task; returns once the lookup waits for the controller.
    async fn pending_lookup(
        cache: &Arc<RouteCache>,
        token: &ConnectionToken,
    ) -> tokio::task::JoinHandle<Result<Route, LookupError>> {
        let (c2, t2) = (cache.clone(), token.clone());
        let l = tokio::spawn(async move { c2.lookup(&t2, WAIT).await });
        while cache.pending_count() == 0 {
            tokio::task::yield_now().await;
        }
        l
    }

    /// Registers a lookup of `token`, sends it, and answers it with `route`.
    async fn resolved(cache: &Arc<RouteCache>, token: &ConnectionToken, route: RouteInfo) {
        let l = pending_lookup(cache, token).await;
        assert_eq!(cache.take_unsent(1), vec![token.clone()]);
        cache.resolve(token.clone(), Some(route));
        assert!(matches!(l.await.unwrap(), Ok(Route::Found(_))));
    }

    /// A cache in which token `t1` is resolved to backend `b1`, whose key lease runs `left` more.
    async fn with_leased_route(left: Duration) -> (Arc<RouteCache>, BackendId, ConnectionToken) {
        let (cache, t) = (new_cache(), tok("t1"));
        resolved(&cache, &t, leased("b1", left)).await;
        (cache, "b1".parse().unwrap(), t)
    }

    /// A route to `backend` as the cache keeps it.
    fn found(backend: &str) -> Arc<PreparedRoute> {
        Arc::new(PreparedRoute::new(route(backend)))
    }

    fn tok(s: &str) -> ConnectionToken {
        ConnectionToken::from_path_segment(s)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_share_one_request_and_one_answer() {
        crate::with_test_timeout(async {
            let cache = new_cache();
            let t = tok("t1");
            let lookups: Vec<_> = (0..10)
                .map(|_| {
                    let cache = cache.clone();
                    let t = t.clone();
                    tokio::spawn(async move { cache.lookup(&t, WAIT).await })
                })
                .collect();
            // Let every lookup register.
            while cache.lock().pending.get(&t).map(|p| p.tx.receiver_count()) != Some(10) {
                tokio::task::yield_now().await;
            }
            assert_eq!(cache.take_unsent(1), vec![t.clone()]);
            assert!(cache.take_unsent(1).is_empty());
            // A new connection re-sends what is still outstanding.
            assert_eq!(cache.take_unsent(2), vec![t.clone()]);
            cache.resolve(t.clone(), Some(route("b1")));
            for l in lookups {
                let r = l.await.unwrap().unwrap();
                assert!(matches!(r, Route::Found(ref r) if r.backend_id.as_str() == "b1"));
            }
            assert_eq!(cache.pending_count(), 0);
            // Now cached: no new request.
            assert!(matches!(cache.lookup(&t, WAIT).await, Ok(Route::Found(_))));
            assert!(cache.take_unsent(2).is_empty());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_and_cancellation_clean_up_pending() {
        crate::with_test_timeout(async {
            let cache = RouteCache::new(Arc::new(Notify::new()));
            let t = tok("t1");
            assert_eq!(
                cache.lookup(&t, Duration::from_secs(1)).await,
                Err(LookupError::TimedOut)
            );
            assert_eq!(cache.pending_count(), 0);
            // A late answer for an abandoned lookup is not cached.
            cache.resolve(t.clone(), Some(route("b1")));
            assert!(cache.lock().entries.is_empty());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn negative_answers_expire() {
        crate::with_test_timeout(async {
            let cache = new_cache();
            let t = tok("t1");
            let l = pending_lookup(&cache, &t).await;
            cache.resolve(t.clone(), None);
            assert_eq!(l.await.unwrap(), Ok(Route::Gone(GoneReason::Unknown)));
            assert_eq!(
                cache.lookup(&t, WAIT).await,
                Ok(Route::Gone(GoneReason::Unknown))
            );
            tokio::time::advance(NEGATIVE_TTL + Duration::from_millis(1)).await;
            assert!(cache.lock().cached(&t).is_none());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn removal_revocation_and_new_session_invalidate() {
        crate::with_test_timeout(async {
            let cache = RouteCache::new(Arc::new(Notify::new()));
            {
                let mut st = cache.lock();
                st.insert_found(tok("a"), found("b1"), None, 100);
                st.insert_found(tok("b"), found("b1"), None, 100);
                st.insert_found(tok("c"), found("b2"), None, 100);
                st.insert_found(tok("d"), found("b3"), None, 100);
            }
            cache.remove_backend(&"b1".parse().unwrap());
            assert_eq!(
                cache.lookup(&tok("a"), WAIT).await,
                Ok(Route::Gone(GoneReason::BackendRemoved))
            );
            assert_eq!(
                cache.lookup(&tok("b"), WAIT).await,
                Ok(Route::Gone(GoneReason::BackendRemoved))
            );
            assert!(matches!(
                cache.lookup(&tok("c"), WAIT).await,
                Ok(Route::Found(_))
            ));
            cache.revoke(&[tok("c")]);
            assert_eq!(
                cache.lookup(&tok("c"), WAIT).await,
                Ok(Route::Gone(GoneReason::Revoked))
            );
            cache.start_session();
            let st = cache.lock();
            assert!(!st.entries.contains_key(&tok("d")));
            assert!(st.entries.contains_key(&tok("c")));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_holder_loses_every_cached_route_of_its_user() {
        crate::with_test_timeout(async {
            let cache = new_cache();
            let of = |backend: &str, user: Option<&str>| RouteInfo {
                user: user.map(str::to_string),
                ..route(backend)
            };
            for (token, info) in [
                ("a1", of("b1", Some("alice"))),
                ("a2", of("b1", Some("alice"))),
                ("bob", of("b1", Some("bob"))),
                ("anon", of("b1", None)),
                ("elsewhere", of("b2", Some("alice"))),
            ] {
                let route = Arc::new(PreparedRoute::new(info));
                cache.lock().insert_found(tok(token), route, None, 100);
            }
            cache.revoke_holder(&"b1".parse().unwrap(), "alice");
            // Forgotten: the next request asks the controller.
            for gone in ["a1", "a2"] {
                assert_eq!(cache.cached(&tok(gone)), None, "{gone}");
            }
            for kept in ["bob", "anon", "elsewhere"] {
                assert!(
                    matches!(cache.cached(&tok(kept)), Some(Route::Found(_))),
                    "{kept}"
                );
            }
            // A token asked for again gets the controller's answer.
            let again = pending_lookup(&cache, &tok("a1")).await;
            cache.resolve(tok("a1"), None);
            assert_eq!(again.await.unwrap(), Ok(Route::Gone(GoneReason::Unknown)));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_answers_waiters() {
        crate::with_test_timeout(async {
            let cache = new_cache();
            let l = pending_lookup(&cache, &tok("x")).await;
            cache.revoke(&[tok("x")]);
            assert_eq!(l.await.unwrap(), Ok(Route::Gone(GoneReason::Revoked)));
            // The controller's late answer does not bring the route back.
            cache.resolve(tok("x"), Some(route("b1")));
            assert_eq!(
                cache.lookup(&tok("x"), WAIT).await,
                Ok(Route::Gone(GoneReason::Revoked))
            );
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_is_used_only_while_its_key_lease_runs() {
        crate::with_test_timeout(async {
            let lease = Duration::from_secs(30);
            let (cache, b1, t) = with_leased_route(lease).await;
            tokio::time::advance(lease - ROUTE_LEASE_MARGIN - Duration::from_millis(1)).await;
            assert!(matches!(cache.cached(&t), Some(Route::Found(_))));
            assert!(cache.lapse_leases(Instant::now()).is_empty());
            // No keepalive answer: the margin before the lease's end, the route is not used any more,
            // and its tunnels must close.
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(cache.cached(&t), None);
            assert_eq!(cache.lapse_leases(Instant::now()), vec![b1.clone()]);
            assert!(cache.lapse_leases(Instant::now()).is_empty());
            // An unbounded route (no key, or an older controller) stays.
            let u = tok("t2");
            resolved(&cache, &u, route("b2")).await;
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert!(matches!(cache.cached(&u), Some(Route::Found(_))));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_answers_extend_the_lease_from_when_they_were_asked() {
        crate::with_test_timeout(async {
            let (cache, b1, t) = with_leased_route(Duration::from_secs(30)).await;
            tokio::time::advance(Duration::from_secs(20)).await;
            cache.lease_asked([&b1]);
            // The answer takes 5 s to arrive; the lease counts from the question.
            tokio::time::advance(Duration::from_secs(5)).await;
            cache.lease_answered(&b1, Duration::from_secs(30));
            // 20 + 30 s less the margin, less 1 ms: still in.
            tokio::time::advance(
                Duration::from_secs(25) - ROUTE_LEASE_MARGIN - Duration::from_millis(1),
            )
            .await;
            assert!(matches!(cache.cached(&t), Some(Route::Found(_))));
            assert!(cache.lapse_leases(Instant::now()).is_empty());
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(cache.cached(&t), None);
            assert_eq!(cache.lapse_leases(Instant::now()), vec![b1.clone()]);
            // An answer to a keepalive of an earlier connection is ignored: its start is unknown.
            let t3 = tok("t3");
            resolved(&cache, &t3, leased("b1", Duration::from_secs(10))).await;
            cache.lease_asked([&b1]);
            cache.start_session();
            cache.lease_answered(&b1, Duration::from_secs(60));
            tokio::time::advance(Duration::from_secs(10)).await;
            assert_eq!(cache.lapse_leases(Instant::now()), vec![b1]);
        })
        .await;
    }

    #[test]
    fn eviction_drops_least_recently_used() {
        let cache = RouteCache::with_capacity(Arc::new(Notify::new()), 10);
        let mut st = cache.lock();
        for i in 0..10 {
            st.insert_found(tok(&i.to_string()), found("b1"), None, 10);
        }
        // Touch "0" so it is the most recently used.
        assert!(st.cached(&tok("0")).is_some());
        st.insert_found(tok("new"), found("b1"), None, 10);
        assert_eq!(st.entries.len(), 9);
        assert!(st.entries.contains_key(&tok("0")));
        assert!(st.entries.contains_key(&tok("new")));
        assert!(!st.entries.contains_key(&tok("1")));
        assert!(!st.entries.contains_key(&tok("2")));
    }
}
