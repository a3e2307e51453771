//! Identifier newtypes. Every id is validated when parsed (`FromStr`) and when deserialized, so a bad id
//! is refused at the edge instead of breaking a later read (Plane quirk 27, deliberately not kept).

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Longest accepted generated-style name, including its prefix (Plane's limit).
pub const MAX_NAME_LEN: usize = 45;
/// Longest accepted key name or namespace.
pub const MAX_KEY_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid prefix: expected a name starting with `{0}-`")]
    InvalidPrefix(&'static str),
    #[error("invalid character {0:?} at position {1} (allowed: a-z, 0-9, -)")]
    InvalidCharacter(char, usize),
    #[error("too long: at most {0} characters")]
    TooLong(usize),
    #[error("must not be empty")]
    Empty,
    #[error("invalid cluster name {0:?}: expected host or host:port")]
    InvalidCluster(String),
    #[error("control characters are not allowed")]
    ControlCharacter,
}

/// 14 random characters from `[a-z0-9]`.
pub fn random_string() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..14)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn validate_simple(s: &str, prefix: Option<&'static str>) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(MAX_NAME_LEN));
    }
    if let Some(p) = prefix {
        if !s.starts_with(&format!("{p}-")) {
            return Err(NameError::InvalidPrefix(p));
        }
    }
    for (i, c) in s.chars().enumerate() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(NameError::InvalidCharacter(c, i));
        }
    }
    Ok(())
}

macro_rules! simple_name {
    ($(#[$doc:meta])* $name:ident, $prefix:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: Option<&'static str> = $prefix;

            /// A fresh random name (with the kind's prefix, if any).
            pub fn random() -> Self {
                match Self::PREFIX {
                    Some(p) => $name(format!("{p}-{}", random_string())),
                    None => $name(random_string()),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                validate_simple(s, Self::PREFIX)?;
                Ok($name(s.to_string()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                validate_simple(&s, Self::PREFIX)?;
                Ok($name(s))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                let pattern = match Self::PREFIX {
                    Some(p) => format!("^{p}-[a-z0-9-]*$"),
                    None => "^[a-z0-9-]+$".to_string(),
                };
                string_schema(pattern, MAX_NAME_LEN)
            }
        }

        impl ToSchema for $name {}
    };
}

/// The OpenAPI schema of a validated string id.
fn string_schema(
    pattern: String,
    max_length: usize,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max_length))
        .into()
}

simple_name!(
    /// A backend (session process). No prefix; may be supplied by the client as `spawn_config.id`.
    BackendId,
    None
);
simple_name!(
    /// A drone node, `dr-…`.
    DroneName,
    Some("dr")
);
simple_name!(
    /// A proxy node, `px-…`.
    ProxyName,
    Some("px")
);
simple_name!(
    /// A controller instance, `co-…`; fresh on every start.
    ControllerName,
    Some("co")
);
simple_name!(
    /// A queued action for a drone, `ak-…`.
    ActionId,
    Some("ak")
);
simple_name!(
    /// A warm pool (`/ctrl/warm-pools/{name}`), chosen by the operator. No prefix.
    WarmPoolName,
    None
);
simple_name!(
    /// An ACME DNS-01 responder (`hangar dns`), `ns-…`.
    DnsName,
    Some("ns")
);

/// A node that holds a session with the controller, parsed by its name prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum NodeName {
    Drone(DroneName),
    Proxy(ProxyName),
}

