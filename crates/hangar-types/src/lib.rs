//! Shared vocabulary of Hangar: identifiers, API bodies, wire messages between components, the backend
//! state machine, the timing constants and the periodic tick every loop runs on (`ticks.rs`). This
//! crate does no IO; every other crate depends on it.

pub mod api;
pub mod executable;
pub mod logs;
pub mod names;
pub mod protocol;
pub mod state;
pub mod ticks;
pub mod time;
pub mod timing;
pub mod token;
pub mod warm_pool;

pub use names::{
    ActionId, BackendId, ClusterName, ControllerName, DnsName, DroneName, KeyName, NameError,
    NodeName, ProxyName, WarmPoolName,
};
pub use state::{BackendState, BackendStatus, TerminationKind, TerminationReason};
pub use time::Millis;

/// Version of Hangar, reported in handshakes, `/ctrl/status` and the proxy's `server` header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the running binary was built from, as set by [`set_git_hash`]; `"unknown"` until
/// then (and in builds without git). Reported in `/ctrl/status` and `hangar_build_info`.
pub fn git_hash() -> &'static str {
    GIT_HASH.get().map_or("unknown", String::as_str)
}

/// Records the git commit of this binary (the `hangar` binary does it at start, from its build
/// script). Only the first call has an effect.
pub fn set_git_hash(hash: &str) {
    let _ = GIT_HASH.set(hash.to_string());
}

static GIT_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `error: cause: cause…`, an error with its `source()` chain on one line, for logs. A cause whose
/// text the line already holds (an error that prints its source itself) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Version of the node ↔ controller WebSocket protocol. Bumped on incompatible changes; a peer with a
/// different protocol version is refused at handshake time.
pub const PROTOCOL_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("connect failed")]
        Connect(#[source] Inner),
        #[error("request failed: {0}")]
        Request(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[test]
    fn error_chain_joins_the_causes_once() {
        assert_eq!(
            error_chain(&Outer::Connect(Inner)),
            "connect failed: connection refused"
        );
        assert_eq!(
            error_chain(&Outer::Request(Inner)),
            "request failed: connection refused"
        );
        assert_eq!(error_chain(&Inner), "connection refused");
    }
}
