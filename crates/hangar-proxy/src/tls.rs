//! TLS termination (Plane §7.9.1): one certificate, for `<cluster host>` and `*.<cluster host>`, is
//! served for every handshake whatever the SNI, and a new certificate replaces the old one atomically
//! for the handshakes that follow (connections already open keep theirs).
//!
//! Owns: parsing and checking a PEM certificate chain with its key ([`ClusterCert`]), the swappable
//! resolver rustls asks on every handshake, the current certificate (watched by the ACME loop, which
//! sleeps until it is due for renewal), and the ACME HTTP-01 answers the controller pushed.
//! Certificates come from three sources ([`CertSource`]): the certificate file, this proxy's own ACME
//! orders, and the controller (another proxy of the cluster ordered one).
//!
//! Must not: do IO (files live in `cert_file.rs`, ACME in `acme.rs`); hold a lock across an await.

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Most ACME HTTP-01 answers kept at once; a cluster has one or two during an order, so more can
/// only come from a misbehaving peer. Beyond it new answers are ignored (with a warning).
pub(crate) const MAX_HTTP_CHALLENGES: usize = 64;

/// Where the certificate being served came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    /// The certificate file (`cert_path`), at startup or after it changed on disk.
    File,
    /// An ACME order of this proxy.
    Acme,
    /// The controller: the cluster's shared certificate, ordered by some proxy of the cluster.
    Controller,
}

/// What a certificate is, for logs, tests and operators. No secret material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number of the leaf certificate, lowercase hex without leading zeros.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DNS names of the leaf (subject alternative names, or the common name when it has none).
    pub names: Vec<String>,
    pub source: CertSource,
}

impl CertificateInfo {
    /// Whether the leaf names cover `host` (exactly or through a `*.` wildcard one label deep).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.names.iter().any(|name| {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => name == host,
            }
        })
    }

    /// Time left until `not_after` (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
}

/// Why a certificate and key cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("the certificate PEM is malformed: {0}")]
    CertificatePem(String),
    #[error("no PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoPrivateKey,
    #[error("the private key is not supported: {0}")]
    UnsupportedKey(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate cannot be parsed: {0}")]
    InvalidCertificate(String),
}

/// The PEM text of a certificate chain and its private key, as stored and shared. Holds a private key:
/// `Debug` shows only the chain's length.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPem")
            .field("cert_pem_len", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

/// A checked certificate chain with its signing key, ready for handshakes.
pub(crate) struct ClusterCert {
    key: Arc<CertifiedKey>,
    info: CertificateInfo,
    pem: CertPem,
}

impl std::fmt::Debug for ClusterCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCert")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl ClusterCert {
    /// Parses `pem` (the chain leaf first) and checks that the key belongs to the leaf.
    pub(crate) fn from_pem(pem: CertPem, source: CertSource) -> Result<ClusterCert, CertError> {
        let chain = CertificateDer::pem_slice_iter(pem.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::CertificatePem(e.to_string()))?;
        let leaf = chain.first().ok_or(CertError::NoCertificate)?;
        let info = certificate_info(leaf, source)?;
        let key_der =
            PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).map_err(|e| match e {
                rustls::pki_types::pem::Error::NoItemsFound => CertError::NoPrivateKey,
                other => CertError::UnsupportedKey(other.to_string()),
            })?;
        let signing_key =
            any_supported_type(&key_der).map_err(|e| CertError::UnsupportedKey(e.to_string()))?;
        let key = CertifiedKey::new(chain, signing_key);
        key.keys_match().map_err(|_| CertError::KeyMismatch)?;
        Ok(ClusterCert {
            key: Arc::new(key),
            info,
            pem,
        })
    }

    pub(crate) fn info(&self) -> &CertificateInfo {
        &self.info
    }

    pub(crate) fn pem(&self) -> &CertPem {
        &self.pem
    }

    /// Whether both hold the same chain (the source does not matter).
    pub(crate) fn same_chain(&self, other: &ClusterCert) -> bool {
        self.key.cert == other.key.cert
    }
}

