//! Cluster TLS for the proxies' ACME client (plane-api.md §7.9.3, with quirk 22 fixed): the cluster's
//! certificate lease, its DNS-01 TXT value (served by the DNS responders), HTTP-01 challenge answers
//! and the cluster certificate, all shared through the store so every controller and every proxy of
//! the cluster sees them.
//!
//! Owns: the proxy-session side of the certificate messages, the validation of what a proxy sends
//! (values must be small enough for the store's notifications and well-formed), and which store events
//! a proxy is told about. Lease semantics (who wins, expiry) live in the store, on the store clock.

use hangar_store::{NodeId, Store, StoreEvent, StoreResult};
use hangar_types::protocol::ControllerToProxy;
use hangar_types::{ClusterName, ProxyName};

/// Longest accepted DNS-01 TXT value (one DNS character-string; ACME's is 43 characters).
pub const MAX_TXT_VALUE_LEN: usize = 255;
/// Longest accepted HTTP-01 challenge token (ACME's are 43 characters).
pub const MAX_CHALLENGE_TOKEN_LEN: usize = 256;
/// Longest accepted HTTP-01 key authorization (ACME's are 87 characters).
pub const MAX_KEY_AUTHORIZATION_LEN: usize = 512;
/// Longest accepted PEM (certificate chain or private key).
pub const MAX_PEM_LEN: usize = 64 * 1024;

fn is_base64url(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Why a value from a proxy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertInputError {
    #[error("TXT value must be 1 to {MAX_TXT_VALUE_LEN} visible ASCII characters")]
    TxtValue,
    #[error("challenge token must be 1 to {MAX_CHALLENGE_TOKEN_LEN} base64url characters")]
    ChallengeToken,
    #[error(
        "key authorization must be 1 to {MAX_KEY_AUTHORIZATION_LEN} base64url characters or `.`"
    )]
    KeyAuthorization,
    #[error("{0} must be a PEM document of at most {MAX_PEM_LEN} bytes")]
    Pem(&'static str),
}

pub fn validate_txt_value(v: &str) -> Result<(), CertInputError> {
    let ok =
        !v.is_empty() && v.len() <= MAX_TXT_VALUE_LEN && v.chars().all(|c| c.is_ascii_graphic());
    ok.then_some(()).ok_or(CertInputError::TxtValue)
}

pub fn validate_challenge_token(v: &str) -> Result<(), CertInputError> {
    let ok = !v.is_empty() && v.len() <= MAX_CHALLENGE_TOKEN_LEN && v.chars().all(is_base64url);
    ok.then_some(()).ok_or(CertInputError::ChallengeToken)
}

pub fn validate_key_authorization(v: &str) -> Result<(), CertInputError> {
    let ok = !v.is_empty()
        && v.len() <= MAX_KEY_AUTHORIZATION_LEN
        && v.chars().all(|c| is_base64url(c) || c == '.');
    ok.then_some(()).ok_or(CertInputError::KeyAuthorization)
}

pub fn validate_pem(what: &'static str, v: &str) -> Result<(), CertInputError> {
    let ok = v.len() <= MAX_PEM_LEN && v.contains("-----BEGIN ");
    ok.then_some(()).ok_or(CertInputError::Pem(what))
}

/// One proxy's certificate requests. Store errors are logged and answered as refusals; they never end
/// the session.
pub(crate) struct ProxyTls<'a> {
    pub store: &'a dyn Store,
    pub cluster: &'a ClusterName,
    pub proxy: NodeId,
    pub name: &'a ProxyName,
}

