//! The certificate file (`cert_path`, Plane §7.9.2): loaded at startup, watched for changes (its
//! modification time and size are polled every `cert_reload_interval`) and reloaded without a
//! restart, and written after every ACME issuance so a restarted proxy has its certificate at once.
//!
//! Formats read:
//! - Plane's JSON: `{"cert": "<PEM certificate chain>", "key": "<PEM private key>"}`;
//! - PEM: the certificate chain (leaf first) and the private key in one file, or the chain in
//!   `cert_path` and the key in `key_path`.
//!
//! A file that cannot be read or parsed never replaces the certificate being served: the error is
//! logged and the old certificate stays. Writes keep the layout found (JSON when the file does not
//! exist yet), go through a temporary file and a rename so a reader never sees half a file, and create
//! files with mode 0600 (they hold a private key).

use crate::tls::{CertPem, CertSource, ClusterCert};
use crate::ProxyState;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Largest certificate or key file read (a chain is a few KiB).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the certificate file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not valid certificate JSON ({{\"cert\": …, \"key\": …}}): {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} holds no private key; put the key in the same file or set `key_path`")]
    NoKey { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Plane's certificate file format.
#[derive(Serialize, Deserialize)]
struct JsonCertFile {
    cert: String,
    key: String,
}

/// Where the certificate (and maybe its key) live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFiles {
    pub(crate) cert_path: PathBuf,
    pub(crate) key_path: Option<PathBuf>,
}

/// What the files looked like when last read or written: reloading happens when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl CertFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.cert_path.as_path()).chain(self.key_path.as_deref())
    }

    async fn stamp(&self) -> Stamp {
        let mut parts = Vec::new();
        for path in self.paths() {
            let part = match tokio::fs::metadata(path).await {
                Ok(meta) => Some((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                )),
                Err(_) => None,
            };
            parts.push(part);
        }
        Stamp(parts)
    }

    /// Whether the certificate file exists (a missing file is not an error while ACME is configured).
    pub(crate) async fn exists(&self) -> bool {
        tokio::fs::try_exists(&self.cert_path)
            .await
            .unwrap_or(false)
    }

    /// Reads the certificate and key in whichever format the file has.
    pub(crate) async fn read(&self) -> Result<CertPem, CertFileError> {
        let text = read_limited(&self.cert_path).await?;
        if text.trim_start().starts_with('{') {
            let file: JsonCertFile =
                serde_json::from_str(&text).map_err(|source| CertFileError::Json {
                    path: self.cert_path.clone(),
                    source,
                })?;
            return Ok(CertPem {
                cert_pem: file.cert,
                key_pem: file.key,
            });
        }
        let key_pem = match &self.key_path {
            Some(key_path) => read_limited(key_path).await?,
            None if text.contains("PRIVATE KEY-----") => text.clone(),
            None => {
                return Err(CertFileError::NoKey {
                    path: self.cert_path.clone(),
                })
            }
        };
        // The PEM parser skips blocks of other kinds, so the combined file serves as both.
        Ok(CertPem {
            cert_pem: text,
            key_pem,
        })
    }

    /// Writes `pem`, keeping the layout of the existing file (JSON for a new file).
    pub(crate) async fn write(&self, pem: &CertPem) -> Result<(), CertFileError> {
        if let Some(key_path) = &self.key_path {
            write_private(&self.cert_path, pem.cert_pem.as_bytes()).await?;
            return write_private(key_path, pem.key_pem.as_bytes()).await;
        }
        let existing_is_pem = match tokio::fs::read_to_string(&self.cert_path).await {
            Ok(text) => !text.trim_start().starts_with('{') && !text.trim().is_empty(),
            Err(_) => false,
        };
        let contents = if existing_is_pem {
            let mut combined = pem.cert_pem.clone();
            if !combined.ends_with('\n') {
                combined.push('\n');
            }
            combined.push_str(&pem.key_pem);
            combined
        } else {
            let file = JsonCertFile {
                cert: pem.cert_pem.clone(),
                key: pem.key_pem.clone(),
            };
            // Serializing two strings cannot fail.
            serde_json::to_string_pretty(&file).unwrap_or_default()
        };
        write_private(&self.cert_path, contents.as_bytes()).await
    }
}

