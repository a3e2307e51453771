//! `HANGAR_*` variables that were renamed so that each name has one meaning. An old name keeps working
//! for one release: when it is set and its new name is not, its value is used under the new name and a
//! warning is logged saying what to write instead. Removed in the release after 0.x (see README,
//! "Environment variables").

/// A renamed variable, for the commands where the old name meant what the new one means.
#[derive(Debug, Clone, Copy)]
pub struct Renamed {
    pub old: &'static str,
    pub new: &'static str,
    pub commands: Commands,
}

impl Renamed {
    /// `old` renamed to `new` for the `commands` given.
    const fn only(old: &'static str, new: &'static str, commands: &'static [&'static str]) -> Self {
        Renamed {
            old,
            new,
            commands: Commands::Only(commands),
        }
    }

    /// `old` renamed to `new` for every command that is a client of the controller.
    const fn clients(old: &'static str, new: &'static str) -> Self {
        Renamed {
            old,
            new,
            commands: Commands::Clients,
        }
    }
}

/// Where a rename applies.
#[derive(Debug, Clone, Copy)]
pub enum Commands {
    /// These commands (first word after `hangar`).
    Only(&'static [&'static str]),
    /// Every command that is a client of the controller.
    Clients,
}

/// Commands that are not clients of a controller.
const NON_CLIENT_COMMANDS: [&str; 10] = [
    "dev",
    "controller",
    "drone",
    "proxy",
    "dns",
    "migrate",
    "version",
    "completions",
    "man",
    "help",
];

pub const RENAMED: &[Renamed] = &[
    // `HANGAR_CONTROLLER_URL` is the controller to dial, for every command that dials one.
    Renamed::only(
        "HANGAR_CONTROLLER_URL",
        "HANGAR_ADVERTISED_URL",
        &["controller"],
    ),
    Renamed::clients("HANGAR_CONTROLLER", "HANGAR_CONTROLLER_URL"),
    Renamed::only("HANGAR_HOST", "HANGAR_CONTROLLER_HOST", &["controller"]),
    Renamed::only("HANGAR_PORT", "HANGAR_CONTROLLER_PORT", &["controller"]),
    Renamed::only("HANGAR_HOST", "HANGAR_PROXY_HOST", &["proxy"]),
    Renamed::only(
        "HANGAR_METRICS_ADDR",
        "HANGAR_PROXY_METRICS_ADDR",
        &["proxy"],
    ),
    Renamed::only(
        "HANGAR_METRICS_ADDR",
        "HANGAR_DRONE_METRICS_ADDR",
        &["drone"],
    ),
    Renamed::only("HANGAR_LOG_CONFIG", "HANGAR_DOCKER_LOG_CONFIG", &["drone"]),
    // `HANGAR_DATA_DIR` is the backend's mounted data directory inside its container.
    Renamed::only("HANGAR_DATA_DIR", "HANGAR_DEV_DATA_DIR", &["dev"]),
];

/// The command word of `args` (the first argument that is not a flag or the value of the global
/// `--log-format`); `None` without one.
pub fn command_word(args: &[String]) -> Option<&str> {
    let mut words = args.iter().skip(1);
    while let Some(arg) = words.next() {
        if arg == "--log-format" {
            words.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

fn applies(renamed: &Renamed, command: &str) -> bool {
    match renamed.commands {
        Commands::Only(commands) => commands.contains(&command),
        Commands::Clients => !NON_CLIENT_COMMANDS.contains(&command),
    }
}

/// The renames for `command` whose old name is set and new name is not, as `(old, new, value)`.
pub fn pending(
    command: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Vec<(&'static str, &'static str, String)> {
    RENAMED
        .iter()
        .filter(|r| applies(r, command))
        .filter(|r| var(r.new).is_none())
        .filter_map(|r| var(r.old).map(|value| (r.old, r.new, value)))
        .collect()
}

/// Applies the pending renames for the command in `args` to this process's environment, before
/// anything reads it and before any other thread exists. Returns the warnings to log once logging is
/// set up.
pub fn apply(args: &[String]) -> Vec<String> {
    let Some(command) = command_word(args) else {
        return Vec::new();
    };
    let var = |name: &str| std::env::var(name).ok();
    pending(command, var)
        .into_iter()
        .map(|(old, new, value)| {
            std::env::set_var(new, value);
            format!(
                "{old} is deprecated for `hangar {command}` and will stop working in the next \
                 release; set {new} instead"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn the_command_word_skips_global_flags() {
        assert_eq!(
            command_word(&args(&["hangar", "status", "x"])),
            Some("status")
        );
        assert_eq!(
            command_word(&args(&["hangar", "--log-format", "json", "drone"])),
            Some("drone")
        );
        assert_eq!(command_word(&args(&["hangar", "--help"])), None);
    }

    #[test]
    fn old_names_apply_only_where_they_meant_the_same() {
        let env: HashMap<&str, &str> = [
            ("HANGAR_CONTROLLER_URL", "http://me:8080"),
            ("HANGAR_HOST", "0.0.0.0"),
            ("HANGAR_METRICS_ADDR", "127.0.0.1:9100"),
            ("HANGAR_CONTROLLER", "http://ctrl:8080"),
        ]
        .into();
        let var = |name: &str| env.get(name).map(|v| v.to_string());
        let controller = pending("controller", var);
        assert!(controller.contains(&(
            "HANGAR_CONTROLLER_URL",
            "HANGAR_ADVERTISED_URL",
            "http://me:8080".into()
        )));
        assert!(controller.contains(&("HANGAR_HOST", "HANGAR_CONTROLLER_HOST", "0.0.0.0".into())));
        assert_eq!(controller.len(), 2, "{controller:?}");
        let drone = pending("drone", var);
        assert_eq!(
            drone,
            vec![(
                "HANGAR_METRICS_ADDR",
                "HANGAR_DRONE_METRICS_ADDR",
                "127.0.0.1:9100".into()
            )]
        );
        // For client commands HANGAR_CONTROLLER_URL is already the new name: HANGAR_CONTROLLER
        // does not override it.
        assert!(pending("status", var).is_empty());
        let without_new = |name: &str| {
            (name != "HANGAR_CONTROLLER_URL")
                .then(|| var(name))
                .flatten()
        };
        assert_eq!(
            pending("list", without_new),
            vec![(
                "HANGAR_CONTROLLER",
                "HANGAR_CONTROLLER_URL",
                "http://ctrl:8080".into()
            )]
        );
        assert!(pending("version", without_new).is_empty());
        // A set new name wins over the old one.
        let both = |name: &str| match name {
            "HANGAR_PROXY_HOST" => Some("10.0.0.1".to_string()),
            other => var(other),
        };
        assert!(!pending("proxy", both)
            .iter()
            .any(|(_, new, _)| *new == "HANGAR_PROXY_HOST"));
    }
}
