//! The proxy's configuration (`ProxyConfig`), filled by the binary from file, env and flags.

use hangar_types::{ClusterName, ProxyName};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use url::Url;

/// Default for [`ProxyConfig::route_wait_timeout`]: 5 minutes.
pub const DEFAULT_ROUTE_WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default for [`ProxyConfig::upstream_connect_timeout`]: 10 seconds.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ProxyConfig::shutdown_grace`]: 10 seconds.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    #[serde(default = "default_route_wait", with = "seconds")]
    pub route_wait_timeout: Duration,
    /// Timeout for opening the TCP connection to a backend, in seconds; afterwards the request gets
    /// 502. Default: 10.
    #[serde(default = "default_connect_timeout", with = "seconds")]
    pub upstream_connect_timeout: Duration,
    /// On shutdown, how long in-flight HTTP exchanges may take to finish before the remaining
    /// connections (and all WebSocket tunnels) are dropped, in seconds. Default: 10.
    #[serde(default = "default_shutdown_grace", with = "seconds")]
    pub shutdown_grace: Duration,
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
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(field));
            }
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
}

/// Serde adapter: a [`Duration`] as a (fractional) number of seconds.
mod seconds {
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
    fn defaults_and_unknown_fields() {
        let c: ProxyConfig = serde_json::from_str(
            r#"{"controller_url": "http://localhost:8080/", "cluster": "localhost:9090"}"#,
        )
        .unwrap();
        assert_eq!(c.route_wait_timeout, DEFAULT_ROUTE_WAIT_TIMEOUT);
        assert_eq!(c.upstream_connect_timeout, Duration::from_secs(10));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert!(c.name.as_str().starts_with("px-"));
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
        let c = ProxyConfig::new("ftp://x/".parse().unwrap(), "x".parse().unwrap());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidControllerUrl(_))
        ));
    }
}
