//! Per-backend connection accounting and keepalive scheduling.
//!
//! Owns: for each backend with recent traffic, the number of open connections (in-flight HTTP
//! exchanges including their streaming response bodies, and WebSocket tunnels) and whether there was
//! activity since the last visit; a FIFO of visits (every visit is [`HEARTBEAT_INTERVAL`] after the
//! previous one, so the queue is ordered by construction); the keepalives waiting to be sent.
//!
//! Rules: a backend's first activity queues a `KeepAlive` at once and schedules a visit one interval
//! later. A visit queues another keepalive if the backend has open connections or had activity since
//! the previous visit, else forgets the backend. When the last open connection closes, a keepalive is
//! queued at once so the controller's idle clock starts exactly then. Each keepalive says whether the
//! backend has open connections at the moment it is sent. Counts are exact because every open
//! connection is a [`ConnectionGuard`] that decrements on drop, whatever ends the connection.
//!
//! Must not: do IO (the session sends the keepalives) or hold the lock across an await.

use hangar_types::timing::HEARTBEAT_INTERVAL;
use hangar_types::BackendId;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the tracker knows about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Open connections through this proxy: in-flight HTTP exchanges (until the response body is
    /// finished or dropped) and WebSocket (upgraded) tunnels.
    pub open_connections: usize,
    /// Whether there was traffic since the last keepalive visit.
    pub recent_activity: bool,
}

struct Activity {
    open: usize,
    recent: bool,
    /// The controller said the backend is gone: no more keepalives, forget it once idle.
    removed: bool,
    /// The last keepalive sent told the controller the backend has open connections; the last
    /// connection closing must then be reported at once (and only then, so short requests do not
    /// each cost a keepalive).
    reported_connected: bool,
    /// Distinguishes this entry from an earlier one for the same backend (stale visits and guards
    /// of a forgotten entry are ignored).
    epoch: u64,
    /// Fired when the controller says the backend is terminated: its open tunnels close at once.
    severed: CancellationToken,
}

#[derive(Default)]
struct TrackerState {
    backends: HashMap<BackendId, Activity>,
    visits: VecDeque<(Instant, BackendId, u64)>,
    keepalives: HashSet<BackendId>,
    next_epoch: u64,
}

pub(crate) struct ConnectionTracker {
    state: Mutex<TrackerState>,
    /// Wakes the session writer when keepalives are queued.
    outbound: Arc<Notify>,
    /// Wakes the visit loop when the visit queue was empty.
    visits_changed: Notify,
    interval: Duration,
}

impl ConnectionTracker {
    pub(crate) fn new(outbound: Arc<Notify>) -> Self {
        Self::with_interval(outbound, HEARTBEAT_INTERVAL)
    }

