//! The backend lifecycle. `BackendState` is what is stored and sent; [`BackendState::apply`] is the pure
//! state machine that the drone drives and the tests exercise exhaustively. The controller additionally
//! refuses to store any state whose status is not strictly after the stored one (monotonic history).

use crate::time::Millis;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use utoipa::ToSchema;

/// Public status of a backend, totally ordered by lifecycle position.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendStatus {
    Scheduled,
    Loading,
    Starting,
    Waiting,
    Ready,
    Terminating,
    #[serde(rename = "hard-terminating")]
    HardTerminating,
    Terminated,
}

impl BackendStatus {
    pub const ALL: [BackendStatus; 8] = [
        BackendStatus::Scheduled,
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
        BackendStatus::Terminating,
        BackendStatus::HardTerminating,
        BackendStatus::Terminated,
    ];

    /// The statuses of a backend that is not terminated: [`Self::ALL`] but its last.
    pub const LIVE: [BackendStatus; 7] = match Self::ALL.first_chunk() {
        Some(live) => *live,
        None => unreachable!(),
    };

    /// Plane's persisted status numbers (gaps intentional).
    pub fn number(self) -> i32 {
        match self {
            BackendStatus::Scheduled => 10,
            BackendStatus::Loading => 20,
            BackendStatus::Starting => 30,
            BackendStatus::Waiting => 40,
            BackendStatus::Ready => 50,
            BackendStatus::Terminating => 60,
            BackendStatus::HardTerminating => 65,
            BackendStatus::Terminated => 70,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Scheduled => "scheduled",
            BackendStatus::Loading => "loading",
            BackendStatus::Starting => "starting",
            BackendStatus::Waiting => "waiting",
            BackendStatus::Ready => "ready",
            BackendStatus::Terminating => "terminating",
            BackendStatus::HardTerminating => "hard-terminating",
            BackendStatus::Terminated => "terminated",
        }
    }

    /// Still on its way to `ready`.
    pub fn is_pending(self) -> bool {
        self < BackendStatus::Ready
    }

    /// Termination has begun or finished.
    pub fn is_terminating_or_terminated(self) -> bool {
        self >= BackendStatus::Terminating
    }
}

impl fmt::Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for BackendStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        BackendStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TerminationKind {
    Soft,
    Hard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TerminationReason {
    /// Idle longer than `max_idle_seconds` or past `lifetime_limit_seconds`.
    Swept,
    /// A terminate API call.
    External,
    /// The drone could not renew the key in time.
    KeyExpired,
    /// The drone (or its record of the backend) is gone.
    Lost,
    /// The backend did not answer on its port in time.
    StartupTimeout,
    /// The executor failed (could not prepare or start the backend, readiness probe error).
    InternalError,
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            TerminationReason::Swept => "swept",
            TerminationReason::External => "external",
            TerminationReason::KeyExpired => "keyexpired",
            TerminationReason::Lost => "lost",
            TerminationReason::StartupTimeout => "startuptimeout",
            TerminationReason::InternalError => "internalerror",
        };
        f.write_str(s)
    }
}

