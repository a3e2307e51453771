//! The ACME loop (plane-api.md §7.9.4, when `ProxyConfig::acme` is set): keeps the cluster's
//! certificate fresh. It sleeps until the served certificate has less than `renew_before` left
//! (checking at least every `check_interval`, and at once when a certificate arrives from the
//! controller); then it takes the cluster's certificate lease so that only one proxy of the cluster
//! orders, runs the order (`order.rs`), serves the new certificate, stores it at the controller (which
//! pushes it to every proxy of the cluster), writes it to the certificate file, and gives the lease
//! back.
//!
//! Failures never take the current certificate away: they are logged with their reason and retried
//! after `retry_initial`, doubling up to `retry_max`. A refused lease means another proxy is ordering:
//! this one waits `lease_retry` or until that proxy's certificate arrives.
//!
//! Boundary: the only way to the controller is the certificate link (`cert_link.rs`).

mod account;
mod config;
mod order;

pub use config::{
    AcmeChallenge, AcmeConfig, AcmeConfigError, EabConfig, DEFAULT_CHALLENGE_WAIT,
    DEFAULT_CHECK_INTERVAL, DEFAULT_LEASE_RETRY, DEFAULT_ORDER_TIMEOUT, DEFAULT_RETRY_INITIAL,
    DEFAULT_RETRY_MAX,
};