fn certificate_info(
    leaf: &CertificateDer<'_>,
    source: CertSource,
) -> Result<CertificateInfo, CertError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    let validity = cert.validity();
    let time = |t: &x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        match u64::try_from(secs) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => SystemTime::UNIX_EPOCH,
        }
    };
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(CertError::InvalidCertificate(e.to_string())),
    };
    if names.is_empty() {
        names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
    }
    Ok(CertificateInfo {
        serial: cert.tbs_certificate.serial.to_str_radix(16),
        not_before: time(&validity.not_before),
        not_after: time(&validity.not_after),
        names,
        source,
    })
}

/// Hands rustls the current certificate on every handshake.
#[derive(Debug, Default)]
pub(crate) struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // `None` fails the handshake: no certificate yet (HTTP-01 orders run before there is one).
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The rustls configuration of the HTTPS listener: ring, TLS 1.2 and 1.3, ALPN `h2` then
/// `http/1.1`, certificates from `resolver`.
pub(crate) fn server_config(
    resolver: Arc<CertResolver>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate state the proxy shares between its listeners, its controller session, the
/// certificate file watch and the ACME loop.
pub(crate) struct TlsState {
    resolver: Arc<CertResolver>,
    current: watch::Sender<Option<Arc<ClusterCert>>>,
    /// ACME HTTP-01 answers: challenge token → key authorization.
    challenges: Mutex<HashMap<String, String>>,
}

impl TlsState {
    pub(crate) fn new() -> Self {
        TlsState {
            resolver: Arc::new(CertResolver::default()),
            current: watch::Sender::new(None),
            challenges: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn resolver(&self) -> Arc<CertResolver> {
        self.resolver.clone()
    }

    pub(crate) fn current(&self) -> Option<Arc<ClusterCert>> {
        self.current.borrow().clone()
    }

    /// Follows certificate changes (the ACME loop wakes up when another proxy's certificate arrives).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterCert>>> {
        self.current.subscribe()
    }

    /// Serves `cert` from the next handshake on. Returns `false` (and changes nothing) when the same
    /// chain is already served.
    pub(crate) fn install(&self, cert: ClusterCert) -> bool {
        if self.current().is_some_and(|c| c.same_chain(&cert)) {
            return false;
        }
        let info = cert.info().clone();
        let cert = Arc::new(cert);
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(cert.key.clone());
        self.current.send_replace(Some(cert));
        tracing::info!(
            serial = %info.serial,
            source = ?info.source,
            names = ?info.names,
            not_after = %humantime_utc(info.not_after),
            "Serving a new TLS certificate"
        );
        true
    }

    /// Serves a certificate shared through the controller unless it would be a step back: it is
    /// ignored when the current one stays valid longer.
    pub(crate) fn offer_shared(&self, cert: ClusterCert) -> bool {
        if let Some(current) = self.current() {
            if current.info().not_after > cert.info().not_after {
                tracing::info!(
                    serial = %cert.info().serial,
                    "Ignoring the cluster certificate from the controller: the current one expires later"
                );
                return false;
            }
        }
        self.install(cert)
    }

    fn challenges(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (`Some`) or withdraws (`None`) the HTTP-01 answer for `token`.
    pub(crate) fn set_challenge(&self, token: String, key_authorization: Option<String>) {
        let mut challenges = self.challenges();
        match key_authorization {
            Some(answer) => {
                if challenges.len() >= MAX_HTTP_CHALLENGES && !challenges.contains_key(&token) {
                    tracing::warn!("Too many ACME HTTP-01 challenges; ignoring a new one");
                    return;
                }
                challenges.insert(token, answer);
            }
            None => {
                challenges.remove(&token);
            }
        }
    }

    /// The key authorization to answer for HTTP-01 `token`, if one is published.
    pub(crate) fn challenge(&self, token: &str) -> Option<String> {
        self.challenges().get(token).cloned()
    }
}

/// `SystemTime` as an RFC 3339 UTC timestamp (`2026-11-26T18:03:44Z`), for logs.
pub(crate) fn humantime_utc(t: SystemTime) -> String {
    let Ok(since_epoch) = t.duration_since(SystemTime::UNIX_EPOCH) else {
        return "before 1970".to_string();
    };
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
pub(crate) mod test_certs {
    //! Certificates for unit tests, generated with rcgen.

    use super::CertPem;
    use rcgen::{CertificateParams, DnType, KeyPair};

    /// A self-signed certificate for `names`, valid from a day ago for `valid_days` from now.
    pub(crate) fn self_signed(names: &[&str], valid_days: i64) -> CertPem {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(valid_days);
        let cert = params.self_signed(&key).unwrap();
        CertPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::self_signed;
    use super::*;

    #[test]
    fn parses_a_chain_and_checks_the_key() {
        let pem = self_signed(&["plane.test", "*.plane.test"], 90);
        let cert = ClusterCert::from_pem(pem.clone(), CertSource::File).unwrap();
        let info = cert.info();
        assert_eq!(info.names, vec!["plane.test", "*.plane.test"]);
        assert!(info.covers("plane.test"));
        assert!(info.covers("ab.plane.test"));
        assert!(!info.covers("a.b.plane.test"));
        assert!(!info.covers("other.test"));
        let left = info.remaining(SystemTime::now());
        assert!(left > Duration::from_secs(89 * 86400) && left <= Duration::from_secs(90 * 86400));

        let other = self_signed(&["plane.test"], 90);
        let mismatched = CertPem {
            cert_pem: pem.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        assert_eq!(
            ClusterCert::from_pem(mismatched, CertSource::File).unwrap_err(),
            CertError::KeyMismatch
        );
        let no_key = CertPem {
            cert_pem: pem.cert_pem.clone(),
            key_pem: String::new(),
        };
        assert_eq!(
            ClusterCert::from_pem(no_key, CertSource::File).unwrap_err(),
            CertError::NoPrivateKey
        );
        let no_cert = CertPem {
            cert_pem: "hello".into(),
            key_pem: pem.key_pem.clone(),
        };
        assert_eq!(
            ClusterCert::from_pem(no_cert, CertSource::File).unwrap_err(),
            CertError::NoCertificate
        );
        let garbage = CertPem {
            cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            key_pem: pem.key_pem,
        };
        assert!(matches!(
            ClusterCert::from_pem(garbage, CertSource::File),
            Err(CertError::InvalidCertificate(_))
        ));
    }

    #[test]
    fn install_swaps_the_served_certificate() {
        let state = TlsState::new();
        let resolver = state.resolver();
        assert!(resolver.current.read().unwrap().is_none());
        let a = ClusterCert::from_pem(self_signed(&["a.test"], 30), CertSource::File).unwrap();
        let a_again = ClusterCert::from_pem(a.pem().clone(), CertSource::Acme).unwrap();
        assert!(state.install(a));
        assert!(!state.install(a_again), "same chain is not installed twice");
        let served = resolver.current.read().unwrap().clone().unwrap();
        assert_eq!(
            served.cert,
            state.current().unwrap().key.cert,
            "the resolver serves the current certificate"
        );

        // A shared certificate that expires earlier is not a step forward.
        let short =
            ClusterCert::from_pem(self_signed(&["a.test"], 10), CertSource::Controller).unwrap();
        assert!(!state.offer_shared(short));
        let long =
            ClusterCert::from_pem(self_signed(&["a.test"], 60), CertSource::Controller).unwrap();
        assert!(state.offer_shared(long));
        assert_eq!(
            state.current().unwrap().info().source,
            CertSource::Controller
        );
    }

    #[test]
    fn challenges_are_bounded() {
        let state = TlsState::new();
        state.set_challenge("t".into(), Some("t.k".into()));
        assert_eq!(state.challenge("t").as_deref(), Some("t.k"));
        state.set_challenge("t".into(), None);
        assert_eq!(state.challenge("t"), None);
        for i in 0..MAX_HTTP_CHALLENGES + 5 {
            state.set_challenge(format!("t{i}"), Some("k".into()));
        }
        assert_eq!(state.challenges().len(), MAX_HTTP_CHALLENGES);
    }

    #[test]
    fn server_config_offers_h2_and_http1() {
        let config = server_config(Arc::new(CertResolver::default())).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn timestamps_for_logs() {
        let at = |secs| humantime_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_798_308_224), "2026-12-26T18:03:44Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
