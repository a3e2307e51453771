//! `--config FILE.toml` for `hangar controller|drone|proxy`.
//!
//! A file holds the fields of the component's `*Config` (`ControllerConfig`, `DroneConfig`,
//! `ProxyConfig`, whose docs list them with units and defaults) plus a few settings that belong to the
//! process rather than to the component (the listen address, the database), which the command takes
//! out first with [`ConfigLayers::take`].
//!
//! Precedence, highest first: flags, `HANGAR_*` environment variables, the file, the defaults. Clap
//! already resolves flag over environment; the command then overlays only what was given (an
//! `Option` that is `Some`) onto the file's table with [`ConfigLayers::set`], and the component's own
//! serde defaults fill the rest in [`ConfigLayers::build`]. So a default is written in one place, the
//! `*Config`, and unknown fields are refused by its `deny_unknown_fields` with the field's name.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid `{key}` in {origin}: {source}")]
    InvalidSetting {
        key: &'static str,
        origin: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("cannot use the value given for `{key}`: {source}")]
    Unrepresentable {
        key: &'static str,
        #[source]
        source: toml::ser::Error,
    },
    #[error("invalid {what} configuration (from {origin}): {message}")]
    Invalid {
        what: &'static str,
        origin: String,
        message: String,
    },
}

/// The configuration being assembled: the file's table, with flag and environment values laid over it.
#[derive(Debug, Default)]
pub struct ConfigLayers {
    table: toml::Table,
    path: Option<PathBuf>,
}