use crate::cert_file::CertFiles;
use crate::cert_link::LinkError;
use crate::tls::{CertError, CertSource, ClusterCert};
use crate::ProxyState;
use hangar_types::error_chain;
use hangar_types::protocol::ProxyToController;
use instant_acme::Account;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Why obtaining a certificate failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    #[error("cannot use {path} as the ACME server's root certificate: {source}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME account: {0}")]
    Account(#[source] instant_acme::Error),
    #[error("another proxy of the cluster holds the certificate lease")]
    LeaseHeld,
    #[error("lost the cluster's certificate lease during the order")]
    LeaseLost,
    #[error("controller: {0}")]
    Link(#[from] LinkError),
    #[error("ACME order: {0}")]
    Order(#[source] instant_acme::Error),
    #[error("the ACME server offers no {challenge:?} challenge for {name}")]
    NoChallenge {
        name: String,
        challenge: AcmeChallenge,
    },
    #[error("the authorization for {name} is {status}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    AuthorizationFailed {
        name: String,
        status: String,
        detail: Option<String>,
    },
    #[error("the order did not become ready (status {0})")]
    OrderNotReady(String),
    #[error("the order took longer than {0:?}")]
    OrderTimeout(Duration),
    #[error("the issued certificate cannot be served: {0}")]
    BadCertificate(#[from] CertError),
    #[error("the cluster name `{0}` is not a DNS name a certificate can be ordered for")]
    NoDnsName(String),
    #[error(transparent)]
    Config(#[from] AcmeConfigError),
}

impl AcmeError {
    /// Whether the ACME server no longer knows the account (e.g. a test CA was restarted).
    fn is_unknown_account(&self) -> bool {
        match self {
            AcmeError::Order(instant_acme::Error::Api(problem))
            | AcmeError::Account(instant_acme::Error::Api(problem)) => problem
                .r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":accountDoesNotExist")),
            _ => false,
        }
    }
}

/// Waits between failed attempts: `initial`, doubling up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt; later calls return longer waits.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// How long until `cert` is due for renewal; `None` when it is due now (or there is none).
pub(crate) fn renewal_wait(
    cert: Option<&ClusterCert>,
    renew_before: Duration,
    now: SystemTime,
) -> Option<Duration> {
    let cert = cert?;
    let due = cert
        .info()
        .not_after
        .checked_sub(renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    due.duration_since(now).ok().filter(|d| !d.is_zero())
}

/// The names to order for `cluster`: with DNS-01 the host and its wildcard, with HTTP-01 the host
/// and the configured subdomains.
pub(crate) fn certificate_names(
    cluster: &hangar_types::ClusterName,
    config: &AcmeConfig,
) -> Result<Vec<String>, AcmeError> {
    let host = cluster.as_str();
    let is_dns_name = cluster.port().is_none()
        && host.contains('.')
        && host.parse::<std::net::IpAddr>().is_err()
        && !host.starts_with('[');
    // `localhost` is not a public name but test CAs (Pebble) issue for it.
    if !is_dns_name && host != "localhost" {
        return Err(AcmeError::NoDnsName(host.to_string()));
    }
    let host = host.to_ascii_lowercase();
    let mut names = vec![host.clone()];
    match config.challenge {
        AcmeChallenge::Dns01 => names.push(format!("*.{host}")),
        AcmeChallenge::Http01 => names.extend(
            config
                .subdomains
                .iter()
                .map(|label| format!("{}.{host}", label.to_ascii_lowercase())),
        ),
    }
    Ok(names)
}

/// The ACME loop; runs until `cancel`.
pub(crate) async fn run_acme(
    state: Arc<ProxyState>,
    config: AcmeConfig,
    files: Option<CertFiles>,
    cancel: CancellationToken,
) {
    let account_path = config.account_path.clone().or_else(|| {
        files.as_ref().map(|f| {
            let mut path = f.cert_path.clone().into_os_string();
            path.push(".acme-account.json");
            PathBuf::from(path)
        })
    });
    let mut job = AcmeJob {
        state,
        config,
        files,
        account_path,
        account: None,
        saved_serial: None,
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        () = job.run() => {}
    }
}

struct AcmeJob {
    state: Arc<ProxyState>,
    config: AcmeConfig,
    files: Option<CertFiles>,
    account_path: Option<PathBuf>,
    /// Created on the first order and reused.
    account: Option<Account>,
    /// Serial of the certificate last written to the certificate file.
    saved_serial: Option<String>,
}

impl AcmeJob {
    async fn run(&mut self) {
        let mut certs = self.state.tls.subscribe();
        let mut failures = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let renew_before = self.state.config.renew_before;
        loop {
            certs.borrow_and_update();
            let current = self.state.tls.current();
            if let Some(wait) = renewal_wait(current.as_deref(), renew_before, SystemTime::now()) {
                self.save_shared_certificate().await;
                let wait = wait.min(self.config.check_interval);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = certs.changed() => {}
                }
                continue;
            }
            self.wait_for_controller().await;
            match self.obtain().await {
                Ok(()) => {
                    failures.reset();
                    let current = self.state.tls.current();
                    if renewal_wait(current.as_deref(), renew_before, SystemTime::now()).is_none() {
                        let delay = failures.next_delay();
                        tracing::warn!(
                            ?renew_before,
                            retry_in = ?delay,
                            "The new certificate is already due for renewal (its lifetime is shorter than `renew_before`)"
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(AcmeError::LeaseHeld) => {
                    tracing::info!(
                        retry_in = ?self.config.lease_retry,
                        "Another proxy of the cluster is ordering the certificate; waiting for it"
                    );
                    certs.borrow_and_update();
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.lease_retry) => {}
                        _ = certs.changed() => {}
                    }
                }
                Err(error) => {
                    if error.is_unknown_account() {
                        tracing::info!("The ACME server does not know the account; creating a new one next time");
                        self.account = None;
                        account::forget(self.account_path.as_deref()).await;
                    }
                    let delay = failures.next_delay();
                    self.state.acme_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %error_chain(&error),
                        retry_in = ?delay,
                        "Could not obtain a TLS certificate; keeping the current one"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The lease and the TXT value live at the controller: wait until the session is up.
    async fn wait_for_controller(&self) {
        let mut connected = self.state.connected.subscribe();
        // Never fails while the proxy runs: the state owns the sender.
        let _ = connected.wait_for(|up| *up).await;
    }

    /// Keeps a certificate that came from another proxy of the cluster in the certificate file too, so
    /// a restart serves it at once (once per certificate).
    async fn save_shared_certificate(&mut self) {
        let (Some(files), Some(cert)) = (&self.files, self.state.tls.current()) else {
            return;
        };
        let info = cert.info();
        if info.source != CertSource::Controller || self.saved_serial.as_ref() == Some(&info.serial)
        {
            return;
        }
        match files.write(cert.pem()).await {
            Ok(()) => self.saved_serial = Some(info.serial.clone()),
            Err(error) => {
                tracing::warn!(%error, "Cannot write the cluster certificate to the certificate file")
            }
        }
    }

    /// Takes the lease and runs one order; always gives the lease back.
    async fn obtain(&mut self) -> Result<(), AcmeError> {
        let names = certificate_names(&self.state.config.cluster, &self.config)?;
        if !order::request_lease(&self.state.cert_link).await? {
            return Err(AcmeError::LeaseHeld);
        }
        let result = self.order_with_lease(&names).await;
        self.state
            .cert_link
            .send(ProxyToController::ReleaseCertLease);
        result
    }

    async fn order_with_lease(&mut self, names: &[String]) -> Result<(), AcmeError> {
        // A certificate may have arrived between the decision to renew and the lease.
        let current = self.state.tls.current();
        if renewal_wait(
            current.as_deref(),
            self.state.config.renew_before,
            SystemTime::now(),
        )
        .is_some()
        {
            return Ok(());
        }
        let account = match &self.account {
            Some(account) => account.clone(),
            None => {
                let account =
                    account::load_or_create(&self.config, self.account_path.as_deref()).await?;
                self.account = Some(account.clone());
                account
            }
        };
        self.state.acme_orders.fetch_add(1, Ordering::Relaxed);
        let ctx = order::OrderContext {
            account: &account,
            names,
            challenge: self.config.challenge,
            challenge_wait: self.config.challenge_wait,
            order_timeout: self.config.order_timeout,
            link: &self.state.cert_link,
            tls: &self.state.tls,
        };
        let pem = order::run_order(&ctx).await?;
        let cert = ClusterCert::from_pem(pem.clone(), CertSource::Acme)?;
        let serial = cert.info().serial.clone();
        tracing::info!(%serial, names = ?names, "Obtained a certificate from the ACME server");
        self.state.tls.install(cert);
        self.state
            .cert_link
            .send(ProxyToController::StoreCertificate {
                cert_pem: pem.cert_pem.clone(),
                key_pem: pem.key_pem.clone(),
            });
        if let Some(files) = &self.files {
            match files.write(&pem).await {
                Ok(()) => self.saved_serial = Some(serial),
                Err(error) => {
                    tracing::warn!(%error, "Cannot write the new certificate to the certificate file")
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_certs::self_signed;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(100));
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![30, 60, 100, 100, 100]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(30));
    }

    #[test]
    fn renewal_is_due_within_renew_before() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        assert_eq!(renewal_wait(None, 30 * day, now), None);
        let cert = ClusterCert::from_pem(self_signed(&["a.test"], 90), CertSource::File).unwrap();
        let wait = renewal_wait(Some(&cert), 30 * day, now).unwrap();
        assert!(wait > 59 * day && wait <= 60 * day, "{wait:?}");
        assert_eq!(renewal_wait(Some(&cert), 91 * day, now), None);
        let expired = ClusterCert::from_pem(self_signed(&["a.test"], 0), CertSource::File).unwrap();
        assert_eq!(
            renewal_wait(Some(&expired), Duration::ZERO, now + day),
            None
        );
    }

    #[test]
    fn names_follow_the_challenge_type() {
        let mut config = AcmeConfig::new("https://a/".parse().unwrap(), "a@b.c".into());
        let cluster = "Plane.Test".parse().unwrap();
        assert_eq!(
            certificate_names(&cluster, &config).unwrap(),
            vec!["plane.test", "*.plane.test"]
        );
        config.challenge = AcmeChallenge::Http01;
        config.subdomains = vec!["app".into()];
        assert_eq!(
            certificate_names(&cluster, &config).unwrap(),
            vec!["plane.test", "app.plane.test"]
        );
        for bad in ["localhost:9090", "127.0.0.1", "plane"] {
            let cluster = bad.parse().unwrap();
            assert!(
                matches!(
                    certificate_names(&cluster, &config),
                    Err(AcmeError::NoDnsName(_))
                ),
                "{bad}"
            );
        }
        let localhost = "localhost".parse().unwrap();
        assert!(certificate_names(&localhost, &config).is_ok());
    }
}
