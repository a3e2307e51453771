//! The controller's configuration (`ControllerConfig`), filled by the binary from file, env and flags.

use hangar_types::timing::KeyTiming;
use hangar_types::{ClusterName, ControllerName};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Default for [`ControllerConfig::best_of`].
pub const DEFAULT_BEST_OF: usize = 2;
/// Default for [`ControllerConfig::max_body_bytes`]: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default for [`ControllerConfig::cleanup_interval`]: 180 s (Plane's cadence).
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(180);
/// Default for [`ControllerConfig::forward_auth_timeout`]: 10 s.
pub const DEFAULT_FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest accepted [`ControllerConfig::forward_auth_timeout`]: 100 ms.
pub const MIN_FORWARD_AUTH_TIMEOUT: Duration = Duration::from_millis(100);
/// Default for [`ControllerConfig::header_read_timeout`]: 30 s (the proxy's).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ControllerConfig::idle_timeout`]: 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ControllerConfig::max_connections`]: 10 000 (the proxy's).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default for [`ControllerConfig::max_header_bytes`]: 64 KiB (the proxy's).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Smallest accepted [`ControllerConfig::max_header_bytes`] (hyper's smallest read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// Longest accepted listener duration: deadlines are `now + value`, which must not overflow.
pub const MAX_LISTENER_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// This controller instance's name (`co-…`). Default: a fresh random name on every start.
    pub name: ControllerName,
    /// Public base URL of this controller, used to build `status_url` in connect responses (any path,
    /// query or user info in it is replaced). Default: `http://<listener local address>`.
    pub controller_url: Option<Url>,
    /// Where the other controllers sharing this store reach this instance directly (not through a
    /// load balancer), e.g. `http://10.0.0.5:8080`; a request for the logs of a backend whose drone
    /// is connected here is forwarded to it. Default: `http://<listener local address>` (enough when
    /// every controller runs on one machine or listens on a specific address).
    pub internal_url: Option<Url>,
    /// Cluster used by connect requests whose `spawn_config.cluster` is absent. Default: none (such
    /// requests get 400 `NoClusterProvided`).
    pub default_cluster: Option<ClusterName>,
    /// The scheduler samples this many random candidate drones and picks the least loaded. Must be at
    /// least 1. Default: 2.
    pub best_of: usize,
    /// Largest accepted JSON request body, in bytes; larger bodies get 413. Also the largest accepted
    /// WebSocket message from a node. Default: 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// When set, every `/ctrl/*` route, including the drone and proxy sockets, requires
    /// `Authorization: Bearer <token>` (401 otherwise). `/pub/*` never requires it. Default: none.
    pub bearer_token: Option<String>,
    /// Terminated backends (with their history, actions and tokens) are deleted this many days after
    /// they terminated. At least 1. Default: none (they are kept; only expired tokens are deleted).
    pub cleanup_min_age_days: Option<u32>,
    /// Time between cleanup passes, in milliseconds; the first pass runs after a random part of it so
    /// that controllers sharing a database spread out. At least 1000. Default: 180000 (180 s).
    #[serde(with = "millis")]
    pub cleanup_interval: Duration,
    /// Plane's `--forward-auth`: when set, every `/ctrl/*` request (node sockets included), the
    /// dashboard page and `/metrics` are first checked by a side request to this `http://` or
    /// `https://` URL with the same method, the original headers and `x-original-path` (the path
    /// without `/ctrl`, as Plane sends it); a 2xx answer lets the request through, any other answer is
    /// returned to the client as it is. `/pub/*` is never checked. Default: none.
    pub forward_auth: Option<Url>,
    /// How long the forward-auth side request may take (connect, answer and body), in
    /// milliseconds; past it the client gets 502. At least 100. Default: 10000 (10 s).
    #[serde(with = "millis")]
    pub forward_auth_timeout: Duration,
    /// PEM file of extra CA certificates trusted for an `https://` forward-auth URL (besides the
    /// public web PKI roots), e.g. for an auth service with a private or self-signed certificate.
    /// Default: none.
    pub forward_auth_ca_cert: Option<PathBuf>,
    /// How long a client may take to send a complete HTTP request head, in milliseconds, counted
    /// from when the controller starts waiting for it (the connection opened, or the previous
    /// response on a keep-alive HTTP/1.1 connection ended); slower clients (slowloris) are
    /// disconnected. At least 1. Default: 30000 (30 s).
    #[serde(with = "millis")]
    pub header_read_timeout: Duration,
    /// A connection on which no request started for this long, in milliseconds, is closed
    /// gracefully (a response in progress, such as a status stream, is finished first; WebSockets
    /// are not HTTP connections any more and are not affected). At least 1. Default: 60000 (60 s).
    #[serde(with = "millis")]
    pub idle_timeout: Duration,
    /// Most client connections open at once on the API listener, WebSockets (drone, proxy and DNS
    /// sockets) included. Beyond it a new connection gets `503` with `Connection: close`. At least
    /// 1. Default: 10000.
    pub max_connections: usize,
    /// Largest HTTP request head in bytes (request line and headers); larger heads get `431`. At
    /// least 8192. Default: 65536 (64 KiB).
    pub max_header_bytes: usize,
    /// Test-only: the key deadlines this controller hands to drones. Not read from configuration
    /// files; always [`KeyTiming::DEFAULT`] in production. A test that shortens it must shorten the
    /// store's lease to match (`PostgresStore::set_key_lease`). Must be ordered
    /// ([`KeyTiming::is_ordered`]).
    #[serde(skip)]
    #[doc(hidden)]
    pub key_timing: KeyTiming,
}

