//! `hangar connect`: get or create the backend of a key, print its URL, then follow its status until
//! it is `ready` (exit 0) or `terminated` (exit 1), or `--timeout-seconds` passes (exit 124). With
//! `--key` alone (no `--command`/`--image`) it only reuses the key's live backend, as Plane's CLI does.

use super::{describe_status, follow_status, Follow, Hint, Output, TimedOut};
use crate::cli::say;
use anyhow::Context;
use clap::{ArgGroup, Args};
use hangar_client::{ClientError, ControllerClient};
use hangar_types::api::{
    ApiError, ApiErrorKind, ConnectRequest, ConnectResponse, KeyConfig, SpawnConfig,
};
use hangar_types::executable::Executable;
use hangar_types::names::validate_key_text;
use hangar_types::state::BackendStatusEntry;
use hangar_types::{BackendId, BackendStatus, ClusterName, KeyName};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("executable").args(["command", "image"])))]
#[command(group(ArgGroup::new("target").required(true).multiple(true).args(["key", "command", "image"])))]
pub struct ConnectArgs {
    /// Key name; connecting again with the same key reuses its backend. Default: random (a new
    /// backend every time). Alone (without --command or --image), only a live backend of the key is
    /// reused; the controller refuses when the key has none (KeyUnheldNoSpawnConfig).
    #[arg(long)]
    pub key: Option<KeyName>,
    /// Key namespace.
    #[arg(long, requires = "key", default_value = "", value_parser = parse_key_text)]
    pub namespace: String,
    /// Key tag; a running backend is reused only when its tag matches.
    #[arg(long, requires = "key", default_value = "", value_parser = parse_key_text)]
    pub tag: String,
    /// Run a local process (process executor), e.g. `--command 'python3 -m http.server'`. Split like
    /// a shell would (quotes and backslashes), without any expansion.
    #[arg(long, value_parser = parse_command_line)]
    pub command: Option<CommandLine>,
    /// Run a container image (Docker executor).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub image: Option<String>,
    /// Environment variable for the backend, `NAME=VALUE`; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var, requires = "executable")]
    pub env: Vec<(String, String)>,
    /// Cluster to run in. Default: the controller's default cluster.
    #[arg(long, requires = "executable")]
    pub cluster: Option<ClusterName>,
    /// Drone pool ("" is the default pool).
    #[arg(long, default_value = "", requires = "executable")]
    pub pool: String,
    /// Terminate the backend after this many seconds without a proxied connection.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..), requires = "executable")]
    pub max_idle_seconds: Option<i32>,
    /// Terminate the backend this many seconds after it was scheduled.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..), requires = "executable")]
    pub lifetime_limit_seconds: Option<i32>,
    /// User name recorded on the connection token (sent to the backend as `x-verified-username`).
    #[arg(long)]
    pub user: Option<String>,
    /// Give the backend one static token instead of a new token per connect.
    #[arg(long, requires = "executable")]
    pub static_token: bool,
    /// Make the backend reachable only through `<subdomain>.<cluster>`.
    #[arg(long, requires = "executable")]
    pub subdomain: Option<String>,
    /// Explicit backend id (discouraged). Default: random.
    #[arg(long, requires = "executable")]
    pub id: Option<BackendId>,
    /// Print the URL and return at once instead of following the status until `ready`.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting for `ready` after this many seconds (exit status 124). Default: wait
    /// forever.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_seconds: Option<u64>,
}

/// A command split into program and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

/// Why a `--command` could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    UnterminatedQuote(char),
    TrailingBackslash,
    Empty,
}

impl std::error::Error for SplitError {}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitError::UnterminatedQuote(q) => write!(f, "unterminated {q} quote"),
            SplitError::TrailingBackslash => f.write_str("trailing backslash"),
            SplitError::Empty => f.write_str("the command is empty"),
        }
    }
}

/// Splits a command line like a POSIX shell does for words: whitespace separates words; `'…'` is
/// literal; `"…"` is literal except `\"`, `\\`, `\$` and `` \` ``; a backslash outside quotes keeps
/// the next character. No variable, glob or tilde expansion.
pub fn split_command_line(s: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(SplitError::UnterminatedQuote('\'')),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(SplitError::UnterminatedQuote('"')),
                        },
                        Some(c) => word.push(c),
                        None => return Err(SplitError::UnterminatedQuote('"')),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err(SplitError::TrailingBackslash),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.first().is_none_or(|w| w.is_empty()) {
        return Err(SplitError::Empty);
    }
    Ok(words)
}

pub(crate) fn parse_command_line(s: &str) -> Result<CommandLine, String> {
    split_command_line(s)
        .map(CommandLine)
        .map_err(|e| format!("cannot split the command: {e}"))
}

/// Parses `NAME=VALUE`. The name must be a portable environment variable name.
pub fn parse_env_var(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    let mut chars = name.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !valid_start || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "invalid variable name {name:?}: use letters, digits and _, not starting with a digit"
        ));
    }
    if value.contains('\0') {
        return Err(format!("the value of {name} contains a NUL byte"));
    }
    Ok((name.to_string(), value.to_string()))
}