/// A backend's state as stored and reported. JSON is internally tagged by `status`, as Plane's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status")]
pub enum BackendState {
    #[serde(rename = "scheduled")]
    Scheduled,
    #[serde(rename = "loading")]
    Loading,
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "waiting")]
    Waiting { address: SocketAddr },
    #[serde(rename = "ready")]
    Ready { address: SocketAddr },
    #[serde(rename = "terminating")]
    Terminating {
        last_status: BackendStatus,
        /// Always `soft`; kept because Plane clients read it.
        termination: TerminationKind,
        reason: TerminationReason,
    },
    #[serde(rename = "hard-terminating")]
    HardTerminating {
        last_status: BackendStatus,
        reason: TerminationReason,
    },
    #[serde(rename = "terminated")]
    Terminated {
        last_status: BackendStatus,
        termination: Option<TerminationKind>,
        reason: Option<TerminationReason>,
        exit_code: Option<i32>,
        /// Hangar extension: a human-readable explanation (e.g. why the backend could not start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// Hangar extension: the kernel killed the backend for exceeding its memory limit.
        #[serde(default, skip_serializing_if = "is_false")]
        oom_killed: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The `message` of a backend killed for exceeding its memory limit.
pub const OUT_OF_MEMORY_MESSAGE: &str = "the backend ran out of memory and was killed";

/// An input to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Executor begins preparing (image pull / command lookup).
    Load,
    /// Executor is starting the process/container.
    Start,
    /// Process started; probing `address` for readiness.
    Wait { address: SocketAddr },
    /// `address` answers: routable.
    Ready { address: SocketAddr },
    /// Termination requested.
    Terminate {
        kind: TerminationKind,
        reason: TerminationReason,
    },
    /// The process is gone (by itself or after a terminate). `oom_killed`: the kernel killed it for
    /// exceeding its memory limit.
    Exited {
        exit_code: Option<i32>,
        oom_killed: bool,
    },
    /// The backend could not be started or failed before it ran; nothing is left running.
    Failed {
        reason: TerminationReason,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition {transition} from {from}")]
pub struct InvalidTransition {
    pub from: BackendStatus,
    pub transition: &'static str,
}

impl Transition {
    fn name(&self) -> &'static str {
        match self {
            Transition::Load => "load",
            Transition::Start => "start",
            Transition::Wait { .. } => "wait",
            Transition::Ready { .. } => "ready",
            Transition::Terminate { .. } => "terminate",
            Transition::Exited { .. } => "exited",
            Transition::Failed { .. } => "failed",
        }
    }
}

impl BackendState {
    pub fn status(&self) -> BackendStatus {
        match self {
            BackendState::Scheduled => BackendStatus::Scheduled,
            BackendState::Loading => BackendStatus::Loading,
            BackendState::Starting => BackendStatus::Starting,
            BackendState::Waiting { .. } => BackendStatus::Waiting,
            BackendState::Ready { .. } => BackendStatus::Ready,
            BackendState::Terminating { .. } => BackendStatus::Terminating,
            BackendState::HardTerminating { .. } => BackendStatus::HardTerminating,
            BackendState::Terminated { .. } => BackendStatus::Terminated,
        }
    }

    /// The address of a `waiting` or `ready` backend.
    pub fn address(&self) -> Option<SocketAddr> {
        match self {
            BackendState::Waiting { address } | BackendState::Ready { address } => Some(*address),
            _ => None,
        }
    }

    /// Applies one transition. Terminate requests are idempotent (asking again for an equal or weaker
    /// termination keeps the state); anything that would move backwards or skip into a forward state
    /// out of order is refused.
    pub fn apply(&self, t: Transition) -> Result<BackendState, InvalidTransition> {
        use BackendState as S;
        let refuse = |t: &Transition| InvalidTransition {
            from: self.status(),
            transition: t.name(),
        };
        match (self, t) {
            (S::Scheduled, Transition::Load) => Ok(S::Loading),
            (S::Loading, Transition::Start) => Ok(S::Starting),
            (S::Starting, Transition::Wait { address }) => Ok(S::Waiting { address }),
            (S::Waiting { .. }, Transition::Ready { address }) => Ok(S::Ready { address }),
            (S::Terminated { .. }, t) => Err(refuse(&t)),
            (_, Transition::Failed { reason, message }) => Ok(S::Terminated {
                last_status: self.last_status(),
                termination: self.termination_kind(),
                reason: Some(reason),
                exit_code: None,
                message: Some(message),
                oom_killed: false,
            }),
            (
                _,
                Transition::Exited {
                    exit_code,
                    oom_killed,
                },
            ) => Ok(S::Terminated {
                last_status: self.last_status(),
                termination: self.termination_kind(),
                reason: self.termination_reason(),
                exit_code,
                message: oom_killed.then(|| OUT_OF_MEMORY_MESSAGE.to_string()),
                oom_killed,
            }),
            (S::HardTerminating { .. }, Transition::Terminate { .. }) => Ok(self.clone()),
            (
                S::Terminating { .. },
                Transition::Terminate {
                    kind: TerminationKind::Soft,
                    ..
                },
            ) => Ok(self.clone()),
            (
                _,
                Transition::Terminate {
                    kind: TerminationKind::Soft,
                    reason,
                },
            ) => Ok(S::Terminating {
                last_status: self.last_status(),
                termination: TerminationKind::Soft,
                reason,
            }),
            (
                _,
                Transition::Terminate {
                    kind: TerminationKind::Hard,
                    reason,
                },
            ) => Ok(S::HardTerminating {
                last_status: self.last_status(),
                reason,
            }),
            (_, t) => Err(refuse(&t)),
        }
    }

    /// Status before termination began (the current status when not terminating).
    fn last_status(&self) -> BackendStatus {
        match self {
            BackendState::Terminating { last_status, .. }
            | BackendState::HardTerminating { last_status, .. }
            | BackendState::Terminated { last_status, .. } => *last_status,
            other => other.status(),
        }
    }

    fn termination_kind(&self) -> Option<TerminationKind> {
        match self {
            BackendState::Terminating { .. } => Some(TerminationKind::Soft),
            BackendState::HardTerminating { .. } => Some(TerminationKind::Hard),
            BackendState::Terminated { termination, .. } => *termination,
            _ => None,
        }
    }

    fn termination_reason(&self) -> Option<TerminationReason> {
        match self {
            BackendState::Terminating { reason, .. }
            | BackendState::HardTerminating { reason, .. } => Some(*reason),
            BackendState::Terminated { reason, .. } => *reason,
            _ => None,
        }
    }

    /// The public view of this state at `time` (no address is exposed).
    pub fn to_status_entry(&self, time: Millis) -> BackendStatusEntry {
        let terminated = matches!(self, BackendState::Terminated { .. });
        let (exit_code, message, oom_killed) = match self {
            BackendState::Terminated {
                exit_code,
                message,
                oom_killed,
                ..
            } => (*exit_code, message.clone(), *oom_killed),
            _ => (None, None, false),
        };
        BackendStatusEntry {
            status: self.status(),
            termination_reason: self.termination_reason(),
            termination_kind: self.termination_kind(),
            exit_error: terminated.then_some(matches!(exit_code, Some(c) if c != 0)),
            exit_code,
            message,
            oom_killed: oom_killed.then_some(true),
            time,
        }
    }
}

/// Public status of a backend (`/pub/b/:id/status` and each status-stream event); Plane's
/// `BackendStatusStreamEntry` plus two optional Hangar fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendStatusEntry {
    pub status: BackendStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_reason: Option<TerminationReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_kind: Option<TerminationKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_error: Option<bool>,
    /// Hangar extension: the exit code once terminated, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Hangar extension: why the backend was terminated, in words, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Hangar extension: `true` when the kernel killed the backend for exceeding its memory limit
    /// (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    pub time: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn addr() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    fn terminate(kind: TerminationKind, reason: TerminationReason) -> Transition {
        Transition::Terminate { kind, reason }
    }

    fn exited(exit_code: Option<i32>, oom_killed: bool) -> Transition {
        Transition::Exited {
            exit_code,
            oom_killed,
        }
    }

    fn all_states() -> Vec<BackendState> {
        vec![
            BackendState::Scheduled,
            BackendState::Loading,
            BackendState::Starting,
            BackendState::Waiting { address: addr() },
            BackendState::Ready { address: addr() },
            BackendState::Terminating {
                last_status: BackendStatus::Ready,
                termination: TerminationKind::Soft,
                reason: TerminationReason::External,
            },
            BackendState::HardTerminating {
                last_status: BackendStatus::Ready,
                reason: TerminationReason::External,
            },
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: None,
                reason: None,
                exit_code: Some(0),
                message: None,
                oom_killed: false,
            },
        ]
    }

    fn all_transitions() -> Vec<Transition> {
        vec![
            Transition::Load,
            Transition::Start,
            Transition::Wait { address: addr() },
            Transition::Ready { address: addr() },
            terminate(TerminationKind::Soft, TerminationReason::Swept),
            terminate(TerminationKind::Hard, TerminationReason::KeyExpired),
            exited(Some(3), false),
            Transition::Failed {
                reason: TerminationReason::InternalError,
                message: "boom".into(),
            },
        ]
    }

    /// Every (state, transition) pair: the result is either refused or never moves the status back.
    #[test]
    fn exhaustive_transitions() {
        let mut allowed = 0;
        for s in all_states() {
            for t in all_transitions() {
                let name = t.name();
                match s.apply(t.clone()) {
                    Ok(next) => {
                        allowed += 1;
                        assert!(
                            next.status() >= s.status(),
                            "{name} moved {:?} back to {:?}",
                            s.status(),
                            next.status()
                        );
                    }
                    Err(e) => {
                        assert_eq!(e.from, s.status());
                        assert_eq!(e.transition, name);
                    }
                }
            }
        }
        // 4 forward steps; 4 terminate/exit/fail transitions from each of the 5 non-terminating states;
        // 4 from terminating; 4 from hard-terminating; none from terminated.
        assert_eq!(allowed, 4 + 5 * 4 + 4 + 4);
    }

    #[test]
    fn forward_steps_only_in_order() {
        let s = BackendState::Scheduled;
        assert!(s.apply(Transition::Start).is_err());
        assert!(s.apply(Transition::Ready { address: addr() }).is_err());
        let s = s.apply(Transition::Load).unwrap();
        assert!(s.apply(Transition::Load).is_err());
        let s = s.apply(Transition::Start).unwrap();
        let s = s.apply(Transition::Wait { address: addr() }).unwrap();
        let s = s.apply(Transition::Ready { address: addr() }).unwrap();
        assert_eq!(s.status(), BackendStatus::Ready);
        assert!(s.apply(Transition::Wait { address: addr() }).is_err());
    }

    #[test]
    fn soft_then_hard_then_exit_keeps_last_status() {
        let ready = BackendState::Ready { address: addr() };
        let soft = ready
            .apply(terminate(
                TerminationKind::Soft,
                TerminationReason::External,
            ))
            .unwrap();
        assert_eq!(
            soft.apply(terminate(TerminationKind::Soft, TerminationReason::Swept))
                .unwrap(),
            soft
        );
        let hard = soft
            .apply(terminate(
                TerminationKind::Hard,
                TerminationReason::KeyExpired,
            ))
            .unwrap();
        assert_eq!(
            hard,
            BackendState::HardTerminating {
                last_status: BackendStatus::Ready,
                reason: TerminationReason::KeyExpired
            }
        );
        let done = hard.apply(exited(Some(137), false)).unwrap();
        assert_eq!(
            done,
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Hard),
                reason: Some(TerminationReason::KeyExpired),
                exit_code: Some(137),
                message: None,
                oom_killed: false,
            }
        );
        assert!(done.apply(exited(None, false)).is_err());
    }

    #[test]
    fn self_exit_has_no_reason() {
        let done = BackendState::Ready { address: addr() }
            .apply(exited(Some(2), false))
            .unwrap();
        let entry = done.to_status_entry(Millis(5));
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            json!({"status": "terminated", "exit_error": true, "exit_code": 2, "time": 5})
        );
    }

    #[test]
    fn out_of_memory_is_flagged_and_explained() {
        let done = BackendState::Ready { address: addr() }
            .apply(exited(Some(137), true))
            .unwrap();
        let json = serde_json::to_value(&done).unwrap();
        assert_eq!(json["oom_killed"], true);
        assert_eq!(json["message"], OUT_OF_MEMORY_MESSAGE);
        assert_eq!(serde_json::from_value::<BackendState>(json).unwrap(), done);
        let entry = serde_json::to_value(done.to_status_entry(Millis(5))).unwrap();
        assert_eq!(entry["oom_killed"], true);
        assert!(entry["message"].as_str().unwrap().contains("out of memory"));
        // Absent when false, and older states without the field still parse.
        let plain: BackendState = serde_json::from_value(json!({"status": "terminated",
            "last_status": "ready", "termination": null, "reason": null, "exit_code": 0}))
        .unwrap();
        let back = serde_json::to_value(&plain).unwrap();
        assert!(back.get("oom_killed").is_none());
        assert!(serde_json::to_value(plain.to_status_entry(Millis(1)))
            .unwrap()
            .get("oom_killed")
            .is_none());
    }

    #[test]
    fn json_shapes_match_plane() {
        assert_eq!(
            serde_json::to_value(BackendState::Ready { address: addr() }).unwrap(),
            json!({"status": "ready", "address": "127.0.0.1:4000"})
        );
        assert_eq!(
            serde_json::to_value(BackendState::HardTerminating {
                last_status: BackendStatus::Ready,
                reason: TerminationReason::KeyExpired
            })
            .unwrap(),
            json!({"status": "hard-terminating", "last_status": "ready", "reason": "keyexpired"})
        );
        let t: BackendState = serde_json::from_value(json!({"status": "terminated",
            "last_status": "ready", "termination": "hard", "reason": "startuptimeout", "exit_code": 137}))
        .unwrap();
        assert_eq!(t.status(), BackendStatus::Terminated);
        let entry = BackendState::Terminating {
            last_status: BackendStatus::Ready,
            termination: TerminationKind::Soft,
            reason: TerminationReason::Swept,
        }
        .to_status_entry(Millis(7));
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            json!({"status": "terminating", "termination_reason": "swept", "termination_kind": "soft", "time": 7})
        );
        assert_eq!(
            serde_json::to_value(BackendState::Scheduled.to_status_entry(Millis(1))).unwrap(),
            json!({"status": "scheduled", "time": 1})
        );
    }

    #[test]
    fn status_order_and_numbers() {
        for w in BackendStatus::ALL.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].number() < w[1].number());
        }
        for s in BackendStatus::ALL {
            assert_eq!(s.as_str().parse::<BackendStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
        assert!("nope".parse::<BackendStatus>().is_err());
        assert_eq!(BackendStatus::LIVE.len() + 1, BackendStatus::ALL.len());
        assert!(!BackendStatus::LIVE.contains(&BackendStatus::Terminated));
    }
}
