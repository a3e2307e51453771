//! Connection tokens and secrets: 256-bit random values, base64url without padding. Comparison of
//! secrets is constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

/// 32 random bytes, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Prefix that marks a static (per-backend) connection token.
pub const STATIC_TOKEN_PREFIX: &str = "s.";

/// The token in a connection URL `/<token>/…`. Static tokens start with `s.`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct ConnectionToken(String);

impl ConnectionToken {
    pub fn random() -> Self {
        ConnectionToken(random_token())
    }
    pub fn random_static() -> Self {
        ConnectionToken(format!("{STATIC_TOKEN_PREFIX}{}", random_token()))
    }
    /// Wraps text taken from a URL path. Any text is accepted; unknown tokens simply resolve to nothing.
    pub fn from_path_segment(s: &str) -> Self {
        ConnectionToken(s.to_string())
    }
    pub fn is_static(&self) -> bool {
        self.0.starts_with(STATIC_TOKEN_PREFIX)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tokens are credentials: never print them whole in logs.
impl fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(6).collect();
        write!(f, "ConnectionToken({shown}…)")
    }
}

/// A per-token secret forwarded to the backend as `x-verified-secret`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct SecretToken(String);

impl SecretToken {
    pub fn random() -> Self {
        SecretToken(random_token())
    }
    pub fn empty() -> Self {
        SecretToken(String::new())
    }
    pub fn new(s: String) -> Self {
        SecretToken(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Constant-time comparison.
    pub fn matches(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(…)")
    }
}

/// Constant-time equality of two byte strings (used for bearer tokens too).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_base64url() {
        let t = random_token();
        assert_eq!(t.len(), 43);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(random_token(), t);
        assert!(ConnectionToken::random_static().is_static());
        assert!(!ConnectionToken::random().is_static());
    }

    #[test]
    fn secret_compare() {
        let s = SecretToken::new("abc".into());
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(format!("{s:?}").contains('…'));
    }
}
