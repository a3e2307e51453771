//! The configuration documentation that is checked against the code, so it cannot drift:
//!
//! - `docs/configuration.md`, generated here from clap's definition of every server command (flags,
//!   `HANGAR_*` variables, defaults, help) and from the component `*Config` structs (TOML keys, their
//!   doc comments, defaults from serde). A test fails when the checked-in file differs; regenerate it
//!   with `UPDATE_EXPECT=1 cargo test -p hangar --bin hangar config_docs`.
//! - `examples/config/*.toml`, each loaded through the real configuration path of its command
//!   (`--config FILE`, [`crate::config_file`], the component's `validate()`);
//! - `packaging/systemd/*.service`, whose `ExecStart` must parse as a `hangar` command line reading
//!   an installed copy of its component's example file.
//!
//! Test-only: nothing here is compiled into the binary.

use crate::Cli;
use clap::{Arg, Command, CommandFactory};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Repository root (this crate is `crates/hangar`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The doc comments of a struct's fields, read from its source: `(field, doc)` in declaration order.
/// Fields that serde skips are left out.
fn field_docs(source: &str, name: &str) -> Vec<(String, String)> {
    let start = format!("pub struct {name} {{");
    let mut fields = Vec::new();
    let mut lines = source.lines().skip_while(|l| l.trim() != start).skip(1);
    let (mut doc, mut skipped) = (Vec::new(), false);
    for line in lines.by_ref() {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if line.starts_with("#[serde(skip") {
            skipped = true;
        } else if let Some(rest) = line.strip_prefix("pub ") {
            let field = rest
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            if !skipped {
                fields.push((field, doc.join(" ")));
            }
            (doc, skipped) = (Vec::new(), false);
        }
    }
    assert!(!fields.is_empty(), "no fields found for struct {name}");
    fields
}

/// One component's configuration file: the structs whose fields it holds (by TOML table prefix),
/// the smallest valid file (for the defaults) and the process settings the command takes out first.
struct FileSpec {
    command: &'static str,
    /// `(table prefix, struct name, source)`; "" is the top level.
    structs: Vec<(&'static str, &'static str, &'static str)>,
    /// The required fields with placeholder values, plus what makes nested tables appear.
    minimal: &'static str,
    /// Keys that are not component fields (`db`, `host`, …): `(key, flag documenting it)`.
    process: &'static [(&'static str, &'static str)],
    /// Serializes the component's configuration built from `minimal` (defaults filled in).
    defaults: fn(&str) -> toml::Table,
}

fn built<C: serde::de::DeserializeOwned + serde::Serialize>(
    text: &str,
    what: &'static str,
) -> toml::Table {
    let layers = crate::config_file::ConfigLayers::parse(text, Path::new("minimal.toml"))
        .expect("minimal file parses");
    let config: C = layers.build(what).expect("minimal file builds");
    match toml::Value::try_from(&config).expect("configuration serializes") {
        toml::Value::Table(table) => table,
        other => panic!("a configuration serializes to a table, not {other}"),
    }
}

const CONTROLLER_SRC: &str = include_str!("../../hangar-controller/src/config.rs");
const DRONE_SRC: &str = include_str!("../../hangar-drone/src/config.rs");
const PROXY_SRC: &str = include_str!("../../hangar-proxy/src/config.rs");
const ACME_SRC: &str = include_str!("../../hangar-proxy/src/acme/config.rs");

fn file_specs() -> Vec<FileSpec> {
    vec![
        FileSpec {
            command: "controller",
            structs: vec![("", "ControllerConfig", CONTROLLER_SRC)],
            minimal: "",
            process: &[("db", "--db"), ("host", "--host"), ("port", "--port")],
            defaults: |t| built::<hangar_controller::ControllerConfig>(t, "controller"),
        },
        FileSpec {
            command: "drone",
            structs: vec![("", "DroneConfig", DRONE_SRC)],
            minimal: "controller_url = \"http://controller:8080/\"\ncluster = \"example.com\"\n",
            process: &[],
            defaults: |t| built::<hangar_drone::DroneConfig>(t, "drone"),
        },
        FileSpec {
            command: "proxy",
            structs: vec![
                ("", "ProxyConfig", PROXY_SRC),
                ("acme.", "AcmeConfig", ACME_SRC),
                ("acme.eab.", "EabConfig", ACME_SRC),
            ],
            minimal: "controller_url = \"http://controller:8080/\"\ncluster = \"example.com\"\n\
                      [acme]\ndirectory_url = \"https://ca.example/dir\"\nemail = \"ops@example.com\"\n\
                      [acme.eab]\nkey_id = \"kid\"\nhmac_key = \"a2V5\"\n",
            process: &[
                ("host", "--host"),
                ("http_port", "--http-port"),
                ("https", "--https"),
                ("https_port", "--https-port"),
            ],
            defaults: |t| built::<hangar_proxy::ProxyConfig>(t, "proxy"),
        },
    ]
}

/// The value at a dotted path of a table.
fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Splits the `Default: …` sentence out of a flag's help or a field's doc comment: the text without
/// it, and what it says (without its final period). The sentence runs to the end of the text or to a
/// period (outside parentheses) followed by a capitalised sentence; a lowercase `default:` inside another sentence is left alone.
fn split_default(text: &str) -> (String, Option<String>) {
    let Some(start) = text.find("Default: ") else {
        return (text.trim().to_string(), None);
    };
    let after = &text[start + "Default: ".len()..];
    // Outside parentheses, a period, a space and a capital letter start the next sentence.
    let mut depth = 0i32;
    let end = after
        .char_indices()
        .find(|&(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            c == '.'
                && depth == 0
                && after[i + 1..].starts_with(' ')
                && after[i + 2..].starts_with(char::is_uppercase)
        })
        .map_or(after.len(), |(i, _)| i);
    let default = literal_in_code(after[..end].trim().trim_end_matches('.'));
    let rest = after.get(end + 1..).unwrap_or_default();
    let without = format!("{}{}", &text[..start], rest.trim_start());
    (without.trim().to_string(), Some(default))
}

/// A default that is one literal value (`8080`, `127.0.0.1`, `dns-01`, optionally followed by a
/// parenthesis) in code style, as the column shows the values clap and serde give; words (`none`,
/// `random`, `Docker's`) and phrases stay as they are.
fn literal_in_code(default: &str) -> String {
    let (head, tail) = match default.find(" (") {
        Some(i) => default.split_at(i),
        None => (default, ""),
    };
    let word = head.contains([' ', '`', '\'', '"']) || ["none", "off", "random"].contains(&head);
    if head.is_empty() || word {
        default.to_string()
    } else {
        format!("`{head}`{tail}")
    }
}

/// Markdown table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The TOML keys of a command's file: `(key, default, description)`.
fn file_keys(spec: &FileSpec) -> Vec<(String, String, String)> {
    let defaults = (spec.defaults)(spec.minimal);
    let again = (spec.defaults)(spec.minimal);
    let minimal: toml::Table = spec.minimal.parse().expect("minimal file parses");
    let mut rows = Vec::new();
    for (key, flag) in spec.process {
        rows.push((
            key.to_string(),
            "see the flag".to_string(),
            format!("Process setting, as `{flag}`."),
        ));
    }
    for (prefix, name, source) in &spec.structs {
        for (field, doc) in field_docs(source, name) {
            let key = format!("{prefix}{field}");
            let (doc, documented) = split_default(&doc);
            let nested = spec.structs.iter().any(|(p, _, _)| *p == format!("{key}."));
            let value = match (lookup(&defaults, &key), lookup(&again, &key)) {
                (Some(a), Some(b)) if a != b => None,
                (value, _) => value,
            };
            let default = if nested {
                format!("`[{key}]` table, none")
            } else if lookup(&minimal, &key).is_some() {
                "required".to_string()
            } else if let Some(documented) = documented {
                // The doc's words say more (units, what "none" means); they must not contradict
                // the value the code uses.
                if let Some(value) = value.and_then(scalar) {
                    assert!(
                        documented.replace(' ', "").contains(&value),
                        "`{key}`: the doc comment says `Default: {documented}`, the code uses {value}"
                    );
                }
                documented
            } else {
                match (lookup(&defaults, &key), value) {
                    (Some(_), None) => "random".to_string(),
                    (Some(value), Some(_)) => format!("`{value}`"),
                    (None, _) => "none".to_string(),
                }
            };
            rows.push((key, default, doc));
        }
    }
    rows
}

/// A scalar default as its doc comment would write it (strings without quotes); `None` for tables
/// and arrays.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        // A whole number of seconds is written without its `.0`.
        toml::Value::Float(f) if f.fract() == 0.0 => Some(format!("{f:.0}")),
        toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
            Some(value.to_string())
        }
        _ => None,
    }
}

