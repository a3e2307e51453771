//! The DNS responder's configuration (`DnsConfig`), filled by the binary from file, env and flags.

use crate::challenge_name::ChallengeNames;
use hangar_types::DnsName;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use url::Url;

/// Default for [`DnsConfig::port`]: 53, for UDP and TCP.
pub const DEFAULT_PORT: u16 = 53;
/// Default for [`DnsConfig::host`]: all IPv4 interfaces, as Plane binds.
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default for [`DnsConfig::lookup_timeout`]: 5 seconds (Plane's DNS query timeout).
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Durations are written as a number of seconds (fractions allowed, e.g. `0.5`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// This responder's node name (`ns-…`). Default: a fresh random name on every start.
    #[serde(default = "DnsName::random")]
    pub name: DnsName,
    /// Base URL of the controller (`http(s)://[token@]host:port/`); a username is sent as bearer token.
    /// Required.
    pub controller_url: Url,
    /// The DNS zone delegated to this responder (e.g. `acme.example.com`). A TXT query for
    /// `<cluster>.<zone>` (the target of the CNAME `_acme-challenge.<cluster>`) or for
    /// `_acme-challenge.<cluster>.<zone>` answers the challenge of `<cluster>`. Default: none, in which
    /// case queries must be for `_acme-challenge.<cluster>` itself (tests and direct delegation).
    #[serde(default)]
    pub zone: Option<String>,
    /// Address to bind UDP and TCP on. Default: `0.0.0.0`.
    #[serde(default = "default_host")]
    pub host: IpAddr,
    /// Port for UDP and TCP. Default: 53.
    #[serde(default = "default_port")]
    pub port: u16,
    /// How long a query waits for the controller's answer before it gets SERVFAIL, in seconds.
    /// Default: 5.
    #[serde(
        default = "default_lookup_timeout",
        with = "hangar_types::time::seconds"
    )]
    pub lookup_timeout: Duration,
}

fn default_host() -> IpAddr {
    DEFAULT_HOST
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_lookup_timeout() -> Duration {
    DEFAULT_LOOKUP_TIMEOUT
}

impl DnsConfig {
    /// A configuration with every optional field at its default.
    pub fn new(controller_url: Url, zone: Option<String>) -> Self {
        DnsConfig {
            name: DnsName::random(),
            controller_url,
            zone,
            host: DEFAULT_HOST,
            port: DEFAULT_PORT,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
        }
    }

    /// Where the binary binds the UDP socket and the TCP listener.
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.controller_url.scheme(), "http" | "https")
            || self.controller_url.cannot_be_a_base()
        {
            return Err(ConfigError::InvalidControllerUrl(
                self.controller_url.scheme().to_string(),
            ));
        }
        if self.lookup_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("lookup_timeout"));
        }
        ChallengeNames::new(self.zone.as_deref())?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("`controller_url` must be an http or https URL with a host, got scheme {0:?}")]
    InvalidControllerUrl(String),
    #[error("`{0}` must be greater than zero")]
    ZeroDuration(&'static str),
    #[error(
        "`zone` {0:?} is not a DNS name (labels of a-z, 0-9, `-`, `_`, at most 253 characters)"
    )]
    InvalidZone(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: DnsConfig =
            serde_json::from_str(r#"{"controller_url": "http://localhost:8080/"}"#).unwrap();
        assert!(c.name.as_str().starts_with("ns-"));
        assert_eq!(c.zone, None);
        assert_eq!(c.bind_addr(), "0.0.0.0:53".parse().unwrap());
        assert_eq!(c.lookup_timeout, Duration::from_secs(5));
        assert!(c.validate().is_ok());

        assert!(
            serde_json::from_str::<DnsConfig>(r#"{"controller_url": "http://x/", "nope": 1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<DnsConfig>(r#"{"zone": "x"}"#).is_err());
        assert!(serde_json::from_str::<DnsConfig>(
            r#"{"controller_url": "http://x/", "name": "px-abc"}"#
        )
        .is_err());
    }

    #[test]
    fn fields_parse() {
        let c: DnsConfig = serde_json::from_str(
            r#"{"controller_url": "http://x/", "zone": "acme.example.com", "host": "127.0.0.1",
                "port": 5353, "lookup_timeout": 0.5, "name": "ns-abc"}"#,
        )
        .unwrap();
        assert_eq!(c.bind_addr(), "127.0.0.1:5353".parse().unwrap());
        assert_eq!(c.lookup_timeout, Duration::from_millis(500));
        assert_eq!(c.name.as_str(), "ns-abc");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validation() {
        let mut c = DnsConfig::new("http://x/".parse().unwrap(), Some("bad zone".into()));
        assert!(matches!(c.validate(), Err(ConfigError::InvalidZone(_))));
        c.zone = Some("acme.example.com.".into());
        assert!(c.validate().is_ok());
        c.lookup_timeout = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroDuration("lookup_timeout"))
        );
        let c = DnsConfig::new("ftp://x/".parse().unwrap(), None);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InvalidControllerUrl(_))
        ));
    }
}
