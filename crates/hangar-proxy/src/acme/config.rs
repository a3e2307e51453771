//! ACME settings of the proxy (`ProxyConfig::acme`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Default for [`AcmeConfig::challenge_wait`]: 5 seconds.
pub const DEFAULT_CHALLENGE_WAIT: Duration = Duration::from_secs(5);
/// Default for [`AcmeConfig::lease_retry`]: 60 seconds (Plane's wait after a refused lease).
pub const DEFAULT_LEASE_RETRY: Duration = Duration::from_secs(60);
/// Default for [`AcmeConfig::retry_initial`]: 30 seconds (Plane's wait after a failed order).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(30);
/// Default for [`AcmeConfig::retry_max`]: 1 hour.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(3600);
/// Default for [`AcmeConfig::order_timeout`]: 2 minutes.
pub const DEFAULT_ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for [`AcmeConfig::check_interval`]: 1 hour.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// How the proxy proves control of the cluster's names to the ACME server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// DNS-01: a TXT record at `_acme-challenge.<cluster>`, served by `hangar dns` (the operator
    /// delegates that name to it). Covers `<cluster>` and `*.<cluster>`. The default.
    #[default]
    #[serde(rename = "dns-01")]
    Dns01,
    /// HTTP-01: `http://<name>/.well-known/acme-challenge/<token>` answered by every proxy of the
    /// cluster on its HTTP port. Wildcards cannot be validated this way, so the certificate covers
    /// `<cluster>` and the names in [`AcmeConfig::subdomains`] only.
    #[serde(rename = "http-01")]
    Http01,
}

/// ACME External Account Binding (RFC 8555 §7.3.4), required by some CAs (ZeroSSL, Google).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EabConfig {
    /// The key id the CA gave out. Required.
    pub key_id: String,
    /// The HMAC key the CA gave out, base64url without padding. Required.
    pub hmac_key: String,
}

impl EabConfig {
    /// The decoded HMAC key.
    pub fn hmac_key_bytes(&self) -> Result<Vec<u8>, AcmeConfigError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(self.hmac_key.trim_end_matches('='))
            .map_err(|_| AcmeConfigError::InvalidEabKey)?;
        if bytes.is_empty() {
            return Err(AcmeConfigError::InvalidEabKey);
        }
        Ok(bytes)
    }
}

/// Durations are written as a number of seconds (fractions allowed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`. Must be https.
    /// Required.
    pub directory_url: Url,
    /// Contact address of the ACME account (sent as `mailto:`). Required.
    pub email: String,
    /// External Account Binding. Default: none.
    #[serde(default)]
    pub eab: Option<EabConfig>,
    /// Challenge type. Default: `dns-01`.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// With `http-01`: subdomain labels to include (`<label>.<cluster>`), since a wildcard is not
    /// possible. Ignored with `dns-01`, whose certificate has the wildcard. Default: none.
    #[serde(default)]
    pub subdomains: Vec<String>,
    /// PEM file whose first certificate is the only root trusted for the ACME server (a test CA such
    /// as Pebble's). Default: none (the system's trust store).
    #[serde(default)]
    pub ca_cert_path: Option<PathBuf>,
    /// Where the ACME account (key and id) is kept so it is created once. Default:
    /// `<cert_path>.acme-account.json` when `cert_path` is set, otherwise only in memory (a new account
    /// on every start).
    #[serde(default)]
    pub account_path: Option<PathBuf>,
    /// After publishing a challenge answer (TXT record or HTTP-01 answer), how long to wait before
    /// asking the ACME server to check it, in seconds: covers the TXT record's TTL (1 s) and the time
    /// the answer takes to reach every DNS responder or proxy. Default: 5.
    #[serde(
        default = "default_challenge_wait",
        with = "hangar_types::time::seconds"
    )]
    pub challenge_wait: Duration,
    /// When another proxy of the cluster holds the certificate lease (it is ordering), how long to
    /// wait before asking again, in seconds; a certificate arriving meanwhile ends the wait. Default: 60.
    #[serde(default = "default_lease_retry", with = "hangar_types::time::seconds")]
    pub lease_retry: Duration,
    /// Wait after a failed order before the next attempt, in seconds; doubles after each failure up
    /// to `retry_max`. Default: 30.
    #[serde(
        default = "default_retry_initial",
        with = "hangar_types::time::seconds"
    )]
    pub retry_initial: Duration,
    /// Longest wait between failed attempts, in seconds. Default: 3600.
    #[serde(default = "default_retry_max", with = "hangar_types::time::seconds")]
    pub retry_max: Duration,
    /// How long one order may take (validation, issuance) before it counts as failed, in seconds.
    /// Default: 120.
    #[serde(
        default = "default_order_timeout",
        with = "hangar_types::time::seconds"
    )]
    pub order_timeout: Duration,
    /// The certificate's expiry is checked at least this often, in seconds (the loop otherwise sleeps
    /// until the renewal is due). Default: 3600.
    #[serde(
        default = "default_check_interval",
        with = "hangar_types::time::seconds"
    )]
    pub check_interval: Duration,
}

fn default_challenge_wait() -> Duration {
    DEFAULT_CHALLENGE_WAIT
}
fn default_lease_retry() -> Duration {
    DEFAULT_LEASE_RETRY
}
fn default_retry_initial() -> Duration {
    DEFAULT_RETRY_INITIAL
}
fn default_retry_max() -> Duration {
    DEFAULT_RETRY_MAX
}
fn default_order_timeout() -> Duration {
    DEFAULT_ORDER_TIMEOUT
}
fn default_check_interval() -> Duration {
    DEFAULT_CHECK_INTERVAL
}

