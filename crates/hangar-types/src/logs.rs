//! Backend output lines as the drone keeps them, the API serves them and the wire carries them
//! (`GET /ctrl/b/{backend}/logs`, [`crate::protocol::ControllerToDrone::LogRequest`]), and how a
//! caller says where to start (`?since=`).

use crate::names::{BackendId, ClusterName, DroneName};
use crate::state::BackendStatusEntry;
use crate::time::Millis;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use utoipa::ToSchema;

/// Which output stream of the backend a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One output line: `{"time": <ms since the epoch, drone clock>, "stream": "stdout", "line": "…"}`.
/// The line has no trailing newline; invalid UTF-8 is replaced (lossy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub time: Millis,
    pub stream: LogStream,
    pub line: String,
}

/// Where a log read starts. Relative times are resolved by the drone against its own clock (no
/// component compares its clock with another machine's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogSince {
    /// Lines written at or after this time (ms since the epoch, drone clock).
    At(Millis),
    /// Lines written during the last this many milliseconds.
    Ago(u64),
}

impl LogSince {
    /// The absolute start, for a drone whose clock reads `now`.
    pub fn resolve(self, now: Millis) -> Millis {
        match self {
            LogSince::At(at) => at,
            LogSince::Ago(ms) => {
                Millis(now.0.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `since` {0:?}: expected an RFC 3339 time (2024-12-05T12:00:00Z), milliseconds since the epoch (1733400000000) or a duration such as 90s, 10m, 2h, 1d, 500ms")]
pub struct InvalidSince(pub String);

/// An RFC 3339 time (`2024-12-05T12:00:00Z`, `2024-12-05T13:00:00.5+01:00`), `1733400000000` (ms
/// since the epoch) or a duration ago: a number with one of `ms`, `s`, `m`, `h`, `d` (`10m`).
impl FromStr for LogSince {
    type Err = InvalidSince;
    fn from_str(s: &str) -> Result<Self, InvalidSince> {
        let invalid = || InvalidSince(s.to_string());
        if s.contains('T') || s.contains('t') {
            let time =
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| invalid())?;
            let ms = time.unix_timestamp_nanos() / 1_000_000;
            return i64::try_from(ms)
                .map(|ms| LogSince::At(Millis(ms)))
                .map_err(|_| invalid());
        }
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(digits);
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let unit_ms: u64 = match unit {
            "" => {
                return i64::try_from(number)
                    .map(|ms| LogSince::At(Millis(ms)))
                    .map_err(|_| invalid())
            }
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        number
            .checked_mul(unit_ms)
            .map(LogSince::Ago)
            .ok_or_else(invalid)
    }
}

impl LogSince {
    /// A duration ago.
    pub fn ago(d: Duration) -> Self {
        LogSince::Ago(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Why the drone ended a log read ([`crate::protocol::DroneToController::LogEnd`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEndReason {
    /// Every kept line was sent (a read without `follow`).
    Complete,
    /// Following: the backend ended and every line it wrote was sent.
    BackendEnded,
    /// The drone keeps no lines of this backend (never ran here, or removed after the retention).
    Unknown,
    /// The drone has too many log reads open on this session.
    Busy,
    /// Reading the drone's log files failed.
    Failed(String),
}

/// The last JSON line of a log read that did not just run out of kept lines, so a client can tell a
/// read that ended from one that was cut: `{"end": "backend_ended"}`, or
/// `{"end": "drone_disconnected", "message": "…"}`. A follow always ends with one (unless the
/// connection itself is cut, which a client sees as a stream without it); a read without `follow`
/// has one only when it ended early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogReadEnd {
    pub end: LogReadEndKind,
    /// What went wrong, for the kinds other than `backend_ended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why a log read ended (`LogReadEnd::end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogReadEndKind {
    /// The backend ended and every line it wrote was sent (the normal end of a follow).
    BackendEnded,
    /// The drone keeps no lines of this backend (it never ran there, or its retention passed).
    NotKept,
    /// The drone has too many log reads open; try again later.
    DroneBusy,
    /// The drone's session with the controllers dropped before the read ended: lines may be missing.
    DroneDisconnected,
    /// The controller serving the read could not be reached any more (a forwarded read).
    ControllerDisconnected,
    /// The drone failed to read its log files.
    Failed,
}

impl LogReadEnd {
    /// `true` only for the normal end of a follow.
    pub fn is_normal(&self) -> bool {
        self.end == LogReadEndKind::BackendEnded
    }
}

/// One JSON line of a log read: a line, or the end.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LogReadItem {
    Line(LogLine),
    End(LogReadEnd),
}

/// `GET /ctrl/b/{backend}/events`: a backend's state history (oldest first, store clock) and, when
/// it failed, the last lines it wrote to stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendEvents {
    pub backend_id: BackendId,
    pub cluster: ClusterName,
    pub drone: DroneName,
    pub events: Vec<BackendStatusEntry>,
    /// When the backend failed (terminated by an error, a non-zero exit, the OOM killer or lost):
    /// its last stderr lines (its last lines of any stream when it wrote none to stderr), oldest
    /// first. Absent otherwise, and when its drone is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_lines: Option<Vec<LogLine>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_times_and_durations() {
        assert_eq!(
            "1733400000000".parse(),
            Ok(LogSince::At(Millis(1_733_400_000_000)))
        );
        assert_eq!("10m".parse(), Ok(LogSince::Ago(600_000)));
        assert_eq!("90s".parse(), Ok(LogSince::Ago(90_000)));
        assert_eq!("500ms".parse(), Ok(LogSince::Ago(500)));
        assert_eq!("2h".parse(), Ok(LogSince::Ago(7_200_000)));
        assert_eq!("1d".parse(), Ok(LogSince::Ago(86_400_000)));
        for bad in [
            "",
            "m",
            "10x",
            "-5",
            "1.5m",
            "99999999999999999999d",
            "10 m",
        ] {
            assert!(bad.parse::<LogSince>().is_err(), "{bad}");
        }
        assert_eq!(
            "2024-12-05T12:00:00Z".parse(),
            Ok(LogSince::At(Millis(1_733_400_000_000)))
        );
        assert_eq!(
            "2024-12-05T13:00:00.25+01:00".parse(),
            Ok(LogSince::At(Millis(1_733_400_000_250)))
        );
        for bad in [
            "2024-12-05T12:00:00",
            "2024-13-05T12:00:00Z",
            "2024-12-05 12:00",
        ] {
            assert!(bad.parse::<LogSince>().is_err(), "{bad}");
        }
        assert_eq!(LogSince::Ago(1000).resolve(Millis(5000)), Millis(4000));
        assert_eq!(LogSince::At(Millis(7)).resolve(Millis(5000)), Millis(7));
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let line = LogLine {
            time: Millis(5),
            stream: LogStream::Stderr,
            line: "boom".into(),
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"time":5,"stream":"stderr","line":"boom"}"#
        );
        let end = LogReadEnd {
            end: LogReadEndKind::DroneDisconnected,
            message: Some("gone".into()),
        };
        let text = serde_json::to_string(&end).unwrap();
        assert_eq!(text, r#"{"end":"drone_disconnected","message":"gone"}"#);
        let items: Vec<LogReadItem> = [r#"{"time":5,"stream":"stderr","line":"boom"}"#, &text]
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect();
        assert_eq!(items, [LogReadItem::Line(line), LogReadItem::End(end)]);
        let normal: LogReadEnd = serde_json::from_str(r#"{"end":"backend_ended"}"#).unwrap();
        assert!(normal.is_normal());
    }
}
