//! The proxy ↔ backend fault relay. The drone starts `hangar-chaos shim` as the backend command; the
//! shim starts the real test backend on a private port and relays the port the drone gave it
//! (`PORT`, which the drone probes and the proxy dials) to it through a [`Relay`]. The harness
//! breaks that link by writing a mode to the file named by `HANGAR_CHAOS_LINK_FILE`, which every
//! shim of the run polls: `<epoch> <mode>`, where mode is `pass`, `drop`, `black-hole`,
//! `half-open`, `reset` or `delay:<ms>`.
//!
//! The shim and the backend share the process group the drone made, so the drone's SIGTERM and
//! SIGKILL of the group reach both; the shim outlives a SIGTERM only until the backend exits, and
//! exits with its code.

use crate::relay::{Relay, RelayMode};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Environment of the shim: the test backend to run and the link's mode file.
pub const BACKEND_VAR: &str = "HANGAR_CHAOS_BACKEND";
pub const LINK_FILE_VAR: &str = "HANGAR_CHAOS_LINK_FILE";

const POLL: Duration = Duration::from_millis(100);

/// Writes `fault` for every shim of a run to pick up (`epoch` makes a repeated mode a new order).
pub fn write_mode(file: &Path, epoch: u64, mode: Option<RelayMode>) -> std::io::Result<()> {
    let text = match mode {
        None => "drop".to_string(),
        Some(RelayMode::Pass) => "pass".to_string(),
        Some(RelayMode::BlackHole) => "black-hole".to_string(),
        Some(RelayMode::HalfOpen) => "half-open".to_string(),
        Some(RelayMode::Reset) => "reset".to_string(),
        Some(RelayMode::Delay(d)) => format!("delay:{}", d.as_millis()),
    };
    // Written whole and renamed, so a shim never reads half a line.
    let partial = file.with_extension("partial");
    std::fs::write(&partial, format!("{epoch} {text}\n"))?;
    std::fs::rename(partial, file)
}

/// `None` is a drop (close open connections, then pass).
fn parse_mode(text: &str) -> Option<(u64, Option<RelayMode>)> {
    let (epoch, mode) = text.trim().split_once(' ')?;
    let mode = match mode {
        "drop" => None,
        "pass" => Some(RelayMode::Pass),
        "black-hole" => Some(RelayMode::BlackHole),
        "half-open" => Some(RelayMode::HalfOpen),
        "reset" => Some(RelayMode::Reset),
        other => Some(RelayMode::Delay(Duration::from_millis(
            other.strip_prefix("delay:")?.parse().ok()?,
        ))),
    };
    Some((epoch.parse().ok()?, mode))
}

/// Runs the shim until the backend exits.
pub async fn run() -> anyhow::Result<ExitCode> {
    let port: u16 = std::env::var("PORT")
        .context("PORT is not set")?
        .parse()
        .context("PORT is not a port")?;
    let backend = PathBuf::from(std::env::var_os(BACKEND_VAR).context("no backend to run")?);
    let link_file = PathBuf::from(std::env::var_os(LINK_FILE_VAR).context("no link file")?);
    let inner = crate::free_port()?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut child = tokio::process::Command::new(backend)
        .env("PORT", inner.to_string())
        .spawn()
        .context("starting the test backend")?;
    let relay = Relay::start_on(
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from(([127, 0, 0, 1], inner)),
    )
    .await
    .context("listening on PORT")?;
    let mut applied = 0;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            // The group's SIGTERM reached the backend too: wait for it to exit.
            _ = terminate.recv() => {}
            _ = tokio::time::sleep(POLL) => {
                let order = std::fs::read_to_string(&link_file).ok().and_then(|t| parse_mode(&t));
                if let Some((epoch, mode)) = order.filter(|(epoch, _)| *epoch > applied) {
                    applied = epoch;
                    match mode {
                        None => relay.drop_connections(),
                        Some(mode) => relay.set(mode),
                    }
                }
            }
        }
    };
    relay.shutdown().await;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("link");
        for (epoch, mode) in [
            (1, None),
            (2, Some(RelayMode::Pass)),
            (3, Some(RelayMode::BlackHole)),
            (4, Some(RelayMode::HalfOpen)),
            (5, Some(RelayMode::Reset)),
            (6, Some(RelayMode::Delay(Duration::from_millis(750)))),
        ] {
            write_mode(&file, epoch, mode).unwrap();
            let text = std::fs::read_to_string(&file).unwrap();
            assert_eq!(parse_mode(&text), Some((epoch, mode)));
        }
        assert_eq!(parse_mode("7 sideways"), None);
    }
}