async fn read_limited(path: &Path) -> Result<String, CertFileError> {
    let read_error = |source| CertFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = tokio::fs::metadata(path).await.map_err(read_error)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(CertFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    tokio::fs::read_to_string(path).await.map_err(read_error)
}

/// Writes `contents` to `path` through a temporary file in the same directory (mode 0600) and a rename.
pub(crate) async fn write_private(path: &Path, contents: &[u8]) -> Result<(), CertFileError> {
    let write_error = |source| CertFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_error(io::Error::other("the path has no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", rand::random::<u32>()));
    let tmp = path.with_file_name(tmp_name);
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let result = async {
        use tokio::io::AsyncWriteExt;
        let mut file = options.open(&tmp).await?;
        file.write_all(contents).await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result.map_err(write_error)
}

/// Loads the certificate from `files` and serves it. Errors are returned, not logged.
pub(crate) async fn load_and_install(
    state: &ProxyState,
    files: &CertFiles,
) -> Result<bool, anyhow::Error> {
    let pem = files.read().await?;
    let cert = ClusterCert::from_pem(pem, CertSource::File)?;
    Ok(state.tls.install(cert))
}

/// Reloads the certificate file whenever it changes, until `cancel`. A file that fails to load is
/// reported once per change and leaves the current certificate in place.
pub(crate) async fn run_cert_file_watch(
    state: Arc<ProxyState>,
    files: CertFiles,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut seen = files.stamp().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let stamp = files.stamp().await;
        if stamp == seen {
            continue;
        }
        seen = stamp;
        if !files.exists().await {
            state.cert_file_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %files.cert_path.display(), "The certificate file was removed; keeping the current certificate");
            continue;
        }
        match load_and_install(&state, &files).await {
            Ok(true) => {
                tracing::info!(path = %files.cert_path.display(), "Reloaded the certificate file")
            }
            Ok(false) => {
                tracing::debug!(path = %files.cert_path.display(), "The certificate file changed but holds the certificate already served")
            }
            Err(error) => {
                state.cert_file_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    path = %files.cert_path.display(),
                    error = format!("{error:#}"),
                    "Cannot load the changed certificate file; keeping the current certificate"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_certs::self_signed;

    fn files(dir: &Path, key: bool) -> CertFiles {
        CertFiles {
            cert_path: dir.join("cert"),
            key_path: key.then(|| dir.join("key")),
        }
    }

    #[tokio::test]
    async fn json_and_pem_layouts_roundtrip() {
        crate::with_test_timeout(async {
            let dir = tempfile::tempdir().unwrap();
            let pem = self_signed(&["plane.test"], 30);

            // A new file is written as Plane's JSON, mode 0600.
            let json = files(dir.path(), false);
            json.write(&pem).await.unwrap();
            let text = std::fs::read_to_string(&json.cert_path).unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["cert"], pem.cert_pem.as_str());
            assert_eq!(value["key"], pem.key_pem.as_str());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&json.cert_path)
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            assert_eq!(json.read().await.unwrap(), pem);

            // A combined PEM file stays PEM.
            std::fs::write(&json.cert_path, format!("{}{}", pem.cert_pem, pem.key_pem)).unwrap();
            let read = json.read().await.unwrap();
            ClusterCert::from_pem(read, CertSource::File).unwrap();
            let newer = self_signed(&["plane.test"], 60);
            json.write(&newer).await.unwrap();
            let text = std::fs::read_to_string(&json.cert_path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
            let cert = ClusterCert::from_pem(json.read().await.unwrap(), CertSource::File).unwrap();
            let expected = ClusterCert::from_pem(newer.clone(), CertSource::File).unwrap();
            assert!(cert.same_chain(&expected));

            // Separate certificate and key files.
            let split = files(dir.path(), true);
            split.write(&pem).await.unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.path().join("key")).unwrap(),
                pem.key_pem
            );
            assert_eq!(split.read().await.unwrap(), pem);
        })
        .await;
    }

    #[tokio::test]
    async fn bad_files_are_clear_errors() {
        crate::with_test_timeout(async {
            let dir = tempfile::tempdir().unwrap();
            let f = files(dir.path(), false);
            assert!(matches!(f.read().await, Err(CertFileError::Read { .. })));
            std::fs::write(&f.cert_path, "{\"cert\": 1}").unwrap();
            let err = f.read().await.unwrap_err();
            assert!(matches!(err, CertFileError::Json { .. }), "{err}");
            let pem = self_signed(&["plane.test"], 30);
            std::fs::write(&f.cert_path, &pem.cert_pem).unwrap();
            assert!(matches!(f.read().await, Err(CertFileError::NoKey { .. })));
            std::fs::write(&f.cert_path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
            assert!(matches!(
                f.read().await,
                Err(CertFileError::TooLarge { .. })
            ));
        })
        .await;
    }
}