fn parse_key_text(s: &str) -> Result<String, String> {
    validate_key_text(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// The executable of `--command` or `--image` (exactly one given) with `--env` entries.
pub(crate) fn build_executable(
    command: &Option<CommandLine>,
    image: &Option<String>,
    env: &[(String, String)],
) -> anyhow::Result<Executable> {
    let env: BTreeMap<String, String> = env.iter().cloned().collect();
    let executable = match (command, image) {
        (Some(CommandLine(command)), None) => {
            serde_json::json!({"command": command, "env": env})
        }
        (None, Some(image)) => serde_json::json!({"image": image, "env": env}),
        // clap's `executable` group makes exactly one of them present.
        _ => anyhow::bail!("give exactly one of --command and --image"),
    };
    Executable::from_json(&executable).context("invalid executable")
}

impl ConnectArgs {
    /// The request sent to `POST /ctrl/connect`.
    pub fn to_request(&self) -> anyhow::Result<ConnectRequest> {
        let key = self.key.clone().map(|name| KeyConfig {
            name,
            namespace: self.namespace.clone(),
            tag: self.tag.clone(),
        });
        if self.command.is_none() && self.image.is_none() {
            // `--key` alone: reuse only, nothing to spawn.
            anyhow::ensure!(key.is_some(), "give --key, --command or --image");
            return Ok(ConnectRequest {
                key,
                spawn_config: None,
                user: self.user.clone(),
                auth: Default::default(),
            });
        }
        let executable = build_executable(&self.command, &self.image, &self.env)?;
        Ok(ConnectRequest {
            key,
            spawn_config: Some(SpawnConfig {
                id: self.id.clone(),
                cluster: self.cluster.clone(),
                pool: self.pool.clone(),
                executable,
                lifetime_limit_seconds: self.lifetime_limit_seconds,
                max_idle_seconds: self.max_idle_seconds,
                use_static_token: self.static_token,
                subdomain: self.subdomain.clone(),
            }),
            user: self.user.clone(),
            auth: Default::default(),
        })
    }
}

/// What `connect --json` prints: the controller's answer, and the status the wait ended with
/// (`final_status`; absent with `--no-wait`, `null` when `--timeout-seconds` passed first).
#[derive(Debug, Serialize)]
struct ConnectOutput<'a> {
    #[serde(flatten)]
    response: &'a ConnectResponse,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_status: Option<Option<BackendStatusEntry>>,
}

pub async fn run(
    client: &ControllerClient,
    args: ConnectArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let request = args.to_request()?;
    let reuse_only = request.spawn_config.is_none();
    let resp = match client.connect(&request).await {
        Ok(resp) => resp,
        Err(
            e @ ClientError::Api {
                error:
                    ApiError {
                        kind: ApiErrorKind::KeyUnheldNoSpawnConfig,
                        ..
                    },
                ..
            },
        ) if reuse_only => {
            let key = args
                .key
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            return Err(anyhow::Error::new(e).context(Hint(format!(
                "key {key:?} has no live backend to reuse; give --command or --image to start one"
            ))));
        }
        Err(e) => return Err(e).context("connect request failed"),
    };
    if !out.json {
        let verb = if resp.spawned { "Created" } else { "Reusing" };
        // Plane's wording, so scripts written against `plane admin connect` keep working.
        say!("{verb} backend: {}", resp.backend_id);
        say!("URL: {}", resp.url);
        say!("Status URL: {}", resp.status_url);
        if let Some(drone) = &resp.drone {
            say!("Drone: {drone}");
        }
    }
    if args.no_wait {
        if out.json {
            out.json_line(&ConnectOutput {
                response: &resp,
                final_status: None,
            })?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A reused backend that is already terminating replays `ready` from its history: for it, only
    // `terminated` ends the wait.
    let already_terminating = resp.status.is_terminating_or_terminated();
    let follow = Follow {
        print_from: BackendStatus::Scheduled,
        json_each: false,
        with_time: false,
    };
    let wait = follow_status(client, &resp.backend_id, out, follow, |s| {
        s == BackendStatus::Terminated || (s == BackendStatus::Ready && !already_terminating)
    });
    let entry = match args.timeout_seconds {
        None => Some(wait.await?),
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), wait).await {
            Ok(entry) => Some(entry?),
            Err(_) => None,
        },
    };
    if out.json {
        out.json_line(&ConnectOutput {
            response: &resp,
            final_status: Some(entry.clone()),
        })?;
    }
    match entry {
        Some(entry) if entry.status == BackendStatus::Ready => Ok(ExitCode::SUCCESS),
        Some(entry) => anyhow::bail!("backend {} {}", resp.backend_id, describe_status(&entry)),
        None => Err(TimedOut {
            what: format!("backend {} was not ready", resp.backend_id),
            seconds: args.timeout_seconds.unwrap_or_default(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ConnectArgs, clap::Error> {
        crate::parse_flags(args)
    }

    #[test]
    fn command_is_split_like_a_shell() {
        assert_eq!(
            split_command_line("python3 -m http.server").unwrap(),
            ["python3", "-m", "http.server"]
        );
        assert_eq!(
            split_command_line(r#"  /bin/sh -c 'echo "hi there"; exit 3'  "#).unwrap(),
            ["/bin/sh", "-c", r#"echo "hi there"; exit 3"#]
        );
        assert_eq!(
            split_command_line(r#"a "b \"c\" \n" d\ e ''"#).unwrap(),
            ["a", r#"b "c" \n"#, "d e", ""]
        );
        assert_eq!(split_command_line("'it''s'").unwrap(), ["its"]);
        assert_eq!(
            split_command_line("echo 'open"),
            Err(SplitError::UnterminatedQuote('\''))
        );
        assert_eq!(
            split_command_line("echo \"open"),
            Err(SplitError::UnterminatedQuote('"'))
        );
        assert_eq!(
            split_command_line("echo \\"),
            Err(SplitError::TrailingBackslash)
        );
        assert_eq!(split_command_line("   "), Err(SplitError::Empty));
        assert_eq!(split_command_line("'' x"), Err(SplitError::Empty));
    }

    #[test]
    fn connect_args_build_a_process_request() {
        let args = parse(&[
            "--key",
            "room 1",
            "--namespace",
            "games",
            "--command",
            "/bin/backend --port-from-env 'a b'",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--max-idle-seconds",
            "30",
            "--user",
            "alice",
            "--static-token",
        ])
        .unwrap();
        let req = args.to_request().unwrap();
        let key = req.key.unwrap();
        assert_eq!(key.name.as_str(), "room 1");
        assert_eq!(key.namespace, "games");
        assert_eq!(key.tag, "");
        let spawn = req.spawn_config.unwrap();
        assert_eq!(spawn.max_idle_seconds, Some(30));
        assert!(spawn.use_static_token);
        assert_eq!(spawn.cluster, None);
        let exe = serde_json::to_value(&spawn.executable).unwrap();
        assert_eq!(
            exe,
            serde_json::json!({"command": ["/bin/backend", "--port-from-env", "a b"],
                "env": {"A": "1", "B": "x=y"}})
        );
        assert_eq!(req.user.as_deref(), Some("alice"));
        assert!(!args.no_wait);
    }

    #[test]
    fn connect_args_build_a_docker_request() {
        let args = parse(&[
            "--image",
            "ghcr.io/org/app:1",
            "--cluster",
            "localhost:9090",
        ])
        .unwrap();
        let req = args.to_request().unwrap();
        assert!(req.key.is_none());
        let spawn = req.spawn_config.unwrap();
        assert_eq!(
            spawn.executable.kind(),
            hangar_types::executable::ExecutorKind::Docker
        );
        assert_eq!(spawn.cluster.unwrap().as_str(), "localhost:9090");
    }

    #[test]
    fn bad_connect_args_are_refused() {
        // Nothing to connect to, or both of --command and --image.
        assert!(parse(&[]).is_err());
        assert!(parse(&["--command", "x", "--image", "y"]).is_err());
        // --key alone reuses; spawn settings need something to spawn.
        let alone = parse(&["--key", "k", "--namespace", "n"]).unwrap();
        let req = alone.to_request().unwrap();
        assert!(req.spawn_config.is_none());
        assert_eq!(req.key.unwrap().namespace, "n");
        assert!(parse(&["--key", "k", "--env", "A=1"]).is_err());
        assert!(parse(&["--key", "k", "--max-idle-seconds", "5"]).is_err());
        // Unsplittable or empty commands.
        assert!(parse(&["--command", "echo 'x"]).is_err());
        assert!(parse(&["--command", "  "]).is_err());
        // --env needs NAME=VALUE with a valid name.
        let err = parse(&["--command", "x", "--env", "NOVALUE"]).unwrap_err();
        assert!(err.to_string().contains("expected NAME=VALUE"), "{err}");
        assert!(parse(&["--command", "x", "--env", "=v"]).is_err());
        assert!(parse(&["--command", "x", "--env", "1A=v"]).is_err());
        assert!(parse(&["--command", "x", "--env", "A-B=v"]).is_err());
        // Namespace/tag only with a key; bad cluster; non-positive limits.
        assert!(parse(&["--command", "x", "--namespace", "n"]).is_err());
        assert!(parse(&["--command", "x", "--cluster", "bad host"]).is_err());
        assert!(parse(&["--command", "x", "--max-idle-seconds", "0"]).is_err());
        assert!(parse(&["--command", "x", "--lifetime-limit-seconds", "-5"]).is_err());
        assert!(parse(&["--command", "x", "--key", ""]).is_err());
        assert!(parse(&["--command", "x", "--image", ""]).is_err());
    }

    #[test]
    fn env_vars_parse() {
        assert_eq!(
            parse_env_var("A_1=hello world").unwrap(),
            ("A_1".to_string(), "hello world".to_string())
        );
        assert_eq!(parse_env_var("EMPTY=").unwrap().1, "");
        assert!(parse_env_var("NOPE").is_err());
    }
}