impl NodeName {
    pub fn as_str(&self) -> &str {
        match self {
            NodeName::Drone(d) => d.as_str(),
            NodeName::Proxy(p) => p.as_str(),
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name part of a key (together with its namespace it identifies the key). Free-form text as in
/// Plane, but non-empty, at most [`MAX_KEY_LEN`] bytes and without control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct KeyName(String);

impl KeyName {
    /// A random key name `lk-…`, used when a connect request carries no key.
    pub fn random() -> Self {
        KeyName(format!("lk-{}", random_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Validates free-form key text (key names, namespaces, tags). Empty is allowed for namespace and tag;
/// callers that need non-empty check it themselves.
pub fn validate_key_text(s: &str) -> Result<(), NameError> {
    if s.len() > MAX_KEY_LEN {
        return Err(NameError::TooLong(MAX_KEY_LEN));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

impl FromStr for KeyName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        validate_key_text(s)?;
        Ok(KeyName(s.to_string()))
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A cluster: the public `host[:port]` through which its backends are reached. HTTPS iff it has no port
/// or port 443.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The port part, if any.
    pub fn port(&self) -> Option<u16> {
        // Parsing guarantees a valid u16 after the last ':' when present (IPv6 hosts are bracketed).
        let (_, port) = split_host_port(&self.0)?;
        port
    }

    pub fn is_https(&self) -> bool {
        matches!(self.port(), None | Some(443))
    }

    pub fn scheme(&self) -> &'static str {
        if self.is_https() {
            "https"
        } else {
            "http"
        }
    }
}

/// Splits `host[:port]`; `None` when the port is not a u16.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &s[..end + 2];
        let after = &rest[end + 1..];
        if after.is_empty() {
            return Some((host, None));
        }
        let port = after.strip_prefix(':')?.parse().ok()?;
        return Some((host, Some(port)));
    }
    match s.split_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((s, None)),
    }
}

impl FromStr for ClusterName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let invalid = || NameError::InvalidCluster(s.to_string());
        let (host, _) = split_host_port(s).ok_or_else(invalid)?;
        if host.is_empty() || host.len() > 253 {
            return Err(invalid());
        }
        url::Host::parse(host).map_err(|_| invalid())?;
        // `Host::parse` accepts some characters no DNS name has; be strict.
        if !host.starts_with('[')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(invalid());
        }
        Ok(ClusterName(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClusterName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Validates a subdomain label sequence: alphanumerics and `-`, not starting or ending with `-`.
pub fn validate_subdomain(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > 63 {
        return Err(NameError::TooLong(63));
    }
    for (i, c) in s.chars().enumerate() {
        if !(c.is_ascii_alphanumeric() || c == '-') {
            return Err(NameError::InvalidCharacter(c, i));
        }
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::InvalidCharacter('-', 0));
    }
    Ok(())
}

impl utoipa::PartialSchema for KeyName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // Any text without control characters.
        string_schema("^[^\\x00-\\x1f\\x7f]+$".to_string(), MAX_KEY_LEN)
    }
}

impl ToSchema for KeyName {}

impl utoipa::PartialSchema for ClusterName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // `host` or `host:port`.
        string_schema("^[^\\s/:]+(:[0-9]+)?$".to_string(), 253 + 6)
    }
}

impl ToSchema for ClusterName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names_have_prefix_and_validate() {
        let c = ControllerName::random();
        assert!(c.as_str().starts_with("co-"));
        assert_eq!(c.as_str().parse::<ControllerName>().unwrap(), c);
        let b = BackendId::random();
        assert_eq!(b.as_str().len(), 14);
        assert!(b.as_str().parse::<BackendId>().is_ok());
    }

    #[test]
    fn name_validation_errors() {
        assert!("co-abcd".parse::<ControllerName>().is_ok());
        assert_eq!(
            "invalid".parse::<ControllerName>(),
            Err(NameError::InvalidPrefix("co"))
        );
        assert_eq!(
            "co-*a".parse::<ControllerName>(),
            Err(NameError::InvalidCharacter('*', 3))
        );
        assert!("co-ABC".parse::<ControllerName>().is_err());
        let long = format!("co-{}", "a".repeat(100));
        assert_eq!(
            long.parse::<ControllerName>(),
            Err(NameError::TooLong(MAX_NAME_LEN))
        );
        assert!("".parse::<BackendId>().is_err());
        assert!("Has Space".parse::<BackendId>().is_err());
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<DroneName>("\"dr-abc\"").is_ok());
        assert!(serde_json::from_str::<DroneName>("\"px-abc\"").is_err());
        assert!(serde_json::from_str::<BackendId>("\"../etc\"").is_err());
    }

    #[test]
    fn key_names() {
        assert!("room-abc".parse::<KeyName>().is_ok());
        assert!("user@example.com/doc 1".parse::<KeyName>().is_ok());
        assert!("".parse::<KeyName>().is_err());
        assert!("a\nb".parse::<KeyName>().is_err());
        assert!("x".repeat(300).parse::<KeyName>().is_err());
        assert!(KeyName::random().as_str().starts_with("lk-"));
    }

    #[test]
    fn cluster_names() {
        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert_eq!(c.port(), Some(9090));
        assert!(!c.is_https());
        let c: ClusterName = "c1.example.com".parse().unwrap();
        assert!(c.is_https());
        assert_eq!(c.scheme(), "https");
        let c: ClusterName = "c1.example.com:443".parse().unwrap();
        assert!(c.is_https());
        assert!("bad host".parse::<ClusterName>().is_err());
        assert!("host:notaport".parse::<ClusterName>().is_err());
        assert!("host:99999".parse::<ClusterName>().is_err());
        assert!("".parse::<ClusterName>().is_err());
        assert!("a/b".parse::<ClusterName>().is_err());
        let c: ClusterName = "127.0.0.1:9090".parse().unwrap();
        assert_eq!(c.port(), Some(9090));
    }

    #[test]
    fn subdomains() {
        assert!(validate_subdomain("abc-1").is_ok());
        assert!(validate_subdomain("-abc").is_err());
        assert!(validate_subdomain("abc-").is_err());
        assert!(validate_subdomain("a.b").is_err());
    }
}