/// Durations as integer milliseconds in config files.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            name: ControllerName::random(),
            controller_url: None,
            internal_url: None,
            default_cluster: None,
            best_of: DEFAULT_BEST_OF,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            bearer_token: None,
            cleanup_min_age_days: None,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
            forward_auth: None,
            forward_auth_timeout: DEFAULT_FORWARD_AUTH_TIMEOUT,
            forward_auth_ca_cert: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            key_timing: KeyTiming::DEFAULT,
        }
    }
}

/// The bearer token is a credential: never print it.
impl std::fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("name", &self.name)
            .field(
                "controller_url",
                &self.controller_url.as_ref().map(Url::as_str),
            )
            .field(
                "internal_url",
                &self.internal_url.as_ref().map(redacted_url),
            )
            .field("default_cluster", &self.default_cluster)
            .field("best_of", &self.best_of)
            .field("max_body_bytes", &self.max_body_bytes)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("cleanup_min_age_days", &self.cleanup_min_age_days)
            .field("cleanup_interval", &self.cleanup_interval)
            .field(
                "forward_auth",
                &self.forward_auth.as_ref().map(redacted_url),
            )
            .field("forward_auth_timeout", &self.forward_auth_timeout)
            .field("forward_auth_ca_cert", &self.forward_auth_ca_cert)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("key_timing", &self.key_timing)
            .finish()
    }
}

/// A URL for logs: any password in it replaced (a forward-auth URL may carry credentials).
pub(crate) fn redacted_url(url: &Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("redacted"));
    }
    url.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("`best_of` must be at least 1")]
    BestOfZero,
    #[error("`max_body_bytes` must be at least 1024")]
    BodyLimitTooSmall,
    #[error("`bearer_token` must not be empty")]
    EmptyBearerToken,
    #[error("`controller_url` must be an http or https URL with a host, got {0}")]
    InvalidControllerUrl(String),
    #[error("`cleanup_min_age_days` must be at least 1")]
    CleanupMinAgeZero,
    #[error("`cleanup_interval` must be at least 1000 ms")]
    CleanupIntervalTooShort,
    #[error("`key_timing` must order renew < soft-terminate < hard-terminate < lease")]
    KeyTimingUnordered,
    #[error("`forward_auth` must be an http or https URL with a host, got {0}")]
    InvalidForwardAuthUrl(String),
    #[error("`forward_auth_timeout` must be at least 100 ms")]
    ForwardAuthTimeoutTooShort,
    #[error("`forward_auth_ca_cert` is set but `forward_auth` is not")]
    ForwardAuthCaCertWithoutUrl,
    #[error("cannot use `forward_auth_ca_cert` {path}: {reason}")]
    ForwardAuthCaCert { path: String, reason: String },
    #[error("`{0}` must be between 1 ms and 365 days")]
    InvalidListenerDuration(&'static str),
    #[error(
        "`max_connections` must be between 1 and {}",
        tokio::sync::Semaphore::MAX_PERMITS
    )]
    InvalidMaxConnections,
    #[error("`max_header_bytes` must be between 8192 and 4294967295")]
    InvalidMaxHeaderBytes,
}

/// Shortest accepted [`ControllerConfig::cleanup_interval`].
pub const MIN_CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