    fn with_interval(outbound: Arc<Notify>, interval: Duration) -> Self {
        ConnectionTracker {
            state: Mutex::new(TrackerState::default()),
            outbound,
            visits_changed: Notify::new(),
            interval,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A poisoned lock only means another thread panicked mid-update; the counts stay usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection to `backend` opens; it counts as open until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>, backend: &BackendId) -> ConnectionGuard {
        let mut st = self.lock();
        let epoch = self.record_activity(&mut st, backend);
        if let Some(a) = st.backends.get_mut(backend) {
            a.open += 1;
        }
        ConnectionGuard {
            tracker: self.clone(),
            backend: backend.clone(),
            epoch,
        }
    }

    /// The signal that closes the connections of `guard`'s backend (see [`ConnectionGuard::severed`]).
    fn severed(&self, backend: &BackendId, epoch: u64) -> CancellationToken {
        match self.lock().backends.get(backend) {
            Some(a) if a.epoch == epoch => a.severed.clone(),
            // The entry the guard counted in is gone: nothing will sever it any more.
            _ => CancellationToken::new(),
        }
    }

    /// Marks activity; creates the entry (queuing an immediate keepalive) when the backend is new or
    /// was marked removed. Returns the entry's epoch.
    fn record_activity(&self, st: &mut TrackerState, backend: &BackendId) -> u64 {
        let now = Instant::now();
        let new_epoch = st.next_epoch;
        let mut queue_keepalive = false;
        let mut schedule = false;
        let activity = st.backends.entry(backend.clone()).or_insert_with(|| {
            queue_keepalive = true;
            schedule = true;
            Activity {
                open: 0,
                recent: false,
                removed: false,
                reported_connected: false,
                epoch: new_epoch,
                severed: CancellationToken::new(),
            }
        });
        if activity.removed {
            // Traffic again means the controller gave us a fresh route to it: it lives.
            activity.removed = false;
            queue_keepalive = true;
            if activity.severed.is_cancelled() {
                activity.severed = CancellationToken::new();
            }
        }
        activity.recent = true;
        let epoch = activity.epoch;
        if schedule {
            st.next_epoch += 1;
            st.visits
                .push_back((now + self.interval, backend.clone(), epoch));
            self.visits_changed.notify_one();
        }
        if queue_keepalive {
            st.keepalives.insert(backend.clone());
            self.outbound.notify_one();
        }
        epoch
    }

    fn close(&self, backend: &BackendId, epoch: u64) {
        let mut st = self.lock();
        let mut last_closed = false;
        if let Some(a) = st.backends.get_mut(backend) {
            if a.epoch == epoch {
                a.open = a.open.saturating_sub(1);
                a.recent = true;
                last_closed = a.open == 0 && !a.removed && a.reported_connected;
            }
        }
        if last_closed {
            st.keepalives.insert(backend.clone());
            self.outbound.notify_one();
        }
    }

    /// The controller says `backend` is gone: stop sending keepalives for it. Open connections keep
    /// being counted until they close; when the backend is `terminated`, they are told to close now
    /// (the signal stays fired for connections that ask for it later; traffic after a fresh route
    /// gets a new one).
    pub(crate) fn forget(&self, backend: &BackendId, terminated: bool) {
        let mut st = self.lock();
        st.keepalives.remove(backend);
        let idle = match st.backends.get_mut(backend) {
            Some(a) => {
                a.removed = true;
                if terminated {
                    a.severed.cancel();
                }
                a.open == 0
            }
            None => false,
        };
        if idle {
            st.backends.remove(backend);
        }
    }

    pub(crate) fn counts(&self, backend: &BackendId) -> Option<ConnectionCounts> {
        self.lock().backends.get(backend).map(|a| ConnectionCounts {
            open_connections: a.open,
            recent_activity: a.recent,
        })
    }

    /// Keepalives to send now (each backend at most once), each with whether the backend has open
    /// connections right now.
    pub(crate) fn take_keepalives(&self) -> Vec<(BackendId, bool)> {
        let mut st = self.lock();
        let due: Vec<BackendId> = st.keepalives.drain().collect();
        due.into_iter()
            .map(|b| {
                let connected = match st.backends.get_mut(&b) {
                    Some(a) => {
                        a.reported_connected = a.open > 0;
                        a.reported_connected
                    }
                    None => false,
                };
                (b, connected)
            })
            .collect()
    }

    /// Visits every backend whose visit is due; see the module docs.
    fn visit_due(&self, now: Instant) {
        let mut st = self.lock();
        let mut queued = false;
        while st.visits.front().is_some_and(|(due, _, _)| *due <= now) {
            let Some((_, backend, epoch)) = st.visits.pop_front() else {
                break;
            };
            let Some(a) = st.backends.get_mut(&backend) else {
                continue;
            };
            if a.epoch != epoch {
                continue;
            }
            let keep = a.open > 0 || (a.recent && !a.removed);
            let send = keep && !a.removed;
            a.recent = false;
            if keep {
                st.visits
                    .push_back((now + self.interval, backend.clone(), epoch));
                if send {
                    st.keepalives.insert(backend);
                    queued = true;
                }
            } else {
                st.backends.remove(&backend);
            }
        }
        if queued {
            self.outbound.notify_one();
        }
    }

    /// Runs the visits until cancelled.
    pub(crate) async fn run_keepalive_visits(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let next_due = self.lock().visits.front().map(|(due, _, _)| *due);
            match next_due {
                Some(due) => tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(due) => self.visit_due(Instant::now()),
                    // New visits go to the back of the queue, so the wait stays valid; loop anyway.
                    _ = self.visits_changed.notified() => {}
                },
                None => tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.visits_changed.notified() => {}
                },
            }
        }
    }
}

/// One open connection to a backend; dropping it closes the connection in the tracker.
pub(crate) struct ConnectionGuard {
    tracker: Arc<ConnectionTracker>,
    backend: BackendId,
    epoch: u64,
}