/// Why an ACME configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcmeConfigError {
    #[error("the ACME directory URL must be an https URL")]
    DirectoryNotHttps,
    #[error("the ACME email must be an address like name@example.com")]
    InvalidEmail,
    #[error("the ACME EAB key id must not be empty")]
    EmptyEabKeyId,
    #[error("the ACME EAB HMAC key must be base64url without padding")]
    InvalidEabKey,
    #[error("`{0}` must be greater than zero")]
    ZeroDuration(&'static str),
    #[error("`{0}` must be at most 365 days")]
    DurationTooLong(&'static str),
    #[error("`retry_initial` must not exceed `retry_max`")]
    RetryOrder,
    #[error("`{0}` is not a valid subdomain label")]
    InvalidSubdomain(String),
}

impl AcmeConfig {
    /// A configuration with every optional field at its default.
    pub fn new(directory_url: Url, email: String) -> Self {
        AcmeConfig {
            directory_url,
            email,
            eab: None,
            challenge: AcmeChallenge::default(),
            subdomains: Vec::new(),
            ca_cert_path: None,
            account_path: None,
            challenge_wait: DEFAULT_CHALLENGE_WAIT,
            lease_retry: DEFAULT_LEASE_RETRY,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            order_timeout: DEFAULT_ORDER_TIMEOUT,
            check_interval: DEFAULT_CHECK_INTERVAL,
        }
    }

    pub fn validate(&self) -> Result<(), AcmeConfigError> {
        if self.directory_url.scheme() != "https" || self.directory_url.host().is_none() {
            return Err(AcmeConfigError::DirectoryNotHttps);
        }
        let email_ok = self.email.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty() && !domain.is_empty() && !domain.contains('@')
        }) && !self
            .email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control());
        if !email_ok {
            return Err(AcmeConfigError::InvalidEmail);
        }
        if let Some(eab) = &self.eab {
            if eab.key_id.trim().is_empty() {
                return Err(AcmeConfigError::EmptyEabKeyId);
            }
            eab.hmac_key_bytes()?;
        }
        for (field, value) in [
            ("lease_retry", self.lease_retry),
            ("retry_initial", self.retry_initial),
            ("retry_max", self.retry_max),
            ("order_timeout", self.order_timeout),
            ("check_interval", self.check_interval),
        ] {
            if value.is_zero() {
                return Err(AcmeConfigError::ZeroDuration(field));
            }
        }
        for (field, value) in [
            ("challenge_wait", self.challenge_wait),
            ("lease_retry", self.lease_retry),
            ("retry_max", self.retry_max),
            ("order_timeout", self.order_timeout),
            ("check_interval", self.check_interval),
        ] {
            if value > crate::config::MAX_DURATION {
                return Err(AcmeConfigError::DurationTooLong(field));
            }
        }
        if self.retry_initial > self.retry_max {
            return Err(AcmeConfigError::RetryOrder);
        }
        for label in &self.subdomains {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !ok {
                return Err(AcmeConfigError::InvalidSubdomain(label.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AcmeConfig {
        AcmeConfig::new(
            "https://acme.test/dir".parse().unwrap(),
            "ops@example.com".into(),
        )
    }

    #[test]
    fn defaults_and_json() {
        let c: AcmeConfig = serde_json::from_str(
            r#"{"directory_url": "https://acme.test/dir", "email": "a@b.c", "challenge": "http-01",
                "eab": {"key_id": "kid-1", "hmac_key": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}}"#,
        )
        .unwrap();
        assert_eq!(c.challenge, AcmeChallenge::Http01);
        assert_eq!(c.challenge_wait, DEFAULT_CHALLENGE_WAIT);
        assert_eq!(c.retry_initial, Duration::from_secs(30));
        assert!(c.validate().is_ok());
        assert_eq!(c.eab.unwrap().hmac_key_bytes().unwrap().len(), 48);
        assert!(serde_json::from_str::<AcmeConfig>(
            r#"{"directory_url": "https://a/", "email": "a@b.c", "bogus": 1}"#
        )
        .is_err());
        let d: AcmeConfig =
            serde_json::from_str(r#"{"directory_url": "https://a/", "email": "a@b.c"}"#).unwrap();
        assert_eq!(d.challenge, AcmeChallenge::Dns01);
    }

    #[test]
    fn validation() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.directory_url = "http://acme.test/dir".parse().unwrap();
        assert_eq!(c.validate(), Err(AcmeConfigError::DirectoryNotHttps));
        for bad in ["", "nobody", "@x", "a@", "a b@c", "a@b@c"] {
            let mut c = config();
            c.email = bad.into();
            assert_eq!(c.validate(), Err(AcmeConfigError::InvalidEmail), "{bad:?}");
        }
        let mut c = config();
        c.eab = Some(EabConfig {
            key_id: "kid".into(),
            hmac_key: "not base64!".into(),
        });
        assert_eq!(c.validate(), Err(AcmeConfigError::InvalidEabKey));
        c.eab = Some(EabConfig {
            key_id: " ".into(),
            hmac_key: "abcd".into(),
        });
        assert_eq!(c.validate(), Err(AcmeConfigError::EmptyEabKeyId));
        let mut c = config();
        c.retry_initial = Duration::from_secs(10);
        c.retry_max = Duration::from_secs(5);
        assert_eq!(c.validate(), Err(AcmeConfigError::RetryOrder));
        let mut c = config();
        c.order_timeout = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(AcmeConfigError::ZeroDuration("order_timeout"))
        );
        let mut c = config();
        c.subdomains = vec!["ok".into(), "no.dots".into()];
        assert_eq!(
            c.validate(),
            Err(AcmeConfigError::InvalidSubdomain("no.dots".into()))
        );
    }
}
