//! The proxy's configuration (`ProxyConfig`), filled by the binary from file, env and flags.

use crate::acme::{AcmeConfig, AcmeConfigError};
use hangar_types::{ClusterName, ProxyName};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Default for [`ProxyConfig::route_wait_timeout`]: 5 minutes.
pub const DEFAULT_ROUTE_WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default for [`ProxyConfig::upstream_connect_timeout`]: 10 seconds.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::shutdown_grace`]: 10 seconds.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::max_connections`]: 10 000.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default for [`ProxyConfig::max_header_bytes`]: 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default for [`ProxyConfig::max_headers`]: 100 (hyper's own default).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default for [`ProxyConfig::max_request_body_bytes`]: 100 MiB.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 100 * 1024 * 1024;
/// Default for [`ProxyConfig::header_read_timeout`]: 30 seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ProxyConfig::idle_timeout`]: 20 seconds.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest allowed duration in the configuration: 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The smallest allowed [`ProxyConfig::max_header_bytes`] (hyper's minimum read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// Default for [`ProxyConfig::renew_before`]: 30 days (Plane's renewal margin).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default for [`ProxyConfig::cert_reload_interval`]: 5 seconds.
pub const DEFAULT_CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The most [`ProxyConfig::workers`] (threads, each with a listening socket per listener).
pub const MAX_WORKERS: usize = 1024;

/// Durations are written as a number of seconds (fractions allowed, e.g. `0.5`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// This proxy's node name (`px-…`). Default: a fresh random name on every start.
    #[serde(default = "ProxyName::random")]
    pub name: ProxyName,
    /// Base URL of the controller (`http(s)://[token@]host:port/`); a username is sent as bearer token.
    /// Required.
    pub controller_url: Url,
    /// The cluster this proxy serves (`host[:port]`, the public address of the proxy). Required.
    pub cluster: ClusterName,
    /// Where `GET /` is redirected (301). Default: none (`/` answers 400).
    #[serde(default)]
    pub root_redirect_url: Option<Url>,
    /// How long a request waits for its route, i.e. for a starting backend to become ready, in
    /// seconds; afterwards it gets 504. Default: 300 (5 minutes).
    #[serde(default = "default_route_wait", with = "hangar_types::time::seconds")]
    pub route_wait_timeout: Duration,
    /// Timeout for opening the TCP connection to a backend, in seconds; afterwards the request gets
    /// 502. Default: 10.
    #[serde(
        default = "default_connect_timeout",
        with = "hangar_types::time::seconds"
    )]
    pub upstream_connect_timeout: Duration,
    /// On shutdown, how long in-flight HTTP exchanges may take to finish before the remaining
    /// connections (and all WebSocket tunnels) are dropped, in seconds. Default: 10.
    #[serde(
        default = "default_shutdown_grace",
        with = "hangar_types::time::seconds"
    )]
    pub shutdown_grace: Duration,
    /// Most client connections open at once (HTTP connections and WebSocket tunnels). Beyond it a
    /// new connection gets `503` with `Connection: close` and is closed. Default: 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head in bytes (request line plus headers for HTTP/1.1, the header list for
    /// HTTP/2); larger requests get `431`. At least 8192. Default: 65536 (64 KiB).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most headers in an HTTP/1.1 request; more get `431`. Default: 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Largest request body in bytes that is forwarded (upgrade requests carry none); a larger
    /// declared `Content-Length` gets `413` at once, a streamed body that grows past it gets `413`
    /// unless the backend already answered. Default: 104857600 (100 MiB).
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// How long an HTTP/1.1 connection may take to deliver a complete request head, in seconds,
    /// counted from when the proxy starts waiting for it (the connection opened or the previous
    /// response ended); slower clients (slowloris) are disconnected. Any new connection (HTTP/1.1
    /// or HTTP/2) that has not started a request within this long is dropped too. Default: 30.
    #[serde(
        default = "default_header_read_timeout",
        with = "hangar_types::time::seconds"
    )]
    pub header_read_timeout: Duration,
    /// A client connection (HTTP/1.1 keep-alive or HTTP/2) with no request in progress and no
    /// bytes sent or received for this long is closed, in seconds (HTTP/2 gets a GOAWAY first).
    /// HTTP/1.1 connections are also bounded by `header_read_timeout` while they wait for their
    /// next request, so the shorter of the two applies to them. Default: 20.
    #[serde(default = "default_idle_timeout", with = "hangar_types::time::seconds")]
    pub idle_timeout: Duration,
    /// The certificate file (TLS, Plane §7.9.2): Plane's JSON `{"cert": "<PEM chain>", "key":
    /// "<PEM key>"}`, or PEM with the chain and the key (the key may instead be in `key_path`). Loaded
    /// at startup, reloaded when it changes on disk (a file that fails to load keeps the current
    /// certificate, with an error log), and written after every ACME issuance. Without `acme` it must
    /// exist at startup. Default: none.
    #[serde(default)]
    pub cert_path: Option<PathBuf>,
    /// The private key in its own PEM file, for a PEM `cert_path` without the key. Default: none.
    #[serde(default)]
    pub key_path: Option<PathBuf>,
    /// How often the certificate file is checked for changes, in seconds. Default: 5.
    #[serde(
        default = "default_cert_reload_interval",
        with = "hangar_types::time::seconds"
    )]
    pub cert_reload_interval: Duration,
    /// Obtain and renew the cluster's certificate from an ACME CA (Let's Encrypt, ZeroSSL…). The
    /// cluster name must then be a DNS name without port. Default: none.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
    /// With `acme`: renew once the served certificate has less than this left, in seconds.
    /// Default: 2592000 (30 days).
    #[serde(default = "default_renew_before", with = "hangar_types::time::seconds")]
    pub renew_before: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9091`. A separate
    /// listener: the public proxy port never serves them. Default: none (off).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Threads that serve client connections, each with its own event loop and its own listening
    /// socket (`SO_REUSEPORT`); a connection and the backend connection it keeps stay on one
    /// thread. `0` means one per available core. Default: 0.
    #[serde(default)]
    pub workers: usize,
}

fn default_route_wait() -> Duration {
    DEFAULT_ROUTE_WAIT_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT
}
fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn default_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn default_max_request_body_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}
fn default_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_cert_reload_interval() -> Duration {
    DEFAULT_CERT_RELOAD_INTERVAL
}
fn default_renew_before() -> Duration {
    DEFAULT_RENEW_BEFORE
}

impl ProxyConfig {
    /// A configuration with every optional field at its default.
    pub fn new(controller_url: Url, cluster: ClusterName) -> Self {
        ProxyConfig {
            name: ProxyName::random(),
            controller_url,
            cluster,
            root_redirect_url: None,
            route_wait_timeout: DEFAULT_ROUTE_WAIT_TIMEOUT,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            cert_path: None,
            key_path: None,
            cert_reload_interval: DEFAULT_CERT_RELOAD_INTERVAL,
            acme: None,
            renew_before: DEFAULT_RENEW_BEFORE,
            metrics_addr: None,
            workers: 0,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.controller_url.scheme(), "http" | "https")
            || self.controller_url.cannot_be_a_base()
        {
            return Err(ConfigError::InvalidControllerUrl(
                self.controller_url.scheme().to_string(),
            ));
        }
        if let Some(url) = &self.root_redirect_url {
            if http::HeaderValue::from_str(url.as_str()).is_err() {
                return Err(ConfigError::InvalidRootRedirect);
            }
        }
        for (field, value) in [
            ("route_wait_timeout", self.route_wait_timeout),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(field));
            }
        }
        for (field, value) in [
            ("route_wait_timeout", self.route_wait_timeout),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            // Deadlines are computed as `now + value`, which must not overflow.
            if value > MAX_DURATION {
                return Err(ConfigError::DurationTooLong(field));
            }
        }
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_headers", self.max_headers),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroLimit(field));
            }
        }
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::TooManyWorkers(self.workers));
        }
        // The semaphore that enforces the limit cannot hold more permits than this.
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::TooManyConnections(self.max_connections));
        }
        if self.max_header_bytes < MIN_MAX_HEADER_BYTES
            || u32::try_from(self.max_header_bytes).is_err()
        {
            return Err(ConfigError::InvalidMaxHeaderBytes(self.max_header_bytes));
        }
        self.validate_tls()
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        if self.key_path.is_some() && self.cert_path.is_none() {
            return Err(ConfigError::KeyPathWithoutCertPath);
        }
        for (field, value) in [
            ("cert_reload_interval", self.cert_reload_interval),
            ("renew_before", self.renew_before),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(field));
            }
            if value > MAX_DURATION {
                return Err(ConfigError::DurationTooLong(field));
            }
        }
        if let Some(acme) = &self.acme {
            acme.validate()?;
            crate::acme::certificate_names(&self.cluster, acme)
                .map_err(|_| ConfigError::AcmeCluster(self.cluster.to_string()))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("`controller_url` must be an http or https URL with a host, got scheme {0:?}")]
    InvalidControllerUrl(String),
    #[error("`root_redirect_url` cannot be used as a Location header")]
    InvalidRootRedirect,
    #[error("`{0}` must be greater than zero")]
    ZeroDuration(&'static str),
    #[error("`{0}` must be at most 365 days")]
    DurationTooLong(&'static str),
    #[error("`{0}` must be at least 1")]
    ZeroLimit(&'static str),
    #[error("`workers` must be at most 1024, got {0}")]
    TooManyWorkers(usize),
    #[error("`max_connections` is too large: {0}")]
    TooManyConnections(usize),
    #[error("`max_header_bytes` must be between 8192 and 4294967295, got {0}")]
    InvalidMaxHeaderBytes(usize),
    #[error("`key_path` needs `cert_path`")]
    KeyPathWithoutCertPath,
    #[error("ACME needs a cluster name that is a DNS name without port, got `{0}`")]
    AcmeCluster(String),
    #[error("invalid ACME configuration: {0}")]
    Acme(#[from] AcmeConfigError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: ProxyConfig = serde_json::from_str(
            r#"{"controller_url": "http://localhost:8080/", "cluster": "localhost:9090"}"#,
        )
        .unwrap();
        assert_eq!(c.route_wait_timeout, DEFAULT_ROUTE_WAIT_TIMEOUT);
        assert_eq!(c.upstream_connect_timeout, Duration::from_secs(10));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert!(c.name.as_str().starts_with("px-"));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_header_bytes, 64 * 1024);
        assert_eq!(c.max_headers, 100);
        assert_eq!(c.max_request_body_bytes, 100 * 1024 * 1024);
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(20));
        assert_eq!(c.renew_before, DEFAULT_RENEW_BEFORE);
        assert_eq!(c.cert_reload_interval, Duration::from_secs(5));
        assert_eq!(c.workers, 0);
        assert!(c.cert_path.is_none() && c.acme.is_none());
        assert!(c.validate().is_ok());

        assert!(serde_json::from_str::<ProxyConfig>(
            r#"{"controller_url": "http://x/", "cluster": "x", "nope": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ProxyConfig>(r#"{"cluster": "x"}"#).is_err());
    }

    #[test]
    fn durations_are_seconds() {
        let c: ProxyConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "cluster": "x", "route_wait_timeout": 0.5,
                "shutdown_grace": 3}"#,
        )
        .unwrap();
        assert_eq!(c.route_wait_timeout, Duration::from_millis(500));
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        let back: ProxyConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.route_wait_timeout, c.route_wait_timeout);
        assert!(serde_json::from_str::<ProxyConfig>(
            r#"{"controller_url": "http://x/", "cluster": "x", "shutdown_grace": -1}"#
        )
        .is_err());
    }

    #[test]
    fn validation() {
        let mut c = ProxyConfig::new("http://x/".parse().unwrap(), "x".parse().unwrap());
        assert!(c.validate().is_ok());
        c.route_wait_timeout = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroDuration("route_wait_timeout"))
        );
        let fresh = || ProxyConfig::new("http://x/".parse().unwrap(), "x".parse().unwrap());
        let mut c = fresh();
        c.idle_timeout = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroDuration("idle_timeout")));
        let mut c = fresh();
        c.shutdown_grace = Duration::from_secs(u64::MAX);
        assert_eq!(
            c.validate(),
            Err(ConfigError::DurationTooLong("shutdown_grace"))
        );
        let mut c = fresh();
        c.max_connections = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroLimit("max_connections")));
        let mut c = fresh();
        c.max_header_bytes = 8191;
        assert_eq!(c.validate(), Err(ConfigError::InvalidMaxHeaderBytes(8191)));
        c.max_header_bytes = 8192;
        assert!(c.validate().is_ok());
        let mut c = fresh();
        c.workers = MAX_WORKERS + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyWorkers(MAX_WORKERS + 1))
        );
        c.workers = MAX_WORKERS;
        assert!(c.validate().is_ok());
        let c = ProxyConfig::new("ftp://x/".parse().unwrap(), "x".parse().unwrap());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidControllerUrl(_))
        ));
    }

    #[test]
    fn tls_validation() {
        let fresh =
            || ProxyConfig::new("http://x/".parse().unwrap(), "plane.test".parse().unwrap());
        let mut c = fresh();
        c.key_path = Some("key.pem".into());
        assert_eq!(c.validate(), Err(ConfigError::KeyPathWithoutCertPath));
        let mut c = fresh();
        c.renew_before = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroDuration("renew_before")));
        let mut c = fresh();
        c.acme = Some(AcmeConfig::new(
            "https://acme.test/dir".parse().unwrap(),
            "ops@plane.test".into(),
        ));
        assert!(c.validate().is_ok());
        c.cluster = "localhost:9090".parse().unwrap();
        assert_eq!(
            c.validate(),
            Err(ConfigError::AcmeCluster("localhost:9090".into()))
        );
        let mut c = fresh();
        c.acme = Some(AcmeConfig::new(
            "https://acme.test/dir".parse().unwrap(),
            "not an email".into(),
        ));
        assert_eq!(
            c.validate(),
            Err(ConfigError::Acme(AcmeConfigError::InvalidEmail))
        );
        let c: ProxyConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "cluster": "plane.test", "cert_path": "/tmp/c.json",
                "renew_before": 86400,
                "acme": {"directory_url": "https://acme.test/dir", "email": "a@b.c"}}"#,
        )
        .unwrap();
        assert_eq!(c.renew_before, Duration::from_secs(86400));
        assert!(c.validate().is_ok());
    }
}