/// A flag's TOML key in its command's file, where the names differ or the key is nested.
fn toml_key(command: &str, arg: &Arg, keys: &[String]) -> Option<String> {
    let id = arg.get_id().as_str();
    let renamed = match (command, id) {
        ("drone", "log_config") => Some("docker_log_config"),
        ("proxy", "acme_endpoint") => Some("acme.directory_url"),
        ("proxy", "acme_email") => Some("acme.email"),
        ("proxy", "acme_eab_kid") => Some("acme.eab.key_id"),
        ("proxy", "acme_eab_hmac_key") => Some("acme.eab.hmac_key"),
        ("proxy", "acme_challenge") => Some("acme.challenge"),
        ("proxy", "acme_ca_cert") => Some("acme.ca_cert_path"),
        _ => None,
    };
    let key = renamed.unwrap_or(id);
    keys.iter().any(|k| k == key).then(|| key.to_string())
}

/// The flags table of a command.
fn flags_table(out: &mut String, command: &Command, keys: &[String]) {
    out.push_str("| Flag | Environment | TOML key | Default | Description |\n");
    out.push_str("|---|---|---|---|---|\n");
    for arg in command.get_arguments() {
        if arg.is_hide_set() || arg.is_positional() {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let value = match arg.get_value_names() {
            Some(names) if arg.get_action().takes_values() => {
                format!(
                    " {}",
                    names
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
            _ => String::new(),
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "—".to_string());
        let key = toml_key(command.get_name(), arg, keys)
            .map(|k| format!("`{k}`"))
            .unwrap_or_else(|| "—".to_string());
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty() && v != "false")
            .collect();
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let (mut help, documented) = split_default(&help);
        let default = match documented {
            Some(documented) => {
                assert!(
                    defaults.is_empty(),
                    "--{long}: a clap default and a `Default:` sentence"
                );
                documented
            }
            None if defaults.is_empty() => "—".to_string(),
            None => format!("`{}`", defaults.join(",")),
        };
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() && arg.get_action().takes_values() {
            let _ = write!(help, " Values: {}.", values.join(", "));
            help = help.trim_start().to_string();
        }
        let _ = writeln!(
            out,
            "| `--{long}{value}` | {env} | {key} | {} | {} |",
            cell(&default),
            cell(&help)
        );
    }
}

/// `docs/configuration.md`.
pub fn reference() -> String {
    let cli = Cli::command();
    let specs = file_specs();
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Generated from the code by crates/hangar/src/config_docs.rs; do not edit. Regenerate with\n     \
         UPDATE_EXPECT=1 cargo test -p hangar --bin hangar config_docs -->\n\n\
         Every server command of `hangar` is configured by flags, by `HANGAR_*` environment variables\n\
         (one per flag) and, for `controller`, `drone` and `proxy`, by a TOML file given with `--config`.\n\
         Flags win over variables, which win over the file, which wins over the defaults; a key the\n\
         file does not know is refused by name. Commented examples: `examples/config/`.\n\n\
         Units: durations in the controller's and the drone's files are milliseconds, in the proxy's\n\
         file seconds (fractions allowed).\n",
    );
    let globals: Vec<&Arg> = cli.get_arguments().filter(|a| !a.is_hide_set()).collect();
    if !globals.is_empty() {
        out.push_str("\n## Options of every command\n\n");
        flags_table(&mut out, &cli, &[]);
    }
    for name in ["dev", "controller", "drone", "proxy", "dns", "migrate"] {
        let Some(command) = cli.find_subcommand(name) else {
            continue;
        };
        let about = command
            .get_about()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let _ = write!(out, "\n## `hangar {name}`\n\n{}\n\n", cell(&about));
        let spec = specs.iter().find(|s| s.command == name);
        let rows = spec.map(file_keys).unwrap_or_default();
        let keys: Vec<String> = rows.iter().map(|(k, _, _)| k.clone()).collect();
        flags_table(&mut out, command, &keys);
        if spec.is_some() {
            let _ = write!(
                out,
                "\n### `hangar {name} --config FILE`\n\n| TOML key | Default | Description |\n|---|---|---|\n"
            );
            for (key, default, doc) in &rows {
                let _ = writeln!(out, "| `{key}` | {} | {} |", cell(default), cell(doc));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_reference_is_current() {
        let path = repo_root().join("docs/configuration.md");
        let generated = reference();
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            std::fs::write(&path, &generated).expect("writing docs/configuration.md");
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/configuration.md is stale (the flags or the *Config structs changed); regenerate it \
             with `UPDATE_EXPECT=1 cargo test -p hangar --bin hangar config_docs` and commit it"
        );
    }

    #[test]
    fn default_sentences_are_split_out() {
        let split = |text: &str| split_default(text);
        assert_eq!(
            split("Port to listen on. Default: 8080."),
            ("Port to listen on.".into(), Some("`8080`".into()))
        );
        assert_eq!(
            split("Name. Default: none (such requests get 400). More text. And `more`."),
            (
                "Name. More text. And `more`.".into(),
                Some("none (such requests get 400)".into())
            )
        );
        assert_eq!(
            split("Dir. Default: the data directory (e.g. `~/.local/share/hangar`)"),
            (
                "Dir.".into(),
                Some("the data directory (e.g. `~/.local/share/hangar`)".into())
            )
        );
        assert_eq!(
            split("Timeout (ms; default: 10000)."),
            ("Timeout (ms; default: 10000).".into(), None)
        );
    }

    #[test]
    fn defaults_are_in_the_default_column_only() {
        let text = reference();
        for line in text.lines().filter(|l| l.starts_with('|')) {
            let description = line.trim_end_matches('|').rsplit('|').next().unwrap_or("");
            assert!(!description.contains("Default: "), "{line}");
        }
        assert!(
            text.contains(
                "| `--port PORT` | `HANGAR_CONTROLLER_PORT` | `port` | `8080` | Port to listen on. |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| `cleanup_interval` | `180000` (180 s) |"),
            "{text}"
        );
    }

    #[test]
    fn the_reference_covers_every_file_key_and_flag() {
        let text = reference();
        for key in [
            "best_of",
            "soft_terminate_grace",
            "acme.retry_max",
            "db",
            "http_port",
        ] {
            assert!(text.contains(&format!("| `{key}` |")), "{key} missing");
        }
        for flag in [
            "--default-cluster",
            "--executor",
            "--acme-endpoint",
            "--zone",
            "--in-memory",
        ] {
            assert!(text.contains(&format!("`{flag}")), "{flag} missing");
        }
        assert!(text.contains("`HANGAR_DB`"), "environment variables listed");
        assert!(
            !text.contains("key_timing"),
            "serde-skipped fields are not file keys"
        );
        let docs = field_docs(DRONE_SRC, "DroneConfig");
        let (_, ip) = docs.iter().find(|(f, _)| f == "ip").expect("ip documented");
        assert!(ip.contains("proxies reach"), "{ip}");
    }

    /// Runs the command line and returns its parsed arguments.
    fn parse(args: &[&str]) -> crate::Command {
        use clap::Parser;
        crate::Cli::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    /// Each systemd unit starts `hangar <component> --config /etc/hangar/<file>`, a copy of the
    /// example of its component (its header says to install it), and that command line parses.
    #[test]
    fn systemd_units_run_a_valid_command_on_an_example_file() {
        let dir = repo_root().join("packaging/systemd");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("packaging/systemd exists") {
            let path = entry.expect("directory entry").path();
            let unit = path.display();
            let text = std::fs::read_to_string(&path).expect("unit file reads");
            let exec = text
                .lines()
                .find_map(|l| l.strip_prefix("ExecStart="))
                .unwrap_or_else(|| panic!("{unit}: no ExecStart"));
            let args: Vec<&str> = exec.split_whitespace().collect();
            assert_eq!(args.first(), Some(&"/usr/local/bin/hangar"), "{unit}");
            let at = args.iter().position(|a| *a == "--config");
            let installed = at
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{unit}: no --config"));
            let name = Path::new(installed)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let example = repo_root().join("examples/config").join(&name);
            assert!(example.exists(), "{unit}: no examples/config/{name}");
            assert!(
                text.contains(&format!("examples/config/{name} {installed}")),
                "{unit}: the install steps copy examples/config/{name} to {installed}"
            );
            let example = example.to_string_lossy().into_owned();
            let argv: Vec<&str> = std::iter::once("hangar")
                .chain(
                    args[1..]
                        .iter()
                        .map(|a| if a == installed { example.as_str() } else { *a }),
                )
                .collect();
            let component = args.get(1).copied().unwrap_or_default();
            assert!(
                path.ends_with(format!("hangar-{component}.service")),
                "{unit} runs {component}"
            );
            parse(&argv);
            seen += 1;
        }
        assert_eq!(seen, 3, "one unit per component");
    }

    #[test]
    fn example_configuration_files_load() {
        let dir = repo_root().join("examples/config");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/config exists") {
            let name = entry.expect("directory entry").file_name();
            let name = name.to_string_lossy().into_owned();
            let file = path(&name);
            // Each file is named for the command that loads it.
            let component = name
                .strip_suffix(".toml")
                .filter(|c| ["controller", "drone", "proxy"].contains(c))
                .unwrap_or_else(|| {
                    panic!("examples/config/{name} has no loading test; add it here")
                });
            match parse(&["hangar", component, "--config", &file]) {
                crate::Command::Controller(args) => {
                    let setup = args.resolve().unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    assert_eq!(setup.listen.port(), 8080, "{name}");
                }
                crate::Command::Drone(args) => {
                    let config = args.to_config().unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(config.state_file.is_some(), "{name}");
                }
                crate::Command::Proxy(args) => {
                    let setup = args.to_setup().unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    setup
                        .config
                        .validate()
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                _ => unreachable!("{component} is a component command"),
            }
            seen += 1;
        }
        assert_eq!(seen, 3, "one example per component");
    }
}
