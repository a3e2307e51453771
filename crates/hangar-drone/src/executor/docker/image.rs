//! `loading` for Docker: make the image present per `pull_policy` (plane-api.md §6.3.2), with the
//! executable's registry credentials.
//!
//! One pull per image at a time per drone ([`ImagePulls`]): a spawn that finds a pull of its image
//! running waits for it and takes its result instead of pulling again, so a warm pool of N backends
//! of a missing image pulls it once, not N times.

use super::{is_not_found, DockerExecutor};
use crate::executor::ExecutorError;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use hangar_types::executable::{DockerExecutable, DockerRegistryAuth, PullPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// The pulls of one executor, per image reference (one small entry per image ever pulled).
#[derive(Default)]
pub(super) struct ImagePulls {
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Pulled>>>>>,
    started: AtomicU64,
}

/// The last finished pull of a reference.
struct Pulled {
    at: Instant,
    /// The failure message, as in [`ExecutorError::Pull`].
    result: Result<(), String>,
}

impl ImagePulls {
    pub(super) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    fn flight(&self, reference: &str) -> Arc<tokio::sync::Mutex<Option<Pulled>>> {
        let mut flights = match self.flights.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        flights.entry(reference.to_string()).or_default().clone()
    }
}

impl DockerExecutor {
    pub(super) async fn prepare_image(&self, exe: &DockerExecutable) -> Result<(), ExecutorError> {
        let image = exe.image.as_str();
        match exe.pull_policy.unwrap_or_default() {
            PullPolicy::Never => {
                if !self.image_present(image).await? {
                    return Err(ExecutorError::ImageNotPresent {
                        image: image.to_string(),
                    });
                }
                Ok(())
            }
            PullPolicy::IfNotPresent => {
                if self.image_present(image).await? {
                    return Ok(());
                }
                self.shared_pull(exe).await
            }
            PullPolicy::Always => self.shared_pull(exe).await,
        }
    }

    /// Pulls the image, unless a pull of it finished after this call began (it waited for that
    /// pull, which covers it): then that pull's result.
    async fn shared_pull(&self, exe: &DockerExecutable) -> Result<(), ExecutorError> {
        let asked = Instant::now();
        let flight = self.pulls.flight(&pull_reference(&exe.image));
        let mut last = flight.lock().await;
        if let Some(pulled) = last.as_ref().filter(|p| p.at >= asked) {
            tracing::debug!(image = %exe.image, "Image pulled by a concurrent spawn");
            return pulled
                .result
                .clone()
                .map_err(|message| ExecutorError::Pull {
                    image: exe.image.clone(),
                    message,
                });
        }
        self.pulls.started.fetch_add(1, Ordering::Relaxed);
        let result = self.pull(exe).await;
        let kept = match &result {
            Ok(()) => Ok(()),
            Err(ExecutorError::Pull { message, .. }) => Err(message.clone()),
            Err(e) => Err(e.to_string()),
        };
        *last = Some(Pulled {
            at: Instant::now(),
            result: kept,
        });
        result
    }

    async fn image_present(&self, image: &str) -> Result<bool, ExecutorError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(source) => Err(ExecutorError::Docker {
                action: "inspect the image",
                source,
            }),
        }
    }

    /// Pulls the image, consuming the progress stream to the end.
    async fn pull(&self, exe: &DockerExecutable) -> Result<(), ExecutorError> {
        let reference = pull_reference(&exe.image);
        tracing::info!(image = %reference, "Pulling image");
        let options = CreateImageOptions {
            from_image: Some(reference.clone()),
            ..Default::default()
        };
        let credentials = exe
            .credentials
            .as_ref()
            .map(|auth| credentials(auth, &reference));
        let failed = |message: String| ExecutorError::Pull {
            image: exe.image.clone(),
            message,
        };
        let mut progress = self.docker.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(error) = info.error.or(info.error_detail.and_then(|d| d.message)) {
                        return Err(failed(error));
                    }
                }
                Err(e) => return Err(failed(super::error_message(&e))),
            }
        }
        tracing::info!(image = %reference, "Pulled image");
        Ok(())
    }
}

/// The reference to pull: with `:latest` added when it has neither tag nor digest (an untagged pull
/// would fetch every tag of the repository).
pub fn pull_reference(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || image.contains('@') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// The registry host of a reference (`None`: Docker Hub).
fn registry_of(reference: &str) -> Option<&str> {
    let (first, rest) = reference.split_once('/')?;
    let is_host = first.contains('.') || first.contains(':') || first == "localhost";
    (is_host && !rest.is_empty()).then_some(first)
}

fn credentials(auth: &DockerRegistryAuth, reference: &str) -> DockerCredentials {
    let serveraddress = registry_of(reference).map(str::to_string);
    match auth {
        DockerRegistryAuth::UsernamePassword { username, password } => DockerCredentials {
            username: Some(username.clone()),
            password: Some(password.clone()),
            serveraddress,
            ..Default::default()
        },
        DockerRegistryAuth::Token { registrytoken } => DockerCredentials {
            registrytoken: Some(registrytoken.clone()),
            serveraddress,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_a_tag_when_they_have_none() {
        assert_eq!(pull_reference("app"), "app:latest");
        assert_eq!(pull_reference("app:1"), "app:1");
        assert_eq!(pull_reference("ghcr.io/org/app"), "ghcr.io/org/app:latest");
        assert_eq!(
            pull_reference("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            pull_reference("localhost:5000/app:2"),
            "localhost:5000/app:2"
        );
        assert_eq!(pull_reference("app@sha256:abc"), "app@sha256:abc");
    }

    #[test]
    fn credentials_name_the_registry() {
        let auth = DockerRegistryAuth::UsernamePassword {
            username: "u".into(),
            password: "p".into(),
        };
        let c = credentials(&auth, "ghcr.io/org/app:1");
        assert_eq!(c.serveraddress.as_deref(), Some("ghcr.io"));
        assert_eq!(c.username.as_deref(), Some("u"));
        let token = DockerRegistryAuth::Token {
            registrytoken: "t".into(),
        };
        let c = credentials(&token, "org/app:1");
        assert_eq!(c.serveraddress, None);
        assert_eq!(c.registrytoken.as_deref(), Some("t"));
        assert_eq!(registry_of("localhost/app"), Some("localhost"));
        assert_eq!(registry_of("app"), None);
    }
}
