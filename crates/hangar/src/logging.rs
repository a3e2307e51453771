//! Process-wide tracing setup: `RUST_LOG` filters (default: info for Hangar's crates, warn for the
//! rest; client commands default to warn everywhere), `--log-format json` (or `HANGAR_LOG_FORMAT=json`,
//! or the older `HANGAR_LOG_JSON=1`) for JSON lines. Logs go to stderr so client commands' stdout stays
//! machine-readable; text logs are coloured only when stderr is a terminal, so journald, `docker logs`
//! and files get plain text.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The crates whose info logs a component process shows by default.
const HANGAR_CRATES: [&str; 7] = [
    "hangar",
    "hangar_client",
    "hangar_controller",
    "hangar_drone",
    "hangar_proxy",
    "hangar_store",
    "hangar_types",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// A process running components: info for Hangar's crates, warn for dependencies.
    Component,
    /// A client command: warnings only.
    Client,
}

/// The filter used when `RUST_LOG` is unset.
pub fn default_directives(verbosity: Verbosity) -> String {
    match verbosity {
        Verbosity::Client => "warn".to_string(),
        Verbosity::Component => {
            let mut d = String::from("warn");
            for c in HANGAR_CRATES {
                d.push_str(&format!(",{c}=info"));
            }
            d
        }
    }
}

/// Whether `HANGAR_LOG_JSON` asks for JSON lines (set, and not empty, `0` or `false`).
pub fn json_requested(value: Option<&str>) -> bool {
    value.is_some_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

/// The format to use: the flag (or `HANGAR_LOG_FORMAT`) when given, else JSON when the older
/// `HANGAR_LOG_JSON` asks for it, else text.
pub fn resolve_format(flag: Option<LogFormat>, legacy_json: Option<&str>) -> LogFormat {
    match flag {
        Some(format) => format,
        None if json_requested(legacy_json) => LogFormat::Json,
        None => LogFormat::Text,
    }
}

/// Installs the global subscriber. Fails on an invalid `RUST_LOG`.
pub fn init(verbosity: Verbosity, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| anyhow::anyhow!("invalid RUST_LOG {directives:?}: {e}"))?,
        _ => EnvFilter::try_new(default_directives(verbosity))
            .map_err(|e| anyhow::anyhow!("invalid default log filter: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filters_parse() {
        for v in [Verbosity::Component, Verbosity::Client] {
            EnvFilter::try_new(default_directives(v)).unwrap();
        }
        assert!(default_directives(Verbosity::Component).contains("hangar_drone=info"));
        assert_eq!(default_directives(Verbosity::Client), "warn");
    }

    #[test]
    fn json_switch() {
        assert!(json_requested(Some("1")));
        assert!(json_requested(Some("true")));
        assert!(!json_requested(Some("0")));
        assert!(!json_requested(Some("false")));
        assert!(!json_requested(Some("")));
        assert!(!json_requested(None));
    }

    #[test]
    fn the_flag_wins_over_the_legacy_variable() {
        assert_eq!(resolve_format(None, None), LogFormat::Text);
        assert_eq!(resolve_format(None, Some("1")), LogFormat::Json);
        assert_eq!(
            resolve_format(Some(LogFormat::Text), Some("1")),
            LogFormat::Text
        );
        assert_eq!(resolve_format(Some(LogFormat::Json), None), LogFormat::Json);
    }
}