impl ProxyTls<'_> {
    /// Whether the store accepted a request; a failed call is logged as `failure` and refuses it.
    fn accepted(&self, answer: StoreResult<bool>, failure: &str) -> bool {
        answer.unwrap_or_else(|e| {
            tracing::error!(proxy = %self.name, cluster = %self.cluster, error = %e, "{failure}");
            false
        })
    }

    /// `CertLeaseRequest`: take or renew the lease.
    pub async fn lease_request(&self) -> ControllerToProxy {
        let answer = self
            .store
            .acquire_cert_lease(self.cluster, self.proxy)
            .await;
        let accepted = self.accepted(answer, "Failed to acquire the certificate lease");
        tracing::debug!(proxy = %self.name, cluster = %self.cluster, accepted, "Certificate lease request");
        ControllerToProxy::CertLeaseResponse { accepted }
    }

    /// `ReleaseCertLease`: give the lease up if held. No answer.
    pub async fn release_lease(&self) {
        match self
            .store
            .release_cert_lease(self.cluster, self.proxy)
            .await
        {
            Ok(released) => {
                tracing::debug!(proxy = %self.name, cluster = %self.cluster, released, "Certificate lease release")
            }
            Err(e) => {
                tracing::error!(proxy = %self.name, cluster = %self.cluster, error = %e, "Failed to release the certificate lease")
            }
        }
    }

    /// `SetTxtRecord`: store the DNS-01 value if this proxy holds the lease.
    pub async fn set_txt_record(&self, txt_value: Option<String>) -> ControllerToProxy {
        if let Some(Err(e)) = txt_value.as_deref().map(validate_txt_value) {
            tracing::warn!(proxy = %self.name, cluster = %self.cluster, error = %e, "Refusing a TXT record");
            return ControllerToProxy::SetTxtRecordResponse { accepted: false };
        }
        let answer = self
            .store
            .set_txt_record(self.cluster, self.proxy, txt_value.as_deref())
            .await;
        let accepted = self.accepted(answer, "Failed to store a TXT record");
        tracing::debug!(proxy = %self.name, cluster = %self.cluster, accepted, "TXT record set");
        ControllerToProxy::SetTxtRecordResponse { accepted }
    }

    /// `SetHttpChallenge`: publish or withdraw an HTTP-01 answer if this proxy holds the lease. No
    /// answer: the store's event reaches every proxy of the cluster, this one included.
    pub async fn set_http_challenge(&self, token: String, key_authorization: Option<String>) {
        let valid = validate_challenge_token(&token).and_then(|()| {
            key_authorization
                .as_deref()
                .map_or(Ok(()), validate_key_authorization)
        });
        if let Err(e) = valid {
            tracing::warn!(proxy = %self.name, cluster = %self.cluster, error = %e, "Refusing an HTTP challenge");
            return;
        }
        let applied = self
            .store
            .set_http_challenge(
                self.cluster,
                self.proxy,
                &token,
                key_authorization.as_deref(),
            )
            .await;
        match applied {
            Ok(true) => {
                tracing::debug!(proxy = %self.name, cluster = %self.cluster, set = key_authorization.is_some(), "HTTP challenge updated")
            }
            Ok(false) => {
                tracing::warn!(proxy = %self.name, cluster = %self.cluster, "Ignoring an HTTP challenge from a proxy that does not hold the certificate lease")
            }
            Err(e) => {
                tracing::error!(proxy = %self.name, cluster = %self.cluster, error = %e, "Failed to store an HTTP challenge")
            }
        }
    }

    /// `StoreCertificate`: keep it as the cluster's certificate; the store's event pushes it to every
    /// proxy of the cluster. No answer.
    pub async fn store_certificate(&self, cert_pem: String, key_pem: String) {
        let valid = validate_pem("certificate", &cert_pem)
            .and_then(|()| validate_pem("private key", &key_pem));
        if let Err(e) = valid {
            tracing::warn!(proxy = %self.name, cluster = %self.cluster, error = %e, "Refusing a certificate");
            return;
        }
        match self
            .store
            .store_certificate(self.cluster, self.proxy, &cert_pem, &key_pem)
            .await
        {
            Ok(stored) => {
                tracing::info!(proxy = %self.name, cluster = %self.cluster, stored_at = %stored.stored_at, "Cluster certificate stored")
            }
            Err(e) => {
                tracing::error!(proxy = %self.name, cluster = %self.cluster, error = %e, "Failed to store a certificate")
            }
        }
    }
}

