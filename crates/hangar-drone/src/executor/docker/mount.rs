//! `executable.mount`: which host directory under the drone's mount base a container gets at
//! [`CONTAINER_DATA_DIR`]. The directory is created when missing; nothing outside the mount base can
//! ever be mounted (absolute paths, `..`, a leading `./`, and symlinks leading out are refused).

use hangar_types::executable::Mount;
use hangar_types::KeyName;
use std::path::{Component, Path, PathBuf};

/// Where a container sees its data directory (Plane's path, kept for compatibility); also in its
/// `HANGAR_DATA_DIR` variable.
pub const CONTAINER_DATA_DIR: &str = "/plane-data";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("the backend asks for a mount but this drone has no mount base (start it with --mount-base DIR)")]
    NoMountBase,
    #[error("mount path {path:?} is not under the mount base (use a relative path of plain names, without `..` or a leading `./`)")]
    OutsideMountBase { path: String },
    #[error("cannot create the mount directory {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The host directory to mount, relative to the mount base, or `None` for no mount. Pure: checks
/// the request only.
pub fn mount_subdir(mount: Option<&Mount>, key: &KeyName) -> Result<Option<PathBuf>, MountError> {
    let relative = match mount {
        None | Some(Mount::Bool(false)) => return Ok(None),
        Some(Mount::Bool(true)) => key.as_str(),
        Some(Mount::Path(path)) => path.as_str(),
    };
    let outside = || MountError::OutsideMountBase {
        path: relative.to_string(),
    };
    let path = Path::new(relative);
    let mut components = path.components().peekable();
    if components.peek().is_none() {
        return Err(outside());
    }
    if !components.all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    Ok(Some(path.to_path_buf()))
}

/// Resolves the mount of a backend to an existing host directory under `base`, creating what is
/// missing. `None`: no mount. A symlink on the way is refused before anything is created (a backend
/// can write symlinks into its own directory; they must not lead another mount out of the base).
pub async fn prepare_mount(
    mount: Option<&Mount>,
    key: &KeyName,
    base: Option<&Path>,
) -> Result<Option<PathBuf>, MountError> {
    let Some(relative) = mount_subdir(mount, key)? else {
        return Ok(None);
    };
    let base = base.ok_or(MountError::NoMountBase)?;
    let outside = || MountError::OutsideMountBase {
        path: relative.display().to_string(),
    };
    let create_error = |dir: &Path, source| MountError::CreateDir {
        path: dir.display().to_string(),
        source,
    };
    tokio::fs::create_dir_all(base)
        .await
        .map_err(|e| create_error(base, e))?;
    let real_base = tokio::fs::canonicalize(base)
        .await
        .map_err(|e| create_error(base, e))?;
    let mut dir = real_base.clone();
    for component in relative.components() {
        dir.push(component);
        match tokio::fs::symlink_metadata(&dir).await {
            Ok(meta) if meta.file_type().is_symlink() => return Err(outside()),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                let source = std::io::Error::other("a file of that name exists");
                return Err(create_error(&dir, source));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match tokio::fs::create_dir(&dir).await {
                    Ok(()) => {}
                    // Created meanwhile by a concurrent spawn: checked again below.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(create_error(&dir, e)),
                }
            }
            Err(e) => return Err(create_error(&dir, e)),
        }
    }
    let real_dir = tokio::fs::canonicalize(&dir)
        .await
        .map_err(|e| create_error(&dir, e))?;
    if !real_dir.starts_with(&real_base) {
        return Err(outside());
    }
    Ok(Some(real_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> KeyName {
        name.parse().unwrap()
    }

    fn path(p: &str) -> Option<Mount> {
        Some(Mount::Path(p.into()))
    }

    #[test]
    fn mount_requests_map_to_subdirectories() {
        let k = key("doc-1");
        assert_eq!(mount_subdir(None, &k).unwrap(), None);
        assert_eq!(mount_subdir(Some(&Mount::Bool(false)), &k).unwrap(), None);
        assert_eq!(
            mount_subdir(Some(&Mount::Bool(true)), &k).unwrap(),
            Some(PathBuf::from("doc-1"))
        );
        assert_eq!(
            mount_subdir(path("custom-mount").as_ref(), &k).unwrap(),
            Some(PathBuf::from("custom-mount"))
        );
        assert_eq!(
            mount_subdir(path("a/b").as_ref(), &k).unwrap(),
            Some(PathBuf::from("a/b"))
        );
    }

    #[test]
    fn escapes_are_refused() {
        let k = key("doc-1");
        for bad in [
            "..",
            "../x",
            "a/b/../../../x",
            "a/..",
            "/etc",
            "./x",
            "",
            ".",
        ] {
            let err = mount_subdir(path(bad).as_ref(), &k).unwrap_err();
            assert!(
                matches!(err, MountError::OutsideMountBase { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("not under the mount base"));
        }
        // A key is a path too when `mount` is `true`.
        assert!(mount_subdir(Some(&Mount::Bool(true)), &key("..")).is_err());
        assert!(mount_subdir(Some(&Mount::Bool(true)), &key("/abs")).is_err());
    }

    #[tokio::test]
    async fn directories_are_created_under_the_base_only() {
        let base = tempfile::tempdir().unwrap();
        let k = key("doc-1");
        let dir = prepare_mount(Some(&Mount::Bool(true)), &k, Some(base.path()))
            .await
            .unwrap()
            .unwrap();
        assert!(dir.is_dir());
        assert!(dir.ends_with("doc-1"));
        assert!(matches!(
            prepare_mount(Some(&Mount::Bool(true)), &k, None).await,
            Err(MountError::NoMountBase)
        ));
        assert_eq!(prepare_mount(None, &k, None).await.unwrap(), None);
        // A symlink inside the base that leads out of it is refused.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), base.path().join("link")).unwrap();
        let err = prepare_mount(path("link/x").as_ref(), &k, Some(base.path()))
            .await
            .unwrap_err();
        assert!(matches!(err, MountError::OutsideMountBase { .. }), "{err}");
        assert!(!outside.path().join("x").exists());
        // Nested paths are created; an existing directory is reused.
        let nested = prepare_mount(path("a/b").as_ref(), &k, Some(base.path()))
            .await
            .unwrap()
            .unwrap();
        assert!(nested.is_dir());
        let again = prepare_mount(path("a/b").as_ref(), &k, Some(base.path())).await;
        assert_eq!(again.unwrap(), Some(nested));
    }
}
