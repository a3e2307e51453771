//! What the clients saw and what ran, and the checker that judges it.
//!
//! Times are milliseconds since the run started, on the harness's monotonic clock. A request through
//! the proxy is known only by when it was sent and when its answer arrived: the backend answered at
//! some instant between the two. The checker therefore only reports what these intervals prove.
//!
//! **Single writer.** For a backend `b` of a key, let `first(b)` be the earliest *answer* time of its
//! requests and `last(b)` the latest *send* time. `b` answered at some instant `<= first(b)` and at
//! some instant `>= last(b)`; a backend is one process that runs from its start to its exit, so it
//! was serving throughout `[first(b), last(b)]` (when `first(b) < last(b)`). Two backends of one key
//! whose such spans overlap were both serving at one instant: a violation. Spans that do not overlap
//! prove nothing either way and are accepted, so the check never reports a false violation.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One request answered by a backend through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub key: String,
    /// The backend that answered (`SESSION_BACKEND_ID` as the backend itself reports it).
    pub backend: String,
    /// The fencing token the backend was started with (`SESSION_BACKEND_FENCING_TOKEN`).
    pub fencing_token: Option<u64>,
    pub sent_ms: u64,
    pub answered_ms: u64,
}

/// How a client's connect call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ConnectOutcome {
    /// A backend id and URL came back.
    Ok { backend: String },
    /// A failure a client should retry: the controller unreachable or timing out, an HTTP 5xx
    /// answer in Plane's error shape (`{id, kind, message}`), e.g. 503 while the store is away, or
    /// Plane's `409 KeyHeld` while the key's previous backend is still shutting down.
    Retryable { reason: String },
    /// Anything else: a 4xx to a valid request, a 5xx without a readable error, an unreadable body.
    Unclear { reason: String },
}

/// One connect call of the load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connect {
    pub key: String,
    pub controller: usize,
    pub at_ms: u64,
    pub outcome: ConnectOutcome,
}

/// Backends alive at one instant after the faults: according to the controllers (not terminated
/// in the store) and according to the machine (processes of this run carrying a backend id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LiveSnapshot {
    pub at_ms: u64,
    pub reported: BTreeSet<String>,
    pub running: BTreeSet<String>,
    /// What the convergence check last waited for (empty once it passed).
    pub waiting_for: String,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct History {
    pub answers: Vec<Answer>,
    pub connects: Vec<Connect>,
    /// When the last fault was healed (every component running, every relay passing traffic).
    pub faults_healed_ms: Option<u64>,
    /// When every key answered through every controller and the proxy again, and the live sets
    /// agreed; `None` if that never happened before the run gave up.
    pub converged_ms: Option<u64>,
    /// The last comparison of the live sets (the one that agreed, or the last one tried).
    pub final_snapshot: LiveSnapshot,
}

/// A broken promise, with the part of the history that shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Violation {
    /// Two backends of one key were both serving at one instant.
    TwoWriters {
        key: String,
        first: (String, u64, u64),
        second: (String, u64, u64),
    },
    /// A backend the controllers report live has no running process (a ghost).
    Ghost { backend: String },
    /// A running backend process the controllers do not report live (an orphan).
    Orphan { backend: String },
    /// A connect ended in neither a success nor a clear retryable error.
    UnclearConnect(Connect),
    /// The system did not converge within the bound after the last fault.
    NoConvergence { bound_ms: u64 },
}

/// The serving span a backend's answers prove: `(backend, first answer, last send)`.
fn spans(answers: &[&Answer]) -> Vec<(String, u64, u64)> {
    let mut by_backend: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for a in answers {
        let span = by_backend
            .entry(&a.backend)
            .or_insert((a.answered_ms, a.sent_ms));
        span.0 = span.0.min(a.answered_ms);
        span.1 = span.1.max(a.sent_ms);
    }
    by_backend
        .into_iter()
        .filter(|(_, (first, last))| first < last)
        .map(|(b, (first, last))| (b.to_string(), first, last))
        .collect()
}

/// Two backends of one key with overlapping proven serving spans.
pub fn check_single_writer(answers: &[Answer]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Answer>> = BTreeMap::new();
    for a in answers {
        by_key.entry(&a.key).or_default().push(a);
    }
    let mut violations = Vec::new();
    for (key, answers) in by_key {
        let mut spans = spans(&answers);
        spans.sort_by_key(|s| s.1);
        // Sorted by start: an overlap exists iff some span starts before the furthest end so far.
        let mut furthest: Option<&(String, u64, u64)> = None;
        for span in &spans {
            if let Some(prev) = furthest {
                if span.1 < prev.2 {
                    violations.push(Violation::TwoWriters {
                        key: key.to_string(),
                        first: prev.clone(),
                        second: span.clone(),
                    });
                }
            }
            if furthest.is_none_or(|f| span.2 > f.2) {
                furthest = Some(span);
            }
        }
    }
    violations
}