/// What a proxy of `cluster` must know right after connecting (or after missing events): the cluster's
/// certificate, then its current HTTP-01 answers. Store errors are logged and leave parts out.
pub(crate) async fn tls_snapshot(
    store: &dyn Store,
    cluster: &ClusterName,
) -> Vec<ControllerToProxy> {
    let mut messages = Vec::new();
    match store.certificate(cluster).await {
        Ok(Some(cert)) => messages.push(ControllerToProxy::Certificate {
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        }),
        Ok(None) => {}
        Err(e) => tracing::error!(%cluster, error = %e, "Failed to read the cluster certificate"),
    }
    match store.http_challenges(cluster).await {
        Ok(challenges) => {
            messages.extend(
                challenges
                    .into_iter()
                    .map(|c| ControllerToProxy::HttpChallenge {
                        token: c.token,
                        key_authorization: Some(c.key_authorization),
                    }),
            )
        }
        Err(e) => tracing::error!(%cluster, error = %e, "Failed to read HTTP challenges"),
    }
    messages
}

/// The message for a proxy of `cluster` about a TLS store event, if it concerns that cluster.
pub(crate) fn tls_event(event: &StoreEvent, cluster: &ClusterName) -> Option<ControllerToProxy> {
    match event {
        StoreEvent::HttpChallenge {
            cluster: of,
            token,
            key_authorization,
        } if of == cluster => Some(ControllerToProxy::HttpChallenge {
            token: token.clone(),
            key_authorization: key_authorization.clone(),
        }),
        StoreEvent::Certificate(cert) if &cert.cluster == cluster => {
            Some(ControllerToProxy::Certificate {
                cert_pem: cert.cert_pem.clone(),
                key_pem: cert.key_pem.clone(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
        assert!(validate_challenge_token(token).is_ok());
        assert!(validate_key_authorization(&format!(
            "{token}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
        ))
        .is_ok());
        assert!(validate_txt_value("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0").is_ok());
        for bad in [
            "",
            "a/b",
            "a b",
            &"a".repeat(MAX_CHALLENGE_TOKEN_LEN + 1),
            "x.y",
        ] {
            assert!(validate_challenge_token(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            &"a".repeat(MAX_KEY_AUTHORIZATION_LEN + 1),
        ] {
            assert!(validate_key_authorization(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "a b", "a\u{0}", &"a".repeat(MAX_TXT_VALUE_LEN + 1)] {
            assert!(validate_txt_value(bad).is_err(), "{bad:?}");
        }
        assert!(validate_pem("certificate", "-----BEGIN CERTIFICATE-----\nx").is_ok());
        assert!(validate_pem("certificate", "not a pem").is_err());
        let huge = format!("-----BEGIN CERTIFICATE-----\n{}", "A".repeat(MAX_PEM_LEN));
        assert!(validate_pem("certificate", &huge).is_err());
    }

    #[test]
    fn events_of_other_clusters_are_not_forwarded() {
        let c1: ClusterName = "c1.test".parse().unwrap();
        let c2: ClusterName = "c2.test".parse().unwrap();
        let event = StoreEvent::HttpChallenge {
            cluster: c1.clone(),
            token: "t".into(),
            key_authorization: None,
        };
        assert_eq!(
            tls_event(&event, &c1),
            Some(ControllerToProxy::HttpChallenge {
                token: "t".into(),
                key_authorization: None
            })
        );
        assert_eq!(tls_event(&event, &c2), None);
        let cert = StoreEvent::Certificate(hangar_store::StoredCertificate {
            cluster: c2.clone(),
            cert_pem: "c".into(),
            key_pem: "k".into(),
            stored_at: hangar_types::Millis(1),
        });
        assert_eq!(tls_event(&cert, &c1), None);
        assert!(tls_event(&cert, &c2).is_some());
    }
}
