//! The ACME account: created once (contact, terms agreed, optional External Account Binding) and kept
//! in `account_path` (JSON, mode 0600) so restarts reuse it instead of creating accounts.

use super::{AcmeConfig, AcmeError};
use crate::cert_file::write_private;
use instant_acme::{Account, AccountBuilder, AccountCredentials, ExternalAccountKey, NewAccount};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `account_path` holds.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    /// The directory the account belongs to; another directory gets a new account.
    directory_url: String,
    credentials: AccountCredentials,
}

fn builder(config: &AcmeConfig) -> Result<AccountBuilder, AcmeError> {
    match &config.ca_cert_path {
        Some(path) => Account::builder_with_root(path).map_err(|source| AcmeError::CaCert {
            path: path.clone(),
            source,
        }),
        None => Account::builder().map_err(AcmeError::Account),
    }
}

/// The account saved at `path` for this directory, or a new one (saved there).
pub(super) async fn load_or_create(
    config: &AcmeConfig,
    path: Option<&Path>,
) -> Result<Account, AcmeError> {
    if let Some(path) = path {
        match read(path).await {
            Ok(Some(stored)) if stored.directory_url == config.directory_url.as_str() => {
                let account = builder(config)?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(AcmeError::Account)?;
                tracing::debug!(account = account.id(), "Loaded the ACME account");
                return Ok(account);
            }
            Ok(Some(_)) => tracing::info!(
                path = %path.display(),
                "The saved ACME account belongs to another directory; creating a new account"
            ),
            Ok(None) => {}
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "Cannot read the saved ACME account; creating a new account"
            ),
        }
    }
    let contact = format!("mailto:{}", config.email);
    let eab = match &config.eab {
        Some(eab) => Some(ExternalAccountKey::new(
            eab.key_id.clone(),
            &eab.hmac_key_bytes()?,
        )),
        None => None,
    };
    let (account, credentials) = builder(config)?
        .create(
            &NewAccount {
                contact: &[&contact],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory_url.to_string(),
            eab.as_ref(),
        )
        .await
        .map_err(AcmeError::Account)?;
    tracing::info!(account = account.id(), "Created an ACME account");
    if let Some(path) = path {
        let stored = StoredAccount {
            directory_url: config.directory_url.to_string(),
            credentials,
        };
        match serde_json::to_vec_pretty(&stored) {
            Ok(bytes) => {
                if let Err(error) = write_private(path, &bytes).await {
                    tracing::warn!(%error, "Cannot save the ACME account; the next start creates another");
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot serialize the ACME account"),
        }
    }
    Ok(account)
}

/// Forgets the saved account (the server no longer knows it).
pub(super) async fn forget(path: Option<&Path>) {
    if let Some(path) = path {
        if let Err(error) = tokio::fs::remove_file(path).await {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), %error, "Cannot remove the saved ACME account");
            }
        }
    }
}

async fn read(path: &Path) -> Result<Option<StoredAccount>, String> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
