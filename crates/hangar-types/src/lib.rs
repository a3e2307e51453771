//! Shared vocabulary of Hangar: identifiers, API bodies, wire messages between components, the backend
//! state machine and the timing constants. This crate does no IO; every other crate depends on it.

pub mod api;
pub mod executable;
pub mod logs;
pub mod names;
pub mod protocol;
pub mod state;
pub mod time;
pub mod timing;
pub mod token;

pub use names::{
    ActionId, BackendId, ClusterName, ControllerName, DnsName, DroneName, KeyName, NameError,
    NodeName, ProxyName,
};
pub use state::{BackendState, BackendStatus, TerminationKind, TerminationReason};
pub use time::Millis;

/// Version of Hangar, reported in handshakes, `/ctrl/status` and the proxy's `server` header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Version of the node ↔ controller WebSocket protocol. Bumped on incompatible changes; a peer with a
/// different protocol version is refused at handshake time.
pub const PROTOCOL_VERSION: u32 = 1;
