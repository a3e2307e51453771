//! Which cluster a queried name asks about (Plane §7.9.4).
//!
//! Production setup: the operator makes `_acme-challenge.<cluster>` a CNAME to `<cluster>.<zone>` and
//! delegates `<zone>` to this responder, so resolvers ask us for `<cluster>.<zone>`. We also accept
//! `_acme-challenge.<cluster>.<zone>` (a delegation of the challenge names themselves into the zone).
//! Without a zone the query must be for `_acme-challenge.<cluster>` itself.
//!
//! Cluster names with a port (`localhost:9090`) cannot appear in a DNS name; they are plain-HTTP
//! clusters and never need a certificate, so they are simply never matched.

use crate::config::ConfigError;
use hangar_types::ClusterName;

/// The label (with its dot) in front of the name whose TXT record an ACME DNS-01 challenge reads
/// (RFC 8555 §8.4).
pub const CHALLENGE_PREFIX: &str = "_acme-challenge.";

/// Longest DNS name in text form without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Maps queried names to cluster names for one (optional) zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeNames {
    /// Lowercase, without leading or trailing dot.
    zone: Option<String>,
}

/// Why a queried name is not a challenge name this responder answers for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameMismatch {
    #[error("the name has characters or labels no challenge name has")]
    Malformed,
    #[error("the name is not below the zone `{0}`")]
    NotUnderZone(String),
    #[error("the name does not start with `{CHALLENGE_PREFIX}`")]
    MissingChallengeLabel,
    #[error("`{0}` is not a cluster name")]
    NotACluster(String),
}

impl ChallengeNames {
    /// `zone` may be given with or without a trailing dot and in any case.
    pub fn new(zone: Option<&str>) -> Result<Self, ConfigError> {
        let zone = match zone {
            None => None,
            Some(raw) => {
                let zone = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
                if !is_dns_name(&zone) {
                    return Err(ConfigError::InvalidZone(raw.to_string()));
                }
                Some(zone)
            }
        };
        Ok(ChallengeNames { zone })
    }

    /// The normalized zone (lowercase, no trailing dot).
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The cluster whose challenge `name` asks for. `name` is a DNS name in text form, with or without
    /// the trailing root dot, in any case.
    pub fn cluster_for(&self, name: &str) -> Result<ClusterName, NameMismatch> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !is_dns_name(&name) {
            return Err(NameMismatch::Malformed);
        }
        let cluster = match &self.zone {
            Some(zone) => {
                let inside = name
                    .strip_suffix(zone.as_str())
                    .and_then(|rest| rest.strip_suffix('.'))
                    .ok_or_else(|| NameMismatch::NotUnderZone(zone.clone()))?;
                inside.strip_prefix(CHALLENGE_PREFIX).unwrap_or(inside)
            }
            None => name
                .strip_prefix(CHALLENGE_PREFIX)
                .ok_or(NameMismatch::MissingChallengeLabel)?,
        };
        cluster
            .parse()
            .map_err(|_| NameMismatch::NotACluster(cluster.to_string()))
    }
}

/// Lowercase text form of a DNS name without the root dot: labels of `[a-z0-9_-]`, 1–63 characters
/// each, at most 253 characters in all.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(s: &str) -> ClusterName {
        s.parse().unwrap()
    }

    /// The answer for a name whose cluster part is `part`, which is no cluster name.
    fn not_a_cluster(part: &str) -> Result<ClusterName, NameMismatch> {
        Err(NameMismatch::NotACluster(part.into()))
    }

    #[test]
    fn with_zone_maps_cluster_dot_zone() {
        let names = ChallengeNames::new(Some("acme.example.com")).unwrap();
        assert_eq!(
            names.cluster_for("c1.example.org.acme.example.com"),
            Ok(cluster("c1.example.org"))
        );
        // Trailing dot and any case are tolerated.
        assert_eq!(
            names.cluster_for("C1.Example.ORG.acme.EXAMPLE.com."),
            Ok(cluster("c1.example.org"))
        );
        // The challenge label inside the zone is accepted as well.
        assert_eq!(
            names.cluster_for("_acme-challenge.c1.example.org.acme.example.com."),
            Ok(cluster("c1.example.org"))
        );
        // A single-label cluster.
        assert_eq!(
            names.cluster_for("localhost.acme.example.com"),
            Ok(cluster("localhost"))
        );
    }

    #[test]
    fn with_zone_rejects_other_names() {
        let names = ChallengeNames::new(Some("acme.example.com.")).unwrap();
        assert_eq!(names.zone(), Some("acme.example.com"));
        let not_under = Err(NameMismatch::NotUnderZone("acme.example.com".into()));
        assert_eq!(names.cluster_for("c1.example.org"), not_under);
        assert_eq!(names.cluster_for("acme.example.com."), not_under);
        // A suffix match that is not at a label boundary is not inside the zone.
        assert_eq!(names.cluster_for("c1.xacme.example.com"), not_under);
        assert_eq!(
            names.cluster_for("_acme-challenge.c1.example.org"),
            not_under
        );
        // Only the challenge label: nothing left for a cluster.
        assert_eq!(
            names.cluster_for("_acme-challenge.acme.example.com"),
            not_a_cluster("_acme-challenge")
        );
        // Underscores elsewhere cannot be part of a cluster name.
        assert_eq!(
            names.cluster_for("a_b.acme.example.com"),
            not_a_cluster("a_b")
        );
    }

    #[test]
    fn without_zone_requires_challenge_label() {
        let names = ChallengeNames::new(None).unwrap();
        assert_eq!(names.zone(), None);
        assert_eq!(
            names.cluster_for("_acme-challenge.c1.example.org"),
            Ok(cluster("c1.example.org"))
        );
        assert_eq!(
            names.cluster_for("_ACME-Challenge.c1.example.org."),
            Ok(cluster("c1.example.org"))
        );
        assert_eq!(
            names.cluster_for("c1.example.org."),
            Err(NameMismatch::MissingChallengeLabel)
        );
        assert_eq!(
            names.cluster_for("_acme-challengex.c1.example.org"),
            Err(NameMismatch::MissingChallengeLabel)
        );
        assert_eq!(
            names.cluster_for("_acme-challenge._acme-challenge.c1"),
            not_a_cluster("_acme-challenge.c1")
        );
    }

    #[test]
    fn malformed_names() {
        let names = ChallengeNames::new(None).unwrap();
        for name in [
            "",
            ".",
            "..",
            "_acme-challenge..c1",
            "_acme-challenge.c1:9090",
            "_acme-challenge.c 1",
            "_acme-challenge.c1/x",
            "_acme-challenge.é.example",
        ] {
            assert_eq!(
                names.cluster_for(name),
                Err(NameMismatch::Malformed),
                "{name:?}"
            );
        }
        let long = format!("_acme-challenge.{}.example", "a".repeat(64));
        assert_eq!(names.cluster_for(&long), Err(NameMismatch::Malformed));
        let too_many = format!("_acme-challenge.{}", "a.".repeat(130));
        assert_eq!(names.cluster_for(&too_many), Err(NameMismatch::Malformed));
    }

    #[test]
    fn zone_validation() {
        assert!(ChallengeNames::new(Some("")).is_err());
        assert!(ChallengeNames::new(Some(".")).is_err());
        assert!(ChallengeNames::new(Some("a..b")).is_err());
        assert!(ChallengeNames::new(Some("has space.com")).is_err());
        assert_eq!(
            ChallengeNames::new(Some("ACME.Example.com"))
                .unwrap()
                .zone(),
            Some("acme.example.com")
        );
    }
}
