//! Timestamps on the wire: integer milliseconds since the Unix epoch (Plane's `LoggableTime`).

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;

/// Milliseconds since the Unix epoch, UTC. Serialized as a bare JSON integer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct Millis(pub i64);

impl Millis {
    /// The local wall clock. Only compare it with times taken on the same machine.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    pub fn plus(self, d: Duration) -> Self {
        Millis(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// Time from `self` until `later` (zero if `later` is not after `self`).
    pub fn until(self, later: Millis) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Serde adapter (`#[serde(with = "hangar_types::time::seconds")]`): a [`Duration`] as a (fractional)
/// number of seconds, as the components' config files spell durations.
pub mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "{secs} is not a valid number of seconds (must be finite and not negative)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_and_until_agree() {
        let t = Millis(1_000);
        let later = t.plus(Duration::from_secs(2));
        assert_eq!(later, Millis(3_000));
        assert_eq!(t.until(later), Duration::from_secs(2));
        assert_eq!(later.until(t), Duration::ZERO);
    }
}