/// Every violation in `history`; `convergence_bound_ms` is the promise checked against
/// `converged_ms - faults_healed_ms`.
pub fn check(history: &History, convergence_bound_ms: u64) -> Vec<Violation> {
    let mut violations = check_single_writer(&history.answers);
    violations.extend(
        history
            .connects
            .iter()
            .filter(|c| matches!(c.outcome, ConnectOutcome::Unclear { .. }))
            .cloned()
            .map(Violation::UnclearConnect),
    );
    let converged = match (history.faults_healed_ms, history.converged_ms) {
        (Some(healed), Some(converged)) => converged.saturating_sub(healed) <= convergence_bound_ms,
        (None, _) => true,
        (Some(_), None) => false,
    };
    if !converged {
        violations.push(Violation::NoConvergence {
            bound_ms: convergence_bound_ms,
        });
        let snapshot = &history.final_snapshot;
        for backend in snapshot.reported.difference(&snapshot.running) {
            violations.push(Violation::Ghost {
                backend: backend.clone(),
            });
        }
        for backend in snapshot.running.difference(&snapshot.reported) {
            violations.push(Violation::Orphan {
                backend: backend.clone(),
            });
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers written as `key backend sent..answered`, comma-separated, times in ms.
    fn answers(timeline: &str) -> Vec<Answer> {
        let answer = |entry: &str| {
            let words: Vec<&str> = entry.split_whitespace().collect();
            let (sent, answered) = words[2].split_once("..").expect("sent..answered");
            Answer {
                key: words[0].into(),
                backend: words[1].into(),
                fencing_token: None,
                sent_ms: sent.parse().unwrap(),
                answered_ms: answered.parse().unwrap(),
            }
        };
        timeline.split(',').map(answer).collect()
    }

    #[test]
    fn two_live_backends_of_one_key_are_caught() {
        let answers = answers("k ba-1 0..10, k ba-2 20..30, k ba-1 40..50, k ba-2 60..70");
        let violations = check_single_writer(&answers);
        assert_eq!(violations.len(), 1, "{violations:?}");
        let Violation::TwoWriters { key, first, second } = &violations[0] else {
            panic!("{violations:?}")
        };
        assert_eq!(key, "k");
        assert_eq!(first, &("ba-1".to_string(), 10, 40));
        assert_eq!(second, &("ba-2".to_string(), 30, 60));
    }

    #[test]
    fn histories_that_prove_no_overlap_are_accepted() {
        for (case, timeline) in [
            // Other keys (`j`) never interfere.
            (
                "a handover",
                "k ba-1 0..10, k ba-1 20..30, k ba-2 40..50, k ba-2 60..70, \
                 j ba-3 0..100, j ba-3 200..300",
            ),
            // ba-1's last request was sent (20) before ba-2's first answer arrived (25), and the
            // requests overlap in time: either order is possible, so no violation can be proven.
            (
                "overlapping requests",
                "k ba-1 0..10, k ba-1 20..40, k ba-2 15..25, k ba-2 30..50",
            ),
            (
                "a single answer proves no span",
                "k ba-1 0..100, k ba-2 10..20",
            ),
        ] {
            assert_eq!(check_single_writer(&answers(timeline)), vec![], "{case}");
        }
    }

    #[test]
    fn ghosts_orphans_unclear_connects_and_slow_convergence_are_reported() {
        let mut history = History {
            faults_healed_ms: Some(1000),
            converged_ms: None,
            final_snapshot: LiveSnapshot {
                at_ms: 5000,
                reported: ["ba-1".to_string(), "ba-2".to_string()].into(),
                running: ["ba-2".to_string(), "ba-3".to_string()].into(),
                ..LiveSnapshot::default()
            },
            ..History::default()
        };
        history.connects.push(Connect {
            key: "k".into(),
            controller: 0,
            at_ms: 10,
            outcome: ConnectOutcome::Unclear {
                reason: "400".into(),
            },
        });
        history.connects.push(Connect {
            key: "k".into(),
            controller: 1,
            at_ms: 20,
            outcome: ConnectOutcome::Retryable {
                reason: "refused".into(),
            },
        });
        let violations = check(&history, 3000);
        assert!(violations.contains(&Violation::NoConvergence { bound_ms: 3000 }));
        assert!(violations.contains(&Violation::Ghost {
            backend: "ba-1".into()
        }));
        assert!(violations.contains(&Violation::Orphan {
            backend: "ba-3".into()
        }));
        assert_eq!(
            violations
                .iter()
                .filter(|v| matches!(v, Violation::UnclearConnect(_)))
                .count(),
            1
        );
        history.converged_ms = Some(3500);
        history.connects.pop();
        history.connects.pop();
        assert_eq!(check(&history, 3000), vec![]);
        history.converged_ms = Some(4500);
        assert_eq!(check(&history, 3000).len(), 3);
    }
}