impl ControllerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.best_of == 0 {
            return Err(ConfigError::BestOfZero);
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::BodyLimitTooSmall);
        }
        if self.bearer_token.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptyBearerToken);
        }
        if self.cleanup_min_age_days == Some(0) {
            return Err(ConfigError::CleanupMinAgeZero);
        }
        if self.cleanup_interval < MIN_CLEANUP_INTERVAL {
            return Err(ConfigError::CleanupIntervalTooShort);
        }
        if !self.key_timing.is_ordered() {
            return Err(ConfigError::KeyTimingUnordered);
        }
        if let Some(url) = &self.forward_auth {
            if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                return Err(ConfigError::InvalidForwardAuthUrl(redacted_url(url)));
            }
        }
        if self.forward_auth_timeout < MIN_FORWARD_AUTH_TIMEOUT {
            return Err(ConfigError::ForwardAuthTimeoutTooShort);
        }
        if self.forward_auth_ca_cert.is_some() && self.forward_auth.is_none() {
            return Err(ConfigError::ForwardAuthCaCertWithoutUrl);
        }
        self.validate_listener()?;
        for url in [&self.controller_url, &self.internal_url]
            .into_iter()
            .flatten()
        {
            if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
                return Err(ConfigError::InvalidControllerUrl(url.to_string()));
            }
        }
        Ok(())
    }

    fn validate_listener(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value < Duration::from_millis(1) || value > MAX_LISTENER_DURATION {
                return Err(ConfigError::InvalidListenerDuration(field));
            }
        }
        // The semaphore that enforces the cap cannot hold more permits than this.
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::InvalidMaxConnections);
        }
        // HTTP/2 carries the limit as a u32.
        if self.max_header_bytes < MIN_MAX_HEADER_BYTES
            || u32::try_from(self.max_header_bytes).is_err()
        {
            return Err(ConfigError::InvalidMaxHeaderBytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_are_refused() {
        let c: ControllerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.best_of, 2);
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert!(c.validate().is_ok());
        assert!(serde_json::from_str::<ControllerConfig>(r#"{"bestof": 3}"#).is_err());
        let c: ControllerConfig = serde_json::from_str(
            r#"{"best_of": 0, "default_cluster": "localhost:9090", "controller_url": "http://x:1/"}"#,
        )
        .unwrap();
        assert_eq!(c.validate(), Err(ConfigError::BestOfZero));
    }

    #[test]
    fn cleanup_settings() {
        let c: ControllerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.cleanup_interval, Duration::from_secs(180));
        assert_eq!(c.cleanup_min_age_days, None);
        let c: ControllerConfig =
            serde_json::from_str(r#"{"cleanup_interval": 60000, "cleanup_min_age_days": 7}"#)
                .unwrap();
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.cleanup_min_age_days, Some(7));
        assert!(c.validate().is_ok());
        let c: ControllerConfig = serde_json::from_str(r#"{"cleanup_interval": 0}"#).unwrap();
        assert_eq!(c.validate(), Err(ConfigError::CleanupIntervalTooShort));
        let c: ControllerConfig = serde_json::from_str(r#"{"cleanup_min_age_days": 0}"#).unwrap();
        assert_eq!(c.validate(), Err(ConfigError::CleanupMinAgeZero));
        assert!(serde_json::from_str::<ControllerConfig>(r#"{"cleanup_interval": -1}"#).is_err());
    }

    #[test]
    fn key_timing_is_not_configurable_and_must_be_ordered() {
        let c: ControllerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.key_timing, KeyTiming::DEFAULT);
        assert!(serde_json::from_str::<ControllerConfig>(r#"{"key_timing": {}}"#).is_err());
        let c = ControllerConfig {
            key_timing: KeyTiming {
                lease: Duration::from_secs(1),
                ..KeyTiming::DEFAULT
            },
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::KeyTimingUnordered));
    }

    #[test]
    fn forward_auth_settings() {
        let c: ControllerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.forward_auth, None);
        assert_eq!(c.forward_auth_timeout, Duration::from_secs(10));
        let c: ControllerConfig = serde_json::from_str(
            r#"{"forward_auth": "https://user:pw@auth.internal/check", "forward_auth_timeout": 2500}"#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.forward_auth_timeout, Duration::from_millis(2500));
        assert!(!format!("{c:?}").contains("pw@"));
        let c: ControllerConfig =
            serde_json::from_str(r#"{"forward_auth": "ftp://auth.internal/"}"#).unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidForwardAuthUrl(_))
        ));
        let c: ControllerConfig =
            serde_json::from_str(r#"{"forward_auth": "http://a/", "forward_auth_timeout": 5}"#)
                .unwrap();
        assert_eq!(c.validate(), Err(ConfigError::ForwardAuthTimeoutTooShort));
        let c: ControllerConfig =
            serde_json::from_str(r#"{"forward_auth_ca_cert": "/etc/ca.pem"}"#).unwrap();
        assert_eq!(c.validate(), Err(ConfigError::ForwardAuthCaCertWithoutUrl));
    }

    #[test]
    fn listener_limits() {
        let c: ControllerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_header_bytes, 64 * 1024);
        let c: ControllerConfig = serde_json::from_str(
            r#"{"header_read_timeout": 500, "idle_timeout": 2000, "max_connections": 3, "max_header_bytes": 8192}"#,
        )
        .unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_millis(500));
        assert!(c.validate().is_ok());
        for (json, error) in [
            (
                r#"{"header_read_timeout": 0}"#,
                ConfigError::InvalidListenerDuration("header_read_timeout"),
            ),
            (
                r#"{"idle_timeout": 99999999999999}"#,
                ConfigError::InvalidListenerDuration("idle_timeout"),
            ),
            (
                r#"{"max_connections": 0}"#,
                ConfigError::InvalidMaxConnections,
            ),
            (
                r#"{"max_header_bytes": 8191}"#,
                ConfigError::InvalidMaxHeaderBytes,
            ),
            (
                r#"{"max_header_bytes": 4294967296}"#,
                ConfigError::InvalidMaxHeaderBytes,
            ),
        ] {
            let c: ControllerConfig = serde_json::from_str(json).unwrap();
            assert_eq!(c.validate(), Err(error), "{json}");
        }
    }

    #[test]
    fn debug_hides_the_bearer_token() {
        let c = ControllerConfig {
            bearer_token: Some("very-secret".into()),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("very-secret"));
        let c = ControllerConfig {
            bearer_token: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::EmptyBearerToken));
    }
}
