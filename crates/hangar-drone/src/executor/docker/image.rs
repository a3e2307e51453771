//! `loading` for Docker: make the image present per `pull_policy` (plane-api.md §6.3.2), with the
//! executable's registry credentials.

use super::{is_not_found, DockerExecutor};
use crate::executor::ExecutorError;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use hangar_types::executable::{DockerExecutable, DockerRegistryAuth, PullPolicy};

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
                self.pull(exe).await
            }
            PullPolicy::Always => self.pull(exe).await,
        }
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