impl ConnectionGuard {
    /// Fires when the controller says the backend is terminated: the connection must close. Asked
    /// for by long-lived connections (tunnels) only, so that a plain request costs no extra work.
    pub(crate) fn severed(&self) -> CancellationToken {
        self.tracker.severed(&self.backend, self.epoch)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracker.close(&self.backend, self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> BackendId {
        s.parse().unwrap()
    }

    fn tracker() -> Arc<ConnectionTracker> {
        Arc::new(ConnectionTracker::with_interval(
            Arc::new(Notify::new()),
            Duration::from_secs(7),
        ))
    }

    fn counts(open: usize, recent: bool) -> Option<ConnectionCounts> {
        Some(ConnectionCounts {
            open_connections: open,
            recent_activity: recent,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn first_activity_sends_keepalive_at_once_then_each_visit() {
        crate::with_test_timeout(async {
            let t = tracker();
            let guard = t.open(&b("b1"));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), true)]);
            assert_eq!(t.counts(&b("b1")), counts(1, true));
            // Further activity before the visit does not send another keepalive.
            drop(t.open(&b("b1")));
            assert!(t.take_keepalives().is_empty());

            let start = Instant::now();
            t.visit_due(start + Duration::from_secs(6));
            assert!(t.take_keepalives().is_empty());
            t.visit_due(start + Duration::from_secs(7));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), true)]);
            assert_eq!(t.counts(&b("b1")), counts(1, false));
            // Still open: keepalive again, though no new request.
            t.visit_due(start + Duration::from_secs(14));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), true)]);
            // The last connection closing is reported at once, as not connected.
            drop(guard);
            assert_eq!(t.take_keepalives(), vec![(b("b1"), false)]);
            assert_eq!(t.counts(&b("b1")), counts(0, true));
            t.visit_due(start + Duration::from_secs(21));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), false)]);
            // Idle for a whole interval: forgotten, no keepalive.
            t.visit_due(start + Duration::from_secs(28));
            assert!(t.take_keepalives().is_empty());
            assert_eq!(t.counts(&b("b1")), None);
            // Comes back with an immediate keepalive.
            drop(t.open(&b("b1")));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), false)]);
        })
        .await;
    }

    #[test]
    fn a_terminated_backend_severs_its_connections_a_terminating_one_does_not() {
        let t = tracker();
        let guard = t.open(&b("b1"));
        let signal = guard.severed();
        t.forget(&b("b1"), false);
        assert!(!signal.is_cancelled(), "terminating: connections stay");
        t.forget(&b("b1"), true);
        assert!(signal.is_cancelled(), "terminated: connections close");
        // A connection that asks only now (its upgrade finished late) is severed as well.
        assert!(guard.severed().is_cancelled());
        let later = t.open(&b("b1"));
        assert!(
            !later.severed().is_cancelled(),
            "traffic after a fresh route gets a new signal"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forget_stops_keepalives_but_keeps_counts_exact() {
        crate::with_test_timeout(async {
            let t = tracker();
            let guard = t.open(&b("b1"));
            t.forget(&b("b1"), false);
            assert!(t.take_keepalives().is_empty());
            assert_eq!(t.counts(&b("b1")), counts(1, true));
            t.visit_due(Instant::now() + Duration::from_secs(7));
            assert!(t.take_keepalives().is_empty());
            drop(guard);
            assert_eq!(t.counts(&b("b1")), counts(0, true));
            t.visit_due(Instant::now() + Duration::from_secs(14));
            assert_eq!(t.counts(&b("b1")), None);

            // An idle backend is forgotten at once; the visit scheduled for the old entry does not
            // touch a newer entry for the same backend.
            let start = Instant::now();
            drop(t.open(&b("b2")));
            t.take_keepalives();
            t.forget(&b("b2"), false);
            assert_eq!(t.counts(&b("b2")), None);
            tokio::time::advance(Duration::from_secs(3)).await;
            drop(t.open(&b("b2")));
            assert_eq!(t.take_keepalives(), vec![(b("b2"), false)]);
            t.visit_due(start + Duration::from_secs(7));
            assert_eq!(t.counts(&b("b2")), counts(0, true));
            assert!(t.take_keepalives().is_empty());
            t.visit_due(start + Duration::from_secs(10));
            assert_eq!(t.counts(&b("b2")), counts(0, false));
            assert_eq!(t.take_keepalives(), vec![(b("b2"), false)]);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn visit_loop_runs_on_time() {
        crate::with_test_timeout(async {
            let notify = Arc::new(Notify::new());
            let t = Arc::new(ConnectionTracker::with_interval(
                notify.clone(),
                Duration::from_secs(7),
            ));
            let cancel = CancellationToken::new();
            let task = tokio::spawn(t.clone().run_keepalive_visits(cancel.clone()));
            let guard = t.open(&b("b1"));
            assert_eq!(t.take_keepalives(), vec![(b("b1"), true)]);
            // With paused time, the runtime advances the clock to the next timer when idle.
            tokio::time::timeout(Duration::from_secs(8), async {
                while t.take_keepalives().is_empty() {
                    notify.notified().await;
                }
            })
            .await
            .expect("a keepalive after one interval");
            drop(guard);
            cancel.cancel();
            task.await.unwrap();
        })
        .await;
    }
}