impl ConfigLayers {
    /// Reads `path` (nothing when `None`: every field then comes from flags, env or defaults).
    pub fn load(path: Option<&Path>) -> Result<ConfigLayers, ConfigFileError> {
        let Some(path) = path else {
            return Ok(ConfigLayers::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ConfigLayers::parse(&text, path)
    }

    /// Parses file contents; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigLayers, ConfigFileError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|source| ConfigFileError::Syntax {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        Ok(ConfigLayers {
            table,
            path: Some(path.to_path_buf()),
        })
    }

    /// Where values come from, for error messages.
    fn origin(&self) -> String {
        match &self.path {
            Some(path) => format!("{}, flags and environment", path.display()),
            None => "flags and environment".to_string(),
        }
    }

    /// A value given by flag or environment (`Some`) replaces the file's; `None` keeps it.
    pub fn set<T: Serialize>(
        &mut self,
        key: &'static str,
        value: Option<&T>,
    ) -> Result<(), ConfigFileError> {
        if let Some(value) = value {
            let value = toml::Value::try_from(value)
                .map_err(|source| ConfigFileError::Unrepresentable { key, source })?;
            self.table.insert(key.to_string(), value);
        }
        Ok(())
    }

    /// Fails with where the value can be given when `key` is still missing.
    pub fn require(&self, key: &str, flag: &str, env: &str) -> anyhow::Result<()> {
        if self.table.contains_key(key) {
            return Ok(());
        }
        Err(missing(key, flag, env))
    }

    /// Whether `key` is set by the file, the environment or a flag.
    pub fn contains(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Removes a process setting (not a field of the component's config) and returns it: `flag` when
    /// given, else the file's value, else `None`.
    pub fn take<T: DeserializeOwned>(
        &mut self,
        key: &'static str,
        flag: Option<T>,
    ) -> Result<Option<T>, ConfigFileError> {
        let from_file = self.table.remove(key);
        if flag.is_some() {
            return Ok(flag);
        }
        let origin = self.origin();
        from_file
            .map(|value| {
                T::deserialize(value).map_err(|source| ConfigFileError::InvalidSetting {
                    key,
                    origin,
                    source: Box::new(source),
                })
            })
            .transpose()
    }

    /// Deserializes the component's config from everything laid so far; missing fields get the
    /// component's defaults, unknown fields are refused by name.
    pub fn build<C: DeserializeOwned>(self, what: &'static str) -> Result<C, ConfigFileError> {
        let origin = self.origin();
        C::deserialize(toml::Value::Table(self.table)).map_err(|e| ConfigFileError::Invalid {
            what,
            origin,
            message: e.message().to_string(),
        })
    }
}

/// A process setting that is required, with where it can be given, for a clear error when missing.
pub fn required<T>(value: Option<T>, key: &str, flag: &str, env: &str) -> anyhow::Result<T> {
    value.ok_or_else(|| missing(key, flag, env))
}

fn missing(key: &str, flag: &str, env: &str) -> anyhow::Error {
    anyhow::anyhow!("missing `{key}`: give {flag}, set {env}, or put `{key}` in the --config file")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_controller::ControllerConfig;
    use hangar_drone::DroneConfig;
    use hangar_proxy::ProxyConfig;
    use std::time::Duration;

    fn layers(text: &str) -> ConfigLayers {
        ConfigLayers::parse(text, Path::new("test.toml")).unwrap()
    }

    /// Why the configuration `what` cannot be built from `text`.
    fn build_error<C: DeserializeOwned + std::fmt::Debug>(
        text: &str,
        what: &'static str,
    ) -> String {
        layers(text).build::<C>(what).unwrap_err().to_string()
    }

    #[test]
    fn flags_and_env_override_the_file_which_overrides_defaults() {
        let mut l = layers(
            r#"
            controller_url = "http://file:8080/"
            cluster = "file.example.com"
            pool = "from-file"
            soft_terminate_grace = 1500
            "#,
        );
        // `Some` is what clap produced from a flag or from the environment; `None` was not given.
        let url: url::Url = "http://flag:9000/".parse().unwrap();
        l.set("controller_url", Some(&url)).unwrap();
        l.set::<String>("pool", None).unwrap();
        l.set("ip", Some(&std::net::IpAddr::from([10, 0, 0, 7])))
            .unwrap();
        let c: DroneConfig = l.build("drone").unwrap();
        assert_eq!(c.controller_url.as_str(), "http://flag:9000/", "flag wins");
        assert_eq!(c.cluster.as_str(), "file.example.com", "file kept");
        assert_eq!(c.pool, "from-file", "absent flag keeps the file's value");
        assert_eq!(c.ip, std::net::IpAddr::from([10, 0, 0, 7]));
        assert_eq!(c.soft_terminate_grace, Duration::from_millis(1500));
        assert_eq!(c.metrics_addr, None, "default: off");
        assert_eq!(
            c.readiness_timeout,
            hangar_types::timing::READINESS_TIMEOUT,
            "default"
        );
    }

    #[test]
    fn process_settings_are_taken_out_with_flag_precedence() {
        let mut l = layers("db = \"/var/lib/hangar.db\"\nport = 9000\nbest_of = 3\n");
        assert_eq!(
            l.take::<String>("db", None).unwrap().as_deref(),
            Some("/var/lib/hangar.db")
        );
        assert_eq!(l.take::<u16>("port", Some(7000)).unwrap(), Some(7000));
        assert_eq!(l.take::<u16>("host", None).unwrap(), None);
        // Taken keys are gone, so the component's config does not refuse them.
        let c: ControllerConfig = l.build("controller").unwrap();
        assert_eq!(c.best_of, 3);
        let mut l = layers("port = \"eighty\"");
        let err = l.take::<u16>("port", None).unwrap_err().to_string();
        assert!(err.contains("`port`") && err.contains("test.toml"), "{err}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = build_error::<ControllerConfig>("best_of = 2\nbestof = 3\n", "controller");
        assert!(err.contains("unknown field `bestof`"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
        let text = "controller_url = \"http://x/\"\ncluster = \"c\"\nroute_wait_timeot = 3\n";
        let err = build_error::<ProxyConfig>(text, "proxy");
        assert!(err.contains("unknown field `route_wait_timeot`"), "{err}");
    }

    #[test]
    fn missing_and_malformed_values_are_explained() {
        let err = build_error::<DroneConfig>("pool = \"gpu\"", "drone");
        assert!(err.contains("missing field `controller_url`"), "{err}");
        let err = ConfigLayers::parse("best_of = ", Path::new("broken.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.toml") && err.contains("not valid TOML"),
            "{err}"
        );
        let err = ConfigLayers::load(Some(Path::new("/nonexistent/hangar.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
        let err = required::<String>(None, "db", "--db", "HANGAR_DB")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--db") && err.contains("HANGAR_DB"), "{err}");
    }

    #[test]
    fn proxy_durations_accept_integers_and_fractions() {
        let c: ProxyConfig = layers(
            "controller_url = \"http://x/\"\ncluster = \"c\"\nshutdown_grace = 3\nroute_wait_timeout = 0.5\n",
        )
        .build("proxy")
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        assert_eq!(c.route_wait_timeout, Duration::from_millis(500));
        assert_eq!(c.metrics_addr, None);
        let c: ProxyConfig = layers(
            "controller_url = \"http://x/\"\ncluster = \"c\"\nmetrics_addr = \"127.0.0.1:9091\"\n",
        )
        .build("proxy")
        .unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9091".parse().unwrap()));
    }
}
